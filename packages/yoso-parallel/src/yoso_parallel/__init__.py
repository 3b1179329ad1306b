"""yoso-parallel: sequence parallelism for YOSO attention -- ``group=`` (torch.distributed) and
``axis_name=`` (``jax.shard_map``, or whole arrays under ``jax.set_mesh``).

Nothing to import to use it: with this package installed, ``yoso.attention(q, k, v, ..., group=PG)`` and
``yoso.attention(..., axis_name="sp")`` run one call over a sequence split across ranks (each passes its
contiguous slice and gets its slice of the result and of the gradients; docs/math.md#sequence-parallelism).
yoso-api finds the engines through the entry-point group ``yoso.parallel`` (see ``yoso._parallel``):

* ``yoso_parallel._torch``: the collectives over a process group and a ``torch.autograd.Function``;
* ``yoso_parallel._jax``: ``lax.psum``/``lax.ppermute`` over the mesh axis and a ``jax.custom_vjp``;
* ``yoso_parallel._composition``: the framework-neutral composition of the backend's primitives both run.

What it uses of yoso-api beyond the public API: the hook ``yoso._parallel`` (``glue_helpers`` -- the
framework glue's conversions and normalisations -- and ``SAME_HASHES``), the prepared call it is handed
(``yoso._validate.Prepared``), ``yoso.backends`` and ``yoso.testing.max_ratio``.

Public here, for tests and benchmarks (``yoso bench --sequence-parallel``, examples/sequence_parallel.py):
:func:`recording` counts the bytes each rank sends, :func:`model` predicts them, :func:`force_grads`
forces how the lower bound's dq, dk cross ranks.
"""

from ._composition import Collectives, Traffic, force_grads, model, recording

__version__ = "0.1.0"

__all__ = ["Collectives", "Traffic", "force_grads", "model", "recording"]
