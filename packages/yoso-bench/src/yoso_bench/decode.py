"""``yoso bench --decode``: one decoding step at a growing context, YOSO's carried state against a KV cache.

A step is what an autoregressive model does per generated token in one attention layer, attention only (no
projections): the new token's ``q, k, v [B, H, 1, D]`` meet everything before it.

* ``sdpa-kv-cache``: torch's ``scaled_dot_product_attention`` of the new query against a preallocated
  key/value cache ``[B, H, N + 1, D]`` into which the step first writes the new key and value (in place, under
  ``torch.no_grad()``): the baseline every LLM runtime uses, ``O(N)`` time and memory per step.
* ``<backend>/yoso-<m>``: ``yoso.attention(q, k, v, causal=True, initial_state=state, output_final_state=True)``
  with the state of ``N`` earlier tokens, on the backend's own arrays: JAX arrays in a ``jax.jit`` step that
  donates the state (XLA updates the tables in place: docs/math.md#decoding-cost), NumPy arrays eagerly.
  ``jax/yoso-<m>/torch`` is the ``jax`` backend serving torch tensors (eager; the state is copied per step).
  The state is built by a chunked prefill of ``N`` random tokens (on the ``jax`` backend when it is installed),
  so it is the real thing; its size, ``m * 2**tau * D`` numbers per head, does not depend on ``N``.

Per (method, context): the median wall-clock time of a step over repeats within the point budget (each repeat
one more token: the context grows by the number of repeats, at most 1000, which changes neither method's cost
noticeably at N >= 1k -- the KV cache's step re-writes slot N instead, so its context stays N), the peak
resident memory of one step above what was allocated before it, and the bytes the method keeps between steps
(the KV cache, or the state). From these: the log-log slope of time against the context (goal: about 0 for
YOSO, about 1 for the KV cache), and the smallest context from which YOSO is faster at every larger one.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import report
from .memory import RSS_FLOOR_BYTES, meter_for
from .timing import time_cpu

SCHEMA = "yoso-bench-decode/1"
CONTEXTS = tuple(1024 << i for i in range(7))  # 1k ... 64k
QUICK_CONTEXTS = (1024, 4096)
PREFILL_CHUNK = 4096
KV_CACHE = "sdpa-kv-cache"
FIGURE = "decode.png"


@dataclass
class DecodeConfig:
    backends: tuple[str, ...]
    batch: int
    heads: int
    dim: int
    num_hashes: int
    hash_bits: int
    contexts: tuple[int, ...]
    point_budget_s: float
    out: Path
    quick: bool = False
    plots: bool = True
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    command: str = ""
    torch_tensors: bool = True  # also the jax backend serving torch tensors


@dataclass(frozen=True)
class DecodeMethod:
    id: str
    label: str
    backend: str | None
    framework: str


def config_from_args(args, argv=None) -> DecodeConfig:
    """The decode benchmark's configuration from ``yoso bench`` options (``ValueError`` naming the option)."""
    import shlex

    from yoso import backends

    from .options import QUICK_POINT_BUDGET_S, QUICK_SHAPES, SHAPES, _hash_bits, _int_list, _names, resolve_backends

    try:
        import torch  # noqa: F401  (the KV-cache baseline)
    except ImportError:
        raise ValueError(
            "yoso bench --decode compares with torch's scaled_dot_product_attention: pip install torch"
        ) from None
    if args.device != "cpu":
        raise ValueError("yoso bench --decode runs on the CPU (--device cpu): it times a step with the CPU clock")
    dtypes = _names(args.dtype)
    if dtypes and dtypes != ("float32",):
        raise ValueError(f"yoso bench --decode measures float32 only, got --dtype {','.join(dtypes)}")
    tau = _hash_bits(args.hash_bits)
    if tau == "auto":
        raise ValueError("yoso bench --decode needs a fixed --hash-bits (a state's tables have 2**tau rows)")
    requested = _names(args.backend)
    names = resolve_backends(requested, "cpu")
    with_tables = tuple(n for n in names if backends.get(n).has_tables)
    if requested and len(with_tables) < len(names):
        missing = ", ".join(n for n in names if n not in with_tables)
        raise ValueError(f"--backend {missing}: no bucket tables (has_tables is False), so no recurrent state")
    if not with_tables:
        raise ValueError("no available backend has bucket tables (a recurrent state): install yoso-jax")
    batch, heads = (QUICK_SHAPES if args.quick else SHAPES)["cpu"]
    contexts = _int_list(args.n, "--n") if args.n else (QUICK_CONTEXTS if args.quick else CONTEXTS)
    for option, value in (("--batch", args.batch), ("--heads", args.heads), ("--budget", args.budget)):
        if value is not None and value <= 0:
            raise ValueError(f"{option} must be positive, got {value}")
    return DecodeConfig(
        backends=with_tables,
        batch=args.batch or batch,
        heads=args.heads or heads,
        dim=args.dim,
        num_hashes=args.num_hashes,
        hash_bits=int(tau),
        contexts=contexts,
        point_budget_s=args.budget or (QUICK_POINT_BUDGET_S if args.quick else 2.0),
        out=Path(args.out),
        quick=bool(args.quick),
        plots=not args.no_plot,
        seed=args.seed,
        notes=list(args.note),
        command="yoso " + shlex.join(sys.argv[1:] if argv is None else argv),
    )


