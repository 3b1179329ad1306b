"""The table form of the sampled lower-bound gradient (paper eq. 4 with the forward's own collisions).

Because the lower bound weighs every colliding pair by the same ``tau/2``, its pair sums factor through
per-bucket tables of outer products (docs/math.md#lower-bound). For hash ``s`` and bucket ``b``:

    A_s[b] = sum_{j in b} kappa_j v_j k_j^T      (Dv x D; kappa the key mask)
    dq_i   = (tau/2) (1/m) sum_s G_i^T A_s[h_s(q_i)]

    B_s[b] = sum_{i in b} q_i G_i^T              (D x Dv; G is zero on masked queries)
    dk_j   = kappa_j (tau/2) (1/m) sum_s B_s[h_s(k_j)] v_j

Causally, query ``i`` reads the *prefix* table of its bucket (keys ``j <= i`` only) and key ``j`` the
*suffix* table (queries ``i >= j`` only). The cost is ``O(N m D Dv)`` however the tokens fall into
buckets, where the pair form costs ``O(sum_b n_q(b) n_k(b) (Dv + 2D))`` per hash (quadratic in the
size of crowded buckets): :func:`lower_bound_costs` counts both for given codes, and
``pairwise.sampled_grads(form="auto")`` takes the cheaper.

Written as the definition, one hash at a time: tables for the buckets that occur (so ``2^tau`` may be
large), the prefix and suffix tables as running sums over positions. Clarity over speed, linear in N;
temporaries are bounded by processing batch rows and value columns in chunks.
"""

from __future__ import annotations

import numpy as np

# Elements of the outer products held at once (batch rows x tokens x value columns x D): 32 MiB of float64.
CHUNK_ELEMENTS = 1 << 22

FORMS = ("auto", "pairs", "tables")


