"""The lower bound's table form on XLA: tokens sorted by bucket, per-bucket tables as batched matmuls.

The sampled lower bound (docs/math.md#lower-bound) is, per hash ``s``,

    dq_i = G_i^T A_s[h_s(q_i)],    A_s[b] = sum_{j in b} v_j k_j^T
    dk_j = B_s[h_s(k_j)] v_j,      B_s[b] = sum_{i in b} q_i G_i^T

(times ``(tau/2)/m``, summed over hashes), with prefix tables (keys ``j <= i``) and suffix tables (queries
``i >= j``) when causal. Cumulating the ``Dv*D``-wide outer products through XLA's scatter and gather is
slow on CPUs (``~1 GFLOP/s`` for 4096-wide rows), so here the tables are small dense matmuls instead.
Per (hash, group of batch rows) -- a ``fori_loop``, so no more than one hash's temporaries exist at a
time -- keys and queries are sorted together by bucket (one sort of packed integer keys), and then:

* ``"fast"`` (not causal, every bucket holds at most ``cap`` queries and ``cap`` keys, ``cap`` a static
  bound a little above the mean for evenly spread codes: :func:`fast_capacity`): each side is laid out bucket-major,
  ``[runs, cap, .]``, so the tables are one batched matmul ``[runs, Dv, cap] x [runs, cap, D]`` and the
  reads another, with no table ever leaving its bucket.
* ``"pieces"`` (not causal, any distribution): each bucket's run is cut into pieces of ``PIECE`` tokens
  (at most ``ceil(N / PIECE) + runs`` pieces, whatever the skew); one table per piece by batched
  matmul, summed into its bucket (a sorted segment sum), and gathered back for the query pieces.
* ``"blocks"`` (causal, any distribution): keys and queries merged in one order by (bucket, position,
  keys before queries) and cut into blocks of ``BLOCK`` items. A query sees every key of its bucket
  earlier in that order; inside a block those pairs are a masked ``[BLOCK, BLOCK]`` product, and the
  keys of earlier blocks reach it through the table of the one bucket run that crosses into the block:
  an exclusive prefix over blocks, segmented by run, computed exactly in two levels of masked matmuls
  (within spans of ``PREFIX_SPAN`` blocks, then across spans). The suffix tables of ``dk`` likewise.

Which of ``fast`` and ``pieces`` runs, and for how many pieces ``pieces`` is sized (the usual count of
:func:`usual_pieces`, or the bound of :func:`max_pieces`), is decided per loop step from the actual codes
(``lax.switch``); every choice is exact. Gaussian hash codes are uneven enough that ``pieces`` is what
nearly always runs (:func:`costs`); ``fast`` serves Hadamard hashing of spread-out inputs. The cost is
``O(N m D Dv)`` in every case; skewed buckets only ever cost the ``pieces`` layout's padding, bounded by
``runs * PIECE`` slots.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from ._common import HIGHEST, acc_dtype

PIECE = 32  # tokens per piece of the "pieces" layout
# The usual number of partly filled pieces per side, as a share of the buckets: what the "pieces" layout
# is sized for first (usual_pieces). Gaussian codes, tau = 8, PIECE = 32: 135-155 of 256 at N = 4k-64k.
PARTIAL_SHARE = 0.625
BLOCK = 32  # items per block of the causal "blocks" layout
PREFIX_SPAN = 16  # blocks per level-1 span of the blocks' segmented prefix
GROUP_TOKENS = 8192  # batch rows are grouped per loop step up to about this many tokens (cache-sized steps)
TABLE_ELEMENTS = 1 << 22  # ... and about this many table entries (16 MiB of float32 per table array)
STREAMS = 2  # independent (hash, row group) pairs per loop step
PACKED_BITS = 31  # (bucket, kind, position) sort keys packed into one int32 when they fit in this many bits
PATHS = ("auto", "fast", "pieces", "blocks")


def _bits(n: int) -> int:
    return max(1, (n - 1).bit_length())


def max_pieces(n_tokens: int, n_buckets: int) -> int:
    """How many pieces of the ``pieces`` layout one side's tokens can fill: a piece per ``PIECE`` tokens plus
    at most one partly filled piece per bucket (and never more pieces than tokens)."""
    return min(n_tokens, -(-n_tokens // PIECE) + min(n_buckets, n_tokens))


def usual_pieces(n_tokens: int, n_buckets: int) -> int:
    """How many pieces the ``pieces`` layout is sized for first: a piece per ``PIECE`` tokens plus
    ``PARTIAL_SHARE`` of the buckets partly filled. Every piece left over from the bound of
    :func:`max_pieces` is a ``PIECE``-slot table built and read for nothing (16% of the slots at
    N = 16k, 25% at 4k); a step whose codes need more pieces takes the layout sized by ``max_pieces``
    (``lax.switch``: only the branch taken runs). Gaussian codes of isotropic inputs stay below it
    (N = 16k, tau = 8: at most 650 pieces against 672); codes crowded into few buckets need fewer pieces;
    many buckets with a handful of tokens each (short inputs) need more."""
    bound = max_pieces(n_tokens, n_buckets)
    return min(bound, -(-n_tokens // PIECE) + math.ceil(PARTIAL_SHARE * min(n_buckets, n_tokens)))


def fast_capacity(n_tokens: int, hash_bits: int) -> int:
    """The static bucket capacity of the fast layout: the mean plus 3.5 standard deviations (Poisson)
    plus 4, in multiples of 8. Evenly spread codes overflow it in up to ~3% of the (hash, row) steps at
    tau = 8 (those take ``pieces``, ~1.4x slower); every slot above the mean is padding, so a looser
    bound costs every step (4 deviations: 8-12% more slots at N = 8k-16k)."""
    mean = n_tokens / (1 << hash_bits)
    return max(8, int(-(-(mean + 3.5 * math.sqrt(mean) + 4) // 8) * 8))


def _dot(a, b, contract, batch=((0,), (0,))):
    return lax.dot_general(a, b, (contract, batch), precision=HIGHEST)


# ---- one lane: one batch row, one hash ----------------------------------------------------------------


def _merged_order(q_codes, k_codes, q_keep, k_keep, n_buckets: int, causal: bool):
    """Keys and queries of one lane in one sorted order -> per item ``(code, kind, pos)``.

    Sorted by bucket, then keys before queries, then position (not causal), or by bucket, position,
    keys before queries (causal). Masked tokens get the bucket ``n_buckets`` and so come last. One sort
    of packed int32 keys when they fit in 31 bits (~10x faster on CPUs than a sort with a payload).
    """
    n_query, n_key = q_codes.shape[0], k_codes.shape[0]
    pos_bits = _bits(max(n_query, n_key))
    codes = jnp.concatenate([jnp.where(k_keep, k_codes, n_buckets), jnp.where(q_keep, q_codes, n_buckets)])
    kind = jnp.concatenate([jnp.zeros((n_key,), jnp.int32), jnp.ones((n_query,), jnp.int32)])
    pos = jnp.concatenate([jnp.arange(n_key, dtype=jnp.int32), jnp.arange(n_query, dtype=jnp.int32)])
    low = (pos << 1) | kind if causal else (kind << pos_bits) | pos
    if n_buckets.bit_length() + 1 + pos_bits <= PACKED_BITS:
        packed = lax.sort((codes << (pos_bits + 1)) | low)
        code, low = packed >> (pos_bits + 1), packed & ((1 << (pos_bits + 1)) - 1)
    else:
        code, low = lax.sort((codes, low), num_keys=2)
    if causal:
        return code, low & 1, low >> 1
    return code, low >> pos_bits, low & ((1 << pos_bits) - 1)


def _runs(code, kind):
    """Per sorted item: its run (bucket) index, its rank among the items of its kind in the run, and
    its rank in the run."""
    idx = jnp.arange(code.shape[0], dtype=jnp.int32)
    first = jnp.concatenate([jnp.ones((1,), bool), code[1:] != code[:-1]])
    run = jnp.cumsum(first, dtype=jnp.int32) - 1
    rank = idx - lax.cummax(jnp.where(first, idx, 0))
    keys_before = jnp.cumsum(kind == 0, dtype=jnp.int32) - (kind == 0)
    run_keys_before = lax.cummax(jnp.where(first, keys_before, 0))  # keys before the run starts
    rank_key = keys_before - run_keys_before
    rank_kind = jnp.where(kind == 0, rank_key, rank - (keys_before - run_keys_before))
    return run, rank_kind, rank


def _sorted_lane(qc, kc, qk, kk, *, n_buckets, causal):
    code, kind, pos = _merged_order(qc, kc, qk, kk, n_buckets, causal)
    run, rank_kind, rank = _runs(code, kind)
    valid = code < n_buckets
    return dict(kind=kind, pos=pos, run=run, rank_kind=rank_kind, rank=rank, valid=valid)


def _place(sel, slot, n_slots: int, pos, n_tokens: int, *, spare: bool = False):
    """Token index per slot (``n_tokens``: empty) and slot per token, for the sorted items where ``sel``
    holds. A token without a slot gets ``n_slots`` (out of bounds), or with ``spare`` the last slot, which
    the caller's layout never fills (so its result row is zero: :func:`_back`)."""
    slot = jnp.where(sel, slot, n_slots)
    token_at = jnp.full((n_slots + 1,), n_tokens, jnp.int32).at[slot].set(pos, mode="promise_in_bounds")[:-1]
    none = n_slots - 1 if spare else n_slots
    slot_of = jnp.full((n_tokens + 1,), none, jnp.int32).at[jnp.where(sel, pos, n_tokens)].set(slot)[:-1]
    return token_at, slot_of


