"""Counting sort of tokens by (bucket, position), per hash: the index work behind the cumulation.

Bucket ids fold the batch row in (``b * 2**tau + code``). The sort is the classic three passes over
blocks of ``BN`` tokens in sequence order (reversed for ``anticausal``):

1. ``bucket_histogram_kernel``: each block's histogram, stored bucket-major ``hist[g, B, 2**tau, NB]``;
2. an exclusive cumulative sum over that flat layout (one torch op in the wrapper) gives, for every
   (row, bucket, block), where the block's tokens of that bucket go in the sorted order;
3. ``bucket_scatter_kernel``: each token's destination is that offset plus its rank among the
   block's earlier tokens of the same bucket (a ``BN x BN`` comparison), so the sort is stable.

A block is either a piece of one long row (``RB = 1``, ``NP = BN``) or ``RB`` whole short rows of at
most ``NP`` tokens each (then ``NB = 1``); within a block, a token's key is ``row_in_block * 2**tau +
code``. ``bucket_reader_index_kernel`` gives each reader (causal orders: readers at the writers'
positions) the sorted index of the last writer of its bucket at or before it in sequence order.
Integers only: no atomics, exact, about 16 bytes of traffic per (token, hash).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import device


@device
def _block(
    codes_ptr,
    j,
    first_hash,
    N,
    n_rows,
    n_blocks,
    stride_cb,
    stride_cs,
    TAU: tl.constexpr,
    BN: tl.constexpr,
    RB: tl.constexpr,
    NP: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """This program's tokens: ``(key, code, row, n, ok, block)``, lanes in sequence order per row."""
    group = tl.program_id(0) // n_blocks
    blk = tl.program_id(0) % n_blocks
    lane = tl.arange(0, BN)
    row = group * RB + lane // NP
    pos = blk * BN + lane % NP
    ok = (pos < N) & (row < n_rows)
    if REVERSE:
        n = N - 1 - pos
    else:
        n = pos
    code = tl.load(codes_ptr + row.to(tl.int64) * stride_cb + (first_hash + j) * stride_cs + n, mask=ok, other=0)
    key = (lane // NP) * (1 << TAU) + code
    return key, code, row.to(tl.int64), n, ok, blk


@device
def _offset_rows(row, code, j, n_rows, n_blocks, blk, TAU: tl.constexpr):
    """Flat index of (hash j, row, code, block) in the ``[g, B, 2**tau, NB]`` histogram layout."""
    return ((j * n_rows + row) * (1 << TAU) + code) * n_blocks + blk


@triton.jit
def bucket_histogram_kernel(
    codes_ptr,  # [B, m, N] int32
    hist_ptr,  # [g, B, 2**TAU, NB] int32
    N,
    n_rows,  # B
    n_blocks,  # NB
    first_hash,
    stride_cb,
    stride_cs,
    TAU: tl.constexpr,
    BN: tl.constexpr,
    RB: tl.constexpr,
    NP: tl.constexpr,
    REVERSE: tl.constexpr,
):
    j = tl.program_id(1)
    key, _, _, _, ok, blk = _block(
        codes_ptr, j, first_hash, N, n_rows, n_blocks, stride_cb, stride_cs, TAU, BN, RB, NP, REVERSE
    )
    counts = tl.histogram(key, RB * (1 << TAU), mask=ok)
    bins = tl.arange(0, RB * (1 << TAU))
    row = tl.program_id(0) // n_blocks * RB + bins // (1 << TAU)
    dest = _offset_rows(row.to(tl.int64), bins % (1 << TAU), j, n_rows, n_blocks, blk, TAU)
    tl.store(hist_ptr + dest, counts, mask=row < n_rows)


@device
def _rank_in_block(key, ok, BN: tl.constexpr):
    """For each lane: how many earlier valid lanes hold the same key."""
    lane = tl.arange(0, BN)
    same = (key[None, :] == key[:, None]) & (lane[None, :] < lane[:, None]) & ok[None, :]
    return tl.sum(same.to(tl.int32), axis=1)


@triton.jit
def bucket_scatter_kernel(
    codes_ptr,  # [B, m, N] int32
    offsets_ptr,  # [g, B, 2**TAU, NB] int32: exclusive prefix of the histograms
    perm_ptr,  # [g, B * N] int32 out: flat token b * N + n in sorted order
    bucket_ptr,  # [g, B * N] int32 out: the sorted tokens' bucket ids
    N,
    n_rows,
    n_blocks,
    first_hash,
    stride_cb,
    stride_cs,
    TAU: tl.constexpr,
    BN: tl.constexpr,
    RB: tl.constexpr,
    NP: tl.constexpr,
    REVERSE: tl.constexpr,
):
    j = tl.program_id(1)
    key, code, row, n, ok, blk = _block(
        codes_ptr, j, first_hash, N, n_rows, n_blocks, stride_cb, stride_cs, TAU, BN, RB, NP, REVERSE
    )
    base = tl.load(offsets_ptr + _offset_rows(row, code, j, n_rows, n_blocks, blk, TAU), mask=ok, other=0)
    dest = j.to(tl.int64) * n_rows * N + base + _rank_in_block(key, ok, BN)
    tl.store(perm_ptr + dest, (row * N + n).to(tl.int32), mask=ok)
    tl.store(bucket_ptr + dest, (row * (1 << TAU) + code).to(tl.int32), mask=ok)


@triton.jit
def bucket_reader_index_kernel(
    read_codes_ptr,  # [B, m, N] int32 readers (same positions as the writers)
    write_codes_ptr,  # [B, m, N] int32 writers
    offsets_ptr,  # [g, B, 2**TAU, NB] int32 (the writers')
    index_ptr,  # [g, B * N] int32 out, by reader token b * N + n
    N,
    n_rows,
    n_blocks,
    first_hash,
    stride_rb,
    stride_rs,
    stride_wb,
    stride_ws,
    TAU: tl.constexpr,
    BN: tl.constexpr,
    RB: tl.constexpr,
    NP: tl.constexpr,
    REVERSE: tl.constexpr,
):
    j = tl.program_id(1)
    rkey, rcode, row, n, ok, blk = _block(
        read_codes_ptr, j, first_hash, N, n_rows, n_blocks, stride_rb, stride_rs, TAU, BN, RB, NP, REVERSE
    )
    wkey, _, _, _, _, _ = _block(
        write_codes_ptr, j, first_hash, N, n_rows, n_blocks, stride_wb, stride_ws, TAU, BN, RB, NP, REVERSE
    )
    lane = tl.arange(0, BN)
    # Writers of the reader's bucket in its block at or before it (sequence order), itself included.
    seen = (wkey[None, :] == rkey[:, None]) & (lane[None, :] <= lane[:, None]) & ok[None, :]
    in_block = tl.sum(seen.to(tl.int32), axis=1)
    base = tl.load(offsets_ptr + _offset_rows(row, rcode, j, n_rows, n_blocks, blk, TAU), mask=ok, other=0)
    first = tl.load(offsets_ptr + _offset_rows(row, rcode, j, n_rows, n_blocks, 0, TAU), mask=ok, other=0)
    last = base + in_block - 1
    out = index_ptr + j.to(tl.int64) * n_rows * N + row * N + n
    tl.store(out, tl.where(last >= first, last, -1), mask=ok)
