"""LSH cumulation: the table form of YOSO-m, linear in sequence length.

For hash ``s`` the table ``T_s[b] = sum_{w: h_s(w) = b} mask_w * values_w`` is read by every reader
``r`` at ``T_s[h_s(r)]``; the result is the mean over the ``m`` hashes. The same routine serves the
forward (readers = queries, writers = keys) and the roles-swapped cumulation of the backward
(readers = keys, writers = queries, values = output gradients).

``order`` restricts which writers a reader sees, by sequence position:

* ``"none"``       -- all writers;
* ``"causal"``     -- writers at positions ``<= `` the reader's (the causal forward);
* ``"anticausal"`` -- writers at positions ``>=`` the reader's (the causal backward, roles swapped).

Instead of materialising ``2^tau`` tables per hash, writers are sorted by (bucket, position); a
reader's tokens are then one contiguous run of that order, found by binary search, and summed as a
difference of prefix sums (accumulated in float64, so long runs lose nothing). That handles all three
orders with one piece of code and needs no Python loop over tokens.

The gradient estimators that weight each colliding pair (the lower bound's ``A_s``/``B_s`` tables,
the sampled true gradient) live in ``pairwise``: written densely over collision counts they are the
plainest statement of the math, and BLAS makes them fast enough for an oracle.
"""

from __future__ import annotations

import numpy as np

ORDERS = ("none", "causal", "anticausal")


def _accumulate_dtype(dtype: np.dtype) -> np.dtype:
    return np.result_type(dtype, np.float32)


def _reader_ranges(read_codes: np.ndarray, write_codes: np.ndarray, order: str, num_buckets: int):
    """For one hash: the writer permutation and each reader's ``[start, stop)`` run in it.

    ``read_codes [B, Nr]``, ``write_codes [B, Nw]``; returns ``perm [B*Nw]`` (into the flattened
    writers) and ``start, stop [B, Nr]`` (into the sorted order).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    batch, n_read = read_codes.shape
    n_write = write_codes.shape[1]
    stride = n_write + 1  # one slot per position, so (group, position) packs into one integer
    batch_offset = np.arange(batch, dtype=np.int64)[:, None] * num_buckets
    write_key = ((batch_offset + write_codes) * stride + np.arange(n_write)).ravel()
    perm = np.argsort(write_key, kind="stable")
    sorted_key = write_key[perm]

    group_start = (batch_offset + read_codes) * stride  # first key of the reader's bucket
    group_end = group_start + n_write  # last possible key of the bucket
    position = np.arange(n_read, dtype=np.int64)
    if order == "none":
        start = np.searchsorted(sorted_key, group_start, side="left")
        stop = np.searchsorted(sorted_key, group_end, side="right")
    elif order == "causal":
        start = np.searchsorted(sorted_key, group_start, side="left")
        stop = np.searchsorted(sorted_key, group_start + position, side="right")
    else:  # anticausal
        start = np.searchsorted(sorted_key, group_start + position, side="left")
        stop = np.searchsorted(sorted_key, group_end, side="right")
    return perm, start, stop


def _run_sums(values: np.ndarray, perm: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """Sum ``values [B, Nw, C]`` over each reader's run -> ``[B, Nr, C]`` (float64)."""
    batch, n_write, channels = values.shape
    flat = values.reshape(batch * n_write, channels)[perm]
    prefix = np.zeros((flat.shape[0] + 1, channels), dtype=np.float64)
    np.cumsum(flat, axis=0, dtype=np.float64, out=prefix[1:])
    return prefix[stop] - prefix[start]


