"""Device helpers shared by the kernels: matrix products at the right precision and the collision math.

Precision rules (fp32 accumulation everywhere; the tolerances they meet: docs/testing.md):

* float32 operands multiply with ``input_precision="ieee"``: TF32 would round hash projections and
  attention weights to 10 mantissa bits, far outside the float32 tolerance.
* half operands (float16/bfloat16 inputs, exact as given) go to the tensor cores as they are; an fp32
  operand that must meet a half one (attention weights, pair couplings) is split into ``hi + lo``
  halves, so the product keeps ~16 mantissa bits instead of 8 (``dot_split``).
* Under ``TRITON_INTERPRET=1`` (triton 3.7's interpreter multiplies bfloat16 as raw integers) half
  operands are widened to float32 first: the same products, exactly. Operands are also made
  row-major there, since the interpreter's NumPy product skips BLAS for transposed views.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

PI = tl.constexpr(3.141592653589793)


def device(fn):
    """Decorator of device helpers: ``triton.jit`` for the compiler; the plain function under the
    interpreter, where calling a jit helper re-patches ``triton.language`` first (≈ 0.3 ms a call in
    triton 3.7, most of a small program's time) while a plain function runs the same patched ops."""
    return fn if INTERPRET else triton.jit(fn)


@device
def _dense(a):
    """Interpreter only: a row-major copy (NumPy multiplies transposed views without BLAS, 100x slower)."""
    return tl.reshape(tl.reshape(a, [a.shape[0] * a.shape[1]]), [a.shape[0], a.shape[1]])


@device
def dot(a, b):
    """``a @ b`` with fp32 accumulation; ``a`` and ``b`` share one dtype."""
    if INTERPRET:
        return tl.dot(_dense(a.to(tl.float32)), _dense(b.to(tl.float32)), input_precision="ieee")
    elif a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@device
def dot_split(a, b):
    """``a @ b`` for an fp32 ``a`` and ``b`` in the input dtype, without rounding ``a`` to half."""
    if b.dtype == tl.float32:
        return dot(a, b)
    else:
        hi = a.to(b.dtype)
        lo = (a - hi.to(tl.float32)).to(b.dtype)
        return dot(hi, b) + dot(lo, b)


@device
def dot_split_right(a, b):
    """``a @ b`` for ``a`` in the input dtype and an fp32 ``b`` (a table), without rounding ``b`` to half."""
    if a.dtype == tl.float32:
        return dot(a, b)
    else:
        hi = b.to(a.dtype)
        lo = (b - hi.to(tl.float32)).to(a.dtype)
        return dot(a, hi) + dot(a, lo)


@device
def indicator(flag, dtype: tl.constexpr):
    """A boolean tile as 0/1 in ``dtype`` (through fp32: the interpreter cannot cast bool to bfloat16)."""
    return tl.where(flag, 1.0, 0.0).to(dtype)


@device
def one_minus_angle(x):
    """``1 - arccos(x)/pi`` for cosines ``x`` (clipped to [-1, 1]), in fp32.

    arccos(|x|) = sqrt(1 - |x|) * poly(|x|) (Abramowitz & Stegun 4.4.46, |error| < 2e-8 rad). The
    result is formed without cancellation on both ends: ``1 - a/pi`` for x >= 0 and ``a/pi`` for x < 0.
    (Triton's interpreter has no libdevice acos, so the kernels carry their own.)
    """
    x = tl.minimum(tl.maximum(x, -1.0), 1.0)
    a = tl.abs(x)
    p = -0.0012624911
    p = p * a + 0.0066700901
    p = p * a - 0.0170881256
    p = p * a + 0.0308918810
    p = p * a - 0.0501743046
    p = p * a + 0.0889789874
    p = p * a - 0.2145988016
    p = p * a + 1.5707963050
    angle_of_abs = tl.sqrt(tl.maximum(1.0 - a, 0.0)) * p
    return tl.where(x < 0, angle_of_abs / PI, 1.0 - angle_of_abs / PI)


@device
def power(u, TAU: tl.constexpr):
    """``u ** TAU`` for a small integer constant, by repeated multiplication (exact rounding per step)."""
    p = tl.full(u.shape, 1.0, tl.float32)
    for _ in tl.static_range(TAU):
        p = p * u
    return p


@device
def importance_ratio(x, u, TAU: tl.constexpr, max_ratio):
    """``min(p'/p, max_ratio) = TAU / max(sin(theta) (pi - theta), TAU / max_ratio)`` with ``u = 1 - theta/pi``."""
    x = tl.minimum(tl.maximum(x, -1.0), 1.0)
    sine = tl.sqrt(tl.maximum((1.0 - x) * (1.0 + x), 0.0))
    return TAU / tl.maximum(sine * (PI * u), TAU / max_ratio)


@device
def pair_weight(x, TAU: tl.constexpr, EXACT: tl.constexpr, max_ratio):
    """The derivative YOSO-E's backward weighs a pair with: clamped ``p'`` (EXACT) or ``(TAU/2) p``."""
    u = one_minus_angle(x)
    p = power(u, TAU)
    if EXACT:
        return p * importance_ratio(x, u, TAU, max_ratio)
    else:
        return p * (TAU * 0.5)