def _rows(x, offset, token_at, n_tokens: int, *shape):
    """Rows ``offset + token_at`` of the flat ``x [B * N, C]`` (the lane's rows start at ``offset``), zero where
    ``token_at == n_tokens`` (an empty slot), reshaped to ``shape + (C,)``.

    Only the tokens that have a slot are read: masked tokens never get one (:func:`_merged_order` sorts them
    out), so their rows, whatever they hold, are never gathered, and the caller's arrays need neither
    masking nor a zero row appended -- either would be a copy of q, k, v and the gradient, which XLA may
    also schedule early, before the forward's hashing is done. The lanes gather from the whole flat
    arrays, not from a slice of their batch rows: a slice is a copy of those rows per (hash, row group)
    (B*H = 8, N = 16k: ~4% of the backward's CPU time)."""
    filled = token_at < n_tokens
    rows = x.at[offset + jnp.where(filled, token_at, 0)].get(mode="promise_in_bounds")
    return jnp.where(filled[:, None], rows, 0).reshape(shape + (x.shape[1],))


def _back(out, slot_of, *, spare: bool = False):
    """Slot results ``[S, D]`` back to tokens: slot ``S`` (out of bounds) reads zero, or with ``spare``
    every index is in bounds (tokens without a slot point at an empty one) and no bounds are checked."""
    if spare:
        return out.at[slot_of].get(mode="promise_in_bounds")
    return out.at[slot_of].get(mode="fill", fill_value=0)


