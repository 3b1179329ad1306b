"""The disk cache: keys, atomic writes, damaged files, and two processes compiling at once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import HERE, TINY
from yoso_cuda import _cache, _compile, _nvrtc


def _key(**overrides):
    fields = dict(sources={"a.cu": "x"}, names=("k<float>",), options=("-std=c++17",), target="sm_90", nvrtc=(13, 0))
    fields.update(overrides)
    return _cache.cache_key(**fields)


def test_key_depends_on_everything_that_changes_the_binary():
    base = _key()
    assert base == _key()
    variants = [
        _key(sources={"a.cu": "y"}),
        _key(sources={"a.cu": "x", "common.cuh": ""}),
        _key(names=("k<half_t>",)),
        _key(options=("-std=c++17", "-G")),
        _key(target="sm_80"),
        _key(target="compute_90"),
        _key(nvrtc=(13, 1)),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_program_key_follows_the_source_text(tmp_path):
    original = _compile.key_for(TINY, 90)
    copy = tmp_path / "tiny.cu"
    copy.write_text(TINY.path.read_text() + "\n// an edit\n")
    edited = _compile.key_for(type(TINY)("tiny.cu", TINY.names, tmp_path), 90)
    assert original != edited
    assert _compile.key_for(TINY, 80) != original


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("YOSO_CUDA_CACHE_DIR", str(tmp_path / "c"))
    assert _cache.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("YOSO_CUDA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _cache.cache_dir() == tmp_path / "xdg" / "yoso" / "cuda"


def test_store_then_load_round_trips(tmp_path):
    binary = _nvrtc.Binary(image=b"\x7fELF-some-bytes", kind="cubin", lowered={"k<float>": "_Z1kIfEvv"})
    path = _cache.store("abc", binary, tmp_path)
    assert path == tmp_path / "abc.bin"
    loaded = _cache.load("abc", tmp_path)
    assert loaded.image == binary.image and loaded.kind == "cubin" and loaded.lowered == binary.lowered
    assert [p.name for p in tmp_path.iterdir()] == ["abc.bin"], "no temporary file may remain"


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_files_are_misses(tmp_path, damage):
    path = _cache.store("k", _nvrtc.Binary(image=b"0123456789" * 10, kind="cubin", lowered={}), tmp_path)
    data = path.read_bytes()
    damaged = {
        "truncate": data[:-5],
        "flip": data[:-1] + bytes([data[-1] ^ 1]),
        "garbage": b"not a cache file",
        "empty": b"",
    }[damage]
    path.write_bytes(damaged)
    assert _cache.load("k", tmp_path) is None


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        _cache.store("k", _nvrtc.Binary(image=b"x", kind="cubin", lowered={}), tmp_path)
    assert list(tmp_path.iterdir()) == [], "neither a final nor a temporary file may remain"


def test_binary_compiles_once_then_reads_the_cache(cache_dir, monkeypatch):
    first = _compile.binary(TINY, 90)
    files = list(cache_dir.iterdir())
    assert len(files) == 1 and files[0].suffix == ".bin"

    def no_compile(*args, **kwargs):
        raise AssertionError("a cached program must not be recompiled")

    monkeypatch.setattr(_compile, "compile_uncached", no_compile)
    second = _compile.binary(TINY, 90)
    assert second.image == first.image and second.lowered == first.lowered


def test_damaged_cache_entry_is_recompiled(cache_dir):
    first = _compile.binary(TINY, 80)
    (entry,) = cache_dir.iterdir()
    entry.write_bytes(entry.read_bytes()[:100])
    again = _compile.binary(TINY, 80)
    assert again.image == first.image
    assert _cache.load(entry.stem, cache_dir) is not None, "the damaged entry is replaced"


def test_two_processes_compiling_at_once(cache_dir):
    """Both start with an empty cache and compile the same program; both succeed, one valid file remains."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        from conftest import TINY
        from yoso_cuda import _compile
        binary = _compile.binary(TINY, 90)
        print(len(binary.image), sorted(binary.lowered))
        """
    )
    env = {**os.environ, "YOSO_CUDA_CACHE_DIR": str(cache_dir)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (_out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
    assert outputs[0][0] == outputs[1][0]
    entries = list(cache_dir.iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".bin", entries
    assert _cache.load(entries[0].stem, cache_dir) is not None
