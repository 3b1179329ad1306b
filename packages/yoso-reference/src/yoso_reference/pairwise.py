"""The quadratic pieces: YOSO-E (forward and backward) and the sampled true gradient.

Each is a pairwise weight matrix over (query, key) applied to values and gradients:

* YOSO-E forward        ``Y = (P ⊙ M) V`` with ``P_ij = p(x_ij)``;
* YOSO-E backward       ``dV = (P ⊙ M)^T G``, ``dQ = (D ⊙ M ⊙ G V^T) K``, ``dK = (D ⊙ M ⊙ G V^T)^T Q``
                         with ``D = p'`` (clamped, ``backward="exact"``) or ``(tau/2) p`` (``"lower_bound"``);
* YOSO-m backward      ``dQ = (S ⊙ W ⊙ M ⊙ G V^T) K`` and its transpose for ``dK``, where
                         ``S_ij`` is the fraction of the m hashes in which ``q_i`` and ``k_j`` collide and
                         ``W`` is ``tau/2`` (lower bound) or the clamped importance ratio ``p'/p`` (*YOSO);
                         the lower bound's table form is in ``tables``.

``M`` combines the query mask, the key mask and (``causal=True``) ``j <= i``. Inputs are unit vectors
``q [B, Nq, D]``, ``k [B, Nk, D]``, values ``v [B, Nk, Dv]``, output gradients ``grad [B, Nq, Dv]``.
Queries are processed in chunks so that no full N x N matrix is ever held (memory O(chunk * N)).
"""

from __future__ import annotations

import numpy as np

from .probability import collision_derivative, collision_probability, importance_ratio, lower_bound_derivative
from .tables import FORMS, choose_form, lower_bound_tables

# Pairwise entries per chunk (all batch rows together): 2^22 float64 = 32 MiB per temporary.
CHUNK_ELEMENTS = 1 << 22

BACKWARDS = ("lower_bound", "exact")


def collision_matrix(q_codes: np.ndarray, k_codes: np.ndarray) -> np.ndarray:
    """``S[b, i, j] = (1/m) * #{s : q_codes[b, s, i] == k_codes[b, s, j]}`` -> ``[B, Nq, Nk]`` float64."""
    return (q_codes[:, :, :, None] == k_codes[:, :, None, :]).mean(axis=1)


def attention_mask(batch: int, n_query: int, n_key: int, query_mask=None, key_mask=None, causal=False, rows=None):
    """The boolean ``M [B, Nq, Nk]`` (or its query ``rows``): query kept, key kept and, if causal, ``j <= i``."""
    rows = slice(0, n_query) if rows is None else rows
    positions = np.arange(rows.start, rows.stop)
    mask = np.ones((batch, len(positions), n_key), dtype=bool)
    if query_mask is not None:
        mask &= query_mask[:, rows, None]
    if key_mask is not None:
        mask &= key_mask[:, None, :]
    if causal:
        mask &= positions[:, None] >= np.arange(n_key)[None, :]
    return mask


