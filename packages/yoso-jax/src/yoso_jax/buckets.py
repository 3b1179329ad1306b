"""The bucket tables as arrays (``bucket_tables`` / ``read_buckets`` / ``add_to_tables``), shared by both backends.

A recurrent state carried between causal calls and a sequence split across devices both work on the
tables themselves rather than on a finished cumulation. Plain ``jax.numpy``: one scatter-add (writing)
or gather (reading) per hash, in a ``fori_loop`` so compile time does not grow with ``m``; the outer
products of the lower bound's tables are formed one hash at a time, never for all hashes at once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ._common import HIGHEST, acc_dtype, keep_rows


@functools.partial(jax.jit, static_argnames=("hash_bits",))
def bucket_tables(codes, values, *, mask, hash_bits: int, outer=None):
    """``[B, m, 2**tau, C]`` (or ``[..., C, F]`` with ``outer``) sums of the masked tokens' values per bucket."""
    dtype = acc_dtype(values.dtype)
    tokens = keep_rows(values.astype(dtype), mask)
    if outer is not None:
        tokens = tokens[..., :, None] * keep_rows(outer.astype(dtype), mask)[..., None, :]
    batch, num_hashes, n = codes.shape
    codes = codes.astype(jnp.int32)
    rows = jnp.arange(batch, dtype=jnp.int32)[:, None]

    def one(s, tables):
        table = jnp.zeros((batch, 1 << hash_bits) + tokens.shape[2:], dtype)
        table = table.at[rows, lax.dynamic_index_in_dim(codes, s, 1, keepdims=False)].add(tokens)
        return lax.dynamic_update_index_in_dim(tables, table, s, 1)

    tables = jnp.zeros((batch, num_hashes, 1 << hash_bits) + tokens.shape[2:], dtype)
    return lax.fori_loop(0, num_hashes, one, tables)


@jax.jit
def read_buckets(codes, tables, *, mask, weights=None):
    """``(1/m) sum_s tables[b, s, codes[b, s, n]]`` (contracted with ``weights`` over the table's C axis)."""
    batch, num_hashes, n = codes.shape
    codes = codes.astype(jnp.int32)
    rows = jnp.arange(batch, dtype=jnp.int32)[:, None]

    def one(s, total):
        table = lax.dynamic_index_in_dim(tables, s, 1, keepdims=False)  # [B, 2**tau, ...]
        read = table[rows, lax.dynamic_index_in_dim(codes, s, 1, keepdims=False)]  # [B, N, ...]
        if weights is not None:
            read = jnp.einsum("bnc,bncf->bnf", weights.astype(read.dtype), read, precision=HIGHEST)
        return total + read

    shape = (batch, n) + (tables.shape[4:] if weights is not None else tables.shape[3:])
    total = lax.fori_loop(0, num_hashes, one, jnp.zeros(shape, tables.dtype))
    return keep_rows(total / num_hashes, mask)


# Up to this many scattered elements (B * m * N * C [* F]) the tokens go into the tables in one scatter over
# all hashes; beyond, one hash at a time (the broadcast updates would be materialised for all m at once).
FLAT_ADD_MAX_ELEMENTS = 1 << 20


@functools.partial(jax.jit, static_argnames=("hash_bits",))
def add_to_tables(tables, codes, values, *, mask, hash_bits: int, outer=None):
    """``tables + bucket_tables(codes, values, ...)`` as a scatter-add into ``tables`` itself.

    Written as an update of ``tables`` (not a sum with fresh tables), XLA reuses its buffer when the caller
    donates it (``jax.jit(..., donate_argnums=...)``): a one-token decoding step then touches ``m`` rows,
    not all ``m * 2**tau``. Otherwise XLA copies ``tables`` once, still cheaper than building new tables.
    """
    dtype = tables.dtype
    tokens = keep_rows(values.astype(dtype), mask)
    if outer is not None:
        tokens = tokens[..., :, None] * keep_rows(outer.astype(dtype), mask)[..., None, :]
    batch, num_hashes, n = codes.shape
    codes = codes.astype(jnp.int32)
    if batch * num_hashes * tokens[0].size <= FLAT_ADD_MAX_ELEMENTS:
        rows = jnp.arange(batch, dtype=jnp.int32)[:, None, None]
        hashes = jnp.arange(num_hashes, dtype=jnp.int32)[None, :, None]
        updates = jnp.broadcast_to(tokens[:, None], (batch, num_hashes) + tokens.shape[1:])
        return tables.at[rows, hashes, codes].add(updates, mode="promise_in_bounds")
    rows = jnp.arange(batch, dtype=jnp.int32)[:, None]

    def one(s, tables):
        return tables.at[rows, s, lax.dynamic_index_in_dim(codes, s, 1, keepdims=False)].add(
            tokens, mode="promise_in_bounds"
        )

    return lax.fori_loop(0, num_hashes, one, tables)
