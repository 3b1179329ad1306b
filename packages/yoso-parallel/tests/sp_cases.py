"""The sequence-parallel cases, shared by the torch worker processes and the JAX run (not a test module).

Each case draws one full sequence from a fixed seed; every rank computes the one-process result itself
(``yoso.attention`` without ``group=``/``axis_name=``, the same hash functions) and compares its slice with
what the split call gave it. Inputs are drawn away from hash sign ties (float32 runs would otherwise flip
codes that float64 keeps), and padded keys hold large garbage that must not reach anything.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

import yoso

TOLERANCE = {"float64": 1e-9, "float32": 1e-4}


@dataclass(frozen=True)
class Case:
    name: str
    backend: str = "reference"
    dtype: str = "float64"
    causal: bool = False
    mode: str = "sample"
    hashing: str = "gaussian"
    backward: str = "lower_bound"
    grads: str | None = None  # force the lower bound's dq, dk strategy ("tables", "ring"); None: by bytes
    key_mask: bool = True
    query_mask: bool = False
    normalize: bool = True
    batch: int = 2
    heads: int = 2
    n: int = 24  # the whole sequence (queries and keys)
    n_query: int | None = None  # cross-attention (non-causal): a different number of queries
    dim: int = 6
    value_dim: int = 5
    num_hashes: int = 3
    hash_bits: int = 3
    broadcast_kv: bool = False  # k, v of [B, 1, N, D] against q of [B, H, N, D]
    per_head_planes: bool = False
    lengths: tuple[int, ...] | None = None  # uneven slices (torch only), one length per rank
    worlds: tuple[int, ...] = (2, 4)  # torch.distributed worlds it runs in
    jax_worlds: tuple[int, ...] = ()  # shard_map mesh sizes it runs in (each one is a compilation: a few)
    chunk_bytes: int | None = None  # yoso_parallel._composition.TABLE_CHUNK_BYTES for the call (chunks of hashes)


CASES = [
    Case("noncausal"),
    Case("noncausal-tables", grads="tables", query_mask=True, chunk_bytes=8000),  # a hash, 8 tokens a block
    Case("noncausal-ring", grads="ring", hashing="hadamard", dim=8, jax_worlds=(4,)),
    Case("causal-tables", causal=True, grads="tables", jax_worlds=(2,), chunk_bytes=4000),  # blocks of 4 tokens
    Case("causal-ring", causal=True, grads="ring", query_mask=True, jax_worlds=(4,)),
    Case("causal-exact-hadamard", causal=True, backward="exact", hashing="hadamard", dim=8, jax_worlds=(4,)),
    Case(
        "noncausal-exact", backward="exact", normalize=False, broadcast_kv=True, per_head_planes=True, jax_worlds=(4,)
    ),
    Case("expectation-causal", mode="expectation", causal=True, query_mask=True, jax_worlds=(4,)),
    Case("expectation-exact", mode="expectation", backward="exact", key_mask=False),
    Case("cross-attention", n_query=16),
    Case("uneven-causal", causal=True, lengths=(5, 19), worlds=(2,)),
    Case("uneven-ring", causal=True, grads="ring", lengths=(3, 9, 4, 8), worlds=(4,)),
    # Through the jax backend (float32): torch tensors handed over by DLPack (world 2 only: every rank
    # compiles the jax programs), and JAX arrays.
    Case(
        "jax-float32-causal", backend="jax", dtype="float32", causal=True, query_mask=True, worlds=(2,), jax_worlds=(4,)
    ),
]


def cases_for(engine: str, world: int) -> list[Case]:
    return [c for c in CASES if world in (c.worlds if engine == "torch" else c.jax_worlds)]


@contextlib.contextmanager
def strategy(case: Case):
    """The case's forced strategy and table chunking, for the split call."""
    from yoso_parallel import _composition as sp

    saved = sp.TABLE_CHUNK_BYTES
    if case.chunk_bytes is not None:
        sp.TABLE_CHUNK_BYTES = case.chunk_bytes
    try:
        with sp.force_grads(case.grads):
            yield
    finally:
        sp.TABLE_CHUNK_BYTES = saved


def _projections(x: np.ndarray, planes: np.ndarray) -> np.ndarray:
    """Cosines between unit rows ``x [..., N, D]`` and every Gaussian hyperplane (sign ties are ~0)."""
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    p = planes.reshape(-1, planes.shape[-1])
    return x @ (p / np.linalg.norm(p, axis=-1, keepdims=True)).T


