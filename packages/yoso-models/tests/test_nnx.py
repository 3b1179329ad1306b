"""yoso_models.nnx.YosoAttention: the Flax NNX module on the JAX backend.

The ``models`` nox session installs flax and sets YOSO_TEST_REQUIRE_FLAX=1, so these tests fail
there instead of skipping when it is missing.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("YOSO_TEST_REQUIRE_FLAX"):
    import jax
    from flax import nnx
else:
    jax = pytest.importorskip("jax")
    nnx = pytest.importorskip("flax.nnx")

import jax.numpy as jnp  # noqa: E402

import yoso  # noqa: E402
from yoso_models.nnx import YosoAttention  # noqa: E402


def _layer(seed=0, **kwargs):
    kwargs = {"num_hashes": 8, "hash_bits": 4, **kwargs}
    return YosoAttention(2, 8, rngs=nnx.Rngs(params=seed, hashing=seed + 1, dropout=seed + 2), **kwargs)


def _x(shape=(2, 11, 8), seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype=jnp.float32)


def _by_hand(layer, x, mode, mask=None, key=None):
    """The module's computation written out with yoso.attention (the oracle for the wiring)."""

    def heads(lin):
        y = x @ lin.kernel[...] + lin.bias[...]
        return jnp.swapaxes(y.reshape(y.shape[:-1] + (2, 4)), -3, -2)

    mask = None if mask is None else mask[:, None, :]
    q, k, v = heads(layer.query), heads(layer.key), heads(layer.value)
    out = yoso.attention(q, k, v, mode=mode, key=key, key_padding_mask=mask, num_hashes=8, hash_bits=4)
    out = jnp.swapaxes(out, -3, -2).reshape(x.shape)
    return out @ layer.out.kernel[...] + layer.out.bias[...]


def test_eval_is_the_expectation_and_deterministic():
    layer, x = _layer(), _x()
    layer.eval()
    first, second = layer(x), layer(x)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, _by_hand(layer, x, "expectation"), rtol=1e-5, atol=1e-6)


def test_training_draws_fresh_hashes_from_the_stream_and_seeds_reproduce():
    x = _x()
    a, b = _layer(seed=3), _layer(seed=3)
    first = a(x)
    np.testing.assert_array_equal(first, b(x))  # same seeds, same hash functions
    assert not np.array_equal(first, a(x))  # the stream advanced: new hash functions
    # The first draw is the key of a fork of the "hashing" stream.
    fresh = _layer(seed=3)
    key = fresh.hash_rngs()
    np.testing.assert_allclose(first, _by_hand(fresh, x, "sample", key=key), rtol=1e-5, atol=1e-6)


def test_nnx_jit_equals_eager_and_gradients_flow():
    x = _x()
    eager = _layer(seed=5)(x)
    jitted_layer = _layer(seed=5)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(jitted_layer, x), eager, rtol=1e-5, atol=1e-6)

    layer = _layer(seed=5)
    weights = jnp.sin(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)

    def loss(m):
        return jnp.sum(m(x) * weights)

    grads = nnx.grad(loss)(layer)
    for lin in ("query", "key", "value", "out"):
        g = getattr(grads, lin).kernel[...]
        assert np.isfinite(g).all() and np.abs(g).max() > 0, lin


def test_padded_tokens_cannot_change_real_outputs():
    layer, x = _layer(), _x()
    layer.eval()
    mask = np.ones((2, 11), dtype=bool)
    mask[0, 7:] = False
    changed = np.asarray(x).copy()
    changed[0, 7:] = 100.0
    a = layer(x, key_padding_mask=jnp.asarray(mask))
    b = layer(jnp.asarray(changed), key_padding_mask=jnp.asarray(mask))
    np.testing.assert_allclose(a[0, :7], b[0, :7], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-6)


