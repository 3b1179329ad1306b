"""Argument checking for ``yoso.attention``: everything is refused before any computation.

The result is a :class:`Prepared` call: the arguments flattened to the canonical layout every backend
takes (``[B, N, D]`` with the broadcast leading dims folded into ``B``) plus the :class:`Call`
description used to pick a backend.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any

from . import _parallel
from ._planes import check_hash_args, planes_shape
from .backends import BACKWARDS, FLOAT_DTYPES, MODES, Call

# Warnings point at the caller's line, so that Python's default filter shows each once per call site:
# _check_values <- prepare <- _prepare <- the entry point (yoso.attention, ...) <- the caller.
_CALLER = 4  # frames from prepare() up to the caller


@dataclass
class Prepared:
    call: Call
    lead: tuple[int, ...]  # the broadcast leading dims of the output
    q: Any  # [B, Nq, D]
    k: Any  # [B, Nk, D]
    v: Any  # [B, Nk, Dv]
    query_mask: Any  # [B, Nq] bool or None
    key_mask: Any  # [B, Nk] bool or None
    planes: Any  # [P, ...] with P in {1, B}, or None in expectation mode
    normalize: bool
    shapes: tuple[tuple[int, ...], ...]  # the original shapes of q, k, v
    checked: bool = True  # whether the value checks ran (False while jax.jit/vmap or torch.compile trace)
    parallel: Any = None  # group= / axis_name= calls: what the yoso-parallel engine checked (yoso._parallel)
    state: StateSpec | None = None  # a call that continues or returns a recurrent state


@dataclass
class StateSpec:
    """The recurrent-state part of a prepared call (docs/math.md#recurrent-state)."""

    tables: Any  # [B, m, 2**tau, Dv] initial tables, or None (the sequence starts here)
    key_tables: Any  # [B, m, 2**tau, Dv, D] initial key tables, or None
    planes: Any  # the hash functions, with the leading dims they came with: what the final state carries
    output: bool  # output_final_state
    key_tables_out: bool  # differentiable_state: the final state carries key tables


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def check_choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}, got {value!r}")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_options(
    *, num_hashes=32, hash_bits=8, mode="sample", hashing="gaussian", backward="lower_bound", head_dim=None
) -> None:
    """Check :func:`yoso.attention`'s hyperparameters without any arrays, raising the errors a call would.

    For code that fixes them ahead of the data (a layer's constructor): ``head_dim`` (D), when given, is
    checked against ``hashing="hadamard"``'s limit ``hash_bits <= D'``.
    """
    check_choice("mode", mode, MODES)
    check_choice("backward", backward, BACKWARDS)
    check_hash_args(num_hashes, hash_bits, hashing)
    if head_dim is not None:
        check_positive_int("head_dim", head_dim)
        planes_shape(int(num_hashes), int(hash_bits), int(head_dim), hashing)  # hadamard: hash_bits <= D'


def _check_flag(name: str, value) -> None:
    import numpy as np  # loaded by the first call, not by `import yoso`

    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")


def _broadcast_lead(shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    import numpy as np  # loaded by the first call, not by `import yoso`

    leads = {name: shape[:-2] for name, shape in shapes.items()}
    try:
        return tuple(np.broadcast_shapes(*leads.values()))
    except ValueError:
        described = ", ".join(f"{name} {_fmt(shape)}" for name, shape in shapes.items())
        raise ValueError(
            f"the leading (batch/head) dims of q, k and v must match or broadcast; got {described}"
        ) from None


def _check_mask(glue, name: str, mask, lead: tuple[int, ...], length: int, length_name: str, like, device: str):
    import numpy as np  # loaded by the first call, not by `import yoso`

    if mask is None:
        return None
    if not glue.owns(mask) and not isinstance(mask, np.ndarray):
        raise TypeError(f"{name} must be a {glue.name} or NumPy array, got {type(mask).__name__}")
    shape, dtype, mask_device = glue.describe(mask)
    if dtype != "bool":
        raise TypeError(f"{name} must be a bool array (True = keep), got dtype {dtype}")
    if glue.owns(mask) and mask_device != device:
        raise ValueError(f"{name} is on {mask_device} but q, k, v are on {device}")
    if len(shape) < 1 or shape[-1] != length:
        raise ValueError(f"{name} must have shape [..., {length_name}] = [..., {length}], got {_fmt(shape)}")
    try:
        fits = np.broadcast_shapes(shape[:-1], lead) == lead
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"{name} of shape {_fmt(shape)} does not broadcast to the leading dims {_fmt(lead)} + [{length}]"
        )
    return glue.flatten(glue.asarray(mask, like=like), lead, (length,))


