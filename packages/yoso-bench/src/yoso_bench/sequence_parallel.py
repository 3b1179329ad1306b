"""``yoso bench --sequence-parallel R``: one attention layer split over R processes, bytes and time.

The parent starts R processes (torch.distributed on the loopback address: gloo, or NCCL with
``--device cuda``, one GPU per rank); each holds ``N / R`` rows of ``[B, H, N, D]`` and runs
``yoso.attention(..., group=WORLD)`` forward (and backward), timed, with the collectives counted by
``yoso_parallel.recording()``. The report compares the bytes each rank sent with the model
(``yoso_parallel.model``) and with ring attention's, which passes every K/V block round the ring (O(N·D)
per device): YOSO's non-causal forward sends one all-reduce of the value tables, ``B·H·m·2^τ·Dv`` numbers
whatever N. Writes ``sequence_parallel.json`` (schema ``yoso-bench-sp/1``). Needs the yoso-parallel
package (``group=`` is its engine).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCHEMA = "yoso-bench-sp/1"
DEFAULT_NS = (2048, 4096, 8192, 16384)
QUICK_NS = (1024, 4096)
DEFAULT_HEADS, QUICK_HEADS = 4, 2
TIMEOUT_S = 1800


def add_arguments(p) -> None:
    """The options of the sequence-parallel mode (the grid options --n, --batch, --heads, --dim, --num-hashes,
    --hash-bits, --backend, --device, --no-backward, --quick, --seed, --out, --note are shared)."""
    group = p.add_argument_group("sequence parallel (one layer split over processes)")
    group.add_argument(
        "--sequence-parallel",
        type=int,
        metavar="R",
        help="split one attention layer over R processes (torch.distributed on the loopback address) and report "
        "the bytes each rank sends against ring attention's, and the time (writes sequence_parallel.json)",
    )
    group.add_argument("--causal", action="store_true", help="with --sequence-parallel: causal attention")
    group.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="with --sequence-parallel: timed calls per N; with --variable-length: the number of calls",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _positive_ints(text: str | None, default, option: str) -> tuple[int, ...]:
    if text is None:
        return tuple(default)
    try:
        values = tuple(sorted({int(t) for t in text.replace(" ", "").split(",") if t}))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ValueError(f"{option} takes comma-separated positive integers, got {text!r}")
    return values


def config_from_args(args, argv=None) -> dict:
    """The run's configuration; ``ValueError`` naming the option for bad input."""
    world = args.sequence_parallel
    if world < 1:
        raise ValueError(f"--sequence-parallel takes the number of processes (>= 1), got {world}")
    if importlib.util.find_spec("yoso_parallel") is None:
        raise ValueError(
            "--sequence-parallel needs the yoso-parallel package (yoso.attention's group=): pip install "
            "'yoso-bench[parallel]' (in the yoso repository: pip install -e packages/yoso-parallel)"
        )
    ns = _positive_ints(args.n, QUICK_NS if args.quick else DEFAULT_NS, "--n")
    uneven = [n for n in ns if n % world]
    if uneven:
        raise ValueError(f"--n: every length must split evenly over --sequence-parallel {world}; got {uneven}")
    if str(args.hash_bits).strip().lower() == "auto":
        raise ValueError("--hash-bits auto is not supported with --sequence-parallel: give an integer")
    backends = [b.strip() for v in args.backend or () for b in v.split(",") if b.strip()]
    if len(backends) > 1:
        raise ValueError(f"--sequence-parallel measures one backend; got --backend {','.join(backends)}")
    dtypes = [d.strip() for v in args.dtype or () for d in v.split(",") if d.strip()]
    if len(dtypes) > 1 or (dtypes and dtypes[0] != "float32"):
        raise ValueError("--sequence-parallel measures float32")
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < world:
            raise ValueError(f"--device cuda --sequence-parallel {world} needs {world} GPUs (one per rank)")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    for option, value in (
        ("--batch", args.batch),
        ("--heads", args.heads),
        ("--dim", args.dim),
        ("--repeats", repeats),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be positive, got {value}")
    return dict(
        world=world,
        device=args.device,
        ns=list(ns),
        batch=args.batch or 1,
        heads=args.heads or (QUICK_HEADS if args.quick else DEFAULT_HEADS),
        dim=args.dim,
        num_hashes=args.num_hashes,
        hash_bits=int(args.hash_bits),
        causal=bool(args.causal),
        backward=not args.no_backward,
        backend=backends[0] if backends else None,
        repeats=repeats,
        seed=args.seed,
        out=str(args.out),
        notes=list(args.note),
        command="yoso " + " ".join(sys.argv[1:] if argv is None else argv),
    )


def run(config: dict) -> dict:
    """Start the ranks, gather what they measured, write the JSON and print the table."""
    world = config["world"]
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "config.json"
        spec.write_text(json.dumps(config))
        outs = [Path(tmp) / f"rank{r}.json" for r in range(world)]
        init = f"tcp://127.0.0.1:{_free_port()}"
        env = dict(os.environ)
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        threads = max(1, (os.cpu_count() or 1) // world)
        env.setdefault("OMP_NUM_THREADS", str(threads))
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "yoso_bench.sequence_parallel", str(r), str(world), init, str(spec), str(out)],
                env=env,
            )
            for r, out in enumerate(outs)
        ]
        for p in procs:
            try:
                p.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise RuntimeError(f"a rank did not finish in {TIMEOUT_S} s") from None
        missing = [r for r, out in enumerate(outs) if not out.exists()]
        if missing:
            raise RuntimeError(f"ranks {missing} wrote no result (exit codes {[p.returncode for p in procs]})")
        ranks = [json.loads(out.read_text()) for out in outs]
    result = _report(config, ranks)
    out_dir = Path(config["out"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sequence_parallel.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"wrote {out_dir / 'sequence_parallel.json'}")
    return result


def _report(config: dict, ranks: list[dict]) -> dict:
    from types import SimpleNamespace

    from yoso_parallel import model as sequence_parallel_model

    from . import report

    errors = [e for r in ranks for e in r.get("errors", [])]
    if errors:
        raise RuntimeError("the sequence-parallel run failed:\n" + "\n".join(errors))
    backend = ranks[0]["backend"]
    rows = []
    for i, n in enumerate(config["ns"]):
        per_rank = [r["points"][i] for r in ranks]
        modelled = sequence_parallel_model(
            size=config["world"],
            n=n,
            batch=config["batch"] * config["heads"],
            dim=config["dim"],
            value_dim=config["dim"],
            num_hashes=config["num_hashes"],
            hash_bits=config["hash_bits"],
            itemsize=4,
            causal=config["causal"],
        )

        def mean(key, per_rank=per_rank):
            return statistics.fmean(p[key] for p in per_rank)

        row = {
            "n": n,
            "rows_per_rank": n // config["world"],
            "forward_sent_bytes": mean("forward_sent_bytes"),  # mean over ranks
            "forward_sent_bytes_per_rank": [p["forward_sent_bytes"] for p in per_rank],
            "forward_ms": max(p["forward_ms"] for p in per_rank),  # the layer ends with its slowest rank
            "model": modelled,
            "transfers": per_rank[0]["transfers"],
            "peak_rss_bytes": [p["peak_rss_bytes"] for p in per_rank],
        }
        if config["backward"]:
            row.update(
                backward_sent_bytes=mean("backward_sent_bytes"),
                backward_sent_bytes_per_rank=[p["backward_sent_bytes"] for p in per_rank],
                forward_backward_ms=max(p["forward_backward_ms"] for p in per_rank),
                grads=per_rank[0]["grads"],
            )
        rows.append(row)
    env = report.environment(SimpleNamespace(command=config["command"]), [backend])
    return {
        "schema": SCHEMA,
        **env,
        "config": {k: v for k, v in config.items() if k not in ("out", "command")},
        "backend": backend,
        "process_group": ranks[0]["process_group"],
        "methodology": (
            "one yoso.attention layer, [B, H, N, D] float32 split along N over the ranks; bytes: what each rank "
            "hands to each collective, counted by yoso_parallel.recording(), and the bytes it sends "
            "by the collective's algorithm (ring all-reduce: 2(R-1)/R of the payload; prefix/suffix sums: a chain, "
            "one table per rank but the last; ring shifts: the payload); ring attention's bytes by the same count "
            "(K/V blocks R-1 hops forward; backward also the dK/dV accumulators R hops). Time: the slowest rank's "
            "median wall time over the repeats after one warm-up call, ranks aligned by a barrier."
        ),
        "points": rows,
        "notes": config["notes"],
    }


def _mib(b: float) -> str:
    return f"{b / 2**20:.2f} MiB" if b >= 2**16 else f"{b / 2**10:.1f} KiB"


def table(result: dict) -> str:
    c = result["config"]
    head = (
        f"sequence parallel: {c['world']} ranks ({result['process_group']}), backend {result['backend']}, "
        f"B={c['batch']}, H={c['heads']}, D=Dv={c['dim']}, m={c['num_hashes']}, tau={c['hash_bits']}, float32, "
        f"{'causal' if c['causal'] else 'non-causal'}; bytes sent per rank (mean over ranks)"
    )
    cols = ["N", "fwd YOSO", "fwd ring-attn", "fwd ms"]
    if c["backward"]:
        cols += ["bwd YOSO", "dq,dk by", "bwd ring-attn", "fwd+bwd ms"]
    lines = [head, "  ".join(f"{x:>13}" for x in cols)]
    for p in result["points"]:
        cells = [str(p["n"]), _mib(p["forward_sent_bytes"]), _mib(p["model"]["ring_attention_forward"])]
        cells.append(f"{p['forward_ms']:.0f}")
        if c["backward"]:
            cells += [
                _mib(p["backward_sent_bytes"]),
                p["grads"],
                _mib(p["model"]["ring_attention_backward"]),
                f"{p['forward_backward_ms']:.0f}",
            ]
        lines.append("  ".join(f"{x:>13}" for x in cells))
    last = result["points"][-1]["model"]
    lines.append(
        f"crossover lengths (R={c['world']}): the value tables send less than ring attention's forward beyond "
        f"N = {last['crossover_forward']:.0f}; the lower bound's dq,dk tables less than a ring pass beyond "
        f"N = {last['crossover_grads']:.0f}"
    )
    return "\n".join(lines)


# ---- one rank -----------------------------------------------------------------------------------


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(rank: int, world: int, init: str, spec: str, out: str) -> None:
    import traceback

    result = {"errors": [], "points": []}
    try:
        import torch
        import torch.distributed as dist

        import yoso
        from yoso_parallel import recording as sequence_parallel_traffic

        config = json.loads(Path(spec).read_text())
        cuda = config["device"] == "cuda"
        if cuda:
            torch.cuda.set_device(rank)
        dist.init_process_group("nccl" if cuda else "gloo", init_method=init, rank=rank, world_size=world)
        result["process_group"] = dist.get_backend()
        torch.manual_seed(config["seed"] + rank)
        options = dict(
            seed=config["seed"],
            num_hashes=config["num_hashes"],
            hash_bits=config["hash_bits"],
            causal=config["causal"],
            group=dist.group.WORLD,
        )
        device = "cuda" if cuda else "cpu"
        shape = lambda n: (config["batch"], config["heads"], n // world, config["dim"])  # noqa: E731
        with yoso.set_backend(config["backend"]):
            probe = torch.zeros(shape(world), device=device)
            result["backend"] = yoso.backend_for(probe, probe, probe, **options)
            for n in config["ns"]:
                q, k, v = (torch.randn(shape(n), device=device, requires_grad=config["backward"]) for _ in range(3))

                def forward(q=q, k=k, v=v):
                    with torch.no_grad():
                        return yoso.attention(q, k, v, **options)

                def forward_backward(q=q, k=k, v=v):
                    out = yoso.attention(q, k, v, **options)
                    out.sum().backward()
                    return out

                step = forward_backward if config["backward"] else forward
                step()  # warm-up: compilation
                with sequence_parallel_traffic() as traffic:
                    step()
                point = {"n": n, **traffic.summary()}
                point["forward_ms"] = _timed(forward, config["repeats"], dist)
                if config["backward"]:
                    point["forward_backward_ms"] = _timed(forward_backward, config["repeats"], dist)
                    point["grads"] = _strategy(traffic)
                point["peak_rss_bytes"] = _peak_rss()
                result["points"].append(point)
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        result["errors"].append(f"rank {rank}: {traceback.format_exc()}")
    Path(out).write_text(json.dumps(result))


def _strategy(traffic) -> str:
    whats = {t.what for t in traffic.transfers if t.phase == "backward"}
    return "tables" if "lower-bound tables" in whats else "ring"


def _timed(fn, repeats: int, dist) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
    sys.exit(0)
