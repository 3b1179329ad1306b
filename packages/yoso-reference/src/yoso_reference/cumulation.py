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
