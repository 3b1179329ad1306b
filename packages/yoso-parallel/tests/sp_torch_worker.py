"""One rank of the torch.distributed sequence-parallel tests: ``python sp_torch_worker.py RANK WORLD INIT OUT``.

Started (one process per rank) by ``test_sequence_parallel.py``; writes its findings as JSON to ``OUT``:
``failures`` (mismatches against the one-process result), ``traffic`` (bytes sent, measured by the
counting wrapper) and ``errors`` (whether calls whose ranks disagree raise on this rank).
"""

from __future__ import annotations

import json
import sys
import traceback
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from sp_cases import bounds, cases_for, compare, data, options, strategy

import yoso
import yoso_parallel as sp


def _tensor(x, dtype, device="cpu"):
    if x.dtype == bool:
        return torch.as_tensor(x, device=device)
    return torch.as_tensor(x, dtype=dtype, device=device)


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def run_case(case, rank: int, world: int, group, *, seed: int = 0, device: str = "cpu") -> list[str]:
    d = data(case, seed)
    opts = options(case)
    dtype = getattr(torch, case.dtype)
    n_query = case.n_query or case.n
    q_slice = bounds(n_query, world, rank, case.lengths)
    k_slice = bounds(case.n, world, rank, case.lengths)
    masks = {name: d[name] for name in ("key_padding_mask", "query_mask") if name in d}
    with yoso.set_backend(case.backend):
        inputs = [_tensor(d[name], dtype, device).requires_grad_() for name in ("q", "k", "v")]
        out = yoso.attention(
            *inputs, planes=d["planes"], **{n: _tensor(m, dtype, device) for n, m in masks.items()}, **opts
        )
        out.backward(_tensor(d["cotangent"], dtype, device))
        full = dict(out=_numpy(out), dq=_numpy(inputs[0].grad), dk=_numpy(inputs[1].grad), dv=_numpy(inputs[2].grad))

        (q0, q1), (k0, k1) = q_slice, k_slice
        parts = [
            _tensor(d["q"][..., q0:q1, :], dtype, device).requires_grad_(),
            _tensor(d["k"][..., k0:k1, :], dtype, device).requires_grad_(),
            _tensor(d["v"][..., k0:k1, :], dtype, device).requires_grad_(),
        ]
        part_masks = {}
        if "key_padding_mask" in masks:
            part_masks["key_padding_mask"] = _tensor(masks["key_padding_mask"][..., k0:k1], dtype, device)
        if "query_mask" in masks:
            part_masks["query_mask"] = _tensor(masks["query_mask"][..., q0:q1], dtype, device)
        with strategy(case):
            out = yoso.attention(*parts, planes=d["planes"], group=group, **part_masks, **opts)
            out.backward(_tensor(d["cotangent"][..., q0:q1, :], dtype, device))
    part = dict(out=_numpy(out), dq=_numpy(parts[0].grad), dk=_numpy(parts[1].grad), dv=_numpy(parts[2].grad))
    slices = dict(out=q_slice, dq=q_slice, dk=k_slice, dv=k_slice)
    return [f"rank {rank}/{world} {f}" for f in compare(case, full, part, slices, d)]


def traffic(rank: int, world: int, group) -> dict:
    """Bytes this rank sends per call, forward and backward, at two lengths (reference, float64)."""
    found = {}
    rng = np.random.default_rng(1)
    for causal in (False, True):
        for n in (8, 32):  # rows per rank
            q, k, v = (torch.tensor(rng.standard_normal((1, 2, n, 8)), requires_grad=True) for _ in range(3))
            with yoso.set_backend("reference"), sp.force_grads("ring"), sp.recording() as record:
                out = yoso.attention(q, k, v, seed=0, num_hashes=4, hash_bits=3, causal=causal, group=group)
                out.sum().backward()
            found[f"causal={causal},n={n}"] = record.summary()
    return found


def errors(rank: int, world: int, group) -> dict:
    """Calls whose ranks disagree must raise the same ValueError on every rank (and leave the group usable)."""
    x = torch.randn(1, 2, 4, 8)
    mask = torch.ones(1, 4, dtype=torch.bool)
    attempts = {
        "num_hashes": dict(seed=0, num_hashes=3 if rank == 0 else 4),
        "hash functions differ": dict(seed=rank),
        "key_padding_mask": dict(seed=0, key_padding_mask=mask if rank == 0 else None),
        "differentiated": dict(seed=0, requires_grad=rank == 0),
        "value_dim": dict(seed=0, value_dim=8 if rank == 0 else 5),
    }
    found = {}
    for expected, kwargs in attempts.items():
        kwargs = dict(kwargs)
        v = torch.randn(1, 2, 4, kwargs.pop("value_dim", 8))
        q = x.clone().requires_grad_(kwargs.pop("requires_grad", False))
        try:
            with yoso.set_backend("reference"):
                yoso.attention(q, x, v, group=group, **kwargs)
            found[expected] = "no error"
        except ValueError as exc:
            found[expected] = "ok" if expected in str(exc) else str(exc)
    # Hash functions drawn on one rank (fresh entropy) and broadcast: accepted.
    drawn = [yoso.hash_planes(4, 3, 8) if rank == 0 else None]
    dist.broadcast_object_list(drawn, src=0, group=group)
    try:
        with yoso.set_backend("reference"):
            yoso.attention(x, x, x, planes=drawn[0], num_hashes=4, hash_bits=3, group=group)
        found["broadcast planes"] = "ok"
    except ValueError as exc:
        found["broadcast planes"] = str(exc)
    return found


def main() -> int:
    rank, world, init, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    device = sys.argv[5] if len(sys.argv) > 5 else "cpu"
    torch.set_num_threads(1)
    result = {"failures": [], "traffic": {}, "errors": {}}
    try:
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=90))
        group = dist.group.WORLD
        for case in cases_for("torch", world):
            if device == "cuda" and case.backend != "reference":
                continue
            try:
                result["failures"] += run_case(case, rank, world, group)
            except Exception:
                result["failures"].append(f"rank {rank}/{world} {case.name}: {traceback.format_exc()}")
        if device == "cpu":
            result["traffic"] = traffic(rank, world, group)
            result["errors"] = errors(rank, world, group)
            if world == 4:  # two independent groups of two (sequence parallel within, data parallel across)
                pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
                case = next(c for c in cases_for("torch", 2) if c.name == "causal-ring")
                result["failures"] += [
                    f"subgroup {f}" for f in run_case(case, rank % 2, 2, pairs[rank // 2], seed=rank // 2)
                ]
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        result["failures"].append(f"rank {rank}/{world}: {traceback.format_exc()}")
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
