"""The CUDA driver side (``cuda.bindings.driver``): why the backend can or cannot run, loading the
compiled programs into the device's primary context, and launching kernels on torch's current stream.

Everything here is imported lazily: importing ``yoso_cuda`` needs neither a GPU nor a driver.
Every driver call's status is checked; a failure raises :class:`DriverError` naming the call and the
kernel. Kernel faults are reported asynchronously by CUDA (at the next synchronising call); set
``YOSO_CUDA_SYNC=1`` to synchronise after every launch and get the fault attributed to its kernel.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass, field

from . import _compile, _nvrtc

MIN_ARCH = 80  # sm_80 (Ampere) and newer: cp.async-era shared memory sizes, bf16 conversions
DEFAULT_SMEM = 48 * 1024  # dynamic shared memory a kernel may use without opting in


class DriverError(RuntimeError):
    """A CUDA driver call failed."""


def _driver():
    from cuda.bindings import driver

    return driver


def check(result, what: str):
    """Unpack a driver call's ``(CUresult, value...)``; raise DriverError on anything but success."""
    driver = _driver()
    err = result[0] if isinstance(result, tuple) else result
    if err != driver.CUresult.CUDA_SUCCESS:
        name = driver.cuGetErrorName(err)[1]
        text = driver.cuGetErrorString(err)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        text = text.decode() if isinstance(text, bytes) else str(text)
        raise DriverError(f"{what} failed: {name} ({text})")
    if isinstance(result, tuple):
        return result[1] if len(result) == 2 else result[1:] or None
    return None


# ---- can it run here? ----------------------------------------------------------------------------


