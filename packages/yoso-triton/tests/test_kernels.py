"""yoso_triton's kernels against yoso_reference, beyond the conformance suite.

* both tilings (the interpreter's large tiles and the GPU's small ones: chunk carries across a long
  bucket, one bucket per program, D loops, several query/key tiles) and hash groups;
* half precision: float16/bfloat16 results within 2x the error of the reference run at that
  precision (docs/testing.md);
* determinism and non-contiguous inputs (bitwise);
* the backend's own limits (bucket-table memory, int32 indices, grid size) refused by
  ``TritonBackend.unsupported`` -- through ``yoso.attention`` too -- before any kernel launch. Argument
  checks are the API's (packages/yoso-api/tests/test_errors.py): the primitives take what it guarantees.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import yoso
import yoso_reference as ref
from yoso.testing import max_ratio

F32_TOL = 2e-5


def _t(x, device, dtype=torch.float32):
    if x is None:
        return None
    if x.dtype == bool or np.issubdtype(x.dtype, np.integer):
        return torch.as_tensor(x if x.dtype == bool else x.astype(np.int32), device=device)
    return torch.as_tensor(x, device=device).to(dtype)


def _np(t):
    return t.detach().cpu().double().numpy() if t.is_floating_point() else t.cpu().numpy()


def _rounded(x, dtype):
    return torch.as_tensor(x).to(dtype).double().numpy()


def rel_err(a, b) -> float:
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / (scale if scale > 0 else 1.0))


def _unit(rng, shape):
    return ref.unit_rows(rng.standard_normal(shape))


def _mask(rng, shape):
    m = rng.random(shape) < 0.75
    m[..., 0] = True
    return m


def _problem(rng, batch, nq, nk, dim, dv, m, tau):
    return dict(
        q=_unit(rng, (batch, nq, dim)),
        k=_unit(rng, (batch, nk, dim)),
        v=rng.standard_normal((batch, nk, dv)),
        grad=rng.standard_normal((batch, nq, dv)),
        q_codes=rng.integers(0, 2**tau, (batch, m, nq)),
        k_codes=rng.integers(0, 2**tau, (batch, m, nk)),
        query_mask=_mask(rng, (batch, nq)),
        key_mask=_mask(rng, (batch, nk)),
    )


@pytest.fixture(params=["interpreter-tiles", "gpu-tiles"])
def tiling(request, monkeypatch, device):
    from yoso_triton import launch

    if request.param == "gpu-tiles":
        monkeypatch.setattr(launch, "INTERPRETER_BLOCKS", False)
    elif not launch.INTERPRET:
        pytest.skip("interpreter tiles are used only under TRITON_INTERPRET=1")
    return request.param


@pytest.fixture(params=["counting", "radix"])
def sort(request, monkeypatch):
    from yoso_triton import launch

    monkeypatch.setattr(launch, "SORT", request.param)
    return request.param


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reversed"])
@pytest.mark.parametrize("batch, n, m, tau", [(3, 37, 2, 2), (2, 300, 3, 4), (1, 5, 1, 6)])
def test_bucket_sort(backend, device, tiling, sort, rng, reverse, batch, n, m, tau):
    """Tokens sorted by (row, bucket, position) -- stably, reversed positions for anticausal -- and each
    reader's last visible writer, against NumPy's stable argsort and a direct count."""
    from yoso_triton import launch

    codes = rng.integers(0, 2**tau, (batch, m + 1, n))
    reads = rng.integers(0, 2**tau, (batch, m + 1, n))
    srt = launch.Sorted(_t(codes, device), slice(1, m + 1), tau, reverse=reverse)
    order = np.arange(n)[::-1] if reverse else np.arange(n)
    for j in range(m):
        bucket = (np.arange(batch)[:, None] << tau) + codes[:, 1 + j]  # [B, N]
        key = (bucket * n + np.argsort(order)[None, :]).ravel()  # rank of each position in sequence order
        perm = np.argsort(key, kind="stable")
        np.testing.assert_array_equal(_np(srt.perm[j]), perm)
        np.testing.assert_array_equal(_np(srt.bucket[j]), bucket.ravel()[perm])
        counts = np.bincount(bucket.ravel(), minlength=batch << tau)
        np.testing.assert_array_equal(_np(srt.start[j]), np.concatenate([[0], np.cumsum(counts)]))
    for kind in ("none", "anticausal" if reverse else "causal"):
        got = _np(srt.last_visible(_t(reads, device), kind))
        for j in range(m):
            rbucket = ((np.arange(batch)[:, None] << tau) + reads[:, 1 + j]).ravel()
            sorted_bucket = _np(srt.bucket[j])
            sorted_pos = _np(srt.perm[j]) % n
            for t in range(batch * n):
                ok = sorted_bucket == rbucket[t]
                if kind != "none":
                    ok &= sorted_pos >= t % n if reverse else sorted_pos <= t % n
                want = np.flatnonzero(ok).max() if ok.any() else -1
                assert got[j, t] == want


# ---- exactness in both tilings --------------------------------------------------------------------

CUMULATE_CASES = [
    # batch, n, channels, m, tau: one long bucket per hash (chunk carries), tables, sparse buckets
    (1, 300, 5, 2, 1),
    (2, 70, 33, 3, 3),
    (2, 40, 8, 2, 8),
]


@pytest.mark.parametrize("case", CUMULATE_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("order", ["none", "causal", "anticausal"])
def test_cumulate_tilings(backend, device, tiling, sort, rng, case, order):
    batch, n, channels, m, tau = case
    pb = _problem(rng, batch, n, n, 4, channels, m, tau)
    got = backend.cumulate(
        _t(pb["q_codes"], device),
        _t(pb["k_codes"], device),
        _t(pb["v"], device),
        read_mask=_t(pb["query_mask"], device),
        write_mask=_t(pb["key_mask"], device),
        order=order,
        hash_bits=tau,
    )
    want = ref.cumulate(
        pb["q_codes"],
        pb["k_codes"],
        _rounded(pb["v"], torch.float32),
        read_mask=pb["query_mask"],
        write_mask=pb["key_mask"],
        order=order,
        hash_bits=tau,
    )
    assert got.dtype == torch.float32
    assert rel_err(_np(got), want) < F32_TOL


@pytest.mark.parametrize("backward", ["lower_bound", "exact"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sampled_grads_tilings(backend, device, tiling, sort, rng, backward, causal):
    batch, n, dim, dv, m, tau = 2, 90, 20, 7, 3, 2  # buckets of ~22 tokens; D, Dv not powers of two
    pb = _problem(rng, batch, n, n, dim, dv, m, tau)
    args = [_t(pb[name], device) for name in ("q_codes", "k_codes", "q", "k", "v", "grad")]
    kw = dict(causal=causal, hash_bits=tau, backward=backward, max_ratio=max_ratio(tau))
    got = backend.sampled_grads(
        *args, query_mask=_t(pb["query_mask"], device), key_mask=_t(pb["key_mask"], device), **kw
    )
    names = ("q_codes", "k_codes", "q", "k", "v", "grad")
    rounded = [pb[name] if "codes" in name else _rounded(pb[name], torch.float32) for name in names]
    want = ref.sampled_grads(*rounded, query_mask=pb["query_mask"], key_mask=pb["key_mask"], **kw)
    for g, w in zip(got, want):
        assert rel_err(_np(g), w) < F32_TOL


@pytest.mark.parametrize("backward", ["exact", "lower_bound"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_expectation_tilings(backend, device, tiling, rng, backward, causal):
    batch, n, dim, dv, tau = 2, 150, 24, 40, 5  # several query and key tiles in both tilings
    pb = _problem(rng, batch, n, n, dim, dv, 1, tau)
    tensors = {name: _t(pb[name], device) for name in ("q", "k", "v", "grad", "query_mask", "key_mask")}
    exp = {name: _rounded(pb[name], torch.float32) for name in ("q", "k", "v", "grad")}
    masks = dict(query_mask=pb["query_mask"], key_mask=pb["key_mask"], causal=causal, hash_bits=tau)
    tmasks = dict(query_mask=tensors["query_mask"], key_mask=tensors["key_mask"], causal=causal, hash_bits=tau)
    y = backend.expectation_forward(tensors["q"], tensors["k"], tensors["v"], **tmasks)
    assert rel_err(_np(y), ref.expectation_forward(exp["q"], exp["k"], exp["v"], **masks)) < F32_TOL
    grads = backend.expectation_backward(
        tensors["q"], tensors["k"], tensors["v"], tensors["grad"], backward=backward, max_ratio=max_ratio(tau), **tmasks
    )
    want = ref.expectation_backward(
        exp["q"], exp["k"], exp["v"], exp["grad"], backward=backward, max_ratio=max_ratio(tau), **masks
    )
    for g, w in zip(grads, want):
        assert rel_err(_np(g), w) < F32_TOL


def _near_tie(x, planes, hashing, m, tau, margin):
    """Per (row, hash): some bit's normalised projection lies within ``margin`` of a sign tie."""
    x = ref.unit_rows(x)
    if hashing == "gaussian":
        p = planes.reshape(planes.shape[0], -1, planes.shape[-1])
        proj = x @ (p / np.linalg.norm(p, axis=-1, keepdims=True)).transpose(0, 2, 1)
    else:
        u = ref.hadamard_rotate(x, planes) / planes.shape[-1] ** 1.5
        per = planes.shape[-1] // tau
        proj = u[..., : per * tau].reshape(u.shape[0], u.shape[1], -1)
    proj = proj[..., : m * tau]
    return (np.abs(proj) < margin).reshape(x.shape[0], x.shape[1], m, tau).any(-1).transpose(0, 2, 1)


