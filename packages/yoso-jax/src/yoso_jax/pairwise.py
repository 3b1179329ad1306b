"""The gradient pieces and YOSO-E, shared by both backends (``jax`` and ``pallas``).

* The sampled lower-bound gradient (``backward="lower_bound"``, the default) has two forms
  (docs/math.md#lower-bound). The pair form, :func:`dense_sampled_grads`, goes over every (query, key)
  pair with the forward's collision counts: quadratic, but plain matmuls, the faster one on short
  inputs. The table form ``dq_i = (tau/2)(1/m) sum_s G_i^T A_s[h_s(q_i)]``,
  ``A_s[b] = sum_{j in b} v_j k_j^T`` (and ``dk`` with ``B_s[b] = sum_{i in b} q_i G_i^T``) is linear in
  N whatever the buckets: each backend brings its own (``jax``: ``yoso_jax.tables``, sorted tokens and
  batched matmuls; ``pallas``: :func:`lower_bound_grads`, two cumulations of outer products on its
  kernels), and :func:`sampled_grads_on` builds the primitive, ``form="auto"`` choosing by cost.
* The sampled true gradient (``backward="exact"``, the paper's *YOSO) weighs each colliding pair by
  the importance ratio of its cosine, so it needs the pairs: dense per chunk of queries (quadratic
  time, memory O(chunk * Nk)).
* YOSO-E forward and backward are quadratic by definition; chunked over queries the same way, so no
  N x N matrix is ever held on long inputs.

Everything is computed in the accumulation dtype (float32, or float64 for float64 inputs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ._common import ELEMENT_BUDGET, HIGHEST, acc_dtype, keep_rows

# Pairwise entries per chunk of queries, all batch rows together (16 MiB per float32 temporary), and the
# most a chunk may grow to so as to hold MIN_QUERY_CHUNK queries: thinner chunks make the products slow
# (B*H = 8, N = 8192, the lower bound's dq, dk: 64 queries per chunk 3.74 s, 128 3.20 s, 256 3.83 s; at
# N = 4096, 128 queries 0.72 s, 256 0.84 s; 2-core AVX2 VM).
PAIRWISE_ELEMENTS = 1 << 22
PAIRWISE_ELEMENTS_MAX = 1 << 24
MIN_QUERY_CHUNK = 128


def collision_probability(x, hash_bits: int):
    """``(1 - arccos(x)/pi)^tau``, ``x`` clipped to [-1, 1]."""
    theta = jnp.arccos(jnp.clip(x, -1.0, 1.0))
    return (1.0 - theta / jnp.pi) ** hash_bits


def importance_ratio(x, hash_bits: int, max_ratio: float):
    """``min(p'/p, max_ratio) = min(tau / (sin(theta)(pi - theta)), max_ratio)``."""
    theta = jnp.arccos(jnp.clip(x, -1.0, 1.0))
    # Flooring the denominator at tau/max_ratio is the clamp, and it also avoids dividing by 0.
    return hash_bits / jnp.maximum(jnp.sin(theta) * (jnp.pi - theta), hash_bits / max_ratio)


# ---- chunked pairwise machinery ------------------------------------------------------------------


def _query_chunk(batch: int, n_query: int, n_key: int) -> int:
    per_query = max(1, batch * n_key)  # pairwise entries of one query row, all batch rows together
    # The budget's chunk, or MIN_QUERY_CHUNK queries when that thinner chunk fits PAIRWISE_ELEMENTS_MAX.
    chunk = max(PAIRWISE_ELEMENTS // per_query, min(MIN_QUERY_CHUNK, PAIRWISE_ELEMENTS_MAX // per_query))
    return max(1, min(n_query, chunk))


def _scan_query_chunks(step, carry, per_query, n_query: int, chunk: int):
    """``step(carry, positions, *chunks) -> (carry, out)`` over chunks of query rows.

    ``per_query`` are ``[B, Nq, ...]`` arrays (padded with zeros / False to whole chunks); the outputs
    are joined back to ``[B, Nq, ...]``.
    """
    n_chunks = -(-n_query // chunk)
    pad = n_chunks * chunk - n_query

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((x.shape[0], n_chunks, chunk) + x.shape[2:]), 1, 0)

    def join(y):
        y = jnp.moveaxis(y, 0, 1)
        return y.reshape((y.shape[0], n_chunks * chunk) + y.shape[3:])[:, :n_query]

    positions = jnp.arange(n_chunks * chunk, dtype=jnp.int32).reshape(n_chunks, chunk)
    chunks = (positions, *[split(x) for x in per_query])
    if n_chunks == 1:  # no loop to compile
        carry, out = step(carry, *[x[0] for x in chunks])
        return carry, jax.tree.map(lambda y: join(y[None]), out)
    # Two chunks per loop step: B*H = 8, N = 4096, m = 32, the dense lower-bound gradient in 526-540 ms
    # instead of 586-701 (and less CPU time); four per step was slower again (633-746 ms, more scratch).
    carry, out = lax.scan(lambda c, xs: step(c, *xs), carry, chunks, unroll=2)
    return carry, jax.tree.map(join, out)


def _pair_mask(positions, query_mask, key_mask, n_key: int, causal: bool):
    """``[B, chunk, Nk]`` bool: query kept, key kept and (causal) key position <= query position."""
    mask = query_mask[:, :, None]
    if key_mask is not None:
        mask = mask & key_mask[:, None, :]
    if causal:
        mask = mask & (positions[:, None] >= jnp.arange(n_key, dtype=jnp.int32)[None, :])[None]
    return mask


def _prepared(q, k, v, grad, query_mask, key_mask):
    dtype = acc_dtype(q.dtype)
    q = keep_rows(q.astype(dtype), query_mask)
    k, v = (keep_rows(x.astype(dtype), key_mask) for x in (k, v))
    grad = None if grad is None else keep_rows(grad.astype(dtype), query_mask)
    if query_mask is None:
        query_mask = jnp.ones(q.shape[:2], dtype=bool)
    return q, k, v, grad, query_mask


# ---- YOSO-E ---------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("causal", "hash_bits"))
def expectation_forward(q, k, v, *, query_mask, key_mask, causal: bool, hash_bits: int):
    """YOSO-E ``Y_i = sum_j M_ij p(q_i . k_j) v_j`` -> ``[B, Nq, Dv]``."""
    q, k, v, _, qmask = _prepared(q, k, v, None, query_mask, key_mask)
    batch, n_query, _ = q.shape
    n_key = k.shape[1]

    def step(carry, positions, q_chunk, qm_chunk):
        x = jnp.einsum("bid,bjd->bij", q_chunk, k, precision=HIGHEST)
        mask = _pair_mask(positions, qm_chunk, key_mask, n_key, causal)
        weights = jnp.where(mask, collision_probability(x, hash_bits), 0)
        return carry, jnp.einsum("bij,bjc->bic", weights, v, precision=HIGHEST)

    _, y = _scan_query_chunks(step, None, [q, qmask], n_query, _query_chunk(batch, n_query, n_key))
    return y


def _pairwise_backward(q, k, v, grad, query_mask, key_mask, *, causal, pair_weight, value_weight, q_codes=None):
    """``dQ = (A ⊙ G V^T) K``, ``dK = (...)^T Q`` and, with ``value_weight``, ``dV = B^T G``, chunked.

    ``pair_weight(x, codes_chunk)`` gives ``A`` for a chunk's cosines ``x [B, chunk, Nk]`` (and its
    queries' codes ``[B, chunk, m]`` when ``q_codes`` is given); ``value_weight(x)`` gives ``B``.
    """
    q, k, v, grad, qmask = _prepared(q, k, v, grad, query_mask, key_mask)
    batch, n_query, _ = q.shape
    n_key = k.shape[1]
    per_query = [q, grad, qmask] + ([q_codes.transpose(0, 2, 1)] if q_codes is not None else [])

    # dk and dv are accumulated transposed, [B, D, Nk]: XLA's CPU products contracting the chunk's query
    # axis run ~4x faster with the short axis first in the result (B*H = 8, Nk = 4096, chunks of 128
    # queries: 158 ms against 610 ms per pass for [B, Nk, D]), most of the pair form's time at N = 4096.
    def step(carry, positions, q_chunk, g_chunk, qm_chunk, *codes):
        dk_t, dv_t = carry
        x = jnp.einsum("bid,bjd->bij", q_chunk, k, precision=HIGHEST)
        mask = _pair_mask(positions, qm_chunk, key_mask, n_key, causal)
        g_v = jnp.einsum("bie,bje->bij", g_chunk, v, precision=HIGHEST)
        coupling = jnp.where(mask, pair_weight(x, *codes), 0) * g_v
        dq_chunk = jnp.einsum("bij,bjd->bid", coupling, k, precision=HIGHEST)
        dk_t = dk_t + jnp.einsum("bid,bij->bdj", q_chunk, coupling, precision=HIGHEST)
        if value_weight is not None:
            weights = jnp.where(mask, value_weight(x), 0)
            dv_t = dv_t + jnp.einsum("bie,bij->bej", g_chunk, weights, precision=HIGHEST)
        return (dk_t, dv_t), dq_chunk

    chunk = _query_chunk(batch, n_query, n_key)
    zeros = (jnp.zeros_like(jnp.swapaxes(k, 1, 2)), jnp.zeros_like(jnp.swapaxes(v, 1, 2)))
    (dk_t, dv_t), dq = _scan_query_chunks(step, zeros, per_query, n_query, chunk)
    return dq, jnp.swapaxes(dk_t, 1, 2), jnp.swapaxes(dv_t, 1, 2)


@functools.partial(jax.jit, static_argnames=("causal", "hash_bits", "backward", "max_ratio"))
def expectation_backward(q, k, v, grad, *, query_mask, key_mask, causal, hash_bits, backward, max_ratio):
    """YOSO-E gradients ``(dq, dk, dv)``: exact (clamped ``p'``) or the lower bound ``(tau/2) p``."""
    if backward == "exact":
        derivative = lambda x: collision_probability(x, hash_bits) * importance_ratio(x, hash_bits, max_ratio)
    elif backward == "lower_bound":
        derivative = lambda x: 0.5 * hash_bits * collision_probability(x, hash_bits)
    return _pairwise_backward(
        q,
        k,
        v,
        grad,
        query_mask,
        key_mask,
        causal=causal,
        pair_weight=derivative,
        value_weight=lambda x: collision_probability(x, hash_bits),
    )


# ---- sampled gradients ------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("causal", "hash_bits", "backward", "max_ratio"))
def dense_sampled_grads(
    q_codes, k_codes, q, k, v, grad, query_mask, key_mask, *, causal, hash_bits, backward, max_ratio
):
    """``dQ = (S ⊙ W ⊙ M ⊙ G V^T) K``, ``dK`` its transpose, over all pairs: ``S`` the forward's
    collision fractions, ``W`` the clamped importance ratio (``"exact"``, *YOSO) or ``tau/2``
    (``"lower_bound"``). Quadratic time (matmuls and one comparison per pair and hash), memory O(chunk * Nk)."""
    num_hashes = k_codes.shape[1]
    # Counting collisions hash by hash into a [B, chunk, Nk] array of 16-bit integers (codes < 2^16)
    # is ~4x faster on CPUs than reducing over a minor axis of m hashes per pair (B*H = 8, N = 4096,
    # m = 32: 0.33 s -> 0.09 s of the 1.3 s this function took).
    count_dtype = jnp.int16 if num_hashes < (1 << 15) else jnp.int32
    k_codes16 = k_codes.astype(jnp.uint16)  # [B, m, Nk]

    def weight(x, codes_chunk):  # codes_chunk [B, chunk, m]
        codes_chunk = codes_chunk.astype(jnp.uint16)

        def add(s, counts):
            same = (
                lax.dynamic_index_in_dim(codes_chunk, s, 2, keepdims=False)[:, :, None]
                == (lax.dynamic_index_in_dim(k_codes16, s, 1, keepdims=False)[:, None, :])
            )
            return counts + same.astype(count_dtype)

        collisions = lax.fori_loop(0, num_hashes, add, jnp.zeros(x.shape, count_dtype))
        fraction = collisions.astype(x.dtype) / num_hashes
        if backward == "exact":
            return fraction * importance_ratio(x, hash_bits, max_ratio)
        return fraction * (0.5 * hash_bits)

    dq, dk, _ = _pairwise_backward(
        q,
        k,
        v,
        grad,
        query_mask,
        key_mask,
        causal=causal,
        pair_weight=weight,
        value_weight=None,
        q_codes=q_codes.astype(jnp.int32),
    )
    return dq, dk


@functools.partial(jax.jit, static_argnames=("cumulate", "causal", "hash_bits"))
def lower_bound_grads(q_codes, k_codes, q, k, v, grad, query_mask, key_mask, *, cumulate, causal, hash_bits):
    """Paper eq. 4, sampled, in table form: ``(dq, dk)`` through two cumulations of the outer products
    ``v_j k_j^T`` (read by the queries) and ``q_i G_i^T`` (read by the keys), Dv*D columns wide, on a
    backend's own ``cumulate`` (same signature as :func:`yoso_jax.xla.cumulate`), which brings the
    causal orders. The ``pallas`` backend's table form; value columns are processed in blocks to bound
    memory.
    """
    dtype = acc_dtype(q.dtype)
    q, grad = (keep_rows(x.astype(dtype), query_mask) for x in (q, grad))
    k, v = (keep_rows(x.astype(dtype), key_mask) for x in (k, v))
    batch, n_query, dim = q.shape
    n_key, value_dim = k.shape[1], v.shape[2]
    forward_order, backward_order = ("causal", "anticausal") if causal else ("none", "none")

    def block(v_block, g_block):  # value columns [B, Nk, E], [B, Nq, E]
        width = v_block.shape[-1]
        kv = (v_block[..., :, None] * k[..., None, :]).reshape(batch, n_key, width * dim)
        a = cumulate(
            q_codes, k_codes, kv, read_mask=query_mask, write_mask=key_mask, order=forward_order, hash_bits=hash_bits
        )
        dq = jnp.einsum("bie,bied->bid", g_block, a.reshape(batch, n_query, width, dim), precision=HIGHEST)
        qg = (g_block[..., :, None] * q[..., None, :]).reshape(batch, n_query, width * dim)
        b = cumulate(
            k_codes, q_codes, qg, read_mask=key_mask, write_mask=query_mask, order=backward_order, hash_bits=hash_bits
        )
        dk = jnp.einsum("bje,bjed->bjd", v_block, b.reshape(batch, n_key, width, dim), precision=HIGHEST)
        return dq, dk

    width = max(1, min(value_dim, ELEMENT_BUDGET // (batch * max(n_query, n_key) * dim)))
    if width >= value_dim:
        dq, dk = block(v, grad)
    else:
        blocks = -(-value_dim // width)
        pad = ((0, 0), (0, 0), (0, blocks * width - value_dim))

        def split(x):  # [B, N, Dv] -> [blocks, B, N, width]
            x = jnp.pad(x, pad)
            return jnp.moveaxis(x.reshape(x.shape[:2] + (blocks, width)), 2, 0)

        def step(carry, xs):
            dq_b, dk_b = block(*xs)
            return (carry[0] + dq_b, carry[1] + dk_b), None

        (dq, dk), _ = lax.scan(step, (jnp.zeros_like(q), jnp.zeros_like(k)), (split(v), split(grad)))
    scale = 0.5 * hash_bits
    return scale * dq, scale * dk


FORMS = ("auto", "pairs", "tables")


def sampled_grads_on(table_form, *, choose=None):
    """The ``sampled_grads`` primitive of a backend whose lower-bound table form is ``table_form``.

    ``table_form(q_codes, k_codes, q, k, v, grad, query_mask, key_mask, *, causal, hash_bits)`` returns
    ``(dq, dk)``. The pair form is :func:`dense_sampled_grads` (the exact estimator has only that one).
    ``form="auto"`` asks ``choose(call_shapes...) -> "pairs" | "tables"`` (static shapes only, so jitted
    callers compile one form), or takes the tables when ``choose`` is None.
    """

    def sampled_grads(
        q_codes, k_codes, q, k, v, grad, *, query_mask, key_mask, causal, hash_bits, backward, max_ratio, form="auto"
    ):
        # form is one of FORMS, and "tables" only with the lower bound: yoso.backends.Backend.sampled_grads checks.
        args = (q_codes, k_codes, q, k, v, grad, query_mask, key_mask)
        if backward == "lower_bound" and form == "auto":
            if choose is None:
                form = "tables"
            else:
                batch, num_hashes, n_query = q_codes.shape
                shapes = (batch, n_query, k.shape[1], q.shape[2], v.shape[2], num_hashes, hash_bits, causal)
                form = choose(*shapes)
        if backward == "lower_bound" and form == "tables":
            return table_form(*args, causal=causal, hash_bits=hash_bits)
        return dense_sampled_grads(
            *args, causal=causal, hash_bits=hash_bits, backward=backward, max_ratio=float(max_ratio)
        )

    return sampled_grads