def _zero_masked_rows(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    # Masked rows may hold anything (padding, inf); they must not reach a matrix product.
    return x if mask is None else np.where(mask[..., None], x, 0)


def _query_chunks(batch: int, n_query: int, n_key: int):
    size = max(1, CHUNK_ELEMENTS // max(1, batch * n_key))
    for start in range(0, n_query, size):
        yield slice(start, min(n_query, start + size))


def _dtype(*arrays) -> np.dtype:
    return np.result_type(np.float32, *[a.dtype for a in arrays])


def expectation_forward(q, k, v, *, query_mask=None, key_mask=None, causal=False, hash_bits: int) -> np.ndarray:
    """YOSO-E: ``Y_i = sum_j M_ij p(q_i · k_j) v_j`` -> ``[B, Nq, Dv]``."""
    dtype = _dtype(q, k, v)
    q, k, v = (_zero_masked_rows(x.astype(dtype), m) for x, m in ((q, query_mask), (k, key_mask), (v, key_mask)))
    out = np.zeros(q.shape[:2] + v.shape[2:], dtype=dtype)
    for rows in _query_chunks(q.shape[0], q.shape[1], k.shape[1]):
        mask = _chunk_mask(rows, q, k, query_mask, key_mask, causal)
        weights = np.where(mask, collision_probability(q[:, rows] @ k.transpose(0, 2, 1), hash_bits), 0)
        out[:, rows] = weights @ v
    return out


def _chunk_mask(rows, q, k, query_mask, key_mask, causal):
    return attention_mask(q.shape[0], q.shape[1], k.shape[1], query_mask, key_mask, causal, rows=rows)


def _pairwise_backward(q, k, v, grad, pair_weight, *, query_mask, key_mask, causal, value_weight=None):
    """Shared body: ``dQ = (A ⊙ G V^T) K``, ``dK = (...)^T Q`` and, if asked, ``dV = B^T G``.

    ``pair_weight(rows, x)`` gives ``A`` for a chunk of query rows given their cosines ``x``;
    ``value_weight(rows, x)`` likewise gives ``B`` (None: no value gradient).
    """
    dtype = _dtype(q, k, v, grad)
    q, grad = (_zero_masked_rows(x.astype(dtype), query_mask) for x in (q, grad))
    k, v = (_zero_masked_rows(x.astype(dtype), key_mask) for x in (k, v))
    dq = np.zeros_like(q)
    dk = np.zeros_like(k)
    dv = np.zeros_like(v)
    for rows in _query_chunks(q.shape[0], q.shape[1], k.shape[1]):
        mask = _chunk_mask(rows, q, k, query_mask, key_mask, causal)
        x = q[:, rows] @ k.transpose(0, 2, 1)
        coupling = np.where(mask, pair_weight(rows, x), 0) * (grad[:, rows] @ v.transpose(0, 2, 1))
        dq[:, rows] = coupling @ k
        dk += coupling.transpose(0, 2, 1) @ q[:, rows]
        if value_weight is not None:
            dv += np.where(mask, value_weight(rows, x), 0).transpose(0, 2, 1) @ grad[:, rows]
    return dq, dk, dv


def expectation_backward(
    q,
    k,
    v,
    grad,
    *,
    query_mask=None,
    key_mask=None,
    causal=False,
    hash_bits: int,
    backward: str = "exact",
    max_ratio: float,
):
    """Gradients of YOSO-E w.r.t. unit ``q``, unit ``k`` and ``v`` -> ``(dq, dk, dv)``.

    ``backward="exact"`` uses the clamped true derivative (paper eq. 3), ``"lower_bound"`` the
    surrogate ``(tau/2) p`` (paper eq. 4).
    """
    if backward == "exact":
        derivative = lambda rows, x: collision_derivative(x, hash_bits, max_ratio)  # noqa: E731
    elif backward == "lower_bound":
        derivative = lambda rows, x: lower_bound_derivative(x, hash_bits)  # noqa: E731
    else:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    return _pairwise_backward(
        q,
        k,
        v,
        grad,
        derivative,
        value_weight=lambda rows, x: collision_probability(x, hash_bits),
        query_mask=query_mask,
        key_mask=key_mask,
        causal=causal,
    )


def sampled_grads(
    q_codes,
    k_codes,
    q,
    k,
    v,
    grad,
    *,
    query_mask=None,
    key_mask=None,
    causal=False,
    hash_bits: int,
    backward: str = "lower_bound",
    max_ratio: float,
    form: str = "auto",
):
    """The sampled gradient of YOSO-m w.r.t. unit ``q`` and ``k`` -> ``(dq, dk)``.

    ``dQ = (S ⊙ W ⊙ M ⊙ G V^T) K`` and ``dK = (...)^T Q``, where ``S`` is the collision matrix of the
    forward's own hashes and ``W`` weighs each colliding pair:

    * ``backward="lower_bound"`` (paper eq. 4): ``W = tau/2``. Unbiased for YOSO-E's lower-bound
      gradient. Because ``W`` is the same for every pair it also has a table form,
      ``(tau/2)(1/m) sum_s G_i^T A_s[h_s(q_i)]`` with ``A_s[b] = sum_{j in b} v_j k_j^T``
      (:func:`yoso_reference.tables.lower_bound_tables`). ``form`` picks how it is computed:
      ``"pairs"`` (over the collision counts, chunked over queries), ``"tables"``, or ``"auto"``: the
      cheaper for these codes by :func:`yoso_reference.tables.lower_bound_costs`.
    * ``backward="exact"`` (the paper's *YOSO): ``W = min(p'/p, max_ratio)``, the importance ratio.
      Unbiased for :func:`expectation_backward` with ``backward="exact"``, since ``E[S_ij] = p_ij``.
      The weight depends on the pair, so there is no table form: ``form`` must be ``"auto"`` or ``"pairs"``.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    if form == "tables" and backward != "lower_bound":
        raise ValueError(f"form='tables' needs backward='lower_bound' (*YOSO has no table form), got {backward!r}")
    if backward == "lower_bound" and form == "auto":
        form = choose_form(
            q_codes, k_codes, dim=q.shape[-1], value_dim=v.shape[-1], query_mask=query_mask, key_mask=key_mask
        )
    if backward == "lower_bound" and form == "tables":
        masks = dict(query_mask=query_mask, key_mask=key_mask)
        return lower_bound_tables(q_codes, k_codes, q, k, v, grad, **masks, causal=causal, hash_bits=hash_bits)
    if backward == "lower_bound":

        def weight(rows, x):
            return 0.5 * hash_bits * collision_matrix(q_codes[:, :, rows], k_codes)
    else:

        def weight(rows, x):
            return collision_matrix(q_codes[:, :, rows], k_codes) * importance_ratio(x, hash_bits, max_ratio)

    dq, dk, _ = _pairwise_backward(q, k, v, grad, weight, query_mask=query_mask, key_mask=key_mask, causal=causal)
    return dq, dk
