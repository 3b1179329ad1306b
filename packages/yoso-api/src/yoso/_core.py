"""The YOSO computation between the two normalisations, composed from a backend's primitives.

Framework-neutral: the arrays are whatever the backend computes on, and only backend primitives and
scalar arithmetic touch them, so the NumPy, torch and JAX glue all share this one composition.
``q`` and ``k`` here are already unit rows; masked rows of q, k, v are already zero.
"""

from __future__ import annotations

# The sampled true gradient weighs each colliding pair by the importance ratio p'/p, which diverges as
# the cosine -> 1 (and -> -1); it is clamped at MAX_RATIO_PER_BIT * hash_bits. The lower bound uses
# hash_bits / 2, and the ratio is >= 0.55 * hash_bits everywhere, so the clamp only acts within about
# 2 degrees of a perfect alignment. YOSO-E's exact gradient uses the same clamped p' = p * min(p'/p, clamp).
MAX_RATIO_PER_BIT = 10.0


def max_ratio(hash_bits: int) -> float:
    return MAX_RATIO_PER_BIT * hash_bits


def forward(backend, q, k, v, planes, query_mask, key_mask, *, mode, hashing, num_hashes, hash_bits, causal):
    """``(Y, codes)``: YOSO-m or YOSO-E before output normalisation; codes ``(q_codes, k_codes)`` or None."""
    if mode == "expectation":
        y = backend.expectation_forward(
            q, k, v, query_mask=query_mask, key_mask=key_mask, causal=causal, hash_bits=hash_bits
        )
        return y, None
    q_codes = backend.hash_codes(q, planes, hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits)
    k_codes = backend.hash_codes(k, planes, hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits)
    y = backend.cumulate(
        q_codes,
        k_codes,
        v,
        read_mask=query_mask,
        write_mask=key_mask,
        order="causal" if causal else "none",
        hash_bits=hash_bits,
    )
    return y, (q_codes, k_codes)


def backward(backend, q, k, v, codes, query_mask, key_mask, grad, *, mode, backward, hash_bits, causal):
    """``(dq, dk, dv)`` for the output gradient ``grad`` of :func:`forward` (w.r.t. unit q and k)."""
    clamp = max_ratio(hash_bits)
    if mode == "expectation":
        return backend.expectation_backward(
            q,
            k,
            v,
            grad,
            query_mask=query_mask,
            key_mask=key_mask,
            causal=causal,
            hash_bits=hash_bits,
            backward=backward,
            max_ratio=clamp,
        )
    q_codes, k_codes = codes
    # dV: the same cumulation with roles swapped -- keys read tables of output gradients built by the
    # queries; causally, key j collects from queries i >= j.
    dv = backend.cumulate(
        k_codes,
        q_codes,
        grad,
        read_mask=key_mask,
        write_mask=query_mask,
        order="anticausal" if causal else "none",
        hash_bits=hash_bits,
    )
    dq, dk = backend.sampled_grads(
        q_codes,
        k_codes,
        q,
        k,
        v,
        grad,
        query_mask=query_mask,
        key_mask=key_mask,
        causal=causal,
        hash_bits=hash_bits,
        backward=backward,
        max_ratio=clamp,
    )
    return dq, dk, dv


_chunk_backward = backward  # what backward_state adds to (its argument `backward` names the estimator)


