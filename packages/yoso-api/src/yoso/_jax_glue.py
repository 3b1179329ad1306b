"""JAX arrays in, JAX arrays out: ``jax.jit``, ``jax.vmap`` and ``jax.grad`` -- once, for every backend.

Why this lives in yoso-api, next to the NumPy and torch glue, and not in yoso-jax: the glue is the
API's half of the contract -- argument checking, drawing hash functions, the normalisations and masks
around the core, the chain rule -- and it must behave the same whichever backend computes. One
package holding all framework glue is one place to read and to fix, and any future backend that
computes on JAX arrays gets jit/vmap/grad without copying this file. yoso-api imports jax only when
it is handed JAX arrays.

How it composes with JAX:

* The whole call is one ``jax.custom_vjp`` function, so ``jax.grad``/``jax.vjp`` use the backend's
  estimators (the ``backward`` argument) for the YOSO core (``yoso._core.forward/backward``), never
  autodiff through hashing. Everything around the core -- unit rows, masks, output normalisation,
  broadcasting, dtype casts -- is plain ``jax.numpy``, which the backward differentiates with ``jax.vjp``
  after recomputing it (the forward keeps only the caller's arrays, the core's output and the codes).
* The whole call is one ``jax.jit`` function whose static arguments are the hyperparameters; inside a
  user's ``jax.jit`` it is inlined, eagerly it is one compiled program (no op-by-op dispatch).
* Hyperparameters (``num_hashes``, ``hash_bits``, ``mode``, ``hashing``, ``backward``, ``causal``,
  ``normalize``, ``seed``) must be Python values; a traced one is refused naming the argument.
* Randomness: ``key=`` (a JAX PRNG key, traceable: fresh hash functions per step under jit),
  ``seed=`` (NumPy draw, identical to every other framework), or ``planes=``. ``seed=None`` without a
  key draws from NumPy's entropy when the Python code runs; under ``jax.jit``/``jax.vmap`` that would
  be once per trace, silently reused by every call of the compiled function, so it is refused there.
* Value checks (NaN/inf in unmasked rows, bad planes) need the values: they run when the inputs are
  concrete (eager calls, also under an eager ``jax.grad``) and are skipped for abstract tracers (inside
  ``jax.jit`` and ``jax.vmap``), where raising on data is impossible without breaking the trace.

Precision: the normalisations and the core's output are float32 for half-precision inputs (float64 for
float64, which needs ``jax_enable_x64``); the result is cast back to the input dtype at the end.
"""

from __future__ import annotations

import atexit
import functools
import math
import os
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from . import _core, backends
from ._glue import Glue
from ._planes import check_seed, draw_for_seed

_PLATFORMS = {"gpu": "cuda"}  # JAX's platform names -> the device types of yoso's Call


def _accumulate_dtype(dtype):
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


OPS = _core.ArrayOps(jnp, _accumulate_dtype, no_grad=jax.lax.stop_gradient)  # for yoso._core


def _unit(x):
    """``x / ||x||`` over the last axis in the accumulation dtype, direction only; zero rows stay zero
    (gradient 0: the square root only ever sees non-zero values)."""
    return _core.unit_rows(OPS, OPS.accumulate(x))[0]


def _keep_rows(x, mask):
    return x if mask is None else jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))


def _concrete(x):
    """The value of ``x`` if it is known now (a concrete array, or a tracer of an eager ``jax.grad``),
    else None (inside ``jax.jit``/``jax.vmap``)."""
    if isinstance(x, jax.core.Tracer):
        to_concrete = getattr(x, "to_concrete_value", None)  # absent in other JAX versions: treat as abstract
        return to_concrete() if to_concrete is not None else None
    return x


class _Flat:
    """An array and the canonical ``[B, ...]`` shape it takes, materialised inside the jitted call.

    ``prepare`` flattens every input; done eagerly, each broadcast/reshape would be a separate XLA
    program compiled per shape (most of the cost of a first call on small inputs). Carrying the
    layout instead lets the one jitted program do it.
    """

    __slots__ = ("array", "lead", "tail")

    def __init__(self, array, lead, tail):
        self.array, self.lead, self.tail = array, tuple(lead), tuple(tail)

    @property
    def layout(self) -> tuple:
        return self.lead, self.tail

    def resolve(self, array=None):
        array = self.array if array is None else array
        return _apply_layout(array, self.layout)


def _as_flat(x) -> _Flat:
    return x if isinstance(x, _Flat) else _Flat(x, (x.shape[0],), tuple(x.shape[1:]))


