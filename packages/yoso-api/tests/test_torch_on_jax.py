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
