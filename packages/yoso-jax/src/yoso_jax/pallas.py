"""The ``pallas`` backend's primitives: Pallas kernels for the hot loops, hashing and cumulation.

Written for GPUs (Pallas' Triton lowering: power-of-two blocks, 2-D dots of at least 16x16, no
atomics); everywhere else they run with ``interpret=True`` -- correct and slow, which is what the test
suite uses on CPUs. YOSO-E and the sampled true gradient stay ``jax.numpy`` code (``pairwise``); the
lower-bound gradient runs on this level's cumulation.

Kernels:

* ``_gaussian_hash_kernel`` -- grid (batch, token blocks, groups of 16 hashes): one dot
  ``x [BN, D] . planes^T [D, 16*tau]``, then the codes as a second dot of the sign bits with a
  ``[16*tau, 16]`` matrix of powers of two (exact: small integers in floating point). No reshapes.
* ``_hadamard_hash_kernel`` -- grid (batch, token blocks, rotations): three dots with the Hadamard
  matrix and the ±1 diagonals, then the same sign-bits-times-powers-of-two dot.
* ``_tables_kernel`` -- grid (batch, hash, bucket blocks, column blocks): the tables
  ``T_s[b] = sum_w [h_s(w) = b] v_w`` of one block of buckets, as one-hot dots over blocks of writers
  (tensor cores, deterministic; on GPUs float atomics into shared memory are compare-and-swap loops).
* ``_read_kernel`` -- grid (batch, reader blocks, column blocks): ``sum_s T_s[h_s(r)]`` as one-hot dots.
* ``_causal_kernel`` -- grid (batch, column blocks): pairs within each chunk from a dense collision
  count with the causal triangle, then earlier chunks through running tables, one (hash, bucket
  block) at a time. Anticausal runs it on reversed sequences.

Every array is padded to the blocks (padding hashes get codes that match nothing).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from . import pairwise
from ._common import HIGHEST, acc_dtype, keep_rows, next_power_of_two, sylvester_hadamard
from .buckets import add_to_tables, bucket_tables, read_buckets  # noqa: F401 (primitives of this backend)

TOKEN_BLOCK = 64  # tokens per program (hashing, reading) and per loop step (writing tables)
HASH_GROUP = 16  # hashes per hashing program (the dot's output width)
BUCKET_BLOCK = 64  # buckets per one-hot dot
COLUMN_BLOCK = 64  # value columns per program
CAUSAL_CHUNK = 32  # positions per chunk of the causal kernel
MIN_DOT = 16  # Triton's smallest dot dimension

INTERPRET_ENV_VAR = "YOSO_JAX_PALLAS_INTERPRET"  # "1": interpret even on a GPU (debugging)

_NO_READ, _NO_WRITE = -1, -2  # codes of padding hashes: they match no bucket and never each other


def interpret() -> bool:
    """Whether the kernels run in interpret mode: off GPUs (or when forced by the environment)."""
    return jax.default_backend() != "gpu" or os.environ.get(INTERPRET_ENV_VAR) == "1"


def _program_id(axis: int):
    """The program's index along ``axis`` of the grid :func:`_launch` was given (without the batch axis)."""
    return pl.program_id(axis if interpret() else axis + 1)


