"""What the kernels cannot run, although the API allows it, is refused by ``CudaBackend.unsupported``.

The API checks every call once (shapes, dtypes, devices, ranges) and the backend's primitives do not
re-check; the backend adds only its own limits, decided from the ``yoso.backends.Call`` alone -- before
anything runs, naming the argument. No GPU is needed. (The same refusal through ``yoso.attention`` is in
test_gpu.py: without a GPU the backend cannot be selected at all.)
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
from yoso_cuda import _ops, _plans
from yoso_cuda.backend import MAX_GRID_YZ, MAX_HASH_BITS, CudaBackend

from yoso import backends
from yoso.backends import Backend, Call

BASE = dict(
    framework="torch", device="cuda", dtype="bfloat16", batch=64, n_query=1024, n_key=1024, dim=64, value_dim=64,
    mode="sample", hashing="gaussian", backward="lower_bound", causal=False, num_hashes=32, hash_bits=8,
    requires_grad=True,
)  # fmt: skip
PRIMITIVES = ("hash_codes", "cumulate", "sampled_grads", "expectation_forward", "expectation_backward")
PRIMITIVES += ("bucket_tables", "read_buckets", "add_to_tables")


def _reason(**change):
    return CudaBackend().unsupported(Call(**{**BASE, **change}))


def test_calls_within_the_limits_are_accepted():
    assert _reason() is None
    largest = dict(hash_bits=MAX_HASH_BITS, dim=256, value_dim=256, batch=MAX_GRID_YZ, num_hashes=MAX_GRID_YZ)
    assert _reason(**largest, causal=True) is None
    assert _reason(mode="expectation", hash_bits=16) is None  # YOSO-E has no bucket tables
    assert _reason(mode="expectation", num_hashes=10**6) is None  # nor hashes
    assert _reason(**largest, causal=True, tables=True) is None  # a state or a split sequence: bucket tables


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(framework="numpy"), "numpy arrays"),
        (dict(device="cpu"), "device 'cpu'"),
        (dict(dtype="float64"), "dtype float64"),
        (dict(hash_bits=MAX_HASH_BITS + 1), f"hash_bits={MAX_HASH_BITS + 1} (at most {MAX_HASH_BITS})"),
        (dict(dim=257), "D=257"),
        (dict(value_dim=300), "Dv=300"),
        (dict(mode="expectation", dim=300), "D=300"),
        (dict(batch=MAX_GRID_YZ + 1), f"batch={MAX_GRID_YZ + 1}"),
        (dict(mode="expectation", batch=10**6), "batch=1000000"),
        (dict(num_hashes=MAX_GRID_YZ + 1), f"num_hashes={MAX_GRID_YZ + 1}"),
    ],
)
def test_limits_are_refused_naming_the_argument(change, needle):
    reason = _reason(**change)
    assert reason is not None and reason.startswith("the 'cuda' backend does not support"), reason
    assert needle in reason, reason


def test_every_accepted_hash_bits_fits_shared_memory():
    """unsupported() is the only guard: every tau it accepts gets a cumulation plan within the budget, with
    hash groups a grid dim can hold, for any number of hashes and channels it accepts."""
    for tau in range(1, MAX_HASH_BITS + 1):
        for m in (1, 7, 32, 1000, MAX_GRID_YZ):
            for channels in (1, 3, 64, 256):
                cs, hashes, groups, warps = _ops.cumulate_config(m, tau, channels, _ops.SMEM_BUDGET)
                assert _ops.cumulation_smem(cs, hashes, warps, tau) <= _ops.SMEM_BUDGET
                assert hashes * groups >= m and hashes * (groups - 1) < m
                assert 1 <= warps <= min(8, hashes) and groups <= MAX_GRID_YZ
    with pytest.raises(RuntimeError, match="exceeds"):  # far beyond the limit, no plan exists
        _ops.cumulate_config(4, 15, 1, _ops.SMEM_BUDGET)


def test_cumulation_plans():
    budget = 96 * 1024
    assert _ops.cumulate_config(32, 8, 64, budget)[:3] == (2, 32, 1)  # the default: one group, 2 channels
    assert _ops.cumulate_config(32, 12, 64, budget)[2] > 1  # tau = 12: hashes split over groups
    assert _ops.cumulate_config(6000, 3, 2, budget)[2] > 1


def test_lower_bound_forms_are_declared():
    """Both forms of the lower bound (docs/math.md#lower-bound): yoso info no longer lists "pairs only"."""
    assert CudaBackend.lower_bound_forms == ("pairs", "tables")
    assert not any("table form" in f for f in CudaBackend().missing_features())


@pytest.mark.parametrize("dim", [1, 16, 33, 64, 100, 128, 255, 256])
@pytest.mark.parametrize("value_dim", [1, 7, 64, 128, 200, 256])
def test_every_accepted_head_dim_has_a_table_plan(dim, value_dim):
    """unsupported() accepts D, Dv <= 256 with the lower bound: the table kernel then always has a plan
    within the shared-memory budget (the per-bucket choice may give any bucket to it)."""
    assert _reason(dim=dim, value_dim=value_dim) is None
    tile, ds = _plans.table_plan(dim, value_dim)
    assert _plans.table_smem(tile, ds, value_dim) <= _plans.SMEM_BUDGET


def test_table_form_limits_are_refused_before_compute(monkeypatch):
    """If the table kernel's tiles did not fit (here: a budget cut to 40 KiB), a sampled lower-bound
    backward would be refused naming the head dims -- and only that kind of call."""
    monkeypatch.setattr(_plans, "SMEM_BUDGET", 40 * 1024)
    reason = _reason(dim=64, value_dim=256)
    assert reason is not None and "D=64, Dv=256 with backward='lower_bound'" in reason, reason
    assert "40960 bytes of shared memory" in reason
    assert _reason(dim=64, value_dim=256, backward="exact") is None  # pairs only
    assert _reason(dim=64, value_dim=256, requires_grad=False) is None  # no backward at all
    assert _reason(dim=64, value_dim=256, mode="expectation") is None  # no sampled gradient
    assert _reason(dim=64, value_dim=64) is None  # small tables still fit


def test_missing_features_list_the_limits():
    features = CudaBackend().missing_features()
    for needle in ("dtype float64", "head dims D, Dv > 256", f"hash_bits > {MAX_HASH_BITS}", "num_hashes > 65535"):
        assert any(needle in f for f in features), (needle, features)
    assert any("CuPy" in f for f in features) and any("batch * heads" in f for f in features)
    assert not any("bucket-table" in f for f in features), features  # has_tables


def test_primitives_are_the_module_functions():
    """The base class calls ``_ops.<primitive>(...)`` with the primitive's arguments: same names, same kinds."""
    assert CudaBackend.module == "yoso_cuda._ops"
    for name in PRIMITIVES:
        assert getattr(CudaBackend, name) is getattr(Backend, name), f"{name} is overridden"
        want = list(inspect.signature(getattr(Backend, name)).parameters.values())[1:]  # without self
        got = list(inspect.signature(getattr(_ops, name)).parameters.values())
        assert [(p.name, p.kind) for p in got] == [(p.name, p.kind) for p in want], name


def test_loading_the_backend_imports_neither_torch_nor_cuda():
    code = "import sys, yoso_cuda.backend; print(sorted(m for m in ('torch', 'cuda') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_entry_point_and_identity():
    names = backends.installed_backends()
    assert "cuda" in names
    row = next(r for r in backends.status() if r["name"] == "cuda")
    assert row["priority"] == 30 and row["framework"] == "torch" and row["serves"] == ["torch"]
