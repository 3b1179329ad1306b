"""Bad arguments are refused in Python, naming the argument, before anything reaches the driver.

No GPU is needed: CPU tensors must be refused by the backend, and the shape/dtype logic is exercised
with ``device_type="cpu"`` (the same checks with the expected device type swapped), while the
launcher is replaced by a tripwire.
"""

from __future__ import annotations

import pytest
import torch
from yoso_cuda import _ops, _runtime
from yoso_cuda.backend import CudaBackend

from yoso import backends


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    def tripwire(*args, **kwargs):
        raise AssertionError("a kernel launch was attempted")

    monkeypatch.setattr(_runtime, "launch", tripwire)
    monkeypatch.setattr(_runtime, "max_shared_memory", lambda index: 99 * 1024)


def _qkv(b=2, nq=5, nk=6, d=4, dv=3, dtype=torch.float32):
    return torch.randn(b, nq, d, dtype=dtype), torch.randn(b, nk, d, dtype=dtype), torch.randn(b, nk, dv, dtype=dtype)


def test_cpu_tensors_are_refused_by_every_primitive():
    cuda = CudaBackend()
    q, k, v = _qkv()
    codes_q = torch.zeros(2, 4, 5, dtype=torch.int32)
    codes_k = torch.zeros(2, 4, 6, dtype=torch.int32)
    planes = torch.randn(1, 4, 3, 4)
    message = r"x is on cpu; the 'cuda' backend computes on CUDA tensors"
    with pytest.raises(ValueError, match=message):
        cuda.hash_codes(q, planes, hashing="gaussian", num_hashes=4, hash_bits=3)
    with pytest.raises(ValueError, match=r"values is on cpu"):
        cuda.cumulate(codes_q, codes_k, v, read_mask=None, write_mask=None, order="none", hash_bits=3)
    grad = torch.randn(2, 5, 3)
    kw = dict(query_mask=None, key_mask=None, causal=False, hash_bits=3)
    with pytest.raises(ValueError, match=r"q is on cpu"):
        cuda.sampled_grads(codes_q, codes_k, q, k, v, grad, **kw, backward="exact", max_ratio=30.0)
    with pytest.raises(ValueError, match=r"q is on cpu"):
        cuda.expectation_forward(q, k, v, **kw)
    with pytest.raises(ValueError, match=r"q is on cpu"):
        cuda.expectation_backward(q, k, v, grad, **kw, backward="exact", max_ratio=30.0)


def test_non_tensors_are_type_errors():
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        _ops.hash_codes([[1.0]], None, hashing="gaussian", num_hashes=1, hash_bits=1)


CPU = dict(device_type="cpu")


def test_unsupported_dtypes():
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.raises(TypeError, match=r"q has dtype float64; the 'cuda' backend supports float32, float16, bfloat16"):
        _ops.expectation_forward(q, k, v, query_mask=None, key_mask=None, causal=False, hash_bits=3, **CPU)
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"q, k, v must share one dtype"):
        _ops.expectation_forward(q, k, v.half(), query_mask=None, key_mask=None, causal=False, hash_bits=3, **CPU)
    codes = torch.zeros(2, 4, 6)
    with pytest.raises(TypeError, match=r"read_codes must hold integer hash codes, got dtype float32"):
        _ops.cumulate(codes, codes, v, read_mask=None, write_mask=None, order="none", hash_bits=3, **CPU)


def test_sizes_beyond_the_kernels():
    q, k, v = _qkv(d=257)
    with pytest.raises(ValueError, match=r"D=257 exceeds the 'cuda' backend's limit of 256"):
        _ops.expectation_forward(q, k, v, query_mask=None, key_mask=None, causal=False, hash_bits=3, **CPU)
    q, k, v = _qkv(dv=300)
    with pytest.raises(ValueError, match=r"Dv=300 exceeds"):
        _ops.expectation_forward(q, k, v, query_mask=None, key_mask=None, causal=False, hash_bits=3, **CPU)
    codes = torch.zeros(2, 4, 6, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"hash_bits=13 is outside the 'cuda' backend's range \[1, 12\]"):
        _ops.cumulate(codes, codes, v, read_mask=None, write_mask=None, order="none", hash_bits=13, **CPU)


