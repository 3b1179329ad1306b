"""Bad input gets a ValueError/TypeError naming the argument and the shapes, before any computation."""

from __future__ import annotations

import numpy as np
import pytest


def _ok(rng, lead=(2, 3), nq=5, nk=6, dim=4, dv=3):
    return (
        rng.standard_normal(lead + (nq, dim)),
        rng.standard_normal(lead + (nk, dim)),
        rng.standard_normal(lead + (nk, dv)),
    )


BAD_SHAPES = [
    ("q rank", lambda q, k, v: (q[0, 0, 0], k, v), ValueError, r"q must have at least 2 dims"),
    (
        "D mismatch",
        lambda q, k, v: (q, k[..., :3], v),
        ValueError,
        r"share the last dim D.*q \[2, 3, 5, 4\], k \[2, 3, 6, 3\]",
    ),
    ("Nk mismatch", lambda q, k, v: (q, k, v[..., :5, :]), ValueError, r"v must have as many rows as k.*Nk = 6"),
    (
        "lead mismatch",
        lambda q, k, v: (q, k[:, :2], v[:, :2]),
        ValueError,
        r"leading.*q \[2, 3, 5, 4\].*k \[2, 2, 6, 4\]",
    ),
    ("empty", lambda q, k, v: (q[..., :0, :], k, v), ValueError, r"q has an empty dimension"),
    (
        "int dtype",
        lambda q, k, v: (q.astype(np.int32), k.astype(np.int32), v.astype(np.int32)),
        TypeError,
        r"q must be a floating",
    ),
]


@pytest.mark.parametrize("case", BAD_SHAPES, ids=[c[0] for c in BAD_SHAPES])
def test_bad_shapes(caller, rng, case):
    _, mutate, error, message = case
    q, k, v = mutate(*_ok(rng))
    with pytest.raises(error, match=message):
        caller.attention(q, k, v)


def test_mixed_dtypes(caller, rng):
    import yoso

    q, k, v = (caller.array(x, dtype) for x, dtype in zip(_ok(rng), ("float32", "float32", "float16")))
    with (
        yoso.set_backend(caller.name),
        pytest.raises(TypeError, match=r"share one dtype, got q float32, k float32, v float16"),
    ):
        yoso.attention(q, k, v)


def test_mixed_frameworks(rng):
    torch = pytest.importorskip("torch")
    import yoso

    q, k, v = _ok(rng)
    with pytest.raises(TypeError, match="one framework"):
        yoso.attention(q, torch.as_tensor(k), v)
    with pytest.raises(TypeError, match="NumPy arrays, torch tensors or JAX arrays"):
        yoso.attention(q.tolist(), k, v)


HYPER = [
    (dict(num_hashes=0), ValueError, r"num_hashes must be >= 1, got 0"),
    (dict(num_hashes=2.5), TypeError, r"num_hashes must be an int"),
    (dict(hash_bits=0), ValueError, r"hash_bits must be in \[1, 16\]"),
    (dict(hash_bits=17), ValueError, r"hash_bits must be in \[1, 16\].*2\*\*hash_bits"),
    (dict(mode="fast"), ValueError, r"mode must be one of 'sample', 'expectation', got 'fast'"),
    (dict(hashing="simhash"), ValueError, r"hashing must be 'gaussian' or 'hadamard'"),
    (dict(backward="true"), ValueError, r"backward must be one of"),
    (dict(causal=1), TypeError, r"causal must be a bool"),
    (dict(normalize="yes"), TypeError, r"normalize must be a bool"),
    (dict(hashing="hadamard", hash_bits=8), ValueError, r"hash_bits <= 4 \(the Hadamard size for D=4\)"),
    (dict(seed=-1), TypeError, r"seed must be None, a non-negative int"),
]


@pytest.mark.parametrize("kwargs, error, message", HYPER, ids=[str(h[0]) for h in HYPER])
def test_bad_hyperparameters(caller, rng, kwargs, error, message):
    with pytest.raises(error, match=message):
        caller.attention(*_ok(rng), **kwargs)


def test_causal_needs_square(caller, rng):
    with pytest.raises(ValueError, match=r"causal=True needs as many queries as keys.*Nq=5.*Nk=6"):
        caller.attention(*_ok(rng), causal=True)


