"""Peak memory of one call, above what was allocated before it (the inputs are not counted).

* GPU, torch tensors: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` before the call (torch's caching allocator; what the kernels asked for).
* CPU: the process's peak resident set size. NumPy, torch and JAX all allocate from the same
  process, so its resident memory covers them all. Before the call, ``malloc_trim(0)`` hands freed
  heap pages back to the kernel (so memory glibc kept from earlier calls cannot hide new use) and
  writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's high-water mark ``VmHWM`` to the
  current RSS; after it, ``VmHWM - RSS_before`` is the peak. Linux only; elsewhere memory is not
  recorded (with that reason).
* GPU, JAX arrays: JAX's allocator has no resettable peak, so memory is not recorded (reason given).

Each meter has a floor (``floor_bytes``): a peak below it is not told apart from what measuring itself
moves, so it is recorded as "below floor", not as a number (``peak_below_floor``). For the RSS that is
1 MiB: the kernel counts resident memory in 4 KiB pages, which many kernels report through batched
per-thread or per-CPU counters that can lag by tens of pages (hundreds of KiB) per thread or CPU; and the
interpreter's own allocations (1 MiB pymalloc arenas, glibc's 128 KiB trim and mmap thresholds) move it by
as much during any call. (Measured on one machine: an empty call reads 4 KiB, a touched 16 KiB array
12 KiB.) torch's CUDA allocator counts exact blocks rounded to 512 bytes: its floor is one block.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

CLEAR_REFS = "/proc/self/clear_refs"
RSS_FLOOR_BYTES = 2**20  # see the module docstring: the resolution of a process's resident set size
CUDA_FLOOR_BYTES = 512  # the CUDA caching allocator's block size
STATUS = "/proc/self/status"


def _status_kib(field: str) -> int:
    with open(STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in {STATUS}")


class Meter:
    """``with meter.measure() as m: ...`` then ``m.peak_bytes`` (None with ``meter.reason``)."""

    method = ""
    reason: str | None = None
    floor_bytes = 0  # peaks below this are noise of the measurement, not data

    @contextlib.contextmanager
    def measure(self):
        box = _Peak()
        yield box

    def available_bytes(self) -> int | None:
        """Memory a point may still use (for predicting what fits), or None if unknown."""
        return None


class _Peak:
    peak_bytes: int | None = None


class RssMeter(Meter):
    method = (
        "CPU: peak resident set size of the process during one call, minus the RSS before it "
        "(malloc_trim(0), then VmHWM reset through /proc/self/clear_refs); covers NumPy, torch and JAX allocations"
    )
    floor_bytes = RSS_FLOOR_BYTES

    def __init__(self) -> None:
        self.reason = self._check()
        libc_name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(libc_name) if libc_name else None
        self._trim = getattr(libc, "malloc_trim", None)

    @staticmethod
    def _check() -> str | None:
        try:
            _status_kib("VmHWM")
            with open(CLEAR_REFS, "w") as f:
                f.write("5")
        except OSError as exc:
            return f"cannot reset the peak RSS here ({CLEAR_REFS}: {exc.strerror or exc})"
        return None

    @contextlib.contextmanager
    def measure(self):
        box = _Peak()
        if self.reason:
            yield box
            return
        if self._trim is not None:
            self._trim(0)
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        yield box
        box.peak_bytes = max(0, _status_kib("VmHWM") - before) * 1024

    def available_bytes(self) -> int | None:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None


class CudaMeter(Meter):
    method = "GPU: torch.cuda.max_memory_allocated during one call minus memory_allocated before it"
    floor_bytes = CUDA_FLOOR_BYTES

    @contextlib.contextmanager
    def measure(self):
        import torch

        box = _Peak()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        yield box
        torch.cuda.synchronize()
        box.peak_bytes = max(0, torch.cuda.max_memory_allocated() - before)

    def available_bytes(self) -> int | None:
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free)


class NoMeter(Meter):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.method = f"not measured: {reason}"


def meter_for(device: str, framework: str) -> Meter:
    if device == "cpu":
        return RssMeter()
    if framework == "jax":
        return NoMeter("JAX's GPU allocator exposes no resettable peak")
    return CudaMeter()
