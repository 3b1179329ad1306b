"""torch tensors in, torch tensors out, with autograd -- once, for every backend.

The YOSO core (hashing, cumulation, the gradient estimators) runs inside two ``torch.library`` custom
ops, ``yoso::core`` and ``yoso::core_backward``, joined by ``register_autograd``; fake (meta)
implementations make them traceable by ``torch.compile``. Everything around the core -- input and
output normalisation, masks, broadcasting, dtype casts -- is ordinary torch code that autograd
differentiates. Backends that compute on torch tensors (Triton, CUDA) get the tensors as they are;
NumPy backends (the reference) get CPU NumPy copies, bfloat16 promoted to float32.

Precision: the normalisations and the core's output are float32 for half-precision inputs (float64
for float64); the result is cast back to the input dtype at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys

import numpy as np
import torch

from . import _core, _via_jax, backends
from ._glue import Glue
from ._planes import check_seed, draw_for_seed

Tensor = torch.Tensor


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Ops:
    """torch's array operations for the normalisations written once in ``yoso._core``."""

    @staticmethod
    def accumulate(x: Tensor) -> Tensor:
        return x.to(_accumulate_dtype(x.dtype))

    @staticmethod
    def cast(x: Tensor, like: Tensor) -> Tensor:
        return x.to(like.dtype)

    @staticmethod
    def peak(x: Tensor, dims: int) -> Tensor:
        return x.detach().abs().amax(dim=tuple(range(-dims, 0)), keepdim=True)

    where = staticmethod(torch.where)
    sqrt = staticmethod(torch.sqrt)

    @staticmethod
    def sum_last(x: Tensor) -> Tensor:
        return x.sum(dim=-1, keepdim=True)

    @staticmethod
    def mantissa(x: Tensor) -> Tensor:
        return torch.frexp(x)[0]

    @staticmethod
    def finite_rows(x: Tensor) -> Tensor:
        return torch.isfinite(x).all(dim=-1)

    @staticmethod
    def any_last(x: Tensor) -> Tensor:
        return x.any(dim=-1)

    @staticmethod
    def all_finite(x: Tensor) -> Tensor:
        return torch.isfinite(x).all()


OPS = _Ops()


def _unit(x: Tensor) -> Tensor:
    """``x / ||x||`` over the last dim in the accumulation dtype, direction only; zero rows stay zero."""
    return _core.unit_rows(OPS, OPS.accumulate(x))[0]


def _keep_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    return x if mask is None else torch.where(mask[..., None], x, torch.zeros_like(x))


# ---- crossing into a backend's framework ------------------------------------------------------


def _to_backend(backend, x: Tensor | None):
    if x is None or backend.framework == "torch":
        return x
    if backend.framework == "jax":
        return _on_jax().from_host(x.detach())
    x = x.detach()
    if x.dtype == torch.bfloat16:  # NumPy has no bfloat16
        x = x.float()
    return x.cpu().numpy()


def _from_backend(x, like: Tensor, dtype: torch.dtype) -> Tensor:
    if isinstance(x, Tensor):  # contiguous, as the ops' fake implementations promise (not a cut's view)
        return x.to(dtype).contiguous()
    if not isinstance(x, np.ndarray):  # a JAX array: zero-copy through DLPack
        return torch.from_dlpack(x).to(device=like.device, dtype=dtype)
    return torch.from_numpy(np.ascontiguousarray(x)).to(device=like.device, dtype=dtype)


def _full(like: Tensor, shape, value) -> Tensor:
    return torch.full(shape, value, dtype=torch.bool if isinstance(value, bool) else like.dtype, device=like.device)


def _on_jax():
    from . import _jax_glue

    return _jax_glue


class _OnJax:
    """yoso._core's functions for a backend that computes on JAX arrays: yoso._via_jax's, which pad the
    torch tensors and hand them over through DLPack."""

    _host = dict(full=_full, back=torch.from_dlpack)
    forward = staticmethod(functools.partial(_via_jax.forward, **_host))
    backward = staticmethod(functools.partial(_via_jax.backward, **_host))
    forward_state = staticmethod(functools.partial(_via_jax.forward_state, **_host))
    backward_state = staticmethod(functools.partial(_via_jax.backward_state, **_host))