MASKS = [
    (
        "key_padding_mask",
        lambda: np.ones((2, 3, 5), bool),
        ValueError,
        r"key_padding_mask must have shape \[\.\.\., Nk\] = \[\.\.\., 6\], got \[2, 3, 5\]",
    ),
    (
        "key_padding_mask",
        lambda: np.ones((4, 6), bool),
        ValueError,
        r"key_padding_mask of shape \[4, 6\] does not broadcast to the leading dims \[2, 3\]",
    ),
    ("key_padding_mask", lambda: np.ones((2, 3, 6), np.float32), TypeError, r"key_padding_mask must be a bool array"),
    (
        "query_mask",
        lambda: np.ones((2, 3, 6), bool),
        ValueError,
        r"query_mask must have shape \[\.\.\., Nq\] = \[\.\.\., 5\]",
    ),
]


@pytest.mark.parametrize("name, make, error, message", MASKS, ids=[f"{m[0]}-{i}" for i, m in enumerate(MASKS)])
def test_bad_masks(caller, rng, name, make, error, message):
    mask = make()
    mask = caller.array(mask) if mask.dtype == bool else caller.array(mask, "float32")
    with pytest.raises(error, match=message):
        caller.attention(*_ok(rng), **{name: mask})


def test_masks_broadcast(caller, rng):
    out = caller.attention(*_ok(rng), key_padding_mask=np.ones((2, 1, 6), bool), query_mask=np.ones((5,), bool), seed=0)
    assert out.shape == (2, 3, 5, 3)


def test_bad_planes(caller, rng):
    import yoso

    q, k, v = _ok(rng)
    with pytest.raises(
        ValueError,
        match=r"planes for hashing='gaussian' with num_hashes=32, hash_bits=8, D=4 must have shape "
        r"\[\.\.\., 32, 8, 4\].*got \[4, 8, 4\]",
    ):
        caller.attention(q, k, v, planes=yoso.hash_planes(4, 8, 4))
    with pytest.raises(ValueError, match=r"planes leading dims \[5\] do not broadcast"):
        caller.attention(q, k, v, planes=np.zeros((5, 32, 8, 4)) + 1)
    with pytest.raises(ValueError, match="either planes= or seed="):
        caller.attention(q, k, v, planes=yoso.hash_planes(32, 8, 4), seed=1)
    bad = yoso.hash_planes(32, 8, 4)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="planes contain NaN"):
        caller.attention(q, k, v, planes=bad)
    with pytest.raises(ValueError, match="±1 diagonals"):
        caller.attention(q, k, v, hashing="hadamard", hash_bits=2, planes=np.full((16, 3, 4), 0.5))


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_nan_and_inf_are_refused_where_they_would_poison(caller, rng, name):
    args = dict(zip("qkv", _ok(rng)))
    args[name][0, 1, 2, 0] = np.inf if name == "v" else np.nan
    with pytest.raises(ValueError, match=rf"{name} has NaN or inf in .*unmasked row"):
        caller.attention(args["q"], args["k"], args["v"], seed=0)
    # In a masked row the same value is harmless padding, and is accepted.
    mask_name, length = ("query_mask", 5) if name == "q" else ("key_padding_mask", 6)
    mask = np.ones((2, 3, length), bool)
    mask[0, 1, 2] = False
    out = caller.attention(args["q"], args["k"], args["v"], seed=0, **{mask_name: mask})
    assert np.isfinite(out).all()


def test_attention_vjp_errors(rng):
    import yoso

    q, k, v = _ok(rng)
    with pytest.raises(TypeError, match="unexpected keyword"):
        yoso.attention_vjp(q, k, v, nonsense=1)
    out, vjp = yoso.attention_vjp(q, k, v, seed=0)
    with pytest.raises(ValueError, match=r"cotangent must have the output's shape \[2, 3, 5, 3\]"):
        vjp(np.ones((2, 3, 5)))


# ---- the causes of issue 12: each pinned once per caller framework (the conformance catalogue has more) ----