def _launch(kernel, grid, args, in_specs, out_spec):
    """Run ``kernel`` over the grid ``(B, *grid)``, batch first.

    ``args`` have a leading batch dim, ``B`` (one row per program) or 1 (shared by all rows);
    ``in_specs`` and ``out_spec = (row_shape, dtype, block_shape, index_map)`` describe one batch row:
    block shapes and index maps over the remaining grid ids. Compiled, the batch is the first grid
    axis. Interpreted, it is a ``lax.map`` around a kernel without it: the interpreter's loop over the
    grid rewrites its whole carried inputs and outputs per step, quadratic in the batch (4000 rows
    took ~20 s per call, ~0.1 s this way).
    """
    batch = max(a.shape[0] for a in args)
    shared = [a.shape[0] == 1 and batch > 1 for a in args]
    row_shape, dtype, out_block, out_map = out_spec
    if not interpret():
        specs = [
            pl.BlockSpec((None,) + block, lambda b, *ids, f=f, one=one: (0 if one else b,) + f(*ids))
            for (block, f), one in zip(in_specs, shared)
        ]
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((batch,) + row_shape, dtype),
            grid=(batch,) + grid,
            in_specs=specs,
            out_specs=pl.BlockSpec((None,) + out_block, lambda b, *ids: (b,) + out_map(*ids)),
        )(*args)
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(row_shape, dtype),
        grid=grid,
        in_specs=[pl.BlockSpec(block, f) for block, f in in_specs],
        out_specs=pl.BlockSpec(out_block, out_map),
        interpret=True,
    )
    rows = [a for a, one in zip(args, shared) if not one]

    def one_row(row):
        it = iter(row)
        return call(*[a[0] if one else next(it) for a, one in zip(args, shared)])

    return lax.map(one_row, rows)


def _pad_to(x, axis: int, size: int, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


# ---- hashing ------------------------------------------------------------------------------------


def _bits_to_code_matrix(rows: int, columns: int, hash_of_row, bit_of_row) -> np.ndarray:
    """``W [rows, columns]`` with ``W[r, hash_of_row(r)] = 2**bit_of_row(r)`` (rows with hash -1 stay 0)."""
    w = np.zeros((rows, columns))
    for r in range(rows):
        h = hash_of_row(r)
        if h >= 0:
            w[r, h] = 2.0 ** bit_of_row(r)
    return w


def _gaussian_hash_kernel(x_ref, planes_ref, weights_ref, codes_ref):
    x = x_ref[...]
    proj = lax.dot_general(
        x, planes_ref[...], (((1,), (1,)), ((), ())), precision=HIGHEST, preferred_element_type=x.dtype
    )  # [BN, 16 * tau']
    bits = (proj > 0).astype(x.dtype)
    codes_ref[...] = jnp.dot(bits, weights_ref[...], preferred_element_type=x.dtype).astype(jnp.int32)


def _hadamard_hash_kernel(x_ref, diag_ref, h_ref, weights_ref, codes_ref):
    u = x_ref[...]
    h = h_ref[...]
    for step in range(3):
        u = jnp.dot(u * diag_ref[step, :][None, :], h, precision=HIGHEST, preferred_element_type=u.dtype)
    bits = (u > 0).astype(u.dtype)
    codes_ref[...] = jnp.dot(bits, weights_ref[...], preferred_element_type=u.dtype).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("hashing", "num_hashes", "hash_bits"))