def _fast_lane(srt, q_off, k_off, q, k, v, g, *, n_query: int, n_key: int, runs: int, cap_q: int, cap_k: int):
    """Not causal, every run within capacity: bucket-major layouts, one table per bucket."""
    is_q = srt["valid"] & (srt["kind"] == 1)
    is_k = srt["valid"] & (srt["kind"] == 0)
    # `runs` includes one spare run row after the real ones: never filled (_place's `spare`).
    q_at, q_slot = _place(is_q, srt["run"] * cap_q + srt["rank_kind"], runs * cap_q, srt["pos"], n_query, spare=True)
    k_at, k_slot = _place(is_k, srt["run"] * cap_k + srt["rank_kind"], runs * cap_k, srt["pos"], n_key, spare=True)
    dim = q.shape[1]
    ks, vs = _rows(k, k_off, k_at, n_key, runs, cap_k), _rows(v, k_off, k_at, n_key, runs, cap_k)
    qs, gs = _rows(q, q_off, q_at, n_query, runs, cap_q), _rows(g, q_off, q_at, n_query, runs, cap_q)
    a = _dot(vs, ks, ((1,), (1,)))  # A[r] = sum_j v_j k_j^T    [runs, Dv, D]
    # B is built transposed, [Dv, D], so that its read contracts its leading axis: XLA:CPU's batched dot
    # contracting both operands' last axes runs ~1.5x slower ([769, 32, 64] x [769, 64, 64]: 25 against
    # 39 GFLOP/s on a 2-core AVX2 VM). The pieces and blocks layouts do the same.
    bt = _dot(gs, qs, ((1,), (1,)))  # B[r]^T = sum_i G_i q_i^T [runs, Dv, D]
    dq = _dot(gs, a, ((2,), (1,)))  # G_i^T A[r]                [runs, cap_q, D]
    dk = _dot(vs, bt, ((2,), (1,)))  # B[r] v_j                 [runs, cap_k, D]
    return _back(dq.reshape(-1, dim), q_slot, spare=True), _back(dk.reshape(-1, dim), k_slot, spare=True)


