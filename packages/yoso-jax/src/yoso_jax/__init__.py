"""yoso-jax: YOSO attention on JAX arrays -- the ``jax`` backend of ``yoso``.

Use it through ``yoso.attention`` on JAX arrays (jit, vmap and grad work; pass ``key=`` for fresh
hash functions per call). Two implementation levels compute the same thing:

* ``"xla"`` (default): ``jax.numpy``/``lax`` -- scatter-add/gather hash tables; the fast CPU path.
* ``"pallas"``: Pallas kernels for hashing and cumulation (one-hot tensor-core matmuls, no atomics),
  compiled through Triton on GPUs and run with ``interpret=True`` elsewhere (slow: for testing).

Choose with the ``YOSO_JAX_IMPL`` environment variable (``xla`` or ``pallas``) or, per thread,
:func:`set_implementation` (also a context manager). ``yoso info`` shows the level in use. YOSO-E,
the sampled true gradient (``backward="exact"``) and the pieces around the hot loops are shared
``jax.numpy`` code at both levels; the lower-bound gradient runs on the level's cumulation.
"""

from __future__ import annotations

import os
import threading

__version__ = "0.1.0"

IMPL_ENV_VAR = "YOSO_JAX_IMPL"
IMPLEMENTATIONS = ("xla", "pallas")

_local = threading.local()


class _Setting:
    def __init__(self, previous):
        self._previous = previous

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _local.choice = self._previous


def set_implementation(name: str | None) -> _Setting:
    """Choose the implementation level for this thread (``None``: back to ``YOSO_JAX_IMPL``/default).

    Usable as a context manager; the previous choice comes back on exit. Calls already compiled by
    ``jax.jit`` keep the level they were traced with; ``yoso.attention`` retraces on a change.
    """
    if name is not None and name not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {name!r}")
    previous = getattr(_local, "choice", None)
    _local.choice = name
    return _Setting(previous)


def implementation() -> str:
    """The level in use: :func:`set_implementation`, else ``YOSO_JAX_IMPL``, else ``"xla"``."""
    choice = getattr(_local, "choice", None)
    if choice is not None:
        return choice
    value = os.environ.get(IMPL_ENV_VAR, "").strip().lower() or "xla"
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"{IMPL_ENV_VAR} must be one of {', '.join(IMPLEMENTATIONS)}, got {value!r}")
    return value


__all__ = ["IMPLEMENTATIONS", "IMPL_ENV_VAR", "implementation", "set_implementation"]
