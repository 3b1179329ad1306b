"""The ``cuda`` backend (entry point ``yoso.backends``): torch CUDA tensors through handwritten kernels.

torch arrives through yoso's torch glue (``yoso::core`` custom ops with autograd); the primitives are
the functions of ``yoso_cuda._ops`` (``Backend.module``), imported on first use. Arguments reach them
already checked by the API; what the kernels cannot run although the API allows it is refused here,
in :meth:`CudaBackend.unsupported`, before anything runs. CuPy arrays are not served: yoso-api has no
CuPy glue, and a backend cannot add one on its own; ``torch.from_dlpack`` turns a CuPy array into a
tensor without a copy.
"""

from __future__ import annotations

from yoso.backends import Backend, Call

from . import __version__, _plans, _runtime

# Sampled mode: a cumulation block keeps its hashes' bucket tables (2**tau floats per hash and value
# channel) in shared memory. At tau = 12 one table is 16 KiB and a 96 KiB block (_plans.SMEM_BUDGET)
# still holds five; beyond, the hashes split into so many groups that their partial outputs cost more
# than the tables save. Hashing alone would take tau <= 16 (expectation mode has no tables).
MAX_HASH_BITS = 12
# Every kernel puts the batch row on grid dim y or z, and the ordered cumulation and the Hadamard
# rotations put hashes (or fewer) on grid y: CUDA allows 65535 blocks there.
MAX_GRID_YZ = 65535


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
    max_hash_bits = MAX_HASH_BITS  # the base class applies it to mode='sample' only
    max_head_dim = 256  # D and Dv: tiles hold whole rows in shared memory; Hadamard D' <= 256 in registers
    module = "yoso_cuda._ops"
    # sampled_grads(form="auto") takes, per bucket, whichever costs less: the colliding pairs
    # (sampled_grads.cu) or the bucket's D x Dv tables (sampled_tables.cu, the lower bound only).
    lower_bound_forms = ("pairs", "tables")
    # bucket_tables / read_buckets / add_to_tables (kernels/tables.cu; docs/math.md#bucket-tables): the
    # recurrent state and sequence parallelism. Within the limits above every call has a plan: grids of
    # (2^tau C F / 256, m, B) and (N C / 256, B) blocks, no shared memory, 64-bit offsets.
    has_tables = True

    def availability(self) -> str | None:
        return _runtime.unavailable_reason()

    def version(self) -> str:
        return __version__

    def device_names(self) -> list[str]:
        return _runtime.device_names()

    def unsupported(self, call: Call) -> str | None:
        reason = super().unsupported(call)
        if reason is not None:
            return reason
        missing = []
        if call.batch > MAX_GRID_YZ:
            missing.append(f"batch={call.batch} (at most {MAX_GRID_YZ} flattened leading rows, a CUDA grid limit)")
        if call.mode == "sample" and call.num_hashes > MAX_GRID_YZ:
            missing.append(f"num_hashes={call.num_hashes} (at most {MAX_GRID_YZ}, a CUDA grid limit)")
        if call.mode == "sample" and call.requires_grad and call.backward == "lower_bound":
            # The table form (sampled_tables.cu) holds a Dv x DS table and tiles of Dv-wide rows in shared
            # memory. Within D, Dv <= 256 a plan always fits (tests/test_limits.py); this is the guard
            # should the limits change. Its grid (2^tau, 2 ceil(D / DS) <= 32, batch) is within CUDA's
            # by the hash_bits and batch limits above.
            if _plans.table_plan(call.dim, call.value_dim) is None:
                missing.append(
                    f"head dims D={call.dim}, Dv={call.value_dim} with backward='lower_bound' (the table-form "
                    f"gradient's tiles need more than {_plans.SMEM_BUDGET} bytes of shared memory)"
                )
        return f"the 'cuda' backend does not support {'; '.join(missing)}" if missing else None

    def missing_features(self) -> list[str]:
        return super().missing_features() + [
            f"more than {MAX_GRID_YZ} flattened leading rows (batch * heads)",
            f"num_hashes > {MAX_GRID_YZ} with mode='sample'",
            "CuPy arrays (convert with torch.from_dlpack)",
        ]
