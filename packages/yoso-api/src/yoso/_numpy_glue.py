"""NumPy arrays in, NumPy arrays out; gradients through an explicit vector-Jacobian product.

NumPy has no autograd, so the chain rule around the backend's YOSO core is written here: the input
normalisations ``q/||q||``, ``k/||k||``, the optional output normalisation, the masks, and the
reduction over broadcast leading dims.
"""

from __future__ import annotations

import math

import numpy as np

from . import _core
from ._glue import Glue
from ._planes import check_seed, draw, rng_from_seed


def _accumulate_dtype(dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


class _Ops:
    """NumPy's array operations for the normalisations written once in ``yoso._core``."""

    @staticmethod
    def accumulate(x):
        return x.astype(_accumulate_dtype(x.dtype), copy=False)

    @staticmethod
    def cast(x, like):
        return x.astype(like.dtype, copy=False)

    @staticmethod
    def peak(x, dims: int):
        return np.max(np.abs(x), axis=tuple(range(-dims, 0)), keepdims=True)

    where = staticmethod(np.where)
    sqrt = staticmethod(np.sqrt)

    @staticmethod
    def sum_last(x):
        return np.sum(x, axis=-1, keepdims=True)

    @staticmethod
    def mantissa(x):
        return np.frexp(x)[0]

    @staticmethod
    def finite_rows(x):
        return np.isfinite(x).all(axis=-1)

    @staticmethod
    def any_last(x):
        return x.any(axis=-1)

    @staticmethod
    def all_finite(x):
        return np.isfinite(x).all()


OPS = _Ops()


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


def _jax_forward(backend, q, k, v, planes, query_mask, key_mask, *, mode, hashing, num_hashes, hash_bits, causal):
    """:func:`yoso._core.forward` on a backend that computes on JAX arrays: its compiled core on padded,
    zero-copy views of the NumPy arrays."""
    from . import _jax_glue as jg

    pad = _core.Padding(q.shape[0], q.shape[1], k.shape[1], full=_full)
    arrays = (
        pad.rows(q, pad.QUERIES),
        pad.rows(k, pad.KEYS),
        pad.rows(v, pad.KEYS),
        pad.planes(planes),
        pad.mask(query_mask, pad.QUERIES, q),
        pad.mask(key_mask, pad.KEYS, q),
    )
    config = jg.core_config(backend.name, mode, hashing, num_hashes, hash_bits, causal, "lower_bound")
    y, q_codes, k_codes = (np.asarray(a) for a in jg.core_forward(*map(jg.from_host, arrays), config=config))
    codes = None if mode == "expectation" else (q_codes, k_codes)  # padded: the backward pads the same way
    return pad.cut(y, pad.QUERIES), codes


def _jax_backward(backend, q, k, v, codes, query_mask, key_mask, grad, *, mode, backward, hash_bits, causal):
    from . import _jax_glue as jg

    pad = _core.Padding(q.shape[0], q.shape[1], k.shape[1], full=_full)
    empty = np.zeros((0,), np.int32)
    q_codes, k_codes = (empty, empty) if codes is None else codes
    arrays = (
        pad.rows(grad, pad.QUERIES),
        pad.rows(q, pad.QUERIES),
        pad.rows(k, pad.KEYS),
        pad.rows(v, pad.KEYS),
        q_codes,
        k_codes,
        pad.mask(query_mask, pad.QUERIES, q),
        pad.mask(key_mask, pad.KEYS, q),
    )
    config = jg.core_config(backend.name, mode, "gaussian", 0, hash_bits, causal, backward)
    dq, dk, dv = (np.asarray(a) for a in jg.core_backward(*map(jg.from_host, arrays), config=config))
    return pad.cut(dq, pad.QUERIES), pad.cut(dk, pad.KEYS), pad.cut(dv, pad.KEYS)


_JAX_CORE = (_jax_forward, _jax_backward)


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
        return draw(shape, hashing, rng_from_seed(seed))

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
            cotangent = np.asarray(cotangent)
            if cotangent.shape != out_shape:
                raise ValueError(
                    f"the cotangent must have the output's shape {list(out_shape)}, got {list(cotangent.shape)}"
                )
            grad = cotangent.reshape(call.batch, call.n_query, call.value_dim).astype(y.dtype)
            grad = unit_rows_vjp(y, grad) if prep.normalize else grad  # the chain rule of core_output
            grad = _keep_rows(grad, query_mask)
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
            grads = (
                _keep_rows(unit_rows_vjp(inputs.q_kept, dq_unit), query_mask),
                _keep_rows(unit_rows_vjp(inputs.k_kept, dk_unit), key_mask),
                _keep_rows(dv if inputs.scale is None else _core._divide(OPS, dv, inputs.scale), key_mask),
            )
            return tuple(
                _unbroadcast(g.reshape(prep.lead + tuple(shape[-2:])), shape).astype(dtype)
                for g, shape in zip(grads, prep.shapes)
            )

        return out, vjp
