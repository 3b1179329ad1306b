"""The loop over the grid: predict, skip what will not fit, measure, record, never crash.

Points run in order of increasing N, every method at one N before the next N (so SDPA and YOSO see
the same machine state). Before each point the time of one call and its peak memory are predicted
from the same series (method, pass, dtype) at the smaller N already measured: the local log-log
slope of the last two points (clamped to [1, 2.5] for time -- [2, 2.5] for the quadratic SDPA and
YOSO-E --, [1, 2] for memory), or 2 from a single point. A point predicted to take longer than
``max_call_s`` per call, or to need more memory than is available, is skipped with that reason, and
so is every larger N of its series. This is a prediction, not a timeout: a call that turns out
slower (a busy machine) still runs to its end. Out-of-memory errors are caught and recorded the
same way; an unsupported configuration (e.g. a dtype a backend lacks) is recorded as skipped with
the backend's message; any other exception as an error. The run goes on in every case.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time

from . import fidelity, report, workloads
from .memory import CUDA_FLOOR_BYTES, RSS_FLOOR_BYTES, meter_for
from .timing import time_cpu, time_gpu, wait

MEMORY_HEADROOM = 0.8  # use at most this share of the memory reported available
OOM_MARKERS = ("out of memory", "resource_exhausted", "can't allocate memory", "cannot allocate memory")


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    if type(exc).__name__ in ("OutOfMemoryError", "XlaRuntimeError") and "memory" in str(exc).lower():
        return True
    return any(marker in str(exc).lower() for marker in OOM_MARKERS)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _extrapolate(rows: list[dict], key: str, n: int, lo: float, hi: float):
    """(predicted value of ``key`` at ``n``, the N it was extrapolated from) or (None, None)."""
    pts = [(r["n"], r[key]) for r in rows if r.get(key)]
    if not pts:
        return None, None
    n2, y2 = pts[-1]
    if len(pts) >= 2:
        n1, y1 = pts[-2]
        slope = min(hi, max(lo, math.log(y2 / y1) / math.log(n2 / n1)))
    else:
        slope = 2.0
    return y2 * (n / n2) ** slope, n2


def _mib(b) -> str:
    return f"{b / 2**20:.0f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s >= 1 else f"{1e3 * s:.0f} ms"


def _free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


class _Series:
    """What earlier points of one (method, pass, dtype) series said about the next."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.stopped: str | None = None  # why every larger N is skipped


