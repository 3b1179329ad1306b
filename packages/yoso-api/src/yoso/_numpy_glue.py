"""NumPy arrays in, NumPy arrays out; gradients through an explicit vector-Jacobian product.

NumPy has no autograd, so the chain rule around the backend's YOSO core is written here: the input
normalisations ``q/||q||``, ``k/||k||``, the optional output normalisation, the masks, and the
reduction over broadcast leading dims.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from . import _core, _via_jax
from ._glue import Glue
from ._planes import check_seed, draw_for_seed


def _accumulate_dtype(dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


OPS = _core.ArrayOps(np, _accumulate_dtype)  # for yoso._core


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``x / ||x||`` along the last axis (direction only, whatever the scale); zero rows stay zero."""
    return _core.unit_rows(OPS, x)[0]


def unit_rows_vjp(x: np.ndarray, cotangent: np.ndarray) -> np.ndarray:
    """VJP of :func:`unit_rows` at ``x``: ``(g - u (u·g)) / ||x||``, and 0 on zero rows."""
    return _core.unit_rows_vjp(OPS, x, cotangent)


def _keep_rows(x, mask):
    return x if mask is None else np.where(mask[..., None], x, 0)


def _unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``grad`` (shaped like the broadcast result) back to an input of ``shape``."""
    extra = grad.ndim - len(shape)
    grad = grad.sum(axis=tuple(range(extra))) if extra else grad
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(axis=axes, keepdims=True) if axes else grad


def _codes_out(codes: np.ndarray, lead: tuple[int, ...]) -> np.ndarray:
    """Backend codes ``[B, m, N]`` -> the public layout ``[..., N, m]`` (int32)."""
    b, m, n = codes.shape
    return np.ascontiguousarray(codes.astype(np.int32, copy=False).transpose(0, 2, 1)).reshape(lead + (n, m))


def _full(like: np.ndarray, shape, value) -> np.ndarray:
    return np.full(shape, value, dtype=bool if isinstance(value, bool) else like.dtype)


# yoso._core's functions for a backend that computes on JAX arrays: the same results, through yoso._via_jax.
_ON_JAX = dict(full=_full, back=np.asarray)
_JAX_CORE = (functools.partial(_via_jax.forward, **_ON_JAX), functools.partial(_via_jax.backward, **_ON_JAX))
_JAX_STATE_CORE = (
    functools.partial(_via_jax.forward_state, **_ON_JAX),
    functools.partial(_via_jax.backward_state, **_ON_JAX),
)


def _state_cotangent(cotangent, name: str, shape: tuple[int, ...], tail: int, dtype) -> np.ndarray | None:
    """One table of a state's cotangent (None: zero), as ``[B, ...]`` (its last ``tail`` dims kept) in the
    state's dtype."""
    if cotangent is None:
        return None
    cotangent = np.asarray(cotangent)
    if cotangent.shape != shape:
        raise ValueError(
            f"the cotangent of state.{name} must have its shape {list(shape)}, got {list(cotangent.shape)}"
        )
    return cotangent.reshape((-1,) + shape[len(shape) - tail :]).astype(dtype)


def _core_cotangent(cotangent, prep, y, query_mask) -> np.ndarray:
    """The output's cotangent as one of the core's ``Y [B, Nq, Dv]``: the chain rule of ``core_output``."""
    call = prep.call
    out_shape = prep.lead + (call.n_query, call.value_dim)
    cotangent = np.asarray(cotangent)
    if cotangent.shape != out_shape:
        raise ValueError(f"the cotangent must have the output's shape {list(out_shape)}, got {list(cotangent.shape)}")
    grad = cotangent.reshape(call.batch, call.n_query, call.value_dim).astype(y.dtype)
    return _keep_rows(unit_rows_vjp(y, grad) if prep.normalize else grad, query_mask)


def _input_grads(prep, inputs: _core.CoreInputs, dq_unit, dk_unit, dv) -> tuple:
    """``(dq, dk, dv)`` of the caller's arrays from the core's: through the unit rows, the rescaling of v, the
    masks and the broadcast leading dims, in the caller's dtype."""
    dv = dv if inputs.scale is None else _core._divide(OPS, dv, inputs.scale)
    grads = (
        _keep_rows(unit_rows_vjp(inputs.q_kept, dq_unit), inputs.query_mask),
        _keep_rows(unit_rows_vjp(inputs.k_kept, dk_unit), inputs.key_mask),
        _keep_rows(dv, inputs.key_mask),
    )
    dtype = np.dtype(prep.call.dtype)
    return tuple(
        _unbroadcast(g.reshape(prep.lead + tuple(shape[-2:])), shape).astype(dtype)
        for g, shape in zip(grads, prep.shapes)
    )


