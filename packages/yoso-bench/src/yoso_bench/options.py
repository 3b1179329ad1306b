"""The ``yoso bench`` command line and the grid it describes (:class:`Config`).

Everything a user can get wrong is checked here, before anything is measured, with a message that
names the option: unknown backends, a backend that cannot run on the chosen device, GPU options
without a GPU, malformed sequence lengths.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")

# Default grids. CPU: B*H = 8 as in the CPU speed targets; GPU: B = 4, H = 16 as in the H100 targets.
CPU_NS = tuple(1024 << i for i in range(5))  # 1k ... 16k
GPU_NS = tuple(1024 << i for i in range(7))  # 1k ... 64k
QUICK_CPU_NS = (256, 512, 1024)
QUICK_GPU_NS = (1024, 2048, 4096)
SHAPES = {"cpu": (1, 8), "cuda": (4, 16)}  # (batch, heads)
QUICK_SHAPES = {"cpu": (1, 2), "cuda": (4, 16)}
DEFAULT_DTYPES = {"cpu": ("float32",), "cuda": ("float32", "bfloat16")}

# Per point: how long to keep repeating (CPU; on a GPU do_bench's own budget applies), and the
# longest single call worth making: a point predicted to take longer is skipped with that reason.
POINT_BUDGET_S = {"cpu": 5.0, "cuda": 2.0}
MAX_CALL_S = {"cpu": 60.0, "cuda": 10.0}
QUICK_POINT_BUDGET_S = 0.2
QUICK_MAX_CALL_S = 5.0

FIDELITY_NS = tuple(64 << i for i in range(7))  # 64 ... 4096, the paper's Fig. 8
QUICK_FIDELITY_NS = (64, 128, 256)
FIDELITY_HASHES = (8, 16, 32, 64, 128)
FIDELITY_SAMPLES = 4
QUICK_FIDELITY_SAMPLES = 2


@dataclass
class Config:
    """One benchmark run, fully resolved (no defaults left to pick)."""

    device: str
    dtypes: tuple[str, ...]
    backends: tuple[str, ...]
    batch: int
    heads: int
    dim: int
    num_hashes: int
    hash_bits: int | str  # an int, or "auto": ceil(log2 N) per point
    ns: tuple[int, ...]
    backward: bool
    fidelity: bool
    fidelity_ns: tuple[int, ...]
    fidelity_hashes: tuple[int, ...]
    fidelity_samples: int
    point_budget_s: float
    max_call_s: float
    out: Path
    quick: bool = False
    plots: bool = True
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    command: str = ""

    def tau(self, n: int) -> int:
        """tau at sequence length ``n``: the fixed value, or ceil(log2 n) for ``--hash-bits auto``."""
        return max(1, math.ceil(math.log2(n))) if self.hash_bits == "auto" else int(self.hash_bits)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``yoso bench`` options (the contract GPU scripts rely on comes first)."""
    p.add_argument(
        "--backend",
        action="append",
        metavar="NAME",
        help="backend to measure (repeatable or comma-separated; default: every available backend on --device)",
    )
    p.add_argument("--device", choices=DEVICES, default="cpu", help="where to run (default cpu)")
    p.add_argument(
        "--dtype",
        action="append",
        metavar="DTYPE",
        help=f"one of {', '.join(DTYPES)} (repeatable or comma-separated; default float32 on cpu, "
        "float32 and bfloat16 on cuda)",
    )
    p.add_argument("--batch", type=int, help="batch size B (default 1 on cpu, 4 on cuda)")
    p.add_argument("--heads", type=int, help="heads H (default 8 on cpu, 16 on cuda)")
    p.add_argument("--dim", type=int, default=64, help="head dim D (default 64)")
    p.add_argument("--num-hashes", type=int, default=32, help="m, hashes per YOSO call (default 32)")
    p.add_argument("--hash-bits", default="8", help="tau, or 'auto' for ceil(log2 N) at each N (default 8)")
    p.add_argument("--n", help="sequence lengths, comma-separated (default 1024..16384 on cpu, ..65536 on cuda)")
    p.add_argument("--out", default="bench-out", help="output folder for bench.json and the figures")
    p.add_argument("--quick", action="store_true", help="a small grid for CI smoke (seconds, not minutes)")
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--no-fidelity", action="store_true", help="skip the error-vs-N measurements (Fig. 8)")
    p.add_argument(
        "--decode",
        action="store_true",
        help="instead of the grid: one decoding step at contexts --n (default 1k..64k) with YOSO's carried state "
        "against SDPA with a KV cache, on the CPU (decode.json, decode.png)",
    )
    p.add_argument(
        "--variable-length",
        action="store_true",
        help="instead of the grid: a fine-tuning loop with dynamic padding on CPU torch tensors, one layer's "
        "forward+backward per call at a random length in --n MIN,MAX (default 32,512), compilation included "
        "(--repeats calls, default 48; variable_length.json)",
    )
    # Beyond the contract.
    p.add_argument("--budget", type=float, help="seconds of repeats per CPU point (default 5; quick 0.2)")
    p.add_argument(
        "--max-call-seconds",
        type=float,
        help="skip a point whose single call is predicted to take longer (default 60 on cpu, 10 on cuda)",
    )
    p.add_argument("--fidelity-n", help="sequence lengths for the fidelity study (default 64..4096)")
    p.add_argument("--fidelity-samples", type=int, help="independent samples averaged per fidelity point (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of inputs and hash functions (default 0)")
    p.add_argument(
        "--threads",
        type=int,
        help="torch's intra-op threads (default: torch's own choice; 1 is steadiest on a shared machine)",
    )
    p.add_argument("--no-plot", action="store_true", help="write the JSON only (no matplotlib needed)")
    p.add_argument("--note", action="append", default=[], help="free text stored in the JSON (e.g. 'machine shared')")


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{option} takes comma-separated positive integers (e.g. 1024,2048), got {text!r}")
    return tuple(sorted(set(values)))


