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