def _pieces_lane(srt, q_off, k_off, q, k, v, g, *, n_query: int, n_key: int, runs: int, q_pieces: int, k_pieces: int):
    """Not causal, any distribution: runs cut into pieces, piece tables summed per run."""
    dim = q.shape[1]
    starts = srt["rank_kind"] % PIECE == 0

    def side(kind, n_pieces, n_tokens):
        sel = srt["valid"] & (srt["kind"] == kind)
        piece = jnp.cumsum(sel & starts, dtype=jnp.int32) - 1
        # n_pieces includes one spare piece after all that can be filled (_place's `spare`)
        at, slot_of = _place(
            sel, piece * PIECE + srt["rank_kind"] % PIECE, n_pieces * PIECE, srt["pos"], n_tokens, spare=True
        )
        piece = jnp.where(sel, piece, n_pieces)
        run_of = jnp.full((n_pieces + 1,), runs, jnp.int32).at[piece].set(srt["run"])[:-1]  # runs: empty piece
        return at, slot_of, run_of

    q_at, q_slot, q_run = side(1, q_pieces, n_query)
    k_at, k_slot, k_run = side(0, k_pieces, n_key)
    ks, vs = _rows(k, k_off, k_at, n_key, k_pieces, PIECE), _rows(v, k_off, k_at, n_key, k_pieces, PIECE)
    qs, gs = _rows(q, q_off, q_at, n_query, q_pieces, PIECE), _rows(g, q_off, q_at, n_query, q_pieces, PIECE)
    # Piece tables, summed per run (pieces are sorted by run). Row `runs` collects the empty pieces, whose
    # slots are all empty (zero rows): it is zero, and the empty pieces read it.
    a = jax.ops.segment_sum(_dot(vs, ks, ((1,), (1,))), k_run, runs + 1, indices_are_sorted=True)
    bt = jax.ops.segment_sum(_dot(gs, qs, ((1,), (1,))), q_run, runs + 1, indices_are_sorted=True)  # B^T
    # Pieces are sorted by run and every index is in bounds (row `runs`: the empty pieces' zero table).
    take = lambda x, run: x.at[run].get(mode="promise_in_bounds", indices_are_sorted=True)  # noqa: E731
    dq = _dot(gs, take(a, q_run), ((2,), (1,)))
    dk = _dot(vs, take(bt, k_run), ((2,), (1,)))
    return _back(dq.reshape(-1, dim), q_slot, spare=True), _back(dk.reshape(-1, dim), k_slot, spare=True)


