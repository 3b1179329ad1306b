"""The recurrent state and packed sequences: what the API refuses, from each caller framework, before computing.

The numbers (chunked and packed calls equal the one-shot call, forward and gradients) are the conformance
suite's (conformance/test_state.py); here: every combination without a finite state is a clear error, the
hash functions come from the state, bad ``cu_seqlens`` are named, gradients the state cannot give are refused.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import yoso

M, TAU = 3, 2
OPTIONS = dict(num_hashes=M, hash_bits=TAU, causal=True)


@pytest.fixture
def caller(caller):
    """NumPy and torch callers on the reference backend: these tests compute little, and compiling the jax
    backend's programs for them would be most of their time (the conformance suite runs every backend)."""
    return caller if caller.framework == "jax" else dataclasses.replace(caller, name="reference")


def _qkv(rng, lead=(2,), n=5, dim=4, dv=3):
    return (
        rng.standard_normal(lead + (n, dim)),
        rng.standard_normal(lead + (n, dim)),
        rng.standard_normal(lead + (n, dv)),
    )


def _state(caller, rng, **kw):
    q, k, v = (caller.array(x) for x in _qkv(rng))
    with yoso.set_backend(caller.name):
        return yoso.attention(q, k, v, seed=0, output_final_state=True, **OPTIONS, **kw)[1]


def _call(caller, rng, **kw):
    q, k, v = (caller.array(x) for x in _qkv(rng))
    with yoso.set_backend(caller.name):
        return yoso.attention(q, k, v, **kw)


def test_the_state_is_a_named_tuple_of_the_callers_arrays(caller, rng):
    state = _state(caller, rng)
    assert isinstance(state, yoso.State) and state.key_tables is None
    assert type(state.tables).__module__.split(".")[0] in (caller.framework, "jaxlib")
    assert tuple(state.tables.shape) == (2, M, 2**TAU, 3) and "float32" in str(state.tables.dtype)
    assert tuple(state.planes.shape) == (M, TAU, 4)
    keyed = _state(caller, rng, differentiable_state=True)
    assert tuple(keyed.key_tables.shape) == (2, M, 2**TAU, 3, 4)


NO_STATE = [
    (dict(mode="expectation", output_final_state=True), ValueError, r"needs mode='sample'.*no finite state"),
    (dict(causal=False, output_final_state=True), ValueError, r"needs causal=True"),
    (dict(differentiable_state=True), ValueError, r"differentiable_state=True .*pass output_final_state=True"),
    (
        dict(output_final_state=True, differentiable_state=True, backward="exact"),
        ValueError,
        r"backward='exact' .*no table form",
    ),
    (dict(output_final_state=1), TypeError, r"output_final_state must be a bool"),
]


@pytest.mark.parametrize("case", NO_STATE, ids=lambda c: ",".join(f"{k}={v}" for k, v in c[0].items()))
def test_combinations_without_a_finite_state_are_refused(caller, rng, case):
    options, error, message = case
    with pytest.raises(error, match=message):
        _call(caller, rng, **{**OPTIONS, "seed": 0, **options})


def test_continuing_takes_the_states_hash_functions(caller, rng):
    """planes=/seed= may repeat the state's hash functions (same result), not change them; key=/generator=
    would draw new ones."""
    state = _state(caller, rng)
    q, k, v = (caller.array(x) for x in _qkv(rng))
    with yoso.set_backend(caller.name):
        plain = yoso.attention(q, k, v, initial_state=state, **OPTIONS)
        same = yoso.attention(q, k, v, initial_state=state, seed=0, **OPTIONS)
        np.testing.assert_array_equal(caller_numpy(plain), caller_numpy(same))
        yoso.attention(q, k, v, initial_state=state, planes=yoso.hash_planes(M, TAU, 4, seed=0), **OPTIONS)
        with pytest.raises(ValueError, match=r"seed=1 gives other hash functions than initial_state's"):
            yoso.attention(q, k, v, initial_state=state, seed=1, **OPTIONS)
        with pytest.raises(ValueError, match=r"planes= gives other hash functions"):
            yoso.attention(q, k, v, initial_state=state, planes=yoso.hash_planes(M, TAU, 4, seed=1), **OPTIONS)
        extra = {"jax": {"key": "jax"}, "torch": {"generator": "torch"}}.get(caller.framework)
        if extra:
            if caller.framework == "jax":
                import jax

                extra = {"key": jax.random.key(0)}
            else:
                import torch

                extra = {"generator": torch.Generator()}
            with pytest.raises(ValueError, match=r"initial_state carries its hash functions"):
                yoso.attention(q, k, v, initial_state=state, **extra, **OPTIONS)


def caller_numpy(x):
    from yoso.testing import to_numpy

    return to_numpy(x)


