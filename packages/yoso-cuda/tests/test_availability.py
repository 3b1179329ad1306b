"""`yoso info` says exactly why the backend cannot run: missing packages, no driver, no GPU, old GPU."""

from __future__ import annotations

import sys

import pytest
from conftest import gpu_reason
from yoso_cuda import _runtime


def test_reason_here_is_specific():
    reason = gpu_reason()
    if reason is None:
        pytest.skip("this machine can run the backend")
    assert reason.startswith(("no NVIDIA driver", "no CUDA GPU", "torch ", "GPU architecture too old", "the NVIDIA"))


def test_missing_cuda_bindings(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", None)  # makes the import fail
    assert _runtime.unavailable_reason().startswith("cuda-bindings is not installed")


def test_missing_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    assert _runtime.unavailable_reason().startswith("torch is not installed")


def test_missing_nvrtc_library(monkeypatch):
    def broken():
        raise OSError("libnvrtc.so.13: cannot open shared object file")

    monkeypatch.setattr(_runtime._nvrtc, "version", broken)
    reason = _runtime.unavailable_reason()
    assert reason.startswith("the NVRTC runtime cannot be loaded") and "nvidia-cuda-nvrtc" in reason


class _FakeDriver:
    """Just enough of cuda.bindings.driver to walk the checks after cuInit."""

    def __init__(self, init_error="CUDA_SUCCESS", version=13000, count=1):
        import enum

        self.CUresult = enum.Enum("CUresult", ["CUDA_SUCCESS", "CUDA_ERROR_NO_DEVICE", "CUDA_ERROR_UNKNOWN"])
        self._init = getattr(self.CUresult, init_error)
        self._version = version
        self._count = count

    def cuInit(self, flags):
        return (self._init,)

    def cuDriverGetVersion(self):
        return self.CUresult.CUDA_SUCCESS, self._version

    def cuDeviceGetCount(self):
        return self.CUresult.CUDA_SUCCESS, self._count


@pytest.mark.parametrize(
    "driver, expected",
    [
        (dict(init_error="CUDA_ERROR_NO_DEVICE"), "no CUDA GPU"),
        (dict(version=12040), "supports CUDA 12.4 but NVRTC is 13."),
        (dict(count=0), "no CUDA GPU"),
    ],
)
def test_driver_states(monkeypatch, driver, expected):
    fake = _FakeDriver(**driver)
    monkeypatch.setattr(_runtime, "_driver", lambda: fake)
    monkeypatch.setattr(_runtime._nvrtc, "version", lambda: (13, 5))
    assert expected in _runtime.unavailable_reason()


def test_cpu_torch_with_a_gpu(monkeypatch):
    import torch

    fake = _FakeDriver()
    monkeypatch.setattr(_runtime, "_driver", lambda: fake)
    monkeypatch.setattr(_runtime._nvrtc, "version", lambda: (13, 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "cannot use the GPU" in _runtime.unavailable_reason()


def test_old_gpu(monkeypatch):
    import torch

    fake = _FakeDriver()
    monkeypatch.setattr(_runtime, "_driver", lambda: fake)
    monkeypatch.setattr(_runtime._nvrtc, "version", lambda: (13, 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Tesla T4")
    reason = _runtime.unavailable_reason()
    assert reason.startswith("GPU architecture too old: Tesla T4 (sm_75)") and "sm_80" in reason
