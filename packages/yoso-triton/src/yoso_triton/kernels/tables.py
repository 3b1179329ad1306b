"""The table form of the sampled lower-bound gradient, per bucket (docs/math.md#lower-bound).

The lower bound weighs every colliding pair with the same ``tau/2``, so a bucket's pairs factor
through one ``D x Dv`` table. With the roles of docs/math.md#cumulation-orders -- *writers* build the
table, *readers* read it -- one kernel serves both gradients:

    dq:  readers = queries (row G_i),  writers = keys    (rows k_j, v_j):  A = sum_j k_j v_j^T,  dq_i = A G_i
    dk:  readers = keys    (row v_j),  writers = queries (rows q_i, G_i):  B = sum_i q_i G_i^T,  dk_j = B v_j

each times ``(tau/2)(1/m)``, summed over the hashes. Per (hash, bucket) a program accumulates its
table over tiles of the bucket's writers (``T += Wd^T Wx``, a ``tl.dot``), then applies it to tiles of
the bucket's readers (``out = Rx T^T``). Causal: the writers a reader sees are those at or before it
(dq: keys j <= i) or at or after it (dk: queries i >= j, ``REVERSE``: the walk runs backwards through
the bucket). Readers are walked in tiles in that order, carrying the running (prefix) table of the
writer tiles that lie wholly before the reader tile's first reader; the remaining writers up to the
tile's last reader are taken densely, pair by pair with the causal mask -- chunked linear attention
within one bucket. Queries and keys are sorted by (bucket, position) per hash (``launch.Sorted``), so a bucket's
tokens are one contiguous, position-ordered segment of each sort.

Work per bucket: ``(n_readers + n_writers) D Dv`` multiply-adds per side, ``2 (n_q + n_k) D Dv`` for
both (plus the causal diagonal tiles), whatever the bucket sizes -- against ``n_q n_k (Dv + 2D)``
for the pair form (``pairs.py``); ``launch.sampled_grads`` chooses per bucket.

Tables of ``D x Dv`` fp32 do not fit registers for D = Dv = 256, so each program owns one
``BD x BDV`` tile of the table (grid axis 2): it produces the ``BD`` output columns that tile
feeds, from the ``BDV`` slice of the readers' rows; partial couplings of the causal diagonal tiles
are computed on that slice too (they are linear in it). Partial results of the table tiles and of
the hashes meet in the int64 fixed-point accumulators of the pair kernel: every program's sum has a
fixed order, and integer addition is associative, so the result is bitwise reproducible.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import device, dot, dot_split, dot_split_right


@device
def _walk(perm_ptr, start, u, n, N, REVERSE: tl.constexpr):
    """Tokens at walk indices ``u`` of a bucket's sorted segment: ``(token, row, position, order, ok)``
    (int64; ``token = row * N + position`` is the flat row index).

    The walk runs in position order from ``start`` (the segment's first sorted index, or its last for
    ``REVERSE``: backwards); ``order`` (the position, negated for ``REVERSE``) grows along it."""
    ok = u < n
    if REVERSE:
        idx = start - u
    else:
        idx = start + u
    tok = tl.load(perm_ptr + idx, mask=ok, other=0).to(tl.int64)
    b = tok // N
    pos = tok - b * N
    if REVERSE:
        order = -pos
    else:
        order = pos
    return tok, b, pos, order, ok


@device
def _order_at(perm_ptr, start, u, n, N, REVERSE: tl.constexpr):
    """The walk order of the token at (scalar) walk index ``u``."""
    if REVERSE:
        idx = start - u
    else:
        idx = start + u
    pos = tl.load(perm_ptr + idx, mask=u < n, other=0).to(tl.int64) % N
    if REVERSE:
        return -pos
    else:
        return pos


@device
def _keep(mask_ptr, b, pos, ok, stride_mb, stride_mn, HAS_MASK: tl.constexpr):
    keep = ok
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + b * stride_mb + pos * stride_mn, mask=ok, other=0) != 0)
    return keep


@device
def _rows(ptr, b, pos, keep, col_offsets, col_ok, stride_b, stride_n):
    """Rows ``[tile, cols]`` of a ``[B, N, C]`` tensor (``col_offsets = cols * stride_c``, ``col_ok = cols
    < C``, both ``[1, cols]``); zero where not kept: masked content is never even loaded."""
    return tl.load(ptr + (b * stride_b + pos * stride_n)[:, None] + col_offsets, mask=keep[:, None] & col_ok, other=0.0)


@device
def _emit(out_ptr, scale_ptr, out, tok, b, keep, d_row, d_ok, D):
    """Add a tile of fp32 partial gradients to the int64 fixed-point rows (masked readers untouched)."""
    scale = tl.load(scale_ptr + b, mask=keep, other=0.0)
    rows = out_ptr + tok[:, None] * D + d_row
    tl.atomic_add(rows, (out * scale[:, None]).to(tl.int64), mask=keep[:, None] & d_ok)


@triton.jit
def bucket_table_grads_kernel(
    rx_ptr,  # [B, Nr, Dv] the readers' Dv-wide rows: G (dq) or v (dk), any strides
    wd_ptr,  # [B, Nw, D] the writers' D-wide rows: k (dq) or q (dk)
    wx_ptr,  # [B, Nw, Dv] the writers' Dv-wide rows: v (dq) or G (dk)
    rmask_ptr,  # [B, Nr] uint8 (HAS_RMASK)
    wmask_ptr,  # [B, Nw] uint8 (HAS_WMASK)
    rperm_ptr,  # [g, B * Nr] int32 readers sorted by (bucket, position)
    rstart_ptr,  # [g, n_buckets + 1] int32
    wperm_ptr,  # the same for the writers
    wstart_ptr,
    list_ptr,  # [g, list_stride] int32: the buckets that take the table form, -1 past the last
    out_ptr,  # [B * Nr, D] int64 fixed-point accumulator (shared with the pair kernel)
    scale_ptr,  # [B] float32 power-of-two scales
    start_stride,  # n_buckets + 1
    list_stride,
    dv_tiles,  # cdiv(Dv, BDV)
    n_r_tokens,  # B * Nr
    n_w_tokens,  # B * Nw
    Nr,
    Nw,
    D,
    Dv,
    stride_rxb,
    stride_rxn,
    stride_rxd,
    stride_wdb,
    stride_wdn,
    stride_wdd,
    stride_wxb,
    stride_wxn,
    stride_wxd,
    stride_rmb,
    stride_rmn,
    stride_wmb,
    stride_wmn,
    weight,  # (tau/2) / m
    CAUSAL: tl.constexpr,
    REVERSE: tl.constexpr,  # causal only: writers at or after the reader (the dk side)
    HAS_RMASK: tl.constexpr,
    HAS_WMASK: tl.constexpr,
    BR: tl.constexpr,  # readers per tile
    BW: tl.constexpr,  # writers per tile
    BD: tl.constexpr,  # table rows (D) per program
    BDV: tl.constexpr,  # table columns (Dv) per program
):
    # Integer arithmetic in int64 from the start (token indices reach B * N): no int32 overflow checks.
    s = tl.program_id(1).to(tl.int64)
    bucket = tl.load(list_ptr + s * list_stride + tl.program_id(0)).to(tl.int64)
    listed = bucket >= 0
    bucket = tl.maximum(bucket, 0)
    rstarts = rstart_ptr + s * start_stride + bucket
    wstarts = wstart_ptr + s * start_stride + bucket
    r_lo = tl.load(rstarts).to(tl.int64)
    w_lo = tl.load(wstarts).to(tl.int64)
    n_r = tl.where(listed, tl.load(rstarts + 1).to(tl.int64) - r_lo, 0)
    n_w = tl.where(listed, tl.load(wstarts + 1).to(tl.int64) - w_lo, 0)
    if REVERSE:  # where the walks start: each segment's last token
        r_start = r_lo + n_r - 1
        w_start = w_lo + n_w - 1
    else:
        r_start = r_lo
        w_start = w_lo
    rperm = rperm_ptr + s * n_r_tokens
    wperm = wperm_ptr + s * n_w_tokens
    # This program's tile of the table: rows d (of D), columns e (of Dv). Loop-invariant column offsets.
    tile = tl.program_id(2).to(tl.int64)
    d = (tile // dv_tiles) * BD + tl.arange(0, BD)
    e = (tile % dv_tiles) * BDV + tl.arange(0, BDV)
    d_ok = d[None, :] < D
    e_ok = e[None, :] < Dv
    d_row = d[None, :]
    wd_cols = d_row * stride_wdd
    wx_cols = e[None, :] * stride_wxd
    rx_cols = e[None, :] * stride_rxd
    lane_r = tl.arange(0, BR).to(tl.int64)
    lane_w = tl.arange(0, BW).to(tl.int64)
    table = tl.full((BD, BDV), 0.0, tl.float32)
    if not CAUSAL:
        # T = sum over the bucket's writers of wd wx^T, then out = rx T^T for every reader.
        for w0 in range(0, n_w, BW):
            _, wb, wn, _, wok = _walk(wperm, w_start, w0 + lane_w, n_w, Nw, False)
            wkeep = _keep(wmask_ptr, wb, wn, wok, stride_wmb, stride_wmn, HAS_WMASK)
            wd = _rows(wd_ptr, wb, wn, wkeep, wd_cols, d_ok, stride_wdb, stride_wdn)
            wx = _rows(wx_ptr, wb, wn, wkeep, wx_cols, e_ok, stride_wxb, stride_wxn)
            table += dot(tl.trans(wd), wx)
        for r0 in range(0, n_r, BR):
            rtok, rb, rn, _, rok = _walk(rperm, r_start, r0 + lane_r, n_r, Nr, False)
            rkeep = _keep(rmask_ptr, rb, rn, rok, stride_rmb, stride_rmn, HAS_RMASK)
            rx = _rows(rx_ptr, rb, rn, rkeep, rx_cols, e_ok, stride_rxb, stride_rxn)
            out = dot_split_right(rx, tl.trans(table))
            _emit(out_ptr, scale_ptr, out * weight, rtok, rb, rkeep, d_row, d_ok, D)
    else:
        # Walk index of the first writer tile not yet in `table`; tiles are folded whole, once their
        # last writer lies before the current reader tile's first reader.
        folded = n_w * 0
        for r0 in range(0, n_r, BR):
            rtok, rb, rn, ro, rok = _walk(rperm, r_start, r0 + lane_r, n_r, Nr, REVERSE)
            rkeep = _keep(rmask_ptr, rb, rn, rok, stride_rmb, stride_rmn, HAS_RMASK)
            rx = _rows(rx_ptr, rb, rn, rkeep, rx_cols, e_ok, stride_rxb, stride_rxn)
            first = _order_at(rperm, r_start, r0, n_r, Nr, REVERSE)
            last = _order_at(rperm, r_start, tl.minimum(r0 + BR, n_r) - 1, n_r, Nr, REVERSE)
            # 1. The running table: every writer tile wholly before the tile's first reader, which every
            #    reader of the tile sees.
            more = (folded < n_w) & (
                _order_at(wperm, w_start, tl.minimum(folded + BW, n_w) - 1, n_w, Nw, REVERSE) < first
            )
            while more:
                _, wb, wn, _, wok = _walk(wperm, w_start, folded + lane_w, n_w, Nw, REVERSE)
                wkeep = _keep(wmask_ptr, wb, wn, wok, stride_wmb, stride_wmn, HAS_WMASK)
                wd = _rows(wd_ptr, wb, wn, wkeep, wd_cols, d_ok, stride_wdb, stride_wdn)
                wx = _rows(wx_ptr, wb, wn, wkeep, wx_cols, e_ok, stride_wxb, stride_wxn)
                table += dot(tl.trans(wd), wx)
                folded += BW
                more = (folded < n_w) & (
                    _order_at(wperm, w_start, tl.minimum(folded + BW, n_w) - 1, n_w, Nw, REVERSE) < first
                )
            out = dot_split_right(rx, tl.trans(table))
            # 2. The remaining writer tiles up to the tile's last reader, pair by pair: reader r sees
            #    writer w iff order(w) <= order(r) (j <= i for dq; i >= j for dk, walking backwards).
            w0 = folded
            more = (w0 < n_w) & (_order_at(wperm, w_start, w0, n_w, Nw, REVERSE) <= last)
            while more:
                _, wb, wn, wo, wok = _walk(wperm, w_start, w0 + lane_w, n_w, Nw, REVERSE)
                wkeep = _keep(wmask_ptr, wb, wn, wok, stride_wmb, stride_wmn, HAS_WMASK)
                wd = _rows(wd_ptr, wb, wn, wkeep, wd_cols, d_ok, stride_wdb, stride_wdn)
                wx = _rows(wx_ptr, wb, wn, wkeep, wx_cols, e_ok, stride_wxb, stride_wxn)
                coupling = dot(rx, tl.trans(wx))  # this Dv slice's share of G_i . v_j
                coupling = tl.where(wo[None, :] <= ro[:, None], coupling, 0.0)
                out += dot_split(coupling, wd)
                w0 += BW
                more = (w0 < n_w) & (_order_at(wperm, w_start, w0, n_w, Nw, REVERSE) <= last)
            _emit(out_ptr, scale_ptr, out * weight, rtok, rb, rkeep, d_row, d_ok, D)