def _kept(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    # `where`, not a product: a masked row's content (inf, NaN) must not reach a sum.
    return x if mask is None else np.where(mask[..., None], x, 0)


def _table_ids(q_codes: np.ndarray, k_codes: np.ndarray):
    """For one hash of a chunk of rows (codes ``[b, Nq]``, ``[b, Nk]``): a table index per token,
    shared by the query and the key of the same (row, bucket), and the number of tables."""
    rows = np.arange(q_codes.shape[0])[:, None]
    buckets = np.concatenate([q_codes, k_codes], axis=1).astype(np.int64)
    width = int(buckets.max()) + 1 if buckets.size else 1
    _, ids = np.unique(rows * width + buckets, return_inverse=True)  # only the buckets that occur
    ids = ids.reshape(buckets.shape)
    return ids[:, : q_codes.shape[1]], ids[:, q_codes.shape[1] :], int(ids.max()) + 1


def _chunks(batch: int, tokens: int, dim: int, value_dim: int):
    """(rows, value columns) slices such that the outer products of one chunk stay under CHUNK_ELEMENTS."""
    per_row = max(1, tokens * dim * value_dim)
    rows = max(1, CHUNK_ELEMENTS // per_row)
    width = value_dim if rows > 1 else max(1, min(value_dim, CHUNK_ELEMENTS // max(1, tokens * dim)))
    for start in range(0, batch, rows):
        for col in range(0, value_dim, width):
            yield slice(start, min(batch, start + rows)), slice(col, min(value_dim, col + width))


def lower_bound_tables(
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
):
    """The sampled lower-bound gradient ``(dq, dk)`` w.r.t. unit ``q`` and ``k``, in table form.

    ``dq_i = (tau/2)(1/m) sum_s G_i^T A_s[h_s(q_i)]`` with ``A_s[b] = sum_{j in b} kappa_j v_j k_j^T`` (kappa
    the key mask), and ``dk_j = kappa_j (tau/2)(1/m) sum_s B_s[h_s(k_j)] v_j`` with
    ``B_s[b] = sum_{i in b} q_i G_i^T`` over the kept queries (docs/math.md#lower-bound); with
    ``causal=True`` query ``i`` reads the prefix table (keys ``j <= i``) and key ``j`` the suffix table
    (queries ``i >= j``). Masked rows of ``dq``, ``dk`` are exact zeros. Equal, to rounding, to
    :func:`pairwise.sampled_grads` with ``backward="lower_bound"`` and ``form="pairs"``.

    Shapes: codes ``[B, m, Nq]`` / ``[B, m, Nk]``, ``q [B, Nq, D]``, ``k [B, Nk, D]``, ``v [B, Nk, Dv]``,
    ``grad [B, Nq, Dv]``, masks ``[B, N]`` bool or None; returns ``[B, Nq, D]``, ``[B, Nk, D]``.
    """
    dtype = np.result_type(np.float32, q.dtype, k.dtype, v.dtype, grad.dtype)
    q, grad = (_kept(x.astype(np.float64), query_mask) for x in (q, grad))
    k, v = (_kept(x.astype(np.float64), key_mask) for x in (k, v))
    batch, num_hashes, n_query = q_codes.shape
    n_key, dim, value_dim = k.shape[1], k.shape[2], v.shape[2]
    dq, dk = np.zeros_like(q), np.zeros_like(k)
    for rows, cols in _chunks(batch, max(n_query, n_key), dim, value_dim):
        g_c, v_c, q_c, k_c = grad[rows, :, cols], v[rows, :, cols], q[rows], k[rows]
        kv = v_c[..., :, None] * k_c[..., None, :]  # v_j k_j^T   [b, Nk, Dv', D]
        qg = q_c[..., :, None] * g_c[..., None, :]  # q_i G_i^T   [b, Nq, D, Dv']
        for s in range(num_hashes):
            q_ids, k_ids, n_tables = _table_ids(q_codes[rows, s], k_codes[rows, s])
            a = np.zeros((n_tables,) + kv.shape[2:])  # A_s, one table per (row, bucket)
            b = np.zeros((n_tables,) + qg.shape[2:])  # B_s
            if not causal:
                np.add.at(a, k_ids, kv)
                np.add.at(b, q_ids, qg)
                dq[rows] += np.einsum("bie,bied->bid", g_c, a[q_ids])
                dk[rows] += np.einsum("bjde,bje->bjd", b[k_ids], v_c)
                continue
            # Running tables in sequence order. The ids of one position differ across rows, so the
            # fancy-indexed additions never meet twice.
            for i in range(n_query):  # prefix: query i reads its bucket's keys j <= i
                a[k_ids[:, i]] += kv[:, i]
                dq[rows, i] += np.einsum("be,bed->bd", g_c[:, i], a[q_ids[:, i]])
            for j in reversed(range(n_key)):  # suffix: key j reads its bucket's queries i >= j
                b[q_ids[:, j]] += qg[:, j]
                dk[rows, j] += np.einsum("bde,be->bd", b[k_ids[:, j]], v_c[:, j])
    scale = 0.5 * hash_bits / num_hashes
    return (scale * dq).astype(dtype), (scale * dk).astype(dtype)


def lower_bound_costs(q_codes, k_codes, *, dim: int, value_dim: int, query_mask=None, key_mask=None) -> dict:
    """Multiply-adds of the two forms of the sampled lower bound for these codes (docs/math.md#cost).

    ``{"pairs": sum_s sum_b n_q(b) n_k(b) (Dv + 2D), "tables": sum_s sum_b 2 (n_q(b) + n_k(b)) D Dv}``,
    where ``n_q(b)``, ``n_k(b)`` count the kept queries and keys of bucket ``b`` of hash ``s`` in one
    batch row (summed over rows). The pair form's cost grows with crowded buckets, the table form's
    does not depend on how the tokens fall.
    """
    batch, num_hashes, n_query = q_codes.shape
    n_key = k_codes.shape[2]
    q_keep = np.ones((batch, n_query), bool) if query_mask is None else query_mask
    k_keep = np.ones((batch, n_key), bool) if key_mask is None else key_mask
    width = int(max(q_codes.max(initial=0), k_codes.max(initial=0))) + 1
    offsets = np.arange(batch)[:, None] * width
    pairs = 0
    for s in range(num_hashes):  # counts per (row, bucket), one hash at a time
        n_q = np.bincount((q_codes[:, s] + offsets)[q_keep], minlength=batch * width)
        n_k = np.bincount((k_codes[:, s] + offsets)[k_keep], minlength=batch * width)
        pairs += int(np.dot(n_q.astype(np.int64), n_k.astype(np.int64)))
    tokens = int(q_keep.sum() + k_keep.sum())
    return {"pairs": pairs * (value_dim + 2 * dim), "tables": num_hashes * tokens * 2 * dim * value_dim}


def choose_form(q_codes, k_codes, *, dim: int, value_dim: int, query_mask=None, key_mask=None) -> str:
    """``"tables"`` if the table form costs less than the pair form for these codes, else ``"pairs"``."""
    costs = lower_bound_costs(q_codes, k_codes, dim=dim, value_dim=value_dim, query_mask=query_mask, key_mask=key_mask)
    return "tables" if costs["tables"] < costs["pairs"] else "pairs"
