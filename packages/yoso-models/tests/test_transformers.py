"""yoso_models.transformers: attn_implementation="yoso" and the YosoModel kernels (tiny random models).

The ``models`` nox session installs transformers and sets YOSO_TEST_REQUIRE_TRANSFORMERS=1, so these
tests fail there instead of skipping when it is missing.
"""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; make sure nothing tries

torch = pytest.importorskip("torch")
if os.environ.get("YOSO_TEST_REQUIRE_TRANSFORMERS"):
    import transformers
else:
    transformers = pytest.importorskip("transformers")

from transformers.models.yoso import modeling_yoso  # noqa: E402

import yoso  # noqa: E402
from yoso_models import transformers as yoso_hf  # noqa: E402
from yoso_models._yoso_model import draw_diagonals, gaussian_hashing  # noqa: E402

SMALL = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)
SMALL["max_position_embeddings"] = 64


@pytest.fixture(autouse=True)
def _clean_yoso_module():
    """Every test starts and ends with modeling_yoso as transformers ships it."""
    saved = modeling_yoso.lsh_cumulation, modeling_yoso.hashing, modeling_yoso.YosoSelfAttention.forward
    yield
    modeling_yoso.lsh_cumulation, modeling_yoso.hashing, modeling_yoso.YosoSelfAttention.forward = saved


