"""The on-disk cache of compiled kernels: one file per (sources, options, architecture, NVRTC version).

Compiling every instantiation of a .cu file takes seconds, so each result is kept in
``$YOSO_CUDA_CACHE_DIR`` (default ``$XDG_CACHE_HOME/yoso/cuda`` or ``~/.cache/yoso/cuda``). The key is a
SHA-256 of everything that changes the binary: the text of the .cu file and its headers, the name
expressions, the compiler options, the target architecture and the NVRTC version.

Several processes may compile the same program at once (a multi-GPU job starting up): each writes
to its own temporary file in the cache folder and renames it into place with ``os.replace``, which is
atomic on POSIX and Windows, so a reader sees either no file or a complete one. A file that is
truncated or corrupted anyway (disk full, a copy gone wrong) fails its checksum and is recompiled.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from ._nvrtc import Binary

MAGIC = b"YOSO-CUDA-KERNELS 1\n"


def cache_dir() -> Path:
    explicit = os.environ.get("YOSO_CUDA_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "yoso" / "cuda"


def cache_key(
    *, sources: dict[str, str], names: tuple[str, ...], options: tuple[str, ...], target: str, nvrtc: tuple[int, int]
) -> str:
    """SHA-256 over everything the binary depends on (``sources``: file name -> text)."""
    digest = hashlib.sha256()
    fields = {
        "sources": sorted(sources.items()),
        "names": list(names),
        "options": list(options),
        "target": target,
        "nvrtc": list(nvrtc),
    }
    digest.update(json.dumps(fields, sort_keys=True).encode())
    return digest.hexdigest()


def _path(key: str, directory: Path | None) -> Path:
    return (directory or cache_dir()) / f"{key}.bin"


def load(key: str, directory: Path | None = None) -> Binary | None:
    """The cached binary for ``key``, or None if absent or damaged (a damaged file is left to be replaced)."""
    try:
        data = _path(key, directory).read_bytes()
    except OSError:
        return None
    if not data.startswith(MAGIC):
        return None
    header_end = data.find(b"\n", len(MAGIC))
    if header_end < 0:
        return None
    try:
        header = json.loads(data[len(MAGIC) : header_end])
        image = data[header_end + 1 :]
        if len(image) != header["size"] or hashlib.sha256(image).hexdigest() != header["sha256"]:
            return None
        return Binary(image=image, kind=header["kind"], lowered=dict(header["lowered"]))
    except (ValueError, KeyError, TypeError):
        return None


def store(key: str, binary: Binary, directory: Path | None = None) -> Path:
    """Write ``binary`` under ``key`` atomically (temporary file + rename); returns the final path."""
    final = _path(key, directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "kind": binary.kind,
        "lowered": binary.lowered,
        "size": len(binary.image),
        "sha256": hashlib.sha256(binary.image).hexdigest(),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + binary.image)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return final
