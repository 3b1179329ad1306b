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