def native(x):
    """A NumPy array in the machine's byte order (big-endian data is converted, not refused: frameworks'
    converters reject it with messages that do not name the argument); anything else as it is."""
    dtype = getattr(x, "dtype", None)
    if type(x).__module__ == "numpy" and dtype is not None and not dtype.isnative:
        return x.astype(dtype.newbyteorder("="))
    return x


def _check_planes(glue, planes, lead, like, expected, *, num_hashes, hash_bits, dim, hashing):
    """Explicit hash functions, checked and converted (``glue.planes_array``), with their leading dims."""
    import numpy as np  # loaded by the first call, not by `import yoso`

    if not glue.owns(planes) and not isinstance(planes, np.ndarray):
        raise TypeError(f"planes must be a NumPy or {glue.name} array, got {type(planes).__name__}")
    planes = native(planes)
    shape, dtype, planes_device = glue.describe(planes)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"planes must be a floating array ({', '.join(FLOAT_DTYPES)}), got dtype {dtype}")
    if glue.owns(planes) and planes_device != glue.describe(like)[2]:
        raise ValueError(f"planes are on {planes_device} but the inputs are on {glue.describe(like)[2]}")
    n = len(expected)
    if tuple(shape[len(shape) - n :]) != expected or len(shape) < n:
        what = "(num_hashes, hash_bits, D)" if hashing == "gaussian" else "(rotations, 3, D') of ±1 diagonals"
        raise ValueError(
            f"planes for hashing={hashing!r} with num_hashes={num_hashes}, hash_bits={hash_bits}, D={dim} must have "
            f"shape [..., {', '.join(map(str, expected))}] {what}; got {_fmt(shape)}"
        )
    planes_lead = tuple(shape[: len(shape) - n])
    try:
        fits = np.broadcast_shapes(planes_lead, lead) == lead
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"planes leading dims {_fmt(planes_lead)} do not broadcast to q's leading dims {_fmt(lead)}")
    return glue.planes_array(planes, like=like), planes_lead


def _prepare_planes(glue, planes, lead, like, **options):
    """The canonical planes ``[P, ...]`` (P = 1: shared, or B), or None in expectation mode."""
    return _planes_with_raw(glue, planes, lead, like, **options)[1]


def _planes_with_raw(glue, planes, lead, like, *, mode, num_hashes, hash_bits, dim, hashing, seed, generator, key):
    """``(raw, canonical)``: the hash functions with their own leading dims (what a state carries), and
    flattened to ``[P, ...]`` (P = 1: shared, or B); ``(None, None)`` in expectation mode.

    YOSO-E uses no hash functions, but refuses what sample mode would refuse (bad planes, seeds, keys,
    generators): a mistake must not pass silently because of the mode.
    """
    expected = planes_shape(num_hashes, hash_bits, dim, hashing)
    if planes is None:
        glue.check_randomness(seed=seed, generator=generator, key=key, like=like)
        if mode == "expectation":
            return None, None
        drawn = glue.draw_planes(expected, hashing=hashing, seed=seed, generator=generator, key=key, like=like)
        return drawn, glue.flatten(drawn, (), expected)
    if seed is not None or generator is not None or key is not None:
        raise ValueError("pass either planes= or seed=/generator=/key=, not both")
    planes, planes_lead = _check_planes(
        glue, planes, lead, like, expected, num_hashes=num_hashes, hash_bits=hash_bits, dim=dim, hashing=hashing
    )
    if not planes_lead or math.prod(planes_lead) == 1:
        return planes, glue.flatten(planes, planes_lead, expected)  # shared by every batch row: P = 1
    return planes, glue.flatten(planes, lead, expected)