def _ids(batch=2, length=13, seed=0):
    return torch.randint(3, SMALL["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def _padding(batch=2, length=13, real=(13, 8)):
    return (torch.arange(length)[None, :] < torch.tensor(real)[:, None]).long()


# ---- the kernels for transformers' YosoModel -------------------------------------------------------------


def _brute_cumulation(qm, qc, km, kc, value, qw=None, kw=None):
    """out_i = (1/m) sum_s sum_j [qc_is == kc_js] km_j (qw_i . kw_j) value_j, qm-masked; explicit loops."""
    b, nq, m = qc.shape
    out = torch.zeros(b, nq, value.shape[-1], dtype=torch.float64)
    for r in range(b):
        for i in range(nq):
            if not qm[r, i]:
                continue
            for j in range(kc.shape[1]):
                hits = int((qc[r, i] == kc[r, j]).sum())
                weight = 1.0 if qw is None else float(qw[r, i].double() @ kw[r, j].double())
                out[r, i] += hits / m * float(km[r, j] != 0) * weight * value[r, j].double()
    return out


def _codes_and_masks(b=3, nq=9, nk=7, m=5, tau=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    qc = torch.randint(0, 2**tau, (b, nq, m), generator=g, dtype=torch.int32)
    kc = torch.randint(0, 2**tau, (b, nk, m), generator=g, dtype=torch.int32)
    qm = (torch.rand(b, nq, generator=g) > 0.2).int()
    km = (torch.rand(b, nk, generator=g) > 0.3).int()
    return qm, qc, km, kc, g


def test_lsh_cumulation_is_the_mean_collision_sum():
    qm, qc, km, kc, g = _codes_and_masks()
    value = torch.randn(3, 7, 6, generator=g)
    out = yoso_hf.YosoKernels().lsh_cumulation(qm, qc, km, kc, value, 8, False, 1)
    assert out.dtype == value.dtype and out.shape == (3, 9, 6)
    torch.testing.assert_close(out.double(), _brute_cumulation(qm, qc, km, kc, value), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight_dim", [4, 40])  # 40 * 6 columns > 1024: exercises the chunking
def test_lsh_weighted_cumulation_is_the_weighted_collision_sum(weight_dim):
    qm, qc, km, kc, g = _codes_and_masks(seed=1)
    value = torch.randn(3, 7, 26, generator=g)
    qw, kw = torch.randn(3, 9, weight_dim, generator=g), torch.randn(3, 7, weight_dim, generator=g)
    out = yoso_hf.YosoKernels().lsh_weighted_cumulation(qm, qc, qw, km, kc, kw, value, 8, False, 4)
    expected = _brute_cumulation(qm, qc, km, kc, value, qw, kw)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def _documented_hadamard_codes(x, diagonals, num_hash, hash_len):
    """``yoso.hash_planes``' hadamard layout written out for one batch row: ``x [N, D]``, ``diagonals [R, 3, D']``.

    Rotation r maps the zero-padded row to ``H d3 H d2 H d1 x`` (H the Sylvester-Hadamard matrix); hash s takes
    the tau signs of rotation ``s // (D'//tau)`` from coordinate ``(s % (D'//tau)) * tau``, bit b weighing 2**b.
    """
    d_pad = diagonals.shape[-1]
    hadamard = np.ones((1, 1))
    while hadamard.shape[0] < d_pad:
        hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    padded = np.pad(x, ((0, 0), (0, d_pad - x.shape[1])))
    per = d_pad // hash_len
    codes = np.zeros((x.shape[0], num_hash), dtype=np.int64)
    for s in range(num_hash):
        rotation, start = s // per, (s % per) * hash_len
        u = padded
        for step in range(3):
            u = (u * diagonals[rotation, step]) @ hadamard
        codes[:, s] = ((u[:, start : start + hash_len] > 0) * 2 ** np.arange(hash_len)).sum(axis=1)
    return codes


def test_fast_hash_codes_follow_the_documented_hadamard_layout():
    """Per batch row: its own diagonals (from torch's RNG), the hadamard layout, code 0 for masked tokens."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 11, 20, dtype=torch.float64, generator=g)
    k = torch.randn(3, 7, 20, dtype=torch.float64, generator=g)
    q[1] = q[0]  # same rows, other batch row: other hash functions, so other codes
    qm, km = torch.ones(3, 11, dtype=torch.int32), torch.ones(3, 7, dtype=torch.int32)
    qm[2, 8:], km[1, :3] = 0, 0
    q[2, 8:] = float("nan")  # whatever a masked token holds
    torch.manual_seed(9)
    qc, kc = yoso_hf.YosoKernels().fast_hash(qm, q, km, k, 13, 5, False, 1)  # D' = 32: 6 per rotation, R = 3
    torch.manual_seed(9)
    diagonals = draw_diagonals(3, 20, 13, 5, device="cpu", dtype=torch.float64)
    assert diagonals.shape == (3, 3, 3, 32) and bool(((diagonals == 1) | (diagonals == -1)).all())
    assert qc.dtype == kc.dtype == torch.int32 and qc.shape == (3, 11, 13) and kc.shape == (3, 7, 13)
    for row in range(3):
        for codes, x, mask in ((qc, q, qm), (kc, k, km)):
            expected = _documented_hadamard_codes(x[row].numpy(), diagonals[row].numpy(), 13, 5)
            expected[mask[row].numpy() == 0] = 0
            np.testing.assert_array_equal(codes[row].numpy(), expected)
    assert not torch.equal(qc[0], qc[1])
    assert not qc[2, 8:].any() and not kc[1, :3].any()


def test_fast_hash_codes_are_yoso_hash_codes_with_per_row_planes():
    g = torch.Generator().manual_seed(12)
    q, k = torch.randn(4, 9, 16, generator=g), torch.randn(4, 6, 16, generator=g)
    qm, km = torch.ones(4, 9, dtype=torch.int32), torch.ones(4, 6, dtype=torch.int32)
    torch.manual_seed(13)
    qc, kc = yoso_hf.YosoKernels().fast_hash(qm, q, km, k, 10, 3, False, 1)
    torch.manual_seed(13)
    planes = draw_diagonals(4, 16, 10, 3, device="cpu", dtype=torch.float32)
    for codes, x in ((qc, q), (kc, k)):
        assert torch.equal(codes, yoso.hash_codes(x, planes=planes, num_hashes=10, hash_bits=3, hashing="hadamard"))


def test_fast_hash_then_cumulation_equals_yoso_attention():
    """Our codes + our cumulation == yoso.attention(hashing="hadamard") given the same diagonals."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 10, 16, generator=g) for _ in range(3))
    km = torch.ones(2, 10, dtype=torch.int32)
    km[1, 6:] = 0
    qm = torch.ones_like(km)
    torch.manual_seed(10)
    qc, kc = yoso_hf.YosoKernels().fast_hash(qm, q, km, k, 6, 4)
    torch.manual_seed(10)
    diagonals = draw_diagonals(2, 16, 6, 4, device="cpu", dtype=torch.float32)
    out = yoso_hf.YosoKernels().lsh_cumulation(qm, qc, km, kc, v, 16)
    expected = yoso.attention(
        q,
        k,
        v,
        key_padding_mask=km.bool(),
        num_hashes=6,
        hash_bits=4,
        hashing="hadamard",
        planes=diagonals,
        normalize=False,
    )
    torch.testing.assert_close(out, expected)


def test_fast_hash_returns_int32_codes_per_row():
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(4, 9, 32, generator=g), torch.randn(4, 7, 32, generator=g)
    masks = torch.ones(4, 9, dtype=torch.int32), torch.ones(4, 7, dtype=torch.int32)
    qc, kc = yoso_hf.YosoKernels().fast_hash(masks[0], q, masks[1], k, 16, 9, False, 1)
    assert qc.shape == (4, 9, 16) and kc.shape == (4, 7, 16) and qc.dtype == kc.dtype == torch.int32
    assert int(qc.min()) >= 0 and int(qc.max()) < 2**9


def test_upstream_hashing_bug_and_the_fix():
    """Upstream hashing() returns the key codes twice; the fixed one hashes queries and keys with one draw."""
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 9, 8, generator=g), torch.randn(2, 9, 8, generator=g)
    torch.manual_seed(0)
    upstream_q, upstream_k = modeling_yoso.hashing(q, k, 4, 3)
    assert torch.equal(upstream_q, upstream_k)  # the bug: queries are never hashed
    torch.manual_seed(0)
    fixed_q, fixed_k = gaussian_hashing(q, k, 4, 3)
    assert fixed_q.dtype == fixed_k.dtype == torch.int32 and fixed_q.shape == (2, 9, 4)
    assert torch.equal(fixed_k, upstream_k)  # upstream's draw: its key codes are right
    torch.manual_seed(0)
    planes = torch.randn(2, 8, 12)
    bits = lambda x: ((x @ planes) > 0).int().reshape(2, 9, 4, 3)
    code = lambda x: (bits(x) * torch.tensor([1, 2, 4], dtype=torch.int32)).sum(-1)
    assert torch.equal(fixed_q, code(q)) and torch.equal(fixed_k, code(k))
    assert not torch.equal(fixed_q, fixed_k)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda y, qm, qc, km, kc, v: y.lsh_cumulation(qm, qc, km, kc, v, 12), "power of two"),
        (lambda y, qm, qc, km, kc, v: y.lsh_cumulation(qm, qc + 8, km, kc, v, 8), "outside"),
        (lambda y, qm, qc, km, kc, v: y.lsh_cumulation(qm[:, :3], qc, km, kc, v, 8), "query_mask"),
        (lambda y, qm, qc, km, kc, v: y.lsh_cumulation(qm, qc, km, kc, v[:, :2], 8), "value"),
        (lambda y, qm, qc, km, kc, v: y.lsh_cumulation(qm, qc, km, kc[..., :2], v, 8), "hashes"),
        (lambda y, qm, qc, km, kc, v: y.lsh_cumulation(qm, qc.float(), km, kc, v, 8), "int32"),
    ],
)
def test_kernels_refuse_bad_input(call, match):
    qm, qc, km, kc, g = _codes_and_masks()
    with pytest.raises(ValueError, match=match):
        call(yoso_hf.YosoKernels(), qm, qc, km, kc, torch.randn(3, 7, 6, generator=g))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"query_mask": torch.ones(2, 8, dtype=torch.int32)}, "query_mask"),
        ({"hash_code_len": 9}, "hash_code_len <= 8"),  # D' = 8 for head dim 8
        ({"key_vector": torch.randn(2, 5, 6)}, "differ"),
        ({"query_vector": torch.randn(9, 8)}, "batch"),
    ],
)
def test_fast_hash_refuses_bad_input(changes, match):
    args = dict(
        query_mask=torch.ones(2, 9, dtype=torch.int32),
        query_vector=torch.randn(2, 9, 8),
        key_mask=torch.ones(2, 5, dtype=torch.int32),
        key_vector=torch.randn(2, 5, 8),
        num_hash=4,
        hash_code_len=3,
    )
    with pytest.raises(ValueError, match=match):
        yoso_hf.YosoKernels().fast_hash(**{**args, **changes})


