"""In distribution: the sampled estimators average to their analytic targets, with the right variance.

Each test draws R independent sets of hash functions at once -- one per batch row, through per-row
planes -- so one call gives R independent samples. Seeds are fixed; tolerances are 5 standard errors
(exact ones where a closed form exists), so a test neither passes by luck nor fails by chance, and a
wrong factor (tau/2, 1/m, a mask) is many standard errors away.
"""

from __future__ import annotations

import numpy as np
import pytest

import yoso
import yoso_reference as ref
from harness import clamp, random_mask, to_numpy, unit

DRAWS = 4000


def _inputs(rng, nq=4, nk=10, dim=6, dv=2):
    return rng.standard_normal((nq, dim)), rng.standard_normal((nk, dim)), rng.standard_normal((nk, dv))


def _exact_variance(q, k, v, key_mask, causal, hash_bits, num_hashes):
    """Var[Y_ic] of YOSO-m (Gaussian hashing): (1/m) v_c^T (P3_i - p_i p_i^T) v_c over the visible keys,
    with P3_i[j, j'] = P[h(q_i) = h(k_j) = h(k_j')] (``triple_collision_probability``)."""
    qu, ku = unit(q), unit(k)
    x_qk, x_kk = qu @ ku.T, ku @ ku.T
    visible = ref.attention_mask(1, len(q), len(k), None, key_mask[None], causal)[0].astype(float)
    variance = np.zeros((len(q), v.shape[1]))
    for i in range(len(q)):
        p = ref.collision_probability(x_qk[i], hash_bits) * visible[i]
        triple = ref.triple_collision_probability(x_qk[i][:, None], x_qk[i][None, :], x_kk, hash_bits)
        cov = triple * np.outer(visible[i], visible[i]) - np.outer(p, p)
        variance[i] = np.einsum("jc,jk,kc->c", v, cov, v)
    return variance / num_hashes


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_yoso_mean_and_variance_match_closed_forms(target, rng, causal):
    """Mean of YOSO-m over draws = YOSO-E; its variance = the exact closed form (5 standard errors)."""
    hash_bits, num_hashes = 2, 2
    q, k, v = _inputs(rng, nq=6 if causal else 4, nk=6 if causal else 10)
    key_mask = random_mask(rng, (len(k),))
    planes = np.stack([yoso.hash_planes(num_hashes, hash_bits, q.shape[1], seed=rng) for _ in range(DRAWS)])
    batch = lambda x: np.broadcast_to(x, (DRAWS,) + x.shape).copy()  # noqa: E731
    samples = target.attention(
        batch(q),
        batch(k),
        batch(v),
        key_padding_mask=batch(key_mask),
        planes=planes,
        num_hashes=num_hashes,
        hash_bits=hash_bits,
        causal=causal,
        normalize=False,
    )
    expected = ref.expectation_forward(
        unit(q)[None], unit(k)[None], v[None], key_mask=key_mask[None], causal=causal, hash_bits=hash_bits
    )[0]
    variance = _exact_variance(q, k, v, key_mask, causal, hash_bits, num_hashes)
    z = (samples.mean(axis=0) - expected) / np.sqrt(variance / DRAWS + 1e-300)
    assert np.abs(z).max() < 5, f"mean off by {np.abs(z).max():.1f} standard errors"

    centred = samples - samples.mean(axis=0)
    empirical = (centred**2).mean(axis=0)
    se = np.sqrt(np.maximum((centred**4).mean(axis=0) - empirical**2, 0) / DRAWS)
    assert np.all(np.abs(empirical - variance) <= 5 * se + 1e-12), (
        f"variance {empirical.ravel()} vs exact {variance.ravel()} (se {se.ravel()})"
    )


def _draw_codes(kernel, rng, q, k, num_hashes, hash_bits):
    """Codes [DRAWS, m, N] of the rows q and k under DRAWS independent hash functions (shared by q and k)."""
    planes = kernel.array(
        np.stack([yoso.hash_planes(num_hashes, hash_bits, q.shape[1], seed=rng) for _ in range(DRAWS)])
    )
    return tuple(
        kernel.backend.hash_codes(
            kernel.array(np.broadcast_to(unit(x), (DRAWS,) + x.shape).copy()),
            planes,
            hashing="gaussian",
            num_hashes=num_hashes,
            hash_bits=hash_bits,
        )
        for x in (q, k)
    )


