"""The ``yoso`` command: ``yoso info`` here, every other subcommand from the distribution that provides it.

    yoso info [--json]      # installed backends, versions (yoso-parallel's too), devices, why any cannot run
    yoso --version
    python -m yoso ...      # the same command

Subcommands from other distributions (``yoso bench`` and ``yoso demo`` come with ``yoso-bench``) are
found through the entry-point group ``yoso.commands``, e.g. in the providing package's ``pyproject.toml``::

    [project.entry-points."yoso.commands"]
    bench = "yoso_bench.commands:bench"

The entry point's name is the subcommand; the object it names (a module, an instance, anything with these
attributes) provides

* ``help`` -- one line for ``yoso --help``;
* ``add_arguments(parser)`` -- adds its options to the subcommand's ``argparse`` parser;
* ``run(args) -> int | None`` -- runs it; ``args`` is the parsed namespace, plus ``args.argv``: the
  arguments ``yoso`` was given (for recording the command line). ``None`` counts as exit status 0.
  ``ValueError``, ``TypeError`` and ``RuntimeError`` are reported as ``yoso NAME: error: ...`` on
  stderr with exit status 2, like argparse's own errors.

Entry points are loaded only when the parser is built, so loading one must be cheap: import no torch, JAX
or matplotlib before ``run``. One that fails to load is listed as broken, with the reason, and running it
exits 2 with that reason; the rest of the command keeps working. Commands known to come from a
distribution that is not installed (:data:`KNOWN_COMMANDS`) are listed with the package to install.

:func:`info` is also the machine description other tools record (``yoso bench`` does): the data
``yoso info --json`` prints.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import warnings

from . import __version__, backends

COMMANDS_GROUP = "yoso.commands"

# Subcommands yoso's own distributions provide, and where to get them when they are missing.
KNOWN_COMMANDS = {"bench": "yoso-bench", "demo": "yoso-bench"}
MONOREPO_PATHS = {"yoso-bench": "packages/yoso-bench[plot]"}

BUILTIN_COMMANDS = ("info",)

# The versions `yoso info` shows: the frameworks, and yoso-parallel (group=/axis_name= need it).
PACKAGES = ("numpy", "torch", "jax", "jaxlib", "triton", "cupy", "yoso-parallel")


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


# The calls `yoso info` asks automatic selection about: each installed framework's arrays, on the CPU and,
# where torch sees one, a CUDA device; the default options, in float32 and float64.
_CHOICE_DTYPES = ("float32", "float64")


def _choice_rows() -> list[dict]:
    """Which backend ``yoso.attention`` would run a default call on, per caller array type (no compute)."""
    import numpy as np

    from ._api import backend_for
    from .testing import to_framework

    placements = [(f, "cpu") for f in ("numpy", "torch", "jax") if f == "numpy" or _package_version(f)]
    if isinstance(gpu_names(), list):
        placements.append(("torch", "cuda"))
    rows = []
    x = np.zeros((1, 4, 8))
    for framework, device in placements:
        for dtype in _CHOICE_DTYPES:
            row = {"framework": framework, "device": device, "dtype": dtype}
            try:
                with warnings.catch_warnings():  # JAX warns when float64 is off; the row says so instead
                    warnings.simplefilter("ignore")
                    arrays = [to_framework(x, framework, device, dtype) for _ in range(3)]
                if str(arrays[0].dtype).removeprefix("torch.") != dtype:
                    hint = " (jax_enable_x64 is off)" if framework == "jax" else ""
                    row["backend"], row["reason"] = None, f"{framework} gives {arrays[0].dtype} arrays{hint}"
                else:
                    row["backend"] = backend_for(*arrays)
            except Exception as exc:  # a framework that cannot make such arrays here, or no backend serves them
                row["backend"], row["reason"] = None, f"{type(exc).__name__}: {exc}"
            rows.append(row)
    return rows


def info() -> dict:
    """What ``yoso info --json`` prints: versions, CPU, GPUs, the selected backend, every backend's status and,
    per caller array type, the backend automatic selection picks."""
    explicit = backends.explicit_choice()
    try:
        default = backends.get_backend()
    except RuntimeError as exc:
        default = f"none ({exc})"
    return {
        "yoso": __version__,
        "python": platform.python_version(),
        "packages": {n: _package_version(n) for n in PACKAGES},
        "cpu": cpu_name(),
        "gpus": gpu_names(),
        "selected_backend": default,
        "selected_by": "set_backend/YOSO_BACKEND" if explicit else "automatic (highest priority available)",
        "backends": backends.status(),
        "automatic_choice": _choice_rows() if not explicit else [],
    }


def _print_info(data: dict) -> None:
    print(f"yoso {data['yoso']}  (python {data['python']})")
    print("packages: " + ", ".join(f"{k} {v or '-'}" for k, v in data["packages"].items()))
    print(f"cpu:  {data['cpu']}")
    gpus = data["gpus"]
    print(f"gpus: {', '.join(gpus) if isinstance(gpus, list) else gpus}")
    print(f"default backend: {data['selected_backend']} ({data['selected_by']})")
    if data["automatic_choice"]:
        print("a call with default options runs on (yoso.backend_for):")
        for row in data["automatic_choice"]:
            where = f"{row['framework']} {row['dtype']} on {row['device']}"
            print(f"  {where:<28} {row['backend'] or 'none: ' + row['reason']}")
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


def _run_info(args) -> int:
    data = info()
    print(json.dumps(data, indent=2)) if args.json else _print_info(data)
    return 0


# ---- subcommands from other distributions ---------------------------------------------------------


def command_entry_points() -> list:
    """The entry points of the ``yoso.commands`` group (each with ``name``, ``value`` and ``load()``)."""
    return list(importlib.metadata.entry_points(group=COMMANDS_GROUP))


def missing_command_message(name: str) -> str:
    """Why ``yoso NAME`` cannot run when the distribution that provides it is not installed."""
    package = KNOWN_COMMANDS[name]
    path = MONOREPO_PATHS.get(package)
    where = f" (in the yoso repository: pip install -e '{path}')" if path else ""
    return f"'yoso {name}' comes with the {package} package, which is not installed: pip install {package}{where}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _load_commands() -> dict[str, tuple[object | None, str]]:
    """{name: (command object, or None when it failed to load, and why; source)} for the group's entry points."""
    found: dict[str, tuple[object | None, str]] = {}
    for ep in command_entry_points():
        if ep.name in BUILTIN_COMMANDS or ep.name in found:
            continue  # yoso's own commands cannot be replaced; of two providers, the first found wins
        source = ep.value
        try:
            command = ep.load()
            missing = [a for a in ("help", "add_arguments", "run") if not hasattr(command, a)]
            if missing:
                raise TypeError(f"{source} lacks {', '.join(missing)} (see yoso.cli's docstring)")
            found[ep.name] = (command, source)
        except Exception as exc:  # noqa: BLE001 -- a broken plugin must not take `yoso info` down with it
            found[ep.name] = (None, f"{source}: {_first_line(exc)}")
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yoso", description="YOSO attention: backends, and the commands of installed yoso packages"
    )
    parser.add_argument("--version", action="version", version=f"yoso {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_info = sub.add_parser("info", help="list backends, versions, devices and why any backend cannot run")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of text")
    p_info.set_defaults(_run=_run_info)
    commands = _load_commands()
    for name, (command, source) in commands.items():
        if command is None:
            p = sub.add_parser(name, help=f"(broken: {source})".replace("%", "%%"), add_help=False)
            p.set_defaults(_unusable=f"the command failed to load: {source}")
            continue
        p = sub.add_parser(name, help=command.help, description=command.help)
        try:
            command.add_arguments(p)
        except Exception as exc:  # noqa: BLE001 -- as for a failed load: this command is unusable, not yoso
            p.set_defaults(_unusable=f"the command failed to set up its options: {source}: {_first_line(exc)}")
            continue
        p.set_defaults(_run=command.run)
    for name, package in KNOWN_COMMANDS.items():
        if name not in commands:
            p = sub.add_parser(name, help=f"(not installed: pip install {package})", add_help=False)
            p.set_defaults(_unusable=missing_command_message(name))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:  # a bare `yoso`: say what there is
        parser.print_help()
        return 0
    unusable = getattr(args, "_unusable", None)
    if unusable is not None:  # whatever its arguments: the command itself is missing
        print(f"yoso {args.command}: error: {unusable}", file=sys.stderr)
        return 2
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        status = args._run(args)
    except (ValueError, TypeError, RuntimeError) as exc:
        print(f"yoso {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `yoso info | head`: the reader left; stop writing, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
