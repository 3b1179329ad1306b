"""Peak resident memory of one forward+backward on the jax backend, above what was resident before
(the inputs), measured the way `yoso bench` does on CPUs (malloc_trim, then VmHWM reset).

    python peak_memory.py N [causal] [torch]  # B*H = 8, D = Dv = 64, m = 32, tau = 8, float32

From JAX arrays (one compiled program; its scratch, ``temp_size_in_bytes``, is printed too: fixed by the
shapes, where the RSS peak moves by ~0.2 GiB between runs at N = 64k with the allocator's state), or with
``torch`` from CPU torch tensors (torch autograd around the backend's two programs).
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


def main(n: int, causal: bool, torch_tensors: bool) -> None:
    rng = np.random.default_rng(0)
    host = [rng.standard_normal((1, HEADS, n, DIM), dtype=np.float32) for _ in range(4)]
    planes = yoso.hash_planes(HASHES, BITS, DIM, seed=0).astype(np.float32)
    q, k, v, ct = (jnp.asarray(x) for x in host)
    p = jnp.asarray(planes)

    def f(q, k, v, p, ct):
        def forward(q, k, v):
            return yoso.attention(q, k, v, num_hashes=HASHES, hash_bits=BITS, planes=p, causal=causal)

        return jax.vjp(forward, q, k, v)[1](ct)

    scratch = ""
    if torch_tensors:
        import torch

        # torch.tensor copies into memory torch allocates (64-byte aligned, as in a model): JAX takes such
        # tensors without a copy, where NumPy's own allocations (16-byte aligned) are copied in.
        q, k, v = (torch.tensor(x, requires_grad=True) for x in host[:3])
        ct, p = torch.tensor(host[3]), torch.from_numpy(planes)

        def compiled(q, k, v, p, ct):
            out = yoso.attention(q, k, v, num_hashes=HASHES, hash_bits=BITS, planes=p, causal=causal)
            return torch.autograd.grad(out, (q, k, v), ct)

    with yoso.set_backend("jax"):
        if not torch_tensors:
            compiled = jax.jit(f).lower(q, k, v, p, ct).compile()
            scratch = f", compiled scratch {compiled.memory_analysis().temp_size_in_bytes / 2**20:.0f} MiB"
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
        f"N={n} causal={causal} {'torch' if torch_tensors else 'jax'} arrays: wall {wall:.1f} s, peak above the "
        f"inputs {peak:.0f} MiB (inputs {inputs:.0f} MiB, outputs {outputs:.0f} MiB, 2 x inputs + outputs "
        f"{2 * inputs + outputs:.0f} MiB){scratch}"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), "causal" in sys.argv[2:], "torch" in sys.argv[2:])