# ---- patch_yoso_model() on transformers' YosoModel -----------------------------------------------------


def _yoso_model(**overrides):
    torch.manual_seed(0)
    config = transformers.YosoConfig(
        **{**SMALL, "use_expectation": False, "num_hash": 8, "hash_code_len": 4, **overrides}
    )
    return transformers.YosoModel(config)


def test_yoso_model_sampled_path_fails_on_cpu_without_the_patch():
    modeling_yoso.lsh_cumulation = None
    with pytest.raises(AttributeError, match="fast_hash"):
        _yoso_model().train()(_ids())


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"use_fast_hash": False},
        {"lsh_backward": False},
        {"conv_window": 3},
        {"hash_code_len": 9, "num_hash": 32},
    ],
)
def test_patched_yoso_model_runs_forward_and_backward(overrides):
    yoso_hf.patch_yoso_model()
    model = _yoso_model(**overrides).train()
    out = model(_ids(), attention_mask=_padding()).last_hidden_state
    assert out.shape == (2, 13, 32) and torch.isfinite(out).all()
    out.square().sum().backward()
    attention = model.encoder.layer[0].attention.self
    for name, p in attention.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(_ids()).last_hidden_state).all()


def test_patched_yoso_model_with_gradient_checkpointing_gets_the_same_gradients():
    yoso_hf.patch_yoso_model()
    model = _yoso_model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    params = [p for p in model.parameters() if p.requires_grad]

    def grads():
        torch.manual_seed(11)
        return torch.autograd.grad(model(_ids()).last_hidden_state.square().sum(), params, allow_unused=True)

    plain = grads()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.encoder.gradient_checkpointing or any(
        getattr(m, "gradient_checkpointing", False) for m in model.modules()
    )
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        assert (a is None and b is None) or torch.equal(a, b)


