"""YOSO attention end to end, written plainly: the oracle for the public API's forward and gradients.

All arrays are in the canonical layout: ``q [B, Nq, D]``, ``k [B, Nk, D]``, ``v [B, Nk, Dv]``,
masks ``[B, N]`` bool (True = keep), planes ``[P, ...]`` with ``P`` 1 or ``B`` (see ``hashing``).
"""

from __future__ import annotations

import numpy as np

from .cumulation import cumulate
from .hashing import hash_codes
from .pairwise import attention_mask, collision_matrix, expectation_forward
from .probability import collision_probability, importance_ratio


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``x / ||x||`` along the last axis; a zero row stays zero (never NaN).

    Only the direction matters, whatever the scale: each row is divided by its largest magnitude before
    its norm is taken, so squaring cannot overflow (rows of 1e30) or underflow (rows of 1e-30).
    """
    peak = np.max(np.abs(x), axis=-1, keepdims=True)
    y = x / np.where(peak > 0, peak, 1)
    norm = np.linalg.norm(y, axis=-1, keepdims=True)
    return np.where(peak > 0, y / np.where(peak > 0, norm, 1), 0)


def row_norms(x: np.ndarray) -> np.ndarray:
    """``||x||`` along the last axis (no keepdims), without overflow or underflow of the squares."""
    peak = np.max(np.abs(x), axis=-1)
    return peak * np.linalg.norm(x / np.where(peak > 0, peak, 1)[..., None], axis=-1)


def unit_rows_vjp(x: np.ndarray, cotangent: np.ndarray) -> np.ndarray:
    """Vector-Jacobian product of :func:`unit_rows`, through its Jacobian ``(I - u u^T) / ||x||``
    (symmetric); 0 on zero rows, whose output is the constant 0."""
    norm = row_norms(x)
    u = unit_rows(x)
    jacobian = (np.eye(x.shape[-1]) - u[..., :, None] * u[..., None, :]) / np.where(norm > 0, norm, 1)[..., None, None]
    return np.where((norm > 0)[..., None], np.einsum("...ij,...j->...i", jacobian, cotangent), 0)


def nonzero_rows(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``[B, N]`` bool: the rows that are kept (``mask``) and not zero.

    Zero vectors attend to nothing and are attended by nothing (docs/math.md#zero-vectors): a zero query
    or key is a masked one. Hashing alone would put a zero vector in bucket 0 of every hash (all its
    projections are 0, so every bit is 0), where YOSO-E gives it the weight ``p(0) = 2^-tau``; masking
    makes both modes agree, E[YOSO-m] = YOSO-E for every finite input.
    """
    nonzero = np.any(x != 0, axis=-1)
    return nonzero if mask is None else mask & nonzero


