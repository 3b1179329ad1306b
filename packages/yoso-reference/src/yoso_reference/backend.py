"""The ``reference`` backend: yoso_reference exposed to ``yoso`` (entry point ``yoso.backends``).

Only ``yoso`` loads this module, so it may import ``yoso``; the math modules never do, and stay
usable on their own. NumPy arrays are served directly; CPU torch tensors through the API's torch
glue, which converts at the boundary (bfloat16 computes in float32).
"""

from __future__ import annotations

from yoso.backends import Backend

from . import __version__
from .cumulation import cumulate
from .hashing import hash_codes
from .pairwise import expectation_backward, expectation_forward, sampled_grads


class ReferenceBackend(Backend):
    name = "reference"
    priority = 0  # the oracle: correct everywhere, fastest nowhere
    framework = "numpy"
    frameworks = ("numpy", "torch")
    description = "plain vectorised NumPy; the oracle every other backend is tested against"
    devices = ("cpu",)

    def version(self) -> str:
        return __version__

    # The oracle's functions take exactly the primitives' arguments: the backend is them, unchanged.
    hash_codes = staticmethod(hash_codes)
    cumulate = staticmethod(cumulate)
    sampled_grads = staticmethod(sampled_grads)
    expectation_forward = staticmethod(expectation_forward)
    expectation_backward = staticmethod(expectation_backward)
