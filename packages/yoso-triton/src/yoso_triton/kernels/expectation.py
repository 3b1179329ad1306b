"""YOSO-E, fused and tiled like FlashAttention: O(N) memory, never an N x N matrix.

Forward ``Y = (P ⊙ M) V`` with ``P_ij = (1 - arccos(q_i·k_j)/pi)^tau``. No softmax, so no running
max or rescaling: a query tile simply accumulates ``P_tile @ V_tile`` over key tiles (causal: up to
the diagonal). Backward as FlashAttention-2 does it, with no atomics: one kernel per query tile for
``dq = (D ⊙ M ⊙ G V^T) K``, one per key tile for ``dk = (...)^T Q`` and ``dv = (P ⊙ M)^T G``, where
``D`` is the clamped ``p'`` (exact) or ``(tau/2) p`` (lower bound).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import device, dot, dot_split, importance_ratio, one_minus_angle, power


@device
def _rows(ptr, b, idx, stride_b, stride_n, stride_d, width, keep, WP: tl.constexpr):
    cols = tl.arange(0, WP)
    offs = b * stride_b + idx.to(tl.int64)[:, None] * stride_n + cols[None, :] * stride_d
    return tl.load(ptr + offs, mask=keep[:, None] & (cols[None, :] < width), other=0.0)


@device
def _keep(mask_ptr, b, idx, n, stride_b, stride_n, HAS_MASK: tl.constexpr):
    ok = idx < n
    if HAS_MASK:
        ok = ok & (tl.load(mask_ptr + b * stride_b + idx * stride_n, mask=ok, other=0) != 0)
    return ok


@triton.jit
def expectation_forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    qmask_ptr,
    kmask_ptr,
    out_ptr,  # [B, Nq, Dv] float32 contiguous
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
    stride_qmb,
    stride_qmn,
    stride_kmb,
    stride_kmn,
    TAU: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_QMASK: tl.constexpr,
    HAS_KMASK: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    DP: tl.constexpr,
    DVP: tl.constexpr,
):
    tiles = tl.cdiv(Nq, BM)
    b = (tl.program_id(0) // tiles).to(tl.int64)
    i = (tl.program_id(0) % tiles) * BM + tl.arange(0, BM)
    ikeep = _keep(qmask_ptr, b, i, Nq, stride_qmb, stride_qmn, HAS_QMASK)
    q = _rows(q_ptr, b, i, stride_qb, stride_qn, stride_qd, D, ikeep, DP)
    acc = tl.zeros((BM, DVP), dtype=tl.float32)
    end = Nk
    if CAUSAL:
        end = tl.minimum(Nk, (tl.program_id(0) % tiles + 1) * BM)
    for j0 in range(0, end, BN):
        j = j0 + tl.arange(0, BN)
        jkeep = _keep(kmask_ptr, b, j, Nk, stride_kmb, stride_kmn, HAS_KMASK)
        k = _rows(k_ptr, b, j, stride_kb, stride_kn, stride_kd, D, jkeep, DP)
        v = _rows(v_ptr, b, j, stride_vb, stride_vn, stride_vd, Dv, jkeep, DVP)
        p = power(one_minus_angle(dot(q, tl.trans(k))), TAU)
        ok = ikeep[:, None] & jkeep[None, :]
        if CAUSAL:
            ok = ok & (j[None, :] <= i[:, None])
        acc += dot_split(tl.where(ok, p, 0.0), v)
    e = tl.arange(0, DVP)
    out = out_ptr + (b * Nq + i)[:, None] * Dv + e[None, :]
    tl.store(out, tl.where(ikeep[:, None], acc, 0.0), mask=(i[:, None] < Nq) & (e[None, :] < Dv))


@triton.jit
def expectation_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    qmask_ptr,
    kmask_ptr,
    dq_ptr,  # [B, Nq, D] contiguous, input dtype
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
    max_ratio,
    TAU: tl.constexpr,
    EXACT: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_QMASK: tl.constexpr,
    HAS_KMASK: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    DP: tl.constexpr,
    DVP: tl.constexpr,
):
    tiles = tl.cdiv(Nq, BM)
    b = (tl.program_id(0) // tiles).to(tl.int64)
    i = (tl.program_id(0) % tiles) * BM + tl.arange(0, BM)
    ikeep = _keep(qmask_ptr, b, i, Nq, stride_qmb, stride_qmn, HAS_QMASK)
    q = _rows(q_ptr, b, i, stride_qb, stride_qn, stride_qd, D, ikeep, DP)
    g = _rows(g_ptr, b, i, stride_gb, stride_gn, stride_gd, Dv, ikeep, DVP)
    dq = tl.zeros((BM, DP), dtype=tl.float32)
    end = Nk
    if CAUSAL:
        end = tl.minimum(Nk, (tl.program_id(0) % tiles + 1) * BM)
    for j0 in range(0, end, BN):
        j = j0 + tl.arange(0, BN)
        jkeep = _keep(kmask_ptr, b, j, Nk, stride_kmb, stride_kmn, HAS_KMASK)
        k = _rows(k_ptr, b, j, stride_kb, stride_kn, stride_kd, D, jkeep, DP)
        v = _rows(v_ptr, b, j, stride_vb, stride_vn, stride_vd, Dv, jkeep, DVP)
        x = dot(q, tl.trans(k))
        u = one_minus_angle(x)
        weight = power(u, TAU)
        if EXACT:
            weight = weight * importance_ratio(x, u, TAU, max_ratio)
        else:
            weight = weight * (TAU * 0.5)
        ok = ikeep[:, None] & jkeep[None, :]
        if CAUSAL:
            ok = ok & (j[None, :] <= i[:, None])
        dq += dot_split(tl.where(ok, weight * dot(g, tl.trans(v)), 0.0), k)
    d = tl.arange(0, DP)
    out = dq_ptr + (b * Nq + i)[:, None] * D + d[None, :]
    tl.store(out, dq.to(dq_ptr.dtype.element_ty), mask=(i[:, None] < Nq) & (d[None, :] < D))


@triton.jit
def expectation_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    qmask_ptr,
    kmask_ptr,
    dk_ptr,  # [B, Nk, D] contiguous, input dtype
    dv_ptr,  # [B, Nk, Dv] contiguous, input dtype
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
    max_ratio,
    TAU: tl.constexpr,
    EXACT: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_QMASK: tl.constexpr,
    HAS_KMASK: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    DP: tl.constexpr,
    DVP: tl.constexpr,
):
    tiles = tl.cdiv(Nk, BN)
    b = (tl.program_id(0) // tiles).to(tl.int64)
    j_first = (tl.program_id(0) % tiles) * BN
    j = j_first + tl.arange(0, BN)
    jkeep = _keep(kmask_ptr, b, j, Nk, stride_kmb, stride_kmn, HAS_KMASK)
    k = _rows(k_ptr, b, j, stride_kb, stride_kn, stride_kd, D, jkeep, DP)
    v = _rows(v_ptr, b, j, stride_vb, stride_vn, stride_vd, Dv, jkeep, DVP)
    dk = tl.zeros((BN, DP), dtype=tl.float32)
    dv = tl.zeros((BN, DVP), dtype=tl.float32)
    start = 0
    if CAUSAL:
        start = (j_first // BM) * BM  # query tiles wholly above the diagonal see none of these keys
    for i0 in range(start, Nq, BM):
        i = i0 + tl.arange(0, BM)
        ikeep = _keep(qmask_ptr, b, i, Nq, stride_qmb, stride_qmn, HAS_QMASK)
        q = _rows(q_ptr, b, i, stride_qb, stride_qn, stride_qd, D, ikeep, DP)
        g = _rows(g_ptr, b, i, stride_gb, stride_gn, stride_gd, Dv, ikeep, DVP)
        x = dot(k, tl.trans(q))  # [BN, BM]: transposed tiles, so dk and dv are plain products
        u = one_minus_angle(x)
        p = power(u, TAU)
        if EXACT:
            weight = p * importance_ratio(x, u, TAU, max_ratio)
        else:
            weight = p * (TAU * 0.5)
        ok = jkeep[:, None] & ikeep[None, :]
        if CAUSAL:
            ok = ok & (j[:, None] <= i[None, :])
        dv += dot_split(tl.where(ok, p, 0.0), g)
        dk += dot_split(tl.where(ok, weight * dot(v, tl.trans(g)), 0.0), q)
    d = tl.arange(0, DP)
    e = tl.arange(0, DVP)
    rows = (b * Nk + j)[:, None]
    tl.store(dk_ptr + rows * D + d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=(j[:, None] < Nk) & (d[None, :] < D))
    tl.store(
        dv_ptr + rows * Dv + e[None, :], dv.to(dv_ptr.dtype.element_ty), mask=(j[:, None] < Nk) & (e[None, :] < Dv)
    )