def _keep(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return x if mask is None else np.where(mask[..., None], x, 0)


def attention(
    q,
    k,
    v,
    *,
    planes=None,
    key_padding_mask=None,
    query_mask=None,
    causal=False,
    num_hashes=32,
    hash_bits=8,
    mode="sample",
    hashing="gaussian",
    normalize=True,
):
    """N-YOSO-m (``mode="sample"``) or N-YOSO-E (``mode="expectation"``) of canonical arrays.

    Masked rows are zeroed first, and zero rows of q and k count as masked (:func:`nonzero_rows`).
    """
    q, k = _keep(q, query_mask), _keep(k, key_padding_mask)
    query_mask, key_padding_mask = nonzero_rows(q, query_mask), nonzero_rows(k, key_padding_mask)
    v = _keep(v, key_padding_mask)
    q_unit, k_unit = unit_rows(q), unit_rows(k)
    if mode == "sample":
        q_codes = hash_codes(q_unit, planes, hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits)
        k_codes = hash_codes(k_unit, planes, hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits)
        y = cumulate(
            q_codes,
            k_codes,
            v,
            read_mask=query_mask,
            write_mask=key_padding_mask,
            order="causal" if causal else "none",
            hash_bits=hash_bits,
        )
    elif mode == "expectation":
        y = expectation_forward(
            q_unit, k_unit, v, query_mask=query_mask, key_mask=key_padding_mask, causal=causal, hash_bits=hash_bits
        )
    else:
        raise ValueError(f"mode must be 'sample' or 'expectation', got {mode!r}")
    return unit_rows(y) if normalize else y


def attention_and_grads(
    q,
    k,
    v,
    cotangent,
    *,
    planes=None,
    key_padding_mask=None,
    query_mask=None,
    causal=False,
    num_hashes=32,
    hash_bits=8,
    mode="sample",
    hashing="gaussian",
    backward="lower_bound",
    normalize=True,
    max_ratio: float,
):
    """``(out, (dq, dk, dv))``: the forward of canonical arrays and its vector-Jacobian product with
    ``cotangent [B, Nq, Dv]``, every step written out densely over (query, key) pairs.

    The full-gradient oracle: the pair weights ``W`` of the forward (``S ⊙ M`` with ``S`` the collision
    fractions of the hash codes, or ``P ⊙ M`` for YOSO-E, ``M`` the masks and causality), then

    * ``dV = W^T G`` with ``G`` the cotangent pulled back through the output normalisation;
    * ``dq̂ = C K̂`` and ``dk̂ = C^T Q̂`` with ``C = M ⊙ (G V^T) ⊙ D``, where ``D`` is the derivative the
      ``backward`` estimator stands for: ``(tau/2) S`` (sampled lower bound, paper eq. 4), ``S ⊙ w`` (the
      paper's *YOSO, ``w`` the clamped importance ratio), ``(tau/2) p`` or ``p w = p'`` (YOSO-E);
    * the chain rule through ``q / ||q||`` and ``k / ||k||``; masked rows get exact zeros.

    Masked rows of q, k and v are zeroed before anything else, as the API does (their content,
    even NaN, is invisible), and zero rows of q and k then count as masked (:func:`nonzero_rows`).
    Quadratic memory: for tests, not for long inputs.
    """
    qm = np.ones(q.shape[:2], bool) if query_mask is None else query_mask
    km = np.ones(k.shape[:2], bool) if key_padding_mask is None else key_padding_mask
    q, k = np.where(qm[..., None], q, 0), np.where(km[..., None], k, 0)
    qm, km = nonzero_rows(q, qm), nonzero_rows(k, km)
    v = np.where(km[..., None], v, 0)
    q_unit, k_unit = unit_rows(q), unit_rows(k)
    mask = attention_mask(q.shape[0], q.shape[1], k.shape[1], qm, km, causal)
    cosines = q_unit @ k_unit.transpose(0, 2, 1)
    if mode == "sample":
        hashed = dict(hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits)
        share = collision_matrix(hash_codes(q_unit, planes, **hashed), hash_codes(k_unit, planes, **hashed))
    else:
        share = collision_probability(cosines, hash_bits)  # YOSO-E: the expected collision share
    weights = np.where(mask, share, 0)
    y = weights @ v
    out = unit_rows(y) if normalize else y

    grad = np.where(qm[..., None], unit_rows_vjp(y, cotangent) if normalize else cotangent, 0)
    dv = weights.transpose(0, 2, 1) @ grad
    derivative = share * (
        0.5 * hash_bits if backward == "lower_bound" else importance_ratio(cosines, hash_bits, max_ratio)
    )
    coupling = np.where(mask, derivative, 0) * (grad @ v.transpose(0, 2, 1))
    dq = unit_rows_vjp(q, coupling @ k_unit)
    dk = unit_rows_vjp(k, coupling.transpose(0, 2, 1) @ q_unit)
    grads = tuple(np.where(m[..., None], g, 0) for g, m in ((dq, qm), (dk, km), (dv, km)))
    return out, grads
