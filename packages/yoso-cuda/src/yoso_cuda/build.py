"""Compile every kernel instantiation with NVRTC, for the given architectures: the CI build check.

    python -m yoso_cuda.build --arch sm_80 --arch sm_90           # exit status 1 on any error
    python -m yoso_cuda.build --arch sm_90 --populate-cache      # also fill the disk cache

Needs no GPU and no driver, only NVRTC (pip ``cuda-bindings nvidia-cuda-nvrtc``). Programs are compiled
in parallel processes (``--jobs``, default: the CPU count).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from . import _cache, _compile, _nvrtc
from ._kernels import PROGRAMS


def _build_one(name: str, arch: int, populate: bool) -> tuple[str, int, bool, str, float, int]:
    start = time.perf_counter()
    program = PROGRAMS[name]
    try:
        binary = _compile.compile_uncached(program, arch)
        if populate:
            _cache.store(_compile.key_for(program, arch), binary)
        return name, arch, True, binary.log, time.perf_counter() - start, len(binary.image)
    except _nvrtc.CompileError as exc:
        return name, arch, False, str(exc), time.perf_counter() - start, 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m yoso_cuda.build", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", required=True, help="target, e.g. sm_80 (repeatable)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPU count)")
    parser.add_argument("--populate-cache", action="store_true", help=f"store the results in {_cache.cache_dir()}")
    parser.add_argument("--program", action="append", choices=sorted(PROGRAMS), help="only these programs")
    args = parser.parse_args(argv)
    try:
        archs = [_nvrtc.parse_arch(a) for a in args.arch]
        major, minor = _nvrtc.version()
    except (ValueError, ImportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if any(a < 80 for a in archs):
        print("error: yoso-cuda targets sm_80 and newer", file=sys.stderr)
        return 2
    names = args.program or sorted(PROGRAMS)
    total = sum(len(PROGRAMS[n].names) for n in names)
    targets = ", ".join(f"sm_{a}" for a in archs)
    print(f"NVRTC {major}.{minor}: {len(names)} programs, {total} kernel instantiations, for {targets}")
    # slowest first: workers end together
    cost = {"expectation": 0, "sampled_tables": 1, "sampled_grads": 2, "hashing": 3, "cumulate": 4}
    jobs = sorted(((n, a) for a in archs for n in names), key=lambda job: (cost.get(job[0], 0), job[1]))
    failures = 0
    start = time.perf_counter()
    if args.jobs == 1:  # in this process (also what tests use)
        results = [_build_one(n, a, args.populate_cache) for n, a in jobs]
    else:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(_build_one, *zip(*jobs), [args.populate_cache] * len(jobs)))
    for name, arch, ok, log, seconds, size in results:
        file = PROGRAMS[name].file
        if ok:
            count = len(PROGRAMS[name].names)
            print(f"  ok   sm_{arch}  {file:<18} {count:3d} kernels  {size / 1024:7.0f} KiB  {seconds:5.1f} s")
            if log:
                print("\n".join("       " + line for line in log.splitlines()))
        else:
            failures += 1
            print(f"  FAIL sm_{arch}  {file}\n{log}")
    status = "FAILED" if failures else "all compiled"
    print(f"{status}: {len(jobs) - failures}/{len(jobs)} programs in {time.perf_counter() - start:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
