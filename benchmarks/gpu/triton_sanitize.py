"""Run every main kernel of the triton backend once on small CUDA problems, for compute-sanitizer.

    compute-sanitizer --tool memcheck python benchmarks/gpu/triton_sanitize.py
    compute-sanitizer --tool racecheck python benchmarks/gpu/triton_sanitize.py

Shapes are odd on purpose (partial tiles, D and Dv not powers of two, masks, several buckets per
tile and buckets longer than a tile, both forms of the lower-bound gradient and the per-bucket mix)
so out-of-bounds accesses in the masked edges would show.
Run once without the sanitizer first: Triton then compiles outside it (and caches the binaries).
"""

from __future__ import annotations

import torch
from yoso_triton.backend import TritonBackend

from yoso.testing import max_ratio


def main() -> None:
    backend = TritonBackend()
    reason = backend.availability()
    assert reason is None, reason
    dev = backend.default_device()  # "cuda"; "cpu" under TRITON_INTERPRET=1 (to check this script)
    g = torch.Generator(dev).manual_seed(0)
    batch, n, nk, dim, dv, m = 3, 257, 190, 72, 40, 10

    def unit(*shape, dtype=torch.bfloat16):
        return torch.nn.functional.normalize(torch.randn(*shape, device=dev, generator=g), dim=-1).to(dtype)

    for dtype in (torch.bfloat16, torch.float32):
        q, k = unit(batch, n, dim, dtype=dtype), unit(batch, nk, dim, dtype=dtype)
        v = torch.randn(batch, nk, dv, device=dev, generator=g).to(dtype)
        grad = torch.randn(batch, n, dv, device=dev, generator=g).to(dtype)
        qm = torch.rand(batch, n, device=dev, generator=g) < 0.8
        km = torch.rand(batch, nk, device=dev, generator=g) < 0.8
        for tau in (2, 9):  # few buckets (long segments, tables) and many (sparse, prefix path)
            planes = torch.randn(batch, m, tau, dim, device=dev, generator=g)
            qc = backend.hash_codes(q, planes, hashing="gaussian", num_hashes=m, hash_bits=tau)
            kc = backend.hash_codes(k, planes[:1], hashing="gaussian", num_hashes=m, hash_bits=tau)
            diag = torch.randint(0, 2, (1, -(-m // (128 // tau)), 3, 128), device=dev, generator=g).float() * 2 - 1
            backend.hash_codes(q, diag, hashing="hadamard", num_hashes=m, hash_bits=tau)
            backend.cumulate(qc, kc, v, read_mask=qm, write_mask=km, order="none", hash_bits=tau)
            backend.cumulate(kc, qc, grad, read_mask=km, write_mask=qm, order="none", hash_bits=tau)
            qs, ks = qc[:, :, :nk], kc  # causal orders need as many readers as writers
            backend.cumulate(qs, ks, v, read_mask=qm[:, :nk], write_mask=km, order="causal", hash_bits=tau)
            backend.cumulate(ks, qs, v, read_mask=km, write_mask=qm[:, :nk], order="anticausal", hash_bits=tau)
            # Both forms of the lower bound, forced and chosen per bucket, on the hashed codes and on
            # skewed ones (80% of the tokens in bucket 0: a bucket longer than any tile, so "auto" runs
            # the table kernel and the pair kernel, on the sort without the table buckets, in one call).
            skewed = (torch.where(torch.rand(qc.shape, device=dev, generator=g) < 0.8, 0, qc), kc.clone())
            skewed[1][torch.rand(kc.shape, device=dev, generator=g) < 0.8] = 0
            runs = [(backward, form, (qc, kc)) for backward, form in (("exact", "auto"), ("lower_bound", "pairs"))]
            runs += [("lower_bound", form, codes) for form in ("tables", "auto") for codes in ((qc, kc), skewed)]
            for backward, form, (qcodes, kcodes) in runs:
                for causal in (False, True):
                    nq = nk if causal else n
                    backend.sampled_grads(
                        qcodes[:, :, :nq],
                        kcodes,
                        q[:, :nq],
                        k,
                        v,
                        grad[:, :nq],
                        query_mask=qm[:, :nq],
                        key_mask=km,
                        causal=causal,
                        hash_bits=tau,
                        backward=backward,
                        max_ratio=max_ratio(tau),
                        form=form,
                    )
        for causal in (False, True):
            nq = nk if causal else n
            backend.expectation_forward(q[:, :nq], k, v, query_mask=qm[:, :nq], key_mask=km, causal=causal, hash_bits=8)
            for backward in ("exact", "lower_bound"):
                backend.expectation_backward(
                    q[:, :nq],
                    k,
                    v,
                    grad[:, :nq],
                    query_mask=qm[:, :nq],
                    key_mask=km,
                    causal=causal,
                    hash_bits=8,
                    backward=backward,
                    max_ratio=max_ratio(8),
                )
    if dev == "cuda":
        torch.cuda.synchronize()
    print("triton_sanitize: all kernels ran")


if __name__ == "__main__":
    main()