def _apply_layout(array, layout):
    lead, tail = layout
    return jnp.broadcast_to(array, lead + tail).reshape((math.prod(lead),) + tail)


def _arrays_and_layouts(items):
    """``(arrays, layouts)`` of a list of :class:`_Flat` or None, for a jitted function's dynamic and static args."""
    arrays = tuple(None if f is None else f.array for f in items)
    layouts = tuple(None if f is None else f.layout for f in items)
    return arrays, layouts


def _resolve_all(arrays, layouts):
    return [None if a is None else _apply_layout(a, layout) for a, layout in zip(arrays, layouts)]


def _device_type(x) -> str:
    if isinstance(x, np.ndarray):
        return "cpu"
    if isinstance(x, jax.core.Tracer):  # placed by the enclosing jit: the default backend
        platform = jax.default_backend()
    else:
        platform = next(iter(x.devices())).platform
    return _PLATFORMS.get(platform, platform)


# ---- the whole call: one custom_vjp around yoso._core and the normalisations ------------------------


@dataclass(frozen=True)
class _Config:
    """The static part of a call: hashable, so that jax.jit caches one program per configuration."""

    backend: str
    mode: str
    hashing: str
    num_hashes: int
    hash_bits: int
    causal: bool
    backward: str
    normalize: bool


def _core_fwd(q, k, v, planes, query_mask, key_mask, config):
    backend = backends.get(config.backend)
    y, codes = _core.forward(
        backend,
        q,
        k,
        v,
        planes,
        query_mask,
        key_mask,
        mode=config.mode,
        hashing=config.hashing,
        num_hashes=config.num_hashes,
        hash_bits=config.hash_bits,
        causal=config.causal,
    )
    y = y.astype(_accumulate_dtype(q.dtype))
    return y, (q, k, v, codes, query_mask, key_mask, planes)


def _core_bwd(config, residuals, grad):
    q, k, v, codes, query_mask, key_mask, planes = residuals
    dq, dk, dv = _core.backward(
        backends.get(config.backend),
        q,
        k,
        v,
        codes,
        query_mask,
        key_mask,
        grad,
        mode=config.mode,
        backward=config.backward,
        hash_bits=config.hash_bits,
        causal=config.causal,
    )
    # The hash codes are piecewise constant in the planes: their gradient is zero almost everywhere.
    d_planes = None if planes is None else jnp.zeros_like(planes)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_planes, None, None


def _whole_call(q, k, v, planes, query_mask, key_mask, *, config: _Config, checked: bool, layouts=None):
    """The whole attention: normalisations, core, output normalisation, on canonical arrays ``[B, N, D]`` or,
    with ``layouts``, on the caller's arrays and the canonical layouts they take (:func:`_apply_layout`)."""
    return _lean_call(q, k, v, planes, query_mask, key_mask, config, checked, layouts)


# The whole call is one custom_vjp too, for memory: differentiated by JAX, the normalisations around the core
# would keep ~14 arrays of q's size between the passes (unit rows, rescaled rows, selection masks: B*H = 8,
# N = 4096, D = 64: 98 MiB for an 8 MiB q, as outputs of the forward program when it is not inlined into one
# program with the backward, i.e. under an eager jax.grad or jax.vjp). Here the forward keeps the caller's
# arrays, the core's output Y and the hash codes (10 MiB there), and the backward recomputes the normalisations,
# O(N * D) against its O(N * m * D * Dv).


def _canonical(arrays, layouts):
    return tuple(arrays) if layouts is None else tuple(_resolve_all(arrays, layouts))


def _inputs(q, k, v, planes, query_mask, key_mask, config: _Config, checked: bool):
    return _core.core_inputs(OPS, q, k, v, query_mask, key_mask, planes, normalize=config.normalize, checked=checked)


def _output(y, inputs: _core.CoreInputs, config: _Config, dtype):
    return _core.core_output(OPS, y, inputs, normalize=config.normalize).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _lean_call(q, k, v, planes, query_mask, key_mask, config, checked, layouts):
    return _lean_fwd(q, k, v, planes, query_mask, key_mask, config, checked, layouts)[0]


def _lean_fwd(q, k, v, planes, query_mask, key_mask, config, checked, layouts):
    arrays = (q, k, v, planes, query_mask, key_mask)
    cq, ck, cv, c_planes, c_query_mask, c_key_mask = _canonical(arrays, layouts)
    inputs = _inputs(cq, ck, cv, c_planes, c_query_mask, c_key_mask, config, checked)
    y, core_residuals = _core_fwd(inputs.q, inputs.k, inputs.v, c_planes, inputs.query_mask, inputs.key_mask, config)
    codes = core_residuals[3]
    return _output(y, inputs, config, q.dtype), (arrays, y, codes)


