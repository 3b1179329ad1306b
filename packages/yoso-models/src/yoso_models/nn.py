"""``yoso_models.nn``: torch modules built on :func:`yoso.attention` (and nothing below it), so they run on every
backend.

    from yoso_models.nn import YosoSelfAttention
    layer = YosoSelfAttention(embed_dim=256, num_heads=4)                    # N-YOSO-32, tau = 8
    y = layer(x, key_padding_mask=mask)                                      # x [B, N, 256], mask [B, N] True = keep

Importing this module imports torch; ``import yoso_models`` alone does not.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import yoso

from ._checks import EVAL_MODES, check_dropout, check_layer

__all__ = ["EVAL_MODES", "YosoCState", "YosoSelfAttention"]


class YosoCState(NamedTuple):
    """The state of a YOSO-C layer (``conv_window`` set): the attention's :class:`yoso.State` and the last
    ``conv_window - 1`` (padding-masked) values per head, ``[B, H, conv_window - 1, head_dim]``, which the
    causal convolution of the next tokens reads. Both are of constant size."""

    attention: yoso.State
    values: torch.Tensor


class YosoSelfAttention(nn.Module):
    """Multi-head self-attention with YOSO (LSH-sampled, linear in N) instead of softmax.

    ``x [B, N, embed_dim]`` -> q/k/v projections -> ``num_heads`` heads of ``embed_dim // num_heads`` ->
    :func:`yoso.attention` (+ the optional YOSO-C depthwise convolution over values) -> output projection
    -> dropout.

    Args:
        embed_dim, num_heads: model width and number of heads (``embed_dim % num_heads == 0``).
        num_hashes, hash_bits, mode, hashing, backward, normalize: as in :func:`yoso.attention` (m, tau,
            "sample"/"expectation", "gaussian"/"hadamard", "lower_bound"/"exact", N-YOSO output
            normalisation). They apply in training.
        causal: token i attends to tokens j <= i.
        dropout: dropout probability on the layer's output (after the output projection). YOSO never forms
            an attention matrix, so there are no attention probabilities to drop.
        conv_window: if set, the paper's YOSO-C variant: a depthwise convolution over the sequence, one
            ``conv_window x 1`` kernel per head, applied to the (padding-masked) values and added to the
            attention output of that head (causal models pad on the left only, so no token sees the future).
        bias: whether the four projections have biases.
        eval_mode: what ``eval()`` computes. ``"expectation"`` (default): YOSO-E, the exact expectation of
            the sampled attention, like dropout's expectation at inference (the paper, section 4: "to make
            the inference deterministic, as in dropout, ideally, we take the expectation as the output").
            Deterministic and the lowest-variance prediction, but quadratic in N (time; memory stays O(N) on
            fused backends). ``"sample"``: the training estimator, linear in N; deterministic only with
            ``eval_seed``.
        eval_seed: with ``eval_mode="sample"``, an int fixes the hash functions used in ``eval()`` (one draw
            shared by every input: deterministic and linear, but every prediction carries the same sampling
            error, which is why it is not the default). None draws fresh hashes per call.

    Training draws fresh hash functions from torch's global RNG on every call (``seed=None``), so
    ``torch.manual_seed`` reproduces a run and ``torch.utils.checkpoint`` recomputes with the same hashes.
    The layer has no Python-side data-dependent branches, so it traces with ``torch.compile`` wherever the
    selected backend does.

    ``key_padding_mask`` is bool ``[B, N]`` with **True = a real token** (yoso's convention; note that
    ``torch.nn.MultiheadAttention`` uses True = ignore). Padded tokens cannot change the outputs of real
    tokens, and their own output rows are exactly zero before the output projection.

    **Generation** (``causal=True``): ``y, state = layer(x, use_cache=True)`` also returns the layer's
    recurrent state (a :class:`yoso.State`: per head ``num_hashes * 2**hash_bits * head_dim`` numbers, whatever
    the length), and ``layer(x_next, past_state=state, use_cache=True)`` continues the sequence: chunked prefill
    and one-token decoding are the same call, and the outputs equal those of one call over the whole sequence
    with the same hash functions. Those are drawn at the first call (``eval_seed`` in ``eval()``, else torch's
    RNG) and then come from the state, fixed for the sequence. The attention must be sampled
    (``eval_mode="sample"`` in ``eval()``; YOSO-E has no finite state). With ``conv_window`` (YOSO-C) the state
    is a :class:`YosoCState`: the attention's state and the last ``conv_window - 1`` values, which the causal
    convolution of the next tokens needs. ``differentiable_state=True``
    makes the state carry the key tables that gradients w.r.t. the projections need across chunks
    (``head_dim`` times larger; docs/math.md#recurrent-state).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_hashes: int = 32,
        hash_bits: int = 8,
        mode: str = "sample",
        hashing: str = "gaussian",
        backward: str = "lower_bound",
        normalize: bool = True,
        causal: bool = False,
        dropout: float = 0.0,
        conv_window: int | None = None,
        bias: bool = True,
        eval_mode: str = "expectation",
        eval_seed: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        head_dim = check_layer(
            width_name="embed_dim",
            width=embed_dim,
            num_heads=num_heads,
            num_hashes=num_hashes,
            hash_bits=hash_bits,
            mode=mode,
            hashing=hashing,
            backward=backward,
            eval_mode=eval_mode,
        )
        check_dropout("dropout", dropout)
        if conv_window is not None and (
            isinstance(conv_window, bool) or not isinstance(conv_window, numbers.Integral) or conv_window < 1
        ):
            raise ValueError(f"conv_window must be None or a positive int, got {conv_window!r}")
        if eval_seed is not None:
            if eval_mode != "sample":
                raise ValueError("eval_seed fixes the hashes of eval_mode='sample'; eval_mode='expectation' has none")
            if isinstance(eval_seed, bool) or not isinstance(eval_seed, numbers.Integral) or eval_seed < 0:
                raise ValueError(f"eval_seed must be None or a non-negative int, got {eval_seed!r}")

        self.embed_dim, self.num_heads, self.head_dim = int(embed_dim), int(num_heads), head_dim
        self.num_hashes, self.hash_bits = int(num_hashes), int(hash_bits)
        self.mode, self.hashing, self.backward, self.normalize = mode, hashing, backward, bool(normalize)
        self.causal = bool(causal)
        self.eval_mode, self.eval_seed = eval_mode, eval_seed
        self.conv_window = None if conv_window is None else int(conv_window)

        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        # YOSO-C: one (conv_window x 1) kernel per head over the sequence axis of that head's values.
        self.conv = (
            None
            if conv_window is None
            else nn.Conv2d(num_heads, num_heads, (self.conv_window, 1), groups=num_heads, bias=False, **factory)
        )

    def extra_repr(self) -> str:
        parts = [
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}",
            f"num_hashes={self.num_hashes}, hash_bits={self.hash_bits}, mode={self.mode!r}",
            f"hashing={self.hashing!r}, backward={self.backward!r}, causal={self.causal}",
            f"eval_mode={self.eval_mode!r}",
        ]
        if self.eval_seed is not None:
            parts.append(f"eval_seed={self.eval_seed}")
        if self.conv_window is not None:
            parts.append(f"conv_window={self.conv_window}")
        return ", ".join(parts)

    def _mode_and_seed(self) -> tuple[str, int | None]:
        if self.training:
            return self.mode, None
        if self.mode == "expectation":
            return "expectation", None
        return self.eval_mode, self.eval_seed

    def _check_inputs(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor [batch, seq_len, embed_dim={self.embed_dim}], got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be a tensor [batch, seq_len, embed_dim={self.embed_dim}], got {list(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if key_padding_mask is None:
            return
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            what = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask)
            raise TypeError(f"key_padding_mask must be a bool tensor [batch, seq_len] (True = real token), got {what}")
        if tuple(key_padding_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"key_padding_mask must have shape [batch, seq_len] = {list(x.shape[:2])}, "
                f"got {list(key_padding_mask.shape)}"
            )

    def _depthwise_conv(self, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """YOSO-C's convolution over the sequence of each head's values ``v [B, H, N, Dh]``."""
        if mask is not None:
            # Padded tokens must not leak through the kernel either: by selection, not multiplication
            # (0 * inf and 0 * NaN are NaN).
            v = torch.where(mask[:, None, :, None], v, torch.zeros_like(v))
        w = self.conv_window
        left, right = (w - 1, 0) if self.causal else ((w - 1) // 2, w // 2)
        return self.conv(F.pad(v, (0, 0, left, right)))

    def _continued_conv(self, v: torch.Tensor, mask: torch.Tensor | None, state: YosoCState | None):
        """The causal convolution of a chunk continuing ``state``: ``(conv, the last conv_window - 1 values)``.

        The chunk's (masked) values follow the carried ones, which stand where the one-shot call's left
        zero padding or earlier values stand, so the result is the one-shot call's rows for these tokens."""
        if mask is not None:
            v = v * mask[:, None, :, None].to(v.dtype)
        w = self.conv_window
        earlier = v.new_zeros(v.shape[:2] + (w - 1, v.shape[3])) if state is None else state.values
        values = torch.cat([earlier, v], dim=2)
        return self.conv(values), values[:, :, values.shape[2] - (w - 1) :]

    def _check_state(self, mode: str, past_state, use_cache: bool) -> None:
        if past_state is None and not use_cache:
            return
        if not self.causal:
            raise ValueError("past_state/use_cache need a causal layer (causal=True): a state carries the keys so far")
        if mode != "sample":
            what = "mode='expectation'" if self.training or self.mode == "expectation" else "eval_mode='expectation'"
            raise ValueError(
                f"past_state/use_cache need sampled attention, but the layer computes YOSO-E ({what}), which has no "
                "finite state; build it with eval_mode='sample' (and eval_seed= for fixed hash functions) to generate"
            )
        expected = yoso.State if self.conv is None else YosoCState
        if past_state is not None and not isinstance(past_state, expected):
            raise TypeError(
                f"past_state must be the {expected.__name__} a call of this layer with use_cache=True returned, "
                f"got {type(past_state).__name__}"
            )

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        *,
        past_state: yoso.State | YosoCState | None = None,
        use_cache: bool = False,
        differentiable_state: bool = False,
    ):
        """``x [B, N, embed_dim]``, optional bool ``key_padding_mask [B, N]`` (True = real) -> ``[B, N, embed_dim]``.

        With ``use_cache=True``: ``(out, state)``; ``past_state`` continues a sequence (see the class docstring).
        """
        self._check_inputs(x, key_padding_mask)
        mode, seed = self._mode_and_seed()
        self._check_state(mode, past_state, use_cache)
        batch, length, _ = x.shape
        heads = (batch, length, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(heads).transpose(1, 2)  # [B, H, N, Dh]
        k = self.k_proj(x).view(heads).transpose(1, 2)
        v = self.v_proj(x).view(heads).transpose(1, 2)
        mask = None if key_padding_mask is None else key_padding_mask[:, None, :]  # broadcast over heads
        stateful = past_state is not None or use_cache
        conv_state = None
        if stateful and self.conv is not None:
            conv_state = past_state
            past_state = None if past_state is None else past_state.attention
        state_options = {}
        if stateful:
            # The state holds the hash functions after the first call: no new draw, no seed to compare.
            seed = seed if past_state is None else None
            state_options = dict(
                initial_state=past_state, output_final_state=use_cache, differentiable_state=differentiable_state
            )
        out = yoso.attention(
            q,
            k,
            v,
            key_padding_mask=mask,
            query_mask=mask,  # padded rows: exact zeros, and no work
            causal=self.causal,
            num_hashes=self.num_hashes,
            hash_bits=self.hash_bits,
            mode=mode,
            hashing=self.hashing,
            backward=self.backward,
            normalize=self.normalize,
            seed=seed,
            **state_options,
        )
        state = None
        if use_cache:
            out, state = out
        if self.conv is not None:
            if stateful:
                conv, values = self._continued_conv(v, key_padding_mask, conv_state)
                state = YosoCState(attention=state, values=values) if use_cache else None
            else:
                conv = self._depthwise_conv(v, key_padding_mask)
            if mask is not None:
                conv = torch.where(mask[..., None], conv, torch.zeros_like(conv))
            out = out + conv
        out = out.transpose(1, 2).reshape(batch, length, self.embed_dim)
        out = self.dropout(self.out_proj(out))
        return (out, state) if use_cache else out
