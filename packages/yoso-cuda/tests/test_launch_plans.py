"""What each primitive would launch, recorded without a GPU: every kernel name it asks for is one the
build instantiates, and every launch fits CUDA's limits and the shared-memory budget.

The primitives run on CPU tensors with the launcher replaced by a recorder: they never ask the device
(the API and ``CudaBackend.unsupported`` decide where a call runs).
"""

from __future__ import annotations

import math

import pytest
import torch
from yoso_cuda import _ops, _plans, _runtime
from yoso_cuda._kernels import PROGRAMS
from yoso_cuda.backend import MAX_GRID_YZ, MAX_HASH_BITS


@pytest.fixture
def launches(monkeypatch):
    recorded = []
    monkeypatch.setattr(_runtime, "launch", lambda *args: recorded.append(args))
    monkeypatch.setattr(_runtime, "max_shared_memory", lambda index: 99 * 1024)  # the smallest sm_80+ opt-in
    return recorded


def _check(launches, expected_count=None):
    assert launches, "nothing was launched"
    if expected_count is not None:
        assert len(launches) == expected_count
    for _device, program, name, grid, block, smem, args in launches:
        assert name in PROGRAMS[program].names, f"{name} is not instantiated in {program}"
        assert 32 <= block <= 1024 and block % 32 == 0
        assert grid[0] >= 1 and all(1 <= g <= 65535 for g in grid[1:])
        assert 0 <= smem <= 99 * 1024, (name, smem)
        assert all(hasattr(a, "value") for a in args)  # ctypes values, in the kernel's parameter order