def _lean_bwd(config, checked, layouts, residuals, grad):
    arrays, y, codes = residuals
    _, _, _, c_planes, c_query_mask, c_key_mask = _canonical(arrays, layouts)

    def rows(q, k, v):  # the differentiable part of the normalisations; masks and scales ride along
        cq, ck, cv = _canonical((q, k, v, *arrays[3:]), layouts)[:3]
        inputs = _inputs(cq, ck, cv, c_planes, c_query_mask, c_key_mask, config, checked)
        return (inputs.q, inputs.k, inputs.v), inputs

    (uq, uk, uv), pull_rows, inputs = jax.vjp(rows, *arrays[:3], has_aux=True)
    (dy,) = jax.vjp(lambda y: _output(y, inputs, config, arrays[0].dtype), y)[1](grad)
    core_residuals = (uq, uk, uv, codes, inputs.query_mask, inputs.key_mask, None)
    duq, duk, duv, _, _, _ = _core_bwd(config, core_residuals, dy)
    dq, dk, dv = pull_rows((duq, duk, duv))
    # The hash codes are piecewise constant in the planes: their gradient is zero almost everywhere.
    d_planes = None if arrays[3] is None else jnp.zeros_like(arrays[3])
    return dq, dk, dv, d_planes, None, None


_lean_call.defvjp(_lean_fwd, _lean_bwd)


@functools.partial(jax.jit, static_argnames=("config", "layouts", "out_shape", "checked"))
def _attention(arrays, *, config: _Config, layouts, out_shape, checked: bool):
    return _whole_call(*arrays, config=config, checked=checked, layouts=layouts).reshape(out_shape)


# Serving other frameworks' arrays (torch tensors) in one compiled program per pass: the glue around the core
# (unit rows, masks, output normalisation) runs inside XLA with the core instead of as many small eager ops.


@functools.partial(jax.jit, static_argnames=("config", "checked"))
def whole_forward(q, k, v, planes, query_mask, key_mask, *, config: _Config, checked: bool):
    """``(output,)`` of a call without gradients, on canonical arrays."""
    return (_whole_call(q, k, v, planes, query_mask, key_mask, config=config, checked=checked),)


@functools.partial(jax.jit, static_argnames=("config", "checked"))
def whole_forward_kept(q, k, v, planes, query_mask, key_mask, *, config: _Config, checked: bool):
    """``(output, Y, q_codes, k_codes)``: the output of a call with gradients, and what
    :func:`whole_backward` needs besides the inputs -- the core's output and the int32 codes (empty in
    expectation mode), for the caller to keep (twice q's size at D = Dv = 64, m = 32)."""
    out, (_, y, codes) = _lean_fwd(q, k, v, planes, query_mask, key_mask, config, checked, None)
    return (out, y, *_int32_codes(codes))


@functools.partial(jax.jit, static_argnames=("config", "checked"))
def whole_backward(q, k, v, planes, query_mask, key_mask, y, q_codes, k_codes, grad, *, config: _Config, checked):
    """``(dq, dk, dv)`` of :func:`whole_forward_kept`'s output for the cotangent ``grad``, from the inputs and
    what that kept (the normalisations recomputed, not the forward)."""
    codes = None if config.mode == "expectation" else (q_codes, k_codes)
    arrays = (q, k, v, planes, query_mask, key_mask)
    return _lean_bwd(config, checked, None, (arrays, y, codes), grad)[:3]


# ---- eager programs on several cores: batch rows in parts, one thread each ---------------------------------
#
# XLA:CPU runs a batched matmul of small matrices -- the lower bound's table form is made of them -- on one
# core, and one program's independent operations one after another. Two programs run concurrently from two
# threads, though (the call releases the GIL). Every row of a call is independent of the others, so an eager
# call on many rows runs as equal parts of the batch, one thread each: on 2 cores, B*H = 8, N = 16k, the table
# form's dq, dk took 11.1 s as one program and 7.5 s as two halves (docs/architecture.md#using-every-core).
# Inside a caller's jax.jit there is one program, and this does not apply.