def hash_codes(x, planes, *, hashing: str, num_hashes: int, hash_bits: int):
    """Codes ``[B, m, N]`` (int32) of the unit rows ``x [B, N, D]`` (Pallas kernels)."""
    dtype = acc_dtype(x.dtype)
    x, planes = x.astype(dtype), planes.astype(dtype)
    batch, n, dim = x.shape
    n_pad = _round_up(n, TOKEN_BLOCK)
    token_blocks = n_pad // TOKEN_BLOCK
    if hashing == "gaussian":
        dim_pad = next_power_of_two(dim, MIN_DOT)
        bits_pad = next_power_of_two(hash_bits)
        m_pad = _round_up(num_hashes, HASH_GROUP)
        rows = HASH_GROUP * bits_pad
        xp = _pad_to(_pad_to(x, 1, n_pad), 2, dim_pad)
        p = _pad_to(_pad_to(_pad_to(planes, 1, m_pad), 2, bits_pad), 3, dim_pad)  # [P, m', tau', D']
        p = p.reshape(p.shape[0], m_pad * bits_pad, dim_pad)
        weights = _bits_to_code_matrix(
            rows, HASH_GROUP, lambda r: r // bits_pad if r % bits_pad < hash_bits else -1, lambda r: r % bits_pad
        )
        codes = _launch(
            _gaussian_hash_kernel,
            (token_blocks, m_pad // HASH_GROUP),
            [xp, p, jnp.asarray(weights, dtype)[None]],
            [
                ((TOKEN_BLOCK, dim_pad), lambda i, g: (i, 0)),
                ((rows, dim_pad), lambda i, g: (g, 0)),
                ((rows, HASH_GROUP), lambda i, g: (0, 0)),
            ],
            ((n_pad, m_pad), jnp.int32, (TOKEN_BLOCK, HASH_GROUP), lambda i, g: (i, g)),
        )
        return codes[:, :n, :num_hashes].transpose(0, 2, 1)

    # Hadamard: rotation r of the padded x is H d3 H d2 H d1 x with H the Sylvester matrix of size D'.
    rotations, _, d_hadamard = planes.shape[1:]
    size = max(d_hadamard, MIN_DOT)  # smaller transforms sit in the top-left corner of a zero matrix
    per = d_hadamard // hash_bits
    per_pad = next_power_of_two(per, MIN_DOT)
    h = np.zeros((size, size))
    h[:d_hadamard, :d_hadamard] = sylvester_hadamard(d_hadamard)
    weights = _bits_to_code_matrix(
        size, per_pad, lambda j: j // hash_bits if j < per * hash_bits else -1, lambda j: j % hash_bits
    )
    xp = _pad_to(_pad_to(x, 1, n_pad), 2, size)
    diagonals = _pad_to(planes, 3, size)  # zero beyond D': those coordinates stay 0
    codes = _launch(
        _hadamard_hash_kernel,
        (token_blocks, rotations),
        [xp, diagonals, jnp.asarray(h, dtype)[None], jnp.asarray(weights, dtype)[None]],
        [
            ((TOKEN_BLOCK, size), lambda i, r: (i, 0)),
            ((None, 3, size), lambda i, r: (r, 0, 0)),
            ((size, size), lambda i, r: (0, 0)),
            ((size, per_pad), lambda i, r: (0, 0)),
        ],
        ((n_pad, rotations, per_pad), jnp.int32, (TOKEN_BLOCK, None, per_pad), lambda i, r: (i, r, 0)),
    )
    codes = codes[:, :n, :, :per].reshape(batch, n, rotations * per)[..., :num_hashes]
    return codes.transpose(0, 2, 1)


# ---- cumulation ---------------------------------------------------------------------------------


def _onehot(codes, buckets, dtype):
    """``[len(codes), len(buckets)]``: 1 where a code equals a bucket."""
    return (codes[:, None] == buckets[None, :]).astype(dtype)


def _tables_kernel(codes_ref, values_ref, tables_ref, *, token_blocks: int, bucket_block: int):
    # codes_ref [Nw'] (one batch row, one hash); values_ref [Nw', CB]; tables_ref [bucket_block, CB]
    buckets = _program_id(1) * bucket_block + jnp.arange(bucket_block, dtype=jnp.int32)
    dtype = tables_ref.dtype

    def step(i, table):
        rows = pl.ds(i * TOKEN_BLOCK, TOKEN_BLOCK)
        onehot_t = (buckets[:, None] == codes_ref[rows][None, :]).astype(dtype)  # [buckets, tokens]
        return table + jnp.dot(onehot_t, values_ref[rows, :], precision=HIGHEST, preferred_element_type=dtype)

    tables_ref[...] = lax.fori_loop(0, token_blocks, step, jnp.zeros(tables_ref.shape, dtype))


def _read_kernel(codes_ref, tables_ref, out_ref, *, num_hashes: int, bucket_blocks: int, bucket_block: int):
    # codes_ref [m', BR]; tables_ref [m', buckets', CB]; out_ref [BR, CB]
    dtype = out_ref.dtype

    def one_hash(s, total):
        codes = codes_ref[s, :]

        def one_block(j, total):
            buckets = j * bucket_block + jnp.arange(bucket_block, dtype=jnp.int32)
            table = tables_ref[s, pl.ds(j * bucket_block, bucket_block), :]
            return total + jnp.dot(
                _onehot(codes, buckets, dtype), table, precision=HIGHEST, preferred_element_type=dtype
            )

        return lax.fori_loop(0, bucket_blocks, one_block, total)

    out_ref[...] = lax.fori_loop(0, num_hashes, one_hash, jnp.zeros(out_ref.shape, dtype))


def _causal_kernel(
    read_ref, write_ref, values_ref, out_ref, *, num_hashes: int, chunks: int, bucket_blocks: int, bucket_block: int
):
    # read_ref, write_ref [m', N']; values_ref, out_ref [N', CB] (one batch row, one column block)
    dtype = out_ref.dtype
    below = jnp.arange(CAUSAL_CHUNK)[:, None] >= jnp.arange(CAUSAL_CHUNK)[None, :]

    def within(t, carry):  # pairs inside chunk t: collision counts over all hashes, causal triangle
        rows = pl.ds(t * CAUSAL_CHUNK, CAUSAL_CHUNK)

        def count(s, counts):
            return counts + (read_ref[s, rows][:, None] == write_ref[s, rows][None, :]).astype(dtype)

        counts = lax.fori_loop(0, num_hashes, count, jnp.zeros((CAUSAL_CHUNK, CAUSAL_CHUNK), dtype))
        weights = jnp.where(below, counts, 0)
        out_ref[rows, :] = jnp.dot(weights, values_ref[rows, :], precision=HIGHEST, preferred_element_type=dtype)
        return carry

    lax.fori_loop(0, chunks, within, 0)

    def one_table(s, j):  # earlier chunks, through the running table of hash s, bucket block j
        buckets = j * bucket_block + jnp.arange(bucket_block, dtype=jnp.int32)

        def step(t, table):
            rows = pl.ds(t * CAUSAL_CHUNK, CAUSAL_CHUNK)
            earlier = jnp.dot(
                _onehot(read_ref[s, rows], buckets, dtype), table, precision=HIGHEST, preferred_element_type=dtype
            )
            out_ref[rows, :] = out_ref[rows, :] + earlier
            onehot_t = (buckets[:, None] == write_ref[s, rows][None, :]).astype(dtype)
            return table + jnp.dot(onehot_t, values_ref[rows, :], precision=HIGHEST, preferred_element_type=dtype)

        lax.fori_loop(0, chunks, step, jnp.zeros((bucket_block, out_ref.shape[1]), dtype))

    def per_hash(s, carry):
        def per_block(j, carry):
            one_table(s, j)
            return carry

        return lax.fori_loop(0, bucket_blocks, per_block, carry)

    lax.fori_loop(0, num_hashes, per_hash, 0)


def _layout(num_hashes: int, hash_bits: int, columns: int):
    """Padded sizes: hashes, bucket block and buckets, column block and columns."""
    m_pad = next_power_of_two(num_hashes)
    bucket_block = min(BUCKET_BLOCK, next_power_of_two(1 << hash_bits, MIN_DOT))
    buckets = _round_up(1 << hash_bits, bucket_block)
    column_block = min(COLUMN_BLOCK, next_power_of_two(columns, MIN_DOT))
    return m_pad, bucket_block, buckets, column_block, _round_up(columns, column_block)


def _unordered(read_codes, write_codes, values, hash_bits: int):
    batch, num_hashes, n_read = read_codes.shape
    n_write, columns = values.shape[1:]
    m_pad, bucket_block, buckets, column_block, c_pad = _layout(num_hashes, hash_bits, columns)
    r_pad, w_pad = _round_up(n_read, TOKEN_BLOCK), _round_up(n_write, TOKEN_BLOCK)
    wc = _pad_to(_pad_to(write_codes, 1, m_pad, _NO_WRITE), 2, w_pad, _NO_WRITE)
    rc = _pad_to(_pad_to(read_codes, 1, m_pad, _NO_READ), 2, r_pad, _NO_READ)
    v = _pad_to(_pad_to(values, 1, w_pad), 2, c_pad)
    tables = _launch(
        functools.partial(_tables_kernel, token_blocks=w_pad // TOKEN_BLOCK, bucket_block=bucket_block),
        (m_pad, buckets // bucket_block, c_pad // column_block),
        [wc, v],
        [((None, w_pad), lambda s, j, c: (s, 0)), ((w_pad, column_block), lambda s, j, c: (0, c))],
        ((m_pad, buckets, c_pad), values.dtype, (None, bucket_block, column_block), lambda s, j, c: (s, j, c)),
    )
    read = functools.partial(
        _read_kernel, num_hashes=m_pad, bucket_blocks=buckets // bucket_block, bucket_block=bucket_block
    )
    out = _launch(
        read,
        (r_pad // TOKEN_BLOCK, c_pad // column_block),
        [rc, tables],
        [((m_pad, TOKEN_BLOCK), lambda i, c: (0, i)), ((m_pad, buckets, column_block), lambda i, c: (0, 0, c))],
        ((r_pad, c_pad), values.dtype, (TOKEN_BLOCK, column_block), lambda i, c: (i, c)),
    )
    return out[:, :n_read, :columns]


def _causal(read_codes, write_codes, values, hash_bits: int):
    batch, num_hashes, n = read_codes.shape
    columns = values.shape[2]
    m_pad, bucket_block, buckets, column_block, c_pad = _layout(num_hashes, hash_bits, columns)
    n_pad = _round_up(n, CAUSAL_CHUNK)
    rc = _pad_to(_pad_to(read_codes, 1, m_pad, _NO_READ), 2, n_pad, _NO_READ)
    wc = _pad_to(_pad_to(write_codes, 1, m_pad, _NO_WRITE), 2, n_pad, _NO_WRITE)
    v = _pad_to(_pad_to(values, 1, n_pad), 2, c_pad)
    kernel = functools.partial(
        _causal_kernel,
        num_hashes=m_pad,
        chunks=n_pad // CAUSAL_CHUNK,
        bucket_blocks=buckets // bucket_block,
        bucket_block=bucket_block,
    )
    out = _launch(
        kernel,
        (c_pad // column_block,),
        [rc, wc, v],
        [
            ((m_pad, n_pad), lambda c: (0, 0)),
            ((m_pad, n_pad), lambda c: (0, 0)),
            ((n_pad, column_block), lambda c: (0, c)),
        ],
        ((n_pad, c_pad), values.dtype, (n_pad, column_block), lambda c: (0, c)),
    )
    return out[:, :n, :columns]


@functools.partial(jax.jit, static_argnames=("order", "hash_bits"))
def cumulate(read_codes, write_codes, values, *, read_mask, write_mask, order: str, hash_bits: int):
    """Same contract as :func:`yoso_jax.xla.cumulate`, on the Pallas kernels."""
    values = keep_rows(values.astype(acc_dtype(values.dtype)), write_mask)
    read_codes, write_codes = read_codes.astype(jnp.int32), write_codes.astype(jnp.int32)
    if order == "none":
        out = _unordered(read_codes, write_codes, values, hash_bits)
    elif order == "causal":
        out = _causal(read_codes, write_codes, values, hash_bits)
    else:
        flipped = _causal(jnp.flip(read_codes, -1), jnp.flip(write_codes, -1), jnp.flip(values, 1), hash_bits)
        out = jnp.flip(flipped, 1)
    return keep_rows(out / read_codes.shape[1], read_mask)


def lower_bound_tables(q_codes, k_codes, q, k, v, grad, query_mask, key_mask, *, causal, hash_bits):
    """The lower bound's table form on this backend's kernels: two cumulations of outer products
    (``pairwise.lower_bound_grads``), so the tables are built and read by ``_tables_kernel`` /
    ``_read_kernel`` (``_causal_kernel`` when causal)."""
    return pairwise.lower_bound_grads(
        q_codes, k_codes, q, k, v, grad, query_mask, key_mask, cumulate=cumulate, causal=causal, hash_bits=hash_bits
    )


# ``form="auto"`` takes the table form (linear in N, on the kernels); ``"pairs"`` is the shared dense one.
sampled_grads = pairwise.sampled_grads_on(lower_bound_tables)
expectation_forward = pairwise.expectation_forward
expectation_backward = pairwise.expectation_backward