def _assert_unbiased(samples: np.ndarray, target: np.ndarray, what: str) -> None:
    se = samples.std(axis=0, ddof=1) / np.sqrt(len(samples))
    floor = 1e-9 * np.abs(target).max()
    z = np.abs(samples.mean(axis=0) - target) / (se + floor)
    assert z.max() < 5, f"{what}: mean off by {z.max():.1f} standard errors"


@pytest.mark.parametrize(
    "backward, form", [("lower_bound", "pairs"), ("lower_bound", "tables"), ("exact", "auto")], ids=lambda x: x
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradient_estimators_are_unbiased(kernel, rng, backward, form, causal):
    """E[sampled dq, dk] = YOSO-E's gradient of the same kind; E[dv] = P^T G (roles-swapped cumulation).

    The lower bound in each form the backend computes: the table form reads the same collisions
    through per-bucket tables, so it must be unbiased as well."""
    if form != "auto" and form not in kernel.backend.lower_bound_forms:
        forms = kernel.backend.lower_bound_forms
        pytest.skip(f"the {kernel.name!r} backend does not compute the {form!r} form (lower_bound_forms = {forms})")
    if form == "tables" and kernel.name != "reference":
        # Given the same codes, every backend's table form equals the reference's pair form to rounding
        # (test_primitives.py::test_lower_bound_forms, on every backend); the reference's table form is
        # checked unbiased here. Together they make the backend's unbiased -- without 4000 batch rows of
        # table-form programs, which the Triton interpreter runs one at a time (minutes).
        pytest.skip("the table form is unbiased by the reference's check and test_lower_bound_forms' exactness")
    hash_bits, num_hashes = 2, 1
    nq = nk = 7
    q, k, v = _inputs(rng, nq=nq, nk=nk)
    grad = rng.standard_normal((nq, v.shape[1]))
    key_mask, query_mask = random_mask(rng, (nk,)), random_mask(rng, (nq,))
    q_codes, k_codes = _draw_codes(kernel, rng, q, k, num_hashes, hash_bits)
    batch = lambda x: kernel.array(np.broadcast_to(x, (DRAWS,) + x.shape).copy())  # noqa: E731
    dq, dk = kernel.backend.sampled_grads(
        q_codes,
        k_codes,
        batch(unit(q)),
        batch(unit(k)),
        batch(v),
        batch(grad),
        query_mask=batch(query_mask),
        key_mask=batch(key_mask),
        causal=causal,
        hash_bits=hash_bits,
        backward=backward,
        max_ratio=clamp(hash_bits),
        form=form,
    )
    dv = kernel.backend.cumulate(
        k_codes,
        q_codes,
        batch(np.where(query_mask[:, None], grad, 0)),
        read_mask=batch(key_mask),
        write_mask=batch(query_mask),
        order="anticausal" if causal else "none",
        hash_bits=hash_bits,
    )
    want = ref.expectation_backward(
        unit(q)[None],
        unit(k)[None],
        v[None],
        grad[None],
        query_mask=query_mask[None],
        key_mask=key_mask[None],
        causal=causal,
        hash_bits=hash_bits,
        backward=backward,
        max_ratio=clamp(hash_bits),
    )
    for name, got, w in zip(("dq", "dk", "dv"), (dq, dk, dv), want):
        _assert_unbiased(to_numpy(got), w[0], f"{backward} {name}")


def test_lower_bound_is_below_the_true_derivative():
    """(tau/2) p(x) <= p'(x) for every cosine (the premise of paper eq. 4)."""
    x = np.linspace(-0.999, 0.999, 2001)
    for tau in (1, 2, 4, 8, 12):
        assert np.all(ref.lower_bound_derivative(x, tau) <= ref.collision_derivative(x, tau, np.inf) + 1e-15)
