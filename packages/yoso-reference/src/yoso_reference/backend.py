"""The ``reference`` backend: yoso_reference exposed to ``yoso`` (entry point ``yoso.backends``).

Only ``yoso`` loads this module, so it may import ``yoso``; the math modules never do, and stay
usable on their own. NumPy arrays are served directly; CPU torch tensors through the API's torch
glue, which converts at the boundary (bfloat16 computes in float32).
"""

from __future__ import annotations

from yoso.backends import Backend

from . import __version__
from .cumulation import cumulate
from .hashing import hash_codes
from .pairwise import expectation_backward, expectation_forward, sampled_grads


class ReferenceBackend(Backend):
    name = "reference"
    priority = 0  # the oracle: correct everywhere, fastest nowhere
    framework = "numpy"
    frameworks = ("numpy", "torch")
    description = "plain vectorised NumPy; the oracle every other backend is tested against"
    devices = ("cpu",)

    def version(self) -> str:
        return __version__

    def hash_codes(self, x, planes, *, hashing, num_hashes, hash_bits):
        return hash_codes(x, planes, hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits)

    def cumulate(self, read_codes, write_codes, values, *, read_mask, write_mask, order, hash_bits):
        return cumulate(
            read_codes,
            write_codes,
            values,
            read_mask=read_mask,
            write_mask=write_mask,
            order=order,
            hash_bits=hash_bits,
        )

    def sampled_grads(
        self, q_codes, k_codes, q, k, v, grad, *, query_mask, key_mask, causal, hash_bits, estimator, max_ratio
    ):
        return sampled_grads(
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
            estimator=estimator,
            max_ratio=max_ratio,
        )

    def expectation_forward(self, q, k, v, *, query_mask, key_mask, causal, hash_bits):
        return expectation_forward(
            q, k, v, query_mask=query_mask, key_mask=key_mask, causal=causal, hash_bits=hash_bits
        )

    def expectation_backward(self, q, k, v, grad, *, query_mask, key_mask, causal, hash_bits, gradient, max_ratio):
        return expectation_backward(
            q,
            k,
            v,
            grad,
            query_mask=query_mask,
            key_mask=key_mask,
            causal=causal,
            hash_bits=hash_bits,
            gradient=gradient,
            max_ratio=max_ratio,
        )