def _untied(rng, shape, planes, hashing) -> np.ndarray:
    x = rng.standard_normal(shape)
    if hashing != "gaussian":
        return x  # Hadamard cases run in float64, where ties do not flip
    for _ in range(200):
        near = (np.abs(_projections(x, planes)) < 1e-3).any(axis=-1)
        if not near.any():
            return x
        x[near] = rng.standard_normal((int(near.sum()), shape[-1]))
    raise AssertionError("could not draw tie-free rows")


def data(case: Case, seed: int = 0) -> dict:
    """The whole sequence's inputs (NumPy float64), the hash functions and the output cotangent."""
    rng = np.random.default_rng(seed)
    lead = (case.batch, case.heads)
    n_query = case.n_query or case.n
    planes = yoso.hash_planes(case.num_hashes, case.hash_bits, case.dim, hashing=case.hashing, seed=rng)
    if case.per_head_planes:
        planes = np.stack(
            [yoso.hash_planes(case.num_hashes, case.hash_bits, case.dim, hashing=case.hashing, seed=rng) for _ in lead]
        )[None]  # [1, H, ...]: per head, shared over the batch
    kv_lead = (case.batch, 1) if case.broadcast_kv else lead
    q = _untied(rng, lead + (n_query, case.dim), planes, case.hashing)
    k = _untied(rng, kv_lead + (case.n, case.dim), planes, case.hashing)
    v = rng.standard_normal(kv_lead + (case.n, case.value_dim))
    out = dict(q=q, k=k, v=v, planes=planes, cotangent=rng.standard_normal(lead + (n_query, case.value_dim)))
    if case.key_mask:
        mask = rng.random((case.batch, 1, case.n)) < 0.7
        mask[..., 0] = True
        k[~np.broadcast_to(mask, k.shape[:-1])] = 1e4  # padding holds garbage: it must reach nothing
        v[~np.broadcast_to(mask, v.shape[:-1])] = -1e4
        out["key_padding_mask"] = mask
    if case.query_mask:
        mask = rng.random((case.batch, 1, n_query)) < 0.8
        mask[..., 0] = True
        out["query_mask"] = mask
    return out


def options(case: Case) -> dict:
    return dict(
        causal=case.causal,
        mode=case.mode,
        hashing=case.hashing,
        backward=case.backward,
        normalize=case.normalize,
        num_hashes=case.num_hashes,
        hash_bits=case.hash_bits,
    )


def bounds(length: int, world: int, rank: int, lengths=None) -> tuple[int, int]:
    """Rank ``rank``'s slice ``[start, stop)`` of a sequence of ``length`` rows (even, or ``lengths``)."""
    if lengths is None:
        per = length // world
        return rank * per, (rank + 1) * per
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return int(starts[rank]), int(starts[rank + 1])


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.linalg.norm(expected)
    return float(np.linalg.norm(actual - expected) / (scale if scale > 0 else 1.0))


def compare(case: Case, full: dict, part: dict, slices: dict, inputs: dict) -> list[str]:
    """Failures (empty when the slice matches): ``full`` and ``part`` hold out, dq, dk, dv as NumPy;
    ``inputs`` is :func:`data`'s (for the masks: masked rows must be exact zeros)."""
    masks = {"out": inputs.get("query_mask"), "dq": inputs.get("query_mask")}
    masks["dk"] = masks["dv"] = inputs.get("key_padding_mask")
    failures = []
    for name, expected in full.items():
        got = part[name]
        want = expected[..., slices[name][0] : slices[name][1], :]
        if got.shape != want.shape:
            failures.append(f"{case.name}: {name} shape {got.shape} != {want.shape}")
            continue
        if not np.isfinite(got).all():
            failures.append(f"{case.name}: {name} is not finite")
            continue
        err = rel_err(got, want)
        if err > TOLERANCE[case.dtype]:
            failures.append(f"{case.name}: {name} relative error {err:.2e} > {TOLERANCE[case.dtype]:.0e}")
        if masks[name] is not None:
            start, stop = slices[name]
            masked = ~np.broadcast_to(masks[name][..., start:stop], got.shape[:-1])
            if np.any(got[masked] != 0):
                failures.append(f"{case.name}: {name} is not exactly zero on masked rows")
    return failures
