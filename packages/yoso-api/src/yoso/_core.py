"""The YOSO computation between the two normalisations, composed from a backend's primitives.

Framework-neutral: the arrays are whatever the backend computes on, and only backend primitives and
scalar arithmetic touch them, so the NumPy, torch and JAX glue all share this one composition.
``q`` and ``k`` here are already unit rows; masked rows of q, k, v are already zero.
"""

from __future__ import annotations

from dataclasses import dataclass

# The sampled true gradient weighs each colliding pair by the importance ratio p'/p, which diverges as
# the cosine -> 1 (and -> -1); it is clamped at MAX_RATIO_PER_BIT * hash_bits. The lower bound uses
# hash_bits / 2, and the ratio is >= 0.55 * hash_bits everywhere, so the clamp only acts within about
# 2 degrees of a perfect alignment. YOSO-E's exact gradient uses the same clamped p' = p * min(p'/p, clamp).
MAX_RATIO_PER_BIT = 10.0


def max_ratio(hash_bits: int) -> float:
    return MAX_RATIO_PER_BIT * hash_bits


def forward(backend, q, k, v, planes, query_mask, key_mask, *, mode, hashing, num_hashes, hash_bits, causal):
    """``(Y, codes)``: YOSO-m or YOSO-E before output normalisation; codes ``(q_codes, k_codes)`` or None."""
    if mode == "expectation":
        y = backend.expectation_forward(
            q, k, v, query_mask=query_mask, key_mask=key_mask, causal=causal, hash_bits=hash_bits
        )
        return y, None
    q_codes = backend.hash_codes(q, planes, hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits)
    k_codes = backend.hash_codes(k, planes, hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits)
    y = backend.cumulate(
        q_codes,
        k_codes,
        v,
        read_mask=query_mask,
        write_mask=key_mask,
        order="causal" if causal else "none",
        hash_bits=hash_bits,
    )
    return y, (q_codes, k_codes)


def backward(backend, q, k, v, codes, query_mask, key_mask, grad, *, mode, backward, hash_bits, causal):
    """``(dq, dk, dv)`` for the output gradient ``grad`` of :func:`forward` (w.r.t. unit q and k)."""
    clamp = max_ratio(hash_bits)
    if mode == "expectation":
        return backend.expectation_backward(
            q,
            k,
            v,
            grad,
            query_mask=query_mask,
            key_mask=key_mask,
            causal=causal,
            hash_bits=hash_bits,
            backward=backward,
            max_ratio=clamp,
        )
    q_codes, k_codes = codes
    # dV: the same cumulation with roles swapped -- keys read tables of output gradients built by the
    # queries; causally, key j collects from queries i >= j.
    dv = backend.cumulate(
        k_codes,
        q_codes,
        grad,
        read_mask=key_mask,
        write_mask=query_mask,
        order="anticausal" if causal else "none",
        hash_bits=hash_bits,
    )
    dq, dk = backend.sampled_grads(
        q_codes,
        k_codes,
        q,
        k,
        v,
        grad,
        query_mask=query_mask,
        key_mask=key_mask,
        causal=causal,
        hash_bits=hash_bits,
        backward=backward,
        max_ratio=clamp,
    )
    return dq, dk, dv


_chunk_backward = backward  # what backward_state adds to (its argument `backward` names the estimator)


def forward_state(
    backend,
    q,
    k,
    v,
    planes,
    query_mask,
    key_mask,
    tables,
    key_tables,
    *,
    hashing,
    num_hashes,
    hash_bits,
    with_key_tables: bool,
):
    """One causal chunk of YOSO-m continuing a carried state (docs/math.md#recurrent-state).

    ``tables [B, m, 2**tau, Dv]`` (None: the sequence starts here) are the bucket sums of every earlier
    key's value; ``key_tables [B, m, 2**tau, Dv, D]`` (or None) those of ``v_j (x) k_j``, needed only for the
    lower-bound gradient across chunks. Returns ``(Y, tables', key_tables', codes)``:

        Y        = cumulate(q_codes, k_codes, v, order="causal") + read_buckets(q_codes, tables)
        tables'  = tables + bucket_tables(k_codes, v)
        key_tables' = key_tables + bucket_tables(k_codes, v, outer=k)       (only if with_key_tables)
    """
    options = dict(hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits)
    q_codes = backend.hash_codes(q, planes, **options)
    k_codes = backend.hash_codes(k, planes, **options)
    new_tables = _add_tokens(backend, tables, k_codes, v, key_mask, hash_bits)
    if q.shape[1] == 1:
        # One token (decoding): it sees exactly the earlier keys and itself, i.e. the updated tables. Reading
        # them after the update (rather than the old ones before it) lets a framework update the tables in
        # place: XLA copies a donated buffer that is still read after an in-place write to it.
        y = backend.read_buckets(q_codes, new_tables, mask=query_mask)
    else:
        y = backend.cumulate(
            q_codes, k_codes, v, read_mask=query_mask, write_mask=key_mask, order="causal", hash_bits=hash_bits
        )
        if tables is not None:
            y = y + backend.read_buckets(q_codes, tables, mask=query_mask)
    new_key_tables = None
    if with_key_tables:
        new_key_tables = _add_tokens(backend, key_tables, k_codes, v, key_mask, hash_bits, outer=k)
    return y, new_tables, new_key_tables, (q_codes, k_codes)


