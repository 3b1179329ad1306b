"""Run the block-synchronous kernels' CUDA source on the CPU: g++ and the stand-ins of ``emulator/emu.h``.

``Emulator(programs)`` compiles the named programs of ``yoso_cuda._kernels.PROGRAMS`` (every instantiation
the build lists) into one shared library, and ``Emulator.launch`` has the signature of
``yoso_cuda._runtime.launch``: a test puts it in place of the real launcher and runs ``_ops`` on CPU
tensors, so the launch plan (grid, shared memory, argument order) and the kernels both run on real data.
Only kernels whose threads meet at ``__syncthreads`` alone can run (no warp intrinsics): the sampled
gradients' pair and table kernels, and the bucket-table primitives (tables.cu).

What it shows and what it cannot: see emulator/emu.h. It is a check of the source, not a GPU result.
``Emulator(sanitize=True)`` builds with AddressSanitizer, a CPU stand-in for compute-sanitizer's
memcheck: out-of-bounds reads and writes of the (CPU) tensors and of shared memory. It must run in a
process started with the ASan runtime preloaded (``asan_environment()``); ``python emulate.py`` is
that driver (tests/test_emulated_kernels.py starts it).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from yoso_cuda._kernels import HEADERS, KERNEL_DIR, PROGRAMS

HERE = Path(__file__).resolve().parent / "emulator"
# The one PTX instruction of common.cuh, and the declaration of dynamic shared memory.
HALF_ASM = 'asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));'
SHARED = "extern __shared__ float4 smem4[];"


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _source(programs: tuple[str, ...]) -> str:
    header = (KERNEL_DIR / HEADERS[0]).read_text()
    if HALF_ASM not in header:
        raise RuntimeError(f"common.cuh no longer holds {HALF_ASM!r}: update tests/emulate.py")
    parts = ['#include "emu.h"', header.replace(HALF_ASM, "f = emu_half_to_float(x.bits);")]
    names = []
    for name in programs:
        program = PROGRAMS[name]
        text = program.path.read_text().replace('#include "common.cuh"', "")
        if "__shared__" in text and SHARED not in text:  # kernels without shared memory need no stand-in
            raise RuntimeError(f"{program.file} declares shared memory other than {SHARED!r}: update tests/emulate.py")
        parts.append(f'#line 1 "{program.path}"\n' + text.replace(SHARED, "float4* smem4 = (float4*)emu::smem;"))
        names += program.names
    table = ",\n".join(f'  {{"{n}", [](void** a) {{ invoke(&{n}, a); }}}}' for n in names)
    parts.append(
        f"""