PART_TOKENS = 1 << 14  # rows are split only into parts of at least this many query tokens (threads cost ~0.1 ms)
_parts_pool = None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def row_parts(batch: int, tokens_per_row: int) -> int:
    """How many equal parts of the batch rows an eager call runs as: the largest divisor of ``batch`` within
    the cores, with parts of at least :data:`PART_TOKENS` tokens (1: one program)."""
    most = min(_cores(), batch * tokens_per_row // PART_TOKENS)
    return max([p for p in range(1, max(1, most) + 1) if batch % p == 0])


def in_row_parts(program, host_arrays, **static):
    """``program(*host_arrays, **static)`` (a function of JAX arrays returning a tuple of them, each with the batch
    first), run as equal parts of the batch rows concurrently (:func:`row_parts`) and the parts' results
    concatenated. The host arrays (NumPy arrays, CPU torch tensors) are cut into parts before they are handed
    over, so each part is a view, not a copy; those whose first axis is not the batch (planes shared by every row,
    empty codes) and None go to every part whole."""
    global _parts_pool
    batch, n_query = host_arrays[0].shape[:2]
    parts = row_parts(batch, n_query)
    if parts == 1:
        return program(*map(from_host, host_arrays), **static)
    size = batch // parts

    def rows_of(x, i):
        return x[i * size : (i + 1) * size] if x is not None and x.ndim and x.shape[0] == batch else x

    def part(i):
        return jax.block_until_ready(program(*(from_host(rows_of(x, i)) for x in host_arrays), **static))

    if _parts_pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _parts_pool = ThreadPoolExecutor(max_workers=max(1, _cores() - 1), thread_name_prefix="yoso-parts")
    others = [_parts_pool.submit(part, i) for i in range(1, parts)]
    results = [list(part(0))] + [list(f.result()) for f in others]
    joined = []
    for _ in range(len(results[0])):  # one result at a time, its parts released as the next is joined
        outs = [r.pop(0) for r in results]
        joined.append(jnp.concatenate(outs) if outs[0].ndim and outs[0].shape[0] else outs[0])
    return tuple(joined)


def _int32_codes(codes):
    if codes is None:
        empty = jnp.zeros((0,), jnp.int32)
        return empty, empty
    return codes[0].astype(jnp.int32), codes[1].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("layouts", "hashing", "n_rows", "n_masks", "n_sums"))
def _value_flags(arrays, *, layouts, hashing, n_rows: int, n_masks: int, n_sums: int):
    """One program for all checks: per (rows, mask) pair the count and first flat index of unmasked rows
    holding NaN/inf, then "planes not finite" and "Hadamard planes not ±1", then "mask all False" per mask;
    and the largest column sum of |x| per (x, mask) pair of ``sums``."""
    resolved = _resolve_all(arrays, layouts)
    pairs, planes = resolved[: 2 * n_rows], resolved[2 * n_rows]
    masks = resolved[2 * n_rows + 1 : 2 * n_rows + 1 + n_masks]
    summed = resolved[2 * n_rows + 1 + n_masks :]
    column_sums = [
        jnp.abs(OPS.accumulate(_keep_rows(x, mask))).sum(axis=-2).max() for x, mask in zip(summed[::2], summed[1::2])
    ]
    flags = []
    for x, mask in zip(pairs[::2], pairs[1::2]):
        bad = ~jnp.isfinite(x).all(axis=-1)
        bad = bad if mask is None else bad & mask
        flags += [bad.sum(), jnp.argmax(bad.ravel())]
    no = jnp.zeros((), dtype=bool)
    flags.append(no if planes is None else ~jnp.isfinite(planes).all())
    flags.append(no if planes is None or hashing != "hadamard" else ~((planes == 1) | (planes == -1)).all())
    flags += [~mask.any() for mask in masks]
    sums = jnp.stack(column_sums) if column_sums else jnp.zeros((0,), jnp.float32)
    return jnp.stack([jnp.asarray(f, dtype=jnp.int32) for f in flags]), sums


# ---- the recurrent state: one custom_vjp around yoso._core.forward_state/backward_state ------------------


@dataclass(frozen=True)
class _StateConfig:
    """The static part of a call continuing or returning a state (causal YOSO-m only)."""

    backend: str
    hashing: str
    num_hashes: int
    hash_bits: int
    backward: str
    normalize: bool
    has_tables: bool  # initial tables given
    has_key_tables: bool  # initial key tables given
    key_tables_out: bool  # differentiable_state


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _core_state_vjp(q, k, v, planes, query_mask, key_mask, tables, key_tables, config):
    """``(Y, tables', key_tables')`` of one causal chunk continuing ``tables`` (docs/math.md#recurrent-state)."""
    return _core_state_fwd(q, k, v, planes, query_mask, key_mask, tables, key_tables, config)[0]


