"""The public entry points: ``attention``, ``attention_vjp``, ``hash_codes`` and ``backend_for``.

Each is the same three steps: the glue of the caller's framework, ``prepare`` (every check, once), the
backend selection picks; then the glue runs the call on that backend.
"""

from __future__ import annotations

from ._glue import glue_for
from ._validate import check_output, prepare, prepare_hashing


def attention(
    q,
    k,
    v,
    *,
    key_padding_mask=None,
    query_mask=None,
    causal: bool = False,
    num_hashes: int = 32,
    hash_bits: int = 8,
    mode: str = "sample",
    hashing: str = "gaussian",
    backward: str = "lower_bound",
    normalize: bool = True,
    planes=None,
    seed=None,
    generator=None,
    key=None,
    initial_state=None,
    output_final_state: bool = False,
    differentiable_state: bool = False,
    cu_seqlens=None,
    group=None,
    axis_name=None,
):
    """YOSO attention: LSH-sampled (``mode="sample"``, YOSO-m) or expected (``"expectation"``, YOSO-E).

    Args:
        q: queries ``[..., Nq, D]``; k: keys ``[..., Nk, D]``; v: values ``[..., Nk, Dv]``. Leading dims
            (batch, heads, ...) broadcast like ``torch.matmul``; torch SDPA's ``[B, H, N, D]`` is the
            common case. NumPy arrays give NumPy results (gradients: :func:`attention_vjp`); torch
            tensors give torch results with autograd; JAX arrays give JAX results, under ``jax.jit``,
            ``jax.vmap`` and ``jax.grad`` (the hyperparameters below must then be static Python values).
        key_padding_mask: bool ``[..., Nk]``, True = attend to this key. Masked keys (whatever they
            hold) cannot change any output. Leading dims broadcast, e.g. ``[B, 1, Nk]`` for ``[B, H, ...]``.
        query_mask: bool ``[..., Nq]``, True = keep; masked query rows are exact zeros. Zero rows of q and
            k count as masked: they attend to nothing and are attended by nothing (docs/math.md).
        causal: query i attends to keys j <= i (needs Nq == Nk).
        num_hashes: m, the number of hashes averaged (variance ~ 1/m), 1 to 65536. Sample mode only.
        hash_bits: tau, hyperplanes per hash; attention weight (1 - angle/pi)^tau, sharper as tau grows.
        mode: "sample" (YOSO-m, linear in N) or "expectation" (YOSO-E, exact, quadratic time, O(N) memory).
        hashing: "gaussian" (dense random hyperplanes, exact collision probability) or "hadamard"
            (structured fast rotation, approximately the same probability, needs hash_bits <= D').
        backward: "lower_bound" (paper eq. 4, the stable default for training) or "exact" (the true
            gradient: sampled with importance weights in sample mode, analytic in expectation mode;
            clamped near perfect alignment, see ``yoso._core.MAX_RATIO_PER_BIT``).
        normalize: divide each output row by its norm (N-YOSO, the paper's default).
        planes: explicit hash functions (:func:`yoso.hash_planes` layout, optionally with leading dims
            broadcasting against the leading dims of q for per-head hashes). Same planes, same result.
        seed: None draws fresh hash functions per call; an int reproduces them (identically for every
            framework and backend); NumPy callers may also pass a ``numpy.random.Generator``.
        generator: torch only, a ``torch.Generator`` to draw the hash functions from (default: torch's
            global RNG, so ``torch.manual_seed`` and gradient checkpointing replay them).
        key: JAX only, a PRNG key (``jax.random.key(0)``) to draw the hash functions from; the way to get
            fresh hash functions per step inside ``jax.jit`` (``seed=None`` without a key is refused
            there, since the draw would happen once per trace).
        initial_state: a :class:`yoso.State` returned by an earlier call (``output_final_state=True``): this
            call continues that sequence -- causal YOSO-m as a recurrent model: chunked prefill and
            one-token decoding are the same call, with any chunk length down to 1, and give the one-shot
            causal call's output (docs/math.md#recurrent-state). The hash functions are the state's;
            ``planes=``/``seed=`` may be passed only if equal (checked eagerly; inside ``jax.jit`` the state
            is trusted), ``generator=``/``key=`` not at all. Needs ``causal=True`` and ``mode="sample"``.
        output_final_state: also return the state after this call's keys: ``(out, state)``.
        differentiable_state: the returned state also carries the key tables (``D`` times the size of the
            tables) that the lower-bound gradients w.r.t. ``q`` and ``k`` need across chunks. Without them a
            call continuing the state refuses gradients w.r.t. q or k (torch: when they, or the state, require
            grad; NumPy: attention_vjp; JAX: when the backward is traced): gradients w.r.t. ``v`` and the
            tables alone are exact without. Pass it to every call of a sequence you differentiate through.
        cu_seqlens: int offsets ``[S + 1]`` (``0 = c_0 <= ... <= c_S = T``) of ``S`` sequences packed along the
            token dim of ``q, k, v [1, ..., T, D]`` (the flash-attn convention); each sequence attends only
            within itself, causal or not, and a state has one entry per sequence (leading dims ``[S, ...]``).
            NumPy array, list, or a framework array with known values (inside ``jax.jit``: a NumPy constant).
        group: torch only, a ``torch.distributed`` process group over which the sequence is split: each
            rank passes its contiguous slice of q, k, v and of the masks (ranks in order) and gets its slice
            of the full-sequence result (and, through autograd, of the gradients). Every rank must use the
            same hash functions (``seed=<int>`` or ``planes=``) and run the backward. docs/math.md#sequence-parallelism.
            Needs the yoso-parallel package (``pip install yoso-parallel``); without it a ``ValueError`` says so.
        axis_name: JAX only, the same for a mesh axis: inside ``jax.shard_map`` each device passes its slice
            and gets its slice (``psum`` and collective permutes over the axis; the shard_map needs
            ``check_vma=False`` for now); on whole arrays under ``jax.jit`` with ``jax.set_mesh(mesh)``, the
            axis the sequence dim is split over (yoso writes the shard_map).

    Returns:
        ``[..., Nq, Dv]`` in q's framework, device and dtype; with ``output_final_state=True`` the pair
        ``(out, state)``, ``state`` a :class:`yoso.State` of arrays of q's framework.
    """
    glue = glue_for(("q", "k", "v"), (q, k, v))
    options = locals()
    packing = None
    if cu_seqlens is not None:  # packed sequences: unpacked into a masked batch, packed back (yoso/_packing.py)
        packing, (q, k, v), options = _unpacked(glue, q, k, v, options)
    prep = _prepare(glue, q, k, v, options=options)
    backend = glue.select(prep.call)
    if prep.parallel is not None:  # a sequence split across ranks: the yoso-parallel engine (yoso/_parallel.py)
        from ._parallel import attention as parallel_attention

        result = parallel_attention(glue, backend, prep)
    else:
        result = glue.attention(backend, prep)
    # normalize=False: an overflowing result is refused, not returned as inf
    check_output(glue, prep, result[0] if prep.state is not None and prep.state.output else result)
    if packing is None:
        return result
    from ._packing import pack

    if prep.state is not None and prep.state.output:
        return pack(glue, result[0], packing), result[1]
    return pack(glue, result, packing)


