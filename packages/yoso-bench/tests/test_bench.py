"""``yoso bench``: a tiny grid end to end, skip recording, error messages, slope fitting, the schema.

The grids here are tiny (N <= 128, B*H = 2) so the whole file runs in seconds; they check the
harness, never speed.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from yoso import backends
from yoso.cli import main
from yoso_bench import options, report

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[3]
TINY = ["--n", "64,128", "--batch", "1", "--heads", "2", "--budget", "0.01"]


def bench(tmp_path, *args) -> dict:
    out = tmp_path / "out"
    assert main(["bench", *TINY, "--out", str(out), *args]) == 0
    return json.loads((out / "bench.json").read_text())


def test_tiny_grid_end_to_end(tmp_path, capsys):
    data = bench(
        tmp_path,
        "--quick",
        "--fidelity-n",
        "64,128",
        "--fidelity-samples",
        "1",
        "--note",
        "tiny",
        "--backend",
        "reference",
    )
    report.validate(data)
    out = tmp_path / "out"
    for name in ("time.png", "memory.png", "fidelity.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert data["figures"] == ["time.png", "memory.png", "fidelity.png"]
    assert data["notes"] == ["tiny"] and data["command"].startswith("yoso bench ")
    assert data["machine"]["cpu"] and data["versions"]["torch"] and data["versions"]["backends"]["reference"]

    # every method, pass and N measured once, SDPA with its TFLOP/s, the others with their ratio to it
    ids = [m["id"] for m in data["methods"]]
    assert ids == ["sdpa", "reference/yoso-32", "reference/yoso-e"]
    rows = data["results"]
    assert len(rows) == 3 * 2 * 2
    assert {(r["method"], r["pass"], r["n"]) for r in rows} == {
        (m, p, n) for m in ids for p in ("forward", "forward_backward") for n in (64, 128)
    }
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["repeats"] >= 1 for r in rows)
    for r in rows:
        if r["method"] == "sdpa":
            flops = 4 * 2 * r["n"] ** 2 * 64 * (1 if r["pass"] == "forward" else 3.5)
            assert r["tflops"] == pytest.approx(flops / (r["ms"] * 1e-3) / 1e12)
            assert r["ratio_to_sdpa"] == pytest.approx(1.0)
        else:
            assert "tflops" not in r and r["ratio_to_sdpa"] > 0
        assert r["peak_bytes"] is None or r["peak_bytes"] >= 0
    assert {(s["method"], s["pass"]) for s in data["slopes"]} == {
        (m, p) for m in ids for p in ("forward", "forward_backward")
    }

    fid = data["fidelity"]
    assert set(fid["data"]) == {"clustered", "gaussian"}
    assert len(fid["rows"]) == 2 * 2 * 5 and len(fid["softmax"]) == 2 * 2
    for r in fid["rows"] + fid["softmax"]:
        assert 0 <= r["angle_deg"] <= 90
    # more hashes, closer to the expectation (clustered keys, averaged over N: robust at these sizes)
    by_m = {m: np.mean([r["angle_deg"] for r in fid["rows"] if r["num_hashes"] == m]) for m in (8, 128)}
    assert by_m[128] < by_m[8]
    assert "N-YOSO-32 (reference)" in capsys.readouterr().out


class Flaky(backends.Backend):
    """The reference's math, failing on purpose at N >= 128: out of memory (YOSO-E) or a bug (YOSO-m)."""

    name = "flaky"
    frameworks = ("numpy", "torch")

    def __init__(self):
        from yoso_reference.backend import ReferenceBackend

        self._ref = ReferenceBackend()

    def hash_codes(self, x, planes, **kw):
        return self._ref.hash_codes(x, planes, **kw)

    def cumulate(self, read_codes, write_codes, values, **kw):
        if read_codes.shape[-1] >= 128:
            raise RuntimeError("boom")
        return self._ref.cumulate(read_codes, write_codes, values, **kw)

    def sampled_grads(self, *args, **kw):
        return self._ref.sampled_grads(*args, **kw)

    def expectation_forward(self, q, k, v, **kw):
        if q.shape[1] >= 128:
            raise MemoryError("Unable to allocate 64.0 GiB for an array")
        return self._ref.expectation_forward(q, k, v, **kw)

    def expectation_backward(self, *args, **kw):
        return self._ref.expectation_backward(*args, **kw)