def _padding_leak(model):
    """How much the padded tokens of example 1 change its real tokens' outputs (0: padding is exact)."""
    ids, mask = _ids(), _padding()
    other = ids.clone()
    other[1, 8:] = (other[1, 8:] + 7) % SMALL["vocab_size"]
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(ids, attention_mask=mask).last_hidden_state
        torch.manual_seed(1)
        b = model(other, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a[0], b[0])  # the unpadded example is untouched
    return float((a[1, :8] - b[1, :8]).abs().max())


def test_upstream_padding_bug_is_still_upstream():
    """YosoModel's int(1 + mask/10000) makes every token real: padded content leaks into real tokens.

    Pinned on the unpatched expectation path (the sampled one needs the patch to run at all), so this fails --
    and the docs need updating -- once transformers fixes it.
    """
    assert _padding_leak(_yoso_model(use_expectation=True).eval()) > 1e-3


@pytest.mark.parametrize("use_expectation", [False, True])
def test_the_patch_makes_padding_exact(use_expectation):
    """patch_yoso_model() hands YosoSelfAttention its mask as (mask - 1) * 1e4: padded tokens change nothing."""
    yoso_hf.patch_yoso_model()
    assert _padding_leak(_yoso_model(use_expectation=use_expectation).eval()) == 0.0


