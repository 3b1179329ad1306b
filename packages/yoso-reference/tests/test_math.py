"""Self-checks of the oracle's own math (the conformance suite checks backends against it)."""

from __future__ import annotations

import numpy as np
import pytest

import yoso_reference as ref
from yoso_reference import pairwise, tables


def test_sylvester_hadamard_is_orthogonal():
    for n in (1, 2, 8, 64):
        h = ref.sylvester_hadamard(n)
        np.testing.assert_array_equal(h @ h.T, n * np.eye(n))


def test_hadamard_rotation_preserves_norm_up_to_scale():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 12))
    diagonals = rng.choice([-1.0, 1.0], size=(1, 3, 3, 16))
    u = ref.hadamard_rotate(x, diagonals)  # three unnormalised H of size 16: scale 16^(3/2)
    expected = np.broadcast_to(16**1.5 * np.linalg.norm(x, axis=-1)[..., None], u.shape[:-1])
    np.testing.assert_allclose(np.linalg.norm(u, axis=-1), expected)


def test_derivative_matches_finite_differences():
    x = np.linspace(-0.95, 0.95, 39)
    h = 1e-6
    for tau in (1, 3, 8):
        numeric = (ref.collision_probability(x + h, tau) - ref.collision_probability(x - h, tau)) / (2 * h)
        np.testing.assert_allclose(ref.collision_derivative(x, tau, np.inf), numeric, rtol=1e-6, atol=1e-12)


def test_importance_ratio_is_clamped_and_finite():
    x = np.array([-1.0, -0.999999, 0.0, 0.999999, 1.0])
    w = ref.importance_ratio(x, 8, 80.0)
    assert np.isfinite(w).all() and w.max() == 80.0
    assert np.isfinite(ref.collision_derivative(x, 8, 80.0)).all()
    assert ref.collision_derivative(np.array([-1.0]), 8, 80.0)[0] == 0.0


def test_triple_collision_probability_by_simulation():
    """P[h(a)=h(b)=h(c)] against the frequency over 200k Gaussian hashes (5 sigma)."""
    rng = np.random.default_rng(1)
    vectors = ref.unit_rows(rng.standard_normal((1, 3, 5)))
    planes = rng.standard_normal((1, 200_000, 2, 5))
    codes = ref.gaussian_codes(vectors, planes)[0]  # [m, 3]
    freq = np.mean((codes[:, 0] == codes[:, 1]) & (codes[:, 1] == codes[:, 2]))
    a, b, c = vectors[0]
    p = ref.triple_collision_probability(a @ b, a @ c, b @ c, 2)
    assert abs(freq - p) < 5 * np.sqrt(p * (1 - p) / 200_000)


def test_chunking_does_not_change_results(monkeypatch):
    rng = np.random.default_rng(2)
    q, k = ref.unit_rows(rng.standard_normal((2, 37, 6))), ref.unit_rows(rng.standard_normal((2, 37, 6)))
    v, g = rng.standard_normal((2, 37, 3)), rng.standard_normal((2, 37, 3))
    mask = rng.random((2, 37)) < 0.8
    kw = dict(key_mask=mask, query_mask=mask, causal=True, hash_bits=4)
    whole = ref.expectation_forward(q, k, v, **kw), ref.expectation_backward(q, k, v, g, max_ratio=40.0, **kw)
    monkeypatch.setattr(pairwise, "CHUNK_ELEMENTS", 2 * 37 * 5)  # chunks of 5 query rows
    chunked = ref.expectation_forward(q, k, v, **kw), ref.expectation_backward(q, k, v, g, max_ratio=40.0, **kw)
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-12)
    for a, b in zip(chunked[1], whole[1]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_unit_rows_and_vjp_on_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_array_equal(ref.unit_rows(x), [[0.6, 0.8], [0.0, 0.0]])
    g = ref.unit_rows_vjp(x, np.ones_like(x))
    assert np.isfinite(g).all() and (g[1] == 0).all()


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_expectation_exact_gradient_is_the_derivative(normalize, causal):
    """YOSO-E with backward="exact" is differentiable: the oracle's gradients must match central
    differences of the oracle's forward (float64)."""
    rng = np.random.default_rng(7)
    batch, nq, nk, dim, dv, tau = 2, 11, 11 if causal else 13, 6, 4, 3
    q, k, v = (
        rng.standard_normal((batch, nq, dim)),
        rng.standard_normal((batch, nk, dim)),
        rng.standard_normal((batch, nk, dv)),
    )
    cot = rng.standard_normal((batch, nq, dv))
    masks = dict(key_padding_mask=rng.random((batch, nk)) < 0.7, query_mask=rng.random((batch, nq)) < 0.7)
    masks["key_padding_mask"][:, 0] = masks["query_mask"][:, 0] = True
    opts = dict(mode="expectation", hash_bits=tau, causal=causal, normalize=normalize, **masks)
    _, grads = ref.attention_and_grads(q, k, v, cot, backward="exact", max_ratio=np.inf, **opts)

    def loss(**replace):
        args = {n: replace.get(n, x) for n, x in (("q", q), ("k", k), ("v", v))}
        out = ref.attention(**args, **opts)
        return float(np.sum(np.where(masks["query_mask"][..., None], out, 0) * cot))

    h = 1e-6
    for name, x, grad in zip("qkv", (q, k, v), grads):
        direction = rng.standard_normal(x.shape)
        numeric = (loss(**{name: x + h * direction}) - loss(**{name: x - h * direction})) / (2 * h)
        analytic = float(np.sum(grad * direction))
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), f"d{name}: {analytic} vs {numeric}"


