"""The ``@triton.jit`` kernels, apart from the wrappers that launch them (``yoso_triton.launch``).

Importing this package imports triton, which decides here, once, whether kernels compile for the GPU
or run in its interpreter: ``TRITON_INTERPRET=1`` must be set before this import.
"""

from ._common import INTERPRET
from .buckets import bucket_gather_kernel, bucket_sums_kernel
from .expectation import expectation_dkdv_kernel, expectation_dq_kernel, expectation_forward_kernel
from .hashing import gaussian_codes_kernel, hadamard_codes_kernel
from .pairs import bucket_pair_grads_kernel
from .sorting import bucket_histogram_kernel, bucket_reader_index_kernel, bucket_scatter_kernel
from .state import add_tokens_kernel, outer_table_sums_kernel, table_reads_kernel, table_sums_kernel
from .tables import bucket_table_grads_kernel

__all__ = [
    "INTERPRET",
    "add_tokens_kernel",
    "bucket_gather_kernel",
    "bucket_histogram_kernel",
    "bucket_pair_grads_kernel",
    "bucket_reader_index_kernel",
    "bucket_scatter_kernel",
    "bucket_sums_kernel",
    "bucket_table_grads_kernel",
    "expectation_dkdv_kernel",
    "expectation_dq_kernel",
    "expectation_forward_kernel",
    "gaussian_codes_kernel",
    "hadamard_codes_kernel",
    "outer_table_sums_kernel",
    "table_reads_kernel",
    "table_sums_kernel",
]
