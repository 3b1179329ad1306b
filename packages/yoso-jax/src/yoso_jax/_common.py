"""Small pieces both implementation levels share: dtypes, masking, the Hadamard matrix."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

ELEMENT_BUDGET = 1 << 24  # elements of one temporary (64 MiB in float32)

# Projections decide hash bits by their sign: full float32 products everywhere (on GPUs the default
# matmul precision is TF32, whose 10-bit mantissa would flip bits far from any tie).
HIGHEST = lax.Precision.HIGHEST


def acc_dtype(dtype):
    """The accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def keep_rows(x, mask):
    """Zero the rows where ``mask`` is False. ``where``, not a product: masked rows may hold inf or NaN."""
    return x if mask is None else jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))


def padded_dim(dim: int) -> int:
    """``D'``: the Hadamard size, the next power of two >= ``dim``."""
    return 1 << max(0, int(dim) - 1).bit_length()


def sylvester_hadamard(n: int) -> np.ndarray:
    """The unnormalised ``n x n`` Sylvester-Hadamard matrix (``n`` a power of two), entries ±1."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def next_power_of_two(n: int, at_least: int = 1) -> int:
    return max(at_least, 1 << max(0, int(n) - 1).bit_length())
