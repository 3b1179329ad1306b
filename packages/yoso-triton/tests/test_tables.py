"""The table form of the sampled lower-bound gradient (kernels/tables.py) and the per-bucket choice of
form in ``launch.sampled_grads`` (docs/math.md#lower-bound), against ``yoso_reference.sampled_grads``.

* ``form="tables"``, ``"pairs"`` and ``"auto"`` equal the oracle: full and causal, masks, odd shapes
  (N = 1, 7, 63, 129; D = 3, 33, 60, 256; Dv != D, Dv = 256), in both tilings (the GPU's: several
  tiles per bucket, table tiles for D, Dv > 64, the fold of the causal walk);
* skewed buckets (80% of the tokens in bucket 0: one bucket larger than any tile): "auto" really takes
  tables for the big bucket and pairs for the small ones (through the ``launch.on_plan`` hook);
* half precision within 2x the reference's error; bitwise reproducibility and layout independence;
  masked content never reaches a sum; hash groups; the refusals of ``form``.

Problems are kept to few buckets: the interpreter pays about 5 ms per (bucket, hash) program.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import yoso_reference as ref
from yoso.testing import max_ratio

F32_TOL = 2e-5


def _t(x, device, dtype=torch.float32):
    if x is None:
        return None
    if x.dtype == bool:
        return torch.as_tensor(x, device=device)
    if np.issubdtype(x.dtype, np.integer):
        return torch.as_tensor(x.astype(np.int32), device=device)
    return torch.as_tensor(x, device=device).to(dtype)


def _np(t):
    return t.detach().cpu().double().numpy()


def _rounded(x, dtype):
    return torch.as_tensor(x).to(dtype).double().numpy()


def rel_err(a, b) -> float:
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / (scale if scale > 0 else 1.0))


def _codes(rng, shape, tau, skew):
    codes = rng.integers(0, 2**tau, shape)
    if skew:  # 80% of the mass on bucket 0 (clustered data: one crowded bucket, many small ones)
        codes = np.where(rng.random(shape) < 0.8, 0, codes)
    return codes


def _problem(rng, batch, nq, nk, dim, dv, m, tau, *, skew=False, masked=True):
    def mask(n):
        if not masked:
            return None
        keep = rng.random((batch, n)) < 0.75
        keep[:, 0] = True
        return keep

    return dict(
        q=ref.unit_rows(rng.standard_normal((batch, nq, dim))),
        k=ref.unit_rows(rng.standard_normal((batch, nk, dim))),
        v=rng.standard_normal((batch, nk, dv)),
        grad=rng.standard_normal((batch, nq, dv)),
        q_codes=_codes(rng, (batch, m, nq), tau, skew),
        k_codes=_codes(rng, (batch, m, nk), tau, skew),
        query_mask=mask(nq),
        key_mask=mask(nk),
    )


NAMES = ("q_codes", "k_codes", "q", "k", "v", "grad")


def _grads(backend, device, pb, tau, *, causal, form, dtype=torch.float32, backward="lower_bound"):
    args = [_t(pb[n], device, dtype) for n in NAMES]
    masks = dict(query_mask=_t(pb["query_mask"], device), key_mask=_t(pb["key_mask"], device))
    return backend.sampled_grads(
        *args, **masks, causal=causal, hash_bits=tau, backward=backward, max_ratio=max_ratio(tau), form=form
    )


def _oracle(pb, tau, *, causal, dtype=torch.float32):
    inputs = [pb[n] if "codes" in n else _rounded(pb[n], dtype) for n in NAMES]
    return ref.sampled_grads(
        *inputs,
        query_mask=pb["query_mask"],
        key_mask=pb["key_mask"],
        causal=causal,
        hash_bits=tau,
        backward="lower_bound",
        max_ratio=max_ratio(tau),
    )


@pytest.fixture(params=["interpreter-tiles", "gpu-tiles"])
def tiling(request, monkeypatch, device):
    from yoso_triton import launch

    if request.param == "gpu-tiles":
        monkeypatch.setattr(launch, "INTERPRETER_BLOCKS", False)
    elif not launch.INTERPRET:
        pytest.skip("interpreter tiles are used only under TRITON_INTERPRET=1")
    return request.param


@pytest.fixture
def plans(monkeypatch):
    """The table-form flags of every hash group, ``[m, B * 2**tau]`` once concatenated."""
    from yoso_triton import launch

    seen = []
    monkeypatch.setattr(launch, "on_plan", lambda hashes, table: seen.append(table.cpu()))
    return seen


# ---- every form equals the oracle -----------------------------------------------------------------

CASES = [
    # batch, nq, nk, dim, dv, m, tau, skew; the tilings each runs in
    ((1, 1, 1, 3, 5, 2, 1, False), ["interpreter-tiles"]),  # N = 1
    ((2, 7, 7, 33, 17, 3, 2, False), ["interpreter-tiles"]),
    ((1, 63, 63, 60, 24, 2, 2, False), ["interpreter-tiles", "gpu-tiles"]),
    ((1, 129, 129, 3, 40, 2, 1, True), ["interpreter-tiles", "gpu-tiles"]),  # bucket 0: ~110 tokens, 2 GPU tiles
    ((1, 20, 17, 256, 40, 2, 1, False), ["gpu-tiles"]),  # D = 256: four table tiles along D; Nq != Nk
    ((1, 40, 40, 33, 256, 2, 1, False), ["gpu-tiles"]),  # Dv = 256: causal couplings summed over Dv tiles
]
FORM_CASES = [
    pytest.param(tiling, case, causal, id=f"{tiling}-{'causal' if causal else 'full'}-{'x'.join(map(str, case[:7]))}")
    for case, tilings in CASES
    for tiling in tilings
    for causal in (False, True)
    if not causal or case[1] == case[2]
]


@pytest.mark.parametrize("tiling, case, causal", FORM_CASES, indirect=["tiling"])
@pytest.mark.parametrize("form", ["tables", "auto", "pairs"])
def test_forms_match_the_oracle(backend, device, tiling, rng, case, causal, form):
    batch, nq, nk, dim, dv, m, tau, skew = case
    pb = _problem(rng, batch, nq, nk, dim, dv, m, tau, skew=skew)
    got = _grads(backend, device, pb, tau, causal=causal, form=form)
    want = _oracle(pb, tau, causal=causal)
    for name, g, w, mask in zip(("dq", "dk"), got, want, (pb["query_mask"], pb["key_mask"])):
        assert g.dtype == torch.float32
        assert rel_err(_np(g), w) < F32_TOL, name
        assert (_np(g)[~mask] == 0).all(), f"{name}: masked rows must be exact zeros"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_auto_mixes_the_forms(backend, device, tiling, rng, plans, causal):
    """Skewed codes: the crowded bucket (longer than any tile) takes the table form, the sparse ones the
    pair form, in the same call; the result equals the oracle and both forced forms."""
    batch, n, dim, dv, m, tau = 2, 180, 8, 8, 2, 3  # bucket 0: ~150 tokens, more than either tiling's tile
    pb = _problem(rng, batch, n, n, dim, dv, m, tau, skew=True)
    got = _grads(backend, device, pb, tau, causal=causal, form="auto")
    table = torch.cat(plans, dim=0).numpy()  # [m, B * 2**tau]
    assert table.shape == (m, batch << tau)
    crowded = np.zeros_like(table)
    crowded[:, :: 1 << tau] = True  # bucket 0 of each row
    np.testing.assert_array_equal(table, crowded)  # tables exactly for the crowded buckets
    want = _oracle(pb, tau, causal=causal)
    assert all(rel_err(_np(g), w) < F32_TOL for g, w in zip(got, want))
    for form in ("pairs", "tables"):
        forced = _grads(backend, device, pb, tau, causal=causal, form=form)
        assert all(rel_err(_np(f), _np(g)) < F32_TOL for f, g in zip(forced, got)), form


def test_the_choice_follows_the_cost(backend, device, rng, plans):
    """``min(n_q n_k (Dv + 2D), 2 (n_q + n_k) D Dv)`` per bucket: tables exactly where they are cheaper."""
    batch, n, dim, dv, m, tau = 1, 120, 16, 8, 3, 3
    pb = _problem(rng, batch, n, n, dim, dv, m, tau, skew=True, masked=False)
    _grads(backend, device, pb, tau, causal=False, form="auto")
    table = torch.cat(plans, dim=0).numpy()
    nq = np.stack([np.bincount(pb["q_codes"][0, s], minlength=2**tau) for s in range(m)])
    nk = np.stack([np.bincount(pb["k_codes"][0, s], minlength=2**tau) for s in range(m)])
    cheaper = 2 * (nq + nk) * dim * dv < nq * nk * (dv + 2 * dim)
    np.testing.assert_array_equal(table, cheaper)
    assert table.any() and not table.all()
    plans.clear()
    _grads(backend, device, pb, tau, causal=False, form="tables")
    np.testing.assert_array_equal(torch.cat(plans, dim=0).numpy(), (nq > 0) & (nk > 0))
    plans.clear()
    for form, backward in (("pairs", "lower_bound"), ("auto", "exact")):
        _grads(backend, device, pb, tau, causal=False, form=form, backward=backward)
        assert not torch.cat(plans, dim=0).any(), (form, backward)
        plans.clear()


# ---- precision, reproducibility, masks --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_within_twice_the_reference_error(backend, device, rng, dtype):
    """Half inputs through both table-kernel paths: error vs the float64 truth <= 2x that of the
    reference computing on the same rounded inputs with its result rounded to the dtype."""
    batch, n, dim, dv, m, tau = 2, 50, 24, 12, 2, 1
    pb = _problem(rng, batch, n, n, dim, dv, m, tau)
    half = dict(pb, **{name: _rounded(pb[name], dtype) for name in ("q", "k", "v", "grad")})
    for causal in (False, True):
        got = _grads(backend, device, pb, tau, causal=causal, form="tables", dtype=dtype)
        exact = _oracle(pb, tau, causal=causal, dtype=torch.float64)
        at_precision = _oracle(half, tau, causal=causal, dtype=torch.float64)
        for g, e, r in zip(got, exact, at_precision):
            assert g.dtype == dtype
            ref_err = rel_err(_rounded(r, dtype), e)
            assert rel_err(_np(g), e) <= 2 * ref_err + 1e-7, (causal, rel_err(_np(g), e), ref_err)


@pytest.mark.parametrize("form", ["tables", "auto"])
def test_bitwise_reproducible_and_layout_independent(backend, device, rng, form):
    """Same inputs, same bits (fixed-point merging of hashes and table tiles); column-major views give
    the contiguous result."""
    batch, n, dim, dv, m, tau = 2, 70, 12, 10, 3, 2
    pb = _problem(rng, batch, n, n, dim, dv, m, tau, skew=True)

    def run(strided):
        def put(x):
            t = _t(x, device)
            return t.transpose(-1, -2).contiguous().transpose(-1, -2) if strided and t.dim() == 3 else t

        args = [put(pb[name]) for name in NAMES]
        masks = dict(query_mask=_t(pb["query_mask"], device), key_mask=_t(pb["key_mask"], device))
        kw = dict(causal=True, hash_bits=tau, backward="lower_bound", max_ratio=max_ratio(tau), form=form)
        return backend.sampled_grads(*args, **masks, **kw)

    first, again, strided = run(False), run(False), run(True)
    for a, b, c in zip(first, again, strided):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_masked_content_never_reaches_a_table(backend, device, tiling, rng, causal):
    """NaN in masked keys (k, v) and masked queries (q, G): bitwise the clean result (masked keys are
    left out of A, masked queries out of B, by selection)."""
    batch, n, dim, dv, m, tau = 1, 90, 6, 5, 2, 1
    pb = _problem(rng, batch, n, n, dim, dv, m, tau)
    poisoned = dict(pb)
    for name, mask in (("k", "key_mask"), ("v", "key_mask"), ("q", "query_mask"), ("grad", "query_mask")):
        poisoned[name] = pb[name].copy()
        poisoned[name][~pb[mask]] = np.nan
    clean = _grads(backend, device, pb, tau, causal=causal, form="tables")
    dirty = _grads(backend, device, poisoned, tau, causal=causal, form="tables")
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b)


def test_hash_groups(backend, device, rng, monkeypatch):
    """Hashes one group at a time (several launches accumulating into the same rows): the same bits."""
    from yoso_triton import launch

    pb = _problem(rng, 2, 40, 40, 6, 5, 4, 2, skew=True)
    whole = [_grads(backend, device, pb, 2, causal=True, form=form) for form in ("tables", "auto")]
    monkeypatch.setattr(launch, "GROUP_BYTES", 1)
    grouped = [_grads(backend, device, pb, 2, causal=True, form=form) for form in ("tables", "auto")]
    for a, b in zip(whole, grouped):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---- the form argument ------------------------------------------------------------------------------


def test_forms_declared(backend):
    assert backend.lower_bound_forms == ("pairs", "tables")
    assert not any("table form" in feature for feature in backend.missing_features())


def test_form_refusals(backend, device, rng):
    pb = _problem(rng, 1, 5, 5, 4, 3, 1, 1)
    with pytest.raises(ValueError, match="form='tables' needs backward='lower_bound'"):
        _grads(backend, device, pb, 1, causal=False, form="tables", backward="exact")
    with pytest.raises(ValueError, match="form must be one of 'auto', 'pairs', 'tables', got 'dense'"):
        _grads(backend, device, pb, 1, causal=False, form="dense")
