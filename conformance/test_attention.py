"""API level: ``yoso.attention`` on every backend and framework equals the oracle's plain forward."""

from __future__ import annotations

import numpy as np
import pytest

import yoso
import yoso_reference as ref
from harness import assert_close, random_mask, untied
from harness import planes as draw_planes


def _flat(x, n_lead):
    return x.reshape((-1,) + x.shape[n_lead:])


def _oracle(q, k, v, p, *, lead, key_padding_mask=None, query_mask=None, **kw):
    """The oracle on canonical [B, N, D] arrays, reshaped back to the leading dims."""
    n = len(lead)
    qb, kb, vb = (_flat(np.broadcast_to(x, lead + x.shape[-2:]), n) for x in (q, k, v))
    masks = {
        name: None if m is None else _flat(np.broadcast_to(m, lead + m.shape[-1:]), n)
        for name, m in (("key_padding_mask", key_padding_mask), ("query_mask", query_mask))
    }
    p = None if p is None else (p[None] if p.ndim == 3 else _flat(np.broadcast_to(p, lead + p.shape[-3:]), n))
    out = ref.attention(qb, kb, vb, planes=p, **masks, **kw)
    return out.reshape(lead + out.shape[-2:])


CASES = [
    # lead, n_query, n_key, dim, value_dim
    ((), 1, 1, 3, 2),
    ((2,), 7, 7, 33, 5),
    ((2, 3), 63, 63, 64, 64),
    ((1, 2), 129, 129, 60, 17),
    ((2,), 9, 130, 16, 24),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}x{c[3]}x{c[4]}")
@pytest.mark.parametrize("mode, hashing", [("sample", "gaussian"), ("sample", "hadamard"), ("expectation", "gaussian")])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_matches_oracle(target, rng, case, mode, hashing, causal):
    lead, nq, nk, dim, dv = case
    if causal:
        nk = nq
    m, tau = 5, 4
    p = draw_planes(rng, m, tau, dim, hashing)
    q = untied(rng, (int(np.prod(lead)), nq, dim), p[None], hashing, tau).reshape(lead + (nq, dim))
    k = untied(rng, (int(np.prod(lead)), nk, dim), p[None], hashing, tau).reshape(lead + (nk, dim))
    v = rng.standard_normal(lead + (nk, dv))
    kpm = random_mask(rng, lead + (nk,))
    qm = random_mask(rng, lead + (nq,))
    kw = dict(num_hashes=m, hash_bits=tau, mode=mode, hashing=hashing, causal=causal)
    got = target.attention(q, k, v, planes=p, key_padding_mask=kpm, query_mask=qm, **kw)
    want = _oracle(q, k, v, p if mode == "sample" else None, lead=lead, key_padding_mask=kpm, query_mask=qm, **kw)
    assert_close(got, want, target.dtype, f"{mode}/{hashing}")
    assert (got[~qm] == 0).all(), "masked query rows must be exact zeros"


@pytest.mark.parametrize("normalize", [True, False])
def test_unnormalised_and_per_head_planes(target, rng, normalize):
    lead, n, dim = (2, 3), 20, 8
    p = draw_planes(rng, 4, 3, dim, lead=(1, 3))  # per-head planes, shared over the batch
    q = untied(rng, (6, n, dim), np.broadcast_to(p, (2, 3) + p.shape[2:]).reshape(6, 4, 3, dim), "gaussian")
    k = untied(rng, (6, n, dim), np.broadcast_to(p, (2, 3) + p.shape[2:]).reshape(6, 4, 3, dim), "gaussian")
    q, k = q.reshape(lead + (n, dim)), k.reshape(lead + (n, dim))
    v = rng.standard_normal(lead + (n, 5))
    got = target.attention(q, k, v, planes=p, num_hashes=4, hash_bits=3, normalize=normalize)
    want = _oracle(q, k, v, p, lead=lead, num_hashes=4, hash_bits=3, normalize=normalize)
    assert_close(got, want, target.dtype, "per-head planes")


