"""yoso_reference: every formula of YOSO attention in plain, vectorised NumPy.

This package is the oracle the other backends are tested against. It favours clarity over speed,
but stays linear in sequence length in the forward (hashing, cumulation) and never holds a full
N x N matrix (YOSO-E and the sampled gradients' pair form go over collision counts in chunks of
queries; the lower bound's table form is linear in N).

It computes in the input dtype (float16 is promoted to float32) and accepts float64; sums over
tokens accumulate in float64.

Modules:
  hashing      -- Gaussian SimHash and Hadamard fast-hash codes
  probability  -- collision probability, its clamped derivative, the lower bound, triple collisions
  cumulation   -- the LSH cumulation (forward and roles-swapped) in table form
  pairwise     -- YOSO-E forward/backward and the sampled gradients (lower bound, true), pair form
  tables       -- the lower bound's table form (per-bucket tables of outer products) and both forms' costs
  attention    -- the whole forward and its full gradient (the oracle), unit rows with their VJP
  backend      -- the adapter that exposes all this to ``yoso`` as the ``reference`` backend
"""

from .attention import attention, attention_and_grads, nonzero_rows, row_norms, unit_rows, unit_rows_vjp
from .cumulation import ORDERS, bucket_tables, cumulate, read_buckets
from .hashing import (
    gaussian_codes,
    hadamard_codes,
    hadamard_rotate,
    hash_codes,
    hashes_per_rotation,
    num_rotations,
    padded_dim,
    sylvester_hadamard,
)
from .pairwise import (
    attention_mask,
    collision_matrix,
    expectation_backward,
    expectation_forward,
    sampled_grads,
)
from .probability import (
    collision_derivative,
    collision_probability,
    importance_ratio,
    lower_bound_derivative,
    triple_collision_probability,
)
from .tables import lower_bound_costs, lower_bound_tables

__version__ = "0.1.0"

__all__ = [
    "ORDERS",
    "attention",
    "attention_and_grads",
    "attention_mask",
    "bucket_tables",
    "collision_derivative",
    "collision_matrix",
    "collision_probability",
    "cumulate",
    "expectation_backward",
    "expectation_forward",
    "gaussian_codes",
    "hadamard_codes",
    "hadamard_rotate",
    "hash_codes",
    "hashes_per_rotation",
    "importance_ratio",
    "lower_bound_costs",
    "lower_bound_derivative",
    "lower_bound_tables",
    "nonzero_rows",
    "num_rotations",
    "padded_dim",
    "read_buckets",
    "row_norms",
    "sampled_grads",
    "sylvester_hadamard",
    "triple_collision_probability",
    "unit_rows",
    "unit_rows_vjp",
]
