"""yoso: YOSO attention (Zeng et al., ICML 2021) -- LSH-sampled linear attention, one API, many backends.

    import yoso
    out = yoso.attention(q, k, v)                     # [..., Nq, D] x [..., Nk, D] x [..., Nk, Dv]
    out = yoso.attention(q, k, v, mode="expectation") # YOSO-E, the exact expectation
    with yoso.set_backend("reference"): ...           # pick a backend (also: YOSO_BACKEND)

Model layers (a torch layer, a Flax NNX module, Hugging Face integrations) are the ``yoso-models``
distribution (``import yoso_models``), built on this API; ``import yoso`` imports none of torch, flax or
transformers.

``yoso info`` lists the installed backends, what arrays each serves and why any cannot run; ``yoso demo``
and ``yoso bench`` come with the ``yoso-bench`` distribution.
"""

from ._api import attention, attention_vjp, backend_for, hash_codes
from ._planes import MAX_HASH_BITS, hash_planes
from ._state import State
from ._validate import check_options
from .backends import BACKWARDS, HASHINGS, MODES, available_backends, get_backend, set_backend

__version__ = "0.1.0"

# Submodules that moved to the yoso-models distribution, and their new homes. Accessing one says where it
# went (and imports nothing: the new package may not be installed, and it pulls torch/flax/transformers).
_MOVED = {
    "nn": "yoso_models.nn",
    "nnx": "yoso_models.nnx",
    "integrations": "yoso_models.transformers",
}


def __getattr__(name: str):
    if name in _MOVED:
        raise AttributeError(
            f"yoso.{name} moved to {_MOVED[name]} in the yoso-models distribution: "
            f"pip install yoso-models (this repository: pip install -e packages/yoso-models), "
            f"then import {_MOVED[name]}"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKWARDS",
    "HASHINGS",
    "MAX_HASH_BITS",
    "MODES",
    "State",
    "attention",
    "attention_vjp",
    "available_backends",
    "backend_for",
    "check_options",
    "get_backend",
    "hash_codes",
    "hash_planes",
    "set_backend",
]
