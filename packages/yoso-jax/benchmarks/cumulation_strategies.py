"""The XLA cumulation's strategies (xla.bucket_sums) across sizes: compile time and run time apart.

python cumulation_strategies.py --batch 1,4,16 --n 64,256,1024,4096 --hashes 8,32,128 [--strategies flat,loop]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from yoso_jax import xla

VALUE_DIM, BITS = 64, 8


def _ints(text):
    return [int(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=_ints, default=[1, 4, 16])
    parser.add_argument("--n", type=_ints, default=[64, 256, 1024, 4096])
    parser.add_argument("--hashes", type=_ints, default=[8, 32, 128])
    parser.add_argument("--strategies", default="flat,unrolled,loop")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for batch in args.batch:
        for n in args.n:
            for m in args.hashes:
                codes = [jnp.asarray(rng.integers(0, 2**BITS, (batch, m, n)), jnp.int32) for _ in range(2)]
                values = jnp.asarray(rng.standard_normal((batch, n, VALUE_DIM)), jnp.float32)
                row = f"B*H={batch:2d} N={n:5d} m={m:3d}"
                for strategy in args.strategies.split(","):
                    if strategy == "unrolled" and m > 64:
                        row += f" | {strategy}: (m > 64 not tried)"
                        continue
                    f = jax.jit(lambda r, w, x, s=strategy: xla.bucket_sums(r, w, x, 1 << BITS, strategy=s))
                    t0 = time.perf_counter()
                    compiled = f.lower(*codes, values).compile()
                    compile_s = time.perf_counter() - t0
                    jax.block_until_ready(compiled(*codes, values))
                    cpu = []
                    for _ in range(5):
                        c0 = time.process_time()
                        jax.block_until_ready(compiled(*codes, values))
                        cpu.append(time.process_time() - c0)
                    run_ms = statistics.median(cpu) * 1e3
                    row += f" | {strategy}: compile {compile_s * 1e3:5.0f} ms, cpu {run_ms:7.2f} ms"
                print(row, flush=True)


if __name__ == "__main__":
    main()
