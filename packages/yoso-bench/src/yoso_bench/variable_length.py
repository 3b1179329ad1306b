"""``yoso bench --variable-length``: a fine-tuning loop with dynamic padding, compilation included.

A jit-compiling backend compiles one program per input shape. A BERT fine-tune with dynamic padding pads
every batch to its own longest sequence, so the shape changes from one step to the next. yoso's glue pads
NumPy and torch inputs to a few bucketed lengths (four per octave), so only a few programs are compiled.
This benchmark measures whether that is enough: the same stream of calls runs on every method, and each
call's wall-clock time is recorded, compilation included.

One call is one attention layer's forward and backward on CPU torch tensors
``q, k, v [B, H, N, D]`` (requires_grad; ``torch.autograd.grad`` with a fixed cotangent). Every batch row
has its own length, and the keys beyond it are masked (``key_padding_mask``). ``N``, the batch's longest
length, is drawn uniformly from ``--n MIN,MAX`` for each call. The draws depend on ``--seed`` and the call
index alone, so every method sees the same stream.

Methods: ``sdpa`` (torch's ``scaled_dot_product_attention`` with the same padding as a boolean mask), then
YOSO-m on each backend (default: the one automatic selection gives CPU torch tensors, and ``reference``).
Per method: the total time, the time of the first call, the median of the calls after the first quarter,
and, where JAX compiles, the number of XLA compilations and their seconds (``jax.monitoring``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SCHEMA = "yoso-bench-variable-length/1"
DEFAULT_LENGTHS = (32, 512)
DEFAULT_CALLS, QUICK_CALLS = 48, 4
SHAPE, QUICK_SHAPE = (8, 12), (2, 2)  # (batch, heads): a BERT-base layer; quick: seconds
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclass
class VariableLengthConfig:
    backends: tuple[str, ...]
    batch: int
    heads: int
    dim: int
    num_hashes: int
    hash_bits: int
    lengths: tuple[int, int]
    calls: int
    out: Path
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    command: str = ""


def config_from_args(args, argv=None) -> VariableLengthConfig:
    """The configuration from ``yoso bench`` options (``ValueError`` naming the option)."""
    import shlex

    from .options import _hash_bits, _int_list, _names, resolve_backends

    try:
        import torch
    except ImportError:
        raise ValueError("yoso bench --variable-length runs on torch tensors: pip install torch") from None
    if args.device != "cpu":
        raise ValueError("yoso bench --variable-length runs on the CPU (--device cpu)")
    tau = _hash_bits(args.hash_bits)
    if tau == "auto":
        raise ValueError("yoso bench --variable-length needs a fixed --hash-bits")
    lengths = _int_list(args.n, "--n") if args.n else DEFAULT_LENGTHS
    if len(lengths) != 2 or not 1 <= lengths[0] <= lengths[1]:
        raise ValueError(f"--n with --variable-length is MIN,MAX (1 <= MIN <= MAX), got {args.n!r}")
    requested = _names(args.backend)
    if requested:
        names = resolve_backends(requested, "cpu")
    else:
        import yoso

        x = torch.zeros((1, 2, 4))
        names = tuple(dict.fromkeys([yoso.backend_for(x, x, x), "reference"]))
    calls = args.repeats if args.repeats is not None else (QUICK_CALLS if args.quick else DEFAULT_CALLS)
    if calls < 1:
        raise ValueError(f"--repeats (the number of calls) must be positive, got {calls}")
    batch, heads = QUICK_SHAPE if args.quick else SHAPE
    for option, value in (("--batch", args.batch), ("--heads", args.heads)):
        if value is not None and value <= 0:
            raise ValueError(f"{option} must be positive, got {value}")
    return VariableLengthConfig(
        backends=names,
        batch=args.batch or batch,
        heads=args.heads or heads,
        dim=args.dim,
        num_hashes=args.num_hashes,
        hash_bits=int(tau),
        lengths=(lengths[0], lengths[1]),
        calls=calls,
        out=Path(args.out),
        seed=args.seed,
        notes=list(args.note),
        command="yoso " + shlex.join(sys.argv[1:] if argv is None else argv),
    )


def call_inputs(config: VariableLengthConfig, index: int):
    """``(q, k, v, cotangent, key_mask [B, N])`` of call ``index``: N, the longest row, is drawn in
    ``config.lengths``; every row has its own length (at least 1, the longest exactly N)."""
    import torch

    rng = np.random.default_rng([config.seed, index])
    n = int(rng.integers(config.lengths[0], config.lengths[1] + 1))
    rows = rng.integers(1, n + 1, size=config.batch)
    rows[rng.integers(config.batch)] = n
    shape = (config.batch, config.heads, n, config.dim)
    q, k, v, g = (torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)) for _ in range(4))
    key_mask = torch.from_numpy(np.arange(n)[None, :] < rows[:, None])
    return q, k, v, g, key_mask


def _step(config: VariableLengthConfig, method: str):
    """The callable timed per call: forward and backward of one layer on the call's inputs."""
    import torch
    import torch.nn.functional as F

    import yoso

    planes = torch.from_numpy(
        yoso.hash_planes(config.num_hashes, config.hash_bits, config.dim, seed=config.seed).astype(np.float32)
    )

    def run(q, k, v, g, key_mask):
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        if method == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        else:
            with yoso.set_backend(method):
                out = yoso.attention(
                    q,
                    k,
                    v,
                    key_padding_mask=key_mask[:, None, :],
                    num_hashes=config.num_hashes,
                    hash_bits=config.hash_bits,
                    planes=planes,
                )
        return torch.autograd.grad(out, (q, k, v), g)

    return run


class _Compilations:
    """XLA compilations while it is active (count and seconds), if JAX is installed."""

    def __init__(self) -> None:
        self.count, self.seconds, self.active = 0, 0.0, False
        try:
            import jax.monitoring
        except ImportError:
            return
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **_) -> None:
        if self.active and event == COMPILE_EVENT:
            self.count += 1
            self.seconds += duration


def run(config: VariableLengthConfig) -> dict:
    compilations = _Compilations()
    methods = []
    for method in ("sdpa", *config.backends):
        step = _step(config, method)
        compilations.count, compilations.seconds, compilations.active = 0, 0.0, True
        times, lengths = [], []
        for index in range(config.calls):
            inputs = call_inputs(config, index)
            start = time.perf_counter()
            step(*inputs)
            times.append(time.perf_counter() - start)
            lengths.append(int(inputs[0].shape[2]))
        compilations.active = False
        settled = times[config.calls // 4 :] or times
        methods.append(
            dict(
                method=method,
                total_s=sum(times),
                first_call_s=times[0],
                settled_median_s=float(np.median(settled)),
                compilations=compilations.count,
                compile_s=compilations.seconds,
                calls=[dict(n=n, seconds=t) for n, t in zip(lengths, times)],
            )
        )
        print(
            f"{method:>10}: {sum(times):8.2f} s for {config.calls} calls (first {times[0] * 1e3:.0f} ms, "
            f"median after warm-up {np.median(settled) * 1e3:.1f} ms, "
            f"{compilations.count} XLA compilations, {compilations.seconds:.1f} s)",
            flush=True,
        )
    result = dict(
        schema=SCHEMA,
        date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        command=config.command,
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        distinct_lengths=len({c["n"] for c in methods[0]["calls"]}),
        methods=methods,
    )
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "variable_length.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {config.out / 'variable_length.json'}")
    return result