def methods_for(config: DecodeConfig) -> list[DecodeMethod]:
    from yoso import backends
    from yoso.testing import framework_for

    found = [DecodeMethod(KV_CACHE, "SDPA + KV cache", None, "torch")]
    m = config.num_hashes
    for name in config.backends:
        framework = framework_for(backends.get(name))
        found.append(DecodeMethod(f"{name}/yoso-{m}", f"N-YOSO-{m} state ({name}, {framework})", name, framework))
        if config.torch_tensors and framework != "torch" and "torch" in backends.get(name).frameworks:
            if name == "jax":  # the fast CPU path for torch users; the reference would repeat its NumPy row
                found.append(DecodeMethod(f"{name}/yoso-{m}/torch", f"N-YOSO-{m} state ({name}, torch)", name, "torch"))
    return found


# ---- the steps -------------------------------------------------------------------------------------------


def _token(config, seed: int):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((config.batch, config.heads, 1, config.dim), dtype=np.float32) for _ in range(3)]


def _kv_cache_step(config, n: int):
    """``(step, kept bytes)``: the new key/value written into slot ``n`` of the cache, then SDPA over ``n + 1``."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(config.seed)
    shape = (config.batch, config.heads, n + 1, config.dim)
    keys = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    values = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    q, k, v = (torch.from_numpy(x) for x in _token(config, config.seed + 1))

    def step():
        with torch.no_grad():
            keys[:, :, n : n + 1] = k
            values[:, :, n : n + 1] = v
            return F.scaled_dot_product_attention(q, keys, values)

    return step, keys.nbytes + values.nbytes


def prefill_tables(config, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(tables [B, H, m, 2**tau, D], planes)`` after ``n`` random tokens, by a chunked causal prefill (itself
    the recurrent use: chunk after chunk carrying the state), on the ``jax`` backend if installed."""
    import yoso

    rng = np.random.default_rng(config.seed + 2)
    name = "jax" if "jax" in yoso.available_backends() else "reference"
    framework = "jax" if name == "jax" else "numpy"
    planes = yoso.hash_planes(config.num_hashes, config.hash_bits, config.dim, seed=config.seed)
    state = None
    with yoso.set_backend(name):
        for start in range(0, n, PREFILL_CHUNK):
            length = min(PREFILL_CHUNK, n - start)
            shape = (config.batch, config.heads, length, config.dim)
            chunk = [rng.standard_normal(shape, dtype=np.float32) for _ in range(3)]
            if framework == "jax":
                import jax.numpy as jnp

                chunk = [jnp.asarray(x) for x in chunk]
            _, state = yoso.attention(
                *chunk,
                causal=True,
                num_hashes=config.num_hashes,
                hash_bits=config.hash_bits,
                planes=planes if state is None else None,
                initial_state=state,
                output_final_state=True,
            )
    return np.asarray(state.tables), planes.astype(np.float32)


