"""What a run leaves behind: derived numbers (ratios, TFLOP/s, slopes), the JSON, a table, figures."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform

import numpy as np

SCHEMA = "yoso-bench/1"
FIGURES = {"time": "time.png", "memory": "memory.png", "fidelity": "fidelity.png"}
FWD_BWD_FLOP_FACTOR = 3.5  # FlashAttention's convention: backward = 2.5 x forward, so fwd+bwd = 3.5 x


def sdpa_flops(batch: int, heads: int, n: int, dim: int, pass_: str) -> float:
    """FlashAttention-convention FLOPs of exact attention: 4*B*H*N^2*D forward (QK^T and PV, 2 FLOPs per MAC)."""
    forward = 4.0 * batch * heads * n * n * dim
    return forward if pass_ == "forward" else FWD_BWD_FLOP_FACTOR * forward


# A log-log slope is a claim about scaling: it needs this many measured N, spanning at least this factor.
# Fewer points (a quick run's grid, a series cut short by skips) give a number that reads as data but is
# mostly noise and overhead, so none is fitted.
MIN_SLOPE_POINTS = 3
MIN_SLOPE_SPAN = 4.0
QUICK_NO_SLOPES = "quick run: its grid and repeat budget are too small to show how time scales with N"


def fit_slope(ns, ms) -> float | None:
    """Least-squares slope of log(time) against log(N): 1 = linear, 2 = quadratic.

    None unless at least :data:`MIN_SLOPE_POINTS` distinct N were measured, the largest at least
    :data:`MIN_SLOPE_SPAN` times the smallest.
    """
    pairs = [(n, t) for n, t in zip(ns, ms) if t is not None and t > 0 and n > 0]
    distinct = {n for n, _ in pairs}
    if len(distinct) < MIN_SLOPE_POINTS or max(distinct) < MIN_SLOPE_SPAN * min(distinct):
        return None
    x = np.log([n for n, _ in pairs])
    y = np.log([t for _, t in pairs])
    return float(np.polyfit(x, y, 1)[0])


def slopes(results: list[dict], *, quick: bool = False) -> list[dict]:
    """Per (method, pass, dtype): the slope over every measured N and over the largest three.

    A slope that is not fitted is None with its ``reason``; a quick run fits none.
    """
    series: dict[tuple, list[dict]] = {}
    for r in results:
        if r["status"] == "ok":
            series.setdefault((r["method"], r["pass"], r["dtype"]), []).append(r)
    out = []
    for (method, pass_, dtype), rows in series.items():
        rows = sorted(rows, key=lambda r: r["n"])
        ns, ms = [r["n"] for r in rows], [r["ms"] for r in rows]
        entry = {
            "method": method,
            "pass": pass_,
            "dtype": dtype,
            "slope": None if quick else fit_slope(ns, ms),
            "tail_slope": None if quick else fit_slope(ns[-3:], ms[-3:]),
            "ns": ns,
        }
        if quick:
            entry["reason"] = QUICK_NO_SLOPES
        elif entry["slope"] is None:
            entry["reason"] = (
                f"not fitted: {len(ns)} measured N; a slope needs {MIN_SLOPE_POINTS} or more spanning at least "
                f"{MIN_SLOPE_SPAN:g}x"
            )
        out.append(entry)
    return out


def add_ratios(results: list[dict], sdpa_id: str) -> None:
    """``ratio_to_sdpa`` (time / SDPA's time at the same pass, dtype and N: < 1 is faster) and ``speedup``."""
    sdpa = {(r["pass"], r["dtype"], r["n"]): r for r in results if r["method"] == sdpa_id and r["status"] == "ok"}
    for r in results:
        base = sdpa.get((r["pass"], r["dtype"], r["n"]))
        ok = r["status"] == "ok" and base is not None
        r["ratio_to_sdpa"] = r["ms"] / base["ms"] if ok else None
        r["speedup_vs_sdpa"] = base["ms"] / r["ms"] if ok else None


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(config, backend_names) -> dict:
    """Date, command, machine and versions. The machine is what ``yoso info --json`` reports (``yoso.cli.info``)."""
    from yoso import backends
    from yoso.cli import info

    about = info()
    machine = {
        "cpu": about["cpu"],
        "gpus": about["gpus"],
        "platform": platform.platform(),
        "python": about["python"],
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        machine["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    packages = ("matplotlib", "yoso-api", "yoso-reference", "yoso-bench")
    versions = {"yoso": about["yoso"], **about["packages"], **{name: _version(name) for name in packages}}
    versions["backends"] = {name: backends.get(name).version() for name in backend_names}
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": config.command,
        "machine": machine,
        "versions": versions,
    }


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def fmt_bytes(b: int) -> str:
    return f"{b / 2**20:.0f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB" if b >= 2**10 else f"{b} B"


def fmt_peak(row: dict) -> str | None:
    """The peak memory of a result row for people: ``+12 MiB``, ``below floor (< 1 MiB)``, or None."""
    if row.get("peak_below_floor"):
        return f"below floor (< {fmt_bytes(row['peak_floor_bytes'])})"
    if row.get("peak_bytes") is not None:
        return f"+{fmt_bytes(row['peak_bytes'])}"
    return None


def table(data: dict) -> list[str]:
    """A plain-text summary: per dtype and pass, ms per method and N (ratio to SDPA), and the fitted slopes."""
    lines = []
    methods = {m["id"]: m for m in data["methods"]}
    results = data["results"]
    slope = {(s["method"], s["pass"], s["dtype"]): s["slope"] for s in data["slopes"]}
    unfitted = {s.get("reason") for s in data["slopes"] if s["slope"] is None}
    for dtype in data["config"]["dtypes"]:
        for pass_ in data["config"]["passes"]:
            rows = [r for r in results if r["dtype"] == dtype and r["pass"] == pass_]
            if not rows:
                continue
            ns = sorted({r["n"] for r in rows})
            # No column of dashes where nothing could be fitted (a quick run): its absence is explained below.
            with_slope = any(slope.get((mid, pass_, dtype)) is not None for mid in methods)
            lines.append(f"{pass_.replace('_', '+')} [{dtype}], ms (x SDPA's time):")
            lines.append(
                f"  {'method':<28}"
                + "".join(f"{'N=' + str(n):>18}" for n in ns)
                + (f"{'slope':>8}" if with_slope else "")
            )
            for mid in methods:
                cells = []
                for n in ns:
                    r = next((r for r in rows if r["method"] == mid and r["n"] == n), None)
                    if r is None:
                        cells.append("")
                    elif r["status"] != "ok":
                        cells.append(r["status"])
                    elif r.get("ratio_to_sdpa") is not None and mid != data["sdpa"]:
                        cells.append(f"{fmt_ms(r['ms'])} ({r['ratio_to_sdpa']:.2g}x)")
                    else:
                        cells.append(fmt_ms(r["ms"]))
                s = slope.get((mid, pass_, dtype))
                tail = (f"{s:>8.2f}" if s is not None else f"{'-':>8}") if with_slope else ""
                lines.append(f"  {methods[mid]['label']:<28}" + "".join(f"{c:>18}" for c in cells) + tail)
    if QUICK_NO_SLOPES in unfitted:
        lines.append(f"time-vs-N scaling not fitted ({QUICK_NO_SLOPES})")
    elif data["slopes"] and unfitted:
        lines.append(
            f"slope '-': fewer than {MIN_SLOPE_POINTS} measured N spanning {MIN_SLOPE_SPAN:g}x, too few to fit"
        )
    floored = [r for r in results if r.get("peak_below_floor")]
    if floored:
        lines.append(
            f"peak memory below the measurement floor (< {fmt_bytes(floored[0]['peak_floor_bytes'])}) at "
            f"{len(floored)} of {len(results)} points: recorded as null, not as a number"
        )
    skipped = [r for r in results if r["status"] != "ok"]
    if skipped:
        lines.append("not measured:")
        for r in skipped:
            lines.append(f"  {r['method']} {r['pass']} {r['dtype']} N={r['n']}: {r['status']}: {r['reason']}")
    return lines


# ---- figures ------------------------------------------------------------------------------------


def _subtitle(data: dict) -> str:
    c = data["config"]
    tau = c["hash_bits"]
    machine = data["machine"]
    where = machine["cpu"] if c["device"] == "cpu" else ", ".join(machine["gpus"])
    return (
        f"B={c['batch']} H={c['heads']} D={c['dim']} m={c['num_hashes']} tau={tau} -- {where} -- "
        f"{data['date_utc'][:10]}"
    )


def _n_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _set_n_axis(ax, ns) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [_n_label(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("sequence length N")


def _readable_log_ticks(axis) -> None:
    """1-2-5 ticks labelled as plain numbers: readable where the data spans less than a decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    axis.set_minor_formatter(NullFormatter())


# Per backend a pair of shades (tab20: dark, light) -- the dark one for N-YOSO-m, the light one for N-YOSO-E.
_TAB20 = (
    ("#1f77b4", "#aec7e8"),
    ("#ff7f0e", "#ffbb78"),
    ("#2ca02c", "#98df8a"),
    ("#d62728", "#ff9896"),
    ("#9467bd", "#c5b0d5"),
    ("#8c564b", "#c49c94"),
    ("#e377c2", "#f7b6d2"),
    ("#7f7f7f", "#c7c7c7"),
    ("#bcbd22", "#dbdb8d"),
    ("#17becf", "#9edae5"),
)
MARKERS = {"sdpa": "s", "yoso": "o", "yoso-e": "^"}
LINESTYLES = {"sdpa": "-", "yoso": "-", "yoso-e": "--"}


def _style(method: dict, dtype: str, dtypes, backends) -> dict:
    """Every method its own marker and colour, so that legend entries differ even where a short handle hides
    the dash: SDPA black squares; per backend one hue, dark circles on a solid line for N-YOSO-m and light
    triangles on a dashed line for N-YOSO-E (crosses on dash-dotted and dotted lines when fed torch tensors);
    later dtypes hollow markers."""
    kind = method["kind"]
    if kind == "sdpa":
        color = "black"
    else:
        dark, light = _TAB20[backends.index(method["backend"]) % len(_TAB20)]
        color = dark if kind == "yoso" else light
    style = {"color": color, "ls": LINESTYLES.get(kind, ":"), "marker": MARKERS.get(kind, "D")}
    if kind != "sdpa" and method.get("framework") == "torch" and method["id"].endswith("/torch"):
        style.update(marker="x" if kind == "yoso" else "+", ls="-." if kind == "yoso" else ":")  # torch tensors
    if dtype != dtypes[0]:
        style["markerfacecolor"] = "white"
        style["alpha"] = 0.7
    return style


def _series_plot(ax, data, pass_, value, ylabel, with_slope=False, floors=None):
    """One line per (method, dtype) over N. ``floors``: the measurement floor of each point shown below it."""
    methods = data["methods"]
    dtypes = data["config"]["dtypes"]
    backends = data["config"]["backends"]
    slope = {(s["method"], s["pass"], s["dtype"]): s["slope"] for s in data["slopes"]}
    ns = set()
    below = []
    for dtype in dtypes:
        for m in methods:
            rows = sorted(
                (
                    r
                    for r in data["results"]
                    if r["method"] == m["id"] and r["pass"] == pass_ and r["dtype"] == dtype and r["status"] == "ok"
                ),
                key=lambda r: r["n"],
            )
            if floors is not None:
                below += [r for r in rows if floors(r) is not None]
            rows = [r for r in rows if value(r) is not None]
            if not rows:
                continue
            label = m["label"] + (f" [{dtype}]" if len(dtypes) > 1 else "")
            s = slope.get((m["id"], pass_, dtype))
            if with_slope and s is not None:
                label += f", slope {s:.2f}"
            ax.plot([r["n"] for r in rows], [value(r) for r in rows], label=label, **_style(m, dtype, dtypes, backends))
            ns.update(r["n"] for r in rows)
    if below:  # where values would be noise: one line at the floor, not points drawn as if measured
        floor = max(floors(r) for r in below)
        points = f"{len(below)} point{'s' if len(below) > 1 else ''}"
        ax.axhline(floor, color="gray", ls=":", lw=1, label=f"measurement floor ({points} below it, not drawn)")
        ns.update(r["n"] for r in below)
    ax.set_yscale("log")
    _readable_log_ticks(ax.yaxis)
    ax.set_ylabel(ylabel)
    _set_n_axis(ax, sorted(ns) or data["config"]["ns"])
    ax.grid(True, which="both", alpha=0.3)
    if ns:
        ax.legend(fontsize=7, handlelength=3.5)


def time_figure(data: dict):
    """The time-vs-N figure (one panel per pass), not yet saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = data["config"]["passes"]
    fig, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 4.5), squeeze=False)
    for ax, pass_ in zip(axes[0], passes):
        _series_plot(ax, data, pass_, lambda r: r["ms"], "time [ms]", with_slope=True)
        ax.set_title(f"{pass_.replace('_', '+')}: time vs N")
    fig.suptitle("yoso bench: time -- " + _subtitle(data), fontsize=9)
    fig.tight_layout()
    return fig


def memory_figure(data: dict):
    """The peak-memory-vs-N figure; points below the measurement floor are a dotted line at the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = data["config"]["passes"]
    fig, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 4.5), squeeze=False)
    mib = lambda r: r["peak_bytes"] / 2**20 if r.get("peak_bytes") else None  # noqa: E731
    floor = lambda r: r["peak_floor_bytes"] / 2**20 if r.get("peak_below_floor") else None  # noqa: E731
    for ax, pass_ in zip(axes[0], passes):
        _series_plot(ax, data, pass_, mib, "peak memory above inputs [MiB]", floors=floor)
        ax.set_title(f"{pass_.replace('_', '+')}: peak memory vs N")
    fig.suptitle("yoso bench: memory -- " + _subtitle(data), fontsize=9)
    fig.tight_layout()
    return fig


def plot_all(data: dict, out) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, make in (("time", time_figure), ("memory", memory_figure)):
        fig = make(data)
        fig.savefig(out / FIGURES[name], dpi=120)
        plt.close(fig)
        written.append(FIGURES[name])

    fid = data.get("fidelity")
    if fid and fid.get("rows"):
        kinds = list(fid["data"])
        backends = list(dict.fromkeys(r["backend"] for r in fid["rows"]))
        fig, axes = plt.subplots(
            len(backends), len(kinds), figsize=(6 * len(kinds), 4.2 * len(backends)), squeeze=False
        )
        for i, backend in enumerate(backends):
            for j, kind in enumerate(kinds):
                ax = axes[i][j]
                rows = [r for r in fid["rows"] if r["backend"] == backend and r["data"] == kind]
                for m in fid["num_hashes"]:
                    pts = sorted((r["n"], r["angle_deg"]) for r in rows if r["num_hashes"] == m)
                    if pts:
                        ax.plot(*zip(*pts), "o-", label=f"N-YOSO-{m} vs N-YOSO-E")
                soft = sorted(
                    (r["n"], r["angle_deg"]) for r in fid["softmax"] if r["backend"] == backend and r["data"] == kind
                )
                if soft:
                    ax.plot(*zip(*soft), "k--", label="N-YOSO-E vs softmax")
                _set_n_axis(ax, fid["ns"])
                top = max([a for _, a in soft] + [r["angle_deg"] for r in rows], default=90)
                ax.set_ylim(0, min(95, 1.4 * top))  # headroom for the legend above the lines
                ax.set(ylabel="mean angle [degrees]", title=f"{kind} inputs ({backend})")
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=7, loc="upper center", ncol=3)
        c = data["config"]
        fig.suptitle(
            f"yoso bench: error vs N -- D={c['dim']} tau={c['hash_bits']}, {fid['samples']} samples per point -- "
            f"{data['date_utc'][:10]}",
            fontsize=9,
        )
        fig.tight_layout()
        fig.savefig(out / FIGURES["fidelity"], dpi=120)
        plt.close(fig)
        written.append(FIGURES["fidelity"])
    return written


def to_json(data) -> str:
    """``data`` as JSON text; NaN and inf (which JSON lacks) become null."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(data), indent=1, default=str, allow_nan=False)


# ---- the schema -----------------------------------------------------------------------------------

_TOP = {
    "schema": str,
    "date_utc": str,
    "command": str,
    "machine": dict,
    "versions": dict,
    "notes": list,
    "config": dict,
    "methodology": dict,
    "sdpa": str,
    "methods": list,
    "results": list,
    "slopes": list,
    "figures": list,
    "runtime_s": (int, float),
}
_CONFIG = ("device", "dtypes", "passes", "backends", "batch", "heads", "dim", "num_hashes", "hash_bits", "ns")
_ROW = ("method", "pass", "dtype", "n", "status", "reason")
_OK_ROW = {"ms": (int, float), "ms_min": (int, float), "repeats": int, "input_bytes": int}
STATUSES = ("ok", "skipped", "error")


def validate(data: dict) -> None:
    """``ValueError`` listing every way ``data`` departs from the ``yoso-bench/1`` layout (README: Benchmarks)."""
    problems = []
    for key, kind in _TOP.items():
        if not isinstance(data.get(key), kind):
            problems.append(f"{key}: expected {kind}, got {type(data.get(key)).__name__}")
    if problems:
        raise ValueError("not a yoso-bench/1 result: " + "; ".join(problems))
    if data["schema"] != SCHEMA:
        problems.append(f"schema is {data['schema']!r}, expected {SCHEMA!r}")
    problems += [f"config.{k} missing" for k in _CONFIG if k not in data["config"]]
    problems += [f"machine.{k} missing" for k in ("cpu", "gpus") if k not in data["machine"]]
    ids = {m.get("id") for m in data["methods"]}
    if data["sdpa"] not in ids:
        problems.append("the SDPA baseline is not among the methods")
    for i, r in enumerate(data["results"]):
        where = f"results[{i}]"
        missing = [k for k in _ROW if k not in r]
        if missing:
            problems.append(f"{where} lacks {', '.join(missing)}")
            continue
        if r["method"] not in ids or r["pass"] not in data["config"].get("passes", ()):
            problems.append(f"{where}: unknown method {r['method']!r} or pass {r['pass']!r}")
        if r["status"] not in STATUSES:
            problems.append(f"{where}: status {r['status']!r} not in {STATUSES}")
        elif r["status"] == "ok":
            for k, kind in _OK_ROW.items():
                if not isinstance(r.get(k), kind):
                    problems.append(f"{where}: {k} expected {kind}, got {r.get(k)!r}")
            if isinstance(r.get("ms"), (int, float)) and not r["ms"] > 0:
                problems.append(f"{where}: ms must be positive")
            if r.get("peak_bytes") is not None and not isinstance(r["peak_bytes"], int):
                problems.append(f"{where}: peak_bytes must be an int or null")
            if r.get("peak_below_floor") and (
                r.get("peak_bytes") is not None or not isinstance(r.get("peak_floor_bytes"), int)
            ):
                problems.append(f"{where}: a peak below the floor has peak_bytes null and an int peak_floor_bytes")
        elif not isinstance(r["reason"], str) or not r["reason"]:
            problems.append(f"{where}: a {r['status']} point needs its reason")
    for s in data["slopes"]:
        if not {"method", "pass", "dtype", "slope", "tail_slope", "ns"} <= set(s):
            problems.append(f"slope entry {s} incomplete")
    fid = data.get("fidelity")
    if fid is not None:
        for k in ("description", "data", "samples", "num_hashes", "ns", "rows", "softmax", "skipped"):
            if k not in fid:
                problems.append(f"fidelity.{k} missing")
        for r in fid.get("rows", ()):
            if not {"backend", "data", "n", "hash_bits", "num_hashes", "angle_deg", "zero_rows"} <= set(r):
                problems.append(f"fidelity row {r} incomplete")
    if problems:
        raise ValueError("not a valid yoso-bench/1 result: " + "; ".join(problems))