def measure_point(config, method, pass_, dtype, n, series: _Series, meters: dict) -> dict:
    """One point of the grid, as a result row (status ok, skipped or error)."""
    tau = config.tau(n)
    row = {
        "method": method.id,
        "backend": method.backend,
        "pass": pass_,
        "dtype": dtype,
        "n": n,
        "hash_bits": tau if method.kind != workloads.SDPA else None,
        "status": "ok",
        "reason": None,
    }
    if series.stopped:
        return {**row, "status": "skipped", "reason": series.stopped}

    # Exact attention (SDPA, YOSO-E) cannot grow slower than N^2, whatever small N suggested.
    min_slope = 2.0 if method.kind in (workloads.SDPA, "yoso-e") else 1.0
    predicted_ms, from_n = _extrapolate(series.rows, "ms", n, min_slope, 2.5)
    if predicted_ms is not None and predicted_ms / 1e3 > config.max_call_s:
        reason = (
            f"predicted {_seconds(predicted_ms / 1e3)} per call (extrapolated from N={from_n}) exceeds the "
            f"{_seconds(config.max_call_s)} limit per call (--max-call-seconds)"
        )
        series.stopped = f"a smaller N was skipped: {reason}"
        return {**row, "status": "skipped", "reason": reason}

    framework, _ = workloads.framework_for_dtype(method, dtype) if method.backend else ("torch", None)
    meter = meters.setdefault((config.device, framework), meter_for(config.device, framework or "numpy"))
    predicted_peak, from_n = _extrapolate(series.rows, "peak_bytes", n, 1.0, 2.0)
    available = meter.available_bytes()
    if predicted_peak is not None and available is not None and predicted_peak > MEMORY_HEADROOM * available:
        reason = (
            f"predicted peak {_mib(predicted_peak)} (extrapolated from N={from_n}) exceeds "
            f"{MEMORY_HEADROOM:.0%} of the {_mib(available)} available"
        )
        series.stopped = f"a smaller N was skipped: {reason}"
        return {**row, "status": "skipped", "reason": reason}

    workload = None
    try:
        with workloads.backend_context(method):
            workload = workloads.build(
                method,
                pass_,
                dtype=dtype,
                batch=config.batch,
                heads=config.heads,
                n=n,
                dim=config.dim,
                num_hashes=config.num_hashes,
                tau=tau,
                device=config.device,
                seed=config.seed,
            )
            peaks: list[int | None] = []

            def measured(i):
                if i != 0:
                    return None
                return _Recorder(meter, peaks)

            if config.device == "cpu":
                timing = time_cpu(
                    workload.fn,
                    budget_s=config.point_budget_s,
                    predicted_s=None if predicted_ms is None else predicted_ms / 1e3,
                    on_call=measured,
                )
            else:
                workload.fn()  # warm-up (and compilation) outside the memory measurement
                with _Recorder(meter, peaks):
                    wait(workload.fn())
                timing = time_gpu(workload.fn, framework=workload.framework, budget_s=config.point_budget_s)
    except Exception as exc:  # noqa: BLE001 -- one point's failure must not end the run
        workload = None
        _free_memory(config.device)
        if _is_oom(exc):
            reason = f"out of memory: {_first_line(exc)}"
            series.stopped = f"a smaller N ran out of memory ({_first_line(exc)})"
            return {**row, "status": "skipped", "reason": reason}
        if isinstance(exc, (NotImplementedError, ValueError, TypeError)):
            return {**row, "status": "skipped", "reason": f"unsupported: {_first_line(exc)}"}
        return {**row, "status": "error", "reason": _first_line(exc)}
    row.update(
        framework=workload.framework,
        ms=timing.ms,
        ms_min=timing.ms_min,
        ms_max=timing.ms_max,
        repeats=timing.repeats,
        warmup=timing.warmup,
        peak_bytes=peaks[0] if peaks else None,
        input_bytes=workload.input_bytes,
    )
    if row["peak_bytes"] is not None and row["peak_bytes"] < meter.floor_bytes:
        # Below what the meter resolves: kept for the record, but not as the point's peak.
        row.update(
            peak_bytes=None, peak_below_floor=True, peak_floor_bytes=meter.floor_bytes, peak_bytes_raw=row["peak_bytes"]
        )
    if hasattr(os, "getloadavg"):  # on a shared machine, what else was running shows here
        row["load_1min"] = os.getloadavg()[0]
    if meter.reason:
        row["memory_note"] = meter.reason
    if workload.note:
        row["note"] = workload.note
    if method.kind == workloads.SDPA:
        flops = report.sdpa_flops(config.batch, config.heads, n, config.dim, pass_)
        row["tflops"] = flops / (timing.ms * 1e-3) / 1e12
    workload = None
    _free_memory(config.device)
    series.rows.append(row)
    return row


class _Recorder:
    """Context manager wrapping the meter, appending the peak (or None) to ``peaks``."""

    def __init__(self, meter, peaks) -> None:
        self._cm = meter.measure()
        self._peaks = peaks

    def __enter__(self):
        self._box = self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        self._peaks.append(self._box.peak_bytes)
        return False


# ---- progress ----------------------------------------------------------------------------------


class _Progress:
    """A rich progress bar on stderr (plain lines when rich is missing), plus a log line per point."""

    def __init__(self, total: int) -> None:
        self._bar = None
        self._done = 0
        self._total = total
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("[bold]yoso bench[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.description}"),
                console=Console(stderr=True),
            )
        except ImportError:
            pass

    def __enter__(self):
        if self._bar is not None:
            self._bar.__enter__()
            self._task = self._bar.add_task("", total=self._total)
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start(self, what: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=what)

    def done(self, line: str) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
            self._bar.advance(self._task)
        else:
            print(f"[{self._done}/{self._total}] {line}", file=sys.stderr, flush=True)


def _describe(row: dict, method) -> str:
    head = f"{row['pass']:<16} {row['dtype']:<8} N={row['n']:<6} {method.label:<26}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row['reason']}"
    text = f"{head} {report.fmt_ms(row['ms'])} ms (median of {row['repeats'] or 'do_bench'})"
    if row.get("ratio_to_sdpa") is not None and method.kind != workloads.SDPA:
        text += f", {row['ratio_to_sdpa']:.2g}x SDPA's time"
    if row.get("tflops") is not None:
        text += f", {row['tflops']:.3g} TFLOP/s"
    peak = report.fmt_peak(row)
    if peak is not None:
        text += f", peak {peak}"
    return text


