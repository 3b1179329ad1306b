"""Time the cuda backend's lower-bound gradient in its two forms and the per-bucket choice, on a GPU.

``sampled_grads`` alone (the codes given), pairs vs tables vs auto, for three kinds of buckets at the
benchmark configuration (bf16, B*H = 64, D = Dv = 64, N = 4096):

* ``spread``: random codes, m = 32, tau = 8 -- about 16 tokens per bucket, the pair form's home ground;
* ``clustered``: m = 8, tau = 8, 90% of the tokens in 4 of the 256 buckets (what real, correlated
  tokens do to an LSH table);
* ``one-bucket``: m = 8, every token in one bucket: the pair form's worst case, N^2 pairs per hash.

CUDA events around each call, after a warm-up call (which also compiles); median of 5. It also checks
that the three forms agree (relative difference), so a fast wrong kernel cannot pass for a fast one.
Prints a table; ``cuda.sh`` stores it as $OUT/forms.txt. Nothing here was ever run without a GPU.

    python benchmarks/gpu/cuda_forms.py
"""

from __future__ import annotations

import functools
import statistics
import sys

import torch
from yoso_cuda.backend import CudaBackend

cuda = CudaBackend()
BATCH, N, D, DV = 64, 4096, 64, 64


def codes(kind: str, m: int, tau: int, generator) -> torch.Tensor:
    shape = (BATCH, m, N)
    if kind == "spread":
        return torch.randint(0, 2**tau, shape, generator=generator, device="cuda", dtype=torch.int32)
    if kind == "one-bucket":
        return torch.full(shape, 5, device="cuda", dtype=torch.int32)
    spread = torch.randint(0, 2**tau, shape, generator=generator, device="cuda", dtype=torch.int32)
    crowded = torch.randint(0, 4, shape, generator=generator, device="cuda", dtype=torch.int32)
    pick = torch.rand(shape, generator=generator, device="cuda") < 0.9
    return torch.where(pick, crowded, spread)


def time_ms(fn) -> float:
    fn()
    times = []
    for _ in range(5):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def main() -> int:
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(BATCH, N, d, device="cuda", generator=generator) for d in (D, D, DV))
    q, k = (torch.nn.functional.normalize(x, dim=-1).to(torch.bfloat16) for x in (q, k))
    v = v.to(torch.bfloat16)
    grad = torch.randn(BATCH, N, DV, device="cuda", generator=generator)
    print(f"bf16, B*H={BATCH}, N={N}, D=Dv={D}; sampled_grads(backward='lower_bound'), median of 5, ms")
    print(f"{'buckets':<11} {'m':>3} {'tau':>4} {'causal':>6} {'pairs':>9} {'tables':>9} {'auto':>9}  agreement")
    bad = 0
    for kind, m, tau in (("spread", 32, 8), ("clustered", 8, 8), ("one-bucket", 8, 8)):
        qc, kc = codes(kind, m, tau, generator), codes(kind, m, tau, generator)
        for causal in (False, True):
            results, times = {}, {}
            for form in ("pairs", "tables", "auto"):
                kw = dict(query_mask=None, key_mask=None, causal=causal, hash_bits=tau, backward="lower_bound")
                call = functools.partial(cuda.sampled_grads, qc, kc, q, k, v, grad, **kw, max_ratio=10.0 * tau)
                times[form] = time_ms(functools.partial(call, form=form))
                results[form] = call(form=form)
            worst = max(
                float((results[f][i] - results["pairs"][i]).norm() / results["pairs"][i].norm().clamp_min(1e-30))
                for f in ("tables", "auto")
                for i in (0, 1)
            )
            bad += worst > 1e-4
            cells = " ".join(f"{times[f]:9.2f}" for f in ("pairs", "tables", "auto"))
            print(f"{kind:<11} {m:>3} {tau:>4} {causal!s:>6} {cells}  {worst:.1e}{'  FAIL' if worst > 1e-4 else ''}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