@pytest.fixture
def flaky():
    backends.register(Flaky())
    yield "flaky"
    backends.unregister("flaky")


def _rows(data, method, pass_="forward"):
    return {r["n"]: r for r in data["results"] if r["method"] == method and r["pass"] == pass_}


def test_failures_are_recorded_and_the_run_goes_on(tmp_path, flaky):
    data = bench(tmp_path, "--backend", flaky, "--n", "64,128,256", "--no-fidelity", "--no-plot", "--no-backward")
    report.validate(data)
    e = _rows(data, "flaky/yoso-e")
    assert e[64]["status"] == "ok"
    assert e[128]["status"] == "skipped" and e[128]["reason"].startswith("out of memory: MemoryError")
    assert e[256]["status"] == "skipped" and "a smaller N ran out of memory" in e[256]["reason"]
    sampled = _rows(data, "flaky/yoso-32")
    assert sampled[128]["status"] == "error" and sampled[128]["reason"] == "RuntimeError: boom"
    assert sampled[256]["status"] == "error"  # errors do not stop a series: each N is tried
    assert all(r["status"] == "ok" for r in _rows(data, "sdpa").values())
    assert data["figures"] == []


def test_points_predicted_too_slow_are_skipped_with_the_reason(tmp_path):
    data = bench(
        tmp_path,
        "--n",
        "64,128,256",
        "--backend",
        "reference",
        "--max-call-seconds",
        "1e-7",
        "--no-fidelity",
        "--no-plot",
    )
    for method in ("sdpa", "reference/yoso-32", "reference/yoso-e"):
        for pass_ in ("forward", "forward_backward"):
            rows = _rows(data, method, pass_)
            assert rows[64]["status"] == "ok"  # nothing to extrapolate from: measured
            assert rows[128]["status"] == "skipped"
            assert "exceeds the 0 ms limit per call (--max-call-seconds)" in rows[128]["reason"]
            assert "extrapolated from N=64" in rows[128]["reason"]
            assert rows[256]["reason"].startswith("a smaller N was skipped: predicted")
    assert "not measured:" in "\n".join(report.table(data))


