"""The NVRTC side without a GPU: every instantiation compiles, errors name the real file and line."""

from __future__ import annotations

import re

import pytest
from conftest import BROKEN, TEST_KERNELS
from yoso_cuda import _compile, _kernels, _nvrtc, build


def test_nvrtc_is_loadable_and_knows_sm80_sm90():
    assert {80, 90} <= set(_nvrtc.supported_archs())


def test_cuda_packages_are_the_supported_major():
    """pyproject.toml and the README claim CUDA 13: NVRTC and cuda-bindings of that major, which must match."""
    from importlib.metadata import version

    major, _ = _nvrtc.version()
    assert major == 13
    assert int(version("cuda-bindings").split(".")[0]) == major


@pytest.mark.parametrize("text, arch", [("sm_80", 80), ("sm_90", 90), ("90", 90), ("8.6", 86), ("compute_90a", 90)])
def test_parse_arch(text, arch):
    assert _nvrtc.parse_arch(text) == arch


def test_parse_arch_rejects_garbage():
    with pytest.raises(ValueError, match="not a GPU architecture"):
        _nvrtc.parse_arch("hopper")


def test_every_kernel_name_is_instantiated_once():
    for program in _kernels.PROGRAMS.values():
        assert len(set(program.names)) == len(program.names), program.file
        assert program.path.is_file()


def test_build_one_program_for_sm90(capsys):
    """The CLI in process on the smallest program (CI runs the full `--arch sm_80 --arch sm_90` build)."""
    assert build.main(["--arch", "sm_90", "--program", "cumulate", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "ok   sm_90  cumulate.cu" in out and "all compiled: 1/1" in out


@pytest.mark.parametrize(
    "arch, name", [(80, "sampled_grads_tables<half_t, 32, 64>"), (90, "sampled_grads_tables<bf16_t, 16, 32>")]
)
def test_table_kernel_compiles(arch, name):
    """The table-form kernel for sm_80 and sm_90, one instantiation each (CI's full build does all of
    _kernels.PROGRAMS["sampled_tables"], every (TILE, DS) of _plans.TABLE_CONFIGS for every dtype)."""
    assert name in _kernels.PROGRAMS["sampled_tables"].names
    binary = _compile.compile_uncached(_kernels.Program("sampled_tables.cu", (name,)), arch)
    assert binary.kind == "cubin" and binary.lowered[name].startswith("_Z20sampled_grads_tables")


def test_build_lists_every_table_configuration():
    from yoso_cuda._plans import TABLE_CONFIGS

    names = set(_kernels.PROGRAMS["sampled_tables"].names)
    assert names == {
        f"sampled_grads_tables<{t}, {a}, {b}>" for t in _kernels.ELEMENT_TYPES.values() for a, b in TABLE_CONFIGS
    }


def test_build_refuses_old_architectures(capsys):
    assert build.main(["--arch", "sm_75"]) == 2
    assert "sm_80 and newer" in capsys.readouterr().err


def test_build_fails_on_a_compile_error(monkeypatch, capsys):
    monkeypatch.setitem(build.PROGRAMS, "broken", BROKEN)
    assert build.main(["--arch", "sm_80", "--program", "broken", "--jobs", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL sm_80  broken.cu" in out and "FAILED: 0/1" in out


def test_compile_error_points_at_the_real_file_and_line():
    source = TEST_KERNELS / "broken.cu"
    bad_line = next(i for i, line in enumerate(source.read_text().splitlines(), 1) if "not_declared" in line)
    with pytest.raises(_nvrtc.CompileError) as info:
        _compile.compile_uncached(BROKEN, 80)
    message = str(info.value)
    assert f"{source}({bad_line}): error" in message, message
    assert "this_name_is_not_declared" in message


def test_errors_in_headers_point_at_the_header(tmp_path):
    header = tmp_path / "common.cuh"
    header.write_text("#pragma once\n\n__device__ int helper() { return undeclared_in_header; }\n")
    source = tmp_path / "uses_header.cu"
    source.write_text('#include "common.cuh"\n__global__ void k(int* x) { *x = helper(); }\n')
    with pytest.raises(_nvrtc.CompileError) as info:
        _nvrtc.compile_program(source, ["k"], 80, headers=(header,))
    assert re.search(rf"{re.escape(str(header))}\(3\): error", str(info.value)), str(info.value)


def test_compiled_program_lists_mangled_names():
    binary = _compile.compile_uncached(_kernels.Program("tiny.cu", ("scale<half_t>",), TEST_KERNELS), 90)
    assert binary.kind == "cubin" and binary.image[:4] == b"\x7fELF"
    assert binary.lowered["scale<half_t>"].startswith("_Z5scaleI6half_t")


def test_ptx_for_gpus_newer_than_nvrtc():
    binary = _compile.compile_uncached(_kernels.Program("tiny.cu", ("scale<float>",), TEST_KERNELS), 90, ptx=True)
    assert binary.kind == "ptx" and b".target sm_90" in binary.image