def _core_state_fwd(q, k, v, planes, query_mask, key_mask, tables, key_tables, config):
    y, new_tables, new_key_tables, codes = _core.forward_state(
        backends.get(config.backend),
        q,
        k,
        v,
        planes,
        query_mask,
        key_mask,
        tables,
        key_tables,
        hashing=config.hashing,
        num_hashes=config.num_hashes,
        hash_bits=config.hash_bits,
        with_key_tables=config.key_tables_out,
    )
    y = y.astype(_accumulate_dtype(q.dtype))
    return (y, new_tables, new_key_tables), (q, k, v, codes, query_mask, key_mask, planes, key_tables)


def _core_state_bwd(config, residuals, cotangents):
    q, k, v, codes, query_mask, key_mask, planes, key_tables = residuals
    grad, grad_tables, grad_key_tables = cotangents
    if config.has_tables and config.backward == "exact":
        raise ValueError(
            "gradients through a call continuing initial_state need backward='lower_bound': the sampled true "
            "gradient (backward='exact') has no table form for the keys of earlier chunks"
        )
    if config.has_tables and not config.has_key_tables:
        raise ValueError(
            "gradients through a call continuing initial_state need the key tables of the earlier chunks (the "
            "lower bound's terms between queries and earlier keys), and the state has none: pass "
            "differentiable_state=True to every call producing the state, or differentiate a function that "
            "does not continue one (jax.lax.stop_gradient does not help: q and k of this chunk need them)"
        )
    dq, dk, dv, d_tables, d_key_tables = _core.backward_state(
        backends.get(config.backend),
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
        has_tables=config.has_tables,
        backward=config.backward,
        hash_bits=config.hash_bits,
    )
    d_planes = None if planes is None else jnp.zeros_like(planes)
    cast = (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype))
    return (*cast, d_planes, None, None, d_tables, d_key_tables)


_core_state_vjp.defvjp(_core_state_fwd, _core_state_bwd)


@functools.partial(jax.jit, static_argnames=("config", "layouts", "out_shape", "lead", "checked"))
def _attention_state(arrays, *, config: _StateConfig, layouts, out_shape, lead, checked: bool):
    q, k, v, planes, query_mask, key_mask, tables, key_tables = _resolve_all(arrays, layouts)
    # The shared normalisations (zero rows as masked rows, directions only), without rescaling v: the
    # tables carry v's own scale from call to call.
    inputs = _core.core_inputs(OPS, q, k, v, query_mask, key_mask, planes, normalize=False, checked=checked)
    y, new_tables, new_key_tables = _core_state_vjp(
        inputs.q, inputs.k, inputs.v, planes, inputs.query_mask, inputs.key_mask, tables, key_tables, config
    )
    out = _core.core_output(OPS, y, inputs, normalize=config.normalize)
    new_tables = new_tables.reshape(lead + new_tables.shape[1:])
    if new_key_tables is not None:
        new_key_tables = new_key_tables.reshape(lead + new_key_tables.shape[1:])
    return out.astype(q.dtype).reshape(out_shape), new_tables, new_key_tables


def state_config(
    backend: str,
    hashing: str,
    num_hashes: int,
    hash_bits: int,
    backward: str,
    *,
    has_tables,
    has_key_tables,
    key_tables_out,
):
    return _StateConfig(
        backend=backend,
        hashing=hashing,
        num_hashes=num_hashes,
        hash_bits=hash_bits,
        backward=backward,
        normalize=False,
        has_tables=has_tables,
        has_key_tables=has_key_tables,
        key_tables_out=key_tables_out,
    )


@functools.partial(jax.jit, static_argnames=("config",))
def core_forward_state(q, k, v, planes, query_mask, key_mask, tables, key_tables, *, config: _StateConfig):
    """``(Y, q_codes, k_codes, tables', key_tables')`` of unit rows: yoso._core.forward_state, compiled (for
    NumPy and torch callers)."""
    (y, new_tables, new_key_tables), residuals = _core_state_fwd(
        q, k, v, planes, query_mask, key_mask, tables, key_tables, config
    )
    q_codes, k_codes = residuals[3]
    return y, q_codes.astype(jnp.int32), k_codes.astype(jnp.int32), new_tables, new_key_tables


@functools.partial(jax.jit, static_argnames=("config",))
def core_backward_state(
    grad, grad_tables, grad_key_tables, q, k, v, q_codes, k_codes, query_mask, key_mask, key_tables, *, config
):
    """``(dq, dk, dv, d_tables, d_key_tables)`` of :func:`core_forward_state`: yoso._core.backward_state, compiled."""
    residuals = (q, k, v, (q_codes, k_codes), query_mask, key_mask, None, key_tables)
    dq, dk, dv, _, _, _, d_tables, d_key_tables = _core_state_bwd(
        config, residuals, (grad, grad_tables, grad_key_tables)
    )
    return dq, dk, dv, d_tables, d_key_tables


