"""yoso.attention on JAX arrays under jax.jit, jax.vmap and jax.grad, keys, and JAX-specific bad input.

The conformance suite checks every number against the oracle; these tests check that the JAX
transformations compose with it: the same results traced or not, batched or not.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import yoso  # noqa: E402
import yoso_reference as ref  # noqa: E402

X64 = bool(jax.config.jax_enable_x64)
DTYPE = jnp.float64 if X64 else jnp.float32
TOL = 1e-10 if X64 else 2e-5


@pytest.fixture(autouse=True)
def _jax_backend():
    with yoso.set_backend("jax"):
        yield


def _qkv(shape=(2, 3, 17, 8), seed=0, dtype=None):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype=dtype or DTYPE) for _ in range(3))


def _close(a, b, tol=TOL):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    scale = max(np.linalg.norm(b), 1e-30)
    assert np.linalg.norm(a - b) / scale <= tol, f"relative error {np.linalg.norm(a - b) / scale:.3g}"


OPTIONS = [
    dict(mode="sample", backward="lower_bound"),
    dict(mode="sample", backward="exact", causal=True),
    dict(mode="expectation", backward="exact"),
    dict(mode="sample", hashing="hadamard", backward="lower_bound"),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_grad_through_jit_equals_grad(options):
    q, k, v = _qkv()
    kw = dict(num_hashes=6, hash_bits=3, seed=4, **options)
    weights = _qkv()[0]  # a random cotangent (the sum of squares of unit rows would be constant)

    def loss(q, k, v):
        return jnp.sum(yoso.attention(q, k, v, **kw) * weights)

    eager = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    jitted = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(eager, jitted):
        _close(a, b)
        assert np.abs(np.asarray(a)).max() > 1e-3
    _close(jax.jit(loss)(q, k, v), loss(q, k, v))


def test_vmap_over_a_batch_equals_the_batched_call():
    q, k, v = _qkv((4, 19, 8))
    planes = yoso.hash_planes(8, 4, 8, seed=1)
    kw = dict(num_hashes=8, hash_bits=4, planes=planes)
    batched = yoso.attention(q, k, v, **kw)
    mapped = jax.vmap(lambda q, k, v: yoso.attention(q, k, v, **kw))(q, k, v)
    _close(mapped, batched)

    cot = jnp.asarray(np.random.default_rng(2).standard_normal(batched.shape), dtype=DTYPE)
    _, vjp = jax.vjp(lambda *a: yoso.attention(*a, **kw), q, k, v)
    _, vjp_mapped = jax.vjp(lambda *a: jax.vmap(lambda q, k, v: yoso.attention(q, k, v, **kw))(*a), q, k, v)
    for a, b in zip(vjp_mapped(cot), vjp(cot)):
        _close(a, b)


def test_vmap_with_per_example_keys_and_masks():
    """Keys vmapped with the data: each example draws its own hash functions from its key."""
    q, k, v = _qkv((3, 12, 8))
    keys = jax.random.split(jax.random.key(0), 3)
    mask = jnp.asarray(np.random.default_rng(1).random((3, 12)) < 0.7).at[:, 0].set(True)
    kw = dict(num_hashes=4, hash_bits=3)
    mapped = jax.jit(jax.vmap(lambda q, k, v, key, m: yoso.attention(q, k, v, key=key, key_padding_mask=m, **kw)))(
        q, k, v, keys, mask
    )
    for i in range(3):
        one = yoso.attention(q[i], k[i], v[i], key=keys[i], key_padding_mask=mask[i], **kw)
        _close(mapped[i], one)


def test_key_draws_reproducibly_and_matches_explicit_planes():
    q, k, v = _qkv()
    key = jax.random.key(7)
    kw = dict(num_hashes=5, hash_bits=4)
    a = jax.jit(lambda q, key: yoso.attention(q, k, v, key=key, **kw))(q, key)
    b = yoso.attention(q, k, v, key=key, **kw)
    _close(a, b)
    planes = jax.random.normal(key, (5, 4, 8), dtype=DTYPE)
    _close(b, yoso.attention(q, k, v, planes=planes, **kw))
    other = yoso.attention(q, k, v, key=jax.random.key(8), **kw)
    assert not np.allclose(np.asarray(other), np.asarray(b)), "another key must draw other hash functions"
    legacy = yoso.attention(q, k, v, key=jax.random.PRNGKey(7), **kw)
    assert np.isfinite(np.asarray(legacy)).all()
    hadamard = yoso.attention(q, k, v, key=key, hashing="hadamard", **kw)
    assert np.isfinite(np.asarray(hadamard)).all()


def test_seed_is_framework_independent():
    """An int seed gives NumPy's hash functions: the JAX result equals the reference's."""
    q, k, v = _qkv((2, 15, 8), dtype=jnp.float32)
    want = ref.attention(
        *(np.asarray(x, dtype=np.float64).reshape(2, 15, 8) for x in (q, k, v)),
        planes=yoso.hash_planes(8, 4, 8, seed=11)[None],
        num_hashes=8,
        hash_bits=4,
    )
    got = yoso.attention(q, k, v, seed=11, num_hashes=8, hash_bits=4)
    _close(got, want, 2e-5)


def test_seed_none_draws_fresh_eagerly_and_is_refused_under_jit():
    q, k, v = _qkv()
    a, b = (yoso.attention(q, k, v, num_hashes=4, hash_bits=6) for _ in range(2))
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match=r"seed=None .* pass key=jax.random.key"):
        jax.jit(lambda q: yoso.attention(q, k, v))(q)
    jax.jit(lambda q: yoso.attention(q, k, v, mode="expectation"))(q)  # no hash functions: fine


@pytest.mark.parametrize(
    "name, value",
    [("num_hashes", 4), ("hash_bits", 3), ("causal", True), ("normalize", False), ("seed", 3)],
)
def test_traced_static_arguments_are_named(name, value):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=rf"{name} must be a static Python value.*static_argnames"):
        jax.jit(lambda q, x: yoso.attention(q, k, v, **{name: x}))(q, value)
    # Marked static, the same call works (hash functions from a key, or from the static seed itself).
    randomness = {} if name == "seed" else {"key": jax.random.key(0)}
    static = jax.jit(lambda q, x: yoso.attention(q, k, v, **{name: x}, **randomness), static_argnums=1)
    assert np.isfinite(np.asarray(static(q, value))).all()


def test_bad_keys():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"key must be a JAX PRNG key .*got int"):
        yoso.attention(q, k, v, key=0)
    with pytest.raises(TypeError, match=r"key must be a JAX PRNG key .*got ndarray"):
        yoso.attention(q, k, v, key=np.zeros(2, np.uint32))
    with pytest.raises(TypeError, match=r"key must be a JAX PRNG key .*float32 array of shape \[2\]"):
        yoso.attention(q, k, v, key=jnp.zeros(2, jnp.float32))
    with pytest.raises(ValueError, match=r"single PRNG key, got an array of keys of shape \[2\]"):
        yoso.attention(q, k, v, key=jax.random.split(jax.random.key(0)))
    with pytest.raises(ValueError, match="either seed= or key="):
        yoso.attention(q, k, v, key=jax.random.key(0), seed=1)
    with pytest.raises(ValueError, match="either planes= or seed=/generator=/key="):
        yoso.attention(q, k, v, key=jax.random.key(0), planes=yoso.hash_planes(32, 8, 8))
    with pytest.raises(TypeError, match="generator= is a torch.Generator"):
        yoso.attention(q, k, v, generator=object())
    npq = np.asarray(q)
    with yoso.set_backend("reference"), pytest.raises(TypeError, match="key= is a JAX PRNG key, for JAX arrays"):
        yoso.attention(npq, npq, npq, key=jax.random.key(0))


def test_non_jax_arrays_mixed_in():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="arrays of one framework.*numpy"):
        yoso.attention(q, np.asarray(k), v)
    with pytest.raises(TypeError, match="NumPy arrays, torch tensors or JAX arrays"):
        yoso.attention(q, k, np.asarray(v).tolist())
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="arrays of one framework"):
        yoso.attention(q, torch.as_tensor(np.array(k)), v)
    with pytest.raises(TypeError, match="key_padding_mask must be a jax or NumPy array, got Tensor"):
        yoso.attention(q, k, v, key_padding_mask=torch.ones(17, dtype=torch.bool))
    with pytest.raises(TypeError, match="planes must be a NumPy or jax array, got Tensor"):
        yoso.attention(q, k, v, planes=torch.as_tensor(yoso.hash_planes(32, 8, 8)))


def test_value_checks_are_eager_only():
    """NaN in an unmasked row: refused eagerly (also under an eager jax.grad); inside jit it cannot be."""
    q, k, v = _qkv()
    q = q.at[0, 1, 2, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="q has NaN or inf"):
        yoso.attention(q, k, v, seed=0)
    with pytest.raises(ValueError, match="q has NaN or inf"):
        jax.grad(lambda q: yoso.attention(q, k, v, seed=0).sum())(q)
    out = jax.jit(lambda q: yoso.attention(q, k, v, seed=0))(q)  # documented: no data checks when traced
    assert out.shape == q.shape[:-1] + (8,)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision(dtype):
    """Output and gradients in the input dtype; error within 2x that of the reference on the rounded inputs."""
    q, k, v = _qkv((2, 33, 16), dtype=jnp.float32)
    half = tuple(x.astype(dtype) for x in (q, k, v))
    out, vjp = jax.vjp(lambda *a: yoso.attention(*a, mode="expectation", hash_bits=4), *half)
    grads = vjp(jnp.ones_like(out))
    assert out.dtype == jnp.dtype(dtype) and all(g.dtype == jnp.dtype(dtype) for g in grads)
    f64 = lambda x: np.asarray(x.astype(jnp.float32), dtype=np.float64)  # noqa: E731
    with yoso.set_backend("reference"):
        exact = yoso.attention(*(f64(x) for x in (q, k, v)), mode="expectation", hash_bits=4)
        rounded = yoso.attention(*(f64(x) for x in half), mode="expectation", hash_bits=4)
    ref_err = np.linalg.norm(f64(jnp.asarray(rounded).astype(dtype)) - exact)
    err = np.linalg.norm(f64(out) - exact)
    assert err <= 2 * ref_err + 1e-6, f"{dtype}: error {err:.3g} vs reference-at-precision {ref_err:.3g}"
    sampled = yoso.attention(*half, seed=0, num_hashes=8, hash_bits=4)
    assert sampled.dtype == jnp.dtype(dtype) and np.isfinite(np.asarray(sampled, dtype=np.float32)).all()


def test_float64_follows_jax_enable_x64():
    backend = yoso.backends.get("jax")
    assert ("float64" in backend.dtypes) == X64
    if not X64:
        assert "dtype float64 (needs jax_enable_x64)" in backend.missing_features()


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_a_vjp_holds_the_inputs_the_output_and_the_codes_only(options):
    """Between the passes an eager jax.vjp holds the caller's arrays (not copies), the core's output and the
    hash codes; the normalisations' intermediates (~14 arrays of q's size) are recomputed by the backward."""
    shape, hashes = (2, 3, 40, 8), 6
    q, k, v = _qkv(shape)
    kw = dict(num_hashes=hashes, hash_bits=3, seed=4, **options)
    y, vjp = jax.vjp(lambda q, k, v: yoso.attention(q, k, v, **kw), q, k, v)
    inputs = {x.unsafe_buffer_pointer() for x in (q, k, v)}
    held = [x for x in jax.tree_util.tree_leaves(vjp) if x.unsafe_buffer_pointer() not in inputs]
    rows = shape[0] * shape[1] * shape[2]
    codes = 0 if options["mode"] == "expectation" else 2 * rows * hashes * 4  # int32, queries and keys
    planes = np.asarray(yoso.hash_planes(hashes, 3, shape[3], hashing=options.get("hashing", "gaussian")))
    budget = y.nbytes + codes + planes.size * y.dtype.itemsize
    assert sum(x.nbytes for x in held) <= budget, [(x.shape, x.dtype) for x in held]
    _close(vjp(y)[0], jax.vjp(lambda q: yoso.attention(q, k, v, **kw), q)[1](y)[0])