def _names(values: list[str] | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys(part.strip() for v in values or () for part in v.split(",") if part.strip()))


def _positive(value, option: str):
    if value is not None and value <= 0:
        raise ValueError(f"{option} must be positive, got {value}")
    return value


def _hash_bits(text: str) -> int | str:
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        tau = int(text)
    except ValueError:
        raise ValueError(f"--hash-bits takes an integer in 1..16 or 'auto' (ceil(log2 N)), got {text!r}") from None
    if not 1 <= tau <= 16:
        raise ValueError(f"--hash-bits must be in 1..16 (tables hold 2**tau rows) or 'auto', got {tau}")
    return tau


def check_device(device: str) -> None:
    """``ValueError`` when ``device`` cannot be used here (no torch, no CUDA device)."""
    if device != "cuda":
        return
    try:
        import torch
    except ImportError:
        raise ValueError("--device cuda needs torch with CUDA; torch is not installed") from None
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device cuda: no CUDA device is visible to torch {torch.__version__}; run on a GPU machine "
            "or use --device cpu"
        )


def resolve_backends(requested: tuple[str, ...], device: str) -> tuple[str, ...]:
    """The backends to measure: the requested ones (each checked) or every available one on ``device``."""
    import yoso
    from yoso import backends

    if requested:
        for name in requested:
            impl = backends.get(name)  # ValueError for unknown or unavailable ones, naming the installed
            if device not in impl.devices:
                raise ValueError(f"--backend {name} runs on {', '.join(impl.devices)}, not on --device {device}")
        return requested
    found = tuple(n for n in yoso.available_backends() if device in backends.get(n).devices)
    if not found:
        on_other = ", ".join(yoso.available_backends()) or "none"
        raise ValueError(f"no available yoso backend runs on --device {device} (available: {on_other}; see yoso info)")
    return found


def config_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> Config:
    """Resolve ``args`` into a :class:`Config`; ``ValueError`` naming the option for bad input."""
    try:
        import torch  # noqa: F401  (the SDPA baseline)
    except ImportError:
        raise ValueError("yoso bench compares with torch's scaled_dot_product_attention: pip install torch") from None
    device = args.device
    check_device(device)
    dtypes = _names(args.dtype) or DEFAULT_DTYPES[device]
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    quick = bool(args.quick)
    batch, heads = (QUICK_SHAPES if quick else SHAPES)[device]
    for option, value in (
        ("--batch", args.batch),
        ("--heads", args.heads),
        ("--dim", args.dim),
        ("--num-hashes", args.num_hashes),
        ("--fidelity-samples", args.fidelity_samples),
        ("--budget", args.budget),
        ("--max-call-seconds", args.max_call_seconds),
    ):
        _positive(value, option)
    if args.n is not None:
        ns = _int_list(args.n, "--n")
    else:
        ns = (QUICK_CPU_NS if device == "cpu" else QUICK_GPU_NS) if quick else (CPU_NS if device == "cpu" else GPU_NS)
    fidelity_ns = (
        _int_list(args.fidelity_n, "--fidelity-n")
        if args.fidelity_n is not None
        else (QUICK_FIDELITY_NS if quick else FIDELITY_NS)
    )
    command = "yoso " + shlex.join(sys.argv[1:] if argv is None else argv)
    return Config(
        device=device,
        dtypes=dtypes,
        backends=resolve_backends(_names(args.backend), device),
        batch=args.batch or batch,
        heads=args.heads or heads,
        dim=args.dim,
        num_hashes=args.num_hashes,
        hash_bits=_hash_bits(args.hash_bits),
        ns=ns,
        backward=not args.no_backward,
        fidelity=not args.no_fidelity,
        fidelity_ns=fidelity_ns,
        fidelity_hashes=FIDELITY_HASHES,
        fidelity_samples=args.fidelity_samples or (QUICK_FIDELITY_SAMPLES if quick else FIDELITY_SAMPLES),
        point_budget_s=args.budget or (QUICK_POINT_BUDGET_S if quick else POINT_BUDGET_S[device]),
        max_call_s=args.max_call_seconds or (QUICK_MAX_CALL_S if quick else MAX_CALL_S[device]),
        out=Path(args.out),
        quick=quick,
        plots=not args.no_plot,
        seed=args.seed,
        notes=list(args.note),
        command=command,
    )