# ---- serving NumPy arrays and torch tensors ----------------------------------------------------------
#
# A backend that computes on JAX arrays (``jax``) also serves NumPy and CPU torch callers: their glue keeps
# its own normalisations and autograd, and runs the YOSO core here -- the inputs handed over without a
# copy (DLPack for torch, a device_put for NumPy), the whole core one compiled program per direction.


def whole_config(backend: str, call, *, normalize: bool) -> _Config:
    """The configuration of a whole call (:func:`_attention`, :func:`whole_forward`) for a
    :class:`yoso.backends.Call`."""
    return _Config(
        backend=backend,
        mode=call.mode,
        hashing=call.hashing,
        num_hashes=call.num_hashes,
        hash_bits=call.hash_bits,
        causal=call.causal,
        backward=call.backward,
        normalize=normalize,
    )


def core_config(backend: str, mode: str, hashing: str, num_hashes: int, hash_bits: int, causal: bool, backward: str):
    """The configuration of :func:`core_forward` / :func:`core_backward` (no output normalisation: the
    caller's glue applies it)."""
    return _Config(
        backend=backend,
        mode=mode,
        hashing=hashing,
        num_hashes=num_hashes,
        hash_bits=hash_bits,
        causal=causal,
        backward=backward,
        normalize=False,
    )


@functools.partial(jax.jit, static_argnames=("config",))
def core_forward(q, k, v, planes, query_mask, key_mask, *, config: _Config):
    """``(Y, q_codes, k_codes)`` of unit rows (codes empty in expectation mode): yoso._core.forward, compiled."""
    y, residuals = _core_fwd(q, k, v, planes, query_mask, key_mask, config)
    return (y, *_int32_codes(residuals[3]))


@functools.partial(jax.jit, static_argnames=("config",))
def core_backward(grad, q, k, v, q_codes, k_codes, query_mask, key_mask, *, config: _Config):
    """``(dq, dk, dv)`` of :func:`core_forward`'s ``Y``: yoso._core.backward, compiled."""
    codes = None if config.mode == "expectation" else (q_codes, k_codes)
    dq, dk, dv, _, _, _ = _core_bwd(config, (q, k, v, codes, query_mask, key_mask, None), grad)
    return dq, dk, dv


SMALL_BYTES = 1 << 20  # below this, a copy costs less than a DLPack import (~50 us each)


def from_host(x):
    """A NumPy array or CPU torch tensor as a JAX array on the CPU (or, when small, as a NumPy array, which a
    compiled function takes as it is), without a copy where it matters: large tensors through DLPack."""
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        return x if x.nbytes < SMALL_BYTES else jax.device_put(x, jax.devices("cpu")[0])
    x = x.detach().contiguous()
    if not shared_with_jax(x):
        return x.numpy()  # a view: the compiled function copies it in its fast argument path
    _let_jax_release_torch_memory_before_exit()
    return jax.dlpack.from_dlpack(x)


EXIT_GRACE_SECONDS = 0.05


@functools.cache
def _let_jax_release_torch_memory_before_exit() -> None:
    """Registered once, at the first torch tensor handed to JAX by DLPack: at exit, release the GIL briefly.

    Why: JAX frees a buffer that views torch memory on whichever thread drops it last -- often the worker
    thread that ran the program, just after the output is ready. Freeing it calls torch's DLPack deleter,
    which needs the GIL. A script that ends a few milliseconds after its last call holds the GIL into
    interpreter finalization, and a thread that asks for the GIL then is ended by CPython in a way C++
    cannot unwind: "terminate called without an active exception", exit status 134 (seen in about one in
    three such scripts). atexit handlers run before finalization, so sleeping there lets a waiting worker
    take the GIL and finish. (A user's JAX arrays viewing torch memory are freed on the main thread.)
    """
    atexit.register(time.sleep, EXIT_GRACE_SECONDS)


def shared_with_jax(x) -> bool:
    """Whether :func:`from_host` hands this torch tensor over by DLPack. The JAX array is then a view of the
    tensor's memory when that is 64-byte aligned, as torch allocates it; JAX copies other tensors (e.g.
    ``torch.from_numpy`` of NumPy's 16-byte aligned arrays) on every crossing."""
    return x.nbytes >= SMALL_BYTES or x.dtype == torch_bfloat16()


@functools.cache
def torch_bfloat16():
    import torch

    return torch.bfloat16


