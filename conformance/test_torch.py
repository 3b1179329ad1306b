"""torch specifics: custom ops, torch.compile, checkpointing, generators, dtypes, layouts, devices."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import yoso  # noqa: E402
from harness import assert_close, to_numpy  # noqa: E402


def _qkv(target, shape=(2, 3, 17, 8), dtype=torch.float32, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype).to(target.device).requires_grad_(grad) for _ in range(3)]


def _loss(out):
    """A loss with non-trivial gradients. (Not out.square().sum(): with normalize=True every output row
    is a unit vector, so that sum is a constant and its gradients vanish.)"""
    weights = torch.sin(0.7 * torch.arange(out.numel(), dtype=torch.float32, device=out.device)).reshape(out.shape)
    return (out.float() * weights).sum()


def test_opcheck_core_ops(torch_target):
    """torch.library.opcheck: schema, fake tensors and autograd registration of the public ops
    ``torch.ops.yoso.core`` and ``torch.ops.yoso.hash_codes`` (registered by the first torch call)."""
    q, k, v = (torch.nn.functional.normalize(x, dim=-1) for x in _qkv(torch_target, (2, 11, 8)))
    planes = torch.as_tensor(yoso.hash_planes(4, 3, 8, seed=0)[None], dtype=torch.float32, device=q.device)
    mask = torch.ones(2, 11, dtype=torch.bool, device=q.device)
    for mode in ("sample", "expectation"):
        args = (
            q.requires_grad_(),
            k.requires_grad_(),
            v.requires_grad_(),
            planes if mode == "sample" else None,
            mask,
            mask,
            torch_target.name,
            mode,
            "gaussian",
            4,
            3,
            False,
            "lower_bound",
        )
        with yoso.set_backend(torch_target.name):
            yoso.attention(q, k, v, num_hashes=4, hash_bits=3, planes=planes[0])  # registers the ops
        torch.library.opcheck(
            torch.ops.yoso.core.default,
            args,
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )
    torch.library.opcheck(
        torch.ops.yoso.hash_codes.default,
        (q.detach(), planes, torch_target.name, "gaussian", 4, 3),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_compiles(torch_target):
    q, k, v = _qkv(torch_target, grad=True)
    planes = torch.as_tensor(yoso.hash_planes(8, 4, 8, seed=1), device=q.device)

    def layer(q, k, v):
        return yoso.attention(q, k, v, num_hashes=8, hash_bits=4, planes=planes)

    with yoso.set_backend(torch_target.name):
        eager = layer(q, k, v)
        grads = torch.autograd.grad(_loss(eager), (q, k, v))
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(q, k, v)
        compiled_grads = torch.autograd.grad(_loss(compiled), (q, k, v))
    # To rounding, not bitwise: eager calls on a backend that computes on JAX run the normalisations inside
    # its compiled program; under torch.compile they are torch ops around the yoso::core op. The outputs
    # are compared, not the scalar loss: its weighted sum cancels, so its relative rounding error is the
    # outputs' times a condition number that depends on the data (CI once saw 2.15e-5 on the loss).
    assert_close(to_numpy(compiled), to_numpy(eager), "float32", "compiled output")  # _qkv: float32
    for name, a, b in zip("qkv", grads, compiled_grads):
        assert_close(to_numpy(b), to_numpy(a), "float32", f"compiled d{name}")


def test_checkpoint_recomputes_the_same_hashes(torch_target):
    """seed=None draws from torch's RNG, which checkpointing replays: recomputed = original gradients.

    Other hash functions would change the gradients completely; agreement to float tolerance (not
    bitwise: a GPU backward may accumulate in a run-dependent order) shows the replay."""
    q, k, v = _qkv(torch_target, grad=True)

    def f(q, k, v):
        return yoso.attention(q, k, v, num_hashes=8, hash_bits=4)

    with yoso.set_backend(torch_target.name):
        torch.manual_seed(5)
        plain = torch.autograd.grad(_loss(f(q, k, v)), (q, k, v))
        torch.manual_seed(5)
        out = torch.utils.checkpoint.checkpoint(f, q, k, v, use_reentrant=False)
        checkpointed = torch.autograd.grad(_loss(out), (q, k, v))
    for name, a, b in zip("qkv", plain, checkpointed):
        assert_close(to_numpy(b), to_numpy(a), torch_target.dtype, f"d{name} after recompute")


def test_inputs_changed_in_place_before_the_backward(torch_target):
    """An input changed in place between the passes: the backward either raises torch's own error (what
    it needs was saved with ``save_for_backward`` and changed) or returns the gradients at the values the
    forward saw -- never gradients of other values (e.g. from a zero-copy view of the changed tensor)."""
    q0, k0, v0 = _qkv(torch_target, grad=True)

    def grads(changed=None):
        inputs = {"q": q0 * 1, "k": k0 * 1, "v": v0 * 1}  # non-leaf copies: they may be changed in place
        loss = _loss(yoso.attention(*inputs.values(), seed=3, num_hashes=8, hash_bits=4))
        if changed is not None:
            with torch.no_grad():
                inputs[changed].add_(1)
        return torch.autograd.grad(loss, (q0, k0, v0))

    with yoso.set_backend(torch_target.name):
        expected = grads()
        for changed in ("q", "k", "v"):
            try:
                got = grads(changed)
            except RuntimeError as error:
                assert "modified by an inplace operation" in str(error), error
                continue
            for name, a, b in zip("qkv", got, expected):
                assert_close(to_numpy(a), to_numpy(b), torch_target.dtype, f"d{name} after {changed} changed")


def test_generator_reproduces(torch_target):
    q, k, v = _qkv(torch_target)
    with yoso.set_backend(torch_target.name):
        runs = [yoso.attention(q, k, v, generator=torch.Generator(q.device).manual_seed(3)) for _ in range(2)]
        assert torch.equal(*runs)
        with pytest.raises(TypeError, match="torch.Generator"):
            yoso.attention(q, k, v, generator=3)
        with pytest.raises(ValueError, match="either seed= or generator="):
            yoso.attention(q, k, v, seed=1, generator=torch.Generator(q.device))


def test_seed_is_framework_independent(torch_target):
    """An int seed gives the same hash functions as NumPy's: the torch result equals the NumPy one."""
    q, k, v = _qkv(torch_target, dtype=torch.float64)
    with yoso.set_backend("reference"):
        want = yoso.attention(*(to_numpy(x) for x in (q, k, v)), seed=11, num_hashes=8, hash_bits=4)
    if "float64" not in torch_target.backend.dtypes:
        q, k, v = (x.float() for x in (q, k, v))
    with yoso.set_backend(torch_target.name):
        got = yoso.attention(q, k, v, seed=11, num_hashes=8, hash_bits=4)
    assert_close(to_numpy(got), want, torch_target.dtype, "seed across frameworks")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(torch_target, dtype):
    """Half inputs: output and gradients in the input dtype; error within 2x that of the reference
    run on the same half-precision inputs (docs/testing.md#tolerances). Expectation mode: no hash ties to flip."""
    if str(dtype).removeprefix("torch.") not in torch_target.backend.dtypes:
        pytest.skip(f"{torch_target.name} does not support {dtype}")
    q, k, v = _qkv(torch_target, (2, 33, 16), dtype=torch.float32)
    qh, kh, vh = (x.to(dtype).requires_grad_() for x in (q, k, v))
    with yoso.set_backend(torch_target.name):
        out = yoso.attention(qh, kh, vh, mode="expectation", hash_bits=4)
        _loss(out).backward()
    assert out.dtype == dtype and all(x.grad.dtype == dtype for x in (qh, kh, vh))
    exact = yoso.attention(*(to_numpy(x) for x in (q, k, v)), mode="expectation", hash_bits=4)
    with yoso.set_backend("reference"):
        rounded = yoso.attention(*(to_numpy(x.to(dtype)) for x in (q, k, v)), mode="expectation", hash_bits=4)
    ref_err = np.linalg.norm(to_numpy(torch.as_tensor(rounded).to(dtype)) - exact)
    err = np.linalg.norm(to_numpy(out) - exact)
    assert err <= 2 * ref_err + 1e-6, f"{dtype}: error {err:.3g} vs reference-at-precision {ref_err:.3g}"


def test_non_contiguous_inputs(torch_target):
    """[B, N, H, D] memory viewed as [B, H, N, D] (a transpose, as after a fused projection)."""
    q, k, v = (x.transpose(1, 2) for x in _qkv(torch_target, (2, 17, 3, 8)))
    assert not q.is_contiguous()
    with yoso.set_backend(torch_target.name):
        a = yoso.attention(q, k, v, seed=2, num_hashes=8, hash_bits=4)
        b = yoso.attention(*(x.contiguous() for x in (q, k, v)), seed=2, num_hashes=8, hash_bits=4)
    assert torch.equal(a, b)


def test_devices_must_match(torch_target):
    q, k, v = _qkv(torch_target)
    with pytest.raises(ValueError, match="must be on one device"):
        yoso.attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="key_padding_mask is on meta"):
        yoso.attention(q, k, v, key_padding_mask=torch.ones(2, 3, 17, dtype=torch.bool, device="meta"))