def _composition(impl):
    """``(the functions composing the core, how they take a tensor)`` for the backend ``impl``."""
    if impl.framework == "jax":
        return _OnJax, lambda t: t
    return _core, functools.partial(_to_backend, impl)


def _whole_call_on_jax(backend, prep) -> Tensor:
    """An eager call on a backend that computes on JAX arrays: the whole attention -- the normalisations
    around the core as well -- in one compiled program per pass (``yoso._jax_glue.whole_forward``), not as
    dozens of small eager torch ops around the ``yoso::core`` op. Under ``torch.compile`` the ops serve.

    Shapes are padded to bucketed sizes (padded rows masked) so that changing lengths reuse a few
    compiled programs (``yoso._via_jax.Padding``); the output, and in the backward the gradients, are cut back.
    """
    jg = _on_jax()
    call = prep.call
    config = jg.whole_config(backend.name, call, normalize=prep.normalize)
    pad = _via_jax.Padding(prep.q.shape[0], call.n_query, call.n_key, full=_full)
    others = (
        pad.planes(prep.planes),
        pad.mask(prep.query_mask, pad.QUERIES, prep.q),
        pad.mask(prep.key_mask, pad.KEYS, prep.q),
    )
    q, k, v = prep.q, prep.k, prep.v
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _WholeCallOnJax.apply(q, k, v, others, pad, config, prep.checked)
    padded = (*pad.qkv(q, k, v), *others)
    (out,) = jg.in_row_parts(jg.whole_forward, padded, config=config, checked=prep.checked)
    return pad.cut(torch.from_dlpack(out), pad.QUERIES)


class _WholeCallOnJax(torch.autograd.Function):
    """:func:`_whole_call_on_jax` with gradients. The forward program also returns the core's output and the
    hash codes (``yoso._jax_glue.whole_forward_kept``), which torch saves with the inputs
    (``save_for_backward``: torch sees what the backward reads -- saved-tensor hooks and checkpointing apply,
    and an input changed in place between the passes raises torch's error); the backward program
    (``whole_backward``) recomputes only the normalisations."""

    @staticmethod
    def forward(ctx, q, k, v, others, pad, config, checked):
        jg = _on_jax()
        padded = (*pad.qkv(q, k, v), *others)
        out, *kept = jg.in_row_parts(jg.whole_forward_kept, padded, config=config, checked=checked)
        ctx.pad, ctx.config, ctx.checked = pad, config, checked
        ctx.save_for_backward(q, k, v, *others, *map(torch.from_dlpack, kept))
        return pad.cut(torch.from_dlpack(out), pad.QUERIES).contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        jg, pad = _on_jax(), ctx.pad
        q, k, v, *rest = ctx.saved_tensors
        padded = (*pad.qkv(q, k, v), *rest, pad.rows(grad.contiguous(), pad.QUERIES))
        grads = jg.in_row_parts(jg.whole_backward, padded, config=ctx.config, checked=ctx.checked)
        dq, dk, dv = (
            pad.cut(torch.from_dlpack(g), which).contiguous()
            for g, which in zip(grads, (pad.QUERIES, pad.KEYS, pad.KEYS))
        )
        return dq, dk, dv, None, None, None, None


# ---- the custom ops -----------------------------------------------------------------------------