def _add_tokens(backend, tables, codes, values, mask, hash_bits, outer=None):
    if tables is None:
        return backend.bucket_tables(codes, values, mask=mask, hash_bits=hash_bits, outer=outer)
    return backend.add_to_tables(tables, codes, values, mask=mask, hash_bits=hash_bits, outer=outer)


def backward_state(
    backend,
    q,
    k,
    v,
    codes,
    query_mask,
    key_mask,
    grad,
    grad_tables,
    grad_key_tables,
    key_tables,
    *,
    has_tables: bool,
    backward,
    hash_bits,
):
    """``(dq, dk, dv, d_tables, d_key_tables)`` of :func:`forward_state` (w.r.t. unit q and k).

    ``grad`` is the cotangent of ``Y``; ``grad_tables``, ``grad_key_tables`` those of the returned tables
    (None: zero); ``key_tables`` the *initial* key tables (None if the chunk had none). ``d_tables`` is None
    unless ``has_tables`` (initial tables were given), ``d_key_tables`` None unless ``key_tables`` is. With
    ``G`` the cotangent of ``Y`` and ``dT'``, ``dA'`` those of the new tables (docs/math.md#recurrent-state):

        dv += m * read_buckets(k_codes, dT')                      (T' = T + sum of the chunk's values)
        dk += m * read_buckets(k_codes, dA', weights=v)           (the lower bound's keys, surrogate: no dv)
        dq += (tau/2) * read_buckets(q_codes, A, weights=G)       (earlier keys, lower bound)
        dT  = bucket_tables(q_codes, G) / m + dT'
        dA  = (tau/2) / m * bucket_tables(q_codes, G, outer=q) + dA'
    """
    dq, dk, dv = _chunk_backward(
        backend,
        q,
        k,
        v,
        codes,
        query_mask,
        key_mask,
        grad,
        mode="sample",
        backward=backward,
        hash_bits=hash_bits,
        causal=True,
    )
    q_codes, k_codes = codes
    num_hashes = q_codes.shape[1]
    half = hash_bits / 2
    if grad_tables is not None:
        dv = dv + num_hashes * backend.read_buckets(k_codes, grad_tables, mask=key_mask)
    if grad_key_tables is not None:
        dk = dk + num_hashes * backend.read_buckets(k_codes, grad_key_tables, mask=key_mask, weights=v)
    if key_tables is not None:
        dq = dq + half * backend.read_buckets(q_codes, key_tables, mask=query_mask, weights=grad)
    d_tables = d_key_tables = None
    if has_tables:
        d_tables = backend.bucket_tables(q_codes, grad, mask=query_mask, hash_bits=hash_bits) / num_hashes
        if grad_tables is not None:
            d_tables = d_tables + grad_tables
    if key_tables is not None:
        d_key_tables = backend.bucket_tables(q_codes, grad, mask=query_mask, hash_bits=hash_bits, outer=q)
        d_key_tables = d_key_tables * (half / num_hashes)
        if grad_key_tables is not None:
            d_key_tables = d_key_tables + grad_key_tables
    return dq, dk, dv, d_tables, d_key_tables


