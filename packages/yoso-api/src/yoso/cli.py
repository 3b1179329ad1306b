"""The ``yoso`` command: ``yoso info``, ``yoso demo`` and ``yoso bench``."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys

from . import __version__, backends, bench


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one) and the usable core count."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({cores} cores)"


def gpu_names() -> list[str] | str:
    """CUDA devices torch can see, or why there are none."""
    if _package_version("torch") is None:
        return "torch is not installed"
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA device visible to torch {torch.__version__}"
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def info() -> dict:
    explicit = backends.explicit_choice()
    try:
        default = backends.get_backend()
    except RuntimeError as exc:
        default = f"none ({exc})"
    return {
        "yoso": __version__,
        "python": platform.python_version(),
        "packages": {n: _package_version(n) for n in ("numpy", "torch", "jax", "jaxlib", "triton", "cupy")},
        "cpu": cpu_name(),
        "gpus": gpu_names(),
        "selected_backend": default,
        "selected_by": "set_backend/YOSO_BACKEND" if explicit else "automatic (highest priority available)",
        "backends": backends.status(),
    }


def _print_info(data: dict) -> None:
    print(f"yoso {data['yoso']}  (python {data['python']})")
    print("packages: " + ", ".join(f"{k} {v or '-'}" for k, v in data["packages"].items()))
    print(f"cpu:  {data['cpu']}")
    gpus = data["gpus"]
    print(f"gpus: {', '.join(gpus) if isinstance(gpus, list) else gpus}")
    print(f"default backend: {data['selected_backend']} ({data['selected_by']})")
    print("backends:")
    if not data["backends"]:
        print("  none installed (pip install yoso-reference)")
    for row in data["backends"]:
        state = "available" if row["available"] else f"UNAVAILABLE: {row['reason']}"
        print(f"  {row['name']:<10} {state}")
        print(f"  {'':<10} from {row['source']}")
        if "framework" in row:
            print(
                f"  {'':<10} priority {row['priority']}, computes on {row['framework']}, serves "
                f"{', '.join(row['serves'])} arrays, dtypes {', '.join(row['dtypes'])}"
            )
            if row["description"]:
                print(f"  {'':<10} {row['description']}")
            if row["devices"]:
                print(f"  {'':<10} devices: {', '.join(row['devices'])}")
            missing = row["missing_features"]
            print(f"  {'':<10} missing features: {', '.join(missing) if missing else 'none'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="yoso", description="YOSO attention: backends, demo and benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="list backends, versions, devices and why any backend cannot run")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of text")
    p_demo = sub.add_parser("demo", help="YOSO-m vs YOSO-E vs softmax on one sample: table and plot")
    p_demo.add_argument("--backend", help="backend to run on (default: the default backend)")
    p_demo.add_argument("--n", type=int, default=1024, help="sequence length (default 1024)")
    p_demo.add_argument("--dim", type=int, default=64, help="head dim D (default 64)")
    p_demo.add_argument("--hash-bits", type=int, default=8, help="tau (default 8)")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--repeats", type=int, default=3, help="timed repeats per method (median)")
    p_demo.add_argument("--out", default="yoso-demo", help="output folder for demo.png and demo.json")
    p_demo.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    p_bench = sub.add_parser(
        "bench", help="time and memory vs N against torch SDPA and YOSO-E, and error vs N: JSON and figures"
    )
    bench.add_arguments(p_bench)
    args = parser.parse_args(argv)

    try:
        if args.command == "info":
            data = info()
            print(json.dumps(data, indent=2)) if args.json else _print_info(data)
        elif args.command == "demo":
            from . import demo

            demo.run(
                n=args.n,
                dim=args.dim,
                hash_bits=args.hash_bits,
                seed=args.seed,
                repeats=args.repeats,
                backend=args.backend,
                out_dir=args.out,
                plot=not args.no_plot,
            )
        elif args.command == "bench":
            bench.main(args, sys.argv[1:] if argv is None else argv)
    except (ValueError, TypeError, RuntimeError) as exc:
        print(f"yoso {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
