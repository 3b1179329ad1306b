"""yoso_models.nn.YosoSelfAttention: wiring, masks, causality, YOSO-C, eval determinism, checkpointing, compile."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import yoso  # noqa: E402
from yoso_models.nn import YosoSelfAttention  # noqa: E402

E, H = 24, 3  # head_dim 8


def _x(batch=2, length=11, seed=0):
    return torch.randn(batch, length, E, generator=torch.Generator().manual_seed(seed))


def _mask(batch=2, length=11, lengths=(11, 6)):
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]


def _layer(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("num_hashes", 8)
    kwargs.setdefault("hash_bits", 4)
    return YosoSelfAttention(E, H, **kwargs)


def _manual(layer, x, mask, **options):
    """The layer written out by hand around yoso.attention (the reference for its wiring)."""
    b, n, _ = x.shape
    split = lambda t: t.view(b, n, H, E // H).transpose(1, 2)
    q, k, v = split(layer.q_proj(x)), split(layer.k_proj(x)), split(layer.v_proj(x))
    m = None if mask is None else mask[:, None, :]
    out = yoso.attention(
        q,
        k,
        v,
        key_padding_mask=m,
        query_mask=m,
        causal=layer.causal,
        num_hashes=layer.num_hashes,
        hash_bits=layer.hash_bits,
        **options,
    )
    return layer.out_proj(out.transpose(1, 2).reshape(b, n, E))


def test_import_stays_light():
    import subprocess
    import sys

    code = (
        "import sys, yoso_models; assert not {'torch', 'jax', 'flax', 'transformers'} & set(sys.modules); "
        "yoso_models.nn; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("mode", ["sample", "expectation"])
def test_training_matches_yoso_attention(mode):
    layer, x, mask = _layer(mode=mode).train(), _x(), _mask()
    torch.manual_seed(3)
    out = layer(x, mask)
    torch.manual_seed(3)
    expected = _manual(layer, x, mask, mode=mode)
    torch.testing.assert_close(out, expected)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_gradients_reach_every_parameter():
    layer = _layer(conv_window=3).train()
    x = _x().requires_grad_()
    layer(x, _mask()).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()


def test_eval_is_the_expectation_and_deterministic():
    layer, x, mask = _layer().eval(), _x(), _mask()
    first, second = layer(x, mask), layer(x, mask)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, _manual(layer, x, mask, mode="expectation"))


def test_eval_sample_with_seed_is_deterministic_and_without_is_not():
    x, mask = _x(), _mask()
    seeded = _layer(eval_mode="sample", eval_seed=7).eval()
    torch.testing.assert_close(seeded(x, mask), _manual(seeded, x, mask, mode="sample", seed=7))
    assert torch.equal(seeded(x, mask), seeded(x, mask))
    fresh = _layer(eval_mode="sample").eval()
    assert not torch.equal(fresh(x, mask), fresh(x, mask))


@pytest.mark.parametrize("options", [{}, {"conv_window": 4}, {"causal": True}, {"causal": True, "conv_window": 3}])
@pytest.mark.parametrize("training", [True, False])
def test_padded_tokens_cannot_change_real_outputs(options, training):
    layer = _layer(**options).train(training)
    x, mask = _x(), _mask()
    other = x.clone()
    other[1, 6:] = 100 * torch.randn(5, E)  # whatever the padding holds
    torch.manual_seed(1)
    a = layer(x, mask)
    torch.manual_seed(1)
    b = layer(other, mask)
    torch.testing.assert_close(a[mask], b[mask])


def test_padded_rows_are_zero_before_the_output_projection():
    layer = _layer(bias=False, conv_window=3).eval()
    out = layer(_x(), _mask())
    assert torch.equal(out[1, 6:], torch.zeros_like(out[1, 6:]))


@pytest.mark.parametrize("conv_window", [None, 1, 4])
@pytest.mark.parametrize("training", [True, False])
def test_causal_outputs_ignore_the_future(conv_window, training):
    layer = _layer(causal=True, conv_window=conv_window).train(training)
    x = _x()
    later = x.clone()
    later[:, 7:] = torch.randn(2, 4, E)
    torch.manual_seed(2)
    a = layer(x)
    torch.manual_seed(2)
    b = layer(later)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 3, 4])
def test_yoso_c_convolution_is_a_per_head_window_sum(causal, window):
    """The convolution term, checked against an explicit loop: out_i += sum_t w[h, t] * v[i + t - left]."""
    layer = _layer(conv_window=window, causal=causal, bias=False).eval()
    x, mask = _x(), _mask()
    plain = _layer(causal=causal, bias=False).eval()
    plain.load_state_dict({k: p for k, p in layer.state_dict().items() if not k.startswith("conv")})
    b, n = x.shape[:2]
    v = (layer.v_proj(x) * mask[..., None]).view(b, n, H, E // H)
    left = window - 1 if causal else (window - 1) // 2
    conv = torch.zeros_like(v)
    for i in range(n):
        for t in range(window):
            j = i + t - left
            if 0 <= j < n:
                conv[:, i] += layer.conv.weight[:, 0, t, 0][None, :, None] * v[:, j]
    conv = conv * mask[..., None, None]
    expected = plain(x, mask) + layer.out_proj(conv.reshape(b, n, E))
    torch.testing.assert_close(layer(x, mask), expected)


def test_checkpointing_recomputes_the_same_hashes():
    layer = _layer(conv_window=3).train()
    x, mask = _x().requires_grad_(), _mask()
    params = [x, *layer.parameters()]
    torch.manual_seed(4)
    plain = torch.autograd.grad(layer(x, mask).square().sum(), params)
    torch.manual_seed(4)
    out = torch.utils.checkpoint.checkpoint(layer, x, mask, use_reentrant=False)
    checkpointed = torch.autograd.grad(out.square().sum(), params)
    for a, b in zip(plain, checkpointed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("training", [True, False])
def test_compiles(training):
    layer = _layer(conv_window=3).train(training)
    x, mask = _x().requires_grad_(), _mask()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.manual_seed(6)
    eager = layer(x, mask)
    eager_grad = torch.autograd.grad(eager.square().sum(), x)
    torch.manual_seed(6)
    traced = compiled(x, mask)
    traced_grad = torch.autograd.grad(traced.square().sum(), x)
    torch.testing.assert_close(eager, traced)
    torch.testing.assert_close(eager_grad, traced_grad)


def test_dropout_acts_on_the_output_in_training_only():
    layer = _layer(dropout=0.5, mode="expectation")
    x = _x()
    assert (layer.train()(x) == 0).float().mean() > 0.3
    assert torch.equal(layer.eval()(x), layer.eval()(x))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"embed_dim": 10, "num_heads": 3}, "divisible"),
        ({"num_heads": 0}, "num_heads"),
        ({"hashing": "hadamard", "hash_bits": 9}, "hash_bits <= 8"),
        ({"num_hashes": 0}, "num_hashes"),
        ({"mode": "exact"}, "mode"),
        ({"backward": "sampled"}, "backward"),
        ({"eval_mode": "seeded"}, "eval_mode"),
        ({"eval_seed": 1}, "eval_seed"),
        ({"eval_mode": "sample", "eval_seed": -1}, "eval_seed"),
        ({"dropout": 1.0}, "dropout"),
        ({"conv_window": 0}, "conv_window"),
    ],
)
def test_bad_construction(kwargs, match):
    args = {"embed_dim": E, "num_heads": H, **kwargs}
    with pytest.raises(ValueError, match=match):
        YosoSelfAttention(args.pop("embed_dim"), args.pop("num_heads"), **args)


def test_bad_inputs():
    layer = _layer()
    with pytest.raises(ValueError, match=r"\[batch, seq_len, embed_dim=24\]"):
        layer(torch.randn(2, 5, 7))
    with pytest.raises(TypeError, match="bool"):
        layer(_x(), _mask().long())
    with pytest.raises(ValueError, match=r"\[2, 11\]"):
        layer(_x(), _mask()[:, :5])


def _chunks(layer, x, mask, bounds, **kwargs):
    """The layer run chunk after chunk with the carried state; (outputs concatenated, final state)."""
    state, outs = None, []
    for a, b in zip(bounds[:-1], bounds[1:]):
        chunk_mask = None if mask is None else mask[:, a:b]
        out, state = layer(x[:, a:b], chunk_mask, past_state=state, use_cache=True, **kwargs)
        outs.append(out)
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("conv_window", [None, 3], ids=["yoso", "yoso-c"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_generation_with_the_state_equals_full_recomputation(training, conv_window):
    """Prefill a chunk, then decode token by token carrying the state: the outputs equal one call over the
    whole sequence with the same hash functions (eval: eval_seed; training: the same torch RNG draw). YOSO-C
    carries the last conv_window - 1 values too."""
    layer = _layer(causal=True, eval_mode="sample", eval_seed=3, conv_window=conv_window)
    layer.train(training)
    x, mask = _x(), _mask(lengths=(11, 9))
    torch.manual_seed(7)
    full = layer(x, mask)
    torch.manual_seed(7)
    with torch.no_grad():
        chunked, state = _chunks(layer, x, mask, [0, 5, 6, 7, 8, 9, 10, 11])
    torch.testing.assert_close(chunked, full.detach(), rtol=1e-5, atol=1e-6)
    if conv_window is not None:
        assert tuple(state.values.shape) == (2, H, conv_window - 1, E // H)
        state = state.attention
    assert isinstance(state, yoso.State) and tuple(state.tables.shape) == (2, H, 8, 2**4, E // H)
    assert state.key_tables is None


def test_gradients_through_the_state_equal_full_backpropagation():
    layer = _layer(causal=True)
    x = _x().requires_grad_(True)
    weights = torch.randn(2, 11, E, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    (layer(x) * weights).sum().backward()
    full = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    torch.manual_seed(7)
    chunked, _ = _chunks(layer, x, None, [0, 4, 5, 11], differentiable_state=True)
    (chunked * weights).sum().backward()
    for got, want in zip([x.grad] + [p.grad for p in layer.parameters()], full):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="key tables"):  # without key tables, refused rather than wrong
        _chunks(layer, x, None, [0, 4, 11])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(causal=False, eval_mode="sample"), "need a causal layer"),
        (dict(causal=True), r"need sampled attention.*eval_mode='expectation'"),
        (dict(causal=True, mode="expectation"), r"need sampled attention.*mode='expectation'"),
    ],
)
def test_state_refusals(kwargs, match):
    layer = _layer(**kwargs).eval()
    with pytest.raises(ValueError, match=match):
        layer(_x(), use_cache=True)


def test_past_state_must_be_a_state():
    layer = _layer(causal=True).train()
    with pytest.raises(TypeError, match="past_state must be the State a call of this layer"):
        layer(_x(), past_state=(1, 2))
    _, state = layer(_x(), use_cache=True)
    with pytest.raises(TypeError, match="past_state must be the YosoCState"):
        _layer(causal=True, conv_window=2).train()(_x(), past_state=state)