HASH_CASES = [
    # hashing, batch, n, dim, m, tau, per_head
    ("gaussian", 2, 40, 100, 9, 5, False),  # D loop of several chunks
    ("gaussian", 3, 20, 17, 6, 3, True),  # per-head planes, one tile per row
    ("gaussian", 5, 7, 6, 4, 2, True),  # per-head planes on short rows: per-token planes
    ("hadamard", 2, 30, 33, 20, 4, True),
    ("hadamard", 2, 9, 3, 3, 2, False),  # D' = 4 < 16: transform narrower than the tile
]


@pytest.mark.parametrize("case", HASH_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_hash_codes(backend, device, tiling, rng, case, dtype):
    """Codes equal the reference's on the same (rounded) inputs, except within a hair of a sign tie."""
    hashing, batch, n, dim, m, tau, per_head = case
    planes = np.stack(
        [yoso.hash_planes(m, tau, dim, hashing=hashing, seed=rng) for _ in range(batch if per_head else 1)]
    )
    x = _rounded(rng.standard_normal((batch, n, dim)), dtype)
    got = _np(
        backend.hash_codes(_t(x, device, dtype), _t(planes, device), hashing=hashing, num_hashes=m, hash_bits=tau)
    )
    want = ref.hash_codes(x, planes, hashing=hashing, num_hashes=m, hash_bits=tau)
    margin = 1e-5 if dtype == torch.float32 else 1e-4  # half inputs: planes carry 16 bits (hi + lo)
    wrong = (got != want) & ~_near_tie(x, planes, hashing, m, tau, margin)
    assert not wrong.any(), f"{int(wrong.sum())} of {wrong.size} codes differ away from ties"


def test_largest_head_dims(backend, device, tiling, rng):
    """D = Dv = 256, the bound, through every primitive (Nq != Nk where allowed)."""
    dim, m, tau = 256, 3, 4
    pb = _problem(rng, 1, 20, 17, dim, dim, m, tau)
    t = {name: _t(pb[name], device) for name in pb}
    exp = {name: (_rounded(pb[name], torch.float32) if pb[name].dtype == np.float64 else pb[name]) for name in pb}
    for hashing in ("gaussian", "hadamard"):
        planes = yoso.hash_planes(m, tau, dim, hashing=hashing, seed=1)[None]
        got = _np(backend.hash_codes(t["q"], _t(planes, device), hashing=hashing, num_hashes=m, hash_bits=tau))
        want = ref.hash_codes(exp["q"], planes, hashing=hashing, num_hashes=m, hash_bits=tau)
        assert not ((got != want) & ~_near_tie(exp["q"], planes, hashing, m, tau, 1e-5)).any()
    masks = dict(query_mask=pb["query_mask"], key_mask=pb["key_mask"])
    tmasks = dict(query_mask=t["query_mask"], key_mask=t["key_mask"])
    cum = backend.cumulate(
        t["q_codes"],
        t["k_codes"],
        t["v"],
        read_mask=t["query_mask"],
        write_mask=t["key_mask"],
        order="none",
        hash_bits=tau,
    )
    want = ref.cumulate(
        pb["q_codes"],
        pb["k_codes"],
        exp["v"],
        read_mask=pb["query_mask"],
        write_mask=pb["key_mask"],
        order="none",
        hash_bits=tau,
    )
    assert rel_err(_np(cum), want) < F32_TOL
    kw = dict(causal=False, hash_bits=tau, backward="exact", max_ratio=max_ratio(tau))
    got = backend.sampled_grads(*(t[n] for n in ("q_codes", "k_codes", "q", "k", "v", "grad")), **tmasks, **kw)
    want = ref.sampled_grads(*(exp[n] for n in ("q_codes", "k_codes", "q", "k", "v", "grad")), **masks, **kw)
    assert all(rel_err(_np(g), w) < F32_TOL for g, w in zip(got, want))
    kw = dict(causal=False, hash_bits=tau)
    y = backend.expectation_forward(t["q"], t["k"], t["v"], **tmasks, **kw)
    assert rel_err(_np(y), ref.expectation_forward(exp["q"], exp["k"], exp["v"], **masks, **kw)) < F32_TOL
    kw.update(backward="lower_bound", max_ratio=max_ratio(tau))
    got = backend.expectation_backward(t["q"], t["k"], t["v"], t["grad"], **tmasks, **kw)
    want = ref.expectation_backward(exp["q"], exp["k"], exp["v"], exp["grad"], **masks, **kw)
    assert all(rel_err(_np(g), w) < F32_TOL for g, w in zip(got, want))


def test_hash_groups(backend, device, rng, monkeypatch):
    """Hashes processed one group at a time (accumulating launches) give the same result."""
    from yoso_triton import launch

    pb = _problem(rng, 2, 30, 30, 6, 5, 5, 3)
    args = [_t(pb[name], device) for name in ("q_codes", "k_codes", "q", "k", "v", "grad")]
    masks = dict(query_mask=_t(pb["query_mask"], device), key_mask=_t(pb["key_mask"], device))
    kw = dict(causal=True, hash_bits=3, backward="exact", max_ratio=max_ratio(3))
    cum = dict(read_mask=masks["query_mask"], write_mask=masks["key_mask"], hash_bits=3)
    whole = [backend.cumulate(args[0], args[1], args[4], order=o, **cum) for o in ("none", "causal")]
    whole += backend.sampled_grads(*args, **masks, **kw)
    monkeypatch.setattr(launch, "GROUP_BYTES", 1)
    grouped = [backend.cumulate(args[0], args[1], args[4], order=o, **cum) for o in ("none", "causal")]
    grouped += backend.sampled_grads(*args, **masks, **kw)
    for a, b in zip(whole, grouped):
        assert rel_err(_np(b), _np(a)) < 1e-6


# ---- half precision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_within_twice_the_reference_error(backend, device, rng, dtype):
    """Each primitive on half inputs: error vs the float64 truth <= 2x that of the reference computing
    on the same rounded inputs with its result rounded to the dtype (docs/testing.md)."""
    batch, n, dim, dv, m, tau = 2, 50, 24, 12, 4, 3
    pb = _problem(rng, batch, n, n, dim, dv, m, tau)
    half = {k: _rounded(pb[k], dtype) for k in ("q", "k", "v", "grad")}
    dev = {k: _t(pb[k], device, dtype) for k in ("q", "k", "v", "grad")}
    masks = dict(query_mask=pb["query_mask"], key_mask=pb["key_mask"])
    dmasks = {k: _t(v, device) for k, v in masks.items()}
    codes = (pb["q_codes"], pb["k_codes"])
    dcodes = tuple(_t(c, device) for c in codes)

    def check(what, got, exact_fn):
        exact, at_precision = exact_fn(pb), exact_fn(half)
        got = got if isinstance(got, tuple | list) else (got,)
        exact = exact if isinstance(exact, tuple | list) else (exact,)
        at_precision = at_precision if isinstance(at_precision, tuple | list) else (at_precision,)
        for g, e, r in zip(got, exact, at_precision):
            ref_err = rel_err(_rounded(r, dtype), e)
            err = rel_err(_np(g), e)
            assert err <= 2 * ref_err + 1e-7, f"{what}: {err:.3g} vs reference at {dtype}: {ref_err:.3g}"

    for order in ("none", "causal"):
        got = backend.cumulate(
            *dcodes, dev["v"], read_mask=dmasks["query_mask"], write_mask=dmasks["key_mask"], order=order, hash_bits=tau
        )
        cum = dict(read_mask=masks["query_mask"], write_mask=masks["key_mask"], order=order, hash_bits=tau)
        check(f"cumulate {order}", got, lambda p, cum=cum: ref.cumulate(*codes, p["v"], **cum))
    for backward in ("lower_bound", "exact"):
        kw = dict(causal=False, hash_bits=tau, backward=backward, max_ratio=max_ratio(tau))
        got = backend.sampled_grads(*dcodes, dev["q"], dev["k"], dev["v"], dev["grad"], **dmasks, **kw)
        assert all(g.dtype == dtype for g in got)
        check(
            f"sampled {backward}",
            got,
            lambda p, kw=kw: ref.sampled_grads(*codes, p["q"], p["k"], p["v"], p["grad"], **masks, **kw),
        )
    got = backend.expectation_forward(dev["q"], dev["k"], dev["v"], **dmasks, causal=True, hash_bits=tau)
    check(
        "expectation forward",
        got,
        lambda p: ref.expectation_forward(p["q"], p["k"], p["v"], **masks, causal=True, hash_bits=tau),
    )
    for backward in ("exact", "lower_bound"):
        kw = dict(causal=True, hash_bits=tau, backward=backward, max_ratio=max_ratio(tau))
        got = backend.expectation_backward(dev["q"], dev["k"], dev["v"], dev["grad"], **dmasks, **kw)
        assert all(g.dtype == dtype for g in got)
        check(
            f"expectation {backward}",
            got,
            lambda p, kw=kw: ref.expectation_backward(p["q"], p["k"], p["v"], p["grad"], **masks, **kw),
        )


# ---- reproducibility and layouts ------------------------------------------------------------------


def test_bitwise_reproducible_and_layout_independent(backend, device, rng):
    """Same inputs, same bits (no float atomics); transposed views give the contiguous result."""
    batch, n, dim, dv, m, tau = 2, 33, 8, 6, 4, 2
    pb = _problem(rng, batch, n, n, dim, dv, m, tau)

    def run(strided: bool):
        def put(x):
            t = _t(x, device)
            if not strided or t.dim() < 2:
                return t
            return t.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, column-major

        qc, kc = put(pb["q_codes"]), put(pb["k_codes"])
        q, k, v, g = (put(pb[n_]) for n_ in ("q", "k", "v", "grad"))
        masks = dict(query_mask=_t(pb["query_mask"], device), key_mask=_t(pb["key_mask"], device))
        planes = _t(yoso.hash_planes(m, tau, dim, seed=3)[None], device)
        return [
            backend.hash_codes(q, planes, hashing="gaussian", num_hashes=m, hash_bits=tau),
            backend.cumulate(
                qc, kc, v, read_mask=masks["query_mask"], write_mask=masks["key_mask"], order="causal", hash_bits=tau
            ),
            *backend.sampled_grads(
                qc, kc, q, k, v, g, **masks, causal=True, hash_bits=tau, backward="exact", max_ratio=max_ratio(tau)
            ),
            backend.expectation_forward(q, k, v, **masks, causal=False, hash_bits=tau),
            *backend.expectation_backward(
                q, k, v, g, **masks, causal=False, hash_bits=tau, backward="exact", max_ratio=max_ratio(tau)
            ),
        ]

    first, again, strided = run(False), run(False), run(True)
    for a, b, c in zip(first, again, strided):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


# ---- the backend's limits, refused before any launch ------------------------------------------------


class _NoLaunch:
    def __getattr__(self, name):
        raise AssertionError(f"kernel {name} was launched; the call must be refused first")


@pytest.fixture
def no_launch(monkeypatch, backend):
    from yoso_triton import launch

    monkeypatch.setattr(launch, "kernels", _NoLaunch())


PRIMITIVES = ("hash_codes", "cumulate", "sampled_grads", "expectation_forward", "expectation_backward")
CALL = dict(
    framework="torch", device="cpu", dtype="float32", batch=2, n_query=50, n_key=40, dim=16, value_dim=8,
    mode="sample", hashing="gaussian", backward="lower_bound", causal=False, num_hashes=8, hash_bits=4,
    requires_grad=True,
)  # fmt: skip


def _reason(backend, **change):
    return backend.unsupported(yoso.backends.Call(**{**CALL, "device": backend.devices[0], **change}))


def test_primitives_are_the_launch_functions(backend):
    """The base class calls ``launch.<primitive>(...)`` with the primitive's arguments: same names, same kinds."""
    import inspect

    from yoso_triton import launch

    assert backend.module == "yoso_triton.launch"
    for name in PRIMITIVES:
        assert getattr(type(backend), name) is getattr(yoso.backends.Backend, name), f"{name} is overridden"
        want = list(inspect.signature(getattr(yoso.backends.Backend, name)).parameters.values())[1:]
        got = list(inspect.signature(getattr(launch, name)).parameters.values())
        assert [(p.name, p.kind) for p in got] == [(p.name, p.kind) for p in want], name


def test_limits_are_decided_from_the_call(backend, monkeypatch):
    from yoso_triton.backend import MAX_NUM_HASHES, table_bytes

    assert _reason(backend) is None
    assert _reason(backend, dim=256, value_dim=256, hash_bits=16, causal=True, n_key=50) is None
    assert _reason(backend, mode="expectation", batch=10**6, n_query=10**4, n_key=10**4, hash_bits=16) is None
    for change, needle in [
        (dict(dim=257), "head dims D=257, Dv=8 (at most 256)"),
        (dict(value_dim=300, mode="expectation"), "Dv=300 (at most 256)"),
        (dict(dtype="float64"), "dtype float64"),
        (dict(num_hashes=MAX_NUM_HASHES + 1), f"num_hashes={MAX_NUM_HASHES + 1}"),
        (dict(batch=2**20, hash_bits=12), "bucket ids must fit int32"),
    ]:
        reason = _reason(backend, **change)
        assert reason is not None and reason.startswith("the 'triton' backend does not support"), reason
        assert needle in reason, (change, reason)
    # Bucket tables: the limit applies to the larger side and to the prefix sums of the ordered cumulations.
    need = table_bytes(2, 4, 50, 8)
    monkeypatch.setenv("YOSO_TRITON_MAX_TABLE_BYTES", str(need))
    assert _reason(backend) is None
    assert "bucket tables need" in _reason(backend, n_query=51)
    assert table_bytes(2, 4, 50, 8, prefix=True) > need
    assert "YOSO_TRITON_MAX_TABLE_BYTES" in _reason(backend, causal=True, n_key=50)
    assert _reason(backend, mode="expectation", causal=True, n_key=50) is None
    monkeypatch.setenv("YOSO_TRITON_MAX_TABLE_BYTES", str(2**40))
    assert "token indices must fit int32" in _reason(backend, batch=2**16, n_query=2**15, hash_bits=1)
    monkeypatch.setenv("YOSO_TRITON_MAX_TABLE_BYTES", "lots")
    with pytest.raises(ValueError, match="YOSO_TRITON_MAX_TABLE_BYTES must be an integer"):
        _reason(backend)


def test_missing_features_list_the_limits(backend):
    features = backend.missing_features()
    for needle in ("dtype float64", "head dims D, Dv > 256", "4.00 GiB per hash", "2**31 - 1", "num_hashes >"):
        assert any(needle in f for f in features), (needle, features)


def test_api_refuses_what_the_backend_cannot_do(backend, device, no_launch, monkeypatch):
    q = torch.randn(1, 4, 300, device=device)
    with yoso.set_backend("triton"), pytest.raises(ValueError, match=r"head dims D=300, Dv=300 \(at most 256\)"):
        yoso.attention(q, q, q)
    with yoso.set_backend("triton"), pytest.raises(ValueError, match="dtype float64"):
        yoso.attention(q[..., :8].double(), q[..., :8].double(), q[..., :8].double())
    monkeypatch.setenv("YOSO_TRITON_MAX_TABLE_BYTES", "4096")
    x = torch.randn(2, 3, 40, 8, device=device)
    with (
        yoso.set_backend("triton"),
        pytest.raises(ValueError, match=r"hash_bits=12 with batch=6, N=40, Dv=8: .* per hash"),
    ):
        yoso.attention(x, x, x, hash_bits=12)


def test_cpu_tensors_need_the_interpreter():
    """Without TRITON_INTERPRET=1, CPU tensors are refused with the way out, and `yoso info` says so."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import yoso\n"
        "from yoso_triton.backend import TritonBackend\n"
        "b = TritonBackend()\n"
        "print('AVAILABILITY', b.availability())\n"
        "call = yoso.backends.Call('torch', 'cpu', 'float32', 1, 4, 4, 8, 8, 'sample', 'gaussian', 'lower_bound',"
        " False, 2, 3, False)\n"
        "print('UNSUPPORTED', b.unsupported(call))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "UNSUPPORTED the 'triton' backend does not support device 'cpu' (it runs on cuda)" in out
    assert "set TRITON_INTERPRET=1 before the first yoso call" in out
    if not torch.cuda.is_available():
        assert "AVAILABILITY no CUDA GPU visible" in out and "TRITON_INTERPRET=1" in out


def test_interpret_changed_after_load_is_refused():
    """The backend chose its devices when loaded; kernels imported under another TRITON_INTERPRET would
    not run them, so the first primitive call refuses instead."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import os\n"
        "from yoso_triton.backend import TritonBackend\n"
        "b = TritonBackend()\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "try:\n"
        "    b.expectation_forward(None, None, None, query_mask=None, key_mask=None, causal=False, hash_bits=1)\n"
        "except RuntimeError as e:\n"
        "    print('ERROR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "ERROR TRITON_INTERPRET changed after yoso_triton was loaded" in out


def test_kernels_compile_for_the_gpu():
    """Every branch of every kernel compiles for sm_90 with Triton's bundled ptxas -- no GPU needed. The
    interpreter alone accepts code the compiler rejects (it once accepted a re-bound constexpr).

    Two processes compile half of the configurations each, at once (~100 s of one core in all)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = str(Path(__file__).with_name("compile_kernels.py"))
    halves = [
        subprocess.Popen(
            [sys.executable, script, "--part", part], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for part in ("0/2", "1/2")
    ]
    for half in halves:
        out, err = half.communicate()
        assert half.returncode == 0, out[-6000:] + err[-6000:]
        assert " 0 failed" in out and "compiled 0 of" not in out, out[-2000:]