def _segmented_prefix(x, seg, span: int):
    """Exclusive prefix sums of ``x [n, W]`` within segments (``seg [n]`` non-decreasing), exactly:
    masked matmuls within spans of ``span`` rows, then across spans (no sequential scan, no
    differences of long sums)."""
    n, width = x.shape
    spans = -(-n // span)
    pad = spans * span - n
    x = jnp.pad(x, ((0, pad), (0, 0))).reshape(spans, span, width)
    seg = jnp.pad(seg, (0, pad), constant_values=jnp.iinfo(jnp.int32).max).reshape(spans, span)
    below = jnp.arange(span)[:, None] >= jnp.arange(span)[None, :]
    inner = (seg[:, :, None] == seg[:, None, :]) & below  # same segment, at or before
    local = jnp.einsum("uij,ujw->uiw", inner.astype(x.dtype), x, precision=HIGHEST)  # inclusive, within span
    # A segment reaches into span u from earlier spans only as u's first segment, and every earlier
    # span it touches ends with it: sum the inclusive totals of those spans.
    earlier = jnp.arange(spans)[:, None] > jnp.arange(spans)[None, :]
    across = (seg[None, :, -1] == seg[:, :1]) & earlier  # [u, u']
    carried = jnp.einsum("uv,vw->uw", across.astype(x.dtype), local[:, -1], precision=HIGHEST)
    total = local + jnp.where((seg == seg[:, :1])[:, :, None], carried[:, None, :], 0)
    return (total - x).reshape(spans * span, width)[:n]


def _blocks_lane(srt, q_off, k_off, q, k, v, g, *, n_query: int, n_key: int):
    """Causal (or any order), any distribution: merged blocks, pairs inside, one run's table across."""
    dim = q.shape[1]
    value_dim = v.shape[1]
    n = n_query + n_key
    blocks = -(-n // BLOCK)
    is_q = srt["valid"] & (srt["kind"] == 1)
    is_k = srt["valid"] & (srt["kind"] == 0)
    item = jnp.arange(n, dtype=jnp.int32)
    q_at, q_slot = _place(is_q, item, blocks * BLOCK, srt["pos"], n_query)
    k_at, k_slot = _place(is_k, item, blocks * BLOCK, srt["pos"], n_key)
    qs, gs = (
        _rows(q, q_off, q_at, n_query, blocks, BLOCK),
        _rows(g, q_off, q_at, n_query, blocks, BLOCK),
    )  # zero rows at key items
    ks, vs = (
        _rows(k, k_off, k_at, n_key, blocks, BLOCK),
        _rows(v, k_off, k_at, n_key, blocks, BLOCK),
    )  # zero rows at query items
    # Masked tokens (sorted last) and the padding items have zero rows: whatever run they share, they
    # contribute nothing. Padding takes a run after all others, so runs stay non-decreasing.
    run = jnp.pad(srt["run"], (0, blocks * BLOCK - n), constant_values=n).reshape(blocks, BLOCK)
    first, last = run[:, :1], run[:, -1:]
    # Within a block: query item t sees key items t' < t of its run.
    earlier = jnp.arange(BLOCK)[:, None] > jnp.arange(BLOCK)[None, :]
    pairs = jnp.where((run[:, :, None] == run[:, None, :]) & earlier, _dot(gs, vs, ((2,), (2,))), 0)
    dq = _dot(pairs, ks, ((2,), (1,)))
    dk = _dot(pairs, qs, ((1,), (1,)))
    # Across blocks: only the first run of a block can have keys in earlier blocks, and only the last
    # run queries in later ones. Partial tables of those runs, then segmented prefix / suffix sums.
    in_last, in_first = (run == last)[..., None], (run == first)[..., None]
    a_part = _dot(jnp.where(in_last, vs, 0), ks, ((1,), (1,))).reshape(blocks, -1)  # [blocks, Dv*D]
    b_part = _dot(gs, jnp.where(in_first, qs, 0), ((1,), (1,))).reshape(blocks, -1)  # B^T: [blocks, Dv*D]
    # Keys of run r in blocks before t: the inclusive prefix of a_part over blocks whose last run is
    # r, read at t - 1 -- i.e. the exclusive prefix read at t, when block t's first run is r.
    a_before = _segmented_prefix(a_part, last[:, 0], PREFIX_SPAN) + a_part  # inclusive, by last run
    a_enter = jnp.concatenate([jnp.zeros_like(a_part[:1]), a_before[:-1]])
    enters = jnp.concatenate([jnp.zeros((1,), bool), first[1:, 0] == last[:-1, 0]])  # run continues into t
    a_enter = jnp.where(enters[:, None], a_enter, 0).reshape(blocks, value_dim, dim)
    dq = dq + _dot(jnp.where(in_first, gs, 0), a_enter, ((2,), (1,)))
    # Queries of run r in blocks after t: suffix sums = prefix sums on the reversed block order.
    b_flip = jnp.flip(b_part, 0)
    b_after = jnp.flip(_segmented_prefix(b_flip, -jnp.flip(first[:, 0]), PREFIX_SPAN) + b_flip, 0)
    b_leave = jnp.concatenate([b_after[1:], jnp.zeros_like(b_part[:1])])
    leaves = jnp.concatenate([last[:-1, 0] == first[1:, 0], jnp.zeros((1,), bool)])  # run continues after t
    b_leave = jnp.where(leaves[:, None], b_leave, 0).reshape(blocks, value_dim, dim)
    dk = dk + _dot(jnp.where(in_last, vs, 0), b_leave, ((2,), (1,)))
    return _back(dq.reshape(-1, dim), q_slot), _back(dk.reshape(-1, dim), k_slot)


# ---- cost -------------------------------------------------------------------------------------------

# Effective rates (multiply-adds x 2 per second of wall time), B*H = 8, D = Dv = 64, m = 32, tau = 8,
# forward+backward, fitted to whole-call times on a quiet 2-core AVX2-only AMD EPYC VM (2026-12-03, after
# the pair form accumulated dk, dv transposed and the pieces layout was sized by usual_pieces): the dense
# pair form ~110 GFLOP/s at N = 8k-12k (large matmuls, both cores busy); the table form's "pieces" layout
# ~36 GFLOP/s on the slots it computes (small batched products, segment sums and table gathers). There the
# pairs win below N ~ 10k (8k: 2.50 s against 3.05 s; 10k: 3.54 against 3.47; 12k: 5.27 against 4.02;
# 16k: tables 5.16 s). "blocks" (causal) ~32-35 at N = 8k-16k, measured earlier on a 2-core AVX-512 VM,
# where the pairs won causal calls below ~20k. More cores favour the pairs further.
DENSE_RATE = 110e9
PIECES_RATE, BLOCKS_RATE = 36e9, 34e9


def costs(batch, n_query, n_key, dim, value_dim, num_hashes, hash_bits, causal) -> dict:
    """Estimated seconds of the dense pair form and of the table form for these static shapes.

    Pairs: every (query, key) pair, ``2 Dv + 4 D`` flops for the products plus ~4 per hash for the
    collision count. Tables: the ``pieces`` layout when not causal (at its usual size), else ``blocks``;
    per slot ``4 D Dv`` flops (build one table and read the other), plus the blocks' pairs and segmented prefix.

    ``pieces``, not ``fast``: Gaussian hash planes are not orthogonal, so even for isotropic inputs the
    buckets are uneven (N = 16k, tau = 8: the largest bucket of a hash holds 129-273 tokens against a
    mean of 64), and the fast layout's capacity almost never holds them; only Hadamard hashing of
    spread-out inputs fits it. Modelling ``fast`` (as before) chose the tables from N ~ 6k on, where
    they took twice the pairs' time (B*H = 8, N = 8k: 4.7 s against 2.3 s).
    """
    pairs = batch * n_query * n_key * (2 * value_dim + 4 * dim + 4 * num_hashes) / DENSE_RATE
    lanes = batch * num_hashes
    if causal:
        n_blocks = -(-(n_query + n_key) // BLOCK)
        spans = -(-n_blocks // PREFIX_SPAN)
        per_block = 8 * BLOCK * dim * value_dim + 2 * BLOCK * BLOCK * (value_dim + 2 * dim)
        prefix = 2 * 2 * dim * value_dim * (n_blocks * PREFIX_SPAN + spans * spans)
        tables = lanes * (n_blocks * per_block + prefix) / BLOCKS_RATE
    else:
        pieces = usual_pieces(n_query, 1 << hash_bits) + usual_pieces(n_key, 1 << hash_bits)
        tables = lanes * pieces * PIECE * 4 * dim * value_dim / PIECES_RATE
    return {"pairs": pairs, "tables": tables}


# ---- the primitive -----------------------------------------------------------------------------------


def _group_size(batch: int, tokens: int, table_elements: int) -> int:
    """The largest divisor of ``batch`` whose rows together hold at most ``GROUP_TOKENS`` tokens and
    ``TABLE_ELEMENTS`` table entries (``table_elements`` per row: the tables of short inputs with many
    buckets outweigh the tokens)."""
    best = 1
    for size in range(1, batch + 1):
        if batch % size == 0 and size * tokens <= GROUP_TOKENS and size * table_elements <= TABLE_ELEMENTS:
            best = size
    return best


@functools.partial(jax.jit, static_argnames=("causal", "hash_bits", "path"))
def lower_bound_tables(q_codes, k_codes, q, k, v, grad, query_mask, key_mask, *, causal, hash_bits, path="auto"):
    """The sampled lower bound ``(dq, dk)`` in table form (module docstring).

    ``path`` (tests): ``"auto"`` -- ``blocks`` when causal, else ``fast`` where every bucket fits its
    capacity and ``pieces`` elsewhere (sized by :func:`usual_pieces` where the codes fit it, else by
    :func:`max_pieces`); or force one (``fast`` falls back to ``pieces`` where a bucket does not fit,
    since it cannot hold it).
    """
    dtype = acc_dtype(q.dtype)
    q, k, v, grad = (x.astype(dtype) for x in (q, k, v, grad))  # masked rows are never read (_rows)
    batch, num_hashes, n_query = q_codes.shape
    n_key = k_codes.shape[2]
    q_keep = jnp.ones((batch, n_query), bool) if query_mask is None else query_mask
    k_keep = jnp.ones((batch, n_key), bool) if key_mask is None else key_mask
    n_buckets = 1 << hash_bits
    runs = min(n_buckets, n_query + n_key)
    cap_q, cap_k = fast_capacity(n_query, hash_bits), fast_capacity(n_key, hash_bits)
    # At most this many pieces hold tokens (usually no more than usual_pieces); one more, a spare that
    # stays empty (_place).
    q_pieces, k_pieces = max_pieces(n_query, n_buckets) + 1, max_pieces(n_key, n_buckets) + 1
    q_usual, k_usual = usual_pieces(n_query, n_buckets) + 1, usual_pieces(n_key, n_buckets) + 1
    use_blocks = causal or path == "blocks"
    sort = jax.vmap(functools.partial(_sorted_lane, n_buckets=n_buckets, causal=causal))
    # A lane: (sorted items, its first row in the flat q/g and in the flat k/v), then the flat arrays.
    lanes = functools.partial(jax.vmap, in_axes=(0, 0, 0, None, None, None, None))
    sizes = dict(n_query=n_query, n_key=n_key)
    fast = lanes(functools.partial(_fast_lane, **sizes, runs=runs + 1, cap_q=cap_q, cap_k=cap_k))  # + a spare run
    pieces = lanes(functools.partial(_pieces_lane, **sizes, runs=runs, q_pieces=q_pieces, k_pieces=k_pieces))
    usual = lanes(functools.partial(_pieces_lane, **sizes, runs=runs, q_pieces=q_usual, k_pieces=k_usual))
    layouts = (fast, usual, pieces) if (q_usual, k_usual) != (q_pieces, k_pieces) else (fast, pieces)
    blocks = lanes(functools.partial(_blocks_lane, **sizes))
    table_rows = max(runs, q_pieces + k_pieces) if not use_blocks else -(-(n_query + n_key) // BLOCK)
    group = _group_size(batch, n_query + n_key, table_rows * q.shape[2] * v.shape[2])
    groups = batch // group
    q_codes, k_codes = q_codes.astype(jnp.int32), k_codes.astype(jnp.int32)
    flat = [x.reshape(-1, x.shape[2]) for x in (q, k, v, grad)]  # [B * N, C]: free (a bitcast)

    def one(i):
        """(start row, dq, dk) of the ``i``-th (hash, row group)."""
        s, start = i // groups, (i % groups) * group
        rows = lambda x: lax.dynamic_slice_in_dim(x, start, group)  # noqa: E731
        srt = sort(rows(q_codes[:, s]), rows(k_codes[:, s]), rows(q_keep), rows(k_keep))
        lane_rows = start + jnp.arange(group, dtype=jnp.int32)
        args = (srt, lane_rows * n_query, lane_rows * n_key, *flat)
        if use_blocks:
            return start, *blocks(*args)
        is_q, is_k = srt["valid"] & (srt["kind"] == 1), srt["valid"] & (srt["kind"] == 0)
        # pieces one side fills: its tokens that start a piece (the most of any lane of the group)
        starts = srt["rank_kind"] % PIECE == 0
        fill_q, fill_k = (jnp.max(jnp.sum(side & starts, axis=-1, dtype=jnp.int32)) for side in (is_q, is_k))
        layout = jnp.where((fill_q < q_usual) & (fill_k < k_usual), 1, len(layouts) - 1)  # usual, or full
        if path != "pieces":
            rank_q, rank_k = jnp.where(is_q, srt["rank_kind"], -1), jnp.where(is_k, srt["rank_kind"], -1)
            layout = jnp.where((jnp.max(rank_q) < cap_q) & (jnp.max(rank_k) < cap_k), 0, layout)
        return start, *lax.switch(layout, layouts, *args)

    # Each loop step takes `streams` (hash, row group) pairs: independent work, which XLA:CPU may run
    # on several cores at once (the small batched matmuls of one pair run on one).
    steps = num_hashes * groups
    streams = max(1, min(STREAMS, steps))
    while steps % streams:
        streams -= 1

    def step(i, carry):
        dq, dk = carry
        for start, dq_s, dk_s in [one(i * streams + j) for j in range(streams)]:
            dq = lax.dynamic_update_slice_in_dim(dq, lax.dynamic_slice_in_dim(dq, start, group) + dq_s, start, 0)
            dk = lax.dynamic_update_slice_in_dim(dk, lax.dynamic_slice_in_dim(dk, start, group) + dk_s, start, 0)
        return dq, dk

    # The accumulators start as zeros computed from the gradient: as constants, XLA allocates them (two
    # arrays of q's and k's size) early, during the forward pass of a fused forward+backward program, where
    # its memory peaks (N = 64k: 86 MiB less compiled scratch). isfinite: 0 * inf would be NaN.
    first = jnp.sum(grad[:1, :1, :1])  # a number from the gradient (0 if it were empty)
    zero = jnp.where(jnp.isfinite(first), first, 0) * 0
    zeros = (jnp.full((batch, n_query, q.shape[2]), zero, dtype), jnp.full((batch, n_key, k.shape[2]), zero, dtype))
    dq, dk = lax.fori_loop(0, steps // streams, step, zeros)
    scale = 0.5 * hash_bits / num_hashes
    return scale * dq, scale * dk
