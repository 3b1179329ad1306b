"""Sampled gradients of YOSO-m w.r.t. unit q and k, over colliding pairs found by bucket sorting.

``dq_i = (1/m) sum_s sum_{j collides with i in hash s} W_ij (G_i·v_j) k_j`` and ``dk_j`` its transpose,
with ``W = tau/2`` (lower bound) or the clamped importance ratio ``p'/p`` of the pair's cosine (the
sampled true gradient, *YOSO). Queries and keys are both sorted by (bucket, position) per hash; a
program owns ``BB`` consecutive buckets and, for each chunk of its sorted queries, visits only the
keys of the buckets that chunk touches: one FlashAttention-style tile ``[BR, BW]`` of couplings
``C = W ⊙ same_bucket ⊙ mask ⊙ (G V^T)``, then ``dq += C K`` and ``dk += C^T Q``. The cost is the
number of colliding pairs times (D + Dv), about m N^2 / 2^tau for unrelated tokens.

Partial results of different hashes meet in the same dq/dk rows. They are added with int64
fixed-point atomics (a per-row power-of-two scale chosen from an a-priori bound on |dq|, |dk|):
integer addition is associative, so the result is bitwise reproducible, unlike float atomics, and
int64 atomic adds are native (no compare-and-swap loop).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import dot, dot_split, importance_ratio, one_minus_angle


@triton.jit
def bucket_pair_grads_kernel(
    q_ptr,  # [B, Nq, D] unit queries (any strides)
    k_ptr,  # [B, Nk, D] unit keys
    v_ptr,  # [B, Nk, Dv]
    g_ptr,  # [B, Nq, Dv] output gradients
    qmask_ptr,  # [B, Nq] uint8 (HAS_QMASK)
    kmask_ptr,  # [B, Nk] uint8 (HAS_KMASK)
    qperm_ptr,  # [g, B * Nq] int32 queries sorted by (bucket, position)
    qbucket_ptr,  # [g, B * Nq] int32 their buckets
    qstart_ptr,  # [g, n_buckets + 1] int32
    kperm_ptr,  # the same for the keys
    kbucket_ptr,
    kstart_ptr,
    dq_ptr,  # [B * Nq, D] int64 fixed-point accumulator
    dk_ptr,  # [B * Nk, D] int64
    scale_q_ptr,  # [B] float32 power-of-two scales
    scale_k_ptr,
    n_buckets,
    n_q_tokens,  # B * Nq
    n_k_tokens,  # B * Nk
    Nq,
    Nk,
    D,
    Dv,
    stride_qb,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vn,
    stride_vd,
    stride_gb,
    stride_gn,
    stride_gd,
    stride_qmb,
    stride_qmn,
    stride_kmb,
    stride_kmn,
    inv_m,
    max_ratio,
    TAU: tl.constexpr,
    EXACT: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_QMASK: tl.constexpr,
    HAS_KMASK: tl.constexpr,
    BB: tl.constexpr,
    BR: tl.constexpr,
    BW: tl.constexpr,
    DP: tl.constexpr,
    DVP: tl.constexpr,
):
    s = tl.program_id(1).to(tl.int64)
    first = tl.program_id(0) * BB
    last = tl.minimum(first + BB, n_buckets)
    qstarts = qstart_ptr + s * (n_buckets + 1)
    kstarts = kstart_ptr + s * (n_buckets + 1)
    q_lo = tl.load(qstarts + first)
    q_hi = tl.load(qstarts + last)
    d = tl.arange(0, DP)
    e = tl.arange(0, DVP)
    lane_r = tl.arange(0, BR)
    lane_w = tl.arange(0, BW)
    for r0 in range(q_lo, q_hi, BR):
        ridx = r0 + lane_r
        rok = ridx < q_hi
        rtok = tl.load(qperm_ptr + s * n_q_tokens + ridx, mask=rok, other=0)
        rbucket = tl.load(qbucket_ptr + s * n_q_tokens + ridx, mask=rok, other=-1)
        rb = (rtok // Nq).to(tl.int64)
        rn = rtok % Nq
        rkeep = rok
        if HAS_QMASK:
            rkeep = rkeep & (tl.load(qmask_ptr + rb * stride_qmb + rn * stride_qmn, mask=rok, other=0) != 0)
        q = tl.load(
            q_ptr + rb[:, None] * stride_qb + rn[:, None] * stride_qn + d[None, :] * stride_qd,
            mask=rkeep[:, None] & (d[None, :] < D),
            other=0.0,
        )
        g = tl.load(
            g_ptr + rb[:, None] * stride_gb + rn[:, None] * stride_gn + e[None, :] * stride_gd,
            mask=rkeep[:, None] & (e[None, :] < Dv),
            other=0.0,
        )
        # Only the keys of the buckets this chunk of (bucket-sorted) queries touches.
        first_bucket = tl.load(qbucket_ptr + s * n_q_tokens + r0)
        last_bucket = tl.load(qbucket_ptr + s * n_q_tokens + tl.minimum(r0 + BR, q_hi) - 1)
        w_lo = tl.load(kstarts + first_bucket)
        w_hi = tl.load(kstarts + last_bucket + 1)
        dq = tl.zeros((BR, DP), dtype=tl.float32)
        for w0 in range(w_lo, w_hi, BW):
            widx = w0 + lane_w
            wok = widx < w_hi
            wtok = tl.load(kperm_ptr + s * n_k_tokens + widx, mask=wok, other=0)
            wbucket = tl.load(kbucket_ptr + s * n_k_tokens + widx, mask=wok, other=-2)
            wb = (wtok // Nk).to(tl.int64)
            wn = wtok % Nk
            wkeep = wok
            if HAS_KMASK:
                wkeep = wkeep & (tl.load(kmask_ptr + wb * stride_kmb + wn * stride_kmn, mask=wok, other=0) != 0)
            k = tl.load(
                k_ptr + wb[:, None] * stride_kb + wn[:, None] * stride_kn + d[None, :] * stride_kd,
                mask=wkeep[:, None] & (d[None, :] < D),
                other=0.0,
            )
            v = tl.load(
                v_ptr + wb[:, None] * stride_vb + wn[:, None] * stride_vn + e[None, :] * stride_vd,
                mask=wkeep[:, None] & (e[None, :] < Dv),
                other=0.0,
            )
            pair = (rbucket[:, None] == wbucket[None, :]) & rkeep[:, None] & wkeep[None, :]
            if CAUSAL:
                pair = pair & (wn[None, :] <= rn[:, None])
            coupling = dot(g, tl.trans(v)) * inv_m
            if EXACT:
                x = dot(q, tl.trans(k))
                coupling = coupling * importance_ratio(x, one_minus_angle(x), TAU, max_ratio)
            else:
                coupling = coupling * (TAU * 0.5)
            coupling = tl.where(pair, coupling, 0.0)
            dq += dot_split(coupling, k)
            dk = dot_split(tl.trans(coupling), q)
            scale_k = tl.load(scale_k_ptr + wb, mask=wok, other=0.0)
            dk_rows = dk_ptr + (wb * Nk + wn)[:, None] * D + d[None, :]
            tl.atomic_add(dk_rows, (dk * scale_k[:, None]).to(tl.int64), mask=wkeep[:, None] & (d[None, :] < D))
        scale_q = tl.load(scale_q_ptr + rb, mask=rok, other=0.0)
        dq_rows = dq_ptr + (rb * Nq + rn)[:, None] * D + d[None, :]
        tl.atomic_add(dq_rows, (dq * scale_q[:, None]).to(tl.int64), mask=rkeep[:, None] & (d[None, :] < D))