def test_broadcast_leading_dims(target, rng):
    """k and v shared across heads ([B, 1, N, D]) broadcast against q [B, H, N, D], like torch.matmul."""
    p = draw_planes(rng, 4, 3, 8)
    q = untied(rng, (6, 10, 8), p[None], "gaussian").reshape(2, 3, 10, 8)
    k = untied(rng, (2, 12, 8), p[None], "gaussian").reshape(2, 1, 12, 8)
    v = rng.standard_normal((2, 1, 12, 4))
    got = target.attention(q, k, v, planes=p, num_hashes=4, hash_bits=3)
    want = _oracle(q, k, v, p, lead=(2, 3), num_hashes=4, hash_bits=3)
    assert got.shape == (2, 3, 10, 4)
    assert_close(got, want, target.dtype, "broadcast")


@pytest.mark.parametrize("mode", ["sample", "expectation"])
def test_padded_keys_cannot_change_any_output(target, rng, mode):
    """Regression for the Hugging Face YOSO bug (its padding mask is a no-op): padded keys are invisible."""
    q, k, v = rng.standard_normal((2, 16, 8)), rng.standard_normal((2, 16, 8)), rng.standard_normal((2, 16, 4))
    kpm = np.ones((2, 16), dtype=bool)
    kpm[0, 10:] = kpm[1, 3:] = False
    k2, v2 = k.copy(), v.copy()
    k2[~kpm] = 1e4 * rng.standard_normal(k2[~kpm].shape)
    v2[~kpm] = -1e4
    kw = dict(key_padding_mask=kpm, mode=mode, seed=3, num_hashes=16, hash_bits=3)
    np.testing.assert_array_equal(target.attention(q, k, v, **kw), target.attention(q, k2, v2, **kw))
    # ... and dropping the padded keys altogether gives the same result as masking them.
    short = target.attention(q[:1], k[:1, :10], v[:1, :10], mode=mode, seed=3, num_hashes=16, hash_bits=3)
    assert_close(target.attention(q, k, v, **kw)[:1], short, target.dtype, "mask == truncation")


@pytest.mark.parametrize("mode", ["sample", "expectation"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fully_masked_rows_are_zero_not_nan(target, rng, mode, causal):
    q, k, v = rng.standard_normal((2, 6, 4)), rng.standard_normal((2, 6, 4)), rng.standard_normal((2, 6, 3))
    kpm = np.ones((2, 6), dtype=bool)
    kpm[1] = False  # batch row 1 has no keys at all
    qm = np.ones((2, 6), dtype=bool)
    qm[0, 2] = False
    out = target.attention(q, k, v, key_padding_mask=kpm, query_mask=qm, mode=mode, causal=causal, seed=0)
    assert np.isfinite(out).all()
    assert (out[1] == 0).all() and (out[0, 2] == 0).all()


def test_zero_vectors_stay_finite(target, rng):
    q, k, v = rng.standard_normal((5, 4)), rng.standard_normal((5, 4)), rng.standard_normal((5, 2))
    q[1] = 0
    k[2] = 0
    for mode in ("sample", "expectation"):
        assert np.isfinite(target.attention(q, k, v, mode=mode, seed=1)).all()


def test_seed_reproduces_and_none_draws_fresh(target, rng):
    q, k, v = rng.standard_normal((12, 8)), rng.standard_normal((12, 8)), rng.standard_normal((12, 8))
    a = target.attention(q, k, v, seed=7, num_hashes=4, hash_bits=6)
    b = target.attention(q, k, v, seed=7, num_hashes=4, hash_bits=6)
    np.testing.assert_array_equal(a, b)
    p = yoso.hash_planes(4, 6, 8, seed=7)
    np.testing.assert_array_equal(a, target.attention(q, k, v, planes=p, num_hashes=4, hash_bits=6))
    fresh = [target.attention(q, k, v, num_hashes=4, hash_bits=6) for _ in range(3)]
    assert not all(np.array_equal(fresh[0], f) for f in fresh[1:]), "seed=None must draw new hash functions"