# ---- the glue object used by yoso.attention -------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("backend", "layouts", "hashing", "num_hashes", "hash_bits", "checked"))
def _hash_codes(arrays, *, backend: str, layouts, hashing: str, num_hashes: int, hash_bits: int, checked: bool):
    x, planes = _resolve_all(arrays, layouts)
    codes = backends.get(backend).hash_codes(
        _unit(x).astype(x.dtype), planes, hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits
    )
    codes = codes.astype(jnp.int32)
    if not checked:  # traced: a row holding NaN/inf gets code -1, never a plausible one
        bad = ~OPS.finite_rows(x)
        if planes is not None:
            bad = bad | ~OPS.all_finite(planes)
        codes = jnp.where(bad[:, None, :], -1, codes)
    return codes.transpose(0, 2, 1)


class JaxGlue(Glue):
    name = "jax"

    @staticmethod
    def owns(x) -> bool:
        return isinstance(x, jax.Array)

    @staticmethod
    def describe(x):
        return tuple(x.shape), np.dtype(x.dtype).name, _device_type(x)

    @staticmethod
    def requires_grad(*arrays) -> bool:
        # A traced call may be differentiated; JAX does not say in advance.
        return any(isinstance(x, jax.core.Tracer) for x in arrays)

    @staticmethod
    def check_static(values: dict) -> None:
        for name, value in values.items():
            if isinstance(value, jax.core.Tracer):
                hint = (
                    "; for hash functions that change per call inside jax.jit, pass key=jax.random.key(...)"
                    if name == "seed"
                    else ""
                )
                raise TypeError(
                    f"{name} must be a static Python value, got a traced JAX value ({type(value).__name__}): "
                    f"under jax.jit mark it static (static_argnums/static_argnames) or close over it{hint}"
                )

    @staticmethod
    def asarray(x, like=None):
        return jnp.asarray(x)

    @staticmethod
    def planes_array(planes, like):
        dtype = _accumulate_dtype(like.dtype)
        if isinstance(planes, np.ndarray):  # convert on the host: no XLA program per shape
            return jnp.asarray(np.asarray(planes, dtype=np.dtype(dtype)))
        return planes.astype(dtype)

    @staticmethod
    def flatten(x, lead, tail):
        return _Flat(x, lead, tail)  # materialised inside the jitted call (see _Flat)

    @staticmethod
    def check_randomness(*, seed, generator, key, like):
        if generator is not None:
            raise TypeError("generator= is a torch.Generator, for torch tensors; with JAX arrays pass key= or seed=")
        check_seed(seed)
        if key is not None:
            if seed is not None:
                raise ValueError("pass either seed= or key=, not both")
            _check_key(key)

    @staticmethod
    def draw_planes(shape, *, hashing, seed, generator, key, like):
        dtype = _accumulate_dtype(like.dtype)
        if key is not None:
            if hashing == "gaussian":
                return jax.random.normal(key, shape, dtype=dtype)
            return jax.random.rademacher(key, shape, dtype=dtype)
        if seed is None and _concrete(like) is None:
            raise ValueError(
                "seed=None draws the hash functions in Python, which inside jax.jit/jax.vmap happens once per "
                "trace and would be reused by every call of the compiled function; pass key=jax.random.key(...) "
                "for fresh hash functions per call (or seed=/planes= for fixed ones)"
            )
        # An int seed gives the same hash functions for every framework, device and backend.
        return jnp.asarray(np.asarray(draw_for_seed(shape, hashing, seed), dtype=np.dtype(dtype)))

    @staticmethod
    def value_flags(rows: dict, *, planes, hashing, masks: dict, sums: dict | None = None):
        sums = sums or {}
        items = [f for pair in rows.values() for f in pair] + [planes] + list(masks.values())
        items += [f for pair in sums.values() for f in pair]
        flats = [None if f is None else _as_flat(f) for f in items]
        values = [None if f is None else _concrete(f.array) for f in flats]
        if any(f is not None and value is None for f, value in zip(flats, values)):
            return None  # abstract (inside jit/vmap): data-dependent errors are impossible; the glue poisons
        # The concrete values, not the tracers of an eager jax.grad/jax.vjp: the flags are read on the host.
        flats = [None if f is None else _Flat(value, f.lead, f.tail) for f, value in zip(flats, values)]
        arrays, layouts = _arrays_and_layouts(flats)
        counts = dict(n_rows=len(rows), n_masks=len(masks), n_sums=len(sums))
        found, column_sums = jax.device_get(_value_flags(arrays, layouts=layouts, hashing=hashing, **counts))
        found = iter(np.asarray(found).tolist())
        flags = {name: (next(found), next(found)) for name in rows}
        flags["planes"], flags["planes_pm1"] = bool(next(found)), bool(next(found))
        flags.update({name: bool(next(found)) for name in masks})
        flags.update(zip(("sum:" + name for name in sums), np.asarray(column_sums).tolist()))
        return flags

    @staticmethod
    def same_values(a, b):
        values = [_concrete(f.array) for f in (a, b)]
        if any(x is None for x in values):
            return None  # inside jax.jit: the state is trusted
        canonical = []
        for x, f in zip(values, (a, b)):
            x = np.asarray(x)
            lead = f.lead if f.lead else x.shape[: x.ndim - len(f.tail)]
            canonical.append(np.broadcast_to(x, tuple(lead) + f.tail).reshape((-1,) + f.tail))
        shape = np.broadcast_shapes(*(c.shape for c in canonical))
        return bool(np.array_equal(*(np.broadcast_to(c, shape) for c in canonical)))

    @staticmethod
    def take(x, index, axis):
        return jnp.take(x, jnp.asarray(index, jnp.int32), axis=axis)

    moveaxis = staticmethod(jnp.moveaxis)
    broadcast_to = staticmethod(jnp.broadcast_to)
    logical_and = staticmethod(jnp.logical_and)

    @staticmethod
    def host_ints(x):
        if isinstance(x, jax.Array):
            x = _concrete(x)
            return None if x is None else np.asarray(x)
        return np.asarray(x)

    @staticmethod
    def state_grads_needed(q, k, tables, requires_grad):
        return False  # JAX does not say ahead; the backward refuses when it is traced (_core_state_bwd)

    @staticmethod
    def hash_codes(backend, prep):
        call = prep.call
        arrays, layouts = _arrays_and_layouts([prep.x, prep.planes])
        codes = _hash_codes(
            arrays,
            backend=backend.name,
            layouts=layouts,
            hashing=call.hashing,
            num_hashes=call.num_hashes,
            hash_bits=call.hash_bits,
            checked=prep.checked,
        )
        return codes.reshape(prep.lead + (call.n_query, call.num_hashes))

    @staticmethod
    def attention(backend, prep):
        if prep.state is not None:
            return JaxGlue._attention_state(backend, prep)
        call = prep.call
        config = whole_config(backend.name, call, normalize=prep.normalize)
        arrays, layouts = _arrays_and_layouts([prep.q, prep.k, prep.v, prep.planes, prep.query_mask, prep.key_mask])
        out_shape = prep.lead + (call.n_query, call.value_dim)
        return _attention(arrays, config=config, layouts=layouts, out_shape=out_shape, checked=prep.checked)

    @staticmethod
    def _attention_state(backend, prep):
        from ._state import State

        call, spec = prep.call, prep.state
        config = _StateConfig(
            backend=backend.name,
            hashing=call.hashing,
            num_hashes=call.num_hashes,
            hash_bits=call.hash_bits,
            backward=call.backward,
            normalize=prep.normalize,
            has_tables=spec.tables is not None,
            has_key_tables=spec.key_tables is not None,
            key_tables_out=spec.key_tables_out,
        )
        items = [prep.q, prep.k, prep.v, prep.planes, prep.query_mask, prep.key_mask, spec.tables, spec.key_tables]
        arrays, layouts = _arrays_and_layouts(items)
        out, tables, key_tables = _attention_state(
            arrays,
            config=config,
            layouts=layouts,
            out_shape=prep.lead + (call.n_query, call.value_dim),
            lead=tuple(prep.lead),
            checked=prep.checked,
        )
        if not spec.output:
            return out
        return out, State(tables=tables, planes=spec.planes, key_tables=key_tables)


def _check_key(key) -> None:
    """A single JAX PRNG key: a typed key (``jax.random.key``) or a raw uint32 one (``jax.random.PRNGKey``)."""
    expected = "a JAX PRNG key (jax.random.key(0) or jax.random.PRNGKey(0))"
    if not isinstance(key, jax.Array):
        raise TypeError(f"key must be {expected}, got {type(key).__name__}")
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(
                f"key must be a single PRNG key, got an array of keys of shape {list(key.shape)}; "
                "to draw per example, jax.vmap over the keys"
            )
        return
    if key.dtype == jnp.uint32 and key.ndim == 1 and key.shape[0] in (2, 4):
        return  # a raw key of the threefry (2 words) or rbg (4 words) implementation
    raise TypeError(f"key must be {expected}, got a {np.dtype(key.dtype).name} array of shape {list(key.shape)}")