# ---- the normalisations around the core, written once for every framework ----------------------------
#
# The glue hands these functions its framework's array operations (``ops``, see below) and gets back the
# arrays the core takes, then the output. Written once, they give NumPy, torch and JAX callers the same
# rules (docs/math.md#unit-normalisation, #output-normalisation, #scale-and-overflow):
#
# * only directions matter, for every finite input: a row is normalised in the accumulation dtype, and a
#   row whose largest magnitude lies outside [SAFE_MIN, SAFE_MAX] -- where squaring its entries could
#   overflow or underflow float32 -- is first divided by the power of two nearest below that magnitude
#   (exact). Rows inside the range (all ordinary data) are normalised as plain ``x / ||x||``.
# * zero rows of q and k attend to nothing and are attended by nothing: they are folded into the masks,
#   so every backend and both modes treat them as masked rows (and E[YOSO-m] = YOSO-E holds for them).
# * the bucket sums cannot overflow: with normalize=True a batch row of v whose largest magnitude is
#   outside the range is divided by a power of two near it (``value_scale``, exact), which the normalised
#   output does not see. The unnormalised output is Y itself, finite whenever the sums of |v| over the
#   visible keys fit the dtype; an overflow is refused after the call (``yoso._validate.check_output``).
# * when the value checks cannot run (tracing), a non-finite input gives NaN outputs, never a plausible
#   number: a NaN row would otherwise hash to code 0 like any zero projection.
#
# ``ops`` provides: ``accumulate(x)`` (x in the accumulation dtype), ``cast(x, like)`` (x in like's dtype),
# ``peak(x, dims)`` (max |x| over the last ``dims`` axes, keepdims, no gradient), ``mantissa(x)`` (frexp's),
# ``where(c, a, b)``, ``sqrt(x)``, ``sum_last(x)`` (keepdims), ``finite_rows(x)`` (all finite over the last
# axis), ``any_last(x)`` and ``all_finite(x)`` (a 0-d bool).
SAFE_MIN, SAFE_MAX = 2.0**-32, 2.0**32


class ArrayOps:
    """These operations for a module with NumPy's array API (``numpy``, ``jax.numpy``); ``accumulate_dtype``
    maps a dtype to its accumulation dtype, ``no_grad`` stops gradients where the module has them (JAX)."""

    def __init__(self, xp, accumulate_dtype, no_grad=lambda x: x):
        self._xp, self._accumulate_dtype, self._no_grad = xp, accumulate_dtype, no_grad
        self.where, self.sqrt = xp.where, xp.sqrt

    def accumulate(self, x):
        return x.astype(self._accumulate_dtype(x.dtype), copy=False)

    def cast(self, x, like):
        return x.astype(like.dtype, copy=False)

    def peak(self, x, dims: int):
        return self._no_grad(self._xp.max(self._xp.abs(x), axis=tuple(range(-dims, 0)), keepdims=True))

    def sum_last(self, x):
        return self._xp.sum(x, axis=-1, keepdims=True)

    def mantissa(self, x):
        return self._xp.frexp(x)[0]

    def finite_rows(self, x):
        return self._xp.isfinite(x).all(axis=-1)

    def any_last(self, x):
        return x.any(axis=-1)

    def all_finite(self, x):
        return self._xp.isfinite(x).all()


def _scale_for(ops, peak):
    """1 where ``peak`` (a largest magnitude, ``[..., 1]``) is 0, not finite or inside the safe range, else the
    largest power of two <= ``peak``: dividing by it is exact, in every dtype."""
    extreme = (peak != 0) & ((peak < SAFE_MIN) | (peak > SAFE_MAX)) & ops.finite_rows(peak)[..., None]
    safe = ops.where(extreme, peak, 1.0)
    # peak = mantissa * 2**e with the mantissa in [0.5, 1): peak / (2 * mantissa) = 2**(e - 1), exactly.
    return ops.where(extreme, safe / (2 * ops.mantissa(safe)), 1.0)


def _divide(ops, x, scale):
    """``x / scale`` for a power of two ``scale`` (``[..., 1]``), exactly.

    Not directly: XLA divides by multiplying with the reciprocal, and on the CPU it flushes subnormal
    numbers to zero, so dividing by more than 2**126 (float32) would give zeros. Both sides are first
    brought nearer to 1 by the same power of two.
    """
    pre = ops.where(scale > 2.0**64, 2.0**-64, ops.where(scale < 2.0**-64, 2.0**64, 1.0))
    return (x * pre) / (scale * pre)


def unit_rows(ops, x):
    """``(x / ||x||, nonzero)`` over the last axis of ``x`` (in the accumulation dtype).

    Depends only on each row's direction, for every finite row; a zero row stays 0 (``nonzero`` False,
    gradient 0); a row holding NaN or inf becomes NaN (it counts as non-zero, so NaN flows on).
    """
    peak = ops.peak(x, 1)
    nonzero = peak != 0  # NaN != 0: a NaN row is not a zero row
    y = _divide(ops, x, _scale_for(ops, peak))
    squared = ops.sum_last(y * y)  # >= 1 for a scaled row, >= 2**-64 for one inside the range
    unit = ops.where(nonzero, y / ops.sqrt(ops.where(nonzero, squared, 1.0)), 0.0)
    return unit, nonzero[..., 0]


