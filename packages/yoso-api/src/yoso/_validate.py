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


def _prepare_planes(glue, planes, lead, like, *, mode, num_hashes, hash_bits, dim, hashing, seed, generator, key):
    """The canonical planes ``[P, ...]`` (P = 1: shared, or B), or None in expectation mode.

    YOSO-E uses no hash functions, but refuses what sample mode would refuse (bad planes, seeds, keys,
    generators): a mistake must not pass silently because of the mode.
    """
    expected = planes_shape(num_hashes, hash_bits, dim, hashing)
    if planes is None:
        glue.check_randomness(seed=seed, generator=generator, key=key, like=like)
        if mode == "expectation":
            return None
        drawn = glue.draw_planes(expected, hashing=hashing, seed=seed, generator=generator, key=key, like=like)
        return glue.flatten(drawn, (), expected)
    if seed is not None or generator is not None or key is not None:
        raise ValueError("pass either planes= or seed=/generator=/key=, not both")
    planes, planes_lead = _check_planes(
        glue, planes, lead, like, expected, num_hashes=num_hashes, hash_bits=hash_bits, dim=dim, hashing=hashing
    )
    if not planes_lead or math.prod(planes_lead) == 1:
        return glue.flatten(planes, planes_lead, expected)  # shared by every batch row: P = 1
    return glue.flatten(planes, lead, expected)


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
        )
    )
    # Hyperparameters first: they are cheap and explain most mistakes.
    check_options(num_hashes=num_hashes, hash_bits=hash_bits, mode=mode, hashing=hashing, backward=backward)
    _check_flag("causal", causal)
    _check_flag("normalize", normalize)
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
    lead = _broadcast_lead(shapes)
    batch = math.prod(lead)

    key_mask = _check_mask(glue, "key_padding_mask", key_padding_mask, lead, n_key, "Nk", q, devices["q"])
    q_mask = _check_mask(glue, "query_mask", query_mask, lead, n_query, "Nq", q, devices["q"])

    given_planes = _prepare_planes(
        glue,
        planes,
        lead,
        q,
        mode=mode,
        num_hashes=num_hashes,
        hash_bits=hash_bits,
        dim=dim,
        hashing=hashing,
        seed=seed,
        generator=generator,
        key=key,
    )
    # YOSO-E is the expectation over all hash functions: it uses none (but explicit ones were checked).
    canonical_planes = given_planes if mode == "sample" else None

    q, k, v = native(q), native(k), native(v)
    q_c, k_c, v_c = (glue.flatten(x, lead, shapes[n][-2:]) for n, x in (("q", q), ("k", k), ("v", v)))
    checked = _check_values(
        glue,
        {"q": (q_c, q_mask), "k": (k_c, key_mask), "v": (v_c, key_mask)},
        {"q": n_query, "k": n_key, "v": n_key},
        planes=given_planes if planes is not None else None,
        hashing=hashing,
        masks={} if key_mask is None else {"key_padding_mask": key_mask},
        unnormalised=None if normalize else (v_c, key_mask, dtypes["v"]),
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
    )


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
