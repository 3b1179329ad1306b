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

    Returns:
        ``[..., Nq, Dv]`` in q's framework, device and dtype.
    """
    glue = glue_for(("q", "k", "v"), (q, k, v))
    prep = _prepare(glue, q, k, v, options=locals())
    out = glue.attention(glue.select(prep.call), prep)
    check_output(glue, prep, out)  # normalize=False: an overflowing result is refused, not returned as inf
    return out


_OPTIONS = tuple(attention.__kwdefaults__)


def _prepare(glue, q, k, v, *, options: dict, requires_grad: bool | None = None):
    options = {name: options[name] for name in _OPTIONS}
    grad = glue.requires_grad(q, k, v) if requires_grad is None else requires_grad
    return prepare(glue, q, k, v, requires_grad=grad, **options)


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
    prep = _prepare(glue, q, k, v, options=_check_keywords("attention_vjp", kwargs), requires_grad=True)
    out, vjp = glue.attention_vjp(glue.select(prep.call), prep)
    check_output(glue, prep, out)
    return out, vjp


def backend_for(q, k, v, **kwargs) -> str:
    """The name of the backend ``yoso.attention(q, k, v, **kwargs)`` would run on, without running it.

    Selection looks at the arrays' framework, device and dtype and at the options (an explicit choice,
    :func:`yoso.set_backend` or ``YOSO_BACKEND``, is strict and raises when it cannot run the call).
    """
    glue = glue_for(("q", "k", "v"), (q, k, v))
    return glue.select(_prepare(glue, q, k, v, options=_check_keywords("backend_for", kwargs)).call).name


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
