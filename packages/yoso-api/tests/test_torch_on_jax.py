"""Torch tensors served by the jax backend: large tensors cross into JAX by DLPack, without a copy, so what
the backward needs must still be what the forward saw."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("yoso_jax")
import yoso  # noqa: E402


def test_an_input_changed_in_place_between_the_passes_is_caught():
    """[1, 2, 1024, 128] float32 is 1 MiB per tensor: handed over by DLPack (smaller ones are copied). The
    backward recomputes from the inputs saved with ``save_for_backward``, so torch sees the change and
    raises its own error instead of returning the gradients of other values."""
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(1, 2, 1024, 128, generator=g, requires_grad=True) for _ in range(3)]
    weights = torch.randn(1, 2, 1024, 128, generator=g)
    with yoso.set_backend("jax"):
        for changed in range(3):
            inputs = [x * 1 for x in leaves]  # non-leaf copies: they may be changed in place
            loss = (yoso.attention(*inputs, seed=1, num_hashes=4, hash_bits=4) * weights).sum()
            with torch.no_grad():
                inputs[changed].add_(1)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()
        # unchanged inputs: the recomputing backward gives the gradients at the forward's values
        inputs = [x * 1 for x in leaves]
        (yoso.attention(*inputs, seed=1, num_hashes=4, hash_bits=4) * weights).sum().backward()
        with yoso.set_backend("reference"):
            expected = torch.autograd.grad(
                (yoso.attention(*leaves, seed=1, num_hashes=4, hash_bits=4) * weights).sum(), leaves
            )
    for name, x, want in zip("qkv", leaves, expected):
        np.testing.assert_allclose(x.grad.numpy(), want.numpy(), rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


def test_row_parts_are_the_largest_divisor_of_the_batch_within_the_cores(monkeypatch):
    from yoso import _jax_glue as jg

    monkeypatch.setattr(jg, "_cores", lambda: 4)
    assert jg.row_parts(8, jg.PART_TOKENS) == 4
    assert jg.row_parts(6, jg.PART_TOKENS) == 3
    assert jg.row_parts(7, jg.PART_TOKENS) == 1  # a prime batch: one program, never unequal parts
    assert jg.row_parts(8, jg.PART_TOKENS // 4) == 2  # parts of at least PART_TOKENS query tokens
    assert jg.row_parts(1, 1 << 20) == 1


@pytest.mark.parametrize("masked", [False, True])
def test_a_call_in_row_parts_equals_one_program(monkeypatch, masked):
    """Torch tensors (the whole-call programs) and NumPy arrays (the core programs) split over batch rows run
    concurrently must give what one program gives, the masks cut along with the rows."""
    from yoso import _jax_glue as jg

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=g, requires_grad=True) for _ in range(3))
    weights = torch.randn(2, 3, 40, 16, generator=g)
    mask = (torch.rand(2, 1, 40, generator=g) > 0.3) if masked else None
    options = dict(seed=5, num_hashes=4, hash_bits=4, key_padding_mask=mask)
    with yoso.set_backend("jax"):
        results = {}
        for name, tokens in (("one", 1 << 40), ("parts", 1)):
            monkeypatch.setattr(jg, "PART_TOKENS", tokens)
            monkeypatch.setattr(jg, "_cores", lambda: 3)
            assert jg.row_parts(6, 40) == (1 if name == "one" else 3)
            out = yoso.attention(q, k, v, **options)
            grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
            arrays = [x.detach().numpy() for x in (q, k, v)]
            np_mask = None if mask is None else mask.numpy()
            np_out, vjp = yoso.attention_vjp(*arrays, **{**options, "key_padding_mask": np_mask})
            results[name] = [out.detach().numpy(), *(x.numpy() for x in grads), np_out, *vjp(weights.numpy())]
    for one, parts in zip(results["one"], results["parts"]):
        assert np.abs(one).max() > 0
        np.testing.assert_allclose(parts, one, rtol=1e-6, atol=1e-6)
