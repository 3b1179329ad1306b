"""Sequence parallelism in JAX: ``yoso.attention(q, k, v, ..., axis_name="sp")`` inside ``jax.shard_map``.

Each device holds its contiguous slice of the sequence along the mesh axis ``axis_name`` (devices in axis
order); the result is its slice of the full-sequence result, and ``jax.grad`` gives its slice of the
gradients. The composition is ``yoso_parallel._composition`` (framework-neutral); this module is the
``jax`` engine of the ``yoso.parallel`` entry points (``check`` and ``attention``, see ``yoso._parallel``)
and supplies the collectives over the axis -- ``lax.psum``; exclusive prefix / suffix sums as a shift and
a log-step scan of ``lax.ppermute``; a ring shift, also ``lax.ppermute`` -- and wraps the core in one
``jax.custom_vjp`` inside one jitted program, like ``yoso._jax_glue`` does for one device (with its
helpers, ``yoso._parallel.glue_helpers("jax")``). Every device runs the same
program, so a causal ring computes (and masks out) the blocks that come after it too: the load is even,
the work not halved.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from yoso import backends
from yoso._parallel import SAME_HASHES, glue_helpers

from . import _composition as sp

jg = glue_helpers("jax")


@dataclass(frozen=True)
class Axis:
    """A checked ``axis_name=``: the axis and its size; ``mesh`` for whole arrays under ``jax.set_mesh``
    (None inside jax.shard_map, where the arrays are this device's slices)."""

    axis_name: str
    size: int
    mesh: object = None


def _varying(x, axis_name) -> bool:
    """Whether a JAX value differs along the mesh axis (shard_map's varying-axes type; False if untracked)."""
    if x is None or not isinstance(x, jax.Array):
        return False
    aval = jax.typeof(x)
    varying = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    if varying is None:
        varying = getattr(aval, "vma", frozenset())
    return axis_name in varying


def check(axis_name, *, planes, key, lengths) -> Axis:
    """The local rules of ``axis_name=``: a bound mesh axis (inside jax.shard_map, or of the mesh set for
    whole arrays, whose lengths must then split evenly), hash functions that do not vary along it."""
    if not isinstance(axis_name, str):
        raise TypeError(f"axis_name must be the name (str) of a jax.shard_map mesh axis, got {axis_name!r}")
    try:
        size = lax.axis_size(axis_name)
    except NameError:
        return _whole_arrays(axis_name, lengths)
    for name, value in (("planes", planes), ("key", key)):
        if _varying(value, axis_name):
            raise ValueError(
                f"{name} differs along the mesh axis {axis_name!r}: {SAME_HASHES} (replicate it: "
                f"in_specs=P() in jax.shard_map)"
            )
    return Axis(axis_name=axis_name, size=int(size))


def _whole_arrays(axis_name: str, lengths) -> Axis:
    """Not inside shard_map: whole arrays under a mesh set with jax.set_mesh (pjit-style sharding)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or axis_name not in mesh.axis_names:
        raise ValueError(
            f"axis_name={axis_name!r} is not a mesh axis bound here: call yoso.attention inside "
            f"jax.shard_map(..., mesh=mesh) over a mesh with an axis {axis_name!r}, each device holding its "
            f"slice of the sequence, or on whole arrays under jax.set_mesh(mesh)"
        )
    size = int(mesh.shape[axis_name])
    if any(n % size for n in lengths):
        raise ValueError(
            f"axis_name={axis_name!r} splits whole arrays over the {size} devices of that mesh axis: the "
            f"lengths must divide evenly, got Nq={lengths[0]}, Nk={lengths[1]}"
        )
    return Axis(axis_name=axis_name, size=size, mesh=mesh)


class JaxCollectives(sp.Collectives):
    def __init__(self, axis_name, size: int, n_key: int):
        self.axis_name, self.size = axis_name, size
        self.lengths = (n_key,) * size  # shard_map slices evenly

    def all_reduce(self, x, *, what):
        return lax.psum(x, self.axis_name)

    def _scan(self, x, *, forward: bool):
        """Exclusive running sums over the axis: a shift by one, then Hillis-Steele steps of 1, 2, 4, ..."""

        def shift(y, distance):
            pairs = [(i, i + distance) for i in range(self.size - distance)]
            if not forward:
                pairs = [(b, a) for a, b in pairs]
            return lax.ppermute(y, self.axis_name, pairs)  # devices that receive nothing get zeros

        total = shift(x, 1)
        distance = 1
        while distance < self.size - 1:
            total = total + shift(total, distance)
            distance *= 2
        return total

    def exclusive_prefix(self, x, *, what):
        return self._scan(x, forward=True)

    def exclusive_suffix(self, x, *, what):
        return self._scan(x, forward=False)

    def ring_shift(self, arrays, *, hops, what):
        ring = [(i, (i + 1) % self.size) for i in range(self.size)]
        return tuple(lax.ppermute(a, self.axis_name, ring) for a in arrays)

    def earlier(self, hops):
        return lax.axis_index(self.axis_name) >= hops

    def concatenate(self, arrays):
        return jnp.concatenate(arrays, axis=1)

    def scan_bytes(self, op, nbytes, rank):
        senders = self.size - 1  # the shift, then one step per power of two below size - 1
        distance = 1
        while distance < self.size - 1:
            senders += self.size - distance
            distance *= 2
        return nbytes * senders / self.size


@dataclass(frozen=True)
class _Config:
    """The static part of a call (hashable: one jitted program per configuration)."""

    backend: str
    plan: sp.Plan
    normalize: bool
    axis_name: str
    size: int
    n_key: int

    def comm(self) -> JaxCollectives:
        return JaxCollectives(self.axis_name, self.size, self.n_key)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _core(q, k, v, planes, query_mask, key_mask, config):
    return _core_fwd(q, k, v, planes, query_mask, key_mask, config)[0]


def _core_fwd(q, k, v, planes, query_mask, key_mask, config):
    backend = backends.get(config.backend)
    y, codes = config.plan.run_forward(backend, config.comm(), q, k, v, planes, query_mask, key_mask)
    return y.astype(jg.accumulate_dtype(q.dtype)), (q, k, v, planes, codes, query_mask, key_mask)


def _core_bwd(config, residuals, grad):
    q, k, v, planes, codes, query_mask, key_mask = residuals
    backend = backends.get(config.backend)
    dq, dk, dv = config.plan.run_backward(backend, config.comm(), q, k, v, planes, codes, query_mask, key_mask, grad)
    d_planes = None if planes is None else jnp.zeros_like(planes)  # the codes are piecewise constant
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_planes, None, None


_core.defvjp(_core_fwd, _core_bwd)


def _local(q, k, v, planes, query_mask, key_mask, config: _Config):
    """One device's slice: masks, unit rows, the core and the output normalisation, as for one device."""
    q = jg.keep_rows(q, query_mask)
    k = jg.keep_rows(k, key_mask)
    v = jg.keep_rows(v, key_mask)
    y = _core(jg.unit(q).astype(q.dtype), jg.unit(k).astype(k.dtype), v, planes, query_mask, key_mask, config)
    out = jg.unit(y) if config.normalize else y
    return out.astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("config", "layouts", "out_shape"))