# ---- the run -----------------------------------------------------------------------------------


def run(config, echo=print) -> dict:
    started = time.perf_counter()
    methods = workloads.methods_for(config.backends, config.num_hashes, config.device)
    passes = workloads.PASSES if config.backward else ("forward",)
    points = [(d, n, p, m) for d in config.dtypes for n in config.ns for p in passes for m in methods]
    fidelity_points = (
        [(b, kind, n) for b in config.backends for kind in fidelity.DATA for n in config.fidelity_ns]
        if config.fidelity
        else []
    )
    data = {"schema": report.SCHEMA, **report.environment(config, config.backends), "notes": config.notes}
    data["config"] = {
        "device": config.device,
        "dtypes": list(config.dtypes),
        "passes": list(passes),
        "backends": list(config.backends),
        "batch": config.batch,
        "heads": config.heads,
        "dim": config.dim,
        "num_hashes": config.num_hashes,
        "hash_bits": config.hash_bits,
        "ns": list(config.ns),
        "quick": config.quick,
        "seed": config.seed,
        "point_budget_s": config.point_budget_s,
        "max_call_s": config.max_call_s,
        "inputs": "q, k, v [B, H, N, D] i.i.d. standard Gaussian (cotangent likewise), cast to the dtype",
        "hash_functions": "Gaussian hyperplanes drawn once per point (seed) and passed as planes=, not timed",
    }
    data["warnings"] = _busy_warning()
    for warning in data["warnings"]:
        print(f"yoso bench: warning: {warning}", file=sys.stderr)
    cpu_meter = meter_for("cpu", "numpy") if config.device == "cpu" else None
    data["methodology"] = {
        "timing": (
            "CPU: warm-up call (skipped when one call is predicted to exceed the point budget), then repeats "
            "until the point budget is spent (at least one); wall clock; the median"
            if config.device == "cpu"
            else "GPU: triton.testing.do_bench (CUDA events, L2 flushed, median) when Triton is installed, else "
            "CUDA events with a manual L2 flush (median); JAX: wall clock around block_until_ready (median)"
        ),
        "memory": (cpu_meter.method if cpu_meter.reason is None else f"not measured: {cpu_meter.reason}")
        if cpu_meter
        else "GPU: torch.cuda.max_memory_allocated during one call minus memory_allocated before it (torch "
        "tensors); not measured for JAX on GPU",
        "peak_bytes": "extra memory of one call above what was allocated before it (the inputs are excluded; "
        "input_bytes gives their size)",
        "tflops": "SDPA only: FlashAttention convention, 4*B*H*N^2*D FLOPs forward and 3.5x that for "
        "forward+backward (backward = 2.5x forward), divided by the median time",
        "ratio_to_sdpa": "the method's median time / SDPA's at the same pass, dtype and N (< 1: faster than SDPA)",
        "slope": "least-squares slope of log(ms) vs log(N) over every measured N (tail_slope: the largest 3 N); "
        f"null (with the reason) unless {report.MIN_SLOPE_POINTS} or more N were measured, spanning at least "
        f"{report.MIN_SLOPE_SPAN:g}x, and never fitted in a quick run",
        "memory_floor": f"a peak below the meter's floor (peak_floor_bytes: {report.fmt_bytes(RSS_FLOOR_BYTES)} for "
        f"the CPU RSS, {report.fmt_bytes(CUDA_FLOOR_BYTES)} for torch's CUDA allocator) cannot be told from the "
        "measurement's own noise: such a row has peak_bytes null, peak_below_floor true and the reading in "
        "peak_bytes_raw",
        "skips": "a point predicted (from the smaller N of its series: the local log-log slope, at least 2 for "
        "SDPA and YOSO-E) to exceed max_call_s per call or the available memory is skipped with the reason, and "
        "every larger N of its series; a prediction, not a timeout (a call slower than predicted runs to its "
        "end); out-of-memory errors are caught and recorded likewise",
    }
    data["sdpa"] = workloads.SDPA
    data["methods"] = [
        {
            "id": m.id,
            "label": m.label,
            "kind": m.kind,
            "backend": m.backend,
            "framework": m.framework,
            "description": m.describe(config.num_hashes),
        }
        for m in methods
    ]
    results: list[dict] = []
    series: dict[tuple, _Series] = {}
    meters: dict = {}
    with _Progress(len(points) + len(fidelity_points)) as progress:
        for dtype, n, pass_, method in points:
            progress.start(f"{pass_} {dtype} N={n} {method.label}")
            row = measure_point(
                config, method, pass_, dtype, n, series.setdefault((method.id, pass_, dtype), _Series()), meters
            )
            results.append(row)
            report.add_ratios([r for r in results if r["n"] == n], workloads.SDPA)
            progress.done(_describe(row, method))
        report.add_ratios(results, workloads.SDPA)
        data["results"] = results
        data["slopes"] = report.slopes(results, quick=config.quick)
        data["fidelity"] = _fidelity(config, fidelity_points, progress) if config.fidelity else None

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    data["figures"] = []
    data["runtime_s"] = time.perf_counter() - started
    if hasattr(os, "getloadavg"):  # other jobs on the machine show here
        data["machine"]["load_average_end"] = list(os.getloadavg())
    json_path = out / "bench.json"
    json_path.write_text(report.to_json(data))
    for line in report.table(data):
        echo(line)
    if config.plots:
        try:
            data["figures"] = report.plot_all(data, out)
        except ImportError as exc:
            data["figures_skipped"] = f"matplotlib is not installed ({exc}); pip install 'yoso-bench[plot]'"
        data["runtime_s"] = time.perf_counter() - started
        json_path.write_text(report.to_json(data))
    written = ", ".join(str(out / f) for f in ["bench.json", *data["figures"]])
    echo(f"wrote {written} in {data['runtime_s']:.0f} s")
    return data


