"""The ``triton`` backend: yoso_triton's kernels exposed to ``yoso`` (entry point ``yoso.backends``).

Nothing heavy is imported here: ``availability()`` imports torch and triton, and the primitives are
the functions of ``yoso_triton.launch`` (``Backend.module``), imported on first use. Arguments reach
them already checked by the API (``yoso._validate.prepare``); what this backend cannot run although
the API allows it is refused here, in :meth:`TritonBackend.unsupported`, before anything runs.

Triton reads ``TRITON_INTERPRET`` when the kernels are imported: with ``TRITON_INTERPRET=1`` the
backend runs CPU tensors in Triton's interpreter (slow; for tests on machines without a GPU),
otherwise it runs CUDA tensors. This module reads it when yoso loads the backend, and ``launch``
refuses to load if the variable has changed since.

Outputs: the forward primitives (cumulation, YOSO-E forward) return float32, the accumulation dtype
the API's glue normalises in (a half-precision Y would add one rounding before normalisation); the
gradient primitives return the input dtype. Accumulation is fp32 (fixed-point int64 where partial
sums of several hashes meet), so results are bitwise reproducible run to run.
"""

from __future__ import annotations

import os

from yoso.backends import Backend, Call

from . import __version__

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Scratch for one hash's bucket tables / prefix sums and sort indices. Larger problems run hashes in
# groups (launch.GROUP_BYTES); a single hash that needs more is refused. YOSO_TRITON_MAX_TABLE_BYTES overrides.
DEFAULT_MAX_TABLE_BYTES = 4 << 30
TABLE_BYTES_VAR = "YOSO_TRITON_MAX_TABLE_BYTES"
# Grid dims y and z of a CUDA launch. Hash groups are capped at it; hashing puts cdiv(m, HB) programs
# on grid y with HB >= 16 hashes each, which bounds num_hashes.
MAX_GRID_YZ = 65535
MAX_NUM_HASHES = 16 * MAX_GRID_YZ
# Sorted token indices (b * N + n) and bucket ids (b * 2**tau + code) are int32.
MAX_INDEX = 2**31 - 1


def max_table_bytes() -> int:
    value = os.environ.get(TABLE_BYTES_VAR)
    if value is None:
        return DEFAULT_MAX_TABLE_BYTES
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"{TABLE_BYTES_VAR} must be an integer number of bytes, got {value!r}") from None
    if limit < 1:  # a budget of no bytes would quietly refuse every sampled call: a mistake, said as one
        raise ValueError(f"{TABLE_BYTES_VAR} must be a positive number of bytes, got {value!r}")
    return limit


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def table_bytes(batch: int, hash_bits: int, n_tokens: int, channels: int, *, prefix: bool = False) -> int:
    """Scratch bytes one hash needs: bucket offsets and histograms, sort indices (or radix keys) and
    tables or prefix sums (float32). ``prefix``: the ordered cumulations keep a prefix sum per token,
    as does any cumulation with more buckets than tokens."""
    buckets = batch << hash_bits
    rows = buckets if (1 << hash_bits) <= n_tokens and not prefix else batch * n_tokens
    histograms = 4 * buckets * -(-n_tokens // 128) if (1 << hash_bits) <= 1024 else 0
    return 8 * (buckets + 1) + histograms + 24 * batch * n_tokens + 4 * rows * channels


class TritonBackend(Backend):
    name = "triton"
    priority = 20
    framework = "torch"
    frameworks = ("torch",)
    description = (
        "Triton kernels on torch tensors: bucket-sorted YOSO-m, fused YOSO-E (CUDA; CPU via TRITON_INTERPRET=1)"
    )
    dtypes = ("float16", "bfloat16", "float32")
    devices = ("cpu",) if INTERPRET else ("cuda",)
    max_head_dim = 256
    module = "yoso_triton.launch"
    # Both forms of the lower-bound gradient; form="auto" chooses per bucket (launch.sampled_grads).
    lower_bound_forms = ("pairs", "tables")
    # bucket_tables / read_buckets / add_to_tables (kernels/state.py): docs/math.md#bucket-tables
    has_tables = True
    interpret = INTERPRET

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
        if reason is not None:
            if call.device == "cpu" and not self.interpret:
                reason += (
                    "; it runs CPU tensors only in Triton's interpreter: "
                    "set TRITON_INTERPRET=1 before the first yoso call"
                )
            return reason
        if call.mode != "sample":
            return None  # YOSO-E is tiled over (query, key) blocks: no scratch beyond the outputs
        # Sample mode cumulates values (Dv channels) written by the keys and, in the backward, output
        # gradients (Dv channels) written by the queries; the sampled gradients sort both sides, and even
        # the forward keeps per-reader indices. Table sizes grow with the tokens and channels, so the
        # larger side bounds every launch (forward-only calls included: readers cost scratch too).
        b, tau, n = call.batch, call.hash_bits, max(call.n_query, call.n_key)
        need, limit = table_bytes(b, tau, n, call.value_dim, prefix=call.causal), max_table_bytes()
        missing = []
        if need > limit:
            missing.append(
                f"hash_bits={tau} with batch={b}, N={n}, Dv={call.value_dim}: its bucket tables need "
                f"{_size(need)} per hash, more than {_size(limit)} ({TABLE_BYTES_VAR}); "
                "lower hash_bits or split the batch"
            )
        if b << tau > MAX_INDEX:
            missing.append(f"hash_bits={tau} with batch={b} (batch * 2**hash_bits bucket ids must fit int32)")
        if b * n > MAX_INDEX:
            missing.append(f"batch={b} with N={n} (batch * N token indices must fit int32)")
        if call.num_hashes > MAX_NUM_HASHES:
            missing.append(f"num_hashes={call.num_hashes} (at most {MAX_NUM_HASHES}, a CUDA grid limit)")
        return f"the 'triton' backend does not support {'; '.join(missing)}" if missing else None

    def missing_features(self) -> list[str]:
        limit = max_table_bytes()
        return super().missing_features() + [
            f"mode='sample' with bucket tables over {_size(limit)} per hash "
            f"(about batch * min(2**hash_bits, N) * Dv * 4 bytes; {TABLE_BYTES_VAR})",
            "mode='sample' with batch * 2**hash_bits or batch * N over 2**31 - 1",
            f"mode='sample' with num_hashes > {MAX_NUM_HASHES}",
        ]
