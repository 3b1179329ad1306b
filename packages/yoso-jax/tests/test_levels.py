"""The two backends (jax, pallas) and the code paths the conformance suite's small shapes do not reach.

The conformance suite runs once per backend. Its inputs are small, so
size-dependent choices -- the XLA cumulation's strategies, column chunks, multi-chunk scans of
YOSO-E -- are forced here by shrinking the thresholds, and compared with the oracle (the table form's
layouts: test_tables.py).
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import yoso  # noqa: E402
import yoso_reference as ref  # noqa: E402
from yoso import cli  # noqa: E402
from yoso_jax import pairwise, pallas, xla  # noqa: E402

X64 = bool(jax.config.jax_enable_x64)
DTYPE = jnp.float64 if X64 else jnp.float32
TOL = 1e-10 if X64 else 2e-5


def _close(a, b, what=""):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, what
    err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    assert err <= TOL, f"{what}: relative error {err:.3g}"


def _codes_problem(rng, batch=2, m=5, nr=70, nw=70, columns=6, tau=3):
    return dict(
        rc=rng.integers(0, 2**tau, (batch, m, nr)),
        wc=rng.integers(0, 2**tau, (batch, m, nw)),
        v=rng.standard_normal((batch, nw, columns)),
        rm=rng.random((batch, nr)) < 0.7,
        wm=rng.random((batch, nw)) < 0.7,
        tau=tau,
    )


def _cumulate(fn, pb, order, **kw):
    return fn(
        jnp.asarray(pb["rc"], jnp.int32),
        jnp.asarray(pb["wc"], jnp.int32),
        jnp.asarray(pb["v"], DTYPE),
        read_mask=jnp.asarray(pb["rm"]),
        write_mask=jnp.asarray(pb["wm"]),
        order=order,
        hash_bits=pb["tau"],
        **kw,
    )


def _oracle_cumulate(pb, order):
    return ref.cumulate(
        pb["rc"], pb["wc"], pb["v"], read_mask=pb["rm"], write_mask=pb["wm"], order=order, hash_bits=pb["tau"]
    )


@pytest.mark.parametrize("m", [1, 4, 5])  # the loop takes HASH_UNROLL = 2 hashes per step: odd counts too
@pytest.mark.parametrize("strategy", ["flat", "unrolled", "loop"])
def test_every_xla_cumulation_strategy_matches_the_oracle(strategy, m):
    pb = _codes_problem(np.random.default_rng(0), m=m, nr=33, nw=70)
    got = jax.jit(lambda rc, wc, v: xla.bucket_sums(rc, wc, v, 1 << pb["tau"], strategy=strategy) / rc.shape[1])(
        jnp.asarray(pb["rc"], jnp.int32), jnp.asarray(pb["wc"], jnp.int32), jnp.asarray(pb["v"], DTYPE)
    )
    want = ref.cumulate(pb["rc"], pb["wc"], pb["v"], order="none", hash_bits=pb["tau"])
    _close(got, want, strategy)


@pytest.mark.parametrize("n", [45, 48])  # chunks of 12 tokens: a shorter last chunk, and none
@pytest.mark.parametrize("hashing", ["gaussian", "hadamard"])
def test_hash_codes_in_token_chunks_match_the_oracle(monkeypatch, hashing, n):
    """Long inputs are hashed a chunk of tokens at a time (``HASH_ELEMENTS`` projections): forced here."""
    # D = 8, a power of two: Hadamard hashing pads nothing, so no projection is a structural zero whose sign
    # float32 rounding would decide.
    m, tau, dim, batch = 3, 4, 8, 2
    monkeypatch.setattr(xla, "HASH_ELEMENTS", batch * 12 * (m * tau if hashing == "gaussian" else 2 * dim))
    rng = np.random.default_rng(n)
    x = rng.standard_normal((batch, n, dim)).astype(DTYPE)
    x[0, 5] = 0.0  # a zero row: no bit set
    planes = yoso.hash_planes(m, tau, dim, hashing=hashing, seed=n)[None]
    got = xla.hash_codes(jnp.asarray(x), jnp.asarray(planes, DTYPE), hashing=hashing, num_hashes=m, hash_bits=tau)
    want = ref.hash_codes(x.astype(np.float64), planes, hashing=hashing, num_hashes=m, hash_bits=tau)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("order", ["none", "causal", "anticausal"])
def test_xla_cumulation_in_column_chunks_and_many_chunks(monkeypatch, order):
    """Tiny budgets: values split into column chunks, causal scans over several chunks."""
    monkeypatch.setattr(xla, "ELEMENT_BUDGET", 40)
    monkeypatch.setattr(xla, "CAUSAL_CHUNK", 16)
    pb = _codes_problem(np.random.default_rng(1), columns=7)
    jax.clear_caches()  # the jitted functions read the constants at trace time
    try:
        _close(_cumulate(xla.cumulate, pb, order), _oracle_cumulate(pb, order), order)
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def _pair_problem(rng, batch=2, nq=37, nk=41, dim=5, dv=3, m=4, tau=3):
    return dict(
        q=ref.unit_rows(rng.standard_normal((batch, nq, dim))),
        k=ref.unit_rows(rng.standard_normal((batch, nk, dim))),
        v=rng.standard_normal((batch, nk, dv)),
        g=rng.standard_normal((batch, nq, dv)),
        qc=rng.integers(0, 2**tau, (batch, m, nq)),
        kc=rng.integers(0, 2**tau, (batch, m, nk)),
        qm=rng.random((batch, nq)) < 0.8,
        km=rng.random((batch, nk)) < 0.8,
        tau=tau,
    )


@pytest.mark.parametrize("causal", [False, True])
def test_pairwise_pieces_over_many_query_chunks(monkeypatch, causal):
    """YOSO-E and the sampled gradients on long inputs run in query chunks (no N x N matrix):
    force several chunks, and value-column blocks for the lower bound."""
    monkeypatch.setattr(pairwise, "PAIRWISE_ELEMENTS", 2 * 41 * 5)
    monkeypatch.setattr(pairwise, "MIN_QUERY_CHUNK", 1)
    monkeypatch.setattr(pairwise, "ELEMENT_BUDGET", 2 * 41 * 5 * 2)
    jax.clear_caches()
    pb = _pair_problem(np.random.default_rng(2), nk=37 if causal else 41)
    n_query, n_key = pb["q"].shape[1], pb["k"].shape[1]
    assert pairwise._query_chunk(pb["q"].shape[0], n_query, n_key) < n_query // 2  # several chunks
    a = {n: jnp.asarray(pb[n], DTYPE) for n in ("q", "k", "v", "g")}
    codes = {n: jnp.asarray(pb[n], jnp.int32) for n in ("qc", "kc")}
    masks = {n: jnp.asarray(pb[n]) for n in ("qm", "km")}
    tau, clamp = pb["tau"], 10.0 * pb["tau"]
    try:
        y = pairwise.expectation_forward(
            a["q"], a["k"], a["v"], query_mask=masks["qm"], key_mask=masks["km"], causal=causal, hash_bits=tau
        )
        want = ref.expectation_forward(
            pb["q"], pb["k"], pb["v"], query_mask=pb["qm"], key_mask=pb["km"], causal=causal, hash_bits=tau
        )
        _close(y, want, "expectation forward")
        for backward in ("exact", "lower_bound"):
            got = pairwise.expectation_backward(
                a["q"], a["k"], a["v"], a["g"], query_mask=masks["qm"], key_mask=masks["km"],
                causal=causal, hash_bits=tau, backward=backward, max_ratio=clamp,
            )  # fmt: skip
            want = ref.expectation_backward(
                pb["q"], pb["k"], pb["v"], pb["g"], query_mask=pb["qm"], key_mask=pb["km"],
                causal=causal, hash_bits=tau, backward=backward, max_ratio=clamp,
            )  # fmt: skip
            for name, g, w in zip(("dq", "dk", "dv"), got, want):
                _close(g, w, f"expectation {backward} {name}")
        # Both estimators over all pairs, and the lower bound's table form (used on long inputs).
        for backward, form in (("exact", "dense"), ("lower_bound", "dense"), ("lower_bound", "tables")):
            args = (codes["qc"], codes["kc"], a["q"], a["k"], a["v"], a["g"], masks["qm"], masks["km"])
            if form == "dense":
                got = pairwise.dense_sampled_grads(
                    *args, causal=causal, hash_bits=tau, backward=backward, max_ratio=clamp
                )
            else:
                got = pairwise.lower_bound_grads(*args, cumulate=xla.cumulate, causal=causal, hash_bits=tau)
            want = ref.sampled_grads(
                pb["qc"], pb["kc"], pb["q"], pb["k"], pb["v"], pb["g"], query_mask=pb["qm"], key_mask=pb["km"],
                causal=causal, hash_bits=tau, backward=backward, max_ratio=clamp,
            )  # fmt: skip
            for name, g, w in zip(("dq", "dk"), got, want):
                _close(g, w, f"sampled {backward} ({form}) {name}")
    finally:
        monkeypatch.undo()
        jax.clear_caches()


@pytest.mark.parametrize("order", ["none", "causal", "anticausal"])
def test_pallas_cumulation_over_several_blocks(order):
    """More tokens, buckets and columns than one block of each kernel (the suite's shapes fit in one or two)."""
    pb = _codes_problem(np.random.default_rng(3), batch=1, m=3, nr=150, nw=150, columns=70, tau=7)
    _close(_cumulate(pallas.cumulate, pb, order), _oracle_cumulate(pb, order), order)


def test_backends_agree_and_switching_retraces():
    """The same call on both backends, in one process: set_backend changes what runs (the glue's jit
    cache is keyed on the backend's name), and the results agree."""
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 40, 8)), DTYPE) for _ in range(3))
    kw = dict(num_hashes=6, hash_bits=5, seed=3, causal=True)
    weights = jnp.asarray(rng.standard_normal((2, 40, 8)), DTYPE)  # (sum of squares of unit rows is constant)
    loss = lambda q, k, v: jnp.sum(yoso.attention(q, k, v, **kw) * weights)  # noqa: E731
    results = {}
    for name in ("jax", "pallas"):
        with yoso.set_backend(name):
            assert yoso.backend_for(q, k, v, **kw) == name
            results[name] = (yoso.attention(q, k, v, **kw), jax.grad(loss, argnums=(0, 1, 2))(q, k, v))
    (out_x, grads_x), (out_p, grads_p) = results["jax"], results["pallas"]
    _close(out_p, out_x, "forward")
    for a, b in zip(grads_p, grads_x):
        _close(a, b, "backward")


def test_both_backends_are_listed_by_info(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "jax        available" in text and "pallas     available" in text
    assert "interpret=True" in text  # off GPUs the Pallas kernels are interpreted, and info says so
    assert yoso.backends.get("jax").priority > yoso.backends.get("pallas").priority
