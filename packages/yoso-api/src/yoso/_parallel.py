"""Sequence parallelism's hook: ``group=`` and ``axis_name=`` calls run in the yoso-parallel distribution.

yoso-api checks the part of the contract that needs no engine -- one of the two arguments, for the
caller's framework, with hash functions every rank shares -- and hands everything else to an *engine*
found under the entry-point group ``yoso.parallel``, as backends (``yoso.backends``) and ``yoso``
subcommands (``yoso.commands``) are found. The entry point's name is the caller framework (``torch``
for ``group=``, ``jax`` for ``axis_name=``); yoso-parallel's ``pyproject.toml`` publishes both::

    [project.entry-points."yoso.parallel"]
    torch = "yoso_parallel._torch"
    jax = "yoso_parallel._jax"

An engine (a module, or any object with these attributes) provides

* ``check(arg, *, planes, key, lengths)`` -- the engine's own rules for ``arg`` (the process group or
  the axis name: a group this process belongs to, a bound mesh axis, hash functions that do not vary
  along it); returns what it needs to run the call, stored as ``Prepared.parallel`` (not None);
* ``attention(backend, prep)`` -- this rank's output for the prepared call (``yoso._validate.Prepared``:
  ``call``, ``lead``, the canonical ``q, k, v, planes, query_mask, key_mask``, ``normalize``, ``parallel``).

It may use, besides the public ``yoso.backends`` and ``yoso.testing``, the framework helpers of
:func:`glue_helpers` (the conversions and normalisations the glue wraps the core in for one process)
and :data:`SAME_HASHES`; the rest of yoso's private modules may change without notice.
"""

from __future__ import annotations

import functools
import threading
from types import SimpleNamespace

ENTRY_POINT_GROUP = "yoso.parallel"
PACKAGE = "yoso-parallel"
MONOREPO_PATH = "packages/yoso-parallel"
ARGUMENTS = {"torch": "group=", "jax": "axis_name="}

SAME_HASHES = (
    "every rank must hash with the same functions: pass seed=<int> (the same on every rank) or planes= "
    "(e.g. yoso.hash_planes(...) drawn on one rank and sent to the others with "
    "torch.distributed.broadcast_object_list, or replicated into jax.shard_map)"
)


def check(glue, *, group, axis_name, mode, planes, seed, generator, key, lengths):
    """The engine's ``check`` result for a ``group=`` / ``axis_name=`` call (None when neither is given),
    after the API's own rules: one of the two, the caller's framework, hash functions shared by every rank."""
    if group is None and axis_name is None:
        return None
    if group is not None and axis_name is not None:
        raise ValueError("pass group= (a torch.distributed process group) or axis_name= (JAX), not both")
    if group is not None and glue.name != "torch":
        raise TypeError(
            f"group= is a torch.distributed process group, for torch tensors; got {glue.name} arrays"
            + ("; with JAX arrays pass axis_name= inside jax.shard_map" if glue.name == "jax" else "")
        )
    if axis_name is not None and glue.name != "jax":
        raise TypeError(
            f"axis_name= names a JAX mesh axis, for JAX arrays inside jax.shard_map; got {glue.name} arrays"
            + ("; with torch tensors pass group= (a torch.distributed process group)" if glue.name == "torch" else "")
        )
    argument = ARGUMENTS[glue.name]
    if mode == "sample" and planes is None:
        if generator is not None:
            raise ValueError(f"generator= draws hash functions per process, and with group= {SAME_HASHES}")
        if seed is None and key is None:
            raise ValueError(f"seed=None draws hash functions per process; with {argument} {SAME_HASHES}")
    arg = group if group is not None else axis_name
    return engine(glue.name).check(arg, planes=planes, key=key, lengths=lengths)


def attention(glue, backend, prep):
    """``yoso.attention`` of a prepared ``group=`` / ``axis_name=`` call, run by the engine."""
    return engine(glue.name).attention(backend, prep)


_lock = threading.Lock()
_engines: dict[str, object] = {}


def engine(framework: str):
    """The engine for ``framework``'s split calls; ``ValueError`` saying what to install when there is none."""
    if framework in _engines:
        return _engines[framework]
    with _lock:
        if framework not in _engines:
            _engines[framework] = _load(framework)
        return _engines[framework]


def _load(framework: str):
    from importlib import metadata

    found = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == framework]
    argument = ARGUMENTS[framework]
    if not found:
        raise ValueError(
            f"yoso.attention(..., {argument}...) splits the sequence across ranks, which comes with the {PACKAGE} "
            f"package, not installed: pip install {PACKAGE} (in the yoso repository: pip install -e {MONOREPO_PATH})"
        )
    try:
        loaded = found[0].load()
    except Exception as exc:  # a broken install: say which, as for a backend that fails to load
        raise ValueError(
            f"yoso.attention(..., {argument}...): the {PACKAGE} engine {found[0].value} failed to load "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    missing = [name for name in ("check", "attention") if not hasattr(loaded, name)]
    if missing:
        raise ValueError(f"the {ENTRY_POINT_GROUP} entry point {found[0].value} lacks {', '.join(missing)}")
    return loaded


@functools.cache
def glue_helpers(framework: str) -> SimpleNamespace:
    """What an engine may use of the framework glue (imports that framework).

    torch: ``accumulate_dtype(dtype)``, ``unit(x)`` (rows over their norms, in the accumulation dtype),
    ``keep_rows(x, mask)`` (masked rows zero), ``to_backend(backend, t)`` and ``from_backend(x, like, dtype)``
    (tensors to a backend's arrays and back). jax: ``accumulate_dtype``, ``unit``, ``keep_rows``,
    ``arrays_and_layouts(items)`` and ``resolve_all(arrays, layouts)`` (the deferred canonical layout of
    the prepared arrays, see ``yoso._jax_glue._Flat``), ``from_host(x)`` (a CPU array as a JAX one).
    """
    if framework == "torch":
        from . import _torch_glue as g

        return SimpleNamespace(
            accumulate_dtype=g._accumulate_dtype,
            unit=g._unit,
            keep_rows=g._keep_rows,
            to_backend=g._to_backend,
            from_backend=g._from_backend,
        )
    if framework == "jax":
        from . import _jax_glue as g

        return SimpleNamespace(
            accumulate_dtype=g._accumulate_dtype,
            unit=g._unit,
            keep_rows=g._keep_rows,
            arrays_and_layouts=g._arrays_and_layouts,
            resolve_all=g._resolve_all,
            from_host=g.from_host,
        )
    raise ValueError(f"no glue helpers for {framework!r}")
