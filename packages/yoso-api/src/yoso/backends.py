"""Backends: what one is, how they are found, and which one a call runs on.

A backend is a small object (subclass :class:`Backend`) published by a package under the entry-point
group ``yoso.backends``, e.g. in its ``pyproject.toml``::

    [project.entry-points."yoso.backends"]
    reference = "yoso_reference.backend:ReferenceBackend"

Entry points are read when a backend is first needed, never at ``import yoso``; loading one that is
broken (import error, missing driver) records the reason, which ``yoso info`` shows, and the backend
is simply unavailable. Backends can also be registered in code with :func:`register` (tests do).

Selection: :func:`set_backend` (per thread, usable as a context manager) beats the ``YOSO_BACKEND``
environment variable, which beats automatic choice. An explicit choice is strict -- a call it cannot
run raises an error saying why. Automatic choice takes, per call, the highest-priority available
backend that supports it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

ENTRY_POINT_GROUP = "yoso.backends"
ENV_VAR = "YOSO_BACKEND"

MODES = ("sample", "expectation")
HASHINGS = ("gaussian", "hadamard")
BACKWARDS = ("lower_bound", "exact")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class Call:
    """Everything a backend needs to decide whether it can run a call (no array data)."""

    framework: str  # "numpy", "torch" or "jax": the caller's arrays
    device: str  # "cpu", "cuda", ... (the device type, without an index)
    dtype: str  # "float32", "bfloat16", ...
    batch: int  # the flattened leading dims
    n_query: int
    n_key: int
    dim: int
    value_dim: int
    mode: str
    hashing: str
    backward: str
    causal: bool
    num_hashes: int
    hash_bits: int
    requires_grad: bool
    # Calls that work on the bucket tables themselves -- a recurrent state carried between calls, or a
    # sequence split across processes -- need the `bucket_tables` / `read_buckets` primitives.
    tables: bool = False


class Backend:
    """Base class of every backend: a description plus the compute primitives the API composes.

    Subclasses set the class attributes, override :meth:`availability` (cheap to call; import heavy
    modules inside it, not at module level) and implement the primitives on their framework's arrays.
    Canonical shapes: ``q, k [B, N, D]`` (already unit rows), ``v [B, Nk, Dv]``, masks ``[B, N]`` bool
    or None, planes ``[P, ...]`` with ``P`` 1 or ``B``, codes ``[B, m, N]`` integers.
    """

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0  # higher wins automatic selection
    framework: ClassVar[str] = "numpy"  # the array type the primitives take: numpy, torch or jax
    description: ClassVar[str] = ""
    # What the backend can do; the base `unsupported` checks calls against these.
    modes: ClassVar[tuple[str, ...]] = MODES
    hashings: ClassVar[tuple[str, ...]] = HASHINGS
    backwards: ClassVar[tuple[str, ...]] = BACKWARDS
    dtypes: ClassVar[tuple[str, ...]] = FLOAT_DTYPES
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    frameworks: ClassVar[tuple[str, ...]] = ("numpy",)  # caller array types it serves (through the glue)
    supports_causal: ClassVar[bool] = True
    max_hash_bits: ClassVar[int] = 16
    max_head_dim: ClassVar[int | None] = None

    def availability(self) -> str | None:
        """None if the backend can run here, else a one-line reason (missing package, no GPU, ...)."""
        return None

    def version(self) -> str:
        return ""

    def device_names(self) -> list[str]:
        """Human-readable devices the backend would use here (for ``yoso info``)."""
        return ["cpu"]

    def default_device(self) -> str:
        """The device a caller should put arrays on to use this backend (``"cpu"``, ``"cuda"``...)."""
        return self.devices[0]

    def serves(self, call: Call) -> bool:
        """Whether the call's arrays are of a kind this backend takes (framework and device type).

        Cheap and import-free: automatic selection asks it before :meth:`availability`, so that a call
        never probes (imports) a backend that could not serve its arrays anyway.
        """
        return call.framework in self.frameworks and call.device in self.devices

    def unsupported(self, call: Call) -> str | None:
        """None if this backend can run ``call``, else what is missing, naming the argument."""
        checks = [
            (call.framework in self.frameworks, f"{call.framework} arrays (it serves {', '.join(self.frameworks)})"),
            (call.device in self.devices, f"device {call.device!r} (it runs on {', '.join(self.devices)})"),
            (call.dtype in self.dtypes, f"dtype {call.dtype} (it supports {', '.join(self.dtypes)})"),
            (call.mode in self.modes, f"mode={call.mode!r}"),
            (call.mode == "expectation" or call.hashing in self.hashings, f"hashing={call.hashing!r}"),
            (not call.requires_grad or call.backward in self.backwards, f"backward={call.backward!r}"),
            (self.supports_causal or not call.causal, "causal=True"),
            (
                call.mode == "expectation" or call.hash_bits <= self.max_hash_bits,
                f"hash_bits={call.hash_bits} (at most {self.max_hash_bits})",
            ),
            (
                self.max_head_dim is None or max(call.dim, call.value_dim) <= self.max_head_dim,
                f"head dims D={call.dim}, Dv={call.value_dim} (at most {self.max_head_dim})",
            ),
            (
                self.has_tables or not call.tables,
                "bucket-table access (a recurrent state or a split sequence: no bucket_tables primitive)",
            ),
        ]
        missing = [what for ok, what in checks if not ok]
        return f"the {self.name!r} backend does not support {'; '.join(missing)}" if missing else None

    def missing_features(self) -> list[str]:
        """Features of the API this backend lacks, for ``yoso info``."""
        missing = [f"mode={m!r}" for m in MODES if m not in self.modes]
        missing += [f"hashing={h!r}" for h in HASHINGS if h not in self.hashings]
        missing += [f"backward={b!r}" for b in BACKWARDS if b not in self.backwards]
        missing += [f"dtype {d}" for d in FLOAT_DTYPES if d not in self.dtypes]
        if not self.supports_causal:
            missing.append("causal=True")
        if self.max_head_dim is not None:
            missing.append(f"head dims D, Dv > {self.max_head_dim}")
        if self.max_hash_bits < 16:
            missing.append(f"hash_bits > {self.max_hash_bits} with mode='sample'")
        if "tables" not in self.lower_bound_forms:
            missing.append("the table form of the lower-bound gradient (linear in N): pairs only")
        if not self.has_tables:
            missing.append("bucket-table access: initial_state/output_final_state, sequence parallelism")
        return missing

    # ---- compute primitives (the math: docs/math.md; the plain statement: yoso_reference) -------------
    #
    # A backend implements them either by overriding these methods or, usually, by naming in ``module``
    # the module whose functions have exactly these signatures: it is imported on the first call, so
    # loading the backend class (for `yoso info`, for selection) never imports torch, jax or a compiler.
    # Arguments arrive valid: the API has checked shapes, dtypes, devices and ranges once per call, and
    # `unsupported` has accepted the call, so primitives never re-check them.

    module: ClassVar[str | None] = None
    # The forms of the lower-bound gradient the backend computes (docs/math.md#lower-bound): "pairs" (per
    # colliding pair) and "tables" (per-bucket tables of outer products: linear in N whatever the buckets).
    lower_bound_forms: ClassVar[tuple[str, ...]] = ("pairs",)
    # Whether `bucket_tables` and `read_buckets` are implemented (recurrent state, sequence parallelism).
    has_tables: ClassVar[bool] = False

    def _function(self, primitive: str):
        implementation = self.__dict__.get("_implementation")
        if implementation is None:
            if self.module is None:
                raise NotImplementedError(f"the {self.name!r} backend does not implement {primitive}")
            import importlib

            implementation = self.__dict__["_implementation"] = importlib.import_module(self.module)
        return getattr(implementation, primitive)

    def hash_codes(self, x, planes, *, hashing: str, num_hashes: int, hash_bits: int):
        """Codes ``[B, m, N]`` (int32) of unit rows ``x [B, N, D]``."""
        return self._function("hash_codes")(x, planes, hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits)

    def cumulate(self, read_codes, write_codes, values, *, read_mask, write_mask, order: str, hash_bits: int):
        """``(1/m) sum_s sum_w [h_s(r) = h_s(w)] write_mask_w values_w``; zero rows where ``read_mask`` is False.

        ``order``: ``"none"``, ``"causal"`` (writer position <= reader's) or ``"anticausal"`` (>=).
        """
        cumulate = self._function("cumulate")
        return cumulate(
            read_codes,
            write_codes,
            values,
            read_mask=read_mask,
            write_mask=write_mask,
            order=order,
            hash_bits=hash_bits,
        )

    def bucket_tables(self, codes, values, *, mask, hash_bits: int, outer=None):
        """Per-hash bucket sums ``T[b, s, c] = sum_{n: codes[b, s, n] = c} mask[b, n] values[b, n]``.

        ``codes [B, m, N]``, ``values [B, N, C]`` -> ``[B, m, 2**hash_bits, C]`` in the accumulation dtype;
        with ``outer [B, N, F]`` each token adds ``values[b, n] (x) outer[b, n]`` -> ``[B, m, 2**tau, C, F]``
        (the lower bound's tables of outer products, never materialised per token by a fast backend).
        No ``1/m``: tables add up across calls and processes.
        """
        return self._function("bucket_tables")(codes, values, mask=mask, hash_bits=hash_bits, outer=outer)

    def read_buckets(self, codes, tables, *, mask, weights=None):
        """``(1/m) sum_s tables[b, s, codes[b, s, n]]`` -> ``[B, N, C]``, zero rows where ``mask`` is False.

        With ``weights [B, N, C]`` and tables ``[B, m, 2**tau, C, F]``, the read rows are contracted with
        the weights: ``(1/m) sum_s sum_c weights[b, n, c] tables[b, s, codes[b, s, n], c]`` -> ``[B, N, F]``.
        """
        return self._function("read_buckets")(codes, tables, mask=mask, weights=weights)

    def add_to_tables(self, tables, codes, values, *, mask, hash_bits: int, outer=None):
        """``tables + bucket_tables(codes, values, mask=mask, hash_bits=hash_bits, outer=outer)``: running
        tables after more tokens (a carried state's update).

        Optional: a backend whose ``module`` has a function ``add_to_tables`` (same arguments) adds the tokens
        into a copy of ``tables`` -- or into ``tables`` itself where its framework may reuse the buffer, as XLA
        does with a donated one -- so a one-token decoding step costs ``O(m * C)``, not a pass over all
        ``m * 2**tau * C`` entries. Without one, this default is exact and costs that pass.
        """
        try:
            add = self._function("add_to_tables")
        except (AttributeError, NotImplementedError):
            add = None
        if add is not None:
            return add(tables, codes, values, mask=mask, hash_bits=hash_bits, outer=outer)
        return tables + self.bucket_tables(codes, values, mask=mask, hash_bits=hash_bits, outer=outer)

    def sampled_grads(
        self,
        q_codes,
        k_codes,
        q,
        k,
        v,
        grad,
        *,
        query_mask,
        key_mask,
        causal,
        hash_bits,
        backward,
        max_ratio,
        form: str = "auto",
    ):
        """YOSO-m gradients ``(dq, dk)`` w.r.t. unit q and k; ``backward`` is lower_bound or exact.

        ``form`` (lower bound only): ``"auto"`` lets the backend choose by cost, ``"pairs"`` or
        ``"tables"`` (one of :attr:`lower_bound_forms`) forces one -- for tests and benchmarks.
        """
        if form not in ("auto", "pairs", "tables"):
            raise ValueError(f"form must be one of 'auto', 'pairs', 'tables', got {form!r}")
        if form == "tables" and backward != "lower_bound":
            raise ValueError(
                f"form='tables' needs backward='lower_bound', got backward={backward!r}: the exact estimator's"
                " weights depend on each pair, so it has only the pairs form"
            )
        if form != "auto" and form not in self.lower_bound_forms:
            raise ValueError(
                f"form={form!r}: the {self.name!r} backend computes only the"
                f" {' and '.join(self.lower_bound_forms)} form of the lower bound"
            )
        return self._function("sampled_grads")(
            q_codes,
            k_codes,
            q,
            k,
            v,
            grad,
            query_mask=query_mask,
            key_mask=key_mask,
            causal=causal,
            hash_bits=hash_bits,
            backward=backward,
            max_ratio=max_ratio,
            form=form,
        )

    def expectation_forward(self, q, k, v, *, query_mask, key_mask, causal, hash_bits):
        """YOSO-E ``[B, Nq, Dv]``."""
        return self._function("expectation_forward")(
            q, k, v, query_mask=query_mask, key_mask=key_mask, causal=causal, hash_bits=hash_bits
        )

    def expectation_backward(self, q, k, v, grad, *, query_mask, key_mask, causal, hash_bits, backward, max_ratio):
        """YOSO-E gradients ``(dq, dk, dv)``; ``backward`` is exact (clamped p') or lower_bound."""
        return self._function("expectation_backward")(
            q,
            k,
            v,
            grad,
            query_mask=query_mask,
            key_mask=key_mask,
            causal=causal,
            hash_bits=hash_bits,
            backward=backward,
            max_ratio=max_ratio,
        )

    def __repr__(self) -> str:
        return f"<yoso backend {self.name!r}>"


# ---- discovery ---------------------------------------------------------------------------------


@dataclass
class _Entry:
    name: str
    source: str  # "entry point dist==version" or "registered"
    entry_point: Any = None
    backend: Backend | None = None
    error: str | None = None  # why loading failed
    loaded: bool = False
    checked: bool = False  # availability is checked once per process and cached
    reason: str | None = None


_lock = threading.RLock()
_entries: dict[str, _Entry] | None = None


def _discover() -> dict[str, _Entry]:
    global _entries
    if _entries is not None:  # lock-free once found (and traceable by torch.compile)
        return _entries
    with _lock:
        if _entries is None:
            from importlib import metadata  # 25 ms: read at the first call, not at `import yoso`

            found: dict[str, _Entry] = {}
            for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
                dist = getattr(ep, "dist", None)
                source = f"{dist.name} {dist.version}" if dist is not None else ep.value
                found.setdefault(ep.name, _Entry(ep.name, source, entry_point=ep))
            _entries = found
        return _entries


def _load(entry: _Entry) -> Backend | None:
    if entry.loaded:
        return entry.backend
    with _lock:
        if not entry.loaded:
            entry.loaded = True
            try:
                obj = entry.entry_point.load()
                backend = obj() if isinstance(obj, type) else obj
                if not isinstance(backend, Backend):
                    raise TypeError(f"{entry.entry_point.value} is not a yoso.backends.Backend")
                entry.backend = backend
            except Exception as exc:  # a broken plugin must never break yoso itself
                entry.error = f"failed to load ({type(exc).__name__}: {exc})"
        return entry.backend


def register(backend: Backend) -> None:
    """Register a backend object in code (replaces any backend of the same name)."""
    if not isinstance(backend, Backend) or not backend.name:
        raise TypeError(f"register() takes a yoso.backends.Backend with a name, got {backend!r}")
    with _lock:
        _discover()[backend.name] = _Entry(backend.name, "registered", backend=backend, loaded=True)


def unregister(name: str) -> None:
    """Forget a backend registered with :func:`register` (or found as an entry point)."""
    with _lock:
        _discover().pop(name, None)


def installed_backends() -> list[str]:
    """Names of every backend found, usable here or not, by descending priority.

    Loads the backend classes (cheap: a backend module imports no framework at import time) but checks
    no availability.
    """
    return sorted(_discover(), key=lambda n: (-_priority(n), n))


def _priority(name: str) -> int:
    backend = _load(_discover()[name])
    return backend.priority if backend is not None else -(10**9)


# Backends this project ships, and the distribution each comes in: named when one is asked for but absent.
KNOWN_PACKAGES = {
    "reference": "yoso-reference",
    "jax": "yoso-jax",
    "pallas": "yoso-jax",
    "triton": "yoso-triton",
    "cuda": "yoso-cuda",
}


def _unknown(name: str, source: str = "") -> ValueError:
    installed = ", ".join(installed_backends()) or "none"
    package = KNOWN_PACKAGES.get(name)
    hint = f"; it comes with the {package} package (pip install {package})" if package else ""
    return ValueError(f"unknown yoso backend {name!r}{source}{hint}; installed backends: {installed}")


def get(name: str) -> Backend:
    """The backend object called ``name``; ``ValueError`` if unknown or unusable here (with the reason)."""
    entries = _discover()
    if name not in entries:
        raise _unknown(name)
    backend = _load(entries[name])
    reason = _unavailable_reason(entries[name])
    if reason:
        raise ValueError(f"yoso backend {name!r} cannot run here: {reason}")
    return backend


def _unavailable_reason(entry: _Entry) -> str | None:
    if entry.checked:
        return entry.reason
    with _lock:
        if not entry.checked:
            backend = _load(entry)
            entry.reason = entry.error if backend is None else _safe_availability(backend)
            entry.checked = True
        return entry.reason


def status() -> list[dict]:
    """One dict per installed backend: name, source, priority, available, reason, framework, devices...

    This probes every backend (for ``yoso info``); calls never do.
    """
    rows = []
    for name in installed_backends():
        entry = _discover()[name]
        backend = _load(entry)
        reason = _unavailable_reason(entry)
        row = {"name": name, "source": entry.source, "available": reason is None, "reason": reason}
        if backend is not None:
            row.update(
                priority=backend.priority,
                framework=backend.framework,
                serves=list(backend.frameworks),
                version=backend.version(),
                description=backend.description,
                devices=backend.device_names() if reason is None else [],
                dtypes=list(backend.dtypes),
                missing_features=backend.missing_features(),
            )
        rows.append(row)
    return rows


def _safe_availability(backend: Backend) -> str | None:
    try:
        return backend.availability()
    except Exception as exc:
        return f"availability check failed ({type(exc).__name__}: {exc})"


def available_backends() -> list[str]:
    """Names of the backends that can run here, highest priority first (probes every installed backend)."""
    return [name for name in installed_backends() if _unavailable_reason(_discover()[name]) is None]


# ---- selection ----------------------------------------------------------------------------------

_local = threading.local()


class _BackendSetting:
    """Returned by :func:`set_backend`; restores the previous choice when used as a context manager."""

    def __init__(self, previous: str | None) -> None:
        self._previous = previous

    def __enter__(self) -> _BackendSetting:
        return self

    def __exit__(self, *exc) -> None:
        _local.choice = self._previous


def set_backend(name: str | None) -> _BackendSetting:
    """Choose the backend for the current thread (``None`` returns to the default).

    Takes effect immediately; as a context manager (``with yoso.set_backend("reference"): ...``) the
    previous choice comes back on exit. ``ValueError`` for a name that is not installed or cannot run here.
    """
    if name is not None:
        if not isinstance(name, str):
            raise TypeError(f"set_backend() takes a backend name (str) or None, got {type(name).__name__}")
        get(name)  # validates, with the list of installed backends in the message
    previous = getattr(_local, "choice", None)
    _local.choice = name
    return _BackendSetting(previous)


def explicit_choice() -> str | None:
    """The thread's choice, else ``YOSO_BACKEND``, else None (automatic). Not validated: see :func:`chosen`."""
    return getattr(_local, "choice", None) or os.environ.get(ENV_VAR, "").strip() or None


def chosen() -> Backend | None:
    """The explicitly chosen backend object, or None for automatic choice.

    A bad name in ``YOSO_BACKEND`` is refused here, with the variable named, before any call runs on it.
    """
    name = getattr(_local, "choice", None)
    if name is not None:
        return get(name)
    name = os.environ.get(ENV_VAR, "").strip()
    if not name:
        return None
    if name not in _discover():
        raise _unknown(name, f" (from the {ENV_VAR} environment variable)")
    try:
        return get(name)
    except ValueError as exc:
        raise ValueError(f"{exc} (chosen by the {ENV_VAR} environment variable)") from None


def get_backend() -> str:
    """The name of the backend calls run on by default in this thread.

    An explicit choice (:func:`set_backend`, else ``YOSO_BACKEND``, validated) if there is one, else the
    highest-priority available backend (automatic choice may still pick another one per call when that
    one cannot serve the arrays given: :func:`yoso.backend_for` says which).
    """
    backend = chosen()
    if backend is not None:
        return backend.name
    names = available_backends()
    if not names:
        raise RuntimeError("no yoso backend can run here; `yoso info` says why (install yoso-reference)")
    return names[0]


def select(call: Call) -> Backend:
    """The backend that runs ``call``: the explicit choice (strictly) or the best that supports it.

    Automatic choice goes down the installed backends by priority and looks at what each serves (array
    type, device) before asking whether it can run here, so a call probes -- and imports the framework
    of -- only the backends that could serve its arrays: a NumPy call never imports torch.
    """
    backend = chosen()
    if backend is not None:
        reason = backend.unsupported(call)
        if reason:
            raise ValueError(f"{reason}; choose another backend with yoso.set_backend() or {ENV_VAR}")
        return backend
    reasons = []
    for name in installed_backends():
        entry = _discover()[name]
        backend = _load(entry)
        if backend is None or not backend.serves(call):
            continue
        unavailable = _unavailable_reason(entry)
        reason = f"the {name!r} backend cannot run here: {unavailable}" if unavailable else backend.unsupported(call)
        if reason is None:
            return backend
        reasons.append(reason)
    if not reasons:
        served = f"{call.framework} arrays on {call.device}"
        raise ValueError(f"no installed yoso backend serves {served}; `yoso info` lists what each one serves")
    raise ValueError(f"no yoso backend can run this call: {'; '.join(reasons)}")