def _check_values(glue, rows: dict, lengths: dict, *, planes, hashing, masks: dict, unnormalised=None) -> bool:
    """Refuse NaN/inf in unmasked rows and bad planes; warn about all-False key masks; with ``unnormalised``
    (``(v, key_mask, dtype)``: a normalize=False call), refuse values whose sums could overflow. False: could
    not check."""
    sums = None if unnormalised is None else {"v": unnormalised[:2]}
    flags = glue.value_flags(rows, planes=planes, hashing=hashing, masks=masks, sums=sums)
    if flags is None:
        return False
    for name in rows:
        count, first = flags[name]
        if count:
            b, i = divmod(int(first), lengths[name])
            raise ValueError(
                f"{name} has NaN or inf in {int(count)} unmasked row(s) (first: batch row {b} of the flattened "
                f"leading dims, row {i}); they would poison every hash table they touch"
            )
    if planes is not None and flags["planes"]:
        raise ValueError("planes contain NaN or inf")
    if planes is not None and hashing == "hadamard" and flags["planes_pm1"]:
        raise ValueError("planes for hashing='hadamard' are ±1 diagonals; got other values")
    if unnormalised is not None:
        import numpy as np  # loaded by the first call, not by `import yoso`

        dtype = "float64" if unnormalised[2] == "float64" else "float32"  # the accumulation dtype
        largest = float(np.finfo(dtype).max)
        if not flags["sum:v"] <= largest:
            raise ValueError(
                f"v is too large for normalize=False: the unnormalised output sums up to Nk={lengths['v']} rows of "
                f"v, and a column of v sums to {flags['sum:v']:.3g} in absolute value, beyond {dtype}'s range "
                f"({largest:.3g}); pass normalize=True (the normalised output does not depend on the scale of v) "
                "or smaller values"
            )
    for name in masks:
        if flags[name]:
            warnings.warn(
                f"{name} is False everywhere: every key is masked, so the output is all zeros. yoso's masks are "
                "True = attend (torch.nn.MultiheadAttention's key_padding_mask is True = ignore: pass ~mask)",
                UserWarning,
                stacklevel=_CALLER + 1,
            )
    return True


def check_output(glue, prep: Prepared, out) -> None:
    """``normalize=False``: refuse an output that overflowed its dtype (the inputs were finite).

    The sums of |v| fit the accumulation dtype (checked before the call), so the output is finite there;
    casting it to a narrower input dtype (float16) can still overflow, which is refused here.
    """
    if prep.normalize or not prep.checked:
        return
    call = prep.call
    flat = glue.flatten(out, prep.lead, (call.n_query, call.value_dim))
    flags = glue.value_flags({"output": (flat, None)}, planes=None, hashing=call.hashing, masks={})
    if flags is not None and flags["output"][0]:
        raise ValueError(
            f"the unnormalised output (normalize=False) of finite q, k, v overflows {call.dtype}: its rows are "
            f"sums of up to Nk={call.n_key} rows of v, which exceed the dtype's range here (|output| <= the sum "
            "of |v| over the visible keys); pass normalize=True, a wider dtype, or smaller values of v"
        )


