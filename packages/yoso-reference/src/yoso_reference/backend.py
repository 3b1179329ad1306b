"""The ``reference`` backend: yoso_reference exposed to ``yoso`` (entry point ``yoso.backends``).

Only ``yoso`` loads this module, so it may import ``yoso``; the math modules never do, and stay
usable on their own. NumPy arrays are served directly; CPU torch tensors through the API's torch
glue, which converts at the boundary (bfloat16 computes in float32).
"""

from __future__ import annotations

from yoso.backends import Backend

from . import __version__


class ReferenceBackend(Backend):
    name = "reference"
    priority = 0  # the oracle: correct everywhere, fastest nowhere
    framework = "numpy"
    frameworks = ("numpy", "torch")
    description = "plain vectorised NumPy; the oracle every other backend is tested against"
    devices = ("cpu",)
    module = "yoso_reference"  # the oracle's functions take exactly the primitives' arguments
    has_tables = True  # bucket_tables / read_buckets: docs/math.md#bucket-tables
    lower_bound_forms = ("pairs", "tables")  # sampled_grads(form=...): docs/math.md#lower-bound

    def version(self) -> str:
        return __version__