def test_the_patch_leaves_yoso_c_padding_as_upstream_has_it():
    """With conv_window (YOSO-C) the mask also multiplies the convolution's values, where it must stay 0/1: the
    patch leaves the mask alone and the leak remains (documented), in both paths."""
    yoso_hf.patch_yoso_model()
    for use_expectation in (False, True):
        assert _padding_leak(_yoso_model(use_expectation=use_expectation, conv_window=3).eval()) > 1e-3


def test_additive_mask_converts_only_zero_one_masks():
    from yoso_models._yoso_model import additive_mask

    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(additive_mask(mask), torch.tensor([[0.0, 0.0, -1e4], [0.0, -1e4, -1e4]]))
    assert torch.equal(1.0 + additive_mask(mask) / 10000.0, mask.float())  # what YosoSelfAttention computes
    already = torch.tensor([[0.0, -1e4]])
    assert torch.equal(additive_mask(already), already)  # the documented workaround passes through
    assert torch.equal(additive_mask(torch.zeros(1, 3)), torch.zeros(1, 3))  # upstream: all real


def test_patch_restores_and_repatches():
    original = modeling_yoso.lsh_cumulation, modeling_yoso.hashing
    original_forward = modeling_yoso.YosoSelfAttention.forward
    first = yoso_hf.patch_yoso_model()
    second = yoso_hf.patch_yoso_model()  # patching twice keeps the true original for restore()
    assert modeling_yoso.lsh_cumulation is second and modeling_yoso.hashing is gaussian_hashing
    assert modeling_yoso.YosoSelfAttention.forward.__yoso_original__ is original_forward  # wrapped once
    second.restore()
    assert (modeling_yoso.lsh_cumulation, modeling_yoso.hashing) == original
    assert modeling_yoso.YosoSelfAttention.forward is original_forward
    assert first is not second


def _fake_module(tmp_path, name, body):
    import importlib.util

    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_patch_refuses_a_yoso_module_that_differs(tmp_path):
    changed = _fake_module(
        tmp_path,
        "modeling_yoso_changed",
        """
        lsh_cumulation = None

        def hashing(query, key, num_hash, hash_len):
            pass

        def forward(q, k, v, m):
            codes = lsh_cumulation.fast_hash(m, q, m, k, 8, 9, True)
            return lsh_cumulation.lsh_cumulation_v2(m, codes, m, codes, v, 512, True, 1)
        """,
    )
    with pytest.raises(
        RuntimeError, match=r"fast_hash\(\) with 8 arguments.*fast_hash\(\) with \[7\].*lsh_cumulation_v2"
    ):
        yoso_hf.patch_yoso_model(module=changed)
    assert changed.lsh_cumulation is None  # nothing was touched

    no_object = _fake_module(tmp_path, "modeling_yoso_rewritten", "def forward():\n    pass\n")
    with pytest.raises(RuntimeError, match="no module-level `lsh_cumulation` object"):
        yoso_hf.patch_yoso_model(module=no_object, fix_hashing=False)


# ---- attn_implementation="yoso" on BERT-family models --------------------------------------------------


@pytest.fixture(scope="module")
def registered():
    return yoso_hf.register("yoso", num_hashes=8, hash_bits=4)


def _bert(kind="Bert", **overrides):
    torch.manual_seed(0)
    config_cls = getattr(transformers, f"{kind}Config")
    if kind == "DistilBert":
        config = config_cls(vocab_size=40, dim=32, n_layers=2, n_heads=2, hidden_dim=48, max_position_embeddings=64)
    else:
        config = config_cls(**SMALL, **overrides)
    config._attn_implementation = "yoso"
    model_cls = getattr(transformers, f"{kind}LMHeadModel" if overrides.get("is_decoder") else f"{kind}Model")
    return model_cls(config)


def _hidden(output):
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


@pytest.mark.parametrize("kind", ["Bert", "Roberta", "Electra", "DistilBert", "Albert"])
def test_bert_family_trains_with_yoso(registered, kind):
    model = _bert(kind).train()
    out = _hidden(model(_ids(), attention_mask=_padding()))
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "query" in n or "q_lin" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("training", [True, False])
def test_padded_tokens_cannot_change_unpadded_outputs(registered, training):
    model = _bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train(training)
    ids, mask = _ids(), _padding()
    other = ids.clone()
    other[1, 8:] = (other[1, 8:] + 7) % SMALL["vocab_size"]
    torch.manual_seed(1)
    a = model(ids, attention_mask=mask).last_hidden_state
    torch.manual_seed(1)
    b = model(other, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()])


