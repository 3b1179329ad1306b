"""The subcommands yoso-bench adds to ``yoso`` (entry-point group ``yoso.commands``; the interface is in
``yoso.cli``'s docstring): each has a one-line ``help``, ``add_arguments(parser)`` and ``run(args)``.

Importing this module must stay cheap -- ``yoso --help`` imports it -- so the measuring code loads in ``run``.
"""

from __future__ import annotations


class _Bench:
    help = (
        "time and memory vs N against torch SDPA and YOSO-E, and error vs N: JSON and figures "
        "(--decode: a decoding step with the carried state against a KV cache; --variable-length: a loop with "
        "dynamic padding, compilation included)"
    )

    def add_arguments(self, parser) -> None:
        from . import sequence_parallel
        from .options import add_arguments

        add_arguments(parser)
        sequence_parallel.add_arguments(parser)

    def run(self, args) -> int:
        if getattr(args, "threads", None):
            if args.threads < 1:
                raise ValueError(f"--threads must be positive, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        chosen = [
            option
            for option, given in (
                ("--sequence-parallel", getattr(args, "sequence_parallel", None) is not None),
                ("--decode", getattr(args, "decode", False)),
                ("--variable-length", getattr(args, "variable_length", False)),
            )
            if given
        ]
        if len(chosen) > 1:
            raise ValueError(f"{' and '.join(chosen)} are separate benchmarks: pass one")
        if getattr(args, "sequence_parallel", None) is not None:  # one layer split over processes
            from . import sequence_parallel

            sequence_parallel.run(sequence_parallel.config_from_args(args, getattr(args, "argv", None)))
            return 0
        if getattr(args, "variable_length", False):
            from . import variable_length

            variable_length.run(variable_length.config_from_args(args, getattr(args, "argv", None)))
            return 0
        if getattr(args, "decode", False):
            from . import decode

            decode.run(decode.config_from_args(args, getattr(args, "argv", None)))
            return 0
        from .options import config_from_args
        from .runner import run

        run(config_from_args(args, getattr(args, "argv", None)))
        return 0


class _Demo:
    help = "YOSO-m vs YOSO-E vs softmax on one sample: table and plot"

    def add_arguments(self, p) -> None:
        p.add_argument("--backend", help="backend to run on (default: the default backend)")
        p.add_argument("--n", type=int, default=1024, help="sequence length (default 1024)")
        p.add_argument("--dim", type=int, default=64, help="head dim D (default 64)")
        p.add_argument("--hash-bits", type=int, default=8, help="tau (default 8)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--repeats", type=int, default=3, help="timed repeats per method (median)")
        p.add_argument("--out", default="yoso-demo", help="output folder for demo.png and demo.json")
        p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")

    def run(self, args) -> int:
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
        return 0


bench = _Bench()
demo = _Demo()
