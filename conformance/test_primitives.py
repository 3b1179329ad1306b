"""Kernel level: every primitive equals the oracle given the same codes.

The formulas and where the oracle states them: docs/math.md#where-each-formula-lives; why exact agreement
can be demanded: docs/testing.md#exact-where-deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest

import yoso_reference as ref
from harness import assert_close, clamp, random_mask, to_numpy, unit

SHAPES = [
    # batch, n_query, n_key, dim, value_dim, num_hashes, hash_bits
    (1, 1, 1, 1, 1, 1, 1),
    (2, 7, 7, 33, 5, 4, 3),
    (3, 63, 63, 64, 64, 8, 6),
    (1, 129, 129, 60, 17, 3, 8),
    (2, 9, 130, 16, 24, 5, 4),  # cross-attention, Nq != Nk
]


def _codes(rng, tau, shape, skewed: bool):
    """Hash codes drawn evenly, or (``skewed``) with 80% of the tokens in bucket 0: one crowded bucket,
    the case where the pair form's cost explodes and a table layout must not."""
    codes = rng.integers(0, 2**tau, shape)
    return np.where(rng.random(shape) < 0.8, 0, codes) if skewed else codes


def _problem(rng, shape, masked: bool, causal: bool, skewed: bool = False):
    batch, nq, nk, dim, dv, m, tau = shape
    if causal:
        nk = nq
    return dict(
        q=unit(rng.standard_normal((batch, nq, dim))),
        k=unit(rng.standard_normal((batch, nk, dim))),
        v=rng.standard_normal((batch, nk, dv)),
        grad=rng.standard_normal((batch, nq, dv)),
        # Few buckets relative to tokens, so that runs share buckets and order matters.
        q_codes=_codes(rng, tau, (batch, m, nq), skewed),
        k_codes=_codes(rng, tau, (batch, m, nk), skewed),
        query_mask=random_mask(rng, (batch, nq)) if masked else None,
        key_mask=random_mask(rng, (batch, nk)) if masked else None,
        hash_bits=tau,
    )


def _native(kernel, pb):
    return {k: (kernel.array(v) if isinstance(v, np.ndarray) else v) for k, v in pb.items()}


