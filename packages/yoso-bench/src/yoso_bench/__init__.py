"""yoso-bench: ``yoso bench`` and ``yoso demo``, the measuring side of yoso, as subcommands of ``yoso``.

    yoso demo                               # N-YOSO-m converging to N-YOSO-E: table, demo.png, demo.json
    yoso bench                              # CPU grid, every available backend, figures in ./bench-out
    yoso bench --device cuda --out DIR      # GPU grid (float32 and bfloat16)
    yoso bench --quick                      # a small grid for CI smoke

The ``yoso`` command (yoso-api) finds both through the ``yoso.commands`` entry points, which name the
objects in :mod:`yoso_bench.commands`. Only yoso's public surface is used: ``yoso.*``, ``yoso.backends``,
``yoso.testing`` and ``yoso.cli.info()``.

Modules: ``options`` (the command line and the grid it describes), ``workloads`` (the callables
being timed, each backend on its own framework's arrays), ``timing`` and ``memory`` (how one point
is measured), ``fidelity`` (the paper's Fig. 8: YOSO-m against YOSO-E against softmax), ``report``
(the JSON, the table, slopes and figures), ``runner`` (the loop over the grid that predicts, skips
and records) and ``demo``. Building ``yoso``'s parser imports ``commands`` and ``options`` only
(no torch, JAX or matplotlib); the rest load on use.
"""

from __future__ import annotations

__version__ = "0.1.0"
