"""The JAX sequence-parallel cases inside ``jax.shard_map``: ``python sp_jax_worker.py OUT``.

Run by ``test_sequence_parallel.py`` in a process of its own with ``XLA_FLAGS=--xla_force_host_platform_
device_count=4`` (the device count is fixed when JAX starts) and ``JAX_ENABLE_X64=1``. Writes JSON to
``OUT``: ``failures`` against the one-device result and ``errors`` (refusals that need a mesh).
"""

from __future__ import annotations

import json
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from sp_cases import cases_for, compare, data, options, strategy

import yoso

ROWS = P(None, None, "sp", None)  # [B, H, N, D]: the sequence over the mesh axis
MASK = P(None, None, "sp")  # [B, 1, N]


def run_case(case, world: int) -> list[str]:
    mesh = jax.make_mesh((world,), ("sp",), devices=jax.devices()[:world])
    d = data(case)
    opts = dict(options(case), planes=d["planes"])
    dtype = jnp.dtype(case.dtype)
    arrays = {n: jnp.asarray(d[n], dtype) for n in ("q", "k", "v", "cotangent")}
    masks = {n: jnp.asarray(d[n]) for n in ("key_padding_mask", "query_mask") if n in d}
    names = sorted(masks)

    def loss(q, k, v, *mask_values):
        out = yoso.attention(q, k, v, **dict(zip(names, mask_values)), **opts)
        return jnp.sum(out * arrays["cotangent"]), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        arrays["q"], arrays["k"], arrays["v"], *[masks[n] for n in names]
    )
    full = dict(out=np.asarray(out), dq=np.asarray(grads[0]), dk=np.asarray(grads[1]), dv=np.asarray(grads[2]))

    def local(q, k, v, cotangent, *mask_values):
        out = yoso.attention(q, k, v, axis_name="sp", **dict(zip(names, mask_values)), **opts)
        return jnp.sum(out * cotangent)[None], out

    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(ROWS, ROWS, ROWS, ROWS) + (MASK,) * len(names),
        out_specs=(P("sp"), ROWS),
        check_vma=False,  # the jax backend's loops do not carry shard_map's varying types (see yoso_parallel._jax)
    )

    def split_loss(q, k, v, cotangent, *mask_values):
        losses, out = sharded(q, k, v, cotangent, *mask_values)
        return jnp.sum(losses), out

    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    inputs = [put(arrays[n], ROWS) for n in ("q", "k", "v", "cotangent")] + [put(masks[n], MASK) for n in names]
    with strategy(case):
        (_, out), grads = jax.jit(jax.value_and_grad(split_loss, argnums=(0, 1, 2), has_aux=True))(*inputs)
    part = dict(out=np.asarray(out), dq=np.asarray(grads[0]), dk=np.asarray(grads[1]), dv=np.asarray(grads[2]))
    # The gathered slices are the whole arrays: compare everything (each device's slice in place).
    n_query = case.n_query or case.n
    slices = dict(out=(0, n_query), dq=(0, n_query), dk=(0, case.n), dv=(0, case.n))
    return [f"world {world} {f}" for f in compare(case, full, part, slices, d)]


