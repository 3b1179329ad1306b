"""The ``jax`` backend's primitives: hashing and cumulation in ``jax.numpy``/``lax``.

Hashing is one matmul ``[B*N, D] x [D, m*tau]`` (or three with the Hadamard matrix per rotation) and
a shift-and-sum of the sign bits.

Cumulation (``order="none"``, the forward's hot loop) builds, per hash, the table
``T_s = scatter_add(codes_s, values)`` of ``2^tau`` rows per batch row and gathers it back at the
readers' codes, summing over hashes, in a ``fori_loop`` that handles ``HASH_UNROLL`` hashes per step
(independent scatters, which XLA:CPU may run on both cores; compile time stays that of a few hashes).
Measured on 2 shared cores (Dv = 64, tau = 8; CPU time per call, compile time apart): the loop is the
fastest or within noise of it from N = 64, m = 8, B*H = 1 up to N = 16k, m = 64, B*H = 8 -- at B*H = 8,
N = 16k, m = 32: 123 ms with 1 hash per step, 110 ms with 2, 98 ms with 4, 126 ms fully unrolled --
and the whole forward compiles in ~1.0 s (1 per step), 1.3 s (2), 1.8 s (4), where unrolling every
hash costs ~80 ms of compile time per hash (2.5 s at m = 32, 9.6 s at m = 64). One scatter over all
hashes at once with the broadcast values materialised ("flat", once the choice below 2^22 elements)
compiles in ~0.6 s but runs 2-50x slower at every size (B*H = 1, N = 1024, m = 32: 16 ms against
0.6 ms), and switching between it and the per-hash loops at size thresholds made the time zig-zag
(m = 128 ran 10x faster than m = 64; B*H = 4 faster than B*H = 2). One strategy at every size keeps
the time monotonic in N, m and B*H -- except for short inputs, whose collision counts are cheaper dense
(``dense_is_cheaper``: B*H = 8, N = 64, m = 32 in 0.1 ms instead of 0.76 ms).

Ordered cumulation (``"causal"``: writers at positions <= the reader's) scans over chunks of
``CAUSAL_CHUNK`` positions carrying all m tables: a chunk first reads the tables (all earlier
chunks), adds its own pairs from a dense ``[chunk, chunk]`` collision count with the causal triangle,
then scatters its writers into the tables. ``"anticausal"`` is the causal one on reversed sequences.
Linear in N; memory O(B*m*2^tau*C) for the tables.

Very wide values (Dv*D-wide outer products, as ``pairwise.lower_bound_grads`` cumulates them) are
processed in column chunks, so one hash's tables stay under ``ELEMENT_BUDGET`` elements. This
backend's own lower-bound gradient does not cumulate them: its table form is ``yoso_jax.tables``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import pairwise, tables
from ._common import ELEMENT_BUDGET, HIGHEST, acc_dtype, keep_rows, sylvester_hadamard
from .buckets import add_to_tables, bucket_tables, read_buckets  # noqa: F401 (primitives of this backend)

HASH_UNROLL = 2  # hashes per step of the cumulation's loop (module docstring)
HASH_ELEMENTS = 1 << 22  # projections computed at once by hash_codes (16 MiB of float32)
CAUSAL_CHUNK = 256  # 2 cores, B*H = 16, m = 32: 64 -> 1.27 s, 256 -> 0.91 s at N = 8k (0.17 -> 0.13 s at 1k)

ORDERS = ("none", "causal", "anticausal")

# ---- hashing ------------------------------------------------------------------------------------


def projections(x, planes, *, hashing: str, num_hashes: int, hash_bits: int):
    """``[B, N, m*tau]``: the numbers whose signs are the hash bits, in the accumulation dtype."""
    dtype = acc_dtype(x.dtype)
    x, planes = x.astype(dtype), planes.astype(dtype)
    batch, n, dim = x.shape
    if hashing == "gaussian":
        p = planes.shape[0]
        flat = planes.reshape(p, -1, dim)  # [P, m*tau, D]
        if p == 1:  # one matmul for the whole batch
            return jnp.einsum("bnd,kd->bnk", x, flat[0], precision=HIGHEST)
        return jnp.einsum("bnd,bkd->bnk", x, flat, precision=HIGHEST)
    u = hadamard_rotate(x, planes)  # [B, N, R, D']
    per = u.shape[-1] // hash_bits
    used = u[..., : per * hash_bits].reshape(batch, n, -1)
    return used[..., : num_hashes * hash_bits]


def hadamard_rotate(x, diagonals):
    """``u = H d3 H d2 H d1 x`` per rotation: ``x [B, N, D]``, ``diagonals [P, R, 3, D']`` -> ``[B, N, R, D']``."""
    d_pad = diagonals.shape[-1]
    h = jnp.asarray(sylvester_hadamard(d_pad), dtype=x.dtype)
    u = jnp.pad(x, ((0, 0), (0, 0), (0, d_pad - x.shape[-1])))[:, :, None, :]
    diag = diagonals.astype(x.dtype)[:, None]  # [P, 1, R, 3, D']: P broadcasts against B, 1 against N
    for step in range(3):
        u = jnp.matmul(u * diag[..., step, :], h, precision=HIGHEST)
    return u


def codes_from_projections(proj, num_hashes: int, hash_bits: int):
    """``[B, N, m*tau]`` projections -> int32 codes ``[B, m, N]`` (strictly positive -> bit 1).

    ``sum_b 2^b bit_b`` as a product with the powers of two: exact in float32 (0/1 times powers of two, sums
    below 2^16 <= 2^24), and about twice as fast on the CPU as shifting and summing int32 bits."""
    batch, n, _ = proj.shape
    bits = (proj > 0).reshape(batch, n, num_hashes, hash_bits).astype(jnp.float32)
    powers = jnp.asarray(2.0, jnp.float32) ** jnp.arange(hash_bits, dtype=jnp.float32)
    codes = jnp.matmul(bits, powers, precision=HIGHEST).astype(jnp.int32)
    return codes.transpose(0, 2, 1)


@functools.partial(jax.jit, static_argnames=("hashing", "num_hashes", "hash_bits"))
def hash_codes(x, planes, *, hashing: str, num_hashes: int, hash_bits: int):
    """Codes ``[B, m, N]`` (int32) of the unit rows ``x [B, N, D]``.

    The projections (``m*tau`` floats per token: 8x the input for m = 32, tau = 8, D = 64) are computed
    in chunks of tokens of at most ``HASH_ELEMENTS`` projections, so they never exist all at once.
    """
    batch, n, _ = x.shape
    width = num_hashes * hash_bits if hashing == "gaussian" else planes.shape[1] * planes.shape[-1]
    chunk = max(1, min(n, HASH_ELEMENTS // max(1, batch * width)))

    def codes_of(rows):
        proj = projections(rows, planes, hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits)
        return codes_from_projections(proj, num_hashes, hash_bits)

    if chunk >= n:
        return codes_of(x)
    # A loop writing each chunk's codes in place: mapping over a chunked, transposed copy of x (as before)
    # held that copy, the chunks' codes and their transpose at once (B*H = 8, N = 64k: 256 MiB of scratch
    # for a 128 MiB input).
    full = n // chunk

    def step(i, codes):
        rows = lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)
        return lax.dynamic_update_slice_in_dim(codes, codes_of(rows), i * chunk, axis=2)

    codes = lax.fori_loop(0, full, step, jnp.zeros((batch, num_hashes, n), jnp.int32))
    if full * chunk < n:  # the last, shorter chunk
        codes = codes.at[:, :, full * chunk :].set(codes_of(x[:, full * chunk :]))
    return codes


# ---- cumulation ---------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("order", "hash_bits"))
def cumulate(read_codes, write_codes, values, *, read_mask, write_mask, order: str, hash_bits: int):
    """``(1/m) sum_s sum_w [h_s(r) = h_s(w)] write_mask_w values_w``, zero rows where ``read_mask`` is False.

    Codes ``[B, m, Nr]`` / ``[B, m, Nw]``, values ``[B, Nw, C]``; returns ``[B, Nr, C]`` in the
    accumulation dtype.
    """
    values = keep_rows(values.astype(acc_dtype(values.dtype)), write_mask)
    read_codes, write_codes = read_codes.astype(jnp.int32), write_codes.astype(jnp.int32)
    num_buckets = 1 << hash_bits
    if order == "none" and dense_is_cheaper(*read_codes.shape, write_codes.shape[2], num_buckets, values.shape[-1]):
        out = dense_collision_sums(read_codes, write_codes, values)
    elif order == "none":
        out = bucket_sums(read_codes, write_codes, values, num_buckets)
    elif order == "causal":
        out = causal_bucket_sums(read_codes, write_codes, values, num_buckets)
    else:  # anticausal: writers at positions >= the reader's is causal on the reversed sequence
        flipped = causal_bucket_sums(
            jnp.flip(read_codes, -1), jnp.flip(write_codes, -1), jnp.flip(values, 1), num_buckets
        )
        out = jnp.flip(flipped, 1)
    return keep_rows(out / read_codes.shape[1], read_mask)


DENSE_PAIRS = 1 << 22  # (batch row, hash, reader, writer) comparisons below which short inputs go dense


def dense_is_cheaper(batch, num_hashes, n_read, n_write, num_buckets, width) -> bool:
    """Whether short inputs are cheaper as dense collision counts than through per-hash tables (static).

    Measured on 2 cores (float32): B*H = 8, m = 32, tau = 8, Dv = 64: N = 64 7x faster dense, 128 5x,
    256 2.4x, 512 even, 1024 8x slower; the dense counts ``[B, m, Nr, Nw]`` fall off a cliff past ~2^22
    comparisons (B*H = 16, m = 64, N = 128: 7x slower), and with few buckets (tau = 4) the tables win from
    N = 64. So: dense within that many comparisons, where its work is at most twice the tables'.
    """
    pairs = n_read * n_write
    dense = num_hashes * pairs + pairs * width
    tables = num_hashes * (num_buckets + n_read + n_write) * width
    return batch * num_hashes * pairs <= DENSE_PAIRS and dense <= 2 * tables


def dense_collision_sums(read_codes, write_codes, values):
    """``sum_s sum_w [h_s(r) = h_s(w)] values_w`` (no 1/m) as collision counts ``[B, Nr, Nw]`` times ``values``."""
    counts = jnp.sum(read_codes[:, :, :, None] == write_codes[:, :, None, :], axis=1, dtype=jnp.int32)
    return jnp.einsum("bij,bjc->bic", counts.astype(values.dtype), values, precision=HIGHEST)


def in_column_chunks(fn, values, elements_per_column: int):
    """``fn(values)`` for ``fn`` linear and columnwise in the last axis of ``values``, evaluated in
    column chunks so that no temporary exceeds ``ELEMENT_BUDGET`` elements."""
    columns = values.shape[-1]
    width = max(1, min(columns, ELEMENT_BUDGET // max(1, elements_per_column)))
    if width >= columns:
        return fn(values)
    chunks = -(-columns // width)
    padded = jnp.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, chunks * width - columns)])
    stacked = jnp.moveaxis(padded.reshape(values.shape[:-1] + (chunks, width)), -2, 0)
    out = lax.map(fn, stacked)  # [chunks, ..., width]
    out = jnp.moveaxis(out, 0, -2)
    return out.reshape(out.shape[:-2] + (chunks * width,))[..., :columns]


def sum_over_hashes(one, num_hashes: int, unroll: int | bool):
    """``sum_s one(s)``: a Python loop when ``unroll is True``, else a ``fori_loop`` of ``unroll`` hashes
    per step (bounded compile time; the hashes of one step are independent work)."""
    if unroll is True:
        total = one(0)
        for s in range(1, num_hashes):
            total = total + one(s)
        return total
    first = one(0)
    steps = max(1, min(int(unroll), num_hashes - 1))
    return lax.fori_loop(1, num_hashes, lambda s, total: total + one(s), first, unroll=steps)


def fusion_fence(x):
    """``x`` unchanged (``[R, C]``), materialised once as the result of its own fusion.

    The output normalisation reads the cumulation twice (a row reduction and the division). XLA:CPU
    then fuses the sum of per-hash gathers into both consumers and, to avoid gathering twice,
    materialises every gather on its own: 5x slower (B*H = 8, N = 8k, m = 32: 380 ms instead of
    75 ms). ``optimization_barrier`` is expanded before fusion on CPU and does not prevent it; a
    scatter is never fused into its consumers, so an identity scatter (all rows, in order) does, for
    one extra pass over the output.
    """
    rows = jnp.arange(x.shape[0], dtype=jnp.int32)
    return jnp.zeros_like(x).at[rows].set(x, indices_are_sorted=True, unique_indices=True)


def bucket_sums(read_codes, write_codes, values, num_buckets: int, strategy: str = "loop"):
    """Unordered cumulation without the 1/m: scatter-add the writers into per-hash tables, gather at the readers.

    ``strategy`` (the module docstring has the measurements): ``"loop"`` -- one scatter/gather pair
    per hash in a ``fori_loop`` of ``HASH_UNROLL`` hashes per step, the default at every size;
    ``"unrolled"`` -- the same pairs in a Python loop (compile time grows with m); ``"flat"`` -- one
    scatter and one gather over all hashes at once, the broadcast values materialised (slow; kept for
    comparison).
    """
    batch, num_hashes, n_read = read_codes.shape
    n_write = write_codes.shape[2]
    tokens = batch * max(n_read, n_write, num_buckets)

    def columns(vals):
        width = vals.shape[-1]
        if strategy == "flat":
            # Each (batch row, hash) owns num_buckets rows of one flat table.
            offsets = (jnp.arange(batch * num_hashes, dtype=jnp.int32) * num_buckets).reshape(batch, num_hashes, 1)
            updates = jnp.broadcast_to(vals[:, None], (batch, num_hashes, n_write, width)).reshape(-1, width)
            table = jnp.zeros((batch * num_hashes * num_buckets, width), vals.dtype)
            table = table.at[(write_codes + offsets).reshape(-1)].add(updates, mode="promise_in_bounds")
            read = table.at[(read_codes + offsets).reshape(-1)].get(mode="promise_in_bounds")
            return read.reshape(batch, num_hashes, n_read, width).sum(axis=1)
        # Each batch row owns num_buckets rows of one flat table, so one scatter serves the whole batch.
        offsets = (jnp.arange(batch, dtype=jnp.int32) * num_buckets)[:, None]
        flat = vals.reshape(batch * n_write, width)

        def one(s):
            rows = (lax.dynamic_index_in_dim(write_codes, s, 1, keepdims=False) + offsets).reshape(-1)
            table = jnp.zeros((batch * num_buckets, width), vals.dtype)
            table = table.at[rows].add(flat, mode="promise_in_bounds")
            readers = (lax.dynamic_index_in_dim(read_codes, s, 1, keepdims=False) + offsets).reshape(-1)
            return table.at[readers].get(mode="promise_in_bounds")

        total = sum_over_hashes(one, num_hashes, unroll=True if strategy == "unrolled" else HASH_UNROLL)
        # A loop's result is its carry; only the unrolled sum can be fused into (and recomputed by) its consumers.
        return (fusion_fence(total) if strategy == "unrolled" else total).reshape(batch, n_read, width)

    if strategy == "flat":  # it holds m times the values at once: in column chunks within the budget
        return in_column_chunks(columns, values, tokens * num_hashes)
    # The loops hold one hash's tables besides rows of the output's size: only tables over the budget
    # (very wide values) call for column chunks, which otherwise cost one more copy of the output
    # (B*H = 8, N = 64k, Dv = 64: 329 -> 132 MiB of scratch).
    return in_column_chunks(columns, values, batch * num_buckets)


def causal_bucket_sums(read_codes, write_codes, values, num_buckets: int):
    """Causal cumulation without the 1/m (``Nr == Nw``): a scan over chunks carrying all m tables."""
    batch, num_hashes, n = read_codes.shape
    chunk = min(CAUSAL_CHUNK, n)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    # Padding writers hold zero values; padding readers are cut off at the end.
    rc = jnp.pad(read_codes, ((0, 0), (0, 0), (0, pad)))
    wc = jnp.pad(write_codes, ((0, 0), (0, 0), (0, pad)))
    rc = rc.reshape(batch, num_hashes, n_chunks, chunk).transpose(2, 0, 1, 3)  # [T, B, m, chunk]
    wc = wc.reshape(batch, num_hashes, n_chunks, chunk).transpose(2, 0, 1, 3)
    offsets = ((jnp.arange(batch, dtype=jnp.int32)[:, None] * num_hashes + jnp.arange(num_hashes)) * num_buckets)[
        :, :, None
    ]
    below = jnp.arange(chunk)[:, None] >= jnp.arange(chunk)[None, :]

    def columns(vals):
        width = vals.shape[-1]
        v = jnp.pad(vals, ((0, 0), (0, pad), (0, 0)))
        v = v.reshape(batch, n_chunks, chunk, width).transpose(1, 0, 2, 3)  # [T, B, chunk, C]

        def step(tables, xs):
            r, w, vc = xs
            earlier = tables.at[(r + offsets).reshape(-1)].get(mode="promise_in_bounds")
            earlier = earlier.reshape(batch, num_hashes, chunk, width).sum(axis=1)
            counts = jnp.sum(r[:, :, :, None] == w[:, :, None, :], axis=1, dtype=jnp.int32)  # [B, chunk, chunk]
            weights = jnp.where(below, counts, 0).astype(vc.dtype)
            within = jnp.einsum("bij,bjc->bic", weights, vc, precision=HIGHEST)
            updates = jnp.broadcast_to(vc[:, None], (batch, num_hashes, chunk, width)).reshape(-1, width)
            tables = tables.at[(w + offsets).reshape(-1)].add(updates, mode="promise_in_bounds")
            return tables, earlier + within

        tables = jnp.zeros((batch * num_hashes * num_buckets, width), vals.dtype)
        if n_chunks == 1:  # no loop to compile
            _, out = step(tables, (rc[0], wc[0], v[0]))
            out = out[None]
        else:
            _, out = lax.scan(step, tables, (rc, wc, v))
        return out.transpose(1, 0, 2, 3).reshape(batch, n_chunks * chunk, width)[:, :n]

    per_column = batch * num_hashes * max(num_buckets, chunk)
    return in_column_chunks(columns, values, per_column)


def lower_bound_form(batch, n_query, n_key, dim, value_dim, num_hashes, hash_bits, causal) -> str:
    """The cheaper form of the sampled lower bound for these static shapes (``tables.costs``)."""
    cost = tables.costs(batch, n_query, n_key, dim, value_dim, num_hashes, hash_bits, causal)
    return "tables" if cost["tables"] < cost["pairs"] else "pairs"


# The lower bound's table form is this backend's own (``tables``: sorted tokens, batched matmuls;
# cumulating Dv*D-wide outer products through scatter/gather, as ``pallas`` does, is ~10x slower here).
# ``form="auto"`` picks by static shapes: the dense pair form costs the same whatever the codes, and
# the table form is costed as its ``pieces`` layout, which any distribution of codes fits (``tables.costs``).
sampled_grads = pairwise.sampled_grads_on(tables.lower_bound_tables, choose=lower_bound_form)
expectation_forward = pairwise.expectation_forward
expectation_backward = pairwise.expectation_backward