#include <utility>
template <typename... A, std::size_t... I>
void invoke_at(void (*f)(A...), void** args, std::index_sequence<I...>) {{ f(*static_cast<A*>(args[I])...); }}
template <typename... A>
void invoke(void (*f)(A...), void** args) {{ invoke_at(f, args, std::index_sequence_for<A...>{{}}); }}
struct Entry {{ const char* name; void (*call)(void**); }};
static const Entry entries[] = {{
{table}
}};
extern "C" const char* emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned threads,
                                  unsigned long smem, void** args) {{
  for (const Entry& e : entries)
    if (std::strcmp(e.name, name) == 0)
      return emu::run_grid({{gx, gy, gz}}, threads, smem, [&] {{ e.call(args); }});
  return "no such kernel instantiation";
}}
"""
    )
    return "\n".join(parts)


class Emulator:
    """The kernels of ``programs`` compiled for the CPU; ``launch`` replaces ``_runtime.launch``."""

    def __init__(self, programs: tuple[str, ...] = ("sampled_grads", "sampled_tables"), *, sanitize: bool = False):
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler (g++) for the kernel emulator")
        source = _source(programs)
        emu_h = (HERE / "emu.h").read_text()
        flags = ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"] if sanitize else ["-O1"]
        key = hashlib.sha256((source + emu_h + cxx + " ".join(flags)).encode()).hexdigest()[:16]
        folder = Path(tempfile.gettempdir()) / f"yoso-cuda-emulator-{os.getuid()}"
        folder.mkdir(exist_ok=True)
        library = folder / f"kernels-{key}.so"
        if not library.exists():
            cpp = folder / f"kernels-{key}.{os.getpid()}.cpp"  # per process: parallel test workers
            cpp.write_text(source)
            partial = folder / f"kernels-{key}.{os.getpid()}.so"
            cmd = [cxx, "-std=c++17", *flags, "-shared", "-fPIC", "-w", f"-I{HERE}", str(cpp), "-o", str(partial)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"the kernel emulator does not compile:\n{result.stderr[-4000:]}")
            partial.replace(library)  # atomic: concurrent test processes never load a half-written file
        self._lib = ctypes.CDLL(str(library))
        self._lib.emu_launch.restype = ctypes.c_char_p
        self._lib.emu_launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 4 + [ctypes.c_ulong, ctypes.c_void_p]
        self.launches: list[tuple] = []

    def launch(self, device, program, name, grid, block, smem, args) -> None:
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        self.launches.append((program, name, grid, block, smem))
        if min(grid) < 1:
            return
        params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        error = self._lib.emu_launch(name.encode(), *grid, block, smem, ctypes.cast(params, ctypes.c_void_p))
        if error is not None:
            raise RuntimeError(f"{name} (grid {grid}, block {block}, {smem} B shared): {error.decode()}")


def asan_environment() -> dict[str, str] | None:
    """The environment for a process that loads the sanitized emulator (the ASan runtime preloaded), or
    None where the compiler has no ASan runtime."""
    cxx = compiler()
    if cxx is None:
        return None
    runtime = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(runtime) or not os.path.exists(runtime):
        return None
    # Leaks are the interpreter's business; torch frees with the operator its allocator did not use.
    options = "detect_leaks=0:alloc_dealloc_mismatch=0:detect_stack_use_after_return=0:halt_on_error=1"
    return dict(os.environ, LD_PRELOAD=runtime, ASAN_OPTIONS=options)


def _sanitized_cases() -> int:
    """Both forms and the per-bucket choice on small cases, under ASan: exit status 0 if all agree with
    the reference (ASan itself aborts the process on a bad access)."""
    import numpy as np
    import torch
    from yoso_cuda import _ops, _runtime

    import yoso_reference as ref

    emulator = Emulator(("sampled_grads", "sampled_tables", "tables"), sanitize=True)
    _runtime.launch = emulator.launch
    _runtime.max_shared_memory = lambda index: 99 * 1024
    rng = np.random.default_rng(0)
    failures = 0
    cases = [(27, 41, 20, 12, 2, 2), (36, 36, 256, 256, 1, 1), (45, 45, 64, 64, 1, 1), (33, 33, 1, 7, 2, 3)]
    for n_query, n_key, dim, dv, m, tau in cases:
        for causal in (False, True) if n_query == n_key else (False,):
            for form in ("pairs", "tables", "auto"):
                qc, kc = rng.integers(0, 2**tau, (2, m, n_query)), rng.integers(0, 2**tau, (2, m, n_key))
                q, k = rng.standard_normal((2, n_query, dim)), rng.standard_normal((2, n_key, dim))
                v, g = rng.standard_normal((2, n_key, dv)), rng.standard_normal((2, n_query, dv))
                qm, km = rng.random((2, n_query)) < 0.8, rng.random((2, n_key)) < 0.8
                kw = dict(causal=causal, hash_bits=tau, backward="lower_bound", max_ratio=10.0 * tau)
                arrays = [torch.as_tensor(x, dtype=torch.int32) for x in (qc, kc)]
                arrays += [torch.as_tensor(x, dtype=torch.float32) for x in (q, k, v, g)]
                masks = dict(query_mask=torch.as_tensor(qm), key_mask=torch.as_tensor(km))
                got = _ops.sampled_grads(*arrays, **masks, **kw, form=form)
                want = ref.sampled_grads(qc, kc, q, k, v, g, query_mask=qm, key_mask=km, **kw)
                err = max(float(np.linalg.norm(a.double().numpy() - b) / np.linalg.norm(b)) for a, b in zip(got, want))
                ok = err < 2e-5
                failures += not ok
                print(
                    f"{'ok  ' if ok else 'FAIL'} {form:6} causal={causal!s:5} Nq={n_query} Nk={n_key} D={dim} Dv={dv}"
                )
    failures += _sanitized_table_cases(rng)
    return 1 if failures else 0


def _sanitized_table_cases(rng) -> int:
    """The bucket-table primitives (tables.cu) on small odd cases: each kernel, outer products and weights,
    half tokens, a walk and a sum of added tokens; the number that disagree with the reference."""
    import numpy as np
    import torch
    from yoso_cuda import _ops, _plans

    import yoso_reference as ref

    failures = 0
    batch, m, tau, channels, width = 2, 3, 3, 5, 4
    base = torch.as_tensor(rng.standard_normal((batch, m, 2**tau, channels, width)), dtype=torch.float32)
    for n, dtype, outer in ((37, torch.float16, False), (1, torch.float32, True), (70, torch.bfloat16, True)):
        codes = rng.integers(0, 2**tau, (batch, m, n))
        values, factors = rng.standard_normal((batch, n, channels)), rng.standard_normal((batch, n, width))
        mask = rng.random((batch, n)) < 0.7
        seen = {x: torch.as_tensor(a).to(dtype) for x, a in (("values", values), ("factors", factors))}
        rounded = {x: t.double().numpy() for x, t in seen.items()}
        kw = dict(mask=torch.as_tensor(mask), hash_bits=tau, outer=seen["factors"] if outer else None)
        codes_t = torch.as_tensor(codes, dtype=torch.int32)
        want = ref.bucket_tables(codes, rounded["values"], mask=mask, hash_bits=tau,
                                 outer=rounded["factors"] if outer else None)  # fmt: skip
        start = base if outer else base[..., 0].contiguous()
        got = {
            "bucket_tables": (_ops.bucket_tables(codes_t, seen["values"], **kw), want),
            "add_to_tables": (_ops.add_to_tables(start, codes_t, seen["values"], **kw), start.double().numpy() + want),
        }
        weights = seen["values"] if outer else None
        read = ref.read_buckets(codes, want, mask=mask, weights=rounded["values"] if outer else None)
        got["read_buckets"] = (_ops.read_buckets(codes_t, torch.as_tensor(want, dtype=torch.float32),
                                                 mask=kw["mask"], weights=weights), read)  # fmt: skip
        walk = "walk" if n <= _plans.ADD_WALK_MAX_TOKENS else "sum"
        for name, (a, b) in got.items():
            err = float(np.linalg.norm(a.double().numpy() - b) / np.linalg.norm(b))
            ok = err < 2e-5
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name:13} N={n} {str(dtype)[6:]} outer={outer!s:5} add={walk}")
    return failures


if __name__ == "__main__":  # the sanitized driver: python emulate.py, with asan_environment()
    sys.exit(_sanitized_cases())