def test_a_state_that_does_not_fit_the_call_is_refused(caller, rng):
    state = _state(caller, rng)
    q, k, v = (caller.array(x) for x in _qkv(rng))
    with yoso.set_backend(caller.name):
        with pytest.raises(TypeError, match=r"initial_state must be the yoso.State .* got builtins.tuple"):
            yoso.attention(q, k, v, initial_state=tuple(state), **OPTIONS)
        with pytest.raises(ValueError, match=r"initial_state.planes do not fit this call.*num_hashes"):
            yoso.attention(q, k, v, initial_state=state, **{**OPTIONS, "num_hashes": M + 1})
        other = yoso.attention(q, k, v[..., :2], seed=0, output_final_state=True, **OPTIONS)[1]
        with pytest.raises(
            ValueError, match=r"initial_state.tables must have shape \[2, 3, 4, 3\].*got \[2, 3, 4, 2\]"
        ):
            yoso.attention(q, k, v, initial_state=other, **OPTIONS)
        with pytest.raises(ValueError, match=r"initial_state.tables must have shape \[3, 3, 4, 3\]"):
            yoso.attention(*(caller.array(x) for x in _qkv(rng, lead=(3,))), initial_state=state, **OPTIONS)
        with pytest.raises(ValueError, match=r"needs causal=True"):
            yoso.attention(q, k, v, initial_state=state, **{**OPTIONS, "causal": False})
        with pytest.raises(ValueError, match=r"differentiable_state=True needs key tables from the start"):
            yoso.attention(q, k, v, initial_state=state, output_final_state=True, differentiable_state=True, **OPTIONS)


def test_a_float64_state_does_not_continue_a_float32_call(caller, rng):
    if caller.framework == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            pytest.skip("float64 JAX arrays need jax_enable_x64")
    q, k, v = (caller.array(x, "float64") for x in _qkv(rng))
    with yoso.set_backend(caller.name):
        state = yoso.attention(q, k, v, seed=0, output_final_state=True, **OPTIONS)[1]
        with pytest.raises(TypeError, match=r"initial_state.tables has dtype float64, but a float32 call"):
            yoso.attention(*(caller.array(x) for x in _qkv(rng)), initial_state=state, **OPTIONS)


@pytest.mark.parametrize("backward", ["lower_bound", "exact"])
def test_gradients_the_state_cannot_give_are_refused(caller, rng, backward):
    """Without key tables (lower bound) or at all (exact, no table form), gradients w.r.t. q and k of a call
    continuing a state are refused: at the call (NumPy's attention_vjp, torch when q, k or the state require
    grad) or when JAX traces the backward. Without gradients the call runs."""
    kw = {"differentiable_state": True} if backward == "exact" else {}
    state = _state(caller, rng, **({} if backward == "exact" else kw))
    message = "backward='lower_bound'" if backward == "exact" else "key tables"
    q, k, v = _qkv(rng)
    options = dict(initial_state=state, backward=backward, **OPTIONS)
    with yoso.set_backend(caller.name):
        yoso.attention(*(caller.array(x) for x in (q, k, v)), **options)
        if caller.framework == "numpy":
            with pytest.raises(ValueError, match=message):
                yoso.attention_vjp(*(caller.array(x) for x in (q, k, v)), **options)
        elif caller.framework == "torch":
            import torch

            k_grad = caller.array(k).requires_grad_(True)
            with pytest.raises(ValueError, match=message):
                yoso.attention(caller.array(q), k_grad, caller.array(v), **options)
            with torch.no_grad():
                yoso.attention(caller.array(q), k_grad, caller.array(v), **options)
        else:
            import jax

            with pytest.raises(ValueError, match=message):
                jax.grad(lambda x: yoso.attention(x, caller.array(k), caller.array(v), **options).sum())(
                    caller.array(q)
                )


def test_torch_state_tables_that_require_grad_need_key_tables(rng):
    """The state's tables come from earlier keys: their requiring grad is enough to refuse."""
    torch = pytest.importorskip("torch")
    q, k, v = (torch.as_tensor(x, dtype=torch.float32) for x in _qkv(rng))
    v.requires_grad_(True)
    _, state = yoso.attention(q, k, v, seed=0, output_final_state=True, **OPTIONS)
    assert state.tables.requires_grad
    with pytest.raises(ValueError, match="key tables"):
        yoso.attention(q, k, v, initial_state=state, **OPTIONS)
    detached = yoso.State(*(None if t is None else t.detach() for t in state))
    yoso.attention(q, k, v.detach(), initial_state=detached, **OPTIONS)


CU = [
    ([0, 2, 4], ValueError, r"cu_seqlens must rise from 0 to the number of tokens T = 5"),
    ([1, 2, 5], ValueError, r"cu_seqlens must rise from 0"),
    ([0, 3, 2, 5], ValueError, r"without decreasing"),
    ([[0, 5]], ValueError, r"cu_seqlens must be a 1-D integer array"),
    ([0.0, 5.0], ValueError, r"cu_seqlens must be a 1-D integer array .* dtype float64"),
    ([0], ValueError, r"cu_seqlens must be a 1-D integer array \[S \+ 1\]"),
]


@pytest.mark.parametrize("case", CU, ids=lambda c: str(c[0]))
def test_bad_cu_seqlens(caller, rng, case):
    cu, error, message = case
    q, k, v = (caller.array(x) for x in _qkv(rng, lead=(1, 2)))
    with yoso.set_backend(caller.name), pytest.raises(error, match=message):
        yoso.attention(q, k, v, cu_seqlens=cu, seed=0, **OPTIONS)


