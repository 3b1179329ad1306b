"""Run every kernel family of the cuda backend once on small shapes and compare with yoso_reference.

The driver for compute-sanitizer (memcheck, racecheck) in ``cuda.sh``: small enough to finish under
the sanitizers, yet covering every code path -- each dtype, Gaussian tau pads 4..16, Hadamard slot
counts 1..8, cumulation in one or several hash groups with 1, 2, 4 channels per block and all three
orders over several chunks, both pairwise tile sizes, both gradient estimators, masks, causal, and the
lower bound's table form (sampled_tables.cu: every (TILE, DS) plan, buckets of many tiles, forced and
chosen per bucket), and the bucket-table primitives of the recurrent state (tables.cu: tables with and
without outer products, tokens added by a walk and by a sum, plain and weighted reads). Every kernel
reads inputs the reference also gets (the half-precision inputs rounded first) and computes in fp32,
so every comparison is at relative error 2e-5.
Exit status 1 if any result is off.

    python benchmarks/gpu/cuda_kernels.py                  # everything
    python benchmarks/gpu/cuda_kernels.py --only tables    # one family: hash cumulate pairwise tables buckets
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from yoso_cuda.backend import CudaBackend

import yoso
import yoso_reference as ref

FAMILIES = ("hash", "cumulate", "pairwise", "tables", "buckets")
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--only", action="append", choices=FAMILIES, help="run only these kernel families")
families = set(parser.parse_args().only or FAMILIES)
cuda = CudaBackend()
rng = np.random.default_rng(0)
failures = []


def dev(x, dtype=torch.float32):
    return torch.as_tensor(np.ascontiguousarray(x)).to("cuda", dtype)


def host(x, dtype):
    """What the kernel saw: x rounded to dtype, back in float64."""
    return dev(x, dtype).double().cpu().numpy()


def report(name, got, want, tol):
    got = got.double().cpu().numpy() if isinstance(got, torch.Tensor) else got
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
    ok = err <= tol and np.isfinite(got).all()
    print(f"{'ok  ' if ok else 'FAIL'} {name:<60} rel err {err:.2e}")
    if not ok:
        failures.append(name)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

for dname, dtype in DTYPES.items():
    # Hashing: codes compared exactly (tie-free enough at these sizes that a mismatch rate > 1% fails).
    hash_cases = [("gaussian", 33, 3), ("gaussian", 64, 8), ("gaussian", 60, 11), ("gaussian", 256, 16)]
    hash_cases += [("hadamard", 16, 4), ("hadamard", 64, 8), ("hadamard", 100, 5), ("hadamard", 256, 8)]
    for hashing, dim, tau in hash_cases if "hash" in families else ():
        x = ref.unit_rows(rng.standard_normal((2, 45, dim)))
        planes = yoso.hash_planes(12, tau, dim, hashing=hashing, seed=1)[None]
        got = cuda.hash_codes(dev(x, dtype), dev(planes), hashing=hashing, num_hashes=12, hash_bits=tau)
        want = ref.hash_codes(host(x, dtype), planes, hashing=hashing, num_hashes=12, hash_bits=tau)
        mismatch = float((got.cpu().numpy() != want).mean())
        ok = mismatch <= 0.01
        print(f"{'ok  ' if ok else 'FAIL'} hash {hashing} {dname} D={dim} tau={tau:<40} mismatches {mismatch:.3%}")
        if not ok:
            failures.append(f"hash {hashing} {dname} D={dim}")

    # Cumulation: (m, tau, C) chosen to reach CS = 4, 2, 1 and the split-group path.
    for m, tau, channels in [(4, 3, 17), (32, 8, 64), (8, 12, 5), (3, 1, 1)] if "cumulate" in families else ():
        for order in ("none", "causal", "anticausal"):
            n = 70
            qc, kc = rng.integers(0, 2**tau, (2, m, n)), rng.integers(0, 2**tau, (2, m, n))
            v = rng.standard_normal((2, n, channels))
            qm, km = rng.random((2, n)) < 0.8, rng.random((2, n)) < 0.8
            codes = dev(qc, torch.int32), dev(kc, torch.int32)
            got = cuda.cumulate(*codes, dev(v, dtype), read_mask=dev(qm, torch.bool), write_mask=dev(km, torch.bool),
                                order=order, hash_bits=tau)  # fmt: skip
            want = ref.cumulate(qc, kc, host(v, dtype), read_mask=qm, write_mask=km, order=order, hash_bits=tau)
            report(f"cumulate {dname} m={m} tau={tau} C={channels} {order}", got, want, 2e-5)

    # Pairwise kernels: tile 32 (D + Dv <= 256) and tile 16.
    for dim, dv in [(20, 12), (64, 64), (256, 200)] if "pairwise" in families else ():
        for causal in (False, True):
            n = 50
            q, k = ref.unit_rows(rng.standard_normal((2, n, dim))), ref.unit_rows(rng.standard_normal((2, n, dim)))
            v, g = rng.standard_normal((2, n, dv)), rng.standard_normal((2, n, dv))
            qm, km = rng.random((2, n)) < 0.8, rng.random((2, n)) < 0.8
            masks = dict(query_mask=dev(qm, torch.bool), key_mask=dev(km, torch.bool))
            rq, rk, rv = (host(a, dtype) for a in (q, k, v))
            y = cuda.expectation_forward(
                dev(q, dtype), dev(k, dtype), dev(v, dtype), **masks, causal=causal, hash_bits=6
            )
            want = ref.expectation_forward(rq, rk, rv, query_mask=qm, key_mask=km, causal=causal, hash_bits=6)
            report(f"expectation forward {dname} D={dim} Dv={dv} causal={causal}", y, want, 2e-5)
            for backward in ("exact", "lower_bound"):
                qkv = dev(q, dtype), dev(k, dtype), dev(v, dtype)
                got = cuda.expectation_backward(*qkv, dev(g), **masks, causal=causal, hash_bits=6, backward=backward,
                                                max_ratio=60.0)  # fmt: skip
                want = ref.expectation_backward(rq, rk, rv, g, query_mask=qm, key_mask=km, causal=causal, hash_bits=6,
                                                backward=backward, max_ratio=60.0)  # fmt: skip
                for name, a, b in zip(("dq", "dk", "dv"), got, want):
                    report(f"expectation {backward} {name} {dname} D={dim} Dv={dv} causal={causal}", a, b, 2e-5)
                tau, m = 3, 4
                qc, kc = rng.integers(0, 2**tau, (2, m, n)), rng.integers(0, 2**tau, (2, m, n))
                est = "exact" if backward == "exact" else "lower_bound"
                got = cuda.sampled_grads(dev(qc, torch.int32), dev(kc, torch.int32), dev(q, dtype), dev(k, dtype),
                                         dev(v, dtype), dev(g), **masks, causal=causal, hash_bits=tau, backward=est,
                                         max_ratio=30.0, form="pairs")  # fmt: skip
                want = ref.sampled_grads(qc, kc, rq, rk, rv, g, query_mask=qm, key_mask=km, causal=causal,
                                         hash_bits=tau, backward=est, max_ratio=30.0)  # fmt: skip
                for name, a, b in zip(("dq", "dk"), got, want):
                    report(f"sampled {est} {name} {dname} D={dim} Dv={dv} causal={causal}", a, b, 2e-5)

    # The lower bound's table form: a bucket holding 60% of each side (several tiles), the rest spread;
    # head dims reaching every (TILE, DS) plan (_plans.table_plan: (32, 64), (32, 32), (16, 32)) and
    # several column slices; forced tables, and "auto" (both kernels in each hash step).
    table_dims = [(64, 64), (100, 200)] + ([(20, 12), (1, 7)] if dname == "float32" else [])  # dtype: loads only
    for dim, dv in table_dims if "tables" in families else ():
        for causal in (False, True):
            n_query, n_key = (70, 70) if causal else (45, 83)
            tau, m = 2, 3
            qc, kc = rng.integers(0, 2**tau, (2, m, n_query)), rng.integers(0, 2**tau, (2, m, n_key))
            qc[..., rng.random(n_query) < 0.6] = 1
            kc[..., rng.random(n_key) < 0.6] = 1
            q = ref.unit_rows(rng.standard_normal((2, n_query, dim)))
            k = ref.unit_rows(rng.standard_normal((2, n_key, dim)))
            v, g = rng.standard_normal((2, n_key, dv)), rng.standard_normal((2, n_query, dv))
            qm, km = rng.random((2, n_query)) < 0.8, rng.random((2, n_key)) < 0.8
            masks = dict(query_mask=dev(qm, torch.bool), key_mask=dev(km, torch.bool))
            rq, rk, rv = (host(a, dtype) for a in (q, k, v))
            want = ref.sampled_grads(qc, kc, rq, rk, rv, g, query_mask=qm, key_mask=km, causal=causal,
                                     hash_bits=tau, backward="lower_bound", max_ratio=20.0)  # fmt: skip
            for form in ("tables", "auto"):
                got = cuda.sampled_grads(dev(qc, torch.int32), dev(kc, torch.int32), dev(q, dtype), dev(k, dtype),
                                         dev(v, dtype), dev(g), **masks, causal=causal, hash_bits=tau,
                                         backward="lower_bound", max_ratio=20.0, form=form)  # fmt: skip
                for name, a, b in zip(("dq", "dk"), got, want):
                    report(f"lower bound {form} {name} {dname} D={dim} Dv={dv} causal={causal}", a, b, 2e-5)

    # The bucket-table primitives (tables.cu): C values or C x F outer products per token; one token and 90
    # (a walk and a sum of added tokens: _plans.ADD_WALK_MAX_TOKENS); reads plain and with weights.
    for n, channels, width in [(70, 17, None), (1, 12, 20), (90, 8, 33)] if "buckets" in families else ():
        tau, m = 3, 4
        codes = rng.integers(0, 2**tau, (2, m, n))
        values, outer = rng.standard_normal((2, n, channels)), rng.standard_normal((2, n, width or 1))
        mask = rng.random((2, n)) < 0.8
        factors = None if width is None else dev(outer, dtype)
        kw = dict(mask=dev(mask, torch.bool), hash_bits=tau, outer=factors)
        want = ref.bucket_tables(codes, host(values, dtype), mask=mask, hash_bits=tau,
                                 outer=None if width is None else host(outer, dtype))  # fmt: skip
        what = f"{dname} N={n} C={channels} F={width}"
        tables = cuda.bucket_tables(dev(codes, torch.int32), dev(values, dtype), **kw)
        report(f"bucket_tables {what}", tables, want, 2e-5)
        base = rng.standard_normal(want.shape)
        grown = cuda.add_to_tables(dev(base), dev(codes, torch.int32), dev(values, dtype), **kw)
        report(f"add_to_tables {what}", grown, host(base, torch.float32) + want, 2e-5)
        weights = None if width is None else dev(values, dtype)
        got = cuda.read_buckets(dev(codes, torch.int32), dev(want), mask=kw["mask"], weights=weights)
        read = ref.read_buckets(codes, host(want, torch.float32), mask=mask,
                                weights=None if width is None else host(values, dtype))  # fmt: skip
        report(f"read_buckets {what}", got, read, 2e-5)

torch.cuda.synchronize()
print(f"{len(failures)} failed" if failures else "all kernels agree with yoso_reference")
sys.exit(1 if failures else 0)