def test_unit_rows_vjp_matches_finite_differences():
    rng = np.random.default_rng(8)
    x, g = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    x[1] = 0  # a zero row: constant output, zero gradient
    direction = rng.standard_normal(x.shape)
    direction[1] = 0
    h = 1e-6
    numeric = (np.sum(ref.unit_rows(x + h * direction) * g) - np.sum(ref.unit_rows(x - h * direction) * g)) / (2 * h)
    vjp = ref.unit_rows_vjp(x, g)
    assert abs(numeric - np.sum(vjp * direction)) < 1e-7 and (vjp[1] == 0).all()


def _lower_bound_problem(rng, batch=2, n=23, dim=5, dv=4, m=3, tau=2):
    q, k = ref.unit_rows(rng.standard_normal((batch, n, dim))), ref.unit_rows(rng.standard_normal((batch, n, dim)))
    v, g = rng.standard_normal((batch, n, dv)), rng.standard_normal((batch, n, dv))
    codes = rng.integers(0, 2**tau, (2, batch, m, n))
    mask = rng.random((2, batch, n)) < 0.7
    mask[:, :, 0] = True
    return (codes[0], codes[1], q, k, v, g), dict(query_mask=mask[0], key_mask=mask[1], hash_bits=tau)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_table_form_chunking_does_not_change_results(monkeypatch, causal):
    """Rows and value columns in chunks (the memory bound) give the same tables."""
    args, kw = _lower_bound_problem(np.random.default_rng(3))
    whole = ref.lower_bound_tables(*args, causal=causal, **kw)
    monkeypatch.setattr(tables, "CHUNK_ELEMENTS", 23 * 5 * 2)  # one row, two value columns at a time
    chunked = ref.lower_bound_tables(*args, causal=causal, **kw)
    for a, b in zip(chunked, whole):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    pairs = ref.sampled_grads(*args, causal=causal, backward="lower_bound", max_ratio=20.0, form="pairs", **kw)
    for a, b in zip(whole, pairs):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_lower_bound_costs_count_pairs_and_tables():
    """One row, one hash: queries in buckets (0, 0, 1), keys in (0, 1, 1, 1), the last key masked."""
    q_codes, k_codes = np.array([[[0, 0, 1]]]), np.array([[[0, 1, 1, 1]]])
    key_mask = np.array([[True, True, True, False]])
    costs = ref.lower_bound_costs(q_codes, k_codes, dim=3, value_dim=2, key_mask=key_mask)
    # pairs: bucket 0: 2 queries x 1 key, bucket 1: 1 x 2 -> 4 pairs of (Dv + 2D) = 8; tables: 6 tokens x 2 D Dv
    assert costs == {"pairs": 4 * 8, "tables": 6 * 2 * 3 * 2}
    crowded = np.zeros((1, 2, 200), int)
    assert tables.choose_form(crowded, crowded, dim=8, value_dim=8) == "tables"
    spread = np.arange(400).reshape(1, 2, 200) % 64
    assert tables.choose_form(spread, spread + 1, dim=8, value_dim=8) == "pairs"


def test_sampled_grads_refuses_bad_forms():
    args, kw = _lower_bound_problem(np.random.default_rng(4))
    with pytest.raises(ValueError, match="form must be one of"):
        ref.sampled_grads(*args, max_ratio=20.0, form="table", **kw)
    with pytest.raises(ValueError, match="tables"):
        ref.sampled_grads(*args, backward="exact", max_ratio=20.0, form="tables", **kw)
