"""``yoso demo``: YOSO-m converging to YOSO-E as the number of hashes m grows (the paper's Fig. 8).

On one sample (N tokens, head dim D, clustered keys so that attention is peaked) it times N-YOSO-m for
m = 8 ... 128, N-YOSO-E and softmax attention, and measures the mean angle between each N-YOSO-m
output row and the N-YOSO-E row (and between N-YOSO-E and softmax), then prints a table and writes
``demo.png`` and ``demo.json``.

"softmax" here is ``softmax(tau * q̂·k̂) V`` on the unit rows YOSO sees: the kernel ``exp(tau (x - 1))``
the paper compares with the collision probability ``(1 - arccos(x)/pi)^tau`` (its Fig. 2).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path

import numpy as np

import yoso
from yoso import backends
from yoso.testing import framework_for, synchronize, to_framework, to_numpy

HASH_COUNTS = (8, 16, 32, 64, 128)


def clustered_sample(n: int, dim: int, *, clusters: int = 16, spread: float = 0.6, seed: int = 0):
    """Queries and keys drawn around shared cluster centres (peaked attention), Gaussian values."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    centres /= np.linalg.norm(centres, axis=-1, keepdims=True)

    def around_centres():
        x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    return around_centres(), around_centres(), rng.standard_normal((n, dim))


def mean_angle_degrees(a: np.ndarray, b: np.ndarray) -> float:
    """Mean angle between corresponding rows of ``a`` and ``b``, in degrees.

    A zero row has no direction: it counts as 90 degrees (N-YOSO-m gives one when a query collides
    with no key in any of its m hashes, which flat attention and small m make common).
    """
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    cos = np.sum(a * b, axis=-1) / np.where(norms > 0, norms, 1)
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))).mean())


def softmax_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, temperature: float) -> np.ndarray:
    scores = temperature * (q @ k.T)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    out = (weights / weights.sum(axis=-1, keepdims=True)) @ v
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


def _timed(fn, repeats: int):
    """(result, median seconds) over ``repeats`` runs after one warm-up."""
    result = fn()
    synchronize(result)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        synchronize(result)
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def run(*, n=1024, dim=64, hash_bits=8, seed=0, repeats=3, backend=None, out_dir="yoso-demo", plot=True, echo=print):
    """Run the demo; returns the results dict (also written to ``out_dir/demo.json``)."""
    with yoso.set_backend(backend) if backend else contextlib.nullcontext():
        name = yoso.get_backend()
        impl = backends.get(name)
        framework = framework_for(impl)
        device = impl.default_device()
        q_np, k_np, v_np = clustered_sample(n, dim, seed=seed)
        q, k, v = (to_framework(x.astype(np.float32), framework, device) for x in (q_np, k_np, v_np))

        expected, t_expected = _timed(lambda: yoso.attention(q, k, v, mode="expectation", hash_bits=hash_bits), repeats)
        expected = to_numpy(expected)
        soft, t_soft = _timed(lambda: softmax_attention(q_np, k_np, v_np, hash_bits), repeats)
        rows = []
        for m in HASH_COUNTS:
            sampled, t_sampled = _timed(
                lambda m=m: yoso.attention(q, k, v, num_hashes=m, hash_bits=hash_bits, seed=seed + m), repeats
            )
            rows.append(
                {
                    "method": f"N-YOSO-{m}",
                    "num_hashes": m,
                    "ms": 1e3 * t_sampled,
                    "angle_to_yoso_e_deg": mean_angle_degrees(to_numpy(sampled), expected),
                }
            )
    results = {
        "backend": name,
        "framework": framework,
        "device": device,
        "n": n,
        "dim": dim,
        "hash_bits": hash_bits,
        "seed": seed,
        "data": "unit q, k around 16 shared cluster centres (spread 0.6), Gaussian v, float32",
        "rows": rows,
        "yoso_e": {"ms": 1e3 * t_expected},
        "softmax": {
            "ms": 1e3 * t_soft,
            "angle_to_yoso_e_deg": mean_angle_degrees(soft, expected),
            "definition": "softmax(hash_bits * q̂·k̂) V, normalised rows (NumPy)",
        },
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(results, indent=2))
    _print_table(results, echo)
    if plot:
        _plot(results, out / "demo.png")
        echo(f"wrote {out / 'demo.png'} and {out / 'demo.json'}")
    else:
        echo(f"wrote {out / 'demo.json'}")
    return results


def _print_table(results: dict, echo) -> None:
    echo(
        f"yoso demo: backend {results['backend']} ({results['framework']} on {results['device']}), "
        f"N={results['n']}, D={results['dim']}, tau={results['hash_bits']}"
    )
    echo(f"{'method':<14}{'time [ms]':>12}{'mean angle to N-YOSO-E [deg]':>32}")
    for row in results["rows"]:
        echo(f"{row['method']:<14}{row['ms']:>12.2f}{row['angle_to_yoso_e_deg']:>32.2f}")
    echo(f"{'N-YOSO-E':<14}{results['yoso_e']['ms']:>12.2f}{0.0:>32.2f}")
    soft = results["softmax"]
    echo(f"{'softmax':<14}{soft['ms']:>12.2f}{soft['angle_to_yoso_e_deg']:>32.2f}")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = [r["num_hashes"] for r in results["rows"]]
    fig, (ax_err, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    ax_err.plot(ms, [r["angle_to_yoso_e_deg"] for r in results["rows"]], "o-", label="N-YOSO-m vs N-YOSO-E")
    ax_err.axhline(results["softmax"]["angle_to_yoso_e_deg"], color="gray", ls="--", label="softmax vs N-YOSO-E")
    ax_err.set(xscale="log", xlabel="hashes m", ylabel="mean angle [degrees]", title="Approximation error")
    ax_err.set_xticks(ms, [str(m) for m in ms])
    ax_err.legend()
    ax_time.plot(ms, [r["ms"] for r in results["rows"]], "o-", label="N-YOSO-m")
    ax_time.axhline(results["yoso_e"]["ms"], color="C1", ls="--", label="N-YOSO-E")
    ax_time.axhline(results["softmax"]["ms"], color="gray", ls=":", label="softmax (NumPy)")
    ax_time.set(xscale="log", xlabel="hashes m", ylabel="forward time [ms]", title="Time")
    ax_time.set_xticks(ms, [str(m) for m in ms])
    ax_time.legend()
    fig.suptitle(
        f"yoso demo -- backend {results['backend']}, N={results['n']}, D={results['dim']}, tau={results['hash_bits']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
