"""YOSO attention end to end, written plainly: the oracle for the public API's forward.

All arrays are in the canonical layout: ``q [B, Nq, D]``, ``k [B, Nk, D]``, ``v [B, Nk, Dv]``,
masks ``[B, N]`` bool (True = keep), planes ``[P, ...]`` with ``P`` 1 or ``B`` (see ``hashing``).
"""

from __future__ import annotations

import numpy as np

from .cumulation import cumulate
from .hashing import hash_codes
from .pairwise import expectation_forward


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``x / ||x||`` along the last axis; a zero row stays zero (never NaN)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(norm > 0, x / np.where(norm > 0, norm, 1), 0)


def unit_rows_vjp(x: np.ndarray, cotangent: np.ndarray) -> np.ndarray:
    """Vector-Jacobian product of :func:`unit_rows`: ``(g - u (u·g)) / ||x||``; 0 on zero rows."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    safe = np.where(norm > 0, norm, 1)
    u = x / safe
    return np.where(norm > 0, (cotangent - u * np.sum(u * cotangent, axis=-1, keepdims=True)) / safe, 0)


def attention(
    q,
    k,
    v,
    *,
    planes=None,
    key_padding_mask=None,
    query_mask=None,
    causal=False,
    num_hashes=32,
    hash_bits=8,
    mode="sample",
    hashing="gaussian",
    normalize=True,
):
    """N-YOSO-m (``mode="sample"``) or N-YOSO-E (``mode="expectation"``) of canonical arrays."""
    q_unit, k_unit = unit_rows(q), unit_rows(k)
    if mode == "sample":
        q_codes = hash_codes(q_unit, planes, hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits)
        k_codes = hash_codes(k_unit, planes, hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits)
        y = cumulate(
            q_codes,
            k_codes,
            v,
            read_mask=query_mask,
            write_mask=key_padding_mask,
            order="causal" if causal else "none",
            hash_bits=hash_bits,
        )
    elif mode == "expectation":
        y = expectation_forward(
            q_unit, k_unit, v, query_mask=query_mask, key_mask=key_padding_mask, causal=causal, hash_bits=hash_bits
        )
    else:
        raise ValueError(f"mode must be 'sample' or 'expectation', got {mode!r}")
    return unit_rows(y) if normalize else y