def unavailable_reason() -> str | None:
    """None if kernels can run here, else exactly why not (for ``yoso info``)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed (yoso-cuda computes on torch CUDA tensors)"
    try:
        import cuda.bindings.driver  # noqa: F401
        import cuda.bindings.nvrtc  # noqa: F401
    except ImportError as exc:
        return f"cuda-bindings is not installed ({exc}); pip install cuda-bindings nvidia-cuda-nvrtc"
    try:
        nvrtc_major, nvrtc_minor = _nvrtc.version()
    except Exception as exc:  # the NVRTC shared library is missing or broken
        return f"the NVRTC runtime cannot be loaded ({type(exc).__name__}: {exc}); pip install nvidia-cuda-nvrtc"
    driver = _driver()
    try:
        err = driver.cuInit(0)
        err = err[0] if isinstance(err, tuple) else err
    except Exception as exc:  # libcuda.so not found: no NVIDIA driver on this machine
        return f"no NVIDIA driver: libcuda cannot be loaded ({type(exc).__name__})"
    if err == driver.CUresult.CUDA_ERROR_NO_DEVICE:
        return "no CUDA GPU: the NVIDIA driver is installed but sees no device"
    if err != driver.CUresult.CUDA_SUCCESS:
        return f"the NVIDIA driver failed to initialise (cuInit: {err})"
    version = check(driver.cuDriverGetVersion(), "cuDriverGetVersion")
    if version // 1000 < nvrtc_major:
        return (
            f"the NVIDIA driver supports CUDA {version // 1000}.{version % 1000 // 10} but NVRTC is "
            f"{nvrtc_major}.{nvrtc_minor}: yoso-cuda needs a driver for CUDA {nvrtc_major} or newer (update the driver)"
        )
    count = check(driver.cuDeviceGetCount(), "cuDeviceGetCount")
    if count == 0:
        return "no CUDA GPU: the NVIDIA driver sees no device"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} cannot use the GPU (a CPU-only build?); install a CUDA build of torch"
    archs = [major * 10 + minor for major, minor in (torch.cuda.get_device_capability(i) for i in range(count))]
    if max(archs) < MIN_ARCH:
        names = ", ".join(f"{torch.cuda.get_device_name(i)} (sm_{a})" for i, a in enumerate(archs))
        return f"GPU architecture too old: {names}; yoso-cuda needs sm_80 (Ampere) or newer"
    return None


def device_names() -> list[str]:
    import torch

    return [
        f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{arch(i)})"
        for i in range(torch.cuda.device_count())
        if arch(i) >= MIN_ARCH
    ]


def arch(index: int) -> int:
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


# ---- modules and launches ----------------------------------------------------------------------------


@dataclass
class _Device:
    context: object
    arch: int
    smem_optin: int
    modules: dict = field(default_factory=dict)  # program -> (CUmodule, lowered names)
    functions: dict = field(default_factory=dict)  # (program, name) -> [CUfunction, smem limit set]


_devices: dict[int, _Device] = {}
_lock = threading.Lock()


def _device(index: int) -> _Device:
    state = _devices.get(index)
    if state is not None:
        return state
    with _lock:
        if index not in _devices:
            driver = _driver()
            check(driver.cuInit(0), "cuInit")
            dev = check(driver.cuDeviceGet(index), f"cuDeviceGet({index})")
            context = check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")  # torch's context too
            attribute = driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
            optin = check(driver.cuDeviceGetAttribute(attribute, dev), "cuDeviceGetAttribute")
            _devices[index] = _Device(context=context, arch=arch(index), smem_optin=int(optin))
        return _devices[index]


def max_shared_memory(index: int) -> int:
    """Dynamic shared memory one block may use on device ``index`` (after opting in)."""
    return _device(index).smem_optin


def _target(device_arch: int) -> tuple[int, bool]:
    """(arch, ptx): machine code when this NVRTC knows the GPU, else PTX of the newest arch it knows."""
    supported = _nvrtc.supported_archs()
    if device_arch in supported:
        return device_arch, False
    older = [a for a in supported if a <= device_arch]
    if not older:
        raise DriverError(f"this NVRTC cannot compile for sm_{device_arch} (it knows {supported})")
    return max(older), True


def _function(index: int, program: str, name: str, smem: int):
    state = _device(index)
    key = (program, name)
    entry = state.functions.get(key)
    driver = _driver()
    if entry is None:
        with _lock:
            check(driver.cuCtxSetCurrent(state.context), "cuCtxSetCurrent")
            if program not in state.modules:
                target, ptx = _target(state.arch)
                binary = _compile.binary(program, target, ptx=ptx)
                module = check(driver.cuModuleLoadData(binary.image), f"cuModuleLoadData({program})")
                state.modules[program] = (module, binary.lowered)
            module, lowered = state.modules[program]
            if name not in lowered:
                raise DriverError(f"kernel {name} is not instantiated in {program} (see yoso_cuda/_kernels.py)")
            function = check(driver.cuModuleGetFunction(module, lowered[name].encode()), f"cuModuleGetFunction({name})")
            entry = state.functions[key] = [function, DEFAULT_SMEM]
    if smem > entry[1]:
        if smem > state.smem_optin:
            raise ValueError(f"{name} needs {smem} bytes of shared memory; this GPU allows {state.smem_optin}")
        attribute = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        check(driver.cuFuncSetAttribute(entry[0], attribute, smem), f"cuFuncSetAttribute({name}, {smem} B)")
        entry[1] = smem
    return entry[0]


def pointer(tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if tensor is None else tensor.data_ptr())


def i32(value: int) -> ctypes.c_int:
    if not -(2**31) <= int(value) < 2**31:
        raise ValueError(f"kernel argument {value} does not fit in int32")
    return ctypes.c_int(int(value))


def i64(value: int) -> ctypes.c_longlong:
    return ctypes.c_longlong(int(value))


def f32(value: float) -> ctypes.c_float:
    return ctypes.c_float(float(value))


def launch(device, program: str, name: str, grid, block: int, smem: int, args) -> None:
    """Launch kernel ``name`` of ``program`` on torch's current stream of ``device``.

    ``args`` are ctypes values in the kernel's parameter order (``pointer``, ``i32``, ``f32``...).
    """
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    if min(grid) < 1:
        return  # an empty problem: nothing to launch
    if grid[1] > 65535 or grid[2] > 65535:
        raise ValueError(f"{name}: grid {grid} exceeds CUDA's 65535 blocks in y/z")
    function = _function(index, program, name, smem)
    driver = _driver()
    state = _devices[index]
    check(driver.cuCtxSetCurrent(state.context), "cuCtxSetCurrent")
    stream = driver.CUstream(torch.cuda.current_stream(index).cuda_stream)
    params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
    check(
        driver.cuLaunchKernel(function, *grid, block, 1, 1, smem, stream, ctypes.addressof(params), 0),
        f"launching {name} (grid {grid}, block {block}, {smem} B shared)",
    )
    if os.environ.get("YOSO_CUDA_SYNC") == "1":
        check(driver.cuStreamSynchronize(stream), f"{name} (YOSO_CUDA_SYNC=1)")
