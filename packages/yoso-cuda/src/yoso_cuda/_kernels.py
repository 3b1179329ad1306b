"""Which kernels exist: the .cu files shipped in ``kernels/`` and every template instantiation of each.

A *program* is one .cu file compiled by NVRTC into one module with all its instantiations (name
expressions). The build check (``python -m yoso_cuda.build``) compiles exactly these, so a template
that only some shapes reach is still compiled in CI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ._plans import TABLE_CONFIGS

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
HEADERS = ("common.cuh",)

# torch dtype name -> the kernels' element type (common.cuh).
ELEMENT_TYPES = {"float32": "float", "float16": "half_t", "bfloat16": "bf16_t"}

ORDERS = {"none": 0, "causal": 1, "anticausal": 2}
# Gaussian hashing: tau rounded up to a multiple of 4 (registers per thread).
TAU_PADS = (4, 8, 12, 16)
# Hadamard hashing: elements per lane, max(1, D' / 32) for D' <= 256.
HADAMARD_SLOTS = (1, 2, 4, 8)
# Cumulation: value channels per block (per lane).
CHANNEL_SLICES = (1, 2, 4)
# Pairwise kernels: (query tile, key tile); 32 when D + Dv <= 256, else 16.
TILES = ((32, 32), (16, 16))


@dataclass(frozen=True)
class Program:
    file: str
    names: tuple[str, ...]
    directory: Path = KERNEL_DIR  # tests compile programs of their own

    @property
    def path(self) -> Path:
        return self.directory / self.file


def _programs() -> dict[str, Program]:
    types = tuple(ELEMENT_TYPES.values())
    hashing = [f"hash_gaussian<{t}, {p}>" for t in types for p in TAU_PADS]
    hashing += [f"hash_hadamard<{t}, {e}>" for t in types for e in HADAMARD_SLOTS]
    cumulate = [f"cumulate_intra_masks<{o}>" for o in (ORDERS["causal"], ORDERS["anticausal"])]
    cumulate += [f"cumulate_scan<{t}, {c}, {o}>" for t in types for c in CHANNEL_SLICES for o in ORDERS.values()]
    cumulate += ["cumulate_sum_groups"]
    sampled = [f"sampled_grads_hash<{t}, {e}, {tile}>" for t in types for e in (0, 1) for tile, _ in TILES]
    # Every (TILE, DS) _plans.table_plan may choose, whatever the device's shared-memory budget.
    tables = [f"sampled_grads_tables<{t}, {tile}, {ds}>" for t in types for tile, ds in TABLE_CONFIGS]
    expectation = [f"expectation_forward<{t}, {a}, {b}>" for t in types for a, b in TILES]
    expectation += [
        f"expectation_{kind}<{t}, {e}, {a}, {b}>"
        for kind in ("dq", "dkv")
        for t in types
        for e in (0, 1)
        for a, b in TILES
    ]
    # Bucket-table primitives: the token dtype (values and outer, or the read's weights).
    bucket = [f"bucket_tables_{kind}<{t}>" for kind in ("sum", "walk") for t in types]
    bucket += ["read_buckets_plain"] + [f"read_buckets_weighted<{t}>" for t in types]
    return {
        "hashing": Program("hashing.cu", tuple(hashing)),
        "cumulate": Program("cumulate.cu", tuple(cumulate)),
        "sampled_grads": Program("sampled_grads.cu", tuple(sampled)),
        "sampled_tables": Program("sampled_tables.cu", tuple(tables)),
        "expectation": Program("expectation.cu", tuple(expectation)),
        "tables": Program("tables.cu", tuple(bucket)),
    }


PROGRAMS = _programs()