def test_points_predicted_not_to_fit_in_memory_are_skipped(tmp_path, monkeypatch):
    from yoso_bench import memory

    if memory.RssMeter().reason:
        pytest.skip("peak RSS cannot be measured here")
    monkeypatch.setattr(memory.RssMeter, "available_bytes", lambda self: 1)
    data = bench(tmp_path, "--n", "512,1024", "--backend", "reference", "--no-fidelity", "--no-plot", "--no-backward")
    rows = _rows(data, "reference/yoso-e")
    assert rows[512]["status"] == "ok" and rows[512]["peak_bytes"] > 0
    assert rows[1024]["status"] == "skipped" and "of the 0 KiB available" in rows[1024]["reason"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend", "nope"], "unknown yoso backend 'nope'; installed backends:"),
        (["--n", "1024,x"], "--n takes comma-separated positive integers"),
        (["--n", "0"], "--n takes comma-separated positive integers"),
        (["--hash-bits", "17"], "--hash-bits must be in 1..16"),
        (["--hash-bits", "many"], "--hash-bits takes an integer in 1..16 or 'auto'"),
        (["--dtype", "float8"], "--dtype must be one of float32, bfloat16, float16"),
        (["--heads", "0"], "--heads must be positive"),
        (["--budget", "-1"], "--budget must be positive"),
    ],
)
def test_bad_options_get_clear_errors(tmp_path, capsys, args, message):
    assert main(["bench", *args, "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("yoso bench: error: ") and message in err
    assert not (tmp_path / "never").exists()


def test_gpu_options_without_a_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        # with a GPU, the reference (CPU only) is the option that cannot run
        assert main(["bench", "--device", "cuda", "--backend", "reference", "--out", str(tmp_path)]) == 2
        assert "--backend reference runs on cpu, not on --device cuda" in capsys.readouterr().err
        return
    assert main(["bench", "--device", "cuda", "--out", str(tmp_path / "never")]) == 2
    assert "--device cuda: no CUDA device is visible to torch" in capsys.readouterr().err


def test_slope_fitting():
    ns = [1024, 2048, 4096, 8192]
    assert report.fit_slope(ns, [3.0 * n for n in ns]) == pytest.approx(1.0)
    assert report.fit_slope(ns, [1e-6 * n**2 for n in ns]) == pytest.approx(2.0)
    assert report.fit_slope(ns, [n * math.log2(n) for n in ns]) == pytest.approx(1.1, abs=0.05)
    assert report.fit_slope([1024], [1.0]) is None
    assert report.fit_slope([1024, 2048], [1.0, None]) is None  # skipped points do not count
    rows = [
        {"method": "a", "pass": "forward", "dtype": "float32", "n": n, "status": "ok", "ms": 1e-3 * n**2}
        for n in (256, 128, 512, 64)
    ] + [{"method": "a", "pass": "forward", "dtype": "float32", "n": 1024, "status": "skipped", "ms": None}]
    (s,) = report.slopes(rows)
    assert s["ns"] == [64, 128, 256, 512] and s["slope"] == pytest.approx(2.0) and s["tail_slope"] == pytest.approx(2)


def test_hash_bits_auto_and_flops():
    parser = __import__("argparse").ArgumentParser()
    options.add_arguments(parser)
    config = options.config_from_args(parser.parse_args(["--hash-bits", "auto", "--quick"]), ["bench"])
    assert [config.tau(n) for n in (1000, 1024, 1025, 65536)] == [10, 10, 11, 16]
    assert config.ns == options.QUICK_CPU_NS and config.dtypes == ("float32",)
    assert report.sdpa_flops(4, 16, 4096, 64, "forward") == 4 * 4 * 16 * 4096**2 * 64
    assert report.sdpa_flops(1, 1, 2, 1, "forward_backward") == 3.5 * 16


def test_the_rss_meter_sees_a_large_allocation():
    from yoso_bench import memory

    meter = memory.RssMeter()
    if meter.reason:
        pytest.skip(meter.reason)
    with meter.measure() as m:
        x = np.ones(16 * 2**20)  # 128 MiB, touched
        del x
    assert 120 * 2**20 < m.peak_bytes < 400 * 2**20


def test_validate_names_what_is_wrong():
    with pytest.raises(ValueError, match="not a yoso-bench/1 result: schema"):
        report.validate({})


@pytest.mark.parametrize(
    "path", sorted((ROOT / "benchmarks" / "results").glob("*/bench.json")), ids=lambda p: p.parent.name
)
def test_committed_results_follow_the_schema(path):
    report.validate(json.loads(path.read_text()))


# ---- what a run may claim: slopes only from enough points, memory only above the floor ----------------


def test_a_quick_run_prints_no_slope(tmp_path, capsys):
    data = bench(tmp_path, "--quick", "--n", "64,128,256", "--backend", "reference", "--no-fidelity", "--no-plot")
    report.validate(data)
    assert data["slopes"] and all(s["slope"] is None and s["tail_slope"] is None for s in data["slopes"])
    assert all(s["reason"].startswith("quick run") for s in data["slopes"])
    out = capsys.readouterr().out
    assert "slope" not in out  # no column, no number: the grid spans 4x but a quick run shows no scaling
    assert "time-vs-N scaling not fitted (quick run" in out


def test_slopes_only_from_enough_points(tmp_path, capsys):
    data = bench(tmp_path, "--n", "64,128,256", "--backend", "reference", "--no-fidelity", "--no-plot")
    assert all(isinstance(s["slope"], float) for s in data["slopes"])  # 3 points spanning 4x: fitted
    header = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("method"))
    assert header.rstrip().endswith("slope")
    data = bench(tmp_path, "--n", "64,128", "--backend", "reference", "--no-fidelity", "--no-plot", "--no-backward")
    report.validate(data)
    assert all(s["slope"] is None and "not fitted: 2 measured N" in s["reason"] for s in data["slopes"])
    out = capsys.readouterr().out
    assert not re.search(r"slope\s+-?\d", out) and "slope '-': fewer than 3 measured N spanning 4x" in out


def test_memory_below_the_floor_is_not_a_number(tmp_path, monkeypatch, capsys):
    from yoso_bench import memory

    if memory.RssMeter().reason:
        pytest.skip("peak RSS cannot be measured here")
    monkeypatch.setattr(memory.RssMeter, "floor_bytes", 2**40)  # every peak is below a 1 TiB floor
    data = bench(tmp_path, "--quick", "--backend", "reference", "--no-fidelity", "--no-backward")
    report.validate(data)
    for r in data["results"]:
        assert r["peak_bytes"] is None and r["peak_below_floor"] is True and r["peak_floor_bytes"] == 2**40
        assert isinstance(r["peak_bytes_raw"], int)
        assert report.fmt_peak(r) == "below floor (< 1048576 MiB)"
    captured = capsys.readouterr()
    assert "peak memory below the measurement floor (< 1048576 MiB) at 6 of 6 points" in captured.out
    assert "peak below floor" in captured.err and "peak +" not in captured.err  # the progress lines
    assert (tmp_path / "out" / "memory.png").stat().st_size > 10_000

    bad = dict(data, results=[dict(data["results"][0], peak_bytes=1234)])
    with pytest.raises(ValueError, match="a peak below the floor has peak_bytes null"):
        report.validate(bad)


def test_the_default_floor_sits_above_what_measuring_moves():
    from yoso_bench import memory

    meter = memory.RssMeter()
    if meter.reason:
        pytest.skip(meter.reason)
    for _ in range(5):
        with meter.measure() as m:
            x = [0] * 1000  # what the interpreter allocates around any call
            del x
        assert m.peak_bytes < meter.floor_bytes
    with meter.measure() as m:
        x = np.ones(2 * meter.floor_bytes // 8)  # twice the floor, touched
        del x
    assert m.peak_bytes >= meter.floor_bytes


def _synthetic(backends_, dtypes):
    """A result with every method at three N, as a run would write it (for the figures)."""
    methods = [{"id": "sdpa", "label": "SDPA", "kind": "sdpa", "backend": None}]
    for b in backends_:
        methods += [
            {"id": f"{b}/yoso-32", "label": f"N-YOSO-32 ({b})", "kind": "yoso", "backend": b},
            {"id": f"{b}/yoso-e", "label": f"N-YOSO-E ({b})", "kind": "yoso-e", "backend": b},
        ]
    ns = [1024, 2048, 4096]
    results = [
        {"method": m["id"], "pass": "forward", "dtype": d, "n": n, "status": "ok", "ms": 1e-3 * n * (i + 1)}
        for i, m in enumerate(methods)
        for d in dtypes
        for n in ns
    ]
    return {
        "methods": methods,
        "results": results,
        "slopes": report.slopes(results),
        "machine": {"cpu": "test CPU", "gpus": []},
        "date_utc": "2026-01-01T00:00:00Z",
        "config": {
            "device": "cpu",
            "dtypes": list(dtypes),
            "passes": ["forward"],
            "backends": list(backends_),
            "batch": 1,
            "heads": 8,
            "dim": 64,
            "num_hashes": 32,
            "hash_bits": 8,
            "ns": ns,
        },
    }


@pytest.mark.parametrize("dtypes", [("float32",), ("float32", "bfloat16")])
def test_every_legend_entry_of_the_time_figure_is_distinguishable(dtypes):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    fig = report.time_figure(_synthetic(["jax", "reference", "triton"], dtypes))
    (ax,) = fig.axes
    legend = ax.get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    handles = legend.legend_handles
    assert len(labels) == len(set(labels)) == 7 * len(dtypes)
    looks = [(h.get_color(), h.get_marker(), h.get_linestyle(), h.get_markerfacecolor()) for h in handles]
    assert len(set(looks)) == len(looks), looks
    # YOSO-m and YOSO-E of one backend differ in colour and in marker, not only in the dash
    by_method = {label.split(",")[0].removesuffix(" [float32]"): look for label, look in zip(labels, looks)}
    for b in ("jax", "reference", "triton"):
        sampled, expectation = by_method[f"N-YOSO-32 ({b})"], by_method[f"N-YOSO-E ({b})"]
        assert sampled[0] != expectation[0] and sampled[1] != expectation[1]
    plt.close(fig)