def _describe_rows(glue, name: str, x):
    """``(shape, dtype, device)`` of an input of rows ``[..., N, D]``, refusing what cannot be one."""
    shape, dtype, device = glue.describe(x)
    if len(shape) < 2:
        raise ValueError(f"{name} must have at least 2 dims [..., N, D], got shape {_fmt(shape)}")
    if 0 in shape:
        raise ValueError(f"{name} has an empty dimension (shape {_fmt(shape)}); every size must be >= 1")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point array ({', '.join(FLOAT_DTYPES)}), got dtype {dtype}")
    return shape, dtype, device


def _refuse_meta(name: str, shape, device: str) -> None:
    if device.split(":")[0] == "meta":
        raise ValueError(
            f"{name} is on the meta device, which holds shapes but no values (shape {_fmt(shape)}); yoso computes "
            "values: pass tensors on a real device (torch.compile traces with fake tensors of its own)"
        )


def prepare(
    glue,
    q,
    k,
    v,
    *,
    key_padding_mask,
    query_mask,
    causal,
    num_hashes,
    hash_bits,
    mode,
    hashing,
    backward,
    normalize,
    planes,
    seed,
    generator,
    key=None,
    initial_state=None,
    output_final_state=False,
    differentiable_state=False,
    group=None,
    axis_name=None,
    requires_grad: bool,
) -> Prepared:
    # Frameworks that trace (JAX) need the hyperparameters as Python values; their glue says which
    # argument arrived traced, before the generic checks below would call it merely "not an int".
    glue.check_static(
        dict(
            num_hashes=num_hashes,
            hash_bits=hash_bits,
            mode=mode,
            hashing=hashing,
            backward=backward,
            causal=causal,
            normalize=normalize,
            seed=seed,
            output_final_state=output_final_state,
            differentiable_state=differentiable_state,
        )
    )
    # Hyperparameters first: they are cheap and explain most mistakes.
    check_options(num_hashes=num_hashes, hash_bits=hash_bits, mode=mode, hashing=hashing, backward=backward)
    _check_flag("causal", causal)
    _check_flag("normalize", normalize)
    stateful = _check_state_options(
        initial_state=initial_state,
        output_final_state=output_final_state,
        differentiable_state=differentiable_state,
        mode=mode,
        causal=causal,
        backward=backward,
        generator=generator,
        key=key,
    )
    num_hashes, hash_bits = int(num_hashes), int(hash_bits)

    shapes, dtypes, devices = {}, {}, {}
    for name, x in (("q", q), ("k", k), ("v", v)):
        shapes[name], dtypes[name], devices[name] = _describe_rows(glue, name, x)
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"q, k and v must share one dtype, got q {dtypes['q']}, k {dtypes['k']}, v {dtypes['v']}")
    if len(set(devices.values())) > 1:
        raise ValueError(f"q, k and v must be on one device, got q {devices['q']}, k {devices['k']}, v {devices['v']}")
    _refuse_meta("q", shapes["q"], devices["q"])
    (n_query, dim), (n_key, k_dim), (v_len, value_dim) = (shapes[n][-2:] for n in ("q", "k", "v"))
    if k_dim != dim:
        raise ValueError(f"q and k must share the last dim D; got q {_fmt(shapes['q'])}, k {_fmt(shapes['k'])}")
    if v_len != n_key:
        raise ValueError(
            f"v must have as many rows as k (Nk = {n_key}); got k {_fmt(shapes['k'])}, v {_fmt(shapes['v'])}"
        )
    if causal and n_query != n_key:
        raise ValueError(
            f"causal=True needs as many queries as keys; got q {_fmt(shapes['q'])} (Nq={n_query}), "
            f"k {_fmt(shapes['k'])} (Nk={n_key})"
        )
    parallel = _parallel.check(
        glue,
        group=group,
        axis_name=axis_name,
        mode=mode,
        planes=planes,
        seed=seed,
        generator=generator,
        key=key,
        lengths=(n_query, n_key),
    )
    if parallel is not None and stateful:
        raise ValueError(
            "initial_state/output_final_state cannot be combined with group=/axis_name= yet: a state of a "
            "sequence split across ranks is not defined; carry states per rank without group=, or split without one"
        )
    lead = _broadcast_lead(shapes)
    batch = math.prod(lead)

    key_mask = _check_mask(glue, "key_padding_mask", key_padding_mask, lead, n_key, "Nk", q, devices["q"])
    q_mask = _check_mask(glue, "query_mask", query_mask, lead, n_query, "Nq", q, devices["q"])

    plane_options = dict(mode=mode, num_hashes=num_hashes, hash_bits=hash_bits, dim=dim, hashing=hashing)
    if initial_state is not None:
        # The hash functions come from the state; planes=/seed= may only repeat them.
        raw_planes, given_planes = _state_planes(glue, initial_state, planes, seed, lead, q, plane_options)
    else:
        raw_planes, given_planes = _planes_with_raw(
            glue, planes, lead, q, **plane_options, seed=seed, generator=generator, key=key
        )
    # YOSO-E is the expectation over all hash functions: it uses none (but explicit ones were checked).
    canonical_planes = given_planes if mode == "sample" else None

    q, k, v = native(q), native(k), native(v)
    q_c, k_c, v_c = (glue.flatten(x, lead, shapes[n][-2:]) for n, x in (("q", q), ("k", k), ("v", v)))
    state = None
    if stateful:
        tables, key_tables = _prepare_state(
            glue,
            initial_state,
            lead,
            q,
            k,
            num_hashes=num_hashes,
            hash_bits=hash_bits,
            dim=dim,
            value_dim=value_dim,
            dtype=dtypes["q"],
            device=devices["q"],
            backward=backward,
            requires_grad=requires_grad,
        )
        state = StateSpec(
            tables=tables,
            key_tables=key_tables,
            planes=raw_planes,
            output=bool(output_final_state),
            key_tables_out=bool(differentiable_state),
        )
    checked = _check_values(
        glue,
        {"q": (q_c, q_mask), "k": (k_c, key_mask), "v": (v_c, key_mask)},
        {"q": n_query, "k": n_key, "v": n_key},
        planes=given_planes if planes is not None or initial_state is not None else None,
        hashing=hashing,
        masks={} if key_mask is None else {"key_padding_mask": key_mask},
        # Sums of v that could overflow are refused where v is used as it is: unnormalised outputs, and
        # states (their tables carry v's own scale from call to call).
        unnormalised=None if normalize and not stateful else (v_c, key_mask, dtypes["v"]),
    )
    call = Call(
        framework=glue.name,
        device=devices["q"].split(":")[0],
        dtype=dtypes["q"],
        batch=batch,
        n_query=n_query,
        n_key=n_key,
        dim=dim,
        value_dim=value_dim,
        mode=mode,
        hashing=hashing,
        backward=backward,
        causal=bool(causal),
        num_hashes=num_hashes,
        hash_bits=hash_bits,
        requires_grad=requires_grad,
        # A split sequence adds up bucket tables across ranks; a recurrent state carries them between calls.
        tables=parallel is not None or stateful,
    )
    return Prepared(
        call=call,
        lead=lead,
        q=q_c,
        k=k_c,
        v=v_c,
        query_mask=q_mask,
        key_mask=key_mask,
        planes=canonical_planes,
        normalize=bool(normalize),
        shapes=(shapes["q"], shapes["k"], shapes["v"]),
        checked=checked,
        parallel=parallel,
        state=state,
    )