_OPTIONS = tuple(attention.__kwdefaults__)


def _prepare(glue, q, k, v, *, options: dict, requires_grad: bool | None = None):
    if options.get("cu_seqlens") is not None:
        raise AssertionError("packed inputs are unpacked before prepare")
    options = {name: options[name] for name in _OPTIONS if name != "cu_seqlens"}
    grad = glue.requires_grad(q, k, v) if requires_grad is None else requires_grad
    return prepare(glue, q, k, v, requires_grad=grad, **options)


def _unpacked(glue, q, k, v, options: dict):
    """Packed ``[1, ..., T, D]`` inputs as the padded batch ``[S, ..., L, D]``, their masks with the padding
    masked (as keys and as queries), and the options of that call (yoso._packing)."""
    from ._packing import check_packed, unpack, unpack_mask  # imports NumPy: not at `import yoso`

    masks = {name: options[name] for name in ("key_padding_mask", "query_mask")}
    packing, lead = check_packed(glue, q, k, v, options["cu_seqlens"], masks)
    arrays = tuple(unpack(glue, x, packing) for x in (q, k, v))
    unpacked = {name: unpack_mask(glue, mask, packing, lead) for name, mask in masks.items()}
    return packing, arrays, {**options, **unpacked, "cu_seqlens": None}


