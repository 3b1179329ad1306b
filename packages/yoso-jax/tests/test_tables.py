"""The jax backend's table form of the lower bound (``yoso_jax.tables``): every layout against the oracle.

The conformance suite reaches the layouts only as its small shapes happen to choose them; here each
is forced (``path=``), with pieces, blocks, spans and row groups shrunk so that one small problem
crosses all their boundaries, on even and on crowded codes.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import yoso_reference as ref  # noqa: E402
from yoso import backends  # noqa: E402
from yoso_jax import pairwise, tables, xla  # noqa: E402

X64 = bool(jax.config.jax_enable_x64)
DTYPE = jnp.float64 if X64 else jnp.float32
TOL = 1e-10 if X64 else 2e-5


def _close(a, b, what=""):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, what
    err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    assert err <= TOL, f"{what}: relative error {err:.3g}"


def _problem(rng, *, batch=3, nq=45, nk=45, dim=5, dv=3, m=3, tau=3, skewed=False):
    def codes(n):
        c = rng.integers(0, 2**tau, (batch, m, n))
        return np.where(rng.random(c.shape) < 0.8, 0, c) if skewed else c

    qm, km = rng.random((batch, nq)) < 0.8, rng.random((batch, nk)) < 0.8
    qm[:, 0] = km[:, 0] = True
    return dict(
        q=ref.unit_rows(rng.standard_normal((batch, nq, dim))),
        k=ref.unit_rows(rng.standard_normal((batch, nk, dim))),
        v=rng.standard_normal((batch, nk, dv)),
        g=rng.standard_normal((batch, nq, dv)),
        qc=codes(nq),
        kc=codes(nk),
        qm=qm,
        km=km,
        tau=tau,
    )


def _masked_rows_poisoned(pb):
    """The problem with NaN and inf in every masked row: masked tokens must never be read."""
    out = dict(pb)
    for names, mask in ((("q", "g"), pb["qm"]), (("k", "v"), pb["km"])):
        for name, bad in zip(names, (np.nan, np.inf)):
            out[name] = np.where(mask[..., None], pb[name], bad)
    return out


def _tables(pb, causal, path):
    return tables.lower_bound_tables(
        jnp.asarray(pb["qc"], jnp.int32),
        jnp.asarray(pb["kc"], jnp.int32),
        *(jnp.asarray(pb[n], DTYPE) for n in ("q", "k", "v", "g")),
        jnp.asarray(pb["qm"]),
        jnp.asarray(pb["km"]),
        causal=causal,
        hash_bits=pb["tau"],
        path=path,
    )


def _oracle(pb, causal):
    return ref.sampled_grads(
        pb["qc"], pb["kc"], pb["q"], pb["k"], pb["v"], pb["g"], query_mask=pb["qm"], key_mask=pb["km"],
        causal=causal, hash_bits=pb["tau"], max_ratio=10.0 * pb["tau"], form="pairs",
    )  # fmt: skip


@pytest.fixture
def small_layouts(monkeypatch):
    """Pieces of 4 tokens, blocks of 8 items, spans of 2 blocks, one batch row per (hash, group) and
    three of those per loop step (3 rows x 3 hashes: steps over rows and over hashes)."""
    for name, value in (("PIECE", 4), ("BLOCK", 8), ("PREFIX_SPAN", 2), ("GROUP_TOKENS", 1), ("STREAMS", 3)):
        monkeypatch.setattr(tables, name, value)
    jax.clear_caches()  # the jitted functions read the constants at trace time
    yield
    monkeypatch.undo()
    jax.clear_caches()


@pytest.mark.parametrize(
    "causal, path",
    [(False, "fast"), (False, "pieces"), (False, "blocks"), (True, "auto")],  # "fast" is auto when not causal
    ids=lambda x: str(x),
)
def test_every_layout_matches_the_oracle(small_layouts, causal, path):
    """fast (bucket-major), pieces (segment sums), blocks (merged order, two-level prefix), causal
    or not, masked, Nq = Nk and cross-attention, on even and on crowded codes (same shapes: one compile)."""
    rng = np.random.default_rng(0)
    for shape in (dict(), dict(nq=9, nk=50, tau=2)) if not causal else (dict(),):
        for skewed in (False, True):
            pb = _problem(rng, skewed=skewed, **shape)
            got = _tables(_masked_rows_poisoned(pb), causal, path)
            for name, g, w in zip(("dq", "dk"), got, _oracle(pb, causal)):
                _close(g, w, f"{path} causal={causal} skewed={skewed} {name} {shape}")


def test_fast_layout_falls_back_when_a_bucket_overflows(monkeypatch):
    """With capacity 8 and 60% of the tokens in one bucket nothing fits the fast layout: the loop step
    must take the pieces layout, and still be exact."""
    monkeypatch.setattr(tables, "fast_capacity", lambda n, tau: 8)
    jax.clear_caches()
    try:
        pb = _problem(np.random.default_rng(1), nq=40, nk=40, skewed=True)
        for name, g, w in zip(("dq", "dk"), _tables(pb, False, "fast"), _oracle(pb, False)):
            _close(g, w, name)
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def _pieces_filled(codes, mask, n_buckets, piece):
    """Pieces each (row, hash) fills: sum over buckets of ceil(valid tokens / piece)."""
    counts = np.stack([((codes == b) & mask[:, None, :]).sum(-1) for b in range(n_buckets)], -1)
    return (-(-counts // piece)).sum(-1)


def test_pieces_fall_back_to_the_full_bound(small_layouts, monkeypatch):
    """With no share of partly filled pieces, the usual size is one piece per PIECE tokens: random codes
    need more (the full bound of max_pieces must be taken, and be exact); codes whose bucket counts are
    multiples of PIECE fit it exactly (the usual branch, also exact)."""
    monkeypatch.setattr(tables, "PARTIAL_SHARE", 0.0)
    jax.clear_caches()
    rng = np.random.default_rng(4)
    n, tau = 48, 3
    usual = tables.usual_pieces(n, 2**tau)
    assert usual == n // tables.PIECE < tables.max_pieces(n, 2**tau)
    crowded = np.repeat(np.arange(4), [24, 12, 8, 4])  # bucket counts that are multiples of 4
    for fits in (False, True):
        pb = _problem(rng, nq=n, nk=n, tau=tau)
        pb["qm"][:], pb["km"][:] = True, True
        if fits:
            for name in ("qc", "kc"):
                rows = [rng.permutation(crowded) for _ in np.ndindex(pb[name].shape[:2])]  # each (row, hash)
                pb[name] = np.reshape(rows, pb[name].shape)
        filled = [_pieces_filled(pb[c], pb[m], 2**tau, tables.PIECE) for c, m in (("qc", "qm"), ("kc", "km"))]
        if fits:  # the premise: every step fits the usual size ...
            assert all((f <= usual).all() for f in filled)
        else:  # ... or some step does not
            assert any((f > usual).any() for f in filled)
        for name, g, w in zip(("dq", "dk"), _tables(pb, False, "pieces"), _oracle(pb, False)):
            _close(g, w, f"fits={fits} {name}")


def test_sort_without_packed_keys(monkeypatch):
    """Large tau with long inputs does not fit (bucket, kind, position) in one int32: a two-key sort."""
    monkeypatch.setattr(tables, "PACKED_BITS", 4)
    jax.clear_caches()
    try:
        for causal in (False, True):
            pb = _problem(np.random.default_rng(2), tau=9)
            for name, g, w in zip(("dq", "dk"), _tables(pb, causal, "auto"), _oracle(pb, causal)):
                _close(g, w, f"causal={causal} {name}")
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def test_segmented_prefix_is_exact():
    """Exclusive prefix sums within non-decreasing segments, long segments spanning many spans."""
    rng = np.random.default_rng(3)
    seg = np.sort(np.concatenate([np.zeros(40, int), rng.integers(0, 12, 37)]))
    x = rng.standard_normal((len(seg), 3))
    want = np.stack([x[:i][seg[:i] == seg[i]].sum(axis=0) for i in range(len(seg))])
    got = tables._segmented_prefix(jnp.asarray(x, DTYPE), jnp.asarray(seg, jnp.int32), 4)
    _close(got, want, "segmented prefix")


def test_memory_is_linear_and_fixed_by_shapes():
    """No N x N temporary: the compiled table form's scratch memory grows about linearly with N (and,
    the shapes being static, crowded buckets cannot change it)."""

    def scratch(n, causal):
        a = [jax.ShapeDtypeStruct((2, 4, n), jnp.int32)] * 2 + [jax.ShapeDtypeStruct((2, n, 16), DTYPE)] * 4
        f = jax.jit(lambda *x: tables.lower_bound_tables(*x, None, None, causal=causal, hash_bits=6))
        return f.lower(*a).compile().memory_analysis().temp_size_in_bytes

    for causal in (False, True):
        small, large = scratch(2048, causal), scratch(8192, causal)
        assert large <= 6 * small, f"causal={causal}: scratch {small} -> {large} bytes for 4x the tokens"
        inputs = 4 * 2 * 8192 * 16 * jnp.dtype(DTYPE).itemsize
        assert large <= 16 * inputs, f"causal={causal}: {large} bytes of scratch for {inputs} bytes of inputs"


def test_auto_form_choice_and_bad_forms():
    """xla's "auto" takes the dense pairs on short inputs and the tables on long ones (static shapes),
    and the primitive refuses forms it does not have."""
    assert xla.lower_bound_form(8, 512, 512, 64, 64, 32, 8, False) == "pairs"
    assert xla.lower_bound_form(8, 32768, 32768, 64, 64, 32, 8, False) == "tables"
    assert xla.lower_bound_form(8, 65536, 65536, 64, 64, 32, 8, True) == "tables"
    pb = _problem(np.random.default_rng(4))
    args = [jnp.asarray(pb[n], jnp.int32) for n in ("qc", "kc")] + [jnp.asarray(pb[n], DTYPE) for n in "qkvg"]
    kw = dict(query_mask=None, key_mask=None, causal=False, hash_bits=3, backward="lower_bound", max_ratio=30.0)
    backend = backends.get("jax")  # the primitive's refusals are the API's (Backend.sampled_grads)
    with pytest.raises(ValueError, match="form must be one of"):
        backend.sampled_grads(*args, **kw, form="table")
    with pytest.raises(ValueError, match="tables"):
        backend.sampled_grads(*args, **{**kw, "backward": "exact"}, form="tables")
    pairs = xla.sampled_grads(*args, **kw, form="pairs")
    for a, b in zip(xla.sampled_grads(*args, **kw, form="tables"), pairs):
        _close(a, b, "tables vs pairs")
    opts = dict(causal=False, hash_bits=3, backward="lower_bound", max_ratio=30.0)
    dense = pairwise.dense_sampled_grads(*args, None, None, **opts)
    for a, b in zip(dense, pairs):
        _close(a, b, "dense")