def _busy_warning() -> list[str]:
    """A warning when other work already keeps the CPUs busy (timings will be noisy)."""
    if not hasattr(os, "getloadavg"):
        return []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0]
    if load <= 0.75 * cores:
        return []
    return [
        f"the machine is busy before the run starts (load average {load:.1f} on {cores} cores): timings will be noisy"
    ]


def _fidelity(config, points, progress) -> dict:
    import yoso
    from yoso import backends
    from yoso.testing import framework_for

    rows, soft_rows, skipped = [], [], []
    for backend, kind, n in points:
        tau = config.tau(n)
        progress.start(f"fidelity {kind} N={n} ({backend})")
        impl = backends.get(backend)
        try:
            with yoso.set_backend(backend):
                angles, soft = fidelity.measure(
                    framework=framework_for(impl),
                    device=config.device,
                    n=n,
                    dim=config.dim,
                    tau=tau,
                    hashes=config.fidelity_hashes,
                    samples=config.fidelity_samples,
                    seed=config.seed,
                    kind=kind,
                )
        except Exception as exc:  # noqa: BLE001 -- recorded, the run goes on
            skipped.append({"backend": backend, "data": kind, "n": n, "reason": _first_line(exc)})
            progress.done(f"fidelity {kind:<9} N={n:<5} ({backend}): skipped: {_first_line(exc)}")
            continue
        for m, (angle, zero_rows) in angles.items():
            rows.append(
                {
                    "backend": backend,
                    "data": kind,
                    "n": n,
                    "hash_bits": tau,
                    "num_hashes": m,
                    "angle_deg": angle,
                    "zero_rows": zero_rows,
                }
            )
        soft_rows.append({"backend": backend, "data": kind, "n": n, "hash_bits": tau, "angle_deg": soft})
        summary = ", ".join(f"m={m}: {a:.1f}" for m, (a, _) in angles.items())
        progress.done(f"fidelity {kind:<9} N={n:<5} ({backend}): angle to N-YOSO-E [deg] {summary}; softmax {soft:.1f}")
    return {
        "description": "mean angle (degrees) between corresponding output rows: N-YOSO-m vs N-YOSO-E, and "
        "N-YOSO-E vs softmax(tau * q̂·k̂) V (normalised rows, as yoso demo defines it); float32 on each "
        "backend's own framework; averaged over every row of `samples` independent single-head samples; a zero "
        "N-YOSO-m row (a query colliding with no key in any hash) counts as 90 degrees, zero_rows is their share",
        "data": dict(fidelity.DATA),
        "samples": config.fidelity_samples,
        "dim": config.dim,
        "num_hashes": list(config.fidelity_hashes),
        "ns": list(config.fidelity_ns),
        "rows": rows,
        "softmax": soft_rows,
        "skipped": skipped,
    }
