"""Hash codes: Gaussian SimHash (projection fused with sign and bit packing) and the Hadamard fast hash.

Codes are written as int32 ``codes[b, s, n]`` (layout of ``yoso._planes``). Bit packing is a small
matrix product: the 0/1 sign tile times a matrix holding ``2**bit`` in the rows of each hash's bits;
both are exact in bfloat16 and the fp32 accumulation of at most 16 powers of two is exact, so the
tensor cores pack the bits for free.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import device, dot, indicator


@device
def _pack_bits(proj, first_bit, TAU: tl.constexpr, C: tl.constexpr, HB: tl.constexpr, N_BITS):
    """``[BT, C]`` projections -> ``[BT, HB]`` codes; column ``c`` is bit ``(c - first_bit) % TAU`` of
    hash ``(c - first_bit) // TAU``; only columns ``first_bit <= c < first_bit + N_BITS`` count."""
    cols = tl.arange(0, C) - first_bit
    hashes = tl.arange(0, HB)
    owner = (cols[:, None] // TAU == hashes[None, :]) & (cols[:, None] >= 0) & (cols[:, None] < N_BITS)
    weights = tl.where(owner, tl.exp2((cols[:, None] % TAU).to(tl.float32)), 0.0).to(tl.bfloat16)
    bits = indicator(proj > 0, tl.bfloat16)  # strict: a zero projection is bit 0
    return dot(bits, weights).to(tl.int32)


@triton.jit
def gaussian_codes_kernel(
    x_ptr,  # [B, N, D] unit rows (any strides)
    hi_ptr,  # [P, m * TAU, D] contiguous planes (input dtype when SPLIT, else float32)
    lo_ptr,  # the rounding residue of the planes (SPLIT only)
    codes_ptr,  # [B, m, N] int32
    n_tokens,  # B * N
    tokens_per_group,  # tokens sharing one set of planes (B * N when P == 1, else N)
    N,
    D,
    m,
    stride_xb,
    stride_xn,
    stride_xd,
    stride_planes,  # elements between two sets of planes (0 when P == 1)
    stride_cb,
    stride_cs,
    TAU: tl.constexpr,
    HB: tl.constexpr,  # hashes per program (power of two >= 16)
    C: tl.constexpr,  # projection columns per program: next power of two >= HB * TAU
    BT: tl.constexpr,  # tokens per program
    KD: tl.constexpr,  # the D chunk of the projection loop
    SPLIT: tl.constexpr,  # half inputs: planes = hi + lo, two tensor-core products
    GATHER: tl.constexpr,  # planes per token (per-row planes and rows too short for a tile)
):
    """Codes of ``BT`` tokens x ``HB`` hashes: one projection product, signs, one packing product.

    DOT mode (GATHER False): the tile's tokens share one set of planes, and the projection is a matrix
    product looped over D. GATHER mode: each token loads its own row's planes (used for many short
    rows with per-row planes, where a token tile would span several sets of planes).
    """
    pid = tl.program_id(0)
    s0 = tl.program_id(1) * HB
    if GATHER:
        t = pid * BT + tl.arange(0, BT)
        valid = t < n_tokens
    else:
        tiles = tl.cdiv(tokens_per_group, BT)
        group = pid // tiles
        local = (pid % tiles) * BT + tl.arange(0, BT)
        t = group * tokens_per_group + local
        valid = local < tokens_per_group
    b = t // N
    n = t % N
    x_row = x_ptr + b.to(tl.int64) * stride_xb + n.to(tl.int64) * stride_xn

    cols = tl.arange(0, C)
    n_bits = tl.minimum(HB * TAU, (m - s0) * TAU)  # the last block may hold fewer hashes
    plane = s0 * TAU + cols  # flat (hash, bit) index of each column
    col_ok = cols < n_bits
    proj = tl.zeros((BT, C), dtype=tl.float32)
    for k in range(0, D, KD):
        d = k + tl.arange(0, KD)
        x = tl.load(x_row[:, None] + d[None, :] * stride_xd, mask=valid[:, None] & (d[None, :] < D), other=0.0)
        if GATHER:
            row = b.to(tl.int64) * stride_planes
            offs = row[:, None, None] + plane[None, :, None] * D + d[None, None, :]
            ok = valid[:, None, None] & col_ok[None, :, None] & (d[None, None, :] < D)
            planes = tl.load(hi_ptr + offs, mask=ok, other=0.0)
            proj += tl.sum(x.to(tl.float32)[:, None, :] * planes, axis=2)
        else:
            offs = group.to(tl.int64) * stride_planes + plane[:, None] * D + d[None, :]
            ok = col_ok[:, None] & (d[None, :] < D)
            proj += dot(x, tl.trans(tl.load(hi_ptr + offs, mask=ok, other=0.0)))
            if SPLIT:
                proj += dot(x, tl.trans(tl.load(lo_ptr + offs, mask=ok, other=0.0)))

    codes = _pack_bits(proj, 0, TAU, C, HB, n_bits)
    s = s0 + tl.arange(0, HB)
    out = codes_ptr + b.to(tl.int64)[:, None] * stride_cb + s[None, :] * stride_cs + n[:, None]
    tl.store(out, codes, mask=valid[:, None] & (s[None, :] < m))


@device
def _fwht(u, BT: tl.constexpr, DP: tl.constexpr, LOG_D: tl.constexpr):
    """Unnormalised Walsh-Hadamard transform of each row's first ``2**LOG_D`` columns (in place).

    Stage ``h`` pairs columns ``i`` and ``i + h`` (bit ``h`` of ``i`` clear): viewing a row as
    ``[DP / 2h, 2, h]`` puts the pair on the middle axis, which ``split``/``join`` take apart and put
    back as ``(a + b, a - b)``. Columns past ``2**LOG_D`` are zero and stay zero.
    """
    for i in tl.static_range(LOG_D):  # stage h = 2**i (a constexpr cannot be re-bound per iteration)
        v = tl.permute(tl.reshape(u, [BT, DP // (2 << i), 2, 1 << i]), (0, 1, 3, 2))
        a, b = tl.split(v)
        v = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
        u = tl.reshape(v, [BT, DP])
    return u


@triton.jit
def hadamard_codes_kernel(
    x_ptr,  # [B, N, D] unit rows (any strides)
    diag_ptr,  # [P, R, 3, D_PAD] contiguous float32 ±1 diagonals
    codes_ptr,  # [B, m, N] int32
    n_rows,  # B * N * R: one row per (token, rotation)
    N,
    D,
    m,
    R,
    PER,  # hashes per rotation: D_PAD // TAU
    stride_xb,
    stride_xn,
    stride_xd,
    stride_diag,  # elements between two sets of diagonals (0 when P == 1)
    stride_cb,
    stride_cs,
    TAU: tl.constexpr,
    D_PAD: tl.constexpr,  # D', the Hadamard size
    DP: tl.constexpr,  # the tile width: max(D', 16)
    LOG_D: tl.constexpr,  # log2(D')
    JP: tl.constexpr,  # hashes per rotation, rounded up to a power of two >= 16
    BT: tl.constexpr,  # rows per program
):
    """``u = H d3 H d2 H d1 x`` by three in-register fast transforms, then ``PER`` hashes of ``TAU`` signs."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    valid = rows < n_rows
    t = rows // R
    r = rows % R
    b = t // N
    n = t % N
    cols = tl.arange(0, DP)
    x_row = x_ptr + b.to(tl.int64) * stride_xb + n.to(tl.int64) * stride_xn
    u = tl.load(x_row[:, None] + cols[None, :] * stride_xd, mask=valid[:, None] & (cols[None, :] < D), other=0.0)
    u = u.to(tl.float32)
    diag_row = diag_ptr + b.to(tl.int64) * stride_diag + r * (3 * D_PAD)
    for step in tl.static_range(3):
        d = tl.load(
            diag_row[:, None] + step * D_PAD + cols[None, :], mask=valid[:, None] & (cols[None, :] < D_PAD), other=0.0
        )
        u = _fwht(u * d, BT, DP, LOG_D)

    codes = _pack_bits(u, 0, TAU, DP, JP, PER * TAU)
    j = tl.arange(0, JP)
    s = r[:, None] * PER + j[None, :]
    out = codes_ptr + b.to(tl.int64)[:, None] * stride_cb + s * stride_cs + n[:, None]
    tl.store(out, codes, mask=valid[:, None] & (j[None, :] < PER) & (s < m))
