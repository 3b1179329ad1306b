"""Compile the kernels of representative launches for a GPU target, without a GPU.

The interpreter runs kernels as Python and accepts code the compiler rejects (a re-bound constexpr,
a shape that is not a compile-time constant, ...). This script runs the launch wrappers on CPU
tensors with the GPU tile sizes, but instead of launching, hands each new (kernel, signature,
constants) to ``triton.compile`` for the target -- Triton's bundled ptxas needs no driver.

    python packages/yoso-triton/tests/compile_kernels.py            # a quick set (CI)
    python packages/yoso-triton/tests/compile_kernels.py --full     # every dtype, shape and option
    python ... --arch 80                                            # another target (default 90)
    python ... --resources bucket_table_grads_kernel                # ptxas registers/spills, shared memory
    python ... --part 1/2                                           # every second configuration, from the 2nd

Exit status 1 if any kernel fails to compile. Must run without TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument(
        "--resources",
        metavar="KERNEL",
        action="append",
        default=[],
        help="print the registers, spills (ptxas -v) and shared memory of each configuration of KERNEL",
    )
    parser.add_argument(
        "--part",
        default="0/1",
        help="I/N: compile only configurations I, I+N, I+2N, ... in the order the launches meet them (so N "
        "processes share the work)",
    )
    args = parser.parse_args()
    part, parts = map(int, args.part.split("/"))
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_kernels.py compiles for a GPU: run it without TRITON_INTERPRET=1", file=sys.stderr)
        return 2

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    from yoso_triton import launch

    from yoso.testing import max_ratio

    types = {
        torch.float32: "*fp32",
        torch.float16: "*fp16",
        torch.bfloat16: "*bf16",
        torch.int32: "*i32",
        torch.int64: "*i64",
        torch.uint8: "*u8",
    }
    target = GPUTarget("cuda", args.arch, 32)
    seen: dict = {}
    failures = []

    def compile_instead(self, grid):
        def call(*call_args, **kwargs):
            bound = dict(zip(self.arg_names, call_args), **kwargs)
            signature, constants = {}, {}
            for p in self.params:
                value = bound[p.name]
                if p.is_constexpr:
                    signature[p.name], constants[p.name] = "constexpr", value
                elif isinstance(value, torch.Tensor):
                    signature[p.name] = types[value.dtype]
                elif isinstance(value, int):
                    signature[p.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                else:
                    signature[p.name] = "fp32"
            # Launch options (num_warps, num_stages) shape the compiled kernel as much as the constants.
            options = {name: kwargs[name] for name in ("num_warps", "num_stages") if name in kwargs}
            key = (
                self.__name__,
                tuple(sorted(signature.items())),
                tuple(sorted(map(str, constants.items()))),
                tuple(sorted(options.items())),
            )
            if key in seen:
                return
            if len(seen) % parts != part:  # another part's configuration
                seen[key] = None
                return
            start = time.perf_counter()
            try:
                compiled = triton.compile(ASTSource(self, signature, constants), target=target, options=options)
                seen[key] = time.perf_counter() - start
                if self.__name__ in args.resources:
                    resources(self.__name__, constants, signature, compiled)
            except Exception as exc:  # report them all, then fail
                seen[key] = 0.0
                failures.append(f"{self.__name__} {constants}: {type(exc).__name__}: {exc}")
                print(f"FAILED {self.__name__} {constants}\n{exc}", flush=True)

        return call

    def resources(name, constants, signature, compiled):
        """ptxas -v on the kernel's PTX: registers per thread and spill bytes (no GPU needed)."""
        import re
        import subprocess
        import tempfile

        from triton.backends.nvidia.compiler import get_ptxas

        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
            ptx.write(compiled.asm["ptx"])
            ptx.flush()
            arch = f"sm_{args.arch}a" if args.arch >= 90 else f"sm_{args.arch}"
            done = subprocess.run(
                [get_ptxas(args.arch).path, "-v", f"-arch={arch}", ptx.name, "-o", os.devnull],
                capture_output=True,
                text=True,
            )
        used = re.search(r"Used (\d+) registers", done.stderr)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
        dtype = signature[next(iter(signature))]  # the first argument: an input tensor
        print(
            f"RESOURCES {name} {dtype} {dict(sorted((k, v) for k, v in constants.items()))}: "
            f"{used.group(1) if used else '?'} registers, spills {spills.groups() if spills else '?'}, "
            f"shared {compiled.metadata.shared} bytes, {compiled.metadata.num_warps} warps, "
            f"{compiled.metadata.num_stages} stages",
            flush=True,
        )

    # CPU tensors (the launch functions never ask the device), GPU tiles, and no launches: every
    # kernel call compiles instead. Nothing runs, so the sorts' index arrays hold garbage: the pair
    # kernel's view without the table buckets (a gather by bucket id) is skipped -- only shapes matter.
    launch.INTERPRETER_BLOCKS = False
    JITFunction.__getitem__ = compile_instead
    launch._without = lambda srt, table: srt

    gen = torch.Generator().manual_seed(0)
    # (dtype, batch, n, dim, dv, [(tau, m)], per-row planes too): the quick set reaches every branch of
    # every kernel -- split/fp32/per-token hashing, narrow and wide Hadamard, tables and prefix sums,
    # both sorts' block shapes, all estimators and orders, both forms of the lower bound (the table
    # kernel: full and causal, both walk directions, either mask), the bucket-table primitives -- in
    # about 90 configurations.
    cases = [
        (torch.bfloat16, 2, 300, 64, 64, [(8, 32)], False),
        (torch.float32, 3, 7, 33, 17, [(2, 5)], True),
    ]
    if args.full:
        cases = [
            (dtype, *shape, [(8, 32), (2, 5), (16, 3), (1, 20)], True)
            for dtype in (torch.bfloat16, torch.float32, torch.float16)
            for shape in [(2, 300, 64, 64), (3, 7, 33, 17), (1, 40, 256, 256), (2, 9, 3, 5)]
        ]
    for dtype, batch, n, dim, dv, hashes, per_row in cases:
        q, k = (
            torch.nn.functional.normalize(torch.randn(batch, n, dim, generator=gen), dim=-1).to(dtype) for _ in "qk"
        )
        v, grad = torch.randn(batch, n, dv).to(dtype), torch.randn(batch, n, dv).to(dtype)
        mask = torch.rand(batch, n, generator=gen) < 0.8
        for tau, m in hashes:
            for groups in (1, batch) if per_row else (1,):
                planes = torch.randn(groups, m, tau, dim)
                launch.hash_codes(q, planes, hashing="gaussian", num_hashes=m, hash_bits=tau)
                d_pad = launch._pow2(dim, 1)
                if tau <= d_pad:
                    diag = torch.ones(groups, -(-m // (d_pad // tau)), 3, d_pad)
                    launch.hash_codes(q, diag, hashing="hadamard", num_hashes=m, hash_bits=tau)
            codes = torch.randint(0, 2**tau, (batch, m, n), dtype=torch.int32)
            for order in ("none", "causal", "anticausal"):
                for masks in ((None, None), (mask, mask)):
                    launch.cumulate(
                        codes, codes, v, read_mask=masks[0], write_mask=masks[1], order=order, hash_bits=tau
                    )
            # The bucket tables as arrays, plain and of outer products, both adds: with masks in one case,
            # without in the other (each dtype's own configurations cost compile time, not coverage).
            masks = mask if per_row else None
            for extra, weights in ((None, None), (k, grad)):
                tables = launch.bucket_tables(codes, v, mask=masks, hash_bits=tau, outer=extra)
                for cut in (n, 1):  # sorted sums onto a base (long chunks), or straight adds (decoding)
                    launch.add_to_tables(
                        tables,
                        codes[..., :cut],
                        v[:, :cut],
                        mask=None if masks is None else masks[:, :cut],
                        hash_bits=tau,
                        outer=None if extra is None else extra[:, :cut],
                    )
                launch.read_buckets(codes, tables, mask=masks, weights=weights)
            for backward, form in (("lower_bound", "auto"), ("lower_bound", "tables"), ("exact", "auto")):
                for causal in (False, True):
                    launch.sampled_grads(
                        codes,
                        codes,
                        q,
                        k,
                        v,
                        grad,
                        query_mask=mask,
                        key_mask=None,
                        causal=causal,
                        hash_bits=tau,
                        backward=backward,
                        max_ratio=max_ratio(tau),
                        form=form,
                    )
        for causal in (False, True):
            launch.expectation_forward(q, k, v, query_mask=mask, key_mask=mask, causal=causal, hash_bits=8)
            for backward in ("exact", "lower_bound"):
                launch.expectation_backward(
                    q,
                    k,
                    v,
                    grad,
                    query_mask=None,
                    key_mask=mask,
                    causal=causal,
                    hash_bits=8,
                    backward=backward,
                    max_ratio=max_ratio(8),
                )
    compiled = {key: took for key, took in seen.items() if took is not None}
    kernels = sorted({key[0] for key in compiled})
    print(
        f"compiled {len(compiled)} of {len(seen)} configurations ({len(kernels)} kernels) for sm_{args.arch} "
        f"in {sum(compiled.values()):.0f} s; {len(failures)} failed"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
