"""yoso: YOSO attention (Zeng et al., ICML 2021) -- LSH-sampled linear attention, one API, many backends.

    import yoso
    out = yoso.attention(q, k, v)                     # [..., Nq, D] x [..., Nk, D] x [..., Nk, Dv]
    out = yoso.attention(q, k, v, mode="expectation") # YOSO-E, the exact expectation
    with yoso.set_backend("reference"): ...           # pick a backend (also: YOSO_BACKEND)

``yoso.nn.YosoSelfAttention`` is a torch layer, ``yoso.nnx.YosoAttention`` a Flax NNX module, and
``yoso.integrations.transformers`` plugs YOSO into Hugging Face models; they load on first access, so
``import yoso`` imports none of torch, flax or transformers.

``yoso info`` lists the installed backends and why any cannot run; ``yoso demo`` shows YOSO-m
converging to YOSO-E as the number of hashes grows.
"""

from ._api import attention, attention_vjp, backend_for, hash_codes
from ._planes import MAX_HASH_BITS, hash_planes
from ._validate import check_options
from .backends import BACKWARDS, HASHINGS, MODES, available_backends, get_backend, set_backend

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("integrations", "nn", "nnx")


def __getattr__(name: str):
    # yoso.nn / yoso.integrations import torch (and transformers), yoso.nnx flax: load them only when asked for.
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKWARDS",
    "HASHINGS",
    "MAX_HASH_BITS",
    "MODES",
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
