"""Sequence parallelism in JAX: ``yoso.attention(q, k, v, ..., axis_name="sp")`` inside ``jax.shard_map``.

Each device holds its contiguous slice of the sequence along the mesh axis ``axis_name`` (devices in axis
order); the result is its slice of the full-sequence result, and ``jax.grad`` gives its slice of the
gradients. The composition is ``yoso._sequence_parallel`` (framework-neutral); this module supplies the
collectives over the axis -- ``lax.psum``; exclusive prefix / suffix sums as a shift and a log-step scan
of ``lax.ppermute``; a ring shift, also ``lax.ppermute`` -- and wraps the core in one ``jax.custom_vjp``
inside one jitted program, like ``yoso._jax_glue`` does for one device. Every device runs the same
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

from . import _jax_glue as jg
from . import _sequence_parallel as sp
from . import backends


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

    def sent_bytes(self, op, nbytes, rank=None):
        if self.size == 1:
            return 0.0
        if op == "all_reduce":
            return sp.ring_all_reduce_bytes(self.size, nbytes)
        if op in ("exclusive_prefix", "exclusive_suffix"):
            senders = self.size - 1  # the shift, then one step per power of two below size - 1
            distance = 1
            while distance < self.size - 1:
                senders += self.size - distance
                distance *= 2
            return nbytes * senders / self.size
        return float(nbytes)


@dataclass(frozen=True)
class _Config:
    """The static part of a call (hashable: one jitted program per configuration)."""

    backend: str
    mode: str
    hashing: str
    num_hashes: int
    hash_bits: int
    causal: bool
    backward: str
    normalize: bool
    axis_name: str
    size: int
    n_key: int
    grads: str

    def comm(self) -> JaxCollectives:
        return JaxCollectives(self.axis_name, self.size, self.n_key)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _core(q, k, v, planes, query_mask, key_mask, config):
    return _core_fwd(q, k, v, planes, query_mask, key_mask, config)[0]


def _core_fwd(q, k, v, planes, query_mask, key_mask, config):
    y, codes = sp.forward(
        backends.get(config.backend),
        config.comm(),
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
    return y.astype(jg._accumulate_dtype(q.dtype)), (q, k, v, planes, codes, query_mask, key_mask)


def _core_bwd(config, residuals, grad):
    q, k, v, planes, codes, query_mask, key_mask = residuals
    dq, dk, dv = sp.backward(
        backends.get(config.backend),
        config.comm(),
        q,
        k,
        v,
        planes,
        codes,
        query_mask,
        key_mask,
        grad,
        mode=config.mode,
        backward=config.backward,
        hashing=config.hashing,
        num_hashes=config.num_hashes,
        hash_bits=config.hash_bits,
        causal=config.causal,
        grads=config.grads,
    )
    d_planes = None if planes is None else jnp.zeros_like(planes)  # the codes are piecewise constant
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_planes, None, None


_core.defvjp(_core_fwd, _core_bwd)


def _local(q, k, v, planes, query_mask, key_mask, config: _Config):
    """One device's slice: masks, unit rows, the core and the output normalisation, as for one device."""
    q = jg._keep_rows(q, query_mask)
    k = jg._keep_rows(k, key_mask)
    v = jg._keep_rows(v, key_mask)
    y = _core(jg._unit(q).astype(q.dtype), jg._unit(k).astype(k.dtype), v, planes, query_mask, key_mask, config)
    out = jg._unit(y) if config.normalize else y
    return out.astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("config", "layouts", "out_shape"))
def _attention(arrays, *, config: _Config, layouts, out_shape):
    """Inside jax.shard_map: the arrays are this device's slices."""
    return _local(*jg._resolve_all(arrays, layouts), config).reshape(out_shape)


@functools.partial(jax.jit, static_argnames=("config", "layouts", "out_shape"))
def _global_attention(arrays, *, config: _Config, layouts, out_shape):
    """Under jax.jit with a mesh set (jax.set_mesh) and whole arrays: shard_map over the sequence axis
    (manual in that axis only: others, such as a batch axis, stay with the compiler)."""
    inputs = jg._resolve_all(arrays, layouts)
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
    whole = parallel.mesh is not None  # lengths that divide evenly: checked by _validate
    n_key = call.n_key // parallel.size if whole else call.n_key
    comm = JaxCollectives(parallel.axis_name, parallel.size, n_key)
    sizes = sp.Sizes(
        batch=call.batch,
        dim=call.dim,
        value_dim=call.value_dim,
        num_hashes=call.num_hashes,
        hash_bits=call.hash_bits,
        itemsize=jnp.dtype(jg._accumulate_dtype(call.dtype)).itemsize,
        causal=call.causal,
        key_mask=prep.key_mask is not None,
    )
    config = _Config(
        backend=backend.name,
        mode=call.mode,
        hashing=call.hashing,
        num_hashes=call.num_hashes,
        hash_bits=call.hash_bits,
        causal=call.causal,
        backward=call.backward,
        normalize=prep.normalize,
        axis_name=parallel.axis_name,
        size=parallel.size,
        n_key=n_key,
        grads=sp.choose_grads(comm, sizes, mode=call.mode, backward=call.backward),
    )
    arrays, layouts = jg._arrays_and_layouts([prep.q, prep.k, prep.v, prep.planes, prep.query_mask, prep.key_mask])
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
