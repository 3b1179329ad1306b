"""What each primitive would launch, recorded without a GPU: every kernel name it asks for is one the
build instantiates, and every launch fits CUDA's limits and the shared-memory budget.

The primitives run on CPU tensors with the launcher replaced by a recorder: they never ask the device
(the API and ``CudaBackend.unsupported`` decide where a call runs).
"""

from __future__ import annotations

import pytest
import torch
from yoso_cuda import _ops, _runtime
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
    _check(launches, 5)  # one launch per hash
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