def test_eval_is_deterministic(registered):
    model = _bert().eval()
    with torch.no_grad():
        assert torch.equal(model(_ids()).last_hidden_state, model(_ids()).last_hidden_state)


def test_causal_decoder_ignores_the_future(registered):
    model = _bert(is_decoder=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    ids = _ids()
    later = ids.clone()
    later[:, 9:] = (later[:, 9:] + 5) % SMALL["vocab_size"]
    torch.manual_seed(2)
    a = model(ids, attention_mask=_padding(real=(13, 11)), use_cache=False).logits
    torch.manual_seed(2)
    b = model(later, attention_mask=_padding(real=(13, 11)), use_cache=False).logits
    torch.testing.assert_close(a[:, :9], b[:, :9])


def test_scaling_does_not_apply(registered):
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g) for _ in range(3))
    module = torch.nn.Module().eval()
    forward = transformers.AttentionInterface()["yoso"]
    small, _ = forward(module, q, k, v, None, scaling=0.01)
    large, _ = forward(module, q, k, v, None, scaling=100.0)
    assert torch.equal(small, large) and small.shape == (2, 9, 3, 8)


def test_grouped_key_value_heads_are_shared(registered):
    g = torch.Generator().manual_seed(7)
    q, k, v = (
        torch.randn(2, 4, 9, 8, generator=g),
        torch.randn(2, 1, 9, 8, generator=g),
        torch.randn(2, 1, 9, 8, generator=g),
    )
    module = torch.nn.Module().eval()
    forward = transformers.AttentionInterface()["yoso"]
    out, weights = forward(module, q, k, v, None)
    expected = yoso.attention(q, k, v, mode="expectation", hash_bits=4).transpose(1, 2)
    assert weights is None
    torch.testing.assert_close(out, expected)


# ---- masks ---------------------------------------------------------------------------------------------


def _sdpa_mask(padding, causal=False):
    n = padding.shape[1]
    allowed = padding.bool()[:, None, None, :].expand(-1, 1, n, n)
    return allowed & torch.ones(n, n, dtype=torch.bool).tril() if causal else allowed


def test_masks_from_bool_and_float_masks():
    padding = _padding(length=6, real=(6, 4))
    bool_mask = _sdpa_mask(padding)
    float_mask = torch.zeros(2, 1, 6, 6).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    for mask in (bool_mask, float_mask):
        query_mask, key_mask, causal = yoso_hf.masks_from_attention_mask(
            mask, batch=2, q_len=6, kv_len=6, causal_hint=False
        )
        assert query_mask is None and not causal
        assert torch.equal(key_mask, padding.bool()[:, None, :])
    query_mask, key_mask, causal = yoso_hf.masks_from_attention_mask(
        _sdpa_mask(padding, causal=True), batch=2, q_len=6, kv_len=6, causal_hint=False
    )
    assert causal and torch.equal(key_mask, padding.bool()[:, None, :])
    assert yoso_hf.masks_from_attention_mask(None, batch=2, q_len=6, kv_len=6, causal_hint=True) == (None, None, True)


def test_fully_masked_query_rows_become_masked_queries():
    mask = _sdpa_mask(_padding(length=5, real=(5, 3))).clone()
    mask[1, :, 3:] = False  # padded queries see nothing
    query_mask, key_mask, causal = yoso_hf.masks_from_attention_mask(
        mask, batch=2, q_len=5, kv_len=5, causal_hint=False
    )
    assert torch.equal(query_mask, key_mask) and not causal


