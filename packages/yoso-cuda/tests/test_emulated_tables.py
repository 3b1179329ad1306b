"""The bucket-table kernels (kernels/tables.cu) run on the CPU by the emulator of ``emulate.py``, against
``yoso_reference``: ``bucket_tables``, ``read_buckets`` and ``add_to_tables`` through ``_ops`` and their real
launch plans, and the recurrent state that ``yoso._core`` composes from them.

No GPU result (emulator/emu.h says what the emulator cannot show): tests/test_gpu.py has the GPU cases. What
it does check is every index, mask, dtype, outer-product layout and grid these launches use, on real data.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from emulate import Emulator, compiler
from yoso_cuda import _ops, _plans, _runtime
from yoso_cuda.backend import MAX_HASH_BITS, CudaBackend

import yoso_reference as ref
from yoso import _core

pytestmark = pytest.mark.skipif(
    compiler() is None or not sys.platform.startswith("linux"), reason="the kernel emulator needs g++ on Linux"
)
TOL = 2e-5  # fp32 sums against float64 on the same (rounded) inputs
HALVES = [torch.float16, torch.bfloat16]
DTYPES = [torch.float32, *HALVES]


@pytest.fixture(scope="module")
def emulator():
    return Emulator(("tables",))


@pytest.fixture
def run(emulator, monkeypatch):
    monkeypatch.setattr(_runtime, "launch", emulator.launch)
    emulator.launches.clear()
    return emulator


def _problem(seed, *, batch=3, m=5, n=37, channels=7, width=None, tau=4, masked=True, skew=0.3):
    """Codes with a share ``skew`` of the tokens in bucket 1 (long runs), values, outer factors, weights."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**tau, (batch, m, n))
    codes[..., rng.random(n) < skew] = 1
    return dict(
        codes=codes,
        values=rng.standard_normal((batch, n, channels)),
        outer=None if width is None else rng.standard_normal((batch, n, width)),
        weights=rng.standard_normal((batch, n, channels)),
        mask=rng.random((batch, n)) < 0.7 if masked else None,
        hash_bits=tau,
    )


def _t(x, dtype=torch.float32):
    return None if x is None else torch.as_tensor(x).to(dtype)


def _rounded(x, dtype):
    """What the kernels see of ``x`` in ``dtype``, as float64 for the reference."""
    return None if x is None else _t(x, dtype).double().numpy()


def _rel(got, want):
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
    return np.linalg.norm(got.double().numpy() - want) / np.linalg.norm(want)


def _tables(pb, dtype=torch.float32, outer_dtype=None):
    return _ops.bucket_tables(
        _t(pb["codes"], torch.int32),
        _t(pb["values"], dtype),
        mask=_t(pb["mask"], torch.bool),
        hash_bits=pb["hash_bits"],
        outer=_t(pb["outer"], outer_dtype or dtype),
    )


def _want_tables(pb, dtype=torch.float32, outer_dtype=None):
    return ref.bucket_tables(
        pb["codes"],
        _rounded(pb["values"], dtype),
        mask=pb["mask"],
        hash_bits=pb["hash_bits"],
        outer=_rounded(pb["outer"], outer_dtype or dtype),
    )


def _names(run):
    return [name for _program, name, *_ in run.launches]


