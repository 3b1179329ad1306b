"""``yoso_models.nnx``: a Flax NNX attention module built on :func:`yoso.attention` (and nothing below it).

    from flax import nnx
    from yoso_models.nnx import YosoAttention
    layer = YosoAttention(num_heads=4, in_features=256, rngs=nnx.Rngs(params=0, hashing=1))
    y = layer(x, key_padding_mask=mask)          # x [B, N, 256], mask [B, N] bool, True = real token

The hash functions come from an NNX RNG stream (``"hashing"`` by default; an ``nnx.Rngs`` without that
stream falls back to its ``default`` one), so every call draws fresh ones, ``nnx.jit`` carries the stream
state like dropout's, and the same seeds reproduce a run. Computing on JAX arrays needs a backend serving
them (``yoso-jax``). Importing this module imports flax and jax; ``import yoso_models`` alone does not.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

import yoso

from ._checks import EVAL_MODES, check_dropout, check_layer, check_positive_int

__all__ = ["EVAL_MODES", "YosoAttention"]


class YosoAttention(nnx.Module):
    """Multi-head attention with YOSO (LSH-sampled, linear in N) instead of softmax.

    ``inputs_q [..., Nq, in_features]`` (and ``inputs_kv [..., Nk, in_features]`` for cross-attention; self-
    attention by default) -> query/key/value projections to ``num_heads`` heads of
    ``qkv_features // num_heads`` -> :func:`yoso.attention` -> output projection -> dropout.

    Args:
        num_heads, in_features: heads and input width; ``qkv_features`` (default ``in_features``) must be
            divisible by ``num_heads``; ``out_features`` defaults to ``in_features``.
        num_hashes, hash_bits, mode, hashing, backward, normalize, causal: as in :func:`yoso.attention`.
        dropout_rate: dropout on the module's output (YOSO forms no attention matrix to drop from).
        deterministic: like ``nnx.Dropout``'s flag; ``module.eval()`` sets it, ``module.train()`` clears it.
            When deterministic, the module computes ``eval_mode`` and applies no dropout.
        eval_mode: ``"expectation"`` (default): YOSO-E, the expectation of the sampled attention --
            deterministic and the lowest-variance prediction (the paper takes it at inference "as in
            dropout"), quadratic in N. ``"sample"``: the training estimator, linear in N, hashes still drawn
            from the stream (so not deterministic unless the stream is re-seeded).
        rng_collection: the RNG stream the hash functions are drawn from (default ``"hashing"``).
        rngs: ``nnx.Rngs`` for the parameters, dropout and hashing.

    **Generation** (``causal=True``, self-attention): ``y, state = module(x, use_cache=True)`` also returns the
    recurrent state (a :class:`yoso.State`, a pytree: ``nnx.jit``/``jax.lax.scan`` carry it), and
    ``module(x_next, past_state=state, use_cache=True)`` continues the sequence -- chunked prefill and one-token
    decoding alike, equal to one call over the whole sequence with the same hash functions. Those are drawn
    from the stream at the first call and then come from the state. The attention must be sampled
    (``eval_mode="sample"`` when deterministic). ``differentiable_state=True`` carries the key tables that
    gradients w.r.t. the projections need across chunks (docs/math.md#recurrent-state). To update the state in
    place while decoding, donate it to the jitted step (``jax.jit(step, donate_argnums=...)``).
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        *,
        num_hashes: int = 32,
        hash_bits: int = 8,
        mode: str = "sample",
        hashing: str = "gaussian",
        backward: str = "lower_bound",
        normalize: bool = True,
        causal: bool = False,
        dropout_rate: float = 0.0,
        use_bias: bool = True,
        deterministic: bool = False,
        eval_mode: str = "expectation",
        rng_collection: str = "hashing",
        rngs: nnx.Rngs,
    ):
        qkv_features = in_features if qkv_features is None else qkv_features
        out_features = in_features if out_features is None else out_features
        check_positive_int("in_features", in_features)
        head_dim = check_layer(
            width_name="qkv_features",
            width=qkv_features,
            num_heads=num_heads,
            num_hashes=num_hashes,
            hash_bits=hash_bits,
            mode=mode,
            hashing=hashing,
            backward=backward,
            eval_mode=eval_mode,
        )
        check_dropout("dropout_rate", dropout_rate)

        self.num_heads = num_heads
        self.head_dim = head_dim
        self.in_features = int(in_features)
        self.options = dict(
            num_hashes=num_hashes,
            hash_bits=hash_bits,
            hashing=hashing,
            backward=backward,
            normalize=normalize,
            causal=causal,
        )
        self.mode, self.eval_mode, self.deterministic = mode, eval_mode, deterministic

        def linear(n_in, n_out):
            return nnx.Linear(n_in, n_out, use_bias=use_bias, rngs=rngs)

        self.query = linear(in_features, qkv_features)
        self.key = linear(in_features, qkv_features)
        self.value = linear(in_features, qkv_features)
        self.out = linear(qkv_features, out_features)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        # Its own fork of the stream, as nnx.Dropout does: hashing does not shift the dropout keys.
        self.hash_rngs = rngs[rng_collection].fork()

    def _heads(self, x):
        """``[..., N, H*Dh]`` -> ``[..., H, N, Dh]``."""
        x = x.reshape(x.shape[:-1] + (self.num_heads, self.head_dim))
        return jnp.swapaxes(x, -3, -2)

    def _check_inputs(self, inputs_q, inputs_kv, key_padding_mask, query_mask, deterministic) -> None:
        """Refuse, naming the argument, what would otherwise fail deep inside JAX (the torch layer's checks)."""
        import numpy as np

        for name, x in (("inputs_q", inputs_q), ("inputs_kv", inputs_kv)):
            if x is None:
                continue
            if not hasattr(x, "shape") or not hasattr(x, "dtype"):
                raise TypeError(
                    f"{name} must be a JAX or NumPy array [..., seq_len, in_features], got {type(x).__name__}"
                )
            if len(x.shape) < 2 or x.shape[-1] != self.in_features:
                raise ValueError(
                    f"{name} must have shape [..., seq_len, in_features={self.in_features}], got {list(x.shape)}"
                )
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise TypeError(f"{name} must be a floating-point array, got dtype {np.dtype(x.dtype).name}")
        kv = inputs_q if inputs_kv is None else inputs_kv
        for name, mask, like in (("key_padding_mask", key_padding_mask, kv), ("query_mask", query_mask, inputs_q)):
            if mask is None:
                continue
            if not hasattr(mask, "shape") or np.dtype(mask.dtype) != np.bool_:
                what = np.dtype(mask.dtype).name if hasattr(mask, "dtype") else type(mask).__name__
                raise TypeError(f"{name} must be a bool array [..., seq_len] (True = real token), got {what}")
            if len(mask.shape) < 1 or mask.shape[-1] != like.shape[-2]:
                raise ValueError(
                    f"{name} must have shape [..., seq_len={like.shape[-2]}] (broadcasting against the inputs' "
                    f"leading dims {list(like.shape[:-2])}), got {list(mask.shape)}"
                )
        if deterministic is not None and not isinstance(deterministic, (bool, np.bool_)):
            raise TypeError(f"deterministic must be None or a bool, got {type(deterministic).__name__}")

    def __call__(
        self,
        inputs_q,
        inputs_kv=None,
        *,
        key_padding_mask=None,
        query_mask=None,
        deterministic: bool | None = None,
        past_state: yoso.State | None = None,
        use_cache: bool = False,
        differentiable_state: bool = False,
    ):
        """``inputs_q [..., Nq, F]``, ``inputs_kv [..., Nk, F]`` (default: ``inputs_q``), ``key_padding_mask``
        bool ``[..., Nk]`` with True = a real token -> ``[..., Nq, out_features]``; with ``use_cache=True``
        ``(out, state)``, and ``past_state`` continues a sequence (see the class docstring).

        ``query_mask`` (bool ``[..., Nq]``, True = a real query) zeroes the attention output of padded queries
        (their output is the output projection's bias); in self-attention it defaults to ``key_padding_mask``,
        so padded tokens are neither attended to nor attend, and whatever they hold (NaN included) cannot
        reach a real token.
        """
        self._check_inputs(inputs_q, inputs_kv, key_padding_mask, query_mask, deterministic)
        deterministic = self.deterministic if deterministic is None else deterministic
        stateful = past_state is not None or use_cache
        if stateful:
            self._check_state(inputs_kv, deterministic, past_state)
        if query_mask is None and inputs_kv is None:
            query_mask = key_padding_mask  # self-attention: padded tokens are padded queries too
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        q, k, v = (
            self._heads(self.query(inputs_q)),
            self._heads(self.key(inputs_kv)),
            self._heads(self.value(inputs_kv)),
        )
        masks = {
            name: None if mask is None else jnp.asarray(mask)[..., None, :]  # broadcast over heads
            for name, mask in (("key_padding_mask", key_padding_mask), ("query_mask", query_mask))
        }
        mode = self.eval_mode if deterministic else self.mode
        # A continued sequence hashes with its state's functions: no draw from the stream.
        key = self.hash_rngs() if mode == "sample" and past_state is None else None
        state_options = {}
        if stateful:
            state_options = dict(
                initial_state=past_state,
                output_final_state=use_cache,
                differentiable_state=differentiable_state,
            )
        out = yoso.attention(q, k, v, **masks, mode=mode, key=key, **self.options, **state_options)
        state = None
        if use_cache:
            out, state = out
        out = jnp.swapaxes(out, -3, -2)
        out = out.reshape(out.shape[:-2] + (self.num_heads * self.head_dim,))
        out = self.dropout(self.out(out), deterministic=deterministic)
        return (out, state) if use_cache else out

    def _check_state(self, inputs_kv, deterministic: bool, past_state) -> None:
        if not self.options["causal"]:
            raise ValueError("past_state/use_cache need a causal module (causal=True): a state carries the keys so far")
        if inputs_kv is not None:
            raise ValueError("past_state/use_cache are for causal self-attention; inputs_kv (cross-attention) has none")
        mode = self.eval_mode if deterministic else self.mode
        if mode != "sample":
            what = "eval_mode='expectation' (deterministic)" if deterministic else "mode='expectation'"
            raise ValueError(
                f"past_state/use_cache need sampled attention, but the module computes YOSO-E ({what}), which has "
                "no finite state; build it with eval_mode='sample' to generate"
            )
        if past_state is not None and not isinstance(past_state, yoso.State):
            raise TypeError(
                f"past_state must be the yoso.State a call with use_cache=True returned, got {past_state!r}"
            )