def forward_state(
    backend,
    q,
    k,
    v,
    planes,
    query_mask,
    key_mask,
    tables,
    key_tables,
    *,
    hashing,
    num_hashes,
    hash_bits,
    with_key_tables: bool,
):
    """One causal chunk of YOSO-m continuing a carried state (docs/math.md#recurrent-state).

    ``tables [B, m, 2**tau, Dv]`` (None: the sequence starts here) are the bucket sums of every earlier
    key's value; ``key_tables [B, m, 2**tau, Dv, D]`` (or None) those of ``v_j (x) k_j``, needed only for the
    lower-bound gradient across chunks. Returns ``(Y, tables', key_tables', codes)``:

        Y        = cumulate(q_codes, k_codes, v, order="causal") + read_buckets(q_codes, tables)
        tables'  = tables + bucket_tables(k_codes, v)
        key_tables' = key_tables + bucket_tables(k_codes, v, outer=k)       (only if with_key_tables)
    """
    options = dict(hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits)
    q_codes = backend.hash_codes(q, planes, **options)
    k_codes = backend.hash_codes(k, planes, **options)
    new_tables = _add_tokens(backend, tables, k_codes, v, key_mask, hash_bits)
    if q.shape[1] == 1:
        # One token (decoding): it sees exactly the earlier keys and itself, i.e. the updated tables. Reading
        # them after the update (rather than the old ones before it) lets a framework update the tables in
        # place: XLA copies a donated buffer that is still read after an in-place write to it.
        y = backend.read_buckets(q_codes, new_tables, mask=query_mask)
    else:
        y = backend.cumulate(
            q_codes, k_codes, v, read_mask=query_mask, write_mask=key_mask, order="causal", hash_bits=hash_bits
        )
        if tables is not None:
            y = y + backend.read_buckets(q_codes, tables, mask=query_mask)
    new_key_tables = None
    if with_key_tables:
        new_key_tables = _add_tokens(backend, key_tables, k_codes, v, key_mask, hash_bits, outer=k)
    return y, new_tables, new_key_tables, (q_codes, k_codes)


def _add_tokens(backend, tables, codes, values, mask, hash_bits, outer=None):
    if tables is None:
        return backend.bucket_tables(codes, values, mask=mask, hash_bits=hash_bits, outer=outer)
    return backend.add_to_tables(tables, codes, values, mask=mask, hash_bits=hash_bits, outer=outer)


def backward_state(
    backend,
    q,
    k,
    v,
    codes,
    query_mask,
    key_mask,
    grad,
    grad_tables,
    grad_key_tables,
    key_tables,
    *,
    has_tables: bool,
    backward,
    hash_bits,
):
    """``(dq, dk, dv, d_tables, d_key_tables)`` of :func:`forward_state` (w.r.t. unit q and k).

    ``grad`` is the cotangent of ``Y``; ``grad_tables``, ``grad_key_tables`` those of the returned tables
    (None: zero); ``key_tables`` the *initial* key tables (None if the chunk had none). ``d_tables`` is None
    unless ``has_tables`` (initial tables were given), ``d_key_tables`` None unless ``key_tables`` is. With
    ``G`` the cotangent of ``Y`` and ``dT'``, ``dA'`` those of the new tables (docs/math.md#recurrent-state):

        dv += m * read_buckets(k_codes, dT')                      (T' = T + sum of the chunk's values)
        dk += m * read_buckets(k_codes, dA', weights=v)           (the lower bound's keys, surrogate: no dv)
        dq += (tau/2) * read_buckets(q_codes, A, weights=G)       (earlier keys, lower bound)
        dT  = bucket_tables(q_codes, G) / m + dT'
        dA  = (tau/2) / m * bucket_tables(q_codes, G, outer=q) + dA'
    """
    dq, dk, dv = _chunk_backward(
        backend,
        q,
        k,
        v,
        codes,
        query_mask,
        key_mask,
        grad,
        mode="sample",
        backward=backward,
        hash_bits=hash_bits,
        causal=True,
    )
    q_codes, k_codes = codes
    num_hashes = q_codes.shape[1]
    half = hash_bits / 2
    if grad_tables is not None:
        dv = dv + num_hashes * backend.read_buckets(k_codes, grad_tables, mask=key_mask)
    if grad_key_tables is not None:
        dk = dk + num_hashes * backend.read_buckets(k_codes, grad_key_tables, mask=key_mask, weights=v)
    if key_tables is not None:
        dq = dq + half * backend.read_buckets(q_codes, key_tables, mask=query_mask, weights=grad)
    d_tables = d_key_tables = None
    if has_tables:
        d_tables = backend.bucket_tables(q_codes, grad, mask=query_mask, hash_bits=hash_bits) / num_hashes
        if grad_tables is not None:
            d_tables = d_tables + grad_tables
    if key_tables is not None:
        d_key_tables = backend.bucket_tables(q_codes, grad, mask=query_mask, hash_bits=hash_bits, outer=q)
        d_key_tables = d_key_tables * (half / num_hashes)
        if grad_key_tables is not None:
            d_key_tables = d_key_tables + grad_key_tables
    return dq, dk, dv, d_tables, d_key_tables