def _masked(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    # `where`, not multiplication: a masked row's content (even inf or NaN) must not reach any sum.
    return values if mask is None else np.where(mask[..., None], values, 0)


def cumulate(
    read_codes: np.ndarray,
    write_codes: np.ndarray,
    values: np.ndarray,
    *,
    read_mask: np.ndarray | None = None,
    write_mask: np.ndarray | None = None,
    order: str = "none",
    hash_bits: int,
) -> np.ndarray:
    """``out_r = (1/m) sum_s sum_w [h_s(r) = h_s(w)] write_mask_w values_w`` (0 where ``read_mask`` is False).

    Shapes: codes ``[B, m, Nr]`` and ``[B, m, Nw]``, values ``[B, Nw, C]``, masks ``[B, N]`` bool;
    returns ``[B, Nr, C]`` in the values' (at least float32) dtype.
    """
    out = _mean_bucket_sums(read_codes, write_codes, _masked(values, write_mask), order, hash_bits)
    return _masked(out, read_mask).astype(_accumulate_dtype(values.dtype))


def _mean_bucket_sums(read_codes, write_codes, values, order, hash_bits) -> np.ndarray:
    """The unmasked cumulation in float64."""
    num_hashes = read_codes.shape[1]
    out = np.zeros(read_codes.shape[:1] + read_codes.shape[2:] + values.shape[2:], dtype=np.float64)
    for s in range(num_hashes):  # one pass per hash; each pass is vectorised over tokens and batch
        perm, start, stop = _reader_ranges(read_codes[:, s], write_codes[:, s], order, 1 << hash_bits)
        out += _run_sums(values, perm, start, stop)
    return out / num_hashes


def bucket_tables(
    codes: np.ndarray,
    values: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    hash_bits: int,
    outer: np.ndarray | None = None,
) -> np.ndarray:
    """The bucket tables themselves: ``T[b, s, c] = sum_{n: codes[b, s, n] = c} mask[b, n] values[b, n]``.

    ``codes [B, m, N]``, ``values [B, N, C]`` -> ``[B, m, 2**hash_bits, C]``; with ``outer [B, N, F]``
    every token adds the outer product ``values[b, n] (x) outer[b, n]`` -> ``[B, m, 2**hash_bits, C, F]``
    (the lower bound's ``A_s[b] = sum_j v_j k_j^T``). These are the recurrent state of causal YOSO-m and
    what processes holding parts of one sequence add up; reading them back is :func:`read_buckets`, and
    ``read_buckets(r, bucket_tables(w, values))`` is ``cumulate(r, w, values, order="none")``.
    """
    batch, num_hashes, n = codes.shape
    tokens = _masked(values, mask).astype(np.float64)
    if outer is not None:
        tokens = tokens[..., :, None] * _masked(outer, mask).astype(np.float64)[..., None, :]
    tables = np.zeros((batch, num_hashes, 1 << hash_bits) + tokens.shape[2:], dtype=np.float64)
    rows = np.arange(batch)[:, None]
    for s in range(num_hashes):
        np.add.at(tables[:, s], (rows, codes[:, s]), tokens)  # unbuffered: repeated buckets add up
    return tables.astype(_accumulate_dtype(values.dtype))


def read_buckets(
    codes: np.ndarray, tables: np.ndarray, *, mask: np.ndarray | None = None, weights: np.ndarray | None = None
) -> np.ndarray:
    """``(1/m) sum_s tables[b, s, codes[b, s, n]]`` -> ``[B, N, C]``, zero rows where ``mask`` is False.

    With ``weights [B, N, C]`` (and tables of outer products ``[B, m, 2**tau, C, F]``) each row read is
    contracted with the token's weights: ``(1/m) sum_s sum_c weights[b, n, c] tables[b, s, h, c]`` -> ``[B, N, F]``
    (the lower bound's ``G_i^T A_s[h_s(q_i)]``).
    """
    batch, num_hashes, n = codes.shape
    read = tables[np.arange(batch)[:, None, None], np.arange(num_hashes)[None, :, None], codes]  # [B, m, N, ...]
    read = read.astype(np.float64).mean(axis=1)
    if weights is not None:
        read = np.einsum("bnc,bncf->bnf", weights.astype(np.float64), read)
    return _masked(read, mask).astype(tables.dtype)