def _yoso_step(config, method: DecodeMethod, tables: np.ndarray, planes: np.ndarray):
    """``(step, kept bytes, note)`` for one YOSO method, its state in the method's framework."""
    import yoso

    options = dict(causal=True, num_hashes=config.num_hashes, hash_bits=config.hash_bits, output_final_state=True)
    token = _token(config, config.seed + 1)
    if method.framework == "jax":
        import jax
        import jax.numpy as jnp

        q, k, v = (jnp.asarray(x) for x in token)
        holder = [yoso.State(tables=jnp.array(tables), planes=jnp.asarray(planes))]

        def one(state, q, k, v):
            return yoso.attention(q, k, v, initial_state=state, **options)

        compiled = jax.jit(one, donate_argnums=0).lower(holder[0], q, k, v).compile()

        def step():
            out, holder[0] = compiled(holder[0], q, k, v)  # the donated state is never read again
            return out, holder[0].tables

        return step, tables.nbytes, "jax.jit with the state donated (tables updated in place), compiled before timing"
    if method.framework == "torch":
        import torch

        q, k, v = (torch.from_numpy(x) for x in token)
        holder = [yoso.State(tables=torch.from_numpy(tables.copy()), planes=torch.from_numpy(planes))]

        def step():
            with torch.no_grad():
                out, holder[0] = yoso.attention(q, k, v, initial_state=holder[0], **options)
            return out

        return step, tables.nbytes, "eager, under torch.no_grad(); the state is a new tensor per step (one copy)"
    q, k, v = token
    holder = [yoso.State(tables=tables.copy(), planes=planes)]

    def step():
        out, holder[0] = yoso.attention(q, k, v, initial_state=holder[0], **options)
        return out

    return step, tables.nbytes, "eager NumPy; the state is a new array per step"


# ---- the run ---------------------------------------------------------------------------------------------


def measure(config, method: DecodeMethod, n: int, prefilled, meter) -> dict:
    import yoso

    row = {"method": method.id, "backend": method.backend, "framework": method.framework, "context": n}
    try:
        if method.backend is None:
            step, kept = _kv_cache_step(config, n)
            note = "preallocated cache, the new key/value written in place under torch.no_grad()"
        else:
            with yoso.set_backend(method.backend):
                step, kept, note = _yoso_step(config, method, *prefilled)
        peaks = []

        def on_call(i):
            return _Recorder(meter, peaks) if i == 0 else None

        if method.backend is None:
            timing = time_cpu(step, budget_s=config.point_budget_s, predicted_s=None, on_call=on_call)
        else:
            with yoso.set_backend(method.backend):
                timing = time_cpu(step, budget_s=config.point_budget_s, predicted_s=None, on_call=on_call)
    except Exception as exc:  # noqa: BLE001 -- one point's failure must not end the run
        text = str(exc).strip().splitlines()
        return {**row, "status": "error", "reason": f"{type(exc).__name__}: {text[0] if text else ''}"[:300]}
    peak = peaks[0] if peaks else None
    row.update(
        status="ok",
        reason=None,
        ms=timing.ms,
        ms_min=timing.ms_min,
        ms_max=timing.ms_max,
        repeats=timing.repeats,
        kept_bytes=int(kept),
        peak_bytes=peak if peak is None or peak >= meter.floor_bytes else None,
        note=note,
    )
    if peak is not None and peak < meter.floor_bytes:
        row.update(peak_below_floor=True, peak_floor_bytes=meter.floor_bytes, peak_bytes_raw=peak)
    if hasattr(os, "getloadavg"):
        row["load_1min"] = os.getloadavg()[0]
    return row


class _Recorder:
    def __init__(self, meter, peaks):
        self._cm, self._peaks = meter.measure(), peaks

    def __enter__(self):
        self._box = self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        self._peaks.append(self._box.peak_bytes)
        return False