# ---- the recurrent state (docs/math.md#recurrent-state) ---------------------------------------------------


def _check_state_options(
    *, initial_state, output_final_state, differentiable_state, mode, causal, backward, generator, key
) -> bool:
    """Whether the call continues or returns a state; refuses the combinations that have none."""
    _check_flag("output_final_state", output_final_state)
    _check_flag("differentiable_state", differentiable_state)
    if differentiable_state and not output_final_state:
        raise ValueError(
            "differentiable_state=True asks for key tables in the returned state; pass output_final_state=True"
        )
    if initial_state is None and not output_final_state:
        return False
    what = "initial_state" if initial_state is not None else "output_final_state=True"
    if mode != "sample":
        raise ValueError(
            f"{what} needs mode='sample': YOSO-E (mode={mode!r}) weighs every pair by its collision probability "
            "and has no finite state to carry"
        )
    if not causal:
        raise ValueError(
            f"{what} needs causal=True: a state carries the keys seen so far, which only a causal call's later "
            "queries may see (for packed independent sequences without a state, pass cu_seqlens=)"
        )
    if differentiable_state and backward == "exact":
        raise ValueError(
            "differentiable_state=True carries the lower bound's key tables; backward='exact' (*YOSO) weighs "
            "every pair by its own cosine and has no table form to carry"
        )
    if initial_state is not None:
        from ._state import State

        if not isinstance(initial_state, State):
            raise TypeError(
                "initial_state must be the yoso.State a call with output_final_state=True returned, got "
                f"{type(initial_state).__module__}.{type(initial_state).__name__}"
            )
        if generator is not None or key is not None:
            raise ValueError(
                "initial_state carries its hash functions; generator=/key= would draw new ones (omit them, or pass "
                "planes=/seed= equal to the state's)"
            )
        if differentiable_state and initial_state.key_tables is None:
            raise ValueError(
                "differentiable_state=True needs key tables from the start of the sequence, and initial_state has "
                "none: pass differentiable_state=True to every call since the first"
            )
    return True


