"""The LSH cumulation on tokens sorted by bucket: segment sums, then one gather per reader and hash.

For each hash, the writers are sorted by (bucket, position) (``launch.Sorted``), so every
bucket is one contiguous segment of the sorted order. A bucket id folds the batch row in
(``b * 2**tau + code``), so one launch serves all rows. No float atomics anywhere, so results are
bitwise reproducible (torch.equal across runs, as gradient checkpointing needs):

* ``bucket_sums_kernel`` (TOTALS): ``T[bucket] = sum of the segment`` -- the hash tables of
  docs/math.md. A program owns ``BB`` consecutive buckets; each chunk of its sorted tokens is added
  as ``onehot[BB, BT] @ V[BT, C]`` (a tensor-core product; the one-hot factor is exact).
* ``bucket_sums_kernel`` (PREFIX): the inclusive prefix sum within each segment, in sequence order
  (``causal``) or reversed (``anticausal``): ``same_bucket_lower_triangle[BT, BT] @ V`` per chunk,
  plus the running sum carried from the previous chunk of the same bucket.
* ``bucket_gather_kernel``: ``out_r = (1/m) sum_s src[s, row_s(r)]`` where ``row`` is the reader's
  bucket (tables) or the index of the last writer it may see (prefix sums), masked readers zero.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import dot, indicator


@triton.jit
def bucket_sums_kernel(
    v_ptr,  # [B, Nw, C] values (any strides)
    mask_ptr,  # [B, Nw] write mask as uint8 (HAS_MASK)
    perm_ptr,  # [g, B * Nw] int32: flat token b * Nw + n, sorted by (bucket, position)
    bucket_ptr,  # [g, B * Nw] int32: the bucket of each sorted token
    start_ptr,  # [g, n_buckets + 1] int32: first sorted index of each bucket
    out_ptr,  # TOTALS: [g, n_buckets, C] float32; PREFIX: [g, B * Nw, C] float32
    n_buckets,
    n_tokens,  # B * Nw
    Nw,
    C,
    stride_vb,
    stride_vn,
    stride_vc,
    stride_mb,
    stride_mn,
    HAS_MASK: tl.constexpr,
    PREFIX: tl.constexpr,
    BB: tl.constexpr,  # buckets per program (TOTALS)
    BT: tl.constexpr,  # sorted tokens per chunk
    CP: tl.constexpr,  # C rounded up to a power of two >= 16
):
    s = tl.program_id(1)
    first = tl.program_id(0) * BB
    starts = start_ptr + s.to(tl.int64) * (n_buckets + 1)
    lo = tl.load(starts + first)
    hi = tl.load(starts + tl.minimum(first + BB, n_buckets))
    c = tl.arange(0, CP)
    lane = tl.arange(0, BT)
    sorted_base = s.to(tl.int64) * n_tokens
    acc = tl.zeros((BB, CP), dtype=tl.float32)
    carry = tl.zeros((CP,), dtype=tl.float32)
    carry_bucket = lo * 0 - 1
    for i0 in range(lo, hi, BT):
        idx = i0 + lane
        ok = idx < hi
        tok = tl.load(perm_ptr + sorted_base + idx, mask=ok, other=0)
        bucket = tl.load(bucket_ptr + sorted_base + idx, mask=ok, other=-1)
        b = (tok // Nw).to(tl.int64)
        n = (tok % Nw).to(tl.int64)
        keep = ok
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + b * stride_mb + n * stride_mn, mask=ok, other=0) != 0)
        vals = tl.load(
            v_ptr + b[:, None] * stride_vb + n[:, None] * stride_vn + c[None, :] * stride_vc,
            mask=keep[:, None] & (c[None, :] < C),
            other=0.0,
        )
        if PREFIX:
            same = (bucket[:, None] == bucket[None, :]) & (lane[None, :] <= lane[:, None])
            run = dot(indicator(same, vals.dtype), vals)
            run += tl.where(bucket[:, None] == carry_bucket, carry[None, :], 0.0)
            out = out_ptr + (sorted_base + idx)[:, None] * C + c[None, :]
            tl.store(out, run, mask=ok[:, None] & (c[None, :] < C))
            last = tl.minimum(hi - i0, BT) - 1
            carry = tl.sum(tl.where(lane[:, None] == last, run, 0.0), axis=0)
            carry_bucket = tl.sum(tl.where(lane == last, bucket, 0), axis=0)
        else:
            onehot = (bucket[None, :] - first == tl.arange(0, BB)[:, None]) & ok[None, :]
            acc += dot(indicator(onehot, vals.dtype), vals)
    if not PREFIX:
        rows = first + tl.arange(0, BB)
        out = out_ptr + (s.to(tl.int64) * n_buckets + rows)[:, None] * C + c[None, :]
        tl.store(out, acc, mask=(rows[:, None] < n_buckets) & (c[None, :] < C))


@triton.jit
def bucket_gather_kernel(
    src_ptr,  # [g, rows_per_hash, C] float32: tables (FROM_CODES) or prefix sums
    codes_ptr,  # [B, m, Nr] int32 reader codes (FROM_CODES)
    index_ptr,  # [g, B * Nr] int32: the src row of each reader, -1 for none (not FROM_CODES)
    mask_ptr,  # [B, Nr] read mask as uint8 (HAS_MASK)
    out_ptr,  # [B * Nr, C] float32, contiguous
    n_readers,  # B * Nr
    Nr,
    C,
    n_hashes,  # g: hashes in this launch
    first_hash,  # the first of them
    rows_per_hash,
    hash_bits,
    stride_cb,
    stride_cs,
    stride_mb,
    stride_mn,
    inv_m,
    FROM_CODES: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ACCUMULATE: tl.constexpr,  # add to out (hashes processed in several groups)
    BR: tl.constexpr,
    CP: tl.constexpr,
):
    t = tl.program_id(0) * BR + tl.arange(0, BR)
    ok = t < n_readers
    b = (t // Nr).to(tl.int64)
    n = t % Nr
    keep = ok
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + b * stride_mb + n * stride_mn, mask=ok, other=0) != 0)
    c = tl.arange(0, CP)
    acc = tl.zeros((BR, CP), dtype=tl.float32)
    for j in range(n_hashes):
        if FROM_CODES:
            code = tl.load(codes_ptr + b * stride_cb + (first_hash + j) * stride_cs + n, mask=keep, other=0)
            row = (b << hash_bits) + code
            has = keep
        else:
            row = tl.load(index_ptr + j * n_readers + t, mask=keep, other=-1).to(tl.int64)
            has = keep & (row >= 0)
        src = src_ptr + (row + j * rows_per_hash)[:, None] * C + c[None, :]  # g * rows_per_hash * C < 2**31
        acc += tl.load(src, mask=has[:, None] & (c[None, :] < C), other=0.0)
    out = out_ptr + t.to(tl.int64)[:, None] * C + c[None, :]
    res = acc * inv_m
    if ACCUMULATE:
        res += tl.load(out, mask=ok[:, None] & (c[None, :] < C), other=0.0)
    tl.store(out, tl.where(keep[:, None], res, 0.0), mask=ok[:, None] & (c[None, :] < C))
