"""What each primitive would launch, recorded without a GPU: every kernel name it asks for is one the
build instantiates, and every launch fits CUDA's limits and the shared-memory budget.

The primitives run on CPU tensors (``device_type="cpu"``) with the launcher replaced by a recorder.
"""

from __future__ import annotations

import pytest
import torch
from yoso_cuda import _ops, _runtime
from yoso_cuda._kernels import PROGRAMS

CPU = dict(device_type="cpu")


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
                            hash_bits=tau, **CPU)  # fmt: skip
    assert codes.shape == (2, 32, 100) and codes.dtype == torch.int32
    _check(launches, 1)


@pytest.mark.parametrize("order", ["none", "causal", "anticausal"])
@pytest.mark.parametrize("m, tau, channels", [(32, 8, 64), (32, 12, 64), (6000, 3, 2), (1, 1, 1), (8, 10, 300)])
def test_cumulate_launches(launches, order, m, tau, channels):
    codes = torch.randint(0, 2**tau, (2, m, 40), dtype=torch.int32)
    out = _ops.cumulate(codes, codes, torch.randn(2, 40, channels, dtype=torch.bfloat16), read_mask=None,
                        write_mask=torch.ones(2, 40, dtype=torch.bool), order=order, hash_bits=tau, **CPU)  # fmt: skip
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
                                max_ratio=30.0, **CPU)  # fmt: skip
    assert dq.shape == q.shape and dk.shape == k.shape
    _check(launches, 5)  # one launch per hash
    launches.clear()
    y = _ops.expectation_forward(q, k, v, **masks, causal=False, hash_bits=8, **CPU)
    grads = _ops.expectation_backward(q, k, v, g, **masks, causal=True, hash_bits=8, backward=backward,
                                      max_ratio=80.0, **CPU)  # fmt: skip
    assert y.shape == (2, 30, dv) and [t.shape for t in grads] == [q.shape, k.shape, v.shape]
    _check(launches, 3)