def _state_planes(glue, state, planes, seed, lead, like, options):
    """``(raw, canonical)`` hash functions of a call continuing ``state``: the state's, which ``planes=`` or
    ``seed=`` may repeat (checked where the values are known: not inside ``jax.jit``/``torch.compile``)."""
    if state.planes is None or not (glue.owns(state.planes) or _is_numpy(state.planes)):
        raise TypeError(
            f"initial_state.planes must be a {glue.name} array (the hash functions of the state), "
            f"got {type(state.planes).__name__}"
        )
    try:
        raw, canonical = _planes_with_raw(
            glue, state.planes, lead, like, **options, seed=None, generator=None, key=None
        )
    except ValueError as exc:
        raise ValueError(f"initial_state.planes do not fit this call: {exc}") from None
    if planes is None and seed is None:
        return raw, canonical
    _, given = _planes_with_raw(glue, planes, lead, like, **options, seed=seed, generator=None, key=None)
    if glue.same_values(canonical, given) is False:
        what = "planes=" if planes is not None else f"seed={seed!r}"
        raise ValueError(
            f"{what} gives other hash functions than initial_state's; a state continues with the hash functions it "
            "was built with (omit planes=/seed=, or pass the state's)"
        )
    return raw, canonical


def _is_numpy(x) -> bool:
    import numpy as np

    return isinstance(x, np.ndarray)


def _accumulation_dtype(dtype: str) -> str:
    return "float64" if dtype == "float64" else "float32"


