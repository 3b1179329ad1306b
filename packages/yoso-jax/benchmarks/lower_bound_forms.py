"""Forward+backward of yoso.attention on the jax backend with each form of the lower-bound gradient,
side by side in one process, and torch SDPA on the same shapes.

    python lower_bound_forms.py N VARIANTS [REPEATS]     # VARIANTS: comma-separated of
        auto    the backend's choice (xla.sampled_grads)
        tables  the table form (yoso_jax.tables)
        pairs   the dense pair form
        old     the table form through xla.cumulate (scatter/gather of Dv*D-wide rows), as before
        sdpa    torch.nn.functional.scaled_dot_product_attention

B*H = 8, D = Dv = 64, m = 32, tau = 8, float32, i.i.d. Gaussian inputs; median of REPEATS after a
warm-up, compile time apart, and the compiled program's scratch memory.
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import yoso
from yoso_jax import pairwise, tables, xla

HEADS, DIM, HASHES, BITS = 8, 64, 32, 8


def _old(*args, causal, hash_bits):
    return pairwise.lower_bound_grads(*args, cumulate=xla.cumulate, causal=causal, hash_bits=hash_bits)


FORMS = {
    "auto": xla.sampled_grads,
    "tables": pairwise.sampled_grads_on(tables.lower_bound_tables),
    "pairs": pairwise.sampled_grads_on(tables.lower_bound_tables, choose=lambda *shapes: "pairs"),
    "old": pairwise.sampled_grads_on(_old),
}


def timed(fn, repeats):
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def _sdpa(host, repeats):
    import torch
    import torch.nn.functional as F

    q, k, v = (torch.as_tensor(x).requires_grad_() for x in host[:3])
    ct = torch.as_tensor(host[3])
    return timed(lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), ct), repeats)


def _yoso(host, planes, repeats):
    q, k, v, ct = (jnp.asarray(x) for x in host)
    p = jnp.asarray(planes)

    def f(q, k, v, p, ct):
        def forward(q, k, v):
            return yoso.attention(q, k, v, num_hashes=HASHES, hash_bits=BITS, planes=p)

        return jax.vjp(forward, q, k, v)[1](ct)

    with yoso.set_backend("jax"):
        t0 = time.perf_counter()
        compiled = jax.jit(f).lower(q, k, v, p, ct).compile()
        compile_s = time.perf_counter() - t0
        scratch = compiled.memory_analysis().temp_size_in_bytes / 2**20
        wall, cpu = timed(lambda: jax.block_until_ready(compiled(q, k, v, p, ct)), repeats)
    return wall, cpu, compile_s, scratch


def main(n: int, variants: list[str], repeats: int) -> None:
    rng = np.random.default_rng(0)
    host = [rng.standard_normal((1, HEADS, n, DIM), dtype=np.float32) for _ in range(4)]
    planes = yoso.hash_planes(HASHES, BITS, DIM, seed=0).astype(np.float32)
    original = xla.sampled_grads
    try:
        for variant in variants:
            if variant == "sdpa":
                wall, cpu = _sdpa(host, repeats)
                print(f"N={n:6d} {variant:7s} wall {wall * 1e3:9.0f} ms  cpu {cpu * 1e3:9.0f} ms", flush=True)
                continue
            xla.sampled_grads = FORMS[variant]  # the backend module's primitive, looked up per call
            jax.clear_caches()
            wall, cpu, compile_s, scratch = _yoso(host, planes, repeats)
            print(
                f"N={n:6d} {variant:7s} wall {wall * 1e3:9.0f} ms  cpu {cpu * 1e3:9.0f} ms  "
                f"compile {compile_s:5.1f} s  scratch {scratch:7.1f} MiB",
                flush=True,
            )
    finally:
        xla.sampled_grads = original


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3]) if len(sys.argv) > 3 else 3)
