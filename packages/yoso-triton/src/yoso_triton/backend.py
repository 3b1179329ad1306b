"""The ``triton`` backend: yoso_triton's kernels exposed to ``yoso`` (entry point ``yoso.backends``).

Nothing heavy is imported here at module level: ``availability()`` imports torch and triton, and
the kernels (``launch``) are imported on first use. Triton reads ``TRITON_INTERPRET`` when the kernels
are imported: with ``TRITON_INTERPRET=1`` the backend runs CPU tensors in Triton's interpreter (slow;
for tests on machines without a GPU), otherwise it runs CUDA tensors.

Outputs: the forward primitives (cumulation, YOSO-E forward) return float32, the accumulation dtype
the API's glue normalises in (a half-precision Y would add one rounding before normalisation); the
gradient primitives return the input dtype. Accumulation is fp32 (fixed-point int64 where partial
sums of several hashes meet), so results are bitwise reproducible run to run.
"""

from __future__ import annotations

import os

from yoso.backends import Backend, Call

from . import __version__


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(Backend):
    name = "triton"
    priority = 20
    framework = "torch"
    frameworks = ("torch",)
    description = (
        "Triton kernels on torch tensors: bucket-sorted YOSO-m, fused YOSO-E (CUDA; CPU via TRITON_INTERPRET=1)"
    )
    dtypes = ("float16", "bfloat16", "float32")
    devices = ("cuda",)
    max_head_dim = 256

    def __init__(self) -> None:
        # Decided once, like Triton itself decides when the kernels are imported.
        self.interpret = _interpreting()
        self.devices = ("cpu",) if self.interpret else ("cuda",)

    def _launch(self):
        from . import launch

        if launch.INTERPRET != self.interpret:
            raise RuntimeError(
                "TRITON_INTERPRET changed after yoso_triton was loaded; set it before the first yoso call"
            )
        return launch

    def availability(self) -> str | None:
        try:
            import torch
            import triton  # noqa: F401
        except ImportError as exc:
            return f"needs torch and triton ({exc})"
        if self.interpret:
            return None
        if not torch.cuda.is_available():
            return (
                f"no CUDA GPU visible to torch {torch.__version__}; on the CPU it runs only in Triton's "
                "interpreter (set TRITON_INTERPRET=1 before the first yoso call; slow, for tests)"
            )
        return None

    def version(self) -> str:
        try:
            import triton

            return f"{__version__} (triton {triton.__version__}{', interpreter' if self.interpret else ''})"
        except ImportError:
            return __version__

    def device_names(self) -> list[str]:
        if self.interpret:
            return ["cpu (Triton interpreter, TRITON_INTERPRET=1)"]
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]

    def unsupported(self, call: Call) -> str | None:
        reason = super().unsupported(call)
        if reason is not None or call.mode != "sample":
            return reason
        from .launch import max_table_bytes, table_bytes

        need = table_bytes(call.batch, call.hash_bits, max(call.n_query, call.n_key), call.value_dim)
        if need > max_table_bytes():
            return (
                f"the 'triton' backend does not support hash_bits={call.hash_bits} for {call.batch} batch rows: "
                f"its bucket tables need {need / 2**30:.2f} GiB per hash (YOSO_TRITON_MAX_TABLE_BYTES)"
            )
        return None

    # ---- primitives (yoso.backends.Backend documents them) --------------------------------------

    def hash_codes(self, x, planes, *, hashing, num_hashes, hash_bits):
        return self._launch().hash_codes(x, planes, hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits)

    def cumulate(self, read_codes, write_codes, values, *, read_mask, write_mask, order, hash_bits):
        return self._launch().cumulate(
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
        return self._launch().sampled_grads(
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
        return self._launch().expectation_forward(
            q, k, v, query_mask=query_mask, key_mask=key_mask, causal=causal, hash_bits=hash_bits
        )

    def expectation_backward(self, q, k, v, grad, *, query_mask, key_mask, causal, hash_bits, backward, max_ratio):
        return self._launch().expectation_backward(
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
