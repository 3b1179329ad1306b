"""Shared fixtures of the yoso-cuda tests. Tests that need a GPU skip themselves with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from yoso_cuda import _runtime
from yoso_cuda._kernels import Program

HERE = Path(__file__).resolve().parent
TEST_KERNELS = HERE / "kernels"

TINY = Program("tiny.cu", ("scale<float>", "scale<bf16_t>"), TEST_KERNELS)
BROKEN = Program("broken.cu", ("broken<float>",), TEST_KERNELS)


def gpu_reason() -> str | None:
    return _runtime.unavailable_reason()


requires_gpu = pytest.mark.skipif(gpu_reason() is not None, reason=f"needs a CUDA GPU: {gpu_reason()}")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh, private kernel cache for the test."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("YOSO_CUDA_CACHE_DIR", str(directory))
    return directory
