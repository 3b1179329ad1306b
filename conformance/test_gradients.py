"""API level: gradients through each framework's autograd equal the formulas of docs/math.md#backward,
as the oracle ``yoso_reference.attention_and_grads`` writes them out."""

from __future__ import annotations

import numpy as np
import pytest

import yoso_reference as ref
from harness import assert_close, clamp, random_mask, unit, untied
from harness import planes as draw_planes


def _problem(rng, n_query=11, n_key=13, dim=6, value_dim=4, batch=2, m=6, tau=3, causal=False):
    if causal:
        n_key = n_query
    p = draw_planes(rng, m, tau, dim)
    return dict(
        q=untied(rng, (batch, n_query, dim), p[None], "gaussian"),
        k=untied(rng, (batch, n_key, dim), p[None], "gaussian"),
        v=rng.standard_normal((batch, n_key, value_dim)),
        cot=rng.standard_normal((batch, n_query, value_dim)),
        planes=p,
        key_padding_mask=random_mask(rng, (batch, n_key)),
        query_mask=random_mask(rng, (batch, n_query)),
        kw=dict(num_hashes=m, hash_bits=tau, causal=causal),
    )


def _oracle(pb, *, planes=None, **options):
    """``(out, (dq, dk, dv))`` of the oracle on the problem's canonical arrays (planes shared: ``[1, ...]``)."""
    return ref.attention_and_grads(
        pb["q"],
        pb["k"],
        pb["v"],
        pb["cot"],
        key_padding_mask=pb["key_padding_mask"],
        query_mask=pb["query_mask"],
        **pb["kw"],
        planes=None if planes is None else planes[None],
        **options,
        max_ratio=clamp(pb["kw"]["hash_bits"]),
    )


def _run(target, pb, **options):
    return target.attention_and_grads(
        pb["q"],
        pb["k"],
        pb["v"],
        pb["cot"],
        key_padding_mask=pb["key_padding_mask"],
        query_mask=pb["query_mask"],
        **pb["kw"],
        **options,
    )


def _unit_vjp(x, g):
    """The chain rule through x / ||x||: (g - u (u·g)) / ||x||."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    u = x / norm
    return (g - u * np.sum(u * g, axis=-1, keepdims=True)) / norm


@pytest.mark.parametrize("backward", ["lower_bound", "exact"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sample_gradients_follow_the_formulas(target, rng, backward, causal):
    """Unnormalised YOSO-m with fixed planes: dV = (S⊙M)^T G, dq̂ = (S⊙W⊙M⊙GV^T) K̂, dk̂ its transpose,
    W = tau/2 (lower bound) or the clamped importance ratio (exact); then the chain rule through q/||q||."""
    pb = _problem(rng, causal=causal)
    tau = pb["kw"]["hash_bits"]
    out, (dq, dk, dv) = _run(target, pb, planes=pb["planes"], backward=backward, normalize=False)

    qu, ku = unit(pb["q"]), unit(pb["k"])
    qm, km = pb["query_mask"], pb["key_mask"] if "key_mask" in pb else pb["key_padding_mask"]
    hashing = dict(hashing="gaussian", num_hashes=pb["kw"]["num_hashes"], hash_bits=tau)
    collisions = ref.collision_matrix(
        ref.hash_codes(qu, pb["planes"][None], **hashing), ref.hash_codes(ku, pb["planes"][None], **hashing)
    )
    weights = collisions * ref.attention_mask(*collisions.shape, qm, km, causal)
    g = np.where(qm[..., None], pb["cot"], 0)
    pair = tau / 2 if backward == "lower_bound" else ref.importance_ratio(qu @ ku.transpose(0, 2, 1), tau, clamp(tau))
    coupling = weights * pair * (g @ pb["v"].transpose(0, 2, 1))
    assert_close(out, weights @ pb["v"], target.dtype, "forward")
    assert_close(dv, weights.transpose(0, 2, 1) @ g, target.dtype, "dv")
    assert_close(dq, _unit_vjp(pb["q"], coupling @ ku), target.dtype, "dq")
    assert_close(dk, _unit_vjp(pb["k"], coupling.transpose(0, 2, 1) @ qu), target.dtype, "dk")


@pytest.mark.parametrize(
    "mode, backward",
    [("sample", "lower_bound"), ("sample", "exact"), ("expectation", "exact"), ("expectation", "lower_bound")],
)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradients_match_oracle(target, rng, mode, backward, normalize, causal):
    """Every option combination agrees with the NumPy oracle's explicit VJP."""
    pb = _problem(rng, causal=causal)
    opts = dict(mode=mode, backward=backward, normalize=normalize, planes=pb["planes"] if mode == "sample" else None)
    out, grads = _run(target, pb, **opts)
    want_out, want_grads = _oracle(pb, **opts)
    assert_close(out, want_out, target.dtype, "out")
    for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
        assert_close(g, w, target.dtype, name)


def test_padded_and_masked_rows_get_zero_gradient(target, rng):
    pb = _problem(rng)
    for mode in ("sample", "expectation"):
        _, (dq, dk, dv) = _run(target, pb, mode=mode, planes=pb["planes"] if mode == "sample" else None)
        assert (dq[~pb["query_mask"]] == 0).all()
        assert (dk[~pb["key_padding_mask"]] == 0).all() and (dv[~pb["key_padding_mask"]] == 0).all()
        assert all(np.isfinite(g).all() for g in (dq, dk, dv))


def test_gradients_reduce_over_broadcast_dims(target, rng):
    """k, v of shape [B, 1, N, D] against q [B, H, N, D]: their gradients sum over the heads."""
    p = draw_planes(rng, 4, 3, 6)
    q = rng.standard_normal((2, 3, 7, 6))
    k, v = rng.standard_normal((2, 1, 9, 6)), rng.standard_normal((2, 1, 9, 4))
    cot = rng.standard_normal((2, 3, 7, 4))
    _, (dq, dk, dv) = target.attention_and_grads(q, k, v, cot, planes=p, num_hashes=4, hash_bits=3)
    assert dk.shape == k.shape and dv.shape == v.shape
    _, (_, dk_full, dv_full) = target.attention_and_grads(
        q,
        np.broadcast_to(k, (2, 3, 9, 6)).copy(),
        np.broadcast_to(v, (2, 3, 9, 4)).copy(),
        cot,
        planes=p,
        num_hashes=4,
        hash_bits=3,
    )
    assert_close(dk, dk_full.sum(axis=1, keepdims=True), target.dtype, "dk")
    assert_close(dv, dv_full.sum(axis=1, keepdims=True), target.dtype, "dv")
