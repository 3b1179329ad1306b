"""The public entry points: ``attention`` and ``attention_vjp``."""

from __future__ import annotations

import sys

import numpy as np

from ._validate import prepare


def _glue_for(q, k, v):
    """The framework glue owning q, k and v; ``TypeError`` for mixed or unknown array types."""
    kinds = set()
    for x in (q, k, v):
        if isinstance(x, np.ndarray):
            kinds.add("numpy")
        elif type(x).__module__.startswith("torch") and "torch" in sys.modules:
            kinds.add("torch")
        elif type(x).__module__.startswith("jax") or type(x).__name__ in ("ArrayImpl", "DynamicJaxprTracer"):
            kinds.add("jax")
        else:
            kind = f"{type(x).__module__}.{type(x).__name__}"
            raise TypeError(f"q, k and v must be NumPy arrays, torch tensors or JAX arrays; got {kind}")
    if len(kinds) > 1:
        names = ", ".join(f"{n} {type(x).__module__}.{type(x).__name__}" for n, x in zip("qkv", (q, k, v)))
        raise TypeError(f"q, k and v must be arrays of one framework; got {names}")
    kind = kinds.pop()
    if kind == "numpy":
        from ._numpy_glue import NumpyGlue

        return NumpyGlue()
    if kind == "torch":
        from ._torch_glue import TorchGlue

        return TorchGlue()
    from ._jax_glue import JaxGlue

    return JaxGlue()


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
        query_mask: bool ``[..., Nq]``, True = keep; masked query rows are exact zeros.
        causal: query i attends to keys j <= i (needs Nq == Nk).
        num_hashes: m, the number of hashes averaged (variance ~ 1/m). Sample mode only.
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

    Returns:
        ``[..., Nq, Dv]`` in q's framework, device and dtype.
    """
    glue = _glue_for(q, k, v)
    prep = prepare(
        glue,
        q,
        k,
        v,
        key_padding_mask=key_padding_mask,
        query_mask=query_mask,
        causal=causal,
        num_hashes=num_hashes,
        hash_bits=hash_bits,
        mode=mode,
        hashing=hashing,
        backward=backward,
        normalize=normalize,
        planes=planes,
        seed=seed,
        generator=generator,
        key=key,
        requires_grad=glue.requires_grad(q, k, v),
    )
    return glue.run(glue.select(prep.call), prep)


def attention_vjp(q, k, v, **kwargs):
    """``(out, vjp)`` for NumPy arrays: ``out = attention(q, k, v, **kwargs)`` and
    ``vjp(cotangent) -> (dq, dk, dv)``, the vector-Jacobian product with the chosen ``backward``
    estimator, computed with the same hash functions as the forward.
    """
    glue = _glue_for(q, k, v)
    if glue.name != "numpy":
        raise TypeError(f"attention_vjp is for NumPy arrays; with {glue.name} use the framework's autograd")
    unknown = set(kwargs) - set(attention.__kwdefaults__)
    if unknown:
        raise TypeError(f"attention_vjp() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    options = {**attention.__kwdefaults__, **kwargs}
    prep = prepare(glue, q, k, v, requires_grad=True, **options)
    return glue.run(glue.select(prep.call), prep, with_vjp=True)
