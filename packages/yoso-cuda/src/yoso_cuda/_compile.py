"""A program for a target: from the disk cache if it is there, else compiled with NVRTC and cached."""

from __future__ import annotations

import threading
from pathlib import Path

from . import _cache, _nvrtc
from ._kernels import HEADERS, KERNEL_DIR, PROGRAMS, Program

_lock = threading.Lock()


def sources(program: Program) -> dict[str, str]:
    """File name -> text of the program's .cu file and the headers it may include."""
    files = [program.path, *(KERNEL_DIR / h for h in HEADERS)]
    return {f.name: f.read_text() for f in files}


def target_name(arch: int, ptx: bool) -> str:
    return f"{'compute' if ptx else 'sm'}_{arch}"


def key_for(program: Program, arch: int, ptx: bool = False) -> str:
    return _cache.cache_key(
        sources=sources(program),
        names=program.names,
        options=_nvrtc.BASE_OPTIONS,
        target=target_name(arch, ptx),
        nvrtc=_nvrtc.version(),
    )


def compile_uncached(program: Program, arch: int, ptx: bool = False) -> _nvrtc.Binary:
    headers = tuple(KERNEL_DIR / h for h in HEADERS)
    return _nvrtc.compile_program(program.path, program.names, arch, headers=headers, ptx=ptx)


def binary(name: str | Program, arch: int, *, ptx: bool = False, directory: Path | None = None) -> _nvrtc.Binary:
    """The compiled program ``name`` (a key of ``PROGRAMS``, or a Program) for ``sm_<arch>`` (or PTX),
    from the disk cache (``directory``, default ``_cache.cache_dir()``) or compiled and stored there."""
    program = PROGRAMS[name] if isinstance(name, str) else name
    key = key_for(program, arch, ptx)
    with _lock:  # one compile per program per process; other processes are handled by atomic renames
        cached = _cache.load(key, directory)
        if cached is not None:
            return cached
        compiled = compile_uncached(program, arch, ptx)
        try:
            _cache.store(key, compiled, directory)
        except OSError:
            pass  # a read-only or full cache folder costs a recompile next time, nothing else
        return compiled