def _attention(arrays, *, config: _Config, layouts, out_shape):
    """Inside jax.shard_map: the arrays are this device's slices."""
    return _local(*jg.resolve_all(arrays, layouts), config).reshape(out_shape)


@functools.partial(jax.jit, static_argnames=("config", "layouts", "out_shape"))
def _global_attention(arrays, *, config: _Config, layouts, out_shape):
    """Under jax.jit with a mesh set (jax.set_mesh) and whole arrays: shard_map over the sequence axis
    (manual in that axis only: others, such as a batch axis, stay with the compiler)."""
    inputs = jg.resolve_all(arrays, layouts)
    for name, x in zip(("q", "k", "v"), inputs):
        spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
        if spec and spec[0] is not None:  # explicit sharding of the folded batch dim
            raise ValueError(
                f"axis_name={config.axis_name!r} on whole arrays: {name}'s batch/head dims are sharded explicitly "
                f"over {spec[0]!r}; use a mesh with AxisType.Auto axes, or call yoso.attention inside jax.shard_map"
            )
    given = [i for i, x in enumerate(inputs) if x is not None]
    rows, masks = P(None, config.axis_name, None), P(None, config.axis_name)
    specs = {0: rows, 1: rows, 2: rows, 3: P(), 4: masks, 5: masks}  # q, k, v, planes, query/key masks
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.axis_types[mesh.axis_names.index(config.axis_name)] == jax.sharding.AxisType.Explicit:
        # Sharding in types: the arrays must arrive split as shard_map takes them (a no-op if they are).
        inputs = [x if x is None else jax.reshard(x, specs[i]) for i, x in enumerate(inputs)]

    def local(*present):
        full = [None] * len(inputs)
        for i, x in zip(given, present):
            full[i] = x
        return _local(*full, config)

    out = jax.shard_map(
        local,
        in_specs=tuple(specs[i] for i in given),
        out_specs=rows,
        axis_names=frozenset({config.axis_name}),
        check_vma=False,  # the jax backend's loops do not carry varying types yet (see attention())
    )(*[inputs[i] for i in given])
    return out.reshape(out_shape)


def attention(backend, prep):
    """``yoso.attention(..., axis_name=...)`` of a prepared call on ``backend``: inside jax.shard_map each
    device's slice; with whole arrays under a mesh (jax.set_mesh), the whole result."""
    call = prep.call
    parallel = prep.parallel
    whole = parallel.mesh is not None  # lengths that divide evenly: checked by check()
    n_key = call.n_key // parallel.size if whole else call.n_key
    comm = JaxCollectives(parallel.axis_name, parallel.size, n_key)
    itemsize = jnp.dtype(jg.accumulate_dtype(call.dtype)).itemsize
    config = _Config(
        backend=backend.name,
        plan=sp.plan(call, comm, itemsize=itemsize, key_mask=prep.key_mask is not None),
        normalize=prep.normalize,
        axis_name=parallel.axis_name,
        size=parallel.size,
        n_key=n_key,
    )
    arrays, layouts = jg.arrays_and_layouts([prep.q, prep.k, prep.v, prep.planes, prep.query_mask, prep.key_mask])
    run = _global_attention if whole else _attention
    try:
        return run(arrays, config=config, layouts=layouts, out_shape=prep.lead + (call.n_query, call.value_dim))
    except TypeError as exc:
        if "manual axis types do not match" not in str(exc):
            raise
        # The backends' loops start from zeros that shard_map's type checker sees as equal on every device.
        raise TypeError(
            f"the {backend.name!r} backend's loops do not carry shard_map's varying-axes types yet: call "
            f"jax.shard_map(..., check_vma=False) around yoso.attention(..., axis_name={parallel.axis_name!r})"
        ) from exc
