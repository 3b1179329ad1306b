"""NVRTC (from NVIDIA's ``cuda-bindings``): CUDA C++ source -> cubin, with errors that point at real files.

No GPU and no driver are needed here, only the NVRTC runtime library (pip ``nvidia-cuda-nvrtc``), so
the build check runs in CI. Sources are read from the package's ``kernels/`` folder; each is handed to
NVRTC under its absolute path, prefixed by a ``#line 1 "<path>"`` directive, and the headers likewise,
so a compiler message reads ``/.../kernels/cumulate.cu(123): error: ...`` -- the real file and line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Options every program is compiled with (part of the cache key). No fast math: the collision
# probability's arccos must stay accurate to fp32 rounding.
BASE_OPTIONS = ("-std=c++17", "--generate-line-info", "-default-device")


class CompileError(RuntimeError):
    """NVRTC rejected a program; the message holds NVRTC's log (file(line): error ...)."""


@dataclass(frozen=True)
class Binary:
    """A compiled program: ``image`` is a cubin (``kind="cubin"``) or PTX text (``kind="ptx"``)."""

    image: bytes
    kind: str
    lowered: dict[str, str]  # name expression -> mangled kernel name
    log: str = ""


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as exc:  # pragma: no cover - exercised where cuda-bindings is missing
        raise ImportError("cuda-bindings is not installed (pip install cuda-bindings nvidia-cuda-nvrtc)") from exc
    return nvrtc


def _check(result, what: str, program=None):
    err = result[0]
    nvrtc = _nvrtc()
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        detail = nvrtc.nvrtcGetErrorString(err)[1]
        detail = detail.decode() if isinstance(detail, bytes) else str(detail)
        log = _log(program) if program is not None else ""
        raise CompileError(f"{what} failed ({detail})" + (f":\n{log}" if log else ""))
    return result[1] if len(result) == 2 else result[1:]


def _log(program) -> str:
    nvrtc = _nvrtc()
    err, size = nvrtc.nvrtcGetProgramLogSize(program)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS or size <= 1:
        return ""
    buffer = b" " * size
    nvrtc.nvrtcGetProgramLog(program, buffer)
    return buffer.rstrip(b"\x00").decode(errors="replace").strip()


def version() -> tuple[int, int]:
    """The NVRTC runtime's (major, minor); ImportError/OSError when it cannot be loaded."""
    nvrtc = _nvrtc()
    err, major, minor = nvrtc.nvrtcVersion()
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise OSError(f"nvrtcVersion failed: {err}")
    return int(major), int(minor)


def supported_archs() -> list[int]:
    """Compute capabilities this NVRTC can emit machine code for, e.g. [75, 80, 86, 89, 90, ...]."""
    nvrtc = _nvrtc()
    return sorted(int(a) for a in _check(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs"))


def parse_arch(arch: str | int) -> int:
    """``"sm_90"``, ``"90"``, ``"9.0"`` or 90 -> 90."""
    text = str(arch).strip().lower()
    match = re.fullmatch(r"(?:sm_|compute_)?(\d+)(?:\.(\d))?a?", text)
    if not match:
        raise ValueError(f"not a GPU architecture: {arch!r} (expected e.g. sm_80 or sm_90)")
    return int(match.group(1)) * 10 + int(match.group(2)) if match.group(2) else int(match.group(1))


def with_line_directive(path: Path) -> str:
    """The file's text, prefixed so that compiler messages name ``path`` and its real line numbers."""
    quoted = str(path).replace("\\", "\\\\").replace('"', '\\"')
    return f'#line 1 "{quoted}"\n' + path.read_text()


def compile_program(
    source: Path,
    names: tuple[str, ...] | list[str],
    arch: int,
    *,
    headers: tuple[Path, ...] = (),
    options: tuple[str, ...] = BASE_OPTIONS,
    ptx: bool = False,
) -> Binary:
    """Compile the .cu file ``source`` (and ``headers``, included by file name) for ``sm_<arch>``.

    ``names`` are the template instantiations to emit (NVRTC name expressions); the result maps each
    to its mangled symbol. ``ptx=True`` emits PTX for ``compute_<arch>`` instead of a cubin (for a GPU
    newer than this NVRTC knows, which the driver then compiles). Raises CompileError with NVRTC's log.
    """
    nvrtc = _nvrtc()
    source = Path(source).resolve()
    header_texts = [with_line_directive(Path(h).resolve()).encode() for h in headers]
    header_names = [Path(h).name.encode() for h in headers]
    program = _check(
        nvrtc.nvrtcCreateProgram(
            with_line_directive(source).encode(), str(source).encode(), len(headers), header_texts, header_names
        ),
        "nvrtcCreateProgram",
    )
    try:
        for name in names:
            _check(nvrtc.nvrtcAddNameExpression(program, name.encode()), f"nvrtcAddNameExpression({name})")
        target = f"--gpu-architecture={'compute' if ptx else 'sm'}_{arch}"
        opts = [o.encode() for o in (*options, target)]
        result = nvrtc.nvrtcCompileProgram(program, len(opts), opts)
        log = _log(program)
        if result[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"NVRTC could not compile {source} for sm_{arch}:\n{log}")
        lowered = {}
        for name in names:
            symbol = _check(nvrtc.nvrtcGetLoweredName(program, name.encode()), f"nvrtcGetLoweredName({name})")
            lowered[name] = symbol.decode() if isinstance(symbol, bytes) else str(symbol)
        if ptx:
            size = _check(nvrtc.nvrtcGetPTXSize(program), "nvrtcGetPTXSize")
            image = b" " * size
            _check(nvrtc.nvrtcGetPTX(program, image), "nvrtcGetPTX")
        else:
            size = _check(nvrtc.nvrtcGetCUBINSize(program), "nvrtcGetCUBINSize")
            image = b" " * size
            _check(nvrtc.nvrtcGetCUBIN(program, image), "nvrtcGetCUBIN")
        return Binary(image=bytes(image), kind="ptx" if ptx else "cubin", lowered=lowered, log=log)
    finally:
        nvrtc.nvrtcDestroyProgram(program)
