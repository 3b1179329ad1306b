"""Peak resident memory of one forward+backward on the jax backend, above what was resident before
(the inputs), measured the way `yoso bench` does on CPUs (malloc_trim, then VmHWM reset).

    python peak_memory.py N [causal]          # B*H = 8, D = Dv = 64, m = 32, tau = 8, float32
"""

from __future__ import annotations

import ctypes
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import yoso

HEADS, DIM, HASHES, BITS = 8, 64, 32, 8


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def main(n: int, causal: bool) -> None:
    rng = np.random.default_rng(0)
    q, k, v, ct = (jnp.asarray(rng.standard_normal((1, HEADS, n, DIM), dtype=np.float32)) for _ in range(4))
    p = jnp.asarray(yoso.hash_planes(HASHES, BITS, DIM, seed=0).astype(np.float32))

    def f(q, k, v, p, ct):
        def forward(q, k, v):
            return yoso.attention(q, k, v, num_hashes=HASHES, hash_bits=BITS, planes=p, causal=causal)

        return jax.vjp(forward, q, k, v)[1](ct)

    with yoso.set_backend("jax"):
        compiled = jax.jit(f).lower(q, k, v, p, ct).compile()
        jax.block_until_ready(compiled(q, k, v, p, ct))
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f_:
            f_.write("5")
        before = _kib("VmRSS")
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v, p, ct))
        wall = time.perf_counter() - t0
        peak = (_kib("VmHWM") - before) / 1024
    inputs, outputs = 4 * HEADS * n * DIM * 4 / 2**20, 3 * HEADS * n * DIM * 4 / 2**20
    print(
        f"N={n} causal={causal}: wall {wall:.1f} s, peak above the inputs {peak:.0f} MiB "
        f"(inputs {inputs:.0f} MiB, outputs {outputs:.0f} MiB, 2 x inputs + outputs {2 * inputs + outputs:.0f} MiB)"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), len(sys.argv) > 2 and sys.argv[2] == "causal")