@torch.library.custom_op("yoso::core", mutates_args=())
def core(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    planes: Tensor | None,
    query_mask: Tensor | None,
    key_mask: Tensor | None,
    backend: str,
    mode: str,
    hashing: str,
    num_hashes: int,
    hash_bits: int,
    causal: bool,
    backward: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """YOSO before output normalisation on unit rows: ``(Y, q_codes, k_codes)``.

    ``Y`` is in the accumulation dtype; codes are int32 ``[B, m, N]`` (empty in expectation mode).
    ``backward`` is unused here; it rides along so the autograd formula can read it from the inputs.
    """
    impl = backends.get(backend)
    compose, convert = _composition(impl)
    args = [convert(t) for t in (q, k, v, planes, query_mask, key_mask)]
    y, codes = compose.forward(
        impl, *args, mode=mode, hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits, causal=causal
    )
    y = _from_backend(y, q, _accumulate_dtype(q.dtype))
    if codes is None:
        empty = torch.empty(0, dtype=torch.int32, device=q.device)
        return y, empty, empty.clone()
    return (y, *(_from_backend(c, q, torch.int32) for c in codes))


@core.register_fake
def _core_fake(q, k, v, planes, query_mask, key_mask, backend, mode, hashing, num_hashes, hash_bits, causal, backward):
    y = q.new_empty((q.shape[0], q.shape[1], v.shape[2]), dtype=_accumulate_dtype(q.dtype))
    if mode == "expectation":
        return y, q.new_empty(0, dtype=torch.int32), q.new_empty(0, dtype=torch.int32)
    return (
        y,
        q.new_empty((q.shape[0], num_hashes, q.shape[1]), dtype=torch.int32),
        q.new_empty((k.shape[0], num_hashes, k.shape[1]), dtype=torch.int32),
    )


@torch.library.custom_op("yoso::core_backward", mutates_args=())
def core_backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_codes: Tensor,
    k_codes: Tensor,
    query_mask: Tensor | None,
    key_mask: Tensor | None,
    backend: str,
    mode: str,
    backward: str,
    hash_bits: int,
    causal: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`core`'s ``Y`` for the output gradient ``grad``."""
    impl = backends.get(backend)
    compose, convert = _composition(impl)
    q_, k_, v_, grad_, qm, km = (convert(t) for t in (q, k, v, grad, query_mask, key_mask))
    codes = None if mode == "expectation" else (convert(q_codes), convert(k_codes))
    dq, dk, dv = compose.backward(
        impl, q_, k_, v_, codes, qm, km, grad_, mode=mode, backward=backward, hash_bits=hash_bits, causal=causal
    )
    return _from_backend(dq, q, q.dtype), _from_backend(dk, k, k.dtype), _from_backend(dv, v, v.dtype)


@core_backward.register_fake
def _core_backward_fake(
    grad, q, k, v, q_codes, k_codes, query_mask, key_mask, backend, mode, backward, hash_bits, causal
):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, _planes, query_mask, key_mask, backend, mode, _hashing, _m, hash_bits, causal, backward = inputs
    _y, q_codes, k_codes = output
    ctx.save_for_backward(q, k, v, q_codes, k_codes, query_mask, key_mask)
    ctx.options = dict(backend=backend, mode=mode, backward=backward, hash_bits=hash_bits, causal=causal)


def _backward(ctx, grad_y, _grad_q_codes, _grad_k_codes):
    q, k, v, q_codes, k_codes, query_mask, key_mask = ctx.saved_tensors
    dq, dk, dv = core_backward(grad_y.contiguous(), q, k, v, q_codes, k_codes, query_mask, key_mask, **ctx.options)
    return (dq, dk, dv) + (None,) * 10


torch.library.register_autograd("yoso::core", _backward, setup_context=_setup_context)


# ---- the recurrent state: yoso::core_state and its backward ---------------------------------------------


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _present(x: Tensor | None) -> Tensor | None:
    """None for the empty tensors that stand for "absent" (custom ops cannot return None)."""
    return None if x is None or x.numel() == 0 else x


@torch.library.custom_op("yoso::core_state", mutates_args=())
def core_state(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    planes: Tensor,
    query_mask: Tensor | None,
    key_mask: Tensor | None,
    tables: Tensor | None,
    key_tables: Tensor | None,
    backend: str,
    hashing: str,
    num_hashes: int,
    hash_bits: int,
    backward: str,
    key_tables_out: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One causal chunk continuing a state: ``(Y, q_codes, k_codes, tables', key_tables')`` (docs/math.md
    #recurrent-state); ``key_tables'`` is empty unless ``key_tables_out``. ``backward`` rides along for the
    autograd formula. The codes are those the backward takes (padded for a JAX backend)."""
    impl = backends.get(backend)
    acc = _accumulate_dtype(q.dtype)
    compose, convert = _composition(impl)
    args = [convert(t) for t in (q, k, v, planes, query_mask, key_mask, tables, key_tables)]
    y, new_tables, new_key_tables, codes = compose.forward_state(
        impl, *args, hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits, with_key_tables=key_tables_out
    )
    y = _from_backend(y, q, acc)
    new_key_tables = _empty(y) if new_key_tables is None else _from_backend(new_key_tables, q, acc)
    q_codes, k_codes = (_from_backend(c, q, torch.int32) for c in codes)
    return y, q_codes, k_codes, _from_backend(new_tables, q, acc), new_key_tables


@core_state.register_fake
def _core_state_fake(
    q,
    k,
    v,
    planes,
    query_mask,
    key_mask,
    tables,
    key_tables,
    backend,
    hashing,
    num_hashes,
    hash_bits,
    backward,
    key_tables_out,
):
    acc = _accumulate_dtype(q.dtype)
    batch, n = q.shape[0], q.shape[1]
    if backends.get(backend).framework == "jax":
        n = _via_jax.bucketed(n)  # the codes as the backward takes them
    table_shape = (batch, num_hashes, 1 << hash_bits, v.shape[2])
    return (
        q.new_empty((batch, q.shape[1], v.shape[2]), dtype=acc),
        q.new_empty((batch, num_hashes, n), dtype=torch.int32),
        q.new_empty((batch, num_hashes, n), dtype=torch.int32),
        q.new_empty(table_shape, dtype=acc),
        q.new_empty(table_shape + (q.shape[2],) if key_tables_out else (0,), dtype=acc),
    )


@torch.library.custom_op("yoso::core_state_backward", mutates_args=())
def core_state_backward(
    grad: Tensor,
    grad_tables: Tensor | None,
    grad_key_tables: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_codes: Tensor,
    k_codes: Tensor,
    query_mask: Tensor | None,
    key_mask: Tensor | None,
    key_tables: Tensor | None,
    has_tables: bool,
    backend: str,
    backward: str,
    hash_bits: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, d_tables, d_key_tables)`` of :func:`core_state` (absent ones empty)."""
    impl = backends.get(backend)
    acc = _accumulate_dtype(q.dtype)
    compose, convert = _composition(impl)
    args = [convert(t) for t in (q, k, v)]
    codes = (convert(q_codes), convert(k_codes))
    masks = [convert(t) for t in (query_mask, key_mask)]
    extra = [convert(t) for t in (grad, grad_tables, grad_key_tables, key_tables)]
    grads = compose.backward_state(
        impl, *args, codes, *masks, *extra, has_tables=has_tables, backward=backward, hash_bits=hash_bits
    )
    dq, dk, dv, d_tables, d_key_tables = grads
    return (
        _from_backend(dq, q, q.dtype),
        _from_backend(dk, k, k.dtype),
        _from_backend(dv, v, v.dtype),
        _empty(q).to(acc) if d_tables is None else _from_backend(d_tables, q, acc),
        _empty(q).to(acc) if d_key_tables is None else _from_backend(d_key_tables, q, acc),
    )


@core_state_backward.register_fake
def _core_state_backward_fake(
    grad,
    grad_tables,
    grad_key_tables,
    q,
    k,
    v,
    q_codes,
    k_codes,
    query_mask,
    key_mask,
    key_tables,
    has_tables,
    backend,
    backward,
    hash_bits,
):
    acc = _accumulate_dtype(q.dtype)
    table_shape = (q.shape[0], q_codes.shape[1], 1 << hash_bits, v.shape[2])
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        q.new_empty(table_shape if has_tables else (0,), dtype=acc),
        q.new_empty(table_shape + (q.shape[2],) if key_tables is not None else (0,), dtype=acc),
    )


def _setup_state_context(ctx, inputs, output):
    q, k, v, _planes, query_mask, key_mask, tables, key_tables, backend, _h, _m, hash_bits, backward, out = inputs
    _y, q_codes, k_codes, _tables, _key_tables = output
    ctx.save_for_backward(q, k, v, q_codes, k_codes, query_mask, key_mask, key_tables)
    ctx.options = dict(has_tables=tables is not None, backend=backend, backward=backward, hash_bits=hash_bits)
    ctx.key_tables_out = out


def _state_backward(ctx, grad_y, _grad_q_codes, _grad_k_codes, grad_tables, grad_key_tables):
    q, k, v, q_codes, k_codes, query_mask, key_mask, key_tables = ctx.saved_tensors
    grad_key_tables = grad_key_tables if ctx.key_tables_out else None
    dq, dk, dv, d_tables, d_key_tables = core_state_backward(
        grad_y.contiguous(),
        None if grad_tables is None else grad_tables.contiguous(),
        None if grad_key_tables is None else grad_key_tables.contiguous(),
        q,
        k,
        v,
        q_codes,
        k_codes,
        query_mask,
        key_mask,
        key_tables,
        **ctx.options,
    )
    return (dq, dk, dv, None, None, None, _present(d_tables), _present(d_key_tables)) + (None,) * 6


torch.library.register_autograd("yoso::core_state", _state_backward, setup_context=_setup_state_context)


@torch.library.custom_op("yoso::hash_codes", mutates_args=())
def hash_codes_op(x: Tensor, planes: Tensor, backend: str, hashing: str, num_hashes: int, hash_bits: int) -> Tensor:
    """int32 codes ``[B, m, N]`` of the unit rows ``x [B, N, D]`` (an op, so torch.compile keeps it whole)."""
    impl = backends.get(backend)
    codes = impl.hash_codes(
        _to_backend(impl, x), _to_backend(impl, planes), hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits
    )
    return _from_backend(codes, x, torch.int32)


@hash_codes_op.register_fake
def _hash_codes_fake(x, planes, backend, hashing, num_hashes, hash_bits):
    return x.new_empty((x.shape[0], num_hashes, x.shape[1]), dtype=torch.int32)


@torch.library.custom_op("yoso::planes_for_seed", mutates_args=())
def planes_for_seed(seed: int, shape: list[int], hashing: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The hash functions of an int seed (yoso._planes.draw_for_seed) as a tensor: an op, so that a call with
    ``seed=`` traces under ``torch.compile(fullgraph=True)`` (NumPy draws them, which dynamo cannot trace)."""
    return torch.tensor(draw_for_seed(tuple(shape), hashing, seed), dtype=dtype, device=device)


@planes_for_seed.register_fake
def _planes_for_seed_fake(seed, shape, hashing, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


# ---- the glue object used by yoso.attention -------------------------------------------------------


def _selected_name(**call_fields) -> str:
    # Run eagerly even while torch.compile traces: discovering and checking backends imports modules
    # and takes locks, which dynamo cannot trace. The choice is folded into the graph as a constant, so
    # a compiled function keeps the backend chosen when it was traced.
    return backends.select(backends.Call(**call_fields)).name


# torch.compiler.assume_constant_result(fn) marks fn with this attribute, but importing it loads torch._dynamo
# (3 s on a 2-core machine) for every eager torch user: the mark is set as the decorator sets it. A torch that
# renamed it would fail packages/yoso-api/tests/test_selection.py (torch.compile with fullgraph=True breaks here).
if "torch._dynamo" in sys.modules:
    _selected_name = torch.compiler.assume_constant_result(_selected_name)
else:
    _selected_name._dynamo_marked_constant = True


def _bad_rows(x: Tensor, mask) -> tuple[int, int]:
    """(how many unmasked rows of ``x`` hold NaN or inf, the flat index of the first)."""
    bad = ~torch.isfinite(x).all(dim=-1)
    bad = bad if mask is None else bad & mask
    return int(bad.sum()), int(bad.flatten().to(torch.uint8).argmax())


class TorchGlue(Glue):
    name = "torch"

    @staticmethod
    def owns(x) -> bool:
        return isinstance(x, Tensor)

    @staticmethod
    def describe(x):
        if isinstance(x, np.ndarray):
            return tuple(x.shape), x.dtype.name, "cpu"
        return tuple(x.shape), str(x.dtype).removeprefix("torch."), str(x.device)

    @staticmethod
    def requires_grad(*tensors) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

    @staticmethod
    def asarray(x, like):
        return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x), device=like.device)

    @staticmethod
    def planes_array(planes, like):
        return torch.as_tensor(planes, device=like.device).to(_accumulate_dtype(like.dtype))

    @staticmethod
    def flatten(x, lead, tail):
        return x.expand(tuple(lead) + tuple(tail)).reshape((math.prod(lead),) + tuple(tail))

    @staticmethod
    def check_randomness(*, seed, generator, key, like):
        if key is not None:
            raise TypeError("key= is a JAX PRNG key, for JAX arrays; with torch tensors pass seed= or generator=")
        check_seed(seed)
        if generator is not None:
            if seed is not None:
                raise ValueError("pass either seed= or generator=, not both")
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            if generator.device.type != like.device.type:
                raise ValueError(f"generator is on {generator.device} but q, k, v are on {like.device}")

    @staticmethod
    def draw_planes(shape, *, hashing, seed, generator, key, like):
        dtype = _accumulate_dtype(like.dtype)
        if seed is not None:
            # An int seed gives the same hash functions for every framework, device and backend.
            if torch.compiler.is_compiling() and seed < 2**63:  # NumPy draws them: an op dynamo does not trace
                return planes_for_seed(seed, list(shape), hashing, dtype, like.device)
            return torch.tensor(draw_for_seed(shape, hashing, seed), dtype=dtype, device=like.device)
        # torch's own RNG (or the generator): reproducible with torch.manual_seed, and replayed
        # identically by torch.utils.checkpoint, so recomputation sees the same hash functions.
        if hashing == "gaussian":
            return torch.randn(shape, generator=generator, device=like.device, dtype=dtype)
        bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
        return (bits * 2 - 1).to(dtype)

    @staticmethod
    def value_flags(rows: dict, *, planes, hashing, masks: dict, sums: dict | None = None):
        if torch.compiler.is_compiling():
            return None  # data-dependent checks would break the graph; the glue poisons instead
        # The common case in one pass per array: a sum is finite only if every term is (NaN and inf
        # propagate), so a finite sum clears the whole array; the others are then looked at row by row (a
        # second synchronisation, only for inputs holding non-finite values or sums beyond the range). All the
        # numbers go into one stacked tensor and one .tolist() (each small torch op costs microseconds, and
        # a call's checks were ~20 of them): the sums of the rows and of the planes, 1/0 per mask for "some
        # True", and for Hadamard planes 1/0 for "all +-1".
        wide = torch.float64 if any(x.dtype == torch.float64 for x, _ in rows.values()) else torch.float32
        numbers = [x.sum(dtype=wide) for x, _ in rows.values()]
        if planes is not None:
            numbers.append(planes.sum(dtype=wide))
            if hashing == "hadamard":
                numbers.append(((planes == 1) | (planes == -1)).all().to(wide))
        numbers += [mask.any().to(wide) for mask in masks.values()]
        if not numbers:
            return {}
        found = iter(torch.stack(numbers).tolist())
        out = {name: (0, 0) if math.isfinite(next(found)) else _bad_rows(x, mask) for name, (x, mask) in rows.items()}
        if planes is not None:
            # a sum beyond the range of finite planes: look at every entry
            finite = math.isfinite(next(found)) or bool(torch.isfinite(planes).all())
            out["planes"] = not finite
            out["planes_pm1"] = hashing == "hadamard" and not next(found)
        out.update({name: not next(found) for name in masks})
        if sums:  # normalize=False only: a second synchronisation
            found = [OPS.accumulate(_keep_rows(x, mask)).abs().sum(dim=-2).amax() for x, mask in sums.values()]
            out.update(zip(("sum:" + name for name in sums), torch.stack(found).tolist()))
        return out

    @staticmethod
    def select(call):
        if not torch.compiler.is_compiling():
            return backends.select(call)
        # The fields by name: dynamo passes constants, not a dataclass, to the eager function.
        fields = {f.name: getattr(call, f.name) for f in dataclasses.fields(call)}
        return backends.get(_selected_name(**fields))

    @staticmethod
    def state_grads_needed(q, k, tables, requires_grad):
        return torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, tables))

    @staticmethod
    def same_values(a, b):
        if torch.compiler.is_compiling():
            return None  # data-dependent: eager calls check, compiled ones trust the state
        shape = torch.broadcast_shapes(a.shape, b.shape)
        return bool(torch.equal(a.expand(shape), b.to(a.dtype).expand(shape)))

    @staticmethod
    def take(x, index, axis):
        return x.index_select(axis, torch.as_tensor(index, device=x.device))

    moveaxis = staticmethod(torch.movedim)
    broadcast_to = staticmethod(torch.broadcast_to)

    @staticmethod
    def logical_and(mask, other):
        return mask & torch.as_tensor(other, device=mask.device)

    @staticmethod
    def host_ints(x):
        if isinstance(x, Tensor):
            return x.detach().cpu().numpy()
        return np.asarray(x)

    @staticmethod
    def hash_codes(backend, prep):
        call = prep.call
        x = _unit(prep.x).to(prep.x.dtype)
        codes = hash_codes_op(x, prep.planes, backend.name, call.hashing, call.num_hashes, call.hash_bits)
        if not prep.checked:  # traced: a row holding NaN/inf gets code -1, never a plausible one
            bad = ~OPS.finite_rows(prep.x)
            if prep.planes is not None:
                bad = bad | ~OPS.all_finite(prep.planes)
            codes = torch.where(bad[:, None, :], torch.full_like(codes, -1), codes)
        return codes.transpose(1, 2).reshape(prep.lead + (call.n_query, call.num_hashes))

    @staticmethod
    def attention(backend, prep):
        if prep.state is not None:
            return TorchGlue._attention_state(backend, prep)
        call = prep.call
        if backend.framework == "jax" and not torch.compiler.is_compiling():
            return _whole_call_on_jax(backend, prep).reshape(prep.lead + (call.n_query, call.value_dim))
        inputs = _core.core_inputs(
            OPS,
            prep.q,
            prep.k,
            prep.v,
            prep.query_mask,
            prep.key_mask,
            prep.planes,
            normalize=prep.normalize,
            checked=prep.checked,
        )
        y, _, _ = core(
            inputs.q,
            inputs.k,
            inputs.v,
            prep.planes,
            inputs.query_mask,
            inputs.key_mask,
            backend.name,
            call.mode,
            call.hashing,
            call.num_hashes,
            call.hash_bits,
            call.causal,
            call.backward,
        )
        out = _core.core_output(OPS, y, inputs, normalize=prep.normalize)
        return out.to(prep.q.dtype).reshape(prep.lead + (call.n_query, call.value_dim))

    @staticmethod
    def _attention_state(backend, prep):
        from ._state import State

        call, spec = prep.call, prep.state
        # The shared normalisations (zero rows as masked rows, directions only), without rescaling v: the
        # tables carry v's own scale from call to call.
        inputs = _core.core_inputs(
            OPS,
            prep.q,
            prep.k,
            prep.v,
            prep.query_mask,
            prep.key_mask,
            prep.planes,
            normalize=False,
            checked=prep.checked,
        )
        y, _, _, tables, key_tables = core_state(
            inputs.q,
            inputs.k,
            inputs.v,
            prep.planes,
            inputs.query_mask,
            inputs.key_mask,
            spec.tables,
            spec.key_tables,
            backend.name,
            call.hashing,
            call.num_hashes,
            call.hash_bits,
            call.backward,
            spec.key_tables_out,
        )
        out = _core.core_output(OPS, y, inputs, normalize=prep.normalize)
        out = out.to(prep.q.dtype).reshape(prep.lead + (call.n_query, call.value_dim))
        if not spec.output:
            return out
        lead = tuple(prep.lead)
        state = State(
            tables=tables.reshape(lead + tuple(tables.shape[1:])),
            planes=spec.planes,
            key_tables=key_tables.reshape(lead + tuple(key_tables.shape[1:])) if spec.key_tables_out else None,
        )
        return out, state