def test_packed_inputs_must_be_a_batch_of_one(caller, rng):
    with pytest.raises(
        ValueError, match=r"with cu_seqlens, q must be packed as \[1, \.\.\., T, D\].*got q \[2, 5, 4\]"
    ):
        _call(caller, rng, cu_seqlens=[0, 5], seed=0, **OPTIONS)
    q, k, v = (caller.array(x) for x in _qkv(rng, lead=(1, 2)))
    with yoso.set_backend(caller.name):
        with pytest.raises(ValueError, match=r"the same number of tokens T"):
            yoso.attention(q, k[..., :4, :], v[..., :4, :], cu_seqlens=[0, 5], seed=0)
        with pytest.raises(ValueError, match=r"key_padding_mask of shape \[4\] does not fit the packed inputs"):
            yoso.attention(q, k, v, cu_seqlens=[0, 5], key_padding_mask=caller.array(np.ones(4, bool)), seed=0)
        with pytest.raises(TypeError, match=r"query_mask must be a bool array"):
            yoso.attention(q, k, v, cu_seqlens=[0, 5], query_mask=caller.array(np.ones(5, np.int32)), seed=0)


def test_jax_cu_seqlens_must_be_known_under_jit(rng):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    q, k, v = (jnp.asarray(x, jnp.float32) for x in _qkv(rng, lead=(1,)))
    with pytest.raises(TypeError, match=r"cu_seqlens must have known values.*NumPy array or a tuple"):
        jax.jit(lambda q, cu: yoso.attention(q, k, v, cu_seqlens=cu, seed=0))(q, jnp.array([0, 2, 5]))
    out = jax.jit(lambda q: yoso.attention(q, k, v, cu_seqlens=(0, 2, 5), seed=0))(q)
    assert out.shape == (1, 5, 3)


def test_jax_state_under_jit_and_scan(rng):
    """A state is a pytree: jax.jit returns it, lax.scan carries it (decoding token by token), and the planes
    it carries are trusted under jit (no draw, no comparison)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    q, k, v = (jnp.asarray(x, jnp.float32) for x in _qkv(rng))
    state = jax.jit(lambda q: yoso.attention(q, k, v, key=jax.random.key(1), output_final_state=True, **OPTIONS)[1])(q)

    def step(state, qkv):
        out, state = yoso.attention(*qkv, initial_state=state, output_final_state=True, **OPTIONS)
        return state, out

    tokens = tuple(jnp.moveaxis(x, -2, 0)[:, :, None, :] for x in (q, k, v))  # [N, B, 1, D]
    final, outs = jax.jit(lambda s: jax.lax.scan(step, s, tokens))(state)
    assert isinstance(final, yoso.State) and outs.shape == (5, 2, 1, 3)
    eager = state
    for i in range(5):
        out, eager = yoso.attention(
            *(x[..., i : i + 1, :] for x in (q, k, v)), initial_state=eager, output_final_state=True, **OPTIONS
        )
        np.testing.assert_allclose(np.asarray(out), np.asarray(outs[i]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(final.tables), np.asarray(eager.tables), rtol=1e-6, atol=1e-6)


def test_numpy_vjp_with_a_state_takes_and_returns_state_cotangents(rng):
    q, k, v = _qkv(rng)
    (out, state), vjp = yoso.attention_vjp(
        q, k, v, seed=0, output_final_state=True, differentiable_state=True, **OPTIONS
    )
    with pytest.raises(TypeError, match=r"the cotangent is a pair"):
        vjp(np.ones_like(out))
    with pytest.raises(ValueError, match=r"the cotangent of state.tables must have its shape \[2, 3, 4, 3\]"):
        vjp((np.ones_like(out), yoso.State(tables=np.ones((2, 3)), planes=None)))
    dq, dk, dv = vjp((np.ones_like(out), None))
    (_, _), vjp2 = yoso.attention_vjp(
        q, k, v, initial_state=state, output_final_state=True, differentiable_state=True, **OPTIONS
    )
    *grads, d_state = vjp2((np.ones_like(out), yoso.State(tables=np.ones(state.tables.shape), planes=None)))
    assert isinstance(d_state, yoso.State) and d_state.planes is None
    assert d_state.tables.shape == state.tables.shape and d_state.key_tables.shape == state.key_tables.shape


def test_backends_without_tables_refuse_state_calls_naming_why(rng):
    from yoso import backends
    from yoso_reference.backend import ReferenceBackend

    class NoTables(ReferenceBackend):
        name = "no-tables"
        has_tables = False

    backends.register(NoTables())
    try:
        q, k, v = _qkv(rng)
        with yoso.set_backend("no-tables"):
            yoso.attention(q, k, v, seed=0, **OPTIONS)
            with pytest.raises(ValueError, match=r"'no-tables' backend does not support bucket-table access"):
                yoso.attention(q, k, v, seed=0, output_final_state=True, **OPTIONS)
        assert "bucket-table access" in " ".join(NoTables().missing_features())
    finally:
        backends.unregister("no-tables")
