"""``yoso bench``: YOSO against exact attention (torch SDPA) and YOSO-E, measured in one run.

    yoso bench                              # CPU grid, every available backend, figures in ./bench-out
    yoso bench --device cuda --out DIR      # GPU grid (float32 and bfloat16)
    yoso bench --quick                      # a small grid for CI smoke

Modules: ``options`` (the command line and the grid it describes), ``workloads`` (the callables
being timed, each backend on its own framework's arrays), ``timing`` and ``memory`` (how one point
is measured), ``fidelity`` (the paper's Fig. 8: YOSO-m against YOSO-E against softmax), ``report``
(the JSON, the table, slopes and figures) and ``runner`` (the loop over the grid that predicts,
skips and records). Only ``options`` is imported by ``yoso --help``; the rest load on use.
"""

from __future__ import annotations

from .options import add_arguments

__all__ = ["add_arguments", "main"]


def main(args, argv: list[str] | None = None) -> dict:
    """Run ``yoso bench`` for parsed ``args``; returns the results (also written to ``args.out``)."""
    from .options import config_from_args
    from .runner import run

    return run(config_from_args(args, argv))