def _prepare_state(
    glue, state, lead, q, k, *, num_hashes, hash_bits, dim, value_dim, dtype, device, backward, requires_grad
) -> tuple:
    """``(tables, key_tables)`` of ``initial_state`` (None if absent) checked against the call and flattened to
    ``[B, ...]``; refuses gradients the state cannot give."""
    if state is None:
        return None, None
    acc = _accumulation_dtype(dtype)
    tables_tail = (num_hashes, 1 << hash_bits, value_dim)
    flat = {}
    for name, tail in (("tables", tables_tail), ("key_tables", tables_tail + (dim,))):
        x = getattr(state, name)
        if x is None:
            if name == "tables":
                raise ValueError("initial_state.tables is None; a state always has its bucket tables")
            flat[name] = None
            continue
        if not glue.owns(x):
            raise TypeError(f"initial_state.{name} must be a {glue.name} array like q, k, v, got {type(x).__name__}")
        shape, x_dtype, x_device = glue.describe(x)
        if tuple(shape) != tuple(lead) + tail:
            what = "Dv" if name == "tables" else "Dv, D"
            raise ValueError(
                f"initial_state.{name} must have shape {_fmt(tuple(lead) + tail)} (the leading dims of q, k, v + "
                f"[num_hashes={num_hashes}, 2**hash_bits={1 << hash_bits}, {what}]), got {_fmt(shape)}; was the state "
                "built with other num_hashes/hash_bits or for other inputs?"
            )
        if x_dtype != acc:
            raise TypeError(
                f"initial_state.{name} has dtype {x_dtype}, but a {dtype} call accumulates in {acc} (states are "
                "kept in the accumulation dtype)"
            )
        if x_device != device:
            raise ValueError(f"initial_state.{name} is on {x_device} but q, k, v are on {device}")
        flat[name] = glue.flatten(x, lead, tail)
    if glue.state_grads_needed(q, k, state.tables, requires_grad):
        if backward == "exact":
            raise ValueError(
                "gradients through a call continuing initial_state need backward='lower_bound': the sampled true "
                "gradient (backward='exact') weighs every pair by its own cosine and has no table form for the "
                "keys of earlier chunks (run the chunk without gradients, e.g. under torch.no_grad())"
            )
        if state.key_tables is None:
            raise ValueError(
                "gradients w.r.t. q and k across chunks need the key tables of the earlier chunks, and "
                "initial_state has none (its tables alone give exact gradients for v only): pass "
                "differentiable_state=True to every call producing the state, or run without gradients "
                "(torch.no_grad(), or detach the state and q, k)"
            )
    return flat["tables"], flat["key_tables"]


@dataclass
class PreparedHashing:
    call: Call
    lead: tuple[int, ...]  # the leading dims of x (and of the codes)
    x: Any  # [B, N, D]
    planes: Any  # [P, ...] with P in {1, B}
    checked: bool = True  # whether the value checks ran


def prepare_hashing(glue, x, *, planes, num_hashes, hash_bits, hashing, seed, generator, key) -> PreparedHashing:
    """The checks of :func:`yoso.hash_codes`: those of ``yoso.attention`` that concern one input and hashing."""
    glue.check_static(dict(num_hashes=num_hashes, hash_bits=hash_bits, hashing=hashing, seed=seed))
    check_hash_args(num_hashes, hash_bits, hashing)
    num_hashes, hash_bits = int(num_hashes), int(hash_bits)
    shape, dtype, device = _describe_rows(glue, "x", x)
    _refuse_meta("x", shape, device)
    lead, (n, dim) = tuple(shape[:-2]), tuple(shape[-2:])
    flat_planes = _prepare_planes(
        glue,
        planes,
        lead,
        x,
        mode="sample",
        num_hashes=num_hashes,
        hash_bits=hash_bits,
        dim=dim,
        hashing=hashing,
        seed=seed,
        generator=generator,
        key=key,
    )
    x_flat = glue.flatten(native(x), lead, (n, dim))
    checked = _check_values(
        glue,
        {"x": (x_flat, None)},
        {"x": n},
        planes=flat_planes if planes is not None else None,
        hashing=hashing,
        masks={},
    )
    call = Call(
        framework=glue.name,
        device=device.split(":")[0],
        dtype=dtype,
        batch=math.prod(lead),
        n_query=n,
        n_key=n,
        dim=dim,
        value_dim=1,
        mode="sample",
        hashing=hashing,
        backward="lower_bound",
        causal=False,
        num_hashes=num_hashes,
        hash_bits=hash_bits,
        requires_grad=False,
    )
    return PreparedHashing(call=call, lead=lead, x=x_flat, planes=flat_planes, checked=checked)