@pytest.mark.parametrize("width", [None, 3], ids=["values", "outer"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_bucket_tables_match_the_reference(run, dtype, width):
    """Odd sizes, masks, a crowded bucket; fp16/bf16 tokens summed in fp32 into fp32 tables."""
    pb = _problem(0, width=width)
    got = _tables(pb, dtype)
    assert _rel(got, _want_tables(pb, dtype)) < TOL
    assert _names(run) == [f"bucket_tables_sum<{_ops.element_type(_t(pb['values'], dtype))}>"]


def test_bucket_tables_without_a_mask_and_with_empty_buckets(run):
    pb = _problem(1, batch=1, m=2, n=5, channels=1, tau=6, masked=False)  # 64 buckets, at most 5 used
    got = _tables(pb)
    assert _rel(got, _want_tables(pb)) < TOL
    assert (got.numpy() == 0).sum() >= 2 * (64 - 5)


def test_outer_of_two_dtypes(run):
    """The backward's bucket_tables(q_codes, grad, outer=q): fp32 gradients, half q -> both read as fp32."""
    pb = _problem(2, width=6)
    got = _tables(pb, torch.float32, torch.bfloat16)
    assert _rel(got, _want_tables(pb, torch.float32, torch.bfloat16)) < TOL
    assert _names(run) == ["bucket_tables_sum<float>"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_read_buckets_match_the_reference(run, dtype):
    """Plain reads of fp32 tables, and reads of outer-product tables contracted with weights in ``dtype``."""
    pb = _problem(3, width=4)
    codes, mask = _t(pb["codes"], torch.int32), _t(pb["mask"], torch.bool)
    plain = ref.bucket_tables(pb["codes"], pb["values"], hash_bits=4)
    got = _ops.read_buckets(codes, _t(plain), mask=mask)
    assert _rel(got, ref.read_buckets(pb["codes"], plain, mask=pb["mask"])) < TOL
    outer = ref.bucket_tables(pb["codes"], pb["values"], hash_bits=4, outer=pb["outer"])
    got = _ops.read_buckets(codes, _t(outer), mask=mask, weights=_t(pb["weights"], dtype))
    want = ref.read_buckets(pb["codes"], outer, mask=pb["mask"], weights=_rounded(pb["weights"], dtype))
    assert _rel(got, want) < TOL
    assert (got[~mask] == 0).all()
    weighted = f"read_buckets_weighted<{_ops.element_type(_t(pb['weights'], dtype))}>"
    assert _names(run) == ["read_buckets_plain", weighted]


def _add(pb, tables, dtype=torch.float32):
    return _ops.add_to_tables(
        tables,
        _t(pb["codes"], torch.int32),
        _t(pb["values"], dtype),
        mask=_t(pb["mask"], torch.bool),
        hash_bits=pb["hash_bits"],
        outer=_t(pb["outer"], dtype),
    )


@pytest.mark.parametrize("width", [None, 3], ids=["values", "outer"])
@pytest.mark.parametrize(
    "n, kernel",
    [(1, "walk"), (_plans.ADD_WALK_MAX_TOKENS, "walk"), (_plans.ADD_WALK_MAX_TOKENS + 1, "sum")],
    ids=["one-token", "longest-walk", "shortest-sum"],
)
def test_add_to_tables_matches_the_reference(run, n, kernel, width):
    """Short chunks walk their tokens into a copy of the tables, longer ones add each bucket's sum; the
    given tables are left as they were (the primitive is functional)."""
    base_pb = _problem(4, n=50, width=width)
    base = _t(_want_tables(base_pb))
    before = base.clone()
    pb = _problem(5, n=n, width=width)
    got = _add(pb, base)
    assert torch.equal(base, before)
    assert _rel(got, base.double().numpy() + _want_tables(pb)) < TOL
    assert _names(run) == [f"bucket_tables_{kernel}<float>"]


def test_one_token_step_touches_m_rows_per_row_of_the_batch(run):
    """A decoding step's launch is (channel blocks, m, B): O(m * C) work, whatever 2^tau -- not a pass over
    all m * 2^tau * C entries (the copy aside)."""
    pb = _problem(6, batch=2, m=3, n=1, channels=300, tau=MAX_HASH_BITS)
    tables = torch.zeros((2, 3, 2**MAX_HASH_BITS, 300))
    got = _add(pb, tables, torch.float16)
    assert [launch[2] for launch in run.launches] == [(2, 3, 2)]  # ceil(300 / 256) channel blocks
    assert _rel(got, _want_tables(pb, torch.float16)) < TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_largest_hash_bits(run, dtype):
    """tau = the backend's max_hash_bits: 4096 buckets per hash, most of them empty."""
    tau = CudaBackend.max_hash_bits
    pb = _problem(7, batch=1, m=2, n=50, channels=3, tau=tau)
    tables = _tables(pb, dtype)
    assert _rel(tables, _want_tables(pb, dtype)) < TOL
    codes, mask = _t(pb["codes"], torch.int32), _t(pb["mask"], torch.bool)
    want = ref.read_buckets(pb["codes"], tables.double().numpy(), mask=pb["mask"])
    assert _rel(_ops.read_buckets(codes, tables, mask=mask), want) < TOL
    step = _problem(8, batch=1, m=2, n=1, channels=3, tau=tau)
    assert _rel(_add(step, tables, dtype), tables.double().numpy() + _want_tables(step, dtype)) < TOL


def test_the_largest_outer_products(run):
    """C x F = 256 x 256 per token (the lower bound's Dv x D tables at the head-dim limit), half tokens."""
    pb = _problem(9, batch=1, m=2, n=9, channels=256, width=256, tau=1)
    tables = _tables(pb, torch.float16)
    assert tuple(tables.shape) == (1, 2, 2, 256, 256)
    assert _rel(tables, _want_tables(pb, torch.float16)) < TOL
    codes, mask = _t(pb["codes"], torch.int32), _t(pb["mask"], torch.bool)
    got = _ops.read_buckets(codes, tables, mask=mask, weights=_t(pb["weights"], torch.float16))
    weights = _rounded(pb["weights"], torch.float16)
    want = ref.read_buckets(pb["codes"], tables.double().numpy(), mask=pb["mask"], weights=weights)
    assert _rel(got, want) < TOL
    step = _problem(10, batch=1, m=2, n=1, channels=256, width=256, tau=1)
    assert _rel(_add(step, tables), tables.double().numpy() + _want_tables(step)) < TOL


def test_masked_content_never_reaches_a_sum(run):
    """NaN and inf in masked tokens' values, outer factors and weights change nothing, bitwise; masked
    rows of a read are exact zeros."""
    pb = _problem(11, width=3)
    keep = pb["mask"][..., None]
    dirty = dict(pb, values=np.where(keep, pb["values"], np.nan), outer=np.where(keep, pb["outer"], np.inf))
    dirty["weights"] = np.where(keep, pb["weights"], np.nan)
    clean_tables, dirty_tables = _tables(pb), _tables(dirty)
    assert torch.equal(clean_tables, dirty_tables)
    base = torch.ones_like(clean_tables)
    assert torch.equal(_add(pb, base), _add(dirty, base))
    codes, mask = _t(pb["codes"], torch.int32), _t(pb["mask"], torch.bool)
    reads = [_ops.read_buckets(codes, clean_tables, mask=mask, weights=_t(x["weights"])) for x in (pb, dirty)]
    assert torch.equal(*reads) and (reads[0][~mask] == 0).all()


def test_strided_inputs(run):
    """Slices of longer arrays (as _core and the sequence-parallel code pass them): copied to contiguous
    for the launch, and those copies outlive it."""
    pb = _problem(12, n=80, width=3)
    cut = dict(pb, codes=pb["codes"][..., 10:70], mask=pb["mask"][:, 10:70])
    cut.update({x: pb[x][:, 10:70] for x in ("values", "outer", "weights")})
    strided = {x: _t(pb[x])[:, 10:70] for x in ("values", "outer", "weights")}
    codes, mask = _t(pb["codes"], torch.int32)[..., 10:70], _t(pb["mask"], torch.bool)[:, 10:70]
    assert not (codes.is_contiguous() or mask.is_contiguous() or strided["values"].is_contiguous())
    options = dict(mask=mask, hash_bits=4, outer=strided["outer"])
    tables = _ops.bucket_tables(codes, strided["values"], **options)
    assert torch.equal(tables, _tables(cut))
    base = tables[..., 1:]  # [B, m, 2^tau, C, F - 1], strided
    grown = _ops.add_to_tables(base, codes, strided["values"], **dict(options, outer=strided["outer"][..., 1:]))
    narrow = dict(cut, outer=cut["outer"][..., 1:])
    assert _rel(grown, base.double().numpy() + _want_tables(narrow)) < TOL
    read = _ops.read_buckets(codes, tables, mask=mask, weights=strided["weights"])
    want = ref.read_buckets(cut["codes"], tables.double().numpy(), mask=cut["mask"], weights=cut["weights"])
    assert _rel(read, want) < TOL


def test_int64_codes(run):
    """Codes of any integer dtype (the reference's are int64) give what int32 codes give."""
    pb = _problem(13, width=2)
    codes = torch.as_tensor(pb["codes"], dtype=torch.int64)
    options = dict(mask=_t(pb["mask"], torch.bool), hash_bits=4, outer=_t(pb["outer"]))
    tables = _ops.bucket_tables(codes, _t(pb["values"]), **options)
    assert torch.equal(tables, _tables(pb))
    assert torch.equal(_ops.add_to_tables(tables, codes, _t(pb["values"]), **options), _add(pb, tables))
    read = _ops.read_buckets(codes, tables, mask=options["mask"], weights=_t(pb["weights"]))
    assert torch.equal(read, _ops.read_buckets(codes.int(), tables, mask=options["mask"], weights=_t(pb["weights"])))


# ---- the recurrent state composed from these primitives (yoso._core.forward_state) ----------------------


class _EmulatedTables(CudaBackend):
    """The cuda backend's table primitives (emulated kernels) with the reference's hashing and cumulation:
    those kernels use warp intrinsics, which the emulator does not run (tests/test_gpu.py runs them all)."""

    def hash_codes(self, x, planes, *, hashing, num_hashes, hash_bits):
        codes = ref.hash_codes(x.numpy(), planes.numpy(), hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits)
        return torch.as_tensor(codes, dtype=torch.int32)

    def cumulate(self, read_codes, write_codes, values, *, read_mask, write_mask, order, hash_bits):
        out = ref.cumulate(
            read_codes.numpy(),
            write_codes.numpy(),
            values.double().numpy(),
            read_mask=read_mask.numpy(),
            write_mask=write_mask.numpy(),
            order=order,
            hash_bits=hash_bits,
        )
        return torch.as_tensor(out, dtype=torch.float32)


def test_chunked_state_equals_the_one_shot_causal_cumulation(run):
    """Chunks of 1, 29, 1, 69 (longer than a walk), 1, 1 tokens carrying tables and key tables through
    yoso._core.forward_state: outputs and final tables equal the one-shot oracle's."""
    rng = np.random.default_rng(12)
    batch, n, dim, dv, m, tau = 2, 102, 6, 5, 3, 4
    planes = rng.standard_normal((1, m, tau, dim)).astype(np.float32)
    query_mask, key_mask = rng.random((batch, n)) < 0.8, rng.random((batch, n)) < 0.8
    # As _core receives them: unit rows, masked rows zero; float32, as the kernels read them.
    q = np.where(query_mask[..., None], ref.unit_rows(rng.standard_normal((batch, n, dim))), 0).astype(np.float32)
    k = np.where(key_mask[..., None], ref.unit_rows(rng.standard_normal((batch, n, dim))), 0).astype(np.float32)
    v = np.where(key_mask[..., None], rng.standard_normal((batch, n, dv)), 0).astype(np.float32)
    backend = _EmulatedTables()
    tables = key_tables = None
    outs = []
    for a, b in zip([0, 1, 30, 31, 100, 101], [1, 30, 31, 100, 101, 102]):
        y, tables, key_tables, _codes = _core.forward_state(
            backend,
            *(_t(x[:, a:b]) for x in (q, k, v)),
            _t(planes),
            _t(query_mask[:, a:b], torch.bool),
            _t(key_mask[:, a:b], torch.bool),
            tables,
            key_tables,
            hashing="gaussian",
            num_hashes=m,
            hash_bits=tau,
            with_key_tables=True,
        )
        outs.append(y)
    codes = [ref.hash_codes(x, planes, hashing="gaussian", num_hashes=m, hash_bits=tau) for x in (q, k)]
    k, v = k.astype(np.float64), v.astype(np.float64)
    want = ref.cumulate(*codes, v, read_mask=query_mask, write_mask=key_mask, order="causal", hash_bits=tau)
    assert _rel(torch.cat(outs, dim=1), want) < TOL
    assert _rel(tables, ref.bucket_tables(codes[1], v, mask=key_mask, hash_bits=tau)) < TOL
    want_key_tables = ref.bucket_tables(codes[1], v, mask=key_mask, hash_bits=tau, outer=k)
    assert _rel(key_tables, want_key_tables) < TOL
    assert {name.split("<")[0] for name in _names(run)} == {
        "bucket_tables_sum",
        "bucket_tables_walk",
        "read_buckets_plain",
    }