def run_whole(world: int = 4) -> list[str]:
    """Whole arrays under jax.jit with a mesh set (pjit style): a (dp, sp) mesh of Auto axes, the batch
    over dp and the sequence over sp; the result and gradients equal the one-device ones."""
    from jax.sharding import AxisType

    case = next(c for c in cases_for("jax", 4) if c.name == "causal-ring")
    d = data(case)
    masks = {n: jnp.asarray(d[n]) for n in ("key_padding_mask", "query_mask")}
    opts = dict(options(case), planes=d["planes"], **masks)
    q, k, v, g = (jnp.asarray(d[n]) for n in ("q", "k", "v", "cotangent"))

    def loss(q, k, v, **extra):
        out = yoso.attention(q, k, v, **opts, **extra)
        return jnp.sum(out * g), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    full = dict(out=np.asarray(out), dq=np.asarray(grads[0]), dk=np.asarray(grads[1]), dv=np.asarray(grads[2]))
    mesh = jax.make_mesh((2, world // 2), ("dp", "sp"), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        rows = NamedSharding(mesh, P("dp", None, "sp", None))
        inputs = [jax.device_put(x, rows) for x in (q, k, v)]
        fn = jax.jit(jax.value_and_grad(lambda *a: loss(*a, axis_name="sp"), argnums=(0, 1, 2), has_aux=True))
        (_, out), grads = fn(*inputs)
    part = dict(out=np.asarray(out), dq=np.asarray(grads[0]), dk=np.asarray(grads[1]), dv=np.asarray(grads[2]))
    slices = dict(out=(0, case.n), dq=(0, case.n), dk=(0, case.n), dv=(0, case.n))
    return [f"whole arrays {f}" for f in compare(case, full, part, slices, d)]


def errors() -> dict:
    """Refusals inside shard_map."""
    mesh = jax.make_mesh((4,), ("sp",))
    x = jax.device_put(jnp.ones((1, 8, 4)), NamedSharding(mesh, P(None, "sp", None)))
    found = {}

    def attempt(name, expected, fn, error=ValueError):
        try:
            jax.jit(fn)(x)
            found[name] = "no error"
        except error as exc:
            found[name] = "ok" if expected in str(exc) else str(exc)

    def in_map(f, check_vma=False):
        rows = P(None, "sp", None)
        return jax.shard_map(f, mesh=mesh, in_specs=rows, out_specs=rows, check_vma=check_vma)

    attempt("seed", "seed=None draws", in_map(lambda x: yoso.attention(x, x, x, axis_name="sp")))
    attempt("unbound", "is not a mesh axis bound", in_map(lambda x: yoso.attention(x, x, x, seed=0, axis_name="zz")))
    # With shard_map's type checking on, planes that differ per device are refused by name.
    attempt(
        "varying planes",
        "planes differs along the mesh axis",
        in_map(lambda x: yoso.attention(x, x, x, planes=jnp.ones((2, 2, 4)) * x[0, :1, :1], axis_name="sp"), True),
    )
    # Whole arrays whose batch is sharded explicitly (sharding in types) are refused, saying what works.
    explicit = jax.make_mesh((2, 2), ("dp", "sp"))
    with jax.set_mesh(explicit):
        y = jax.device_put(jnp.ones((2, 8, 4)), NamedSharding(explicit, P("dp", "sp", None)))
        try:
            jax.jit(lambda y: yoso.attention(y, y, y, seed=0, axis_name="sp"))(y)
            found["explicit batch"] = "no error"
        except ValueError as exc:
            found["explicit batch"] = "ok" if "sharded explicitly" in str(exc) else str(exc)
        try:  # whole arrays of lengths that do not split over the axis
            z = jnp.ones((1, 5, 4))
            jax.jit(lambda z: yoso.attention(z, z, z, seed=0, axis_name="sp"))(z)
            found["uneven whole arrays"] = "no error"
        except ValueError as exc:
            found["uneven whole arrays"] = "ok" if "must divide evenly" in str(exc) else str(exc)
    # ... and the jax backend's loops say what to do (until they carry varying types).
    try:
        jax.jit(in_map(lambda x: yoso.attention(x, x, x, seed=0, num_hashes=2, hash_bits=2, axis_name="sp"), True))(x)
        found["check_vma"] = "ok"  # the backend carries varying types now
    except TypeError as exc:
        found["check_vma"] = "ok" if "check_vma=False" in str(exc) else str(exc)
    return found


def main() -> int:
    out_path = sys.argv[1]
    result = {"failures": [], "errors": {}}
    try:
        assert len(jax.devices()) >= 4, f"needs 4 host devices, got {jax.devices()}"
        for world in (4, 2):
            for case in cases_for("jax", world):
                try:
                    result["failures"] += run_case(case, world)
                except Exception:
                    result["failures"].append(f"world {world} {case.name}: {traceback.format_exc()}")
        result["failures"] += run_whole()
        result["errors"] = errors()
    except Exception:
        result["failures"].append(traceback.format_exc())
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