def unit_rows_vjp(ops, x, cotangent):
    """The vector-Jacobian product of :func:`unit_rows` at ``x``: ``(g - u (u·g)) / ||x||``, 0 on zero rows
    (for glue that writes its chain rule out: NumPy)."""
    unit, nonzero = unit_rows(ops, x)
    scale = _scale_for(ops, ops.peak(x, 1))
    y = _divide(ops, x, scale)
    norm = ops.sqrt(ops.where(nonzero[..., None], ops.sum_last(y * y), 1.0))  # ||x|| / scale
    tangent = cotangent - unit * ops.sum_last(unit * cotangent)
    return ops.where(nonzero[..., None], _divide(ops, tangent, scale) / norm, 0.0)


def value_scale(ops, v):
    """Per batch row of ``v [B, N, C]``: 1, or the power of two nearest below its largest magnitude if that
    is outside the safe range (``[B, 1, 1]``, in the accumulation dtype)."""
    return _scale_for(ops, ops.accumulate(ops.peak(v, 2)))


def keep_rows(ops, x, mask):
    """``x`` with the rows where ``mask [B, N]`` is False replaced by zeros (by selection: NaN cannot leak)."""
    return x if mask is None else ops.where(mask[..., None], x, 0.0)


def _and(mask, other):
    return other if mask is None else mask & other


@dataclass
class CoreInputs:
    """What the core takes, from :func:`core_inputs`; ``scale`` and ``bad`` go to :func:`core_output`."""

    q: object  # unit rows, in q's dtype
    k: object  # unit rows, in k's dtype
    v: object  # v / scale, zero on masked keys
    query_mask: object  # the caller's query mask and the non-zero rows of q
    key_mask: object  # the caller's key mask and the non-zero rows of k
    scale: object  # [B, 1, 1] (value_scale), or None: v as it is (normalize=False)
    bad: object  # [B, Nq, 1] bool: output rows a non-finite input reaches (unchecked calls), else None
    q_kept: object  # q and k with masked rows zeroed, in the accumulation dtype (for the NumPy chain rule)
    k_kept: object


def core_inputs(ops, q, k, v, query_mask, key_mask, planes=None, *, normalize: bool, checked: bool) -> CoreInputs:
    """The canonical arrays (``[B, N, D]``, masks ``[B, N]`` or None) as the core takes them.

    ``normalize``: whether the output is normalised; only then is v rescaled (the unnormalised output is Y
    itself: it is finite whenever the sums of |v| fit the dtype, and ``yoso._validate.check_output``
    refuses it otherwise). ``checked``: whether the value checks ran; if not (a traced call), ``bad`` marks
    the output rows that an unmasked non-finite row of q (its own row), of k or v (its whole batch row) or
    non-finite planes (everything) would otherwise turn into finite garbage.
    """
    q_kept = ops.accumulate(keep_rows(ops, q, query_mask))
    k_kept = ops.accumulate(keep_rows(ops, k, key_mask))
    q_unit, q_nonzero = unit_rows(ops, q_kept)
    k_unit, k_nonzero = unit_rows(ops, k_kept)
    bad = None
    if not checked:
        v_kept = keep_rows(ops, v, key_mask)
        keys_bad = ops.any_last(~(ops.finite_rows(k_kept) & ops.finite_rows(v_kept)))  # [B]
        bad = ~ops.finite_rows(q_kept)[..., None] | keys_bad[:, None, None]
        if planes is not None:
            bad = bad | ~ops.all_finite(planes)
    query_mask, key_mask = _and(query_mask, q_nonzero), _and(key_mask, k_nonzero)
    v = keep_rows(ops, v, key_mask)
    scale = value_scale(ops, v) if normalize else None
    return CoreInputs(
        q=ops.cast(q_unit, q),
        k=ops.cast(k_unit, k),
        v=v if scale is None else ops.cast(_divide(ops, v, scale), v),
        query_mask=query_mask,
        key_mask=key_mask,
        scale=scale,
        bad=bad,
        q_kept=q_kept,
        k_kept=k_kept,
    )


def core_output(ops, y, inputs: CoreInputs, *, normalize: bool):
    """The output from the core's ``Y`` (accumulation dtype): ``Y/||Y||`` (unchanged by v's rescaling), or
    ``Y``; NaN where ``inputs.bad``."""
    out = unit_rows(ops, y)[0] if normalize else y
    return out if inputs.bad is None else ops.where(inputs.bad, float("nan"), out)
