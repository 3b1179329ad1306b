"""CPU forward speed of yoso.attention on JAX arrays against torch SDPA, measured in the same run.

The issue's target (B*H = 8, D = 64, m = 32, tau = 8, float32, 2 cores): YOSO forward >= 3x faster
than torch.nn.functional.scaled_dot_product_attention at N = 8192, >= 5x at N = 16384, and time
linear in N (log-log slope <= 1.15 over 1k..16k).

    python packages/yoso-jax/benchmarks/cpu_forward.py                 # the target's shapes
    python packages/yoso-jax/benchmarks/cpu_forward.py --n 1024,4096 --repeats 3 --out bench.json

Per N, after warm-up, YOSO and SDPA are timed alternately (so that load from other processes hits
both alike) and the medians are reported. "api" times the eager ``yoso.attention`` call a user makes
(input checks, hash functions from ``seed``, one compiled program); "jit" times the same call inside
the user's own ``jax.jit`` with hash functions from a traced ``key``. The official numbers come from
``yoso bench``; this script is the backend's own check.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default="1024,2048,4096,8192,16384", help="sequence lengths, comma-separated")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--num-hashes", type=int, default=32)
    p.add_argument("--hash-bits", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per method and N (median)")
    p.add_argument("--cores", type=int, default=2, help="CPU cores both frameworks may use (0: all)")
    p.add_argument("--impl", default=None, help="YOSO_JAX_IMPL for this run (default: the environment's)")
    p.add_argument("--no-sdpa", action="store_true", help="time YOSO only")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args()


def _sdpa(torch, q, k, v):
    with torch.no_grad():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _timed(fn, sync) -> float:
    start = time.perf_counter()
    sync(fn())
    return time.perf_counter() - start


def main() -> int:
    args = _parse()
    # Pin the process before the frameworks start their thread pools: both see the same cores.
    if args.cores and hasattr(os, "sched_setaffinity"):
        available = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, set(available[: args.cores]))
    if args.impl:
        os.environ["YOSO_JAX_IMPL"] = args.impl

    import jax
    import jax.numpy as jnp
    import numpy as np

    import yoso
    import yoso_jax
    from yoso.cli import cpu_name

    torch = None
    if not args.no_sdpa:
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())

    lengths = [int(n) for n in args.n.split(",")]
    kw = dict(num_hashes=args.num_hashes, hash_bits=args.hash_bits)
    yoso.set_backend("jax")
    jitted = jax.jit(lambda q, k, v, key: yoso.attention(q, k, v, key=key, **kw))
    key = jax.random.key(0)
    rows = []
    print(
        f"YOSO (jax, level {yoso_jax.implementation()}) vs torch SDPA, float32, B={args.batch}, H={args.heads}, "
        f"D={args.dim}, m={args.num_hashes}, tau={args.hash_bits}, {len(os.sched_getaffinity(0))} cores"
    )
    print(f"{'N':>7} {'yoso api [ms]':>14} {'yoso jit [ms]':>14} {'sdpa [ms]':>11} {'speedup':>8}")
    for n in lengths:
        rng = np.random.default_rng(n)
        shape = (args.batch, args.heads, n, args.dim)
        data = [rng.standard_normal(shape, dtype=np.float32) for _ in range(3)]
        q, k, v = (jnp.asarray(x) for x in data)
        api = functools.partial(yoso.attention, q, k, v, seed=0, **kw)
        traced = functools.partial(jitted, q, k, v, key)
        runs = {"api": [], "jit": []}
        jax_sync = lambda out: out.block_until_ready()  # noqa: E731
        if torch is not None:
            runs["sdpa"] = []
            sdpa = functools.partial(_sdpa, torch, *(torch.from_numpy(x) for x in data))

        for _ in range(2):  # warm-up: compilation, allocator, caches
            api().block_until_ready()
            traced().block_until_ready()
        if torch is not None:
            sdpa()
        for _ in range(args.repeats):
            runs["api"].append(_timed(api, jax_sync))
            runs["jit"].append(_timed(traced, jax_sync))
            if torch is not None:
                runs["sdpa"].append(_timed(sdpa, lambda out: None))
        med = {name: statistics.median(t) * 1e3 for name, t in runs.items()}
        speedup = med["sdpa"] / med["api"] if "sdpa" in med else float("nan")
        rows.append({"n": n, **{f"{name}_ms": value for name, value in med.items()}, "speedup_api": speedup})
        sdpa_text = f"{med['sdpa']:>11.1f}" if "sdpa" in med else f"{'-':>11}"
        print(f"{n:>7} {med['api']:>14.1f} {med['jit']:>14.1f} {sdpa_text} {speedup:>7.1f}x", flush=True)

    slope = {}
    if len(lengths) > 1:
        log_n = np.log([r["n"] for r in rows])
        for name in ("api", "jit"):
            slope[name] = float(np.polyfit(log_n, np.log([r[f"{name}_ms"] for r in rows]), 1)[0])
        print(f"log-log slope of YOSO time over N: api {slope['api']:.3f}, jit {slope['jit']:.3f}")
    result = {
        "machine": {"cpu": cpu_name(), "python": platform.python_version(), "platform": platform.platform()},
        "versions": {
            "jax": jax.__version__,
            "torch": getattr(torch, "__version__", None),
            "yoso_jax": yoso_jax.__version__,
        },
        "config": {**vars(args), "level": yoso_jax.implementation(), "dtype": "float32"},
        "rows": rows,
        "slope": slope,
        "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