def bucketed(n: int) -> int:
    """``n`` rounded up to one of four sizes per octave (16 at least): at most 19% padding.

    Serving NumPy arrays and torch tensors through a jit-compiling backend, the glue pads batch and
    sequence lengths to these sizes (padded rows masked), so that workloads whose shapes change every
    call -- dynamic padding in fine-tuning -- reuse a few compiled programs instead of compiling one per
    shape (docs/architecture.md#serving-other-frameworks).
    """
    if n <= 16:
        return 16
    step = 1 << max(0, (n - 1).bit_length() - 3)
    return -(-n // step) * step


class Padding:
    """Canonical arrays padded to :func:`bucketed` sizes, in any framework whose arrays slice like NumPy's.

    Padded rows are masked out -- queries and keys alike -- so the results are those of the unpadded
    call. ``full(like, shape, value)`` makes a new array on ``like``'s device, of ``like``'s dtype (bool
    for a bool ``value``).
    """

    QUERIES, KEYS = 1, 2

    def __init__(self, batch: int, n_query: int, n_key: int, *, full):
        self.sizes = (batch, n_query, n_key)
        self.padded = (bucketed(batch), bucketed(n_query), bucketed(n_key))
        self._full = full

    def _grow(self, x, shape, value, index):
        if tuple(x.shape) == tuple(shape):
            return x
        out = self._full(x, shape, value)
        out[index] = x
        return out

    def rows(self, x, which: int, value=0):
        """``x [B, N, ...]`` padded along the batch and along ``N`` of kind ``which`` (QUERIES or KEYS)."""
        if x is None:
            return None
        shape = (self.padded[0], self.padded[which]) + tuple(x.shape[2:])
        return self._grow(x, shape, value, (slice(0, x.shape[0]), slice(0, x.shape[1])))

    def mask(self, mask, which: int, like):
        """A ``[B, N]`` mask (None: all kept) padded with False, or None if nothing is padded or masked."""
        if mask is None and self.padded[0] == self.sizes[0] and self.padded[which] == self.sizes[which]:
            return None
        if mask is None:
            mask = self._full(like, (self.sizes[0], self.sizes[which]), True)
        return self.rows(mask, which, value=False)

    def codes(self, codes, which: int):
        """Codes ``[B, m, N]``, padded along the batch and their last axis (the tokens there are masked)."""
        shape = (self.padded[0], codes.shape[1], self.padded[which])
        return self._grow(codes, shape, 0, (slice(0, codes.shape[0]), slice(None), slice(0, codes.shape[2])))

    def planes(self, planes):
        """Per-row planes ``[B, ...]`` get rows of ones for the padded batch rows (valid hash functions of
        either family; those rows are masked)."""
        if planes is None or planes.shape[0] == 1 or self.padded[0] == self.sizes[0]:
            return planes
        return self._grow(planes, (self.padded[0],) + tuple(planes.shape[1:]), 1, slice(0, self.sizes[0]))

    def cut(self, x, which: int, axis: int = 1):
        """The unpadded part of a result: batch rows, and ``N`` of kind ``which`` along ``axis``."""
        index = [slice(0, self.sizes[0])] + [slice(None)] * (axis - 1) + [slice(0, self.sizes[which])]
        return x[tuple(index)]


def pad_tokens(x, n: int, full, value=0):
    """``x [B, N, ...]`` (or None) grown along ``N`` to ``n`` tokens holding ``value``.

    Serving a jit-compiling backend, a stateful call pads only the tokens to :func:`bucketed` sizes: its
    batch is fixed by the state, and a decoding loop repeats one shape anyway.
    """
    if x is None:
        return None
    if x.shape[1] == n:
        return x
    out = full(x, (x.shape[0], n) + tuple(x.shape[2:]), value)
    out[:, : x.shape[1]] = x
    return out


def pad_token_mask(mask, like, n: int, full):
    """A ``[B, N]`` mask (None: all kept) padded with False to ``n`` tokens; None when nothing is padded."""
    if like.shape[1] == n:
        return mask
    if mask is None:
        mask = full(like, (like.shape[0], like.shape[1]), True)
    return pad_tokens(mask, n, full, False)
