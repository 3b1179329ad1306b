"""Packed variable-length sequences (``cu_seqlens=``): unpacked into a padded batch, run, packed back.

The flash-attn convention: ``q, k, v [1, ..., T, D]`` hold ``S`` sequences one after another along the token
dim, ``cu_seqlens [S + 1]`` their offsets (``0 = c_0 <= c_1 <= ... <= c_S = T``). The API gathers them into a
padded batch ``[S, ..., L, D]`` (``L`` the longest sequence; the padding masked as keys and as queries), makes
the ordinary call -- on every backend, causal or not, with one state entry per sequence -- and gathers the
output rows back. Each sequence therefore attends only within itself, exactly, and the gathers are the
framework's own differentiable ops, so gradients follow. The cost is that of the padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._validate import _fmt


@dataclass(frozen=True)
class Packing:
    """Where each sequence's tokens are, as NumPy index arrays (static: they shape the padded batch)."""

    lengths: np.ndarray  # [S]
    max_len: int  # L
    gather: np.ndarray  # [S * L]: the packed token in each padded slot (padding repeats a real one, masked)
    valid: np.ndarray  # [S, L] bool: which padded slots hold a token
    scatter: np.ndarray  # [T]: the padded slot of each packed token, s * L + position

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)


def check_packed(glue, q, k, v, cu_seqlens, masks: dict) -> tuple[Packing, tuple[int, ...]]:
    """``(packing, lead)`` for packed ``q, k, v [1, ..., T, D]``, refusing what cannot be packed."""
    shapes = {name: tuple(glue.describe(x)[0]) for name, x in (("q", q), ("k", k), ("v", v))}
    for name, shape in shapes.items():
        if len(shape) < 3 or shape[0] != 1:
            raise ValueError(
                f"with cu_seqlens, {name} must be packed as [1, ..., T, D] (the sequences one after another along "
                f"the token dim of a batch of one), got {name} {_fmt(shape)}"
            )
    if not shapes["q"][-2] == shapes["k"][-2] == shapes["v"][-2]:
        raise ValueError(
            "cu_seqlens packs self-attention: q, k and v need the same number of tokens T, got "
            + ", ".join(f"{n} {_fmt(s)}" for n, s in shapes.items())
        )
    total = shapes["q"][-2]
    try:
        lead = tuple(np.broadcast_shapes(*(s[:-2] for s in shapes.values())))
    except ValueError:
        described = ", ".join(f"{n} {_fmt(s)}" for n, s in shapes.items())
        raise ValueError(f"the leading dims of q, k and v must match or broadcast; got {described}") from None
    if len(set(len(s) for s in shapes.values())) > 1:
        raise ValueError(
            "with cu_seqlens, q, k and v must have the same number of dims (the first is the packed batch of one), "
            "got " + ", ".join(f"{n} {_fmt(s)}" for n, s in shapes.items())
        )
    values = glue.host_ints(cu_seqlens)
    if values is None:
        raise TypeError(
            "cu_seqlens must have known values: they shape the padded batch. Inside jax.jit pass them as a NumPy "
            "array or a tuple (a constant of the traced function), not as a traced argument"
        )
    values = np.asarray(values)
    if values.ndim != 1 or values.size < 2 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(
            f"cu_seqlens must be a 1-D integer array [S + 1] of offsets into the token dim, got shape "
            f"{_fmt(values.shape)} dtype {values.dtype}"
        )
    if values[0] != 0 or values[-1] != total or (np.diff(values) < 0).any():
        raise ValueError(
            f"cu_seqlens must rise from 0 to the number of tokens T = {total} without decreasing "
            f"(0 = c_0 <= c_1 <= ... <= c_S = T), got {values.tolist() if values.size <= 12 else values}"
        )
    for name, mask in masks.items():
        if mask is None:
            continue
        shape, dtype, _ = glue.describe(mask) if glue.owns(mask) else (np.shape(mask), str(mask.dtype), None)
        if dtype != "bool":
            raise TypeError(f"{name} must be a bool array (True = keep), got dtype {dtype}")
        try:
            fits = len(shape) >= 1 and shape[-1] == total and np.broadcast_shapes(shape[:-1], lead) == lead
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"{name} of shape {_fmt(shape)} does not fit the packed inputs: it must broadcast to "
                f"{_fmt(lead + (total,))} (the leading dims of q, k, v + [T])"
            )
    starts, lengths = values[:-1].astype(np.int64), np.diff(values).astype(np.int64)
    max_len = max(1, int(lengths.max()))
    position = np.arange(max_len)
    valid = position[None, :] < lengths[:, None]
    gather = np.minimum(starts[:, None] + position[None, :], total - 1).reshape(-1)
    sequence = np.repeat(np.arange(len(lengths)), lengths)
    scatter = sequence * max_len + (np.arange(total) - starts[sequence])
    return Packing(lengths=lengths, max_len=max_len, gather=gather, valid=valid, scatter=scatter), lead


def unpack(glue, x, packing: Packing):
    """``[1, *mid, T, F]`` -> the padded batch ``[S, *mid, L, F]`` (padded slots repeat a real token)."""
    x = x[0]
    mid, features = tuple(glue.describe(x)[0][:-2]), glue.describe(x)[0][-1]
    x = glue.take(x, packing.gather, len(mid))
    x = x.reshape(mid + (packing.num_sequences, packing.max_len, features))
    return glue.moveaxis(x, len(mid), 0)


def unpack_mask(glue, mask, packing: Packing, lead: tuple[int, ...]):
    """A mask broadcasting to ``lead + [T]`` (None: every token) -> ``[S, *lead[1:], L]``, False on padding."""
    ones = (1,) * (len(lead) - 1)
    valid = packing.valid.reshape((packing.num_sequences,) + ones + (packing.max_len,))
    if mask is None:
        return valid
    total = len(packing.scatter)
    if not glue.owns(mask):  # a NumPy mask for another framework's arrays: unpacked in NumPy (prepare takes it)
        from ._numpy_glue import NumpyGlue

        glue = NumpyGlue()
    mask = glue.broadcast_to(mask, lead + (total,))[0]  # [*mid, T]
    mid = lead[1:]
    mask = glue.take(mask, packing.gather, len(mid)).reshape(mid + (packing.num_sequences, packing.max_len))
    return glue.logical_and(glue.moveaxis(mask, len(mid), 0), valid)


def pack(glue, y, packing: Packing):
    """The padded batch ``[S, *mid, L, F]`` -> the packed ``[1, *mid, T, F]`` (padded slots dropped)."""
    shape = tuple(glue.describe(y)[0])
    mid, features = shape[1:-2], shape[-1]
    y = glue.moveaxis(y, 0, len(mid)).reshape(mid + (packing.num_sequences * packing.max_len, features))
    y = glue.take(y, packing.scatter, len(mid))
    return y.reshape((1,) + mid + (len(packing.scatter), features))
