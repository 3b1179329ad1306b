"""The ``cuda`` backend (entry point ``yoso.backends``): torch CUDA tensors through handwritten kernels.

torch arrives through yoso's torch glue (``yoso::core`` custom ops with autograd), so this class only
maps the primitives onto ``_ops``. CuPy arrays are not served: yoso-api has no CuPy glue, and a
backend cannot add one on its own; ``torch.from_dlpack`` turns a CuPy array into a tensor without a copy.
"""

from __future__ import annotations

from yoso.backends import Backend, Call

from . import __version__, _ops, _runtime


class CudaBackend(Backend):
    name = "cuda"
    priority = 30
    framework = "torch"
    frameworks = ("torch",)
    description = (
        "handwritten CUDA C++ kernels compiled at first use with NVRTC (cuda-bindings), torch CUDA tensors, "
        "sm_80+; CuPy arrays not served (no CuPy glue in yoso-api: use torch.from_dlpack)"
    )
    devices = ("cuda",)
    dtypes = ("float16", "bfloat16", "float32")
    max_hash_bits = _ops.MAX_HASH_BITS_TABLES  # sampled mode: bucket tables live in shared memory
    max_head_dim = _ops.MAX_DIM

    def availability(self) -> str | None:
        return _runtime.unavailable_reason()

    def version(self) -> str:
        return __version__

    def device_names(self) -> list[str]:
        return _runtime.device_names()

    def unsupported(self, call: Call) -> str | None:
        reason = super().unsupported(call)
        if reason is None and call.batch > _ops.MAX_GRID_YZ:
            limit = _ops.MAX_GRID_YZ
            reason = f"the 'cuda' backend does not support batch={call.batch} (at most {limit} flattened leading rows)"
        return reason

    def missing_features(self) -> list[str]:
        return super().missing_features() + [
            f"hash_bits > {_ops.MAX_HASH_BITS_TABLES} with mode='sample'",
            "CuPy arrays (convert with torch.from_dlpack)",
        ]

    # ---- primitives -------------------------------------------------------------------------------
    def hash_codes(self, x, planes, *, hashing, num_hashes, hash_bits):
        return _ops.hash_codes(x, planes, hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits)

    def cumulate(self, read_codes, write_codes, values, *, read_mask, write_mask, order, hash_bits):
        return _ops.cumulate(
            read_codes,
            write_codes,
            values,
            read_mask=read_mask,
            write_mask=write_mask,
            order=order,
            hash_bits=hash_bits,
        )

    def sampled_grads(
        self, q_codes, k_codes, q, k, v, grad, *, query_mask, key_mask, causal, hash_bits, backward, max_ratio
    ):
        return _ops.sampled_grads(
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
            max_ratio=max_ratio,
        )

    def expectation_forward(self, q, k, v, *, query_mask, key_mask, causal, hash_bits):
        return _ops.expectation_forward(
            q, k, v, query_mask=query_mask, key_mask=key_mask, causal=causal, hash_bits=hash_bits
        )

    def expectation_backward(self, q, k, v, grad, *, query_mask, key_mask, causal, hash_bits, backward, max_ratio):
        return _ops.expectation_backward(
            q,
            k,
            v,
            grad,
            query_mask=query_mask,
            key_mask=key_mask,
            causal=causal,
            hash_bits=hash_bits,
            backward=backward,
            max_ratio=max_ratio,
        )