def summarise(results: list[dict], methods: list[DecodeMethod], quick: bool) -> list[dict]:
    """Per method: the slope of log(ms) vs log(context), and the context from which it beats the KV cache."""
    base = {r["context"]: r["ms"] for r in results if r["method"] == KV_CACHE and r["status"] == "ok"}
    out = []
    for method in methods:
        rows = sorted(
            (r for r in results if r["method"] == method.id and r["status"] == "ok"), key=lambda r: r["context"]
        )
        ns, ms = [r["context"] for r in rows], [r["ms"] for r in rows]
        entry = {"method": method.id, "contexts": ns, "slope": None if quick else report.fit_slope(ns, ms)}
        if entry["slope"] is None:
            entry["reason"] = report.QUICK_NO_SLOPES if quick else "fewer than 3 contexts spanning 4x"
        if method.id != KV_CACHE:
            faster = [r["context"] for r in rows if r["context"] in base and r["ms"] < base[r["context"]]]
            compared = [n for n in ns if n in base]
            # the smallest context from which every measured larger context is faster too
            entry["faster_than_kv_cache_from"] = next(
                (n for n in compared if all(c in faster for c in compared if c >= n)), None
            )
            for r in rows:
                if r["context"] in base:
                    r["ratio_to_kv_cache"] = r["ms"] / base[r["context"]]
        out.append(entry)
    return out