def test_causal_outputs_ignore_the_future():
    layer, x = _layer(causal=True), _x()
    layer.eval()
    changed = np.asarray(x).copy()
    changed[:, 6:] += 5.0
    np.testing.assert_allclose(layer(x)[:, :6], layer(jnp.asarray(changed))[:, :6], rtol=1e-5, atol=1e-6)


def test_cross_attention_and_dropout():
    layer = _layer(dropout_rate=0.5)
    q_in, kv_in = _x((2, 5, 8)), _x((2, 9, 8), seed=1)
    assert layer(q_in, kv_in).shape == (2, 5, 8)
    layer.eval()
    np.testing.assert_array_equal(layer(q_in, kv_in), layer(q_in, kv_in))  # no dropout, no sampling


def test_bad_arguments():
    with pytest.raises(ValueError, match="qkv_features=9 must be divisible by num_heads=2"):
        YosoAttention(2, 8, qkv_features=9, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="eval_mode must be one of"):
        YosoAttention(2, 8, eval_mode="fast", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hash_bits must be in"):
        YosoAttention(2, 8, hash_bits=30, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dropout_rate must be a probability"):
        YosoAttention(2, 8, dropout_rate=1.0, rngs=nnx.Rngs(0))
    layer = _layer()
    with pytest.raises(ValueError, match="key_padding_mask"):
        layer(_x(), key_padding_mask=jnp.ones((2, 10), dtype=bool))


def test_generation_with_the_state_equals_full_recomputation():
    """Prefill, then token by token under nnx.jit carrying the state: equal to one call over the whole sequence
    with the same hash functions (the first draw from the stream, then the state's)."""
    x = _x()
    mask = np.ones((2, 11), bool)
    mask[1, 3] = False  # padding inside a sequence
    mask = jnp.asarray(mask)
    full = _layer(seed=4, causal=True, eval_mode="sample")
    full.eval()
    want = full(x, key_padding_mask=mask)
    layer = _layer(seed=4, causal=True, eval_mode="sample")
    layer.eval()
    out, state = layer(x[:, :6], key_padding_mask=mask[:, :6], use_cache=True)
    outs = [out]
    step = nnx.jit(lambda m, x, mask, state: m(x, key_padding_mask=mask, past_state=state, use_cache=True))
    for i in range(6, 11):
        out, state = step(layer, x[:, i : i + 1], mask[:, i : i + 1], state)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), want, rtol=1e-5, atol=1e-6)
    assert isinstance(state, yoso.State) and state.tables.shape == (2, 2, 8, 16, 4)


def test_gradients_through_the_state_reach_the_projections():
    x = _x()
    weights = jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape)

    def full_loss(m):
        return jnp.sum(m(x) * weights)

    def chunked_loss(m):
        first, state = m(x[:, :4], use_cache=True, differentiable_state=True)
        rest, _ = m(x[:, 4:], past_state=state, use_cache=True, differentiable_state=True)
        return jnp.sum(jnp.concatenate([first, rest], 1) * weights)

    want = nnx.grad(full_loss)(_layer(seed=6, causal=True))
    got = nnx.grad(chunked_loss)(_layer(seed=6, causal=True))
    for lin in ("query", "key", "value", "out"):
        np.testing.assert_allclose(
            getattr(got, lin).kernel[...], getattr(want, lin).kernel[...], rtol=1e-4, atol=1e-5, err_msg=lin
        )


def test_state_refusals():
    with pytest.raises(ValueError, match="need a causal module"):
        _layer()(_x(), use_cache=True)
    layer = _layer(causal=True)
    layer.eval()
    with pytest.raises(ValueError, match=r"need sampled attention.*eval_mode='expectation'"):
        layer(_x(), use_cache=True)
    with pytest.raises(ValueError, match="cross-attention"):
        _layer(causal=True)(_x(), _x(), use_cache=True)
    with pytest.raises(TypeError, match="past_state must be the yoso.State"):
        _layer(causal=True)(_x(), past_state=(1, 2))
