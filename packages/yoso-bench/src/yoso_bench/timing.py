"""How long one call takes: the median over repeats, measured the way the field measures.

* CPU: a warm-up call (skipped when a single call is predicted to exceed the point's budget), then
  as many repeats as fit in the budget (at least one), wall clock around each call; the median.
* GPU, torch tensors: ``triton.testing.do_bench`` when Triton is installed (CUDA events, the L2
  cache flushed before every call, median); otherwise the same by hand with CUDA events and a
  256 MB buffer zeroed before each call to flush L2.
* GPU, JAX arrays: JAX runs on its own CUDA streams, which events recorded on torch's stream would
  not bracket, so wall clock around ``block_until_ready`` (median of repeats, L2 not flushed).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

GPU_WARMUP_MS = 25
GPU_REP_MS = 100
L2_FLUSH_BYTES = 256 * 1024 * 1024


def wait(result) -> None:
    """Block until every array in ``result`` (an array or a tuple of arrays) has been computed."""
    items = result if isinstance(result, (tuple, list)) else (result,)
    for x in items:
        if isinstance(x, (tuple, list)):
            wait(x)
        elif type(x).__module__.startswith("torch"):
            if x.is_cuda:
                import torch

                torch.cuda.synchronize(x.device)
        elif hasattr(x, "block_until_ready"):
            x.block_until_ready()


@dataclass
class Timing:
    ms: float  # median
    ms_min: float
    ms_max: float
    repeats: int
    warmup: bool
    method: str
    extra: dict = field(default_factory=dict)


def cpu_method() -> str:
    return "wall clock (time.perf_counter) around each call; warm-up, then repeats within the budget; median"


def time_cpu(fn: Callable[[], object], *, budget_s: float, predicted_s: float | None, on_call=None) -> Timing:
    """Median wall-clock time of ``fn``; ``on_call(i)`` may wrap call ``i`` (the memory meter does)."""
    warmup = predicted_s is None or predicted_s <= budget_s
    if warmup:
        wait(fn())
    times: list[float] = []
    spent = 0.0
    while True:
        context = on_call(len(times)) if on_call else None
        if context is not None:
            context.__enter__()
        start = time.perf_counter()
        wait(fn())
        elapsed = time.perf_counter() - start
        if context is not None:
            context.__exit__(None, None, None)
        times.append(elapsed)
        spent += elapsed
        # Stop when the budget is spent or one more call would overrun it by much.
        if spent + elapsed > budget_s * 1.25 or len(times) >= 1000:
            break
    ms = [1e3 * t for t in times]
    return Timing(statistics.median(ms), min(ms), max(ms), len(ms), warmup, cpu_method())


def gpu_method(framework: str) -> str:
    if framework == "jax":
        return "wall clock around block_until_ready after warm-up; median of repeats; L2 not flushed"
    try:
        import triton.testing  # noqa: F401

        return "triton.testing.do_bench (CUDA events, L2 flushed before each call, median)"
    except ImportError:
        return "CUDA events around each call, a 256 MB buffer zeroed before each call to flush L2; median"


def time_gpu(fn: Callable[[], object], *, framework: str, budget_s: float) -> Timing:
    if framework == "jax":
        timing = time_cpu(fn, budget_s=min(budget_s, GPU_REP_MS / 1e3), predicted_s=None)
        timing.method = gpu_method("jax")
        return timing
    try:
        from triton.testing import do_bench
    except ImportError:
        return _cuda_events(fn)
    ms = do_bench(fn, warmup=GPU_WARMUP_MS, rep=GPU_REP_MS, return_mode="median")
    return Timing(float(ms), float(ms), float(ms), 0, True, gpu_method("torch"), {"do_bench_rep_ms": GPU_REP_MS})


def _cuda_events(fn) -> Timing:
    import torch

    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(GPU_WARMUP_MS / estimate))):
        fn()
    repeats = max(1, min(1000, int(GPU_REP_MS / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    ms = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return Timing(statistics.median(ms), min(ms), max(ms), repeats, True, gpu_method("torch"))