def _rounded(kernel, pb):
    """The problem as the backend sees it (its dtype's rounding), back in float64 for the oracle."""
    return {
        k: (to_numpy(kernel.array(v)) if isinstance(v, np.ndarray) and v.dtype == np.float64 else v)
        for k, v in pb.items()
    }


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("order", ["none", "causal", "anticausal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "masked"])
def test_cumulate(kernel, rng, shape, order, masked):
    pb = _problem(rng, shape, masked, causal=order != "none")
    nat, exp = _native(kernel, pb), _rounded(kernel, pb)
    got = kernel.backend.cumulate(
        nat["q_codes"],
        nat["k_codes"],
        nat["v"],
        read_mask=nat["query_mask"],
        write_mask=nat["key_mask"],
        order=order,
        hash_bits=pb["hash_bits"],
    )
    want = ref.cumulate(
        exp["q_codes"],
        exp["k_codes"],
        exp["v"],
        read_mask=exp["query_mask"],
        write_mask=exp["key_mask"],
        order=order,
        hash_bits=pb["hash_bits"],
    )
    assert_close(to_numpy(got), want, kernel.dtype, f"cumulate order={order}")
    if masked:
        assert (to_numpy(got)[~pb["query_mask"]] == 0).all(), "masked readers must be exact zeros"


def test_cumulate_matches_collision_matrix(kernel, rng):
    """The table form equals the definition Y = (S ⊙ M) V with S the dense collision frequencies."""
    pb = _problem(rng, (2, 40, 40, 8, 3, 6, 2), masked=True, causal=True)
    nat, exp = _native(kernel, pb), _rounded(kernel, pb)
    got = to_numpy(
        kernel.backend.cumulate(
            nat["q_codes"],
            nat["k_codes"],
            nat["v"],
            read_mask=nat["query_mask"],
            write_mask=nat["key_mask"],
            order="causal",
            hash_bits=2,
        )
    )
    dense = ref.collision_matrix(pb["q_codes"], pb["k_codes"]) * ref.attention_mask(
        2, 40, 40, pb["query_mask"], pb["key_mask"], causal=True
    )
    assert_close(got, dense @ exp["v"], kernel.dtype, "cumulate vs dense definition")


def test_masked_writers_cannot_leak(kernel, rng):
    """Whatever a masked key holds, even inf or NaN, no reader sees it."""
    pb = _problem(rng, (2, 20, 20, 8, 4, 4, 2), masked=True, causal=False)
    poisoned = pb["v"].copy()
    poisoned[~pb["key_mask"]] = np.nan
    nat = _native(kernel, pb)
    clean = to_numpy(
        kernel.backend.cumulate(
            nat["q_codes"],
            nat["k_codes"],
            nat["v"],
            read_mask=None,
            write_mask=nat["key_mask"],
            order="none",
            hash_bits=2,
        )
    )
    dirty = to_numpy(
        kernel.backend.cumulate(
            nat["q_codes"],
            nat["k_codes"],
            kernel.array(poisoned),
            read_mask=None,
            write_mask=nat["key_mask"],
            order="none",
            hash_bits=2,
        )
    )
    np.testing.assert_array_equal(dirty, clean)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backward", ["lower_bound", "exact"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sampled_grads(kernel, rng, shape, backward, causal):
    pb = _problem(rng, shape, masked=True, causal=causal)
    nat, exp = _native(kernel, pb), _rounded(kernel, pb)
    tau = pb["hash_bits"]
    got = kernel.backend.sampled_grads(
        nat["q_codes"],
        nat["k_codes"],
        nat["q"],
        nat["k"],
        nat["v"],
        nat["grad"],
        query_mask=nat["query_mask"],
        key_mask=nat["key_mask"],
        causal=causal,
        hash_bits=tau,
        backward=backward,
        max_ratio=clamp(tau),
    )
    want = ref.sampled_grads(
        exp["q_codes"],
        exp["k_codes"],
        exp["q"],
        exp["k"],
        exp["v"],
        exp["grad"],
        query_mask=exp["query_mask"],
        key_mask=exp["key_mask"],
        causal=causal,
        hash_bits=tau,
        backward=backward,
        max_ratio=clamp(tau),
    )
    for name, g, w in zip(("dq", "dk"), got, want):
        assert_close(to_numpy(g), w, kernel.dtype, f"{backward} {name}")


def _sampled_lower_bound(backend, pb, causal, **form):
    return backend.sampled_grads(
        pb["q_codes"],
        pb["k_codes"],
        pb["q"],
        pb["k"],
        pb["v"],
        pb["grad"],
        query_mask=pb["query_mask"],
        key_mask=pb["key_mask"],
        causal=causal,
        hash_bits=pb["hash_bits"],
        backward="lower_bound",
        max_ratio=clamp(pb["hash_bits"]),
        **form,
    )


def _require_form(kernel, form: str) -> None:
    forms = kernel.backend.lower_bound_forms
    if form != "auto" and form not in forms:
        pytest.skip(f"the {kernel.name!r} backend does not compute the {form!r} form (lower_bound_forms = {forms})")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("form", ["pairs", "tables", "auto"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("skewed", [False, True], ids=["even", "skewed"])
def test_lower_bound_forms(kernel, rng, shape, form, causal, skewed):
    """Each form of the sampled lower bound a backend declares equals the oracle's pair form: masked,
    causal or not, odd shapes, and codes with one crowded bucket."""
    _require_form(kernel, form)
    pb = _problem(rng, shape, masked=True, causal=causal, skewed=skewed)
    got = _sampled_lower_bound(kernel.backend, _native(kernel, pb), causal, form=form)
    exp = _rounded(kernel, pb)
    want = ref.sampled_grads(
        exp["q_codes"],
        exp["k_codes"],
        exp["q"],
        exp["k"],
        exp["v"],
        exp["grad"],
        query_mask=exp["query_mask"],
        key_mask=exp["key_mask"],
        causal=causal,
        hash_bits=pb["hash_bits"],
        backward="lower_bound",
        max_ratio=clamp(pb["hash_bits"]),
        form="pairs",
    )
    for name, g, w in zip(("dq", "dk"), got, want):
        assert_close(to_numpy(g), w, kernel.dtype, f"lower bound form={form} {name}")
        assert (to_numpy(g)[~(pb["query_mask"] if name == "dq" else pb["key_mask"])] == 0).all(), (
            f"{name} of masked rows must be exact zeros (form={form})"
        )


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lower_bound_forms_agree(kernel, rng, causal):
    """ "auto" is one of the forms: it equals every form the backend declares, and they equal each other."""
    pb = _native(kernel, _problem(rng, (2, 70, 70, 12, 10, 6, 3), masked=True, causal=causal, skewed=True))
    results = {form: _sampled_lower_bound(kernel.backend, pb, causal, form=form) for form in ("auto",)}
    results.update(
        {f: _sampled_lower_bound(kernel.backend, pb, causal, form=f) for f in kernel.backend.lower_bound_forms}
    )
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for which, x, y in zip(("dq", "dk"), results[a], results[b]):
                assert_close(to_numpy(x), to_numpy(y), kernel.dtype, f"{which}: form {a} vs {b}", factor=2)


def test_table_form_needs_the_lower_bound(kernel, rng):
    """*YOSO weighs every pair by its own ratio: it has no table form, and asking for one is an error."""
    _require_form(kernel, "tables")
    pb = _native(kernel, _problem(rng, (1, 5, 5, 4, 3, 2, 2), masked=False, causal=False))
    with pytest.raises(ValueError, match="tables"):
        kernel.backend.sampled_grads(
            pb["q_codes"],
            pb["k_codes"],
            pb["q"],
            pb["k"],
            pb["v"],
            pb["grad"],
            query_mask=None,
            key_mask=None,
            causal=False,
            hash_bits=2,
            backward="exact",
            max_ratio=clamp(2),
            form="tables",
        )


def test_lower_bound_matches_table_form(kernel, rng):
    """The lower bound's table form (docs/math.md#lower-bound), written out:
    dq_i = (tau/2)(1/m) sum_s G_i^T A_s[h_s(q_i)], A_s[b] = sum_{j in b} v_j k_j^T."""
    m, tau = 5, 2
    pb = _problem(rng, (1, 30, 25, 6, 4, m, tau), masked=False, causal=False)
    nat, exp = _native(kernel, pb), _rounded(kernel, pb)
    dq, _ = kernel.backend.sampled_grads(
        nat["q_codes"],
        nat["k_codes"],
        nat["q"],
        nat["k"],
        nat["v"],
        nat["grad"],
        query_mask=None,
        key_mask=None,
        causal=False,
        hash_bits=tau,
        backward="lower_bound",
        max_ratio=clamp(tau),
    )
    qc, kc, v, k, g = exp["q_codes"][0], exp["k_codes"][0], exp["v"][0], exp["k"][0], exp["grad"][0]
    want = np.zeros((30, 6))
    for s in range(m):
        tables = np.zeros((2**tau, 4, 6))  # A_s[b] = sum_{j in b} v_j k_j^T
        np.add.at(tables, kc[s], v[:, :, None] * k[:, None, :])
        want += np.einsum("ie,ied->id", g, tables[qc[s]])
    assert_close(to_numpy(dq)[0], want * (tau / 2) / m, kernel.dtype, "lower bound vs tables")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_expectation_forward(kernel, rng, shape, causal):
    pb = _problem(rng, shape, masked=True, causal=causal)
    nat, exp = _native(kernel, pb), _rounded(kernel, pb)
    got = kernel.backend.expectation_forward(
        nat["q"],
        nat["k"],
        nat["v"],
        query_mask=nat["query_mask"],
        key_mask=nat["key_mask"],
        causal=causal,
        hash_bits=pb["hash_bits"],
    )
    want = ref.expectation_forward(
        exp["q"],
        exp["k"],
        exp["v"],
        query_mask=exp["query_mask"],
        key_mask=exp["key_mask"],
        causal=causal,
        hash_bits=pb["hash_bits"],
    )
    assert_close(to_numpy(got), want, kernel.dtype, "expectation forward")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backward", ["exact", "lower_bound"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_expectation_backward(kernel, rng, shape, backward, causal):
    pb = _problem(rng, shape, masked=True, causal=causal)
    nat, exp = _native(kernel, pb), _rounded(kernel, pb)
    tau = pb["hash_bits"]
    got = kernel.backend.expectation_backward(
        nat["q"],
        nat["k"],
        nat["v"],
        nat["grad"],
        query_mask=nat["query_mask"],
        key_mask=nat["key_mask"],
        causal=causal,
        hash_bits=tau,
        backward=backward,
        max_ratio=clamp(tau),
    )
    want = ref.expectation_backward(
        exp["q"],
        exp["k"],
        exp["v"],
        exp["grad"],
        query_mask=exp["query_mask"],
        key_mask=exp["key_mask"],
        causal=causal,
        hash_bits=tau,
        backward=backward,
        max_ratio=clamp(tau),
    )
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close(to_numpy(g), w, kernel.dtype, f"expectation {backward} {name}")


def test_expectation_gradient_at_alignment_is_finite(kernel):
    """q = k exactly: the true derivative diverges; the documented clamp keeps it finite."""
    x = unit(np.arange(1.0, 9.0).reshape(1, 2, 4))
    v = np.ones((1, 2, 3))
    got = kernel.backend.expectation_backward(
        kernel.array(x),
        kernel.array(x),
        kernel.array(v),
        kernel.array(v),
        query_mask=None,
        key_mask=None,
        causal=False,
        hash_bits=8,
        backward="exact",
        max_ratio=clamp(8),
    )
    assert all(np.isfinite(to_numpy(g)).all() for g in got)
