"""The bucket tables as arrays (docs/math.md#bucket-tables): what a recurrent state carries from call to
call and what the ranks holding parts of one sequence add up.

* ``table_sums_kernel``: ``T[b, s, c] = sum of the kept values of the tokens in bucket c`` on the tokens
  sorted by (bucket, position) per hash (``launch.Sorted``, as for the cumulation): each bucket is one
  contiguous segment of the sort. A program owns ``BB`` consecutive buckets and adds each chunk of
  their sorted tokens as ``onehot[BB, BT] @ V[BT, BC]`` (as ``bucket_sums_kernel`` does).
* ``outer_table_sums_kernel``: the same with every token adding ``v (x) o``, a ``C x F`` table per
  bucket: one bucket and one ``BC x BF`` tile of its table per program, ``V^T O`` over the segment in
  chunks of ``BT`` tokens (a ``tl.dot``); in the interpreter (``FLAT``) many buckets per program.
  Both write every row of the tables once, empty buckets too; ``HAS_BASE`` adds the rows of existing
  tables (``add_to_tables`` for many tokens: the copy and the sums in one pass).
* ``table_reads_kernel``: ``out_n = (1/m) sum_s T[b, s, h_s(n)]``; ``WEIGHTS`` contracts each row read
  with the reader's weights over the table's C axis (``sum_c w_c T[.., c, f]``). Hashes in order.
* ``add_tokens_kernel``: a few tokens added into a copy of existing tables without a sort (a decoding
  step). A program per (token, hash, tile): only the first kept token of its bucket in that row and
  hash (the bucket's *leader*) works -- it sums the bucket's kept tokens in position order and adds the
  sum to the bucket's row of the copy. Every row is written by at most one program (no atomics), and
  one token costs ``O(m C)``, not a pass over the ``m 2**tau C`` entries; finding the leaders costs
  ``O(N**2)`` code comparisons per row and hash, which is why only short chunks take this path.

Every sum runs in a fixed order in fp32 (tables are float32 for half inputs), so results are bitwise
reproducible run to run. Address arithmetic is int64: tables of outer products pass 2**31 entries.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import device, dot, indicator


@device
def _sorted_token(perm_ptr, idx, ok, N, mask_ptr, stride_mb, stride_mn, HAS_MASK: tl.constexpr):
    """Row and position (int64) of the sorted tokens ``idx`` and whether each is kept (in range, unmasked)."""
    tok = tl.load(perm_ptr + idx, mask=ok, other=0).to(tl.int64)
    b = tok // N
    n = tok - b * N
    keep = ok
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + b * stride_mb + n * stride_mn, mask=ok, other=0) != 0)
    return b, n, keep


@triton.jit
def table_sums_kernel(
    v_ptr,  # [B, N, C] values (any strides)
    mask_ptr,  # [B, N] uint8 (HAS_MASK)
    perm_ptr,  # [g, B * N] int32: flat tokens b * N + n sorted by (bucket, position)
    bucket_ptr,  # [g, B * N] int32: their bucket ids b * 2**tau + code
    start_ptr,  # [g, n_buckets + 1] int32: each bucket's first sorted index
    base_ptr,  # [B, m, 2**tau, C] tables to add to (HAS_BASE)
    out_ptr,  # [B, m, 2**tau, C] float32
    n_buckets,  # B * 2**tau
    n_tokens,  # B * N
    N,
    C,
    first_hash,  # the hash of program_id(1) == 0
    hash_bits,
    stride_vb,
    stride_vn,
    stride_vc,
    stride_mb,
    stride_mn,
    stride_bb,
    stride_bs,
    stride_bk,
    stride_bc,
    stride_tb,
    stride_ts,
    stride_tk,
    stride_tc,
    HAS_MASK: tl.constexpr,
    HAS_BASE: tl.constexpr,
    BB: tl.constexpr,  # buckets per program
    BT: tl.constexpr,  # sorted tokens per chunk
    BC: tl.constexpr,  # channels per program (grid axis 2)
):
    j = tl.program_id(1).to(tl.int64)
    first = tl.program_id(0).to(tl.int64) * BB
    starts = start_ptr + j * (n_buckets + 1)
    lo = tl.load(starts + first)
    hi = tl.load(starts + tl.minimum(first + BB, n_buckets))
    c = tl.program_id(2) * BC + tl.arange(0, BC)
    c_ok = c[None, :] < C
    lane = tl.arange(0, BT)
    sorted_perm = perm_ptr + j * n_tokens
    sorted_bucket = bucket_ptr + j * n_tokens
    acc = tl.zeros((BB, BC), dtype=tl.float32)
    for i0 in range(lo, hi, BT):
        idx = i0 + lane
        ok = idx < hi
        b, n, keep = _sorted_token(sorted_perm, idx, ok, N, mask_ptr, stride_mb, stride_mn, HAS_MASK)
        bucket = tl.load(sorted_bucket + idx, mask=ok, other=-1)
        vals = tl.load(
            v_ptr + b[:, None] * stride_vb + n[:, None] * stride_vn + c[None, :] * stride_vc,
            mask=keep[:, None] & c_ok,
            other=0.0,
        )
        onehot = (bucket[None, :] - first == tl.arange(0, BB)[:, None]) & ok[None, :]
        acc += dot(indicator(onehot, vals.dtype), vals)
    rows = first + tl.arange(0, BB)
    b = rows >> hash_bits
    k = rows - (b << hash_bits)
    s = first_hash + j
    ok = (rows[:, None] < n_buckets) & c_ok
    if HAS_BASE:
        base = base_ptr + (b * stride_bb + s * stride_bs + k * stride_bk)[:, None] + c[None, :] * stride_bc
        acc += tl.load(base, mask=ok, other=0.0).to(tl.float32)
    out = out_ptr + (b * stride_tb + s * stride_ts + k * stride_tk)[:, None] + c[None, :] * stride_tc
    tl.store(out, acc, mask=ok)


@triton.jit
def outer_table_sums_kernel(
    v_ptr,  # [B, N, C] values (any strides)
    o_ptr,  # [B, N, F] the other factor, same dtype as the values
    mask_ptr,  # [B, N] uint8 (HAS_MASK)
    perm_ptr,  # [g, B * N] int32 sorted tokens
    bucket_ptr,  # [g, B * N] int32 their bucket ids (FLAT)
    start_ptr,  # [g, n_buckets + 1] int32
    base_ptr,  # [B, m, 2**tau, C, F] tables to add to (HAS_BASE)
    out_ptr,  # [B, m, 2**tau, C, F] float32
    n_buckets,
    n_tokens,
    N,
    C,
    F,
    first_hash,
    hash_bits,
    f_tiles,  # cdiv(F, BF)
    stride_vb,
    stride_vn,
    stride_vc,
    stride_ob,
    stride_on,
    stride_of,
    stride_mb,
    stride_mn,
    stride_bb,
    stride_bs,
    stride_bk,
    stride_bc,
    stride_bf,
    stride_tb,
    stride_ts,
    stride_tk,
    stride_tc,
    stride_tf,
    HAS_MASK: tl.constexpr,
    HAS_BASE: tl.constexpr,
    FLAT: tl.constexpr,  # BB buckets per program through flattened products (the interpreter's form)
    BB: tl.constexpr,  # buckets per program: 1 unless FLAT
    BT: tl.constexpr,  # sorted tokens per chunk
    BC: tl.constexpr,  # table rows (C) per program
    BF: tl.constexpr,  # table columns (F) per program
):
    # On a GPU a program owns one bucket and sums V^T O over its segment on the tensor cores. The
    # interpreter pays per operation and per program, not per element: FLAT forms each chunk's products
    # v (x) o as rows of BC * BF and adds them to BB buckets at once, onehot[BB, BT] @ P[BT, BC * BF].
    first = tl.program_id(0).to(tl.int64) * BB
    j = tl.program_id(1).to(tl.int64)
    starts = start_ptr + j * (n_buckets + 1)
    lo = tl.load(starts + first)
    hi = tl.load(starts + tl.minimum(first + BB, n_buckets))
    tile = tl.program_id(2)
    c = (tile // f_tiles) * BC + tl.arange(0, BC)
    f = (tile % f_tiles) * BF + tl.arange(0, BF)
    c_ok = c[None, :] < C
    f_ok = f[None, :] < F
    lane = tl.arange(0, BT)
    sorted_perm = perm_ptr + j * n_tokens
    if FLAT:
        acc = tl.zeros((BB, BC * BF), dtype=tl.float32)
    else:
        acc = tl.zeros((BC, BF), dtype=tl.float32)
    for i0 in range(lo, hi, BT):
        idx = i0 + lane
        b, n, keep = _sorted_token(sorted_perm, idx, idx < hi, N, mask_ptr, stride_mb, stride_mn, HAS_MASK)
        vals = tl.load(
            v_ptr + b[:, None] * stride_vb + n[:, None] * stride_vn + c[None, :] * stride_vc,
            mask=keep[:, None] & c_ok,
            other=0.0,
        )
        other = tl.load(
            o_ptr + b[:, None] * stride_ob + n[:, None] * stride_on + f[None, :] * stride_of,
            mask=keep[:, None] & f_ok,
            other=0.0,
        )
        if FLAT:
            products = vals.to(tl.float32)[:, :, None] * other.to(tl.float32)[:, None, :]
            bucket = tl.load(bucket_ptr + j * n_tokens + idx, mask=idx < hi, other=-1)
            onehot = (bucket[None, :] - first == tl.arange(0, BB)[:, None]) & (idx < hi)[None, :]
            acc += dot(indicator(onehot, tl.float32), tl.reshape(products, [BT, BC * BF]))
        else:
            acc += dot(tl.trans(vals), other)
    rows = first + tl.arange(0, BB)
    b = rows >> hash_bits
    k = rows - (b << hash_bits)
    s = first_hash + j
    # [BB, BC, BF] entries (BB = 1 without FLAT)
    ok = (rows[:, None, None] < n_buckets) & (c[None, :, None] < C) & (f[None, None, :] < F)
    if FLAT:
        acc = tl.reshape(acc, [BB, BC, BF])
    else:
        acc = acc[None, :, :]
    if HAS_BASE:
        base = base_ptr + (b * stride_bb + s * stride_bs + k * stride_bk)[:, None, None]
        base += c[None, :, None] * stride_bc + f[None, None, :] * stride_bf
        acc += tl.load(base, mask=ok, other=0.0).to(tl.float32)
    out = out_ptr + (b * stride_tb + s * stride_ts + k * stride_tk)[:, None, None]
    out += c[None, :, None] * stride_tc + f[None, None, :] * stride_tf
    tl.store(out, acc, mask=ok)


@triton.jit
def table_reads_kernel(
    codes_ptr,  # [B, m, N] int32 reader codes (any strides)
    tables_ptr,  # [B, m, 2**tau, C] (or [..., C, F] with WEIGHTS), any strides
    w_ptr,  # [B, N, C] the readers' weights (WEIGHTS)
    mask_ptr,  # [B, N] uint8 (HAS_MASK)
    out_ptr,  # [B * N, X] float32, X = C (or F with WEIGHTS), contiguous
    n_readers,  # B * N
    N,
    m,
    C,
    X,
    inv_m,
    stride_cb,
    stride_cs,
    stride_cn,
    stride_tb,
    stride_ts,
    stride_tk,
    stride_tc,
    stride_tf,
    stride_wb,
    stride_wn,
    stride_wc,
    stride_mb,
    stride_mn,
    WEIGHTS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BR: tl.constexpr,  # readers per program
    BC: tl.constexpr,  # channels contracted per step (WEIGHTS)
    BX: tl.constexpr,  # output columns per program (grid axis 1)
):
    t = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    ok = t < n_readers
    b = t // N
    n = t - b * N
    keep = ok
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + b * stride_mb + n * stride_mn, mask=ok, other=0) != 0)
    x = tl.program_id(1) * BX + tl.arange(0, BX)
    x_ok = x[None, :] < X
    # Pointers advance by a hash per step (64-bit pointers: no int32 product of hash and stride).
    code_ptr = codes_ptr + b * stride_cb + n * stride_cn
    row_ptr = tables_ptr + b * stride_tb
    acc = tl.zeros((BR, BX), dtype=tl.float32)
    for _ in range(m):
        code = tl.load(code_ptr, mask=keep, other=0).to(tl.int64)
        row = row_ptr + code * stride_tk
        if WEIGHTS:
            for c0 in range(0, C, BC):
                c = c0 + tl.arange(0, BC)
                c_ok = c[None, :] < C
                w = tl.load(
                    w_ptr + b[:, None] * stride_wb + n[:, None] * stride_wn + c[None, :] * stride_wc,
                    mask=keep[:, None] & c_ok,
                    other=0.0,
                ).to(tl.float32)
                entries = row[:, None, None] + c[None, :, None] * stride_tc + x[None, None, :] * stride_tf
                table = tl.load(entries, mask=keep[:, None, None] & c_ok[:, :, None] & x_ok[:, None, :], other=0.0).to(
                    tl.float32
                )
                acc += tl.sum(w[:, :, None] * table, axis=1)
        else:
            acc += tl.load(row[:, None] + x[None, :] * stride_tc, mask=keep[:, None] & x_ok, other=0.0).to(tl.float32)
        code_ptr += stride_cs
        row_ptr += stride_ts
    out = out_ptr + t[:, None] * X + x[None, :]
    tl.store(out, tl.where(keep[:, None], acc * inv_m, 0.0), mask=ok[:, None] & x_ok)


@triton.jit
def add_tokens_kernel(
    codes_ptr,  # [B, m, N] int32 (any strides)
    v_ptr,  # [B, N, C] values
    o_ptr,  # [B, N, F] the other factor (OUTER), same dtype as the values
    mask_ptr,  # [B, N] uint8 (HAS_MASK)
    out_ptr,  # [B, m, 2**tau, C (, F)] float32: a copy of the tables, added to in place
    N,
    C,
    F,
    first_hash,
    f_tiles,
    stride_cb,
    stride_cs,
    stride_cn,
    stride_vb,
    stride_vn,
    stride_vc,
    stride_ob,
    stride_on,
    stride_of,
    stride_mb,
    stride_mn,
    stride_tb,
    stride_ts,
    stride_tk,
    stride_tc,
    stride_tf,
    OUTER: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BN: tl.constexpr,  # tokens per step
    BC: tl.constexpr,
    BF: tl.constexpr,  # OUTER only
):
    t = tl.program_id(0).to(tl.int64)
    b = t // N
    n = t - b * N
    s = first_hash + tl.program_id(1).to(tl.int64)
    row_codes = codes_ptr + b * stride_cb + s * stride_cs
    row_mask = mask_ptr + b * stride_mb
    code = tl.load(row_codes + n * stride_cn)
    lane = tl.arange(0, BN)
    # The leader of the bucket: no kept token before this one in the row has its code.
    earlier = (n * 0).to(tl.int32)
    for j0 in range(0, n, BN):
        j = j0 + lane
        same = (j < n) & (tl.load(row_codes + j * stride_cn, mask=j < n, other=-1) == code)
        if HAS_MASK:
            same = same & (tl.load(row_mask + j * stride_mn, mask=j < n, other=0) != 0)
        earlier += tl.sum(same.to(tl.int32), axis=0)
    leader = earlier == 0
    if HAS_MASK:
        leader = leader & (tl.load(row_mask + n * stride_mn) != 0)
    stop = tl.where(leader, N, n)  # the others sum nothing and store nothing
    tile = tl.program_id(2)
    c = (tile // f_tiles) * BC + tl.arange(0, BC)
    if OUTER:
        f = (tile % f_tiles) * BF + tl.arange(0, BF)
        acc = tl.zeros((BC, BF), dtype=tl.float32)
    else:
        acc = tl.zeros((BC,), dtype=tl.float32)
    for j0 in range(n, stop, BN):
        j = j0 + lane
        same = (j < stop) & (tl.load(row_codes + j * stride_cn, mask=j < stop, other=-1) == code)
        if HAS_MASK:
            same = same & (tl.load(row_mask + j * stride_mn, mask=j < stop, other=0) != 0)
        vals = tl.load(
            v_ptr + b * stride_vb + j[:, None] * stride_vn + c[None, :] * stride_vc,
            mask=same[:, None] & (c[None, :] < C),
            other=0.0,
        )
        if OUTER:
            other = tl.load(
                o_ptr + b * stride_ob + j[:, None] * stride_on + f[None, :] * stride_of,
                mask=same[:, None] & (f[None, :] < F),
                other=0.0,
            )
            acc += dot(tl.trans(vals), other)
        else:
            acc += tl.sum(vals.to(tl.float32), axis=0)
    row = out_ptr + b * stride_tb + s * stride_ts + code.to(tl.int64) * stride_tk
    if OUTER:
        entries = row + c[:, None] * stride_tc + f[None, :] * stride_tf
        ok = leader & (c[:, None] < C) & (f[None, :] < F)
    else:
        entries = row + c * stride_tc
        ok = leader & (c < C)
    tl.store(entries, tl.load(entries, mask=ok, other=0.0) + acc, mask=ok)
