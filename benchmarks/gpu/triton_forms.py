"""Time the two forms of the sampled lower-bound gradient of the triton backend, and the per-bucket choice.

    python benchmarks/gpu/triton_forms.py --out DIR      # on a GPU (benchmarks/gpu/triton.sh runs it)

``sampled_grads`` alone (the primitive, given codes) at the issue's shape -- bf16, B*H = 64, D = Dv = 64,
m = 32, tau = 8 -- for unrelated tokens (uniform codes: buckets of N / 256 tokens) and clustered ones
(80% of the tokens in bucket 0 of every hash), with ``form="pairs"``, ``"tables"`` and ``"auto"``.
CUDA events, median of 5 after a warm-up; each form is checked against the pair form first. Pair
runs predicted to take over ~10 s are left out (clustered codes make the pair form quadratic). Writes
``DIR/forms.json`` and prints a table. Nothing here is a test: a GPU run records what it measured.
``--smoke`` runs a tiny problem (on the CPU under TRITON_INTERPRET=1 too) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from yoso_triton import launch
from yoso_triton.backend import TritonBackend

from yoso.testing import max_ratio

ROWS, DIM, M, TAU = 64, 64, 32, 8
MAX_PAIR_MACS = 2e13  # about a second of pair-form work per call
DEVICE = "cuda"


def problem(n, skew, gen):
    def unit(shape):
        return torch.nn.functional.normalize(torch.randn(shape, device=DEVICE, generator=gen), dim=-1)

    q, k = unit((ROWS, n, DIM)).bfloat16(), unit((ROWS, n, DIM)).bfloat16()
    v = torch.randn(ROWS, n, DIM, device=DEVICE, generator=gen).bfloat16()
    grad = torch.randn(ROWS, n, DIM, device=DEVICE, generator=gen).bfloat16()
    codes = [torch.randint(0, 1 << TAU, (ROWS, M, n), device=DEVICE, generator=gen, dtype=torch.int32) for _ in "qk"]
    if skew:
        codes = [torch.where(torch.rand(c.shape, device=DEVICE, generator=gen) < 0.8, 0, c) for c in codes]
    return (*codes, q, k, v, grad)


def pair_macs(q_codes, k_codes):
    """Multiply-adds of the pair form: sum over buckets of n_q n_k (Dv + 2D)."""
    ids = (torch.arange(ROWS * M, device=DEVICE)[:, None] << TAU).reshape(ROWS, M, 1)
    nq = torch.bincount((q_codes + ids).flatten(), minlength=(ROWS * M) << TAU).double()
    nk = torch.bincount((k_codes + ids).flatten(), minlength=(ROWS * M) << TAU).double()
    return float((nq * nk).sum()) * (DIM + 2 * DIM)


def time_ms(fn, repeats=5):
    fn()
    if DEVICE != "cuda":  # --smoke in the interpreter: wall time, meaningless but exercised
        start = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - start)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench-out/triton"))
    parser.add_argument("--n", default="1024,4096,16384")
    parser.add_argument("--smoke", action="store_true", help="a tiny problem, to check the script")
    args = parser.parse_args()
    global ROWS, DIM, M, TAU, DEVICE
    backend = TritonBackend()
    assert backend.availability() is None, backend.availability()
    DEVICE = backend.default_device()
    if args.smoke:
        ROWS, DIM, M, TAU, args.n = 2, 16, 2, 2, "64"
    gen = torch.Generator(DEVICE).manual_seed(0)
    rows, failed = [], False
    for skew in (False, True):
        for n in map(int, args.n.split(",")):
            codes_q, codes_k, *tensors = problem(n, skew, gen)
            macs = pair_macs(codes_q, codes_k)
            plan = []
            launch.on_plan = lambda hashes, table, plan=plan: plan.append(float(table.float().mean()))

            def run(form, causal, codes_q=codes_q, codes_k=codes_k, tensors=tensors):
                return backend.sampled_grads(
                    codes_q,
                    codes_k,
                    *tensors,
                    query_mask=None,
                    key_mask=None,
                    causal=causal,
                    hash_bits=TAU,
                    backward="lower_bound",
                    max_ratio=max_ratio(TAU),
                    form=form,
                )

            for causal in (False, True):
                baseline = run("pairs", causal) if macs <= MAX_PAIR_MACS else None
                for form in ("pairs", "tables", "auto"):
                    if form == "pairs" and baseline is None:
                        rows.append(dict(n=n, skew=skew, causal=causal, form=form, ms=None, note="skipped: too slow"))
                        continue
                    got = run(form, causal)
                    err = None
                    if baseline is not None:
                        err = max(
                            float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(got, baseline)
                        )
                        failed |= err > 2e-2
                    plan.clear()
                    ms = time_ms(lambda form=form, causal=causal: run(form, causal))
                    share = plan[0] if plan else 0.0
                    rows.append(dict(n=n, skew=skew, causal=causal, form=form, ms=ms, rel_err_vs_pairs=err,
                                     table_bucket_share=share, pair_macs=macs))  # fmt: skip
                    print(json.dumps(rows[-1]), flush=True)
    launch.on_plan = None
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)"
    meta = dict(device=device, torch=torch.__version__, shape=dict(rows=ROWS, dim=DIM, m=M, tau=TAU))
    (args.out / "forms.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"{'N':>6} {'codes':>9} {'order':>7} {'form':>7} {'ms':>10} {'tables':>7}")
    for r in rows:
        ms = f"{r['ms']:.3f}" if r["ms"] is not None else "skipped"
        share = f"{r.get('table_bucket_share', 0):.1%}"
        order = "causal" if r["causal"] else "full"
        print(f"{r['n']:>6} {'clustered' if r['skew'] else 'uniform':>9} {order:>7} {r['form']:>7} {ms:>10} {share:>7}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