def _check_keywords(function: str, kwargs: dict) -> dict:
    unknown = set(kwargs) - set(_OPTIONS)
    if unknown:
        raise TypeError(f"{function}() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    return {**attention.__kwdefaults__, **kwargs}


def attention_vjp(q, k, v, **kwargs):
    """``(out, vjp)`` for NumPy arrays: ``out = attention(q, k, v, **kwargs)`` and
    ``vjp(cotangent) -> (dq, dk, dv)``, the vector-Jacobian product with the chosen ``backward``
    estimator, computed with the same hash functions as the forward.
    """
    glue = glue_for(("q", "k", "v"), (q, k, v))
    if glue.name != "numpy":
        raise TypeError(f"attention_vjp is for NumPy arrays; with {glue.name} use the framework's autograd")
    options = _check_keywords("attention_vjp", kwargs)
    if options["cu_seqlens"] is None:
        prep = _prepare(glue, q, k, v, options=options, requires_grad=True)
        out, vjp = glue.attention_vjp(glue.select(prep.call), prep)
        check_output(glue, prep, out[0] if prep.state is not None and prep.state.output else out)
        return out, vjp
    import numpy as np

    from ._packing import pack, unpack

    packing, unpacked, options = _unpacked(glue, q, k, v, options)
    prep = _prepare(glue, *unpacked, options=options, requires_grad=True)
    result, inner_vjp = glue.attention_vjp(glue.select(prep.call), prep)
    stateful = prep.state is not None and prep.state.output
    check_output(glue, prep, result[0] if stateful else result)

    def vjp(cotangent):
        if stateful:
            cotangent, state_cotangent = cotangent
        cotangent = np.asarray(cotangent)
        if cotangent.shape != tuple(glue.describe(q)[0][:-1]) + (prep.call.value_dim,):
            raise ValueError(
                f"the cotangent must have the output's shape {list(glue.describe(q)[0][:-1]) + [prep.call.value_dim]}, "
                f"got {list(cotangent.shape)}"
            )
        inner = unpack(glue, cotangent, packing)
        grads = inner_vjp((inner, state_cotangent) if stateful else inner)
        return tuple(pack(glue, g, packing) for g in grads[:3]) + tuple(grads[3:])

    if stateful:
        return (pack(glue, result[0], packing), result[1]), vjp
    return pack(glue, result, packing), vjp


def backend_for(q, k, v, **kwargs) -> str:
    """The name of the backend ``yoso.attention(q, k, v, **kwargs)`` would run on, without running it.

    Selection looks at the arrays' framework, device and dtype and at the options (an explicit choice,
    :func:`yoso.set_backend` or ``YOSO_BACKEND``, is strict and raises when it cannot run the call).
    """
    glue = glue_for(("q", "k", "v"), (q, k, v))
    options = _check_keywords("backend_for", kwargs)
    if options["cu_seqlens"] is not None:
        _, (q, k, v), options = _unpacked(glue, q, k, v, options)
    return glue.select(_prepare(glue, q, k, v, options=options).call).name


def hash_codes(
    x,
    *,
    planes=None,
    num_hashes: int = 32,
    hash_bits: int = 8,
    hashing: str = "gaussian",
    seed=None,
    generator=None,
    key=None,
):
    """The hash codes ``yoso.attention`` gives the rows of ``x``: integers ``[..., N, m]`` in [0, 2**tau).

    Bit ``b`` of hash ``s`` of a row is ``planes[s, b] · x > 0`` for ``hashing="gaussian"`` (the code is
    ``sum_b 2**b * bit_b``), and the signs of the structured rotation for ``"hadamard"`` (layouts:
    :func:`yoso.hash_planes`). Codes depend only on the rows' directions; a zero row has code 0 (attention
    treats zero rows as masked). Under ``jax.jit``/``torch.compile``, where NaN/inf cannot be refused, a row
    holding them gets code -1.

    Args:
        x: rows ``[..., N, D]`` (NumPy, torch or JAX); the result is int32 in the same framework and device.
        planes, num_hashes, hash_bits, hashing, seed, generator, key: as in :func:`yoso.attention`
            (``planes`` may have leading dims broadcasting against ``x``'s for per-head hashes). Two calls
            with the same planes or the same int seed give the same codes on every backend, away from
            exact sign ties.
    """
    glue = glue_for(("x",), (x,))
    prep = prepare_hashing(
        glue,
        x,
        planes=planes,
        num_hashes=num_hashes,
        hash_bits=hash_bits,
        hashing=hashing,
        seed=seed,
        generator=generator,
        key=key,
    )
    return glue.hash_codes(glue.select(prep.call), prep)