def table(data: dict) -> list[str]:
    methods = data["methods"]
    lines = ["", "decode step: median ms per token (ratio to SDPA + KV cache); kept between steps"]
    head = "| context | " + " | ".join(m["label"] for m in methods) + " |"
    lines += [head, "|---:|" + "---:|" * len(methods)]
    for n in data["config"]["contexts"]:
        cells = []
        for m in methods:
            row = next((r for r in data["results"] if r["method"] == m["id"] and r["context"] == n), None)
            if row is None or row["status"] != "ok":
                cells.append(row["status"] if row else "-")
                continue
            ratio = f" ({row['ratio_to_kv_cache']:.2g}x)" if row.get("ratio_to_kv_cache") is not None else ""
            cells.append(f"{report.fmt_ms(row['ms'])}{ratio}, {report.fmt_bytes(row['kept_bytes'])}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    for s in data["summary"]:
        slope = "not fitted" if s["slope"] is None else f"{s['slope']:.2f}"
        text = f"{s['method']}: log-log slope {slope}"
        if "faster_than_kv_cache_from" in s:
            since = s["faster_than_kv_cache_from"]
            text += f"; faster than the KV cache from context {since}" if since else "; never faster than the KV cache"
        lines.append(text)
    return lines


def plot(data: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in data["methods"]:
        rows = sorted(
            (r for r in data["results"] if r["method"] == m["id"] and r["status"] == "ok"), key=lambda r: r["context"]
        )
        if not rows:
            continue
        ns = [r["context"] for r in rows]
        style = dict(marker="o", linestyle="--" if m["id"] == KV_CACHE else "-", label=m["label"])
        line = left.plot(ns, [r["ms"] for r in rows], **style)[0]
        right.plot(ns, [r["kept_bytes"] / 2**20 for r in rows], color=line.get_color(), **style)
        peaks = [(r["context"], r["peak_bytes"] / 2**20) for r in rows if r.get("peak_bytes")]
        if peaks:
            right.plot(
                *zip(*peaks), marker="x", linestyle=":", color=line.get_color(), label=f"{m['label']}: step peak"
            )
    for ax, ylabel, title in (
        (left, "ms per token (median)", "decode step time vs context"),
        (right, "MiB", "kept between steps (KV cache / state); x: one step's peak"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set(xlabel="context (tokens before the new one)", ylabel=ylabel, title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    c = data["config"]
    fig.suptitle(
        f"yoso bench --decode: B={c['batch']} H={c['heads']} D={c['dim']} m={c['num_hashes']} tau={c['hash_bits']}, "
        f"float32, CPU -- {data['date_utc'][:10]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out / FIGURE, dpi=120)
    plt.close(fig)
    return FIGURE


def run(config: DecodeConfig, echo=print) -> dict:
    started = time.perf_counter()
    methods = methods_for(config)
    meter = meter_for("cpu", "numpy")
    data = {"schema": SCHEMA, **report.environment(config, config.backends), "notes": config.notes}
    data["config"] = {
        "device": "cpu",
        "dtype": "float32",
        "backends": list(config.backends),
        "batch": config.batch,
        "heads": config.heads,
        "dim": config.dim,
        "num_hashes": config.num_hashes,
        "hash_bits": config.hash_bits,
        "contexts": list(config.contexts),
        "quick": config.quick,
        "seed": config.seed,
        "point_budget_s": config.point_budget_s,
    }
    data["methodology"] = {
        "step": "one new token's q, k, v [B, H, 1, D] against the N before it, attention only (no projections)",
        "kv_cache": "torch SDPA of the new query against a preallocated [B, H, N + 1, D] key/value cache, the new "
        "key/value written into slot N in place, under torch.no_grad()",
        "yoso": "yoso.attention(causal=True, initial_state=state after N tokens, output_final_state=True); the "
        f"state from a chunked causal prefill of N random tokens (chunks of {PREFILL_CHUNK}); JAX arrays: a jax.jit "
        "step donating the state, compiled before timing; NumPy and torch: eager",
        "timing": "wall clock per step (time.perf_counter); a warm-up step, then repeats within the point budget "
        "(at most 1000); the median. YOSO's context grows by one per repeat (its cost does not depend on it)",
        "memory": f"{meter.method}; below {report.fmt_bytes(RSS_FLOOR_BYTES)} recorded as below the floor",
        "kept_bytes": "what the method keeps between steps: 2 * B * H * (N + 1) * D * 4 bytes of KV cache, or the "
        "state's m * 2**tau * D * 4 bytes per head",
        "slope": "least-squares slope of log(ms) vs log(context) (about 1 for the KV cache, 0 for a constant cost); "
        "null for a quick run or fewer than 3 contexts spanning 4x",
    }
    data["methods"] = [{"id": m.id, "label": m.label, "backend": m.backend, "framework": m.framework} for m in methods]
    results = []
    for n in config.contexts:
        prefilled = prefill_tables(config, n) if len(methods) > 1 else None
        for method in methods:
            row = measure(config, method, n, prefilled, meter)
            results.append(row)
            gc.collect()
            status = f"{report.fmt_ms(row['ms'])} ms" if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
            print(f"decode context={n:<6} {method.label:<40} {status}", file=sys.stderr, flush=True)
    data["results"] = results
    data["summary"] = summarise(results, methods, config.quick)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    data["figures"] = []
    if config.plots:
        try:
            data["figures"] = [plot(data, out)]
        except ImportError as exc:
            data["figures_skipped"] = f"matplotlib is not installed ({exc}); pip install 'yoso-bench[plot]'"
    data["runtime_s"] = time.perf_counter() - started
    if hasattr(os, "getloadavg"):
        data["machine"]["load_average_end"] = list(os.getloadavg())
    validate(data)
    (out / "decode.json").write_text(report.to_json(data))
    for line in table(data):
        echo(line)
    echo(f"wrote {', '.join(str(out / f) for f in ['decode.json', *data['figures']])} in {data['runtime_s']:.0f} s")
    return data


def validate(data: dict) -> None:
    """``ValueError`` listing how ``data`` departs from the ``yoso-bench-decode/1`` layout."""
    problems = []
    for key, kind in (("schema", str), ("config", dict), ("methods", list), ("results", list), ("summary", list)):
        if not isinstance(data.get(key), kind):
            problems.append(f"{key}: expected {kind.__name__}")
    if problems:
        raise ValueError("not a yoso-bench-decode/1 result: " + "; ".join(problems))
    if data["schema"] != SCHEMA:
        problems.append(f"schema is {data['schema']!r}, expected {SCHEMA!r}")
    ids = {m["id"] for m in data["methods"]}
    if KV_CACHE not in ids:
        problems.append("the KV-cache baseline is not among the methods")
    for i, r in enumerate(data["results"]):
        if r.get("method") not in ids or r.get("status") not in ("ok", "error"):
            problems.append(f"results[{i}]: unknown method or status")
        elif r["status"] == "ok":
            for k in ("ms", "ms_min", "repeats", "kept_bytes", "context"):
                if not isinstance(r.get(k), (int, float)) or r[k] <= 0:
                    problems.append(f"results[{i}]: {k} must be a positive number, got {r.get(k)!r}")
        elif not r.get("reason"):
            problems.append(f"results[{i}]: an error needs its reason")
    if problems:
        raise ValueError("not a valid yoso-bench-decode/1 result: " + "; ".join(problems))