@pytest.mark.parametrize(
    "mask, kwargs, error, match",
    [
        (torch.ones(2, 5, dtype=torch.bool), {}, ValueError, "4-D mask"),
        (torch.ones(2, 1, 5, 4, dtype=torch.bool), {}, ValueError, "shape"),
        (torch.ones(3, 1, 5, 5, dtype=torch.bool), {}, ValueError, "shape"),
        (torch.ones(2, 1, 5, 5, dtype=torch.long), {}, TypeError, "bool"),
        (torch.ones(2, 5, 5, 5, dtype=torch.bool).tril(-1).logical_not(), {}, ValueError, "not a key padding"),
        (torch.ones(5, 5, dtype=torch.bool).triu(-1).tril(1).expand(2, 1, 5, 5), {}, ValueError, "sliding windows"),
        (-torch.arange(5.0).expand(2, 1, 5, 5), {}, ValueError, "additive biases"),
        (torch.ones(2, 2, 5, 5, dtype=torch.bool).index_fill(1, torch.tensor([1]), False), {}, ValueError, "heads"),
        ("mask", {}, TypeError, "torch.Tensor"),
        (None, {"q_len": 3, "causal_hint": True}, ValueError, "offset causal"),
    ],
)
def test_masks_yoso_cannot_express_are_refused(mask, kwargs, error, match):
    args = {"batch": 2, "q_len": 5, "kv_len": 5, "causal_hint": False, **kwargs}
    with pytest.raises(error, match=match):
        yoso_hf.masks_from_attention_mask(mask, **args)


def test_unsupported_attention_features_are_refused(registered):
    q = torch.randn(1, 2, 4, 8)
    forward = transformers.AttentionInterface()["yoso"]
    with pytest.raises(ValueError, match="sliding-window"):
        forward(torch.nn.Module(), q, q, q, None, sliding_window=2)
    with pytest.raises(ValueError, match="4-D tensor"):
        forward(torch.nn.Module(), q[0], q[0], q[0], None)


# ---- registration and models without an attention interface -------------------------------------------


def test_register_adds_attention_and_mask_functions():
    name = yoso_hf.register("yoso-e-test", mode="expectation")
    assert name in transformers.AttentionInterface()
    assert name in transformers.masking_utils.AttentionMaskInterface()


@pytest.mark.parametrize(
    "kwargs, match", [({"mode": "exact"}, "mode"), ({"num_hashes": 0}, "num_hashes"), ({"eval_seed": 3}, "eval_seed")]
)
def test_register_refuses_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        yoso_hf.register("yoso-bad", **kwargs)


def test_enable_switches_a_bert_model(registered):
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**SMALL))
    assert model.config._attn_implementation != "yoso"
    yoso_hf.enable(model, "yoso")
    assert model.config._attn_implementation == "yoso"
    assert torch.isfinite(model(_ids(), attention_mask=_padding()).last_hidden_state).all()


def test_enable_refuses_models_without_an_attention_interface():
    model = _yoso_model()
    with pytest.raises(
        ValueError, match=r"YosoModel does not dispatch attention through .*AttentionInterface.*patch_yoso_model"
    ):
        yoso_hf.enable(model)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        yoso_hf.enable(torch.nn.Linear(2, 2))


def test_register_needs_an_attention_interface(monkeypatch):
    import types

    old = types.SimpleNamespace(__version__="4.40.0")
    monkeypatch.setattr(yoso_hf, "_import_transformers", lambda: old)
    with pytest.raises(ImportError, match=r"transformers 4.40.0 has no AttentionInterface"):
        yoso_hf.register("yoso-old")


def test_dropout_applies_to_the_output_in_training_only(registered):
    q = torch.randn(2, 2, 16, 8, generator=torch.Generator().manual_seed(8))
    forward = transformers.AttentionInterface()["yoso"]
    module = torch.nn.Module()
    dropped, _ = forward(module.train(), q, q, q, None, dropout=0.5)
    assert 0.3 < float((dropped == 0).float().mean()) < 0.7
    kept, _ = forward(module.eval(), q, q, q, None, dropout=0.5)
    assert not (kept == 0).any()