def test_shapes_are_named():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"do not match: \[2, 5, 4\], \[2, 6, 4\], \[2, 5, 3\]"):
        _ops.expectation_forward(q, k, v[:, :5], query_mask=None, key_mask=None, causal=False, hash_bits=3, **CPU)
    with pytest.raises(ValueError, match=r"causal=True needs as many queries as keys, got Nq=5, Nk=6"):
        _ops.expectation_forward(q, k, v, query_mask=None, key_mask=None, causal=True, hash_bits=3, **CPU)
    with pytest.raises(ValueError, match=r"grad must have shape \[2, 5, 3\]"):
        _ops.expectation_backward(
            q, k, v, torch.zeros(2, 5, 4), query_mask=None, key_mask=None, causal=False, hash_bits=3,
            backward="exact", max_ratio=30.0, **CPU,
        )  # fmt: skip
    mask = torch.ones(2, 7, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"key_mask must have shape \[2, 6\], got \[2, 7\]"):
        _ops.expectation_forward(q, k, v, query_mask=None, key_mask=mask, causal=False, hash_bits=3, **CPU)
    with pytest.raises(TypeError, match=r"query_mask must be a bool tensor, got dtype float32"):
        _ops.expectation_forward(q, k, v, query_mask=torch.ones(2, 5), key_mask=None, causal=False, hash_bits=3, **CPU)
    read = torch.zeros(2, 4, 5, dtype=torch.int32)
    write = torch.zeros(2, 3, 6, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"codes must be \[B, m, N\].*read_codes \[2, 4, 5\], write_codes \[2, 3, 6\]"):
        _ops.cumulate(read, write, v, read_mask=None, write_mask=None, order="none", hash_bits=3, **CPU)
    write = torch.zeros(2, 4, 6, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"order='causal' needs as many readers as writers"):
        _ops.cumulate(read, write, v, read_mask=None, write_mask=None, order="causal", hash_bits=3, **CPU)
    with pytest.raises(ValueError, match=r"order must be one of"):
        _ops.cumulate(read, write, v, read_mask=None, write_mask=None, order="sideways", hash_bits=3, **CPU)


def test_planes_shapes():
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"must have shape \[1 or 2, 4, 3, 8\], got \[1, 4, 3, 7\]"):
        _ops.hash_codes(x, torch.randn(1, 4, 3, 7), hashing="gaussian", num_hashes=4, hash_bits=3, **CPU)
    with pytest.raises(ValueError, match=r"\[1 or 2, 2, 3, 8\], got \[3, 2, 3, 8\]"):
        _ops.hash_codes(x, torch.ones(3, 2, 3, 8), hashing="hadamard", num_hashes=4, hash_bits=3, **CPU)
    with pytest.raises(ValueError, match=r"hash_bits <= 8 \(the Hadamard size for D=8\)"):
        _ops.hash_codes(x, torch.ones(1, 1, 3, 8), hashing="hadamard", num_hashes=1, hash_bits=9, **CPU)


def test_sampled_grads_arguments():
    q, k, v = _qkv()
    grad = torch.randn(2, 5, 3)
    codes_q = torch.zeros(2, 4, 5, dtype=torch.int32)
    codes_k = torch.zeros(2, 4, 6, dtype=torch.int32)
    kw = dict(query_mask=None, key_mask=None, causal=False, hash_bits=3, max_ratio=30.0, **CPU)
    with pytest.raises(ValueError, match=r"backward must be 'lower_bound' or 'exact', got 'true'"):
        _ops.sampled_grads(codes_q, codes_k, q, k, v, grad, backward="true", **kw)
    with pytest.raises(ValueError, match=r"q_codes must be \[B, m, Nq\]"):
        _ops.sampled_grads(codes_k, codes_k, q, k, v, grad, backward="exact", **kw)


def test_cumulation_tables_fit_shared_memory():
    for m, tau, channels in [(32, 8, 64), (32, 12, 64), (6000, 3, 2), (1, 1, 1), (64, 10, 17), (5, 12, 1)]:
        budget = 96 * 1024
        cs, hashes, groups, warps = _ops.cumulate_config(m, tau, channels, budget)
        assert _ops.cumulation_smem(cs, hashes, warps, tau) <= budget
        assert hashes * groups >= m and hashes * (groups - 1) < m
        assert 1 <= warps <= min(8, hashes)
    assert _ops.cumulate_config(32, 8, 64, 96 * 1024)[:3] == (2, 32, 1)  # the default: one group, 2 channels
    assert _ops.cumulate_config(32, 12, 64, 96 * 1024)[2] > 1  # tau = 12: hashes split over groups


def test_backend_declares_what_it_cannot_do():
    from yoso.backends import Call

    cuda = CudaBackend()
    base = dict(
        framework="torch", device="cuda", dtype="bfloat16", batch=64, n_query=1024, n_key=1024, dim=64, value_dim=64,
        mode="sample", hashing="gaussian", backward="lower_bound", causal=False, num_hashes=32, hash_bits=8,
        requires_grad=True,
    )  # fmt: skip
    assert cuda.unsupported(Call(**base)) is None
    assert cuda.unsupported(Call(**{**base, "mode": "expectation", "hash_bits": 16})) is None
    for change, needle in [
        (dict(framework="numpy"), "numpy arrays"),
        (dict(device="cpu"), "device 'cpu'"),
        (dict(dtype="float64"), "dtype float64"),
        (dict(hash_bits=13), "hash_bits=13 (at most 12)"),
        (dict(dim=320), "D=320"),
        (dict(batch=70000), "batch=70000"),
    ]:
        reason = cuda.unsupported(Call(**{**base, **change}))
        assert reason is not None and needle in reason, (change, reason)
    assert "dtype float64" in cuda.missing_features()
    assert any("CuPy" in f for f in cuda.missing_features())


def test_entry_point_and_identity():
    names = backends.installed_backends()
    assert "cuda" in names
    row = next(r for r in backends.status() if r["name"] == "cuda")
    assert row["priority"] == 30 and row["framework"] == "torch" and row["serves"] == ["torch"]