class NumpyGlue(Glue):
    name = "numpy"

    @staticmethod
    def owns(x) -> bool:
        return isinstance(x, np.ndarray)

    @staticmethod
    def describe(x):
        return tuple(x.shape), np.dtype(x.dtype).name, "cpu"

    @staticmethod
    def asarray(x, like=None):
        return np.asarray(x)

    @staticmethod
    def planes_array(planes, like):
        return np.asarray(planes)

    @staticmethod
    def flatten(x, lead, tail):
        return np.broadcast_to(x, tuple(lead) + tuple(tail)).reshape((math.prod(lead),) + tuple(tail))

    @staticmethod
    def check_randomness(*, seed, generator, key, like):
        if generator is not None:
            raise TypeError("generator= is for torch tensors; with NumPy arrays pass seed= (an int or a Generator)")
        if key is not None:
            raise TypeError(
                "key= is a JAX PRNG key, for JAX arrays; with NumPy arrays pass seed= (an int or a Generator)"
            )
        check_seed(seed)

    @staticmethod
    def draw_planes(shape, *, hashing, seed, generator, key, like):
        return draw_for_seed(shape, hashing, seed)

    @staticmethod
    def value_flags(rows: dict, *, planes, hashing, masks: dict, sums: dict | None = None) -> dict:
        flags = {}
        for name, (x, mask) in rows.items():
            bad = ~np.isfinite(x).all(axis=-1)
            if mask is not None:
                bad &= mask
            flags[name] = (int(bad.sum()), int(np.argmax(bad.ravel())))
        if planes is not None:
            flags["planes"] = not np.isfinite(planes).all()
            flags["planes_pm1"] = hashing == "hadamard" and not np.isin(planes, (-1.0, 1.0)).all()
        for name, mask in masks.items():
            flags[name] = mask is not None and not mask.any()
        for name, (x, mask) in (sums or {}).items():
            with np.errstate(over="ignore"):  # an overflowing sum is the answer (inf), not a warning
                flags["sum:" + name] = float(np.abs(OPS.accumulate(_keep_rows(x, mask))).sum(axis=-2).max())
        return flags

    @staticmethod
    def same_values(a, b) -> bool:
        shape = np.broadcast_shapes(a.shape, b.shape)
        return bool(np.array_equal(np.broadcast_to(a, shape), np.broadcast_to(b, shape)))

    take = staticmethod(np.take)
    moveaxis = staticmethod(np.moveaxis)
    broadcast_to = staticmethod(np.broadcast_to)
    logical_and = staticmethod(np.logical_and)

    def hash_codes(self, backend, prep):
        call = prep.call
        x = unit_rows(OPS.accumulate(prep.x)).astype(prep.x.dtype, copy=False)
        codes = backend.hash_codes(
            x, prep.planes, hashing=call.hashing, num_hashes=call.num_hashes, hash_bits=call.hash_bits
        )
        return _codes_out(np.asarray(codes), prep.lead)

    def attention(self, backend, prep):
        return self._run(backend, prep, with_vjp=False)

    def attention_vjp(self, backend, prep):
        return self._run(backend, prep, with_vjp=True)

    def _run(self, backend, prep, *, with_vjp: bool):
        """The forward (and, with ``with_vjp``, its VJP) on a NumPy-framework backend."""
        if prep.state is not None:
            return self._run_state(backend, prep, with_vjp=with_vjp)
        call = prep.call
        dtype = np.dtype(call.dtype)
        inputs = _core.core_inputs(
            OPS, prep.q, prep.k, prep.v, prep.query_mask, prep.key_mask, normalize=prep.normalize, checked=True
        )
        query_mask, key_mask = inputs.query_mask, inputs.key_mask
        options = dict(hash_bits=call.hash_bits, causal=call.causal)
        forward, backward = (_core.forward, _core.backward) if backend.framework == "numpy" else _JAX_CORE
        y, codes = forward(
            backend,
            inputs.q,
            inputs.k,
            inputs.v,
            prep.planes,
            query_mask,
            key_mask,
            mode=call.mode,
            hashing=call.hashing,
            num_hashes=call.num_hashes,
            **options,
        )
        out_shape = prep.lead + (call.n_query, call.value_dim)
        with np.errstate(over="ignore"):  # an unnormalised result beyond the dtype: yoso._validate.check_output
            out = _core.core_output(OPS, y, inputs, normalize=prep.normalize).astype(dtype).reshape(out_shape)
        if not with_vjp:
            return out

        def vjp(cotangent):
            grad = _core_cotangent(cotangent, prep, y, query_mask)
            dq_unit, dk_unit, dv = backward(
                backend,
                inputs.q,
                inputs.k,
                inputs.v,
                codes,
                query_mask,
                key_mask,
                grad,
                mode=call.mode,
                backward=call.backward,
                **options,
            )
            return _input_grads(prep, inputs, dq_unit, dk_unit, dv)

        return out, vjp

    def _run_state(self, backend, prep, *, with_vjp: bool):
        """A call continuing or returning a recurrent state (docs/math.md#recurrent-state).

        With ``output_final_state``, ``vjp`` takes ``(cotangent of out, cotangent of the state)`` (the latter a
        :class:`yoso.State` whose tables may be None, or None); with ``initial_state`` it returns
        ``(dq, dk, dv, d_state)``, ``d_state`` a :class:`yoso.State` (planes None: they get no gradient).
        """
        from ._state import State

        call, spec = prep.call, prep.state
        dtype = np.dtype(call.dtype)
        # The shared normalisations (zero rows as masked rows, directions only), without rescaling v: the
        # tables carry v's own scale from call to call.
        inputs = _core.core_inputs(
            OPS, prep.q, prep.k, prep.v, prep.query_mask, prep.key_mask, normalize=False, checked=True
        )
        v = inputs.v
        q_unit, k_unit = inputs.q, inputs.k
        query_mask, key_mask = inputs.query_mask, inputs.key_mask
        forward, backward = (
            (_core.forward_state, _core.backward_state) if backend.framework == "numpy" else _JAX_STATE_CORE
        )
        y, tables, key_tables, codes = forward(
            backend,
            q_unit,
            k_unit,
            v,
            prep.planes,
            query_mask,
            key_mask,
            spec.tables,
            spec.key_tables,
            hashing=call.hashing,
            num_hashes=call.num_hashes,
            hash_bits=call.hash_bits,
            with_key_tables=spec.key_tables_out,
        )
        out_shape = prep.lead + (call.n_query, call.value_dim)
        out = _core.core_output(OPS, y, inputs, normalize=prep.normalize).astype(dtype).reshape(out_shape)
        lead = tuple(prep.lead)
        shapes = {"tables": lead + tables.shape[1:]}
        if key_tables is not None:
            shapes["key_tables"] = lead + key_tables.shape[1:]
        result = out
        if spec.output:
            state = State(
                tables=tables.reshape(shapes["tables"]),
                planes=spec.planes,
                key_tables=None if key_tables is None else key_tables.reshape(shapes["key_tables"]),
            )
            result = (out, state)
        if not with_vjp:
            return result

        def vjp(cotangent):
            grad_tables = grad_key_tables = None
            if spec.output:
                if not isinstance(cotangent, tuple) or len(cotangent) != 2:
                    raise TypeError(
                        "with output_final_state=True the cotangent is a pair (cotangent of out, cotangent of the "
                        "state: a yoso.State, or None)"
                    )
                cotangent, state_cotangent = cotangent
                if state_cotangent is not None:
                    grad_tables = _state_cotangent(state_cotangent.tables, "tables", shapes["tables"], 3, tables.dtype)
                    if state_cotangent.key_tables is not None and "key_tables" in shapes:
                        grad_key_tables = _state_cotangent(
                            state_cotangent.key_tables, "key_tables", shapes["key_tables"], 4, tables.dtype
                        )
            grad = _core_cotangent(cotangent, prep, y, query_mask)
            dq_unit, dk_unit, dv, d_tables, d_key_tables = backward(
                backend,
                q_unit,
                k_unit,
                v,
                codes,
                query_mask,
                key_mask,
                grad,
                grad_tables,
                grad_key_tables,
                spec.key_tables,
                has_tables=spec.tables is not None,
                backward=call.backward,
                hash_bits=call.hash_bits,
            )
            grads = _input_grads(prep, inputs, dq_unit, dk_unit, dv)
            if spec.tables is None:
                return grads
            d_state = State(
                tables=np.asarray(d_tables).reshape(lead + tuple(d_tables.shape[1:])),
                planes=None,
                key_tables=None
                if d_key_tables is None
                else np.asarray(d_key_tables).reshape(lead + tuple(d_key_tables.shape[1:])),
            )
            return grads + (d_state,)

        return result, vjp
