"""The framework glue: what the API needs from each caller framework (NumPy, torch, JAX), declared once.

A glue object owns everything framework-specific around the math: describing arrays, moving masks and
hash functions onto the caller's device, drawing hash functions from the framework's randomness,
checking values, and running a call -- with that framework's differentiation machinery -- on the
backend selection picked. :func:`glue_for` chooses it by the arrays' types *without importing other
frameworks*: a NumPy call never imports torch or jax.

Shapes are canonical by the time a glue runs anything (``[B, N, D]``: see ``yoso._validate``).
"""

from __future__ import annotations

import abc
import sys

from . import backends


class Glue(abc.ABC):
    """One caller framework. Subclasses implement every abstract method; ``yoso._validate`` and
    ``yoso._api`` call nothing else."""

    name: str  # "numpy", "torch" or "jax": the value of ``Call.framework``

    # ---- describing and converting arrays ------------------------------------------------------------
    @abc.abstractmethod
    def owns(self, x) -> bool:
        """Whether ``x`` is an array of this framework."""

    @abc.abstractmethod
    def describe(self, x) -> tuple[tuple[int, ...], str, str]:
        """``(shape, dtype name, device)`` of an array of this framework (or a NumPy array)."""

    @abc.abstractmethod
    def asarray(self, x, like):
        """A mask (this framework's or NumPy) as an array of this framework on ``like``'s device."""

    @abc.abstractmethod
    def planes_array(self, planes, like):
        """Hash functions (this framework's or NumPy) on ``like``'s device, in its accumulation dtype."""

    @abc.abstractmethod
    def flatten(self, x, lead: tuple[int, ...], tail: tuple[int, ...]):
        """``x`` broadcast to ``lead + tail`` and viewed as ``[prod(lead), *tail]`` (may be deferred)."""

    # ---- randomness and values --------------------------------------------------------------------------
    @abc.abstractmethod
    def draw_planes(self, shape, *, hashing: str, seed, generator, key, like):
        """Fresh hash functions of ``shape`` from ``seed`` / the framework's RNG (``generator``, ``key``)."""

    @abc.abstractmethod
    def check_randomness(self, *, seed, generator, key, like) -> None:
        """Refuse a ``seed``, ``generator`` or ``key`` this framework cannot draw from (without drawing:
        YOSO-E draws nothing, and refuses bad ones all the same)."""

    @abc.abstractmethod
    def value_flags(self, rows: dict, *, planes, hashing: str, masks: dict, sums: dict | None = None) -> dict | None:
        """The data-dependent facts ``yoso._validate`` decides on, in one pass (one device synchronisation).

        ``rows``: name -> (array ``[B, N, C]``, mask ``[B, N]`` or None): ``flags[name]`` is
        ``(count, first)``, the number of unmasked rows holding NaN or inf and the flat index ``b * N + i``
        of the first. ``planes`` (or None): ``flags["planes"]`` whether they hold NaN or inf,
        ``flags["planes_pm1"]`` whether Hadamard planes hold other values than ±1. ``masks``: name -> mask
        or None: ``flags[name]`` whether that mask is False everywhere. ``sums``: name -> (array ``[B, N, C]``,
        mask): ``flags["sum:" + name]``, the largest sum over unmasked rows of ``|x|`` of one batch row and
        column, in the accumulation dtype (inf where it overflows). Returns None when the values cannot
        be read (while ``jax.jit``/``jax.vmap`` or ``torch.compile`` trace): the checks are then skipped,
        and the glue makes non-finite inputs give NaN outputs instead (``yoso._core.core_inputs``).
        """

    def check_static(self, values: dict) -> None:  # noqa: B027 (a hook: most frameworks need nothing)
        """Refuse hyperparameters that are not plain Python values (tracing frameworks); default: nothing."""

    def requires_grad(self, *arrays) -> bool:
        """Whether the call may be differentiated by the framework (NumPy: never; it has attention_vjp)."""
        return False

    # ---- recurrent state and packed sequences -----------------------------------------------------------
    def state_grads_needed(self, q, k, tables, requires_grad: bool) -> bool:
        """Whether gradients may reach ``q``, ``k`` or an initial state's ``tables`` (hence earlier keys),
        known when the call is made (JAX decides when the backward is traced: False here, refused there)."""
        return requires_grad

    def same_values(self, a, b) -> bool | None:
        """Whether two canonical ``[P, ...]`` arrays (P = 1 broadcasting) hold equal values; None when the
        values are not known now (tracing)."""
        raise NotImplementedError

    def take(self, x, index, axis: int):
        """``x`` indexed by the 1-D NumPy int array ``index`` along ``axis`` (differentiable)."""
        raise NotImplementedError

    def moveaxis(self, x, source: int, destination: int):
        raise NotImplementedError

    def broadcast_to(self, x, shape: tuple[int, ...]):
        raise NotImplementedError

    def logical_and(self, mask, other):
        """``mask & other`` for a bool array and a NumPy bool array broadcasting against it."""
        raise NotImplementedError

    def host_ints(self, x):
        """An integer array (or sequence) as a NumPy array, or None if its values are not known now."""
        import numpy as np

        return np.asarray(x)

    # ---- running ----------------------------------------------------------------------------------------
    def select(self, call: backends.Call) -> backends.Backend:
        """The backend that runs ``call`` (torch overrides this to stay traceable by torch.compile)."""
        return backends.select(call)

    @abc.abstractmethod
    def attention(self, backend: backends.Backend, prep):
        """``yoso.attention`` of a prepared call on ``backend``: the output in the caller's framework."""

    @abc.abstractmethod
    def hash_codes(self, backend: backends.Backend, prep):
        """``yoso.hash_codes`` of a prepared call on ``backend``: int32 codes ``[B, m, N]``."""


def _kind(x) -> str | None:
    # By type, importing nothing: an array of a framework that is not imported yet cannot exist.
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(x, numpy.ndarray):
        return "numpy"
    module = type(x).__module__
    if module.startswith("torch") and "torch" in sys.modules:
        return "torch"
    if module.startswith(("jax", "jaxlib")) and "jax" in sys.modules:
        return "jax"
    return None


def _listed(names) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def glue_for(names: tuple[str, ...], arrays: tuple) -> Glue:
    """The glue owning ``arrays`` (called ``names`` in errors); ``TypeError`` for mixed or unknown types."""
    kinds = [_kind(x) for x in arrays]
    for name, x, kind in zip(names, arrays, kinds):
        if kind is None:
            what = "NumPy arrays, torch tensors or JAX arrays"
            what = what if len(names) > 1 else "a NumPy array, torch tensor or JAX array"
            raise TypeError(
                f"{_listed(names)} must be {what}; got {name} of type {type(x).__module__}.{type(x).__name__}"
            )
    if len(set(kinds)) > 1:
        described = ", ".join(f"{n} {type(x).__module__}.{type(x).__name__}" for n, x in zip(names, arrays))
        raise TypeError(f"{_listed(names)} must be arrays of one framework; got {described}")
    if kinds[0] == "numpy":
        from ._numpy_glue import NumpyGlue

        return NumpyGlue()
    if kinds[0] == "torch":
        from ._torch_glue import TorchGlue

        return TorchGlue()
    from ._jax_glue import JaxGlue

    return JaxGlue()
