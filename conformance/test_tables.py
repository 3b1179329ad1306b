"""Kernel level: the bucket tables as arrays (``bucket_tables`` / ``read_buckets``) equal the oracle's.

They are what a recurrent state carries between calls and what processes holding parts of one sequence
add up (docs/math.md#bucket-tables). Backends without them (``Backend.has_tables`` False) are skipped
with the reason; the API refuses calls that need them on such a backend.
"""

from __future__ import annotations

import numpy as np
import pytest

import yoso_reference as ref
from harness import assert_close, random_mask, to_numpy

SHAPES = [
    # batch, n_read, n_write, channels, outer, num_hashes, hash_bits
    (1, 1, 1, 1, 1, 1, 1),
    (2, 7, 9, 5, 3, 4, 3),
    (3, 63, 40, 16, 8, 6, 6),
    (1, 129, 130, 17, 33, 3, 8),
]


@pytest.fixture
def tables_kernel(kernel):
    if not kernel.backend.has_tables:
        pytest.skip(f"the {kernel.name!r} backend has no bucket_tables/read_buckets (has_tables is False)")
    return kernel


def _problem(rng, shape):
    batch, n_read, n_write, channels, outer, m, tau = shape
    return dict(
        read_codes=rng.integers(0, 2**tau, (batch, m, n_read)),
        write_codes=rng.integers(0, 2**tau, (batch, m, n_write)),
        values=rng.standard_normal((batch, n_write, channels)),
        outer=rng.standard_normal((batch, n_write, outer)),
        weights=rng.standard_normal((batch, n_read, channels)),
        read_mask=random_mask(rng, (batch, n_read)),
        write_mask=random_mask(rng, (batch, n_write)),
        hash_bits=tau,
    )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_outer", [False, True], ids=["plain", "outer"])
def test_tables_and_reads_match_the_oracle(tables_kernel, rng, shape, with_outer):
    kernel, pb = tables_kernel, _problem(rng, shape)
    nat = {n: kernel.array(x) if isinstance(x, np.ndarray) else x for n, x in pb.items()}
    exp = {n: to_numpy(nat[n]) if isinstance(x, np.ndarray) and x.dtype == np.float64 else x for n, x in pb.items()}
    outer = (nat["outer"], exp["outer"]) if with_outer else (None, None)
    got = kernel.backend.bucket_tables(
        nat["write_codes"], nat["values"], mask=nat["write_mask"], hash_bits=pb["hash_bits"], outer=outer[0]
    )
    want = ref.bucket_tables(
        exp["write_codes"], exp["values"], mask=exp["write_mask"], hash_bits=pb["hash_bits"], outer=outer[1]
    )
    assert_close(to_numpy(got), want, kernel.dtype, "bucket_tables")
    weights = (nat["weights"], exp["weights"]) if with_outer else (None, None)
    read = kernel.backend.read_buckets(nat["read_codes"], got, mask=nat["read_mask"], weights=weights[0])
    want_read = ref.read_buckets(exp["read_codes"], want, mask=exp["read_mask"], weights=weights[1])
    assert_close(to_numpy(read), want_read, kernel.dtype, "read_buckets")
    assert (to_numpy(read)[~pb["read_mask"]] == 0).all(), "masked readers must be exact zeros"


def test_reading_tables_is_the_unordered_cumulation(tables_kernel, rng):
    """``read_buckets(r, bucket_tables(w, v))`` is ``cumulate(r, w, v, order="none")``: the table form."""
    kernel, pb = tables_kernel, _problem(rng, (2, 30, 25, 6, 1, 5, 3))
    nat = {n: kernel.array(x) if isinstance(x, np.ndarray) else x for n, x in pb.items()}
    tables = kernel.backend.bucket_tables(nat["write_codes"], nat["values"], mask=nat["write_mask"], hash_bits=3)
    read = kernel.backend.read_buckets(nat["read_codes"], tables, mask=nat["read_mask"])
    cumulated = kernel.backend.cumulate(
        nat["read_codes"],
        nat["write_codes"],
        nat["values"],
        read_mask=nat["read_mask"],
        write_mask=nat["write_mask"],
        order="none",
        hash_bits=3,
    )
    assert_close(to_numpy(read), to_numpy(cumulated), kernel.dtype, "tables vs cumulation")


def test_tables_of_split_writers_add_up(tables_kernel, rng):
    """Tables are sums: the tables of two halves of the writers add up to those of all of them (what a
    carried state and a split sequence rely on)."""
    kernel, pb = tables_kernel, _problem(rng, (2, 10, 24, 4, 1, 3, 2))
    nat = {n: kernel.array(x) if isinstance(x, np.ndarray) else x for n, x in pb.items()}
    whole = kernel.backend.bucket_tables(nat["write_codes"], nat["values"], mask=nat["write_mask"], hash_bits=2)
    halves = [
        kernel.backend.bucket_tables(
            kernel.array(pb["write_codes"][:, :, part]),
            kernel.array(pb["values"][:, part]),
            mask=kernel.array(pb["write_mask"][:, part]),
            hash_bits=2,
        )
        for part in (slice(0, 11), slice(11, 24))
    ]
    assert_close(to_numpy(halves[0]) + to_numpy(halves[1]), to_numpy(whole), kernel.dtype, "split writers")