HASH_CASES = [("gaussian", 64, 8), ("gaussian", 256, 16), ("gaussian", 3, 1)]
HASH_CASES += [("hadamard", 64, 8), ("hadamard", 256, 3), ("hadamard", 1, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hashing, dim, tau", HASH_CASES)
def test_hash_launches(launches, dtype, hashing, dim, tau):
    import yoso

    planes = torch.as_tensor(yoso.hash_planes(32, tau, dim, hashing=hashing, seed=0))[None]
    codes = _ops.hash_codes(torch.randn(2, 100, dim, dtype=dtype), planes, hashing=hashing, num_hashes=32,
                            hash_bits=tau)  # fmt: skip
    assert codes.shape == (2, 32, 100) and codes.dtype == torch.int32
    _check(launches, 1)


@pytest.mark.parametrize("order", ["none", "causal", "anticausal"])
@pytest.mark.parametrize("m, tau, channels", [(32, 8, 64), (32, 12, 64), (6000, 3, 2), (1, 1, 1), (8, 10, 300)])
def test_cumulate_launches(launches, order, m, tau, channels):
    codes = torch.randint(0, 2**tau, (2, m, 40), dtype=torch.int32)
    out = _ops.cumulate(codes, codes, torch.randn(2, 40, channels, dtype=torch.bfloat16), read_mask=None,
                        write_mask=torch.ones(2, 40, dtype=torch.bool), order=order, hash_bits=tau)  # fmt: skip
    assert out.shape == (2, 40, channels) and out.dtype == torch.float32
    _check(launches)


@pytest.mark.parametrize("dim, dv", [(64, 64), (256, 256), (1, 1), (200, 17)])
@pytest.mark.parametrize("backward", ["lower_bound", "exact"])
def test_pairwise_launches(launches, dim, dv, backward):
    q, k, v = torch.randn(2, 30, dim), torch.randn(2, 30, dim), torch.randn(2, 30, dv)
    g = torch.randn(2, 30, dv)
    masks = dict(query_mask=None, key_mask=torch.ones(2, 30, dtype=torch.bool))
    codes = torch.randint(0, 8, (2, 5, 30), dtype=torch.int32)
    dq, dk = _ops.sampled_grads(codes, codes, q, k, v, g, **masks, causal=True, hash_bits=3, backward=backward,
                                max_ratio=30.0)  # fmt: skip
    assert dq.shape == q.shape and dk.shape == k.shape
    _check(launches, 5 if backward == "exact" else 10)  # per hash: pairs, and (lower bound, auto) tables
    launches.clear()
    y = _ops.expectation_forward(q, k, v, **masks, causal=False, hash_bits=8)
    grads = _ops.expectation_backward(q, k, v, g, **masks, causal=True, hash_bits=8, backward=backward,
                                      max_ratio=80.0)  # fmt: skip
    assert y.shape == (2, 30, dv) and [t.shape for t in grads] == [q.shape, k.shape, v.shape]
    _check(launches, 3)


def test_launches_at_the_limits_the_backend_accepts(launches):
    """The largest batch, num_hashes and hash_bits CudaBackend.unsupported accepts still fit CUDA's grid."""
    m = MAX_GRID_YZ
    codes = torch.zeros(1, m, 33, dtype=torch.int32)
    for order in ("none", "causal"):  # hashes on grid y (intra masks), hash groups on grid y (scan)
        _ops.cumulate(codes, codes, torch.randn(1, 33, 3), read_mask=None, write_mask=None, order=order,
                      hash_bits=MAX_HASH_BITS)  # fmt: skip
    x = torch.randn(1, 33, 1)  # D' = 1: one hash per rotation, rotations on grid y
    _ops.hash_codes(x, torch.ones(1, m, 3, 1), hashing="hadamard", num_hashes=m, hash_bits=1)
    x = torch.randn(MAX_GRID_YZ, 2, 4)  # the batch row on grid y or z everywhere
    _ops.hash_codes(x, torch.randn(1, 2, 3, 4), hashing="gaussian", num_hashes=2, hash_bits=3)
    codes = torch.zeros(MAX_GRID_YZ, 1, 2, dtype=torch.int32)
    _ops.cumulate(codes, codes, x, read_mask=None, write_mask=None, order="anticausal", hash_bits=1)
    kw = dict(query_mask=None, key_mask=None, causal=True, hash_bits=1)
    _ops.sampled_grads(codes, codes, x, x, x, x, **kw, backward="exact", max_ratio=10.0)
    _ops.expectation_forward(x, x, x, **kw)
    _ops.expectation_backward(x, x, x, x, **kw, backward="lower_bound", max_ratio=10.0)
    _check(launches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, _plans.ADD_WALK_MAX_TOKENS + 1])
def test_table_launches(launches, dtype, n):
    """bucket_tables, add_to_tables (a walk for short chunks, a sum for longer ones) and read_buckets, with
    and without outer products / weights: one launch each, instantiated for the tokens' dtype."""
    codes = torch.randint(0, 16, (3, 5, n), dtype=torch.int32)
    values, outer = torch.randn(3, n, 7, dtype=dtype), torch.randn(3, n, 9, dtype=dtype)
    for factors, shape in ((None, (3, 5, 16, 7)), (outer, (3, 5, 16, 7, 9))):
        launches.clear()
        kw = dict(mask=None, hash_bits=4, outer=factors)
        tables = _ops.bucket_tables(codes, values, **kw)
        grown = _ops.add_to_tables(tables, codes, values, **kw)
        read = _ops.read_buckets(codes, tables, mask=None, weights=None if factors is None else values)
        assert tables.shape == grown.shape == shape and tables.dtype == grown.dtype == read.dtype == torch.float32
        assert read.shape == (3, n, shape[-1])
        _check(launches, 3)
        t = _ops.element_type(values)
        add = "walk" if n <= _plans.ADD_WALK_MAX_TOKENS else "sum"
        weighted = "read_buckets_plain" if factors is None else f"read_buckets_weighted<{t}>"
        names = [name for _d, _p, name, *_ in launches]
        assert names == [f"bucket_tables_sum<{t}>", f"bucket_tables_{add}<{t}>", weighted]


def test_table_launches_at_the_limits_the_backend_accepts(launches):
    """The largest batch, num_hashes, hash_bits and C x F outer products still fit CUDA's grid."""
    # (The grid's x grows with 2^tau, its y and z are m and B: each limit on its own keeps the tensors small.)
    for batch, m, tau in ((MAX_GRID_YZ, 1, 1), (1, MAX_GRID_YZ, 1), (1, 1, MAX_HASH_BITS)):
        codes = torch.zeros(batch, m, 2, dtype=torch.int32)
        values = torch.randn(batch, 2, 1)
        tables = _ops.bucket_tables(codes, values, mask=None, hash_bits=tau)
        _ops.add_to_tables(tables, codes, values, mask=None, hash_bits=tau)
        _ops.read_buckets(codes, tables, mask=None)
    codes = torch.zeros(1, 1, 2, dtype=torch.int32)
    values = torch.randn(1, 2, 256)
    tables = _ops.bucket_tables(codes, values, mask=None, hash_bits=1, outer=values)  # 256 x 256 per token
    _ops.add_to_tables(tables, codes, values, mask=None, hash_bits=1, outer=values)
    _ops.read_buckets(codes, tables, mask=None, weights=values)
    _check(launches, 12)


# ---- the lower bound's two forms ---------------------------------------------------------------------
# Launch arguments (ctypes, in the kernels' parameter order): 12 pointers, then m, Nq, Nk, D, Dv, tau,
# s, causal, form; the pair kernel adds max_ratio, 1/m; the table kernel slices, scale.
HASH, CAUSAL, FORM, SLICES, SCALE = 18, 19, 20, 21, 22


def _grads(n_query=30, n_key=30, dim=64, dv=64, m=4, tau=3, batch=2, causal=False, **kw):
    q, k, v = torch.randn(batch, n_query, dim), torch.randn(batch, n_key, dim), torch.randn(batch, n_key, dv)
    qc = torch.randint(0, 2**tau, (batch, m, n_query), dtype=torch.int32)
    kc = torch.randint(0, 2**tau, (batch, m, n_key), dtype=torch.int32)
    kw = dict(query_mask=None, key_mask=None, causal=causal, hash_bits=tau, max_ratio=10.0 * tau) | kw
    return _ops.sampled_grads(qc, kc, q, k, v, torch.randn(batch, n_query, dv), **kw)


def _kernels(launches):
    return [(name.split("<")[0], grid, smem, args) for _device, _program, name, grid, _block, smem, args in launches]


@pytest.mark.parametrize("causal", [False, True])
def test_forced_pairs_launch_only_the_pair_kernel(launches, causal):
    _grads(m=4, causal=causal, backward="lower_bound", form="pairs")
    _check(launches, 4)
    for name, grid, _smem, args in _kernels(launches):
        assert name == "sampled_grads_hash" and grid == (8, 2)
        assert args[FORM].value == _plans.FORMS["pairs"] and args[CAUSAL].value == int(causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dim, dv", [(64, 64), (256, 256), (1, 1), (200, 17), (17, 200), (64, 256), (33, 7)])
def test_forced_tables_launch_only_the_table_kernel(launches, causal, dim, dv):
    m, tau = 3, 5
    dq, dk = _grads(n_query=30, n_key=20, dim=dim, dv=dv, m=m, tau=tau, causal=causal, backward="lower_bound",
                    form="tables")  # fmt: skip
    assert dq.shape == (2, 30, dim) and dk.shape == (2, 20, dim)
    _check(launches, m)
    tile, ds = _plans.table_plan(dim, dv, 96 * 1024)  # min(SMEM_BUDGET, the recorder's 99 KiB opt-in)
    for s, (_name, grid, smem, args) in enumerate(_kernels(launches)):
        assert launches[s][2] == f"sampled_grads_tables<float, {tile}, {ds}>"
        assert grid == (2**tau, 2 * math.ceil(dim / ds), 2)  # (bucket blocks, dq and dk slices, batch)
        assert smem == _plans.table_smem(tile, ds, dv) <= _ops.SMEM_BUDGET
        assert args[FORM].value == _plans.FORMS["tables"] and args[HASH].value == s
        assert args[CAUSAL].value == int(causal)
        assert args[SLICES].value == math.ceil(dim / ds) and args[SCALE].value == pytest.approx(0.5 * tau / m)


@pytest.mark.parametrize(
    "batch, tau, dim, blocks", [(64, 8, 64, 16), (1, 8, 64, 256), (64, 12, 256, 4), (4096, 3, 1, 1)]
)
def test_table_grid_caps_the_bucket_blocks(launches, batch, tau, dim, blocks):
    """Few buckets take the table form in "auto": about TABLE_BLOCKS blocks per launch, each looping over
    buckets x, x + gridDim.x, ..., rather than 2^tau blocks per batch row that nearly all return at once."""
    _grads(batch=batch, n_query=3, n_key=3, dim=dim, dv=8, m=1, tau=tau, backward="lower_bound")
    (grid,) = [grid for name, grid, _smem, _args in _kernels(launches) if name == "sampled_grads_tables"]
    slices = math.ceil(dim / _plans.table_plan(dim, 8)[1])
    assert grid == (blocks, 2 * slices, batch) == _plans.table_grid(tau, slices, batch)


def test_auto_launches_both_kernels_per_hash_in_hash_order(launches):
    """Each hash step runs the pair kernel and the table kernel; both decide per bucket (use_tables)."""
    _grads(m=5, backward="lower_bound")
    _check(launches, 10)
    kernels = _kernels(launches)
    assert [k[0] for k in kernels] == ["sampled_grads_hash", "sampled_grads_tables"] * 5
    assert [k[3][HASH].value for k in kernels] == [s for s in range(5) for _ in range(2)]
    assert all(k[3][FORM].value == _plans.FORMS["auto"] for k in kernels)


def test_half_inputs_pick_their_instantiations(launches):
    for dtype, t in ((torch.float16, "half_t"), (torch.bfloat16, "bf16_t")):
        launches.clear()
        q = torch.randn(1, 40, 96, dtype=dtype)
        codes = torch.zeros(1, 2, 40, dtype=torch.int32)
        _ops.sampled_grads(codes, codes, q, q, q[..., :48], torch.randn(1, 40, 48), query_mask=None, key_mask=None,
                           causal=True, hash_bits=1, backward="lower_bound", max_ratio=10.0)  # fmt: skip
        _check(launches, 4)
        assert {name.split(",")[0] for _d, _p, name, *_ in launches} == {
            f"sampled_grads_hash<{t}",
            f"sampled_grads_tables<{t}",
        }


def test_exact_gradient_is_pairs_only(launches):
    _grads(m=3, backward="exact", form="auto")
    _check(launches, 3)
    assert {k[0] for k in _kernels(launches)} == {"sampled_grads_hash"}
    with pytest.raises(ValueError, match="form='tables' needs backward='lower_bound'"):
        _grads(backward="exact", form="tables")


def test_unknown_form_is_refused_naming_it(launches):
    with pytest.raises(ValueError, match=r"form must be one of 'pairs', 'tables', 'auto', got 'table'"):
        _grads(backward="lower_bound", form="table")
    assert not launches


@pytest.mark.parametrize(
    "n_query, n_key, dim, dv, form",
    [
        (0, 100, 64, 64, "pairs"),  # (no pair at all: both kernels return before deciding)
        (16, 16, 64, 64, "pairs"),  # unrelated tokens at tau = log2(N / 16): pairs
        (85, 85, 64, 64, "pairs"),  # 85^2 * 192 = 1.387e6 < 2 * 170 * 4096 = 1.393e6
        (86, 86, 64, 64, "tables"),
        (1, 10**6, 64, 64, "pairs"),  # one query: its pairs are cheaper than building the keys' table
        (341, 341, 256, 256, "pairs"),  # the break-even size grows with the head dims: 4 D Dv / (Dv + 2 D)
        (342, 342, 256, 256, "tables"),
        (1, 1, 1, 1, "pairs"),
        (2, 2, 1, 1, "tables"),
    ],
)
def test_bucket_form_decision(n_query, n_key, dim, dv, form):
    """The per-bucket rule (use_tables in common.cuh, mirrored by _plans.bucket_form): the table form where
    2 (nq + nk) D Dv < nq nk (Dv + 2 D); forced forms override it."""
    auto = _plans.FORMS["auto"]
    assert _plans.bucket_form(auto, n_query, n_key, dim, dv) == form
    pairs = n_query * n_key * (dv + 2 * dim)
    tables = 2 * (n_query + n_key) * dim * dv
    assert (tables < pairs) == (form == "tables")
    for forced in ("pairs", "tables"):
        assert _plans.bucket_form(_plans.FORMS[forced], n_query, n_key, dim, dv) == forced


def test_every_head_dim_has_an_instantiated_table_plan():
    """Whatever D, Dv <= 256 and the device's budget (sm_80+ opt in to at least 99 KiB), the planner picks
    a (TILE, DS) that the build instantiates, within the budget, with a grid CUDA takes."""
    names = set(PROGRAMS["sampled_tables"].names)
    for budget in (96 * 1024, 72 * 1024):
        for dv in range(1, 257):
            for dim in (1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 200, 255, 256):
                plan = _plans.table_plan(dim, dv, budget)
                assert plan is not None, (dim, dv, budget)
                tile, ds = plan
                assert _plans.table_smem(tile, ds, dv) <= budget
                assert f"sampled_grads_tables<bf16_t, {tile}, {ds}>" in names
                assert 2 * _plans.table_slices(dim, plan) <= 32
    assert _plans.table_plan(64, 64) == (32, 64)  # D = 64 in one slice
    assert _plans.table_plan(256, 256) == (16, 32)


@pytest.mark.parametrize("causal", [False, True])
def test_skewed_buckets_launch_the_same_plan(launches, causal):
    """The plan never depends on the bucket sizes (the kernels read them on the device, no host sync):
    one bucket holding every token, far more than a tile, launches exactly what spread codes do."""
    q, k, v = torch.randn(2, 300, 64), torch.randn(2, 300, 64), torch.randn(2, 300, 64)
    kw = dict(query_mask=None, key_mask=None, causal=causal, hash_bits=4, backward="lower_bound", max_ratio=40.0)
    plans = []
    for codes in (torch.randint(0, 16, (2, 3, 300), dtype=torch.int32), torch.full((2, 3, 300), 7, dtype=torch.int32)):
        launches.clear()
        _ops.sampled_grads(codes, codes, q, k, v, torch.randn(2, 300, 64), **kw)
        _check(launches, 6)
        plans.append(
            [(name, grid, smem, [a.value for a in args[12:]]) for _d, _p, name, grid, _b, smem, args in launches]
        )
    assert plans[0] == plans[1]
