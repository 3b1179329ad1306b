"""Hugging Face transformers on yoso: ``attn_implementation="yoso"`` and kernels for ``YosoModel``.

Two ways in, both through :func:`yoso.attention` only, so they run on whichever backend serves the tensors:

1. :func:`register` adds ``"yoso"`` to transformers' ``AttentionInterface`` (and ``AttentionMaskInterface``),
   so models that dispatch attention through it (BERT, RoBERTa, ALBERT, ELECTRA, DistilBERT, ...) run YOSO::

       from yoso_models import transformers as yoso_hf
       yoso_hf.register()                                   # or register("yoso", num_hashes=64, hash_bits=9)
       model = BertForSequenceClassification(config)        # config._attn_implementation = "yoso"
       yoso_hf.enable(model)                                # or: from_pretrained(..., attn_implementation="yoso")

   * ``scaling`` does not apply: YOSO normalises q and k to unit length, so the 1/sqrt(d) factor transformers
     passes has no effect. The weight of a key is ``(1 - angle/pi)^tau``; ``hash_bits`` (tau) sets its sharpness.
   * A checkpoint pretrained with softmax attention computes different attention under YOSO: fine-tune it
     (the paper pretrains and fine-tunes with YOSO) before trusting its outputs.
   * The ``dropout`` transformers passes (attention-probability dropout) has no YOSO counterpart, since no
     attention matrix is formed; it is applied to the attention output instead, in training only.
   * Masks: the 4-D mask transformers builds must be a key padding mask, optionally combined with a causal
     mask (and fully masked query rows); anything else (sliding windows, per-head masks, packed sequences,
     additive position biases) raises a ``ValueError`` rather than being approximated. In self-attention
     the padded tokens are masked as queries too (``query_mask``): their output rows are zeros, and
     whatever they hold (NaN included) cannot reach any other token.
   * In ``eval()`` the attention is YOSO-E (the exact expectation; deterministic) unless registered with
     ``eval_mode="sample"`` -- see :class:`yoso_models.nn.YosoSelfAttention` for the reasoning.

2. :func:`patch_yoso_model` gives transformers' own ``YosoModel`` family the ``lsh_cumulation`` kernels it
   expects (upstream they exist only as CUDA code fetched at run time, so ``use_expectation=False`` fails
   with ``AttributeError`` on a CPU); see :mod:`yoso_models._yoso_model` for what it can and cannot fix.

Tested with transformers 5.23.0 (the ``integrations`` nox session).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import yoso

from ._checks import EVAL_MODES, check_choice
from ._yoso_model import YosoKernels, patch_yoso_model

__all__ = ["YosoKernels", "attention_forward", "enable", "masks_from_attention_mask", "patch_yoso_model", "register"]

# An additive mask entry at or below this is a "blocked" key: exp(-1e4) underflows to 0 in every float
# format, so softmax gives it exactly zero weight. Anything between 0 and this is a real bias (ALiBi,
# relative positions) that YOSO cannot express.
BLOCKED_BIAS = -1e4

# Keyword arguments transformers may pass that ask for something YOSO cannot do.
_UNSUPPORTED_KWARGS = {
    "sliding_window": "sliding-window attention",
    "softcap": "logit soft-capping",
    "s_aux": "attention sinks",
    "cu_seq_lens_q": "packed (varlen) sequences",
}


def _import_transformers():
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - the integrations session installs it
        raise ImportError(
            "yoso_models.transformers needs Hugging Face transformers: pip install 'yoso-models[transformers]'"
        ) from error
    return transformers


@dataclass(frozen=True)
class _Options:
    num_hashes: int
    hash_bits: int
    mode: str
    hashing: str
    backward: str
    eval_mode: str
    eval_seed: int | None

    def __post_init__(self):
        yoso.check_options(
            num_hashes=self.num_hashes,
            hash_bits=self.hash_bits,
            mode=self.mode,
            hashing=self.hashing,
            backward=self.backward,
        )
        check_choice("eval_mode", self.eval_mode, EVAL_MODES)
        if self.eval_seed is not None and (
            self.eval_mode != "sample"
            or isinstance(self.eval_seed, bool)
            or not isinstance(self.eval_seed, numbers.Integral)
            or self.eval_seed < 0
        ):
            raise ValueError(
                f"eval_seed must be None or a non-negative int with eval_mode='sample', got {self.eval_seed!r}"
            )

    def mode_and_seed(self, training: bool) -> tuple[str, int | None]:
        if training:
            return self.mode, None
        if self.mode == "expectation":
            return "expectation", None
        return self.eval_mode, self.eval_seed


def masks_from_attention_mask(mask, *, batch: int, q_len: int, kv_len: int, causal_hint: bool):
    """``(query_mask, key_mask, causal)`` from the mask transformers passes to an attention function.

    ``mask``: None, or 4-D ``[batch | 1, heads | 1, q_len | 1, kv_len]``, bool (True = attend, as built by
    ``sdpa_mask``) or float (0 = attend, ``<= -1e4`` = blocked, as built by ``eager_mask``). Returns bool
    masks ``[batch, 1, q_len]`` and ``[batch, 1, kv_len]`` (None when there is nothing to mask) and whether
    the pattern is causal. The mask must equal ``query_ok[i] & key_ok[j]`` (``& j <= i`` when causal);
    otherwise a ``ValueError`` says what YOSO cannot express. Under ``torch.compile`` the (data-dependent)
    verification is skipped and causality comes from ``causal_hint``.
    """
    import torch

    if mask is None:
        causal = bool(causal_hint) and q_len > 1
        if causal and q_len != kv_len:
            raise ValueError(
                f"causal attention with {q_len} queries over {kv_len} keys (a chunk after a cache) needs an offset "
                "causal mask, which YOSO cannot express; decode one token at a time or pass the whole sequence"
            )
        return None, None, causal
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    expected = f"[batch={batch} or 1, heads or 1, q_len={q_len} or 1, kv_len={kv_len}]"
    if mask.dim() != 4:
        raise ValueError(
            f"yoso attention takes the 4-D mask transformers builds, {expected}; got a {mask.dim()}-D mask of shape "
            f"{list(mask.shape)} (register() also registers yoso's mask function; is the model's "
            "attn_implementation 'yoso'?)"
        )
    mb, mh, mq, mk = mask.shape
    if mb not in (1, batch) or mq not in (1, q_len) or mk != kv_len:
        raise ValueError(f"attention_mask must have shape {expected}; got {list(mask.shape)}")

    compiling = torch.compiler.is_compiling()
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        allowed = mask == 0
        if not compiling and not (allowed | (mask <= BLOCKED_BIAS)).all():
            raise ValueError(
                "attention_mask holds additive biases other than 0 (attend) and <= -1e4 (blocked), e.g. ALiBi or "
                "relative positions; YOSO's weights are fixed by angles and cannot add a bias"
            )
    else:
        raise TypeError(f"attention_mask must be bool (True = attend) or floating (0 = attend), got {mask.dtype}")

    if mh > 1:
        if not compiling and not (allowed == allowed[:, :1]).all():
            raise ValueError("attention_mask differs between heads; yoso's key padding mask is shared by all heads")
        allowed = allowed[:, :1]
    allowed = allowed.expand(batch, 1, q_len, kv_len)
    query_ok = allowed.any(dim=-1)  # [B, 1, Nq]: fully masked query rows become masked queries
    key_ok = allowed.any(dim=-2)  # [B, 1, Nk]
    separable = query_ok[..., :, None] & key_ok[..., None, :]

    if compiling:
        causal = bool(causal_hint) and q_len > 1 and q_len == kv_len
    elif torch.equal(allowed, separable):
        causal = False
    elif q_len == kv_len and torch.equal(allowed, separable & _lower_triangle(q_len, mask.device)):
        causal = True
    else:
        raise ValueError(
            "attention_mask is not a key padding mask (optionally causal): YOSO cannot express sliding windows, "
            "offset causal masks (a chunk after a cache), packed sequences or other per-pair masks"
        )
    query_mask = None if (not compiling and bool(query_ok.all())) else query_ok
    key_mask = None if (not compiling and bool(key_ok.all())) else key_ok
    return query_mask, key_mask, causal


def _lower_triangle(n: int, device):
    import torch

    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def _is_cross_attention(module) -> bool:
    """Whether ``module`` attends from one sequence to another (its keys are not its queries' tokens)."""
    return bool(getattr(module, "is_cross_attention", False)) or "crossattention" in type(module).__name__.lower()


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, options, **kwargs):
    """The function registered with ``AttentionInterface`` (bound to its options by :func:`register`).

    ``query [B, H, Nq, D]``, ``key``/``value [B, Hkv, Nk, D]`` (grouped heads are repeated) ->
    ``(output [B, Nq, H, Dv], None)``; no attention weights exist to return. ``scaling`` is ignored (YOSO
    normalises q and k); ``dropout`` is applied to the output in training.
    """
    import torch

    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"yoso attention does not support {what} ({name}={kwargs[name]!r})")
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a 4-D tensor [batch, heads, seq_len, head_dim]; got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, seq_len, head_dim]; got {list(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    batch, heads, q_len, _ = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if kv_heads != heads:
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads cannot share {kv_heads} key/value heads")
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    is_causal = kwargs.get("is_causal")
    causal_hint = getattr(module, "is_causal", False) if is_causal is None else is_causal
    query_mask, key_mask, causal = masks_from_attention_mask(
        attention_mask, batch=batch, q_len=q_len, kv_len=kv_len, causal_hint=causal_hint
    )
    if key_mask is not None and q_len == kv_len and not _is_cross_attention(module):
        # Self-attention: a padded token is a padded query too. transformers' masks let padded queries attend
        # (their rows are ignored later), but to yoso they are rows like any other: NaN or inf there would be
        # refused as "unmasked", and they would cost work. Masked, their output rows are exact zeros.
        query_mask = key_mask if query_mask is None else query_mask & key_mask
    training = bool(getattr(module, "training", False))
    mode, seed = options.mode_and_seed(training)
    out = yoso.attention(
        query,
        key,
        value,
        key_padding_mask=key_mask,
        query_mask=query_mask,
        causal=causal,
        num_hashes=options.num_hashes,
        hash_bits=options.hash_bits,
        mode=mode,
        hashing=options.hashing,
        backward=options.backward,
        seed=seed,
    )
    if dropout and training:
        out = torch.nn.functional.dropout(out, p=float(dropout), training=True)
    return out.transpose(1, 2).contiguous(), None


def register(
    name: str = "yoso",
    *,
    num_hashes: int = 32,
    hash_bits: int = 8,
    mode: str = "sample",
    hashing: str = "gaussian",
    backward: str = "lower_bound",
    eval_mode: str = "expectation",
    eval_seed: int | None = None,
) -> str:
    """Register YOSO as ``attn_implementation=name`` with transformers; returns ``name``.

    The hyperparameters are those of :func:`yoso.attention` / :class:`yoso_models.nn.YosoSelfAttention`; register
    several names for several settings (``register("yoso-e", mode="expectation")``). Registers the attention
    function with ``transformers.AttentionInterface`` and, where the version has one, the boolean
    ``sdpa_mask`` builder with ``AttentionMaskInterface`` under the same name (transformers looks the mask
    builder up by the implementation's name).
    """
    import functools

    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    options = _Options(num_hashes, hash_bits, mode, hashing, backward, eval_mode, eval_seed)
    transformers = _import_transformers()
    interface = getattr(transformers, "AttentionInterface", None)
    if interface is None:
        raise ImportError(
            f"transformers {transformers.__version__} has no AttentionInterface (added in 4.48); "
            "register() needs it. Upgrade transformers, or for YosoModel use patch_yoso_model()"
        )
    function = functools.partial(attention_forward, options=options)
    functools.update_wrapper(function, attention_forward)
    interface.register(name, function)
    masking = getattr(transformers, "masking_utils", None)
    mask_interface = getattr(masking, "AttentionMaskInterface", None) if masking is not None else None
    if mask_interface is not None:
        mask_interface.register(name, masking.sdpa_mask)
    return name


def enable(model, name: str = "yoso", **options):
    """Switch a loaded model to YOSO attention (registering ``name`` first if options are given or it is new).

    Raises a ``ValueError`` for models whose attention does not go through transformers' AttentionInterface
    (their ``_supports_attention_backend`` is False): setting ``attn_implementation`` on them would be
    silently ignored. Returns the model.
    """
    transformers = _import_transformers()
    cls = type(model)
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"enable() takes a transformers PreTrainedModel, got {cls.__module__}.{cls.__name__}")
    if not getattr(cls, "_supports_attention_backend", False):
        hint = " For YosoModel and its heads use patch_yoso_model()." if "Yoso" in cls.__name__ else ""
        raise ValueError(
            f"{cls.__name__} does not dispatch attention through transformers' AttentionInterface "
            f"(_supports_attention_backend is False): attn_implementation={name!r} would never reach yoso.{hint}"
        )
    if options or name not in transformers.AttentionInterface():
        register(name, **options)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers: the config attribute is what the attention layers read
        model.config._attn_implementation = name
    if model.config._attn_implementation != name:
        raise RuntimeError(f"{cls.__name__} kept attn_implementation={model.config._attn_implementation!r}")
    return model