@pytest.mark.parametrize("num_hashes", [65537, 2**31, 10**30])
def test_num_hashes_has_a_documented_bound(caller, rng, num_hashes):
    import yoso

    with pytest.raises(ValueError, match=r"num_hashes must be <= 65536"):
        caller.attention(*_ok(rng), num_hashes=num_hashes)
    with pytest.raises(ValueError, match=r"num_hashes must be <= 65536"):
        yoso.hash_planes(num_hashes, 8, 4)
    with pytest.raises(ValueError, match=r"num_hashes must be <= 65536"):
        yoso.check_options(num_hashes=num_hashes)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(seed=-1), TypeError, "seed must be None"),
        (dict(planes=np.ones((3, 3))), ValueError, r"planes for hashing='gaussian'.*got \[3, 3\]"),
        (dict(planes=np.full((32, 8, 4), np.nan)), ValueError, "planes contain NaN"),
        (dict(planes=np.ones((32, 8, 4)), seed=0), ValueError, "either planes= or seed="),
        (dict(hashing="hadamard", hash_bits=8), ValueError, "hash_bits <= 4"),
        (dict(generator="g"), TypeError, "generator"),
        (dict(key="k"), TypeError, "key"),
    ],
)
def test_expectation_mode_refuses_what_sample_mode_refuses(caller, rng, kwargs, error, message):
    with pytest.raises(error, match=message):
        caller.attention(*_ok(rng), mode="expectation", **kwargs)


def test_planes_with_leading_ones_are_shared_planes(caller, rng):
    import yoso

    q, k, v = _ok(rng)
    p = yoso.hash_planes(4, 3, 4, seed=1)
    want = caller.attention(q, k, v, planes=p, num_hashes=4, hash_bits=3)
    for planes in (p[None], p[None, None]):
        np.testing.assert_array_equal(caller.attention(q, k, v, planes=planes, num_hashes=4, hash_bits=3), want)


def test_big_endian_numpy_is_converted(caller, rng):
    import yoso

    q, k, v = _ok(rng)
    p = yoso.hash_planes(4, 3, 4, seed=1)
    want = caller.attention(q, k, v, planes=p, num_hashes=4, hash_bits=3)
    got = caller.attention(q, k, v, planes=p.astype(">f8"), num_hashes=4, hash_bits=3)
    np.testing.assert_array_equal(got, want)
    if caller.framework == "numpy":
        big = [x.astype(">f4") for x in (q, k, v)]
        np.testing.assert_array_equal(yoso.attention(*big, planes=p, num_hashes=4, hash_bits=3), want)


def test_dtypes_outside_the_four_are_refused(rng):
    import yoso

    q, k, v = _ok(rng)
    with pytest.raises(TypeError, match=r"q must be a floating-point array.*float128"):
        yoso.attention(*(x.astype(np.longdouble) for x in (q, k, v)))
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"q must be a floating-point array.*float8_e4m3fn"):
        yoso.attention(*(torch.as_tensor(x).to(torch.float8_e4m3fn) for x in (q, k, v)))
    with pytest.raises(ValueError, match=r"q is on the meta device"):
        yoso.attention(*(torch.as_tensor(x).to("meta") for x in (q, k, v)))
    with pytest.raises(ValueError, match=r"x is on the meta device"):
        yoso.hash_codes(torch.ones(2, 3, device="meta"))


def test_an_all_false_key_mask_warns_once_per_call_site(caller, rng):
    import warnings

    q, k, v = _ok(rng)
    mask = np.zeros((2, 3, 6), bool)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's default: once per location
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for _ in range(3):
            out = caller.attention(q, k, v, key_padding_mask=mask, seed=0)
    hits = [w for w in caught if "False everywhere" in str(w.message)]
    assert len(hits) == 1 and hits[0].category is UserWarning
    assert (out == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one row without keys is no mistake: no warning
        mask[0, 0] = True
        caller.attention(q, k, v, key_padding_mask=mask, seed=0)


def test_the_warning_points_at_the_caller(rng):
    import yoso

    q, k, v = _ok(rng)
    with pytest.warns(UserWarning, match="False everywhere") as record:
        yoso.attention(q, k, v, key_padding_mask=np.zeros(6, bool), seed=0)
    assert record[0].filename == __file__


def test_unnormalised_overflow_is_refused(caller, rng):
    q = np.ones((1, 4, 3))
    with pytest.raises(ValueError, match=r"v is too large for normalize=False"):
        caller.attention(q, q, np.full((1, 4, 2), 3e38), mode="expectation", normalize=False)
    # normalize=True: the same values are fine (v is rescaled, the output does not depend on its scale).
    out = caller.attention(q, q, np.full((1, 4, 2), 3e38), mode="expectation")
    np.testing.assert_allclose(out, np.sqrt(0.5), rtol=1e-6)
