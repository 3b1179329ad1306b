"""Backend-specific checks on a GPU, beyond the conformance suite (which runs with --backend cuda).

Skipped, with the reason, where the backend cannot run (no GPU, no driver, CPU torch, old GPU):
these tests never pass without launching a kernel.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import requires_gpu

import yoso_reference as ref

torch = pytest.importorskip("torch")
pytestmark = requires_gpu


def _cuda():
    from yoso_cuda.backend import CudaBackend

    return CudaBackend()


def _t(x, dtype=torch.float32):
    return torch.as_tensor(x).to("cuda", dtype)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def _problem(rng, batch=2, n=300, dim=64, dv=48, m=8, tau=6):
    unit = ref.unit_rows
    return dict(
        q=unit(rng.standard_normal((batch, n, dim))),
        k=unit(rng.standard_normal((batch, n, dim))),
        v=rng.standard_normal((batch, n, dv)),
        g=rng.standard_normal((batch, n, dv)),
        qc=rng.integers(0, 2**tau, (batch, m, n)),
        kc=rng.integers(0, 2**tau, (batch, m, n)),
        qm=rng.random((batch, n)) < 0.8,
        km=rng.random((batch, n)) < 0.8,
        tau=tau,
    )


@pytest.mark.parametrize("order", ["none", "causal", "anticausal"])
@pytest.mark.parametrize("tau, m", [(6, 8), (12, 32)], ids=["one-group", "split-groups"])
def test_cumulate_long_sequences_and_hash_groups(order, tau, m):
    pb = _problem(np.random.default_rng(1), n=1000, m=m, tau=tau)
    got = _cuda().cumulate(
        _t(pb["qc"], torch.int32), _t(pb["kc"], torch.int32), _t(pb["v"]),
        read_mask=_t(pb["qm"], torch.bool), write_mask=_t(pb["km"], torch.bool), order=order, hash_bits=tau,
    )  # fmt: skip
    want = ref.cumulate(
        pb["qc"], pb["kc"], pb["v"], read_mask=pb["qm"], write_mask=pb["km"], order=order, hash_bits=tau
    )
    assert _rel(got.cpu(), want) < 2e-5


@pytest.mark.parametrize("dim, dv", [(64, 48), (256, 256), (200, 40)], ids=["tile32", "tile16", "tile16-mixed"])
@pytest.mark.parametrize("causal", [False, True])
def test_expectation_tiles(dim, dv, causal):
    pb = _problem(np.random.default_rng(2), n=77, dim=dim, dv=dv)
    cuda = _cuda()
    args = [_t(pb[x]) for x in ("q", "k", "v")]
    masks = dict(query_mask=_t(pb["qm"], torch.bool), key_mask=_t(pb["km"], torch.bool))
    y = cuda.expectation_forward(*args, **masks, causal=causal, hash_bits=pb["tau"])
    want = ref.expectation_forward(
        pb["q"], pb["k"], pb["v"], query_mask=pb["qm"], key_mask=pb["km"], causal=causal, hash_bits=pb["tau"]
    )
    assert _rel(y.cpu(), want) < 2e-5
    grads = cuda.expectation_backward(
        *args, _t(pb["g"]), **masks, causal=causal, hash_bits=pb["tau"], backward="exact", max_ratio=60.0
    )
    wants = ref.expectation_backward(
        pb["q"], pb["k"], pb["v"], pb["g"], query_mask=pb["qm"], key_mask=pb["km"], causal=causal,
        hash_bits=pb["tau"], backward="exact", max_ratio=60.0,
    )  # fmt: skip
    for got, w in zip(grads, wants):
        assert _rel(got.cpu(), w) < 2e-5


@pytest.mark.parametrize("dim, dv", [(64, 48), (256, 256)], ids=["tile32", "tile16"])
@pytest.mark.parametrize("backward", ["lower_bound", "exact"])
def test_sampled_grads_tiles_with_crowded_buckets(dim, dv, backward):
    """tau=2 puts ~75 tokens in each bucket: several tiles per bucket on both sides."""
    pb = _problem(np.random.default_rng(3), n=300, dim=dim, dv=dv, m=3, tau=2)
    dq, dk = _cuda().sampled_grads(
        _t(pb["qc"], torch.int32), _t(pb["kc"], torch.int32), *(_t(pb[x]) for x in ("q", "k", "v", "g")),
        query_mask=_t(pb["qm"], torch.bool), key_mask=_t(pb["km"], torch.bool), causal=True, hash_bits=2,
        backward=backward, max_ratio=20.0,
    )  # fmt: skip
    want = ref.sampled_grads(
        pb["qc"], pb["kc"], pb["q"], pb["k"], pb["v"], pb["g"], query_mask=pb["qm"], key_mask=pb["km"], causal=True,
        hash_bits=2, backward=backward, max_ratio=20.0,
    )  # fmt: skip
    assert _rel(dq.cpu(), want[0]) < 2e-5 and _rel(dk.cpu(), want[1]) < 2e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hashing", ["gaussian", "hadamard"])
def test_half_precision_hashing_matches_on_the_rounded_inputs(dtype, hashing):
    import yoso

    rng = np.random.default_rng(4)
    for dim in (16, 60, 256):
        x = ref.unit_rows(rng.standard_normal((2, 100, dim)))
        planes = yoso.hash_planes(16, 8, dim, hashing=hashing, seed=5)[None]
        xt = _t(x, dtype)
        got = _cuda().hash_codes(xt, _t(planes), hashing=hashing, num_hashes=16, hash_bits=8).cpu().numpy()
        want = ref.hash_codes(
            xt.float().cpu().numpy().astype(np.float64), planes, hashing=hashing, num_hashes=16, hash_bits=8
        )
        assert (got != want).mean() < 0.01  # only near-ties may differ


def test_sample_mode_is_bitwise_reproducible():
    import yoso

    q, k, v = (torch.randn(2, 4, 513, 64, device="cuda", requires_grad=True) for _ in range(3))

    def run():
        out = yoso.attention(q, k, v, seed=3, num_hashes=16, hash_bits=7)
        weights = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)  # not out**2: rows are unit
        return (out, *torch.autograd.grad((out * weights).sum(), (q, k, v)))

    with yoso.set_backend("cuda"):
        first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_api_refuses_what_the_kernels_cannot_run():
    """Through yoso.attention: the backend's limits are a ValueError naming the argument, before any launch."""
    import yoso

    q = torch.randn(2, 3, 40, 16, device="cuda")
    with yoso.set_backend("cuda"):
        with pytest.raises(ValueError, match=r"'cuda' backend does not support hash_bits=13 \(at most 12\)"):
            yoso.attention(q, q, q, hash_bits=13)
        with pytest.raises(ValueError, match=r"head dims D=300, Dv=300 \(at most 256\)"):
            yoso.attention(*(torch.randn(1, 4, 300, device="cuda") for _ in "qkv"))
        with pytest.raises(ValueError, match=r"num_hashes=65536"):
            yoso.attention(q, q, q, num_hashes=65536, hash_bits=2)
        assert yoso.attention(q, q, q, hash_bits=16, mode="expectation").shape == q.shape  # no tables in YOSO-E


def test_inputs_on_two_devices_are_refused():
    import yoso

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    q = torch.randn(1, 4, 8, device="cuda:0")
    with yoso.set_backend("cuda"), pytest.raises(ValueError, match="must be on one device"):
        yoso.attention(q, q.to("cuda:1"), q)


def test_torch_compile_fullgraph():
    import yoso

    q, k, v = (torch.randn(2, 3, 64, 32, device="cuda", requires_grad=True) for _ in range(3))
    planes = torch.as_tensor(yoso.hash_planes(8, 4, 32, seed=1), device="cuda")

    def layer(q, k, v):
        out = yoso.attention(q, k, v, num_hashes=8, hash_bits=4, planes=planes)
        return (out * torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)).sum()

    with yoso.set_backend("cuda"):
        eager = layer(q, k, v)
        compiled = torch.compile(layer, fullgraph=True)(q, k, v)
    assert torch.allclose(eager, compiled)
