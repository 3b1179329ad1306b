"""Backend-specific checks on a GPU, beyond the conformance suite (which runs with --backend cuda).

Skipped, with the reason, where the backend cannot run (no GPU, no driver, CPU torch, old GPU):
these tests never pass without launching a kernel.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import requires_gpu

import yoso_reference as ref

torch = pytest.importorskip("torch")
pytestmark = requires_gpu


def _cuda():
    from yoso_cuda.backend import CudaBackend

    return CudaBackend()


def _t(x, dtype=torch.float32):
    return torch.as_tensor(x).to("cuda", dtype)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def _problem(rng, batch=2, n=300, dim=64, dv=48, m=8, tau=6):
    unit = ref.unit_rows
    return dict(
        q=unit(rng.standard_normal((batch, n, dim))),
        k=unit(rng.standard_normal((batch, n, dim))),
        v=rng.standard_normal((batch, n, dv)),
        g=rng.standard_normal((batch, n, dv)),
        qc=rng.integers(0, 2**tau, (batch, m, n)),
        kc=rng.integers(0, 2**tau, (batch, m, n)),
        qm=rng.random((batch, n)) < 0.8,
        km=rng.random((batch, n)) < 0.8,
        tau=tau,
    )


@pytest.mark.parametrize("order", ["none", "causal", "anticausal"])
@pytest.mark.parametrize("tau, m", [(6, 8), (12, 32)], ids=["one-group", "split-groups"])
def test_cumulate_long_sequences_and_hash_groups(order, tau, m):
    pb = _problem(np.random.default_rng(1), n=1000, m=m, tau=tau)
    got = _cuda().cumulate(
        _t(pb["qc"], torch.int32), _t(pb["kc"], torch.int32), _t(pb["v"]),
        read_mask=_t(pb["qm"], torch.bool), write_mask=_t(pb["km"], torch.bool), order=order, hash_bits=tau,
    )  # fmt: skip
    want = ref.cumulate(
        pb["qc"], pb["kc"], pb["v"], read_mask=pb["qm"], write_mask=pb["km"], order=order, hash_bits=tau
    )
    assert _rel(got.cpu(), want) < 2e-5


@pytest.mark.parametrize("dim, dv", [(64, 48), (256, 256), (200, 40)], ids=["tile32", "tile16", "tile16-mixed"])
@pytest.mark.parametrize("causal", [False, True])
def test_expectation_tiles(dim, dv, causal):
    pb = _problem(np.random.default_rng(2), n=77, dim=dim, dv=dv)
    cuda = _cuda()
    args = [_t(pb[x]) for x in ("q", "k", "v")]
    masks = dict(query_mask=_t(pb["qm"], torch.bool), key_mask=_t(pb["km"], torch.bool))
    y = cuda.expectation_forward(*args, **masks, causal=causal, hash_bits=pb["tau"])
    want = ref.expectation_forward(
        pb["q"], pb["k"], pb["v"], query_mask=pb["qm"], key_mask=pb["km"], causal=causal, hash_bits=pb["tau"]
    )
    assert _rel(y.cpu(), want) < 2e-5
    grads = cuda.expectation_backward(
        *args, _t(pb["g"]), **masks, causal=causal, hash_bits=pb["tau"], backward="exact", max_ratio=60.0
    )
    wants = ref.expectation_backward(
        pb["q"], pb["k"], pb["v"], pb["g"], query_mask=pb["qm"], key_mask=pb["km"], causal=causal,
        hash_bits=pb["tau"], backward="exact", max_ratio=60.0,
    )  # fmt: skip
    for got, w in zip(grads, wants):
        assert _rel(got.cpu(), w) < 2e-5


@pytest.mark.parametrize("dim, dv", [(64, 48), (256, 256)], ids=["tile32", "tile16"])
@pytest.mark.parametrize("backward", ["lower_bound", "exact"])
def test_sampled_grads_tiles_with_crowded_buckets(dim, dv, backward):
    """tau=2 puts ~75 tokens in each bucket: several tiles per bucket on both sides."""
    pb = _problem(np.random.default_rng(3), n=300, dim=dim, dv=dv, m=3, tau=2)
    dq, dk = _cuda().sampled_grads(
        _t(pb["qc"], torch.int32), _t(pb["kc"], torch.int32), *(_t(pb[x]) for x in ("q", "k", "v", "g")),
        query_mask=_t(pb["qm"], torch.bool), key_mask=_t(pb["km"], torch.bool), causal=True, hash_bits=2,
        backward=backward, max_ratio=20.0,
    )  # fmt: skip
    want = ref.sampled_grads(
        pb["qc"], pb["kc"], pb["q"], pb["k"], pb["v"], pb["g"], query_mask=pb["qm"], key_mask=pb["km"], causal=True,
        hash_bits=2, backward=backward, max_ratio=20.0,
    )  # fmt: skip
    assert _rel(dq.cpu(), want[0]) < 2e-5 and _rel(dk.cpu(), want[1]) < 2e-5


# ---- the lower bound's two forms (pairs, tables) and their per-bucket choice ----------------------------


def _skewed(rng, batch=2, n_query=301, n_key=301, dim=64, dv=48, m=3, tau=3, skew=0.6):
    """A _problem whose bucket 1 holds a share ``skew`` of each side (many tiles), the rest spread."""
    pb = _problem(rng, batch=batch, n=max(n_query, n_key), dim=dim, dv=dv, m=m, tau=tau)
    pb = dict(pb, q=pb["q"][:, :n_query], g=pb["g"][:, :n_query], qc=pb["qc"][..., :n_query], qm=pb["qm"][:, :n_query])
    pb = dict(pb, k=pb["k"][:, :n_key], v=pb["v"][:, :n_key], kc=pb["kc"][..., :n_key], km=pb["km"][:, :n_key])
    pb["qc"][..., rng.random(n_query) < skew] = 1
    pb["kc"][..., rng.random(n_key) < skew] = 1
    return pb


def _lower_bound(pb, *, causal, form, dtype=torch.float32):
    return _cuda().sampled_grads(
        _t(pb["qc"], torch.int32), _t(pb["kc"], torch.int32), *(_t(pb[x], dtype) for x in ("q", "k", "v")), _t(pb["g"]),
        query_mask=_t(pb["qm"], torch.bool), key_mask=_t(pb["km"], torch.bool), causal=causal, hash_bits=pb["tau"],
        backward="lower_bound", max_ratio=10.0 * pb["tau"], form=form,
    )  # fmt: skip


def _lower_bound_reference(pb, *, causal, dtype=torch.float32):
    q, k, v = (_t(pb[x], dtype).double().cpu().numpy() for x in ("q", "k", "v"))  # what the kernels saw
    return ref.sampled_grads(
        pb["qc"], pb["kc"], q, k, v, pb["g"], query_mask=pb["qm"], key_mask=pb["km"], causal=causal,
        hash_bits=pb["tau"], backward="lower_bound", max_ratio=10.0 * pb["tau"],
    )  # fmt: skip


@pytest.mark.parametrize("form", ["pairs", "tables", "auto"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dim, dv", [(64, 48), (64, 64), (256, 256), (33, 7), (1, 200)])
def test_lower_bound_forms_on_skewed_buckets(form, causal, dim, dv):
    """Every (TILE, DS) plan, odd sizes, masks, one bucket holding 60% of the tokens (many tiles)."""
    pb = _skewed(np.random.default_rng(10), dim=dim, dv=dv)
    got = _lower_bound(pb, causal=causal, form=form)
    for g, w in zip(got, _lower_bound_reference(pb, causal=causal)):
        assert _rel(g.cpu(), w) < 2e-5


@pytest.mark.parametrize("form", ["tables", "auto"])
def test_lower_bound_forms_cross_attention(form):
    pb = _skewed(np.random.default_rng(11), n_query=129, n_key=300, m=2)
    got = _lower_bound(pb, causal=False, form=form)
    for g, w in zip(got, _lower_bound_reference(pb, causal=False)):
        assert _rel(g.cpu(), w) < 2e-5


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lower_bound_tables_on_one_giant_bucket(causal):
    """Clustered tokens: every token of every hash in one bucket (the pair form's worst case)."""
    pb = _skewed(np.random.default_rng(12), batch=1, n_query=2000, n_key=2000, m=2, tau=4, skew=1.0)
    for form in ("tables", "auto"):
        got = _lower_bound(pb, causal=causal, form=form)
        for g, w in zip(got, _lower_bound_reference(pb, causal=causal)):
            assert _rel(g.cpu(), w) < 2e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lower_bound_forms_half_precision(dtype, causal):
    """fp16/bf16 q, k, v; fp32 arithmetic: as accurate as fp32 on the rounded inputs."""
    pb = _skewed(np.random.default_rng(13), dim=96, dv=80)
    for form in ("tables", "auto"):
        got = _lower_bound(pb, causal=causal, form=form, dtype=dtype)
        for g, w in zip(got, _lower_bound_reference(pb, causal=causal, dtype=dtype)):
            assert _rel(g.cpu(), w) < 2e-5


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_auto_form_takes_each_bucket_as_the_rule_says(causal):
    """One hash: every row of form="auto" is bitwise that row of the form _plans.bucket_form names."""
    from yoso_cuda import _plans

    pb = _skewed(np.random.default_rng(14), n_query=200, n_key=200, dim=4, dv=4, m=1, tau=6, skew=0.5)
    grads = {
        form: [x.cpu() for x in _lower_bound(pb, causal=causal, form=form)] for form in ("pairs", "tables", "auto")
    }
    seen = set()
    for side, codes in ((0, pb["qc"]), (1, pb["kc"])):
        for b in range(codes.shape[0]):
            for row, code in enumerate(codes[b, 0]):
                sizes = int((pb["qc"][b, 0] == code).sum()), int((pb["kc"][b, 0] == code).sum())
                form = _plans.bucket_form(_plans.FORMS["auto"], *sizes, 4, 4)
                seen.add(form)
                assert torch.equal(grads["auto"][side][b, row], grads[form][side][b, row]), (side, b, row, form)
    assert seen == {"pairs", "tables"}


def test_lower_bound_forms_are_bitwise_reproducible_and_ignore_masked_content():
    pb = _skewed(np.random.default_rng(15))
    dirty = dict(pb)
    for x, mask in (("q", "qm"), ("g", "qm"), ("k", "km"), ("v", "km")):
        dirty[x] = np.where(pb[mask][..., None], pb[x], np.nan)
    for causal in (False, True):
        for form in ("pairs", "tables", "auto"):
            first = _lower_bound(pb, causal=causal, form=form)
            second = _lower_bound(pb, causal=causal, form=form)
            third = _lower_bound(dirty, causal=causal, form=form)
            for a, b, c in zip(first, second, third):
                assert torch.equal(a, b) and torch.equal(a, c)
            assert (first[0][_t(~pb["qm"], torch.bool)] == 0).all() and (first[1][_t(~pb["km"], torch.bool)] == 0).all()


def test_api_backward_takes_the_table_form_where_buckets_are_big(monkeypatch):
    """yoso.attention's backward calls sampled_grads(form="auto"). With tau = 1 on 3000 tokens every bucket
    holds ~1500 of them, far past the break-even size (~43 at D = Dv = 32): "auto" is then bitwise the
    forced table form, and agrees with the pair form to rounding."""
    import functools

    from yoso_cuda import _ops

    import yoso

    q, k, v = (torch.randn(1, 2, 3000, 32, device="cuda", requires_grad=True) for _ in range(3))
    weights = torch.randn(1, 2, 3000, 32, device="cuda")
    sampled_grads = _ops.sampled_grads

    def grads(form):
        monkeypatch.setattr(_ops, "sampled_grads", functools.partial(sampled_grads, form=form))
        with yoso.set_backend("cuda"):
            out = yoso.attention(q, k, v, seed=4, num_hashes=4, hash_bits=1, causal=True)
        return torch.autograd.grad((out * weights).sum(), (q, k, v))

    auto, tables, pairs = grads("auto"), grads("tables"), grads("pairs")
    for a, t, p in zip(auto, tables, pairs):
        assert torch.equal(a, t) and _rel(a.cpu(), p.cpu()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hashing", ["gaussian", "hadamard"])
def test_half_precision_hashing_matches_on_the_rounded_inputs(dtype, hashing):
    import yoso

    rng = np.random.default_rng(4)
    for dim in (16, 60, 256):
        x = ref.unit_rows(rng.standard_normal((2, 100, dim)))
        planes = yoso.hash_planes(16, 8, dim, hashing=hashing, seed=5)[None]
        xt = _t(x, dtype)
        got = _cuda().hash_codes(xt, _t(planes), hashing=hashing, num_hashes=16, hash_bits=8).cpu().numpy()
        want = ref.hash_codes(
            xt.float().cpu().numpy().astype(np.float64), planes, hashing=hashing, num_hashes=16, hash_bits=8
        )
        assert (got != want).mean() < 0.01  # only near-ties may differ


def test_sample_mode_is_bitwise_reproducible():
    import yoso

    q, k, v = (torch.randn(2, 4, 513, 64, device="cuda", requires_grad=True) for _ in range(3))

    def run():
        out = yoso.attention(q, k, v, seed=3, num_hashes=16, hash_bits=7)
        weights = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)  # not out**2: rows are unit
        return (out, *torch.autograd.grad((out * weights).sum(), (q, k, v)))

    with yoso.set_backend("cuda"):
        first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_api_refuses_what_the_kernels_cannot_run():
    """Through yoso.attention: the backend's limits are a ValueError naming the argument, before any launch."""
    import yoso

    q = torch.randn(2, 3, 40, 16, device="cuda")
    with yoso.set_backend("cuda"):
        with pytest.raises(ValueError, match=r"'cuda' backend does not support hash_bits=13 \(at most 12\)"):
            yoso.attention(q, q, q, hash_bits=13)
        with pytest.raises(ValueError, match=r"head dims D=300, Dv=300 \(at most 256\)"):
            yoso.attention(*(torch.randn(1, 4, 300, device="cuda") for _ in "qkv"))
        with pytest.raises(ValueError, match=r"num_hashes=65536"):
            yoso.attention(q, q, q, num_hashes=65536, hash_bits=2)
        assert yoso.attention(q, q, q, hash_bits=16, mode="expectation").shape == q.shape  # no tables in YOSO-E


def test_inputs_on_two_devices_are_refused():
    import yoso

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    q = torch.randn(1, 4, 8, device="cuda:0")
    with yoso.set_backend("cuda"), pytest.raises(ValueError, match="must be on one device"):
        yoso.attention(q, q.to("cuda:1"), q)


def test_torch_compile_fullgraph():
    import yoso

    q, k, v = (torch.randn(2, 3, 64, 32, device="cuda", requires_grad=True) for _ in range(3))
    planes = torch.as_tensor(yoso.hash_planes(8, 4, 32, seed=1), device="cuda")

    def layer(q, k, v):
        out = yoso.attention(q, k, v, num_hashes=8, hash_bits=4, planes=planes)
        return (out * torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)).sum()

    with yoso.set_backend("cuda"):
        eager = layer(q, k, v)
        compiled = torch.compile(layer, fullgraph=True)(q, k, v)
    assert torch.allclose(eager, compiled)


# ---- the bucket tables and the recurrent state (kernels/tables.cu) -------------------------------------
# Emulated on the CPU in test_emulated_tables.py; these run the kernels themselves, at larger sizes.
STATE_DEVICE, STATE_BACKEND = "cuda", "cuda"  # a CPU check of these tests' logic swaps in the reference


def _table_problem(rng, batch=2, m=8, n=1000, channels=64, width=None, tau=12):
    return dict(
        codes=rng.integers(0, 2**tau, (batch, m, n)),
        values=rng.standard_normal((batch, n, channels)),
        outer=None if width is None else rng.standard_normal((batch, n, width)),
        mask=rng.random((batch, n)) < 0.8,
        tau=tau,
    )


def _tables_on_gpu(pb, dtype=torch.float32):
    return _cuda().bucket_tables(
        _t(pb["codes"], torch.int32), _t(pb["values"], dtype), mask=_t(pb["mask"], torch.bool), hash_bits=pb["tau"],
        outer=None if pb["outer"] is None else _t(pb["outer"], dtype),
    )  # fmt: skip


def _tables_reference(pb, dtype=torch.float32):
    seen = {x: None if pb[x] is None else _t(pb[x], dtype).double().cpu().numpy() for x in ("values", "outer")}
    return ref.bucket_tables(pb["codes"], seen["values"], mask=pb["mask"], hash_bits=pb["tau"], outer=seen["outer"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",
    [dict(), dict(n=3000, tau=2), dict(m=2, n=300, channels=256, width=256, tau=3)],
    ids=["tau12", "crowded", "outer"],
)
def test_table_primitives_match_the_reference(shape, dtype):
    """bucket_tables, read_buckets (weights with outer products), add_to_tables one token and 100 tokens."""
    cuda, rng = _cuda(), np.random.default_rng(20)
    pb = _table_problem(rng, **shape)
    tables = _tables_on_gpu(pb, dtype)
    assert _rel(tables.cpu(), _tables_reference(pb, dtype)) < 2e-5
    codes, mask = _t(pb["codes"], torch.int32), _t(pb["mask"], torch.bool)
    weights = None if pb["outer"] is None else rng.standard_normal(pb["values"].shape)
    got = cuda.read_buckets(codes, tables, mask=mask, weights=None if weights is None else _t(weights, dtype))
    seen = None if weights is None else _t(weights, dtype).double().cpu().numpy()
    assert (
        _rel(got.cpu(), ref.read_buckets(pb["codes"], tables.double().cpu().numpy(), mask=pb["mask"], weights=seen))
        < 2e-5
    )
    for n in (1, 100):  # the walk and the sum (_plans.ADD_WALK_MAX_TOKENS)
        step = _table_problem(rng, **{**shape, "n": n})
        grown = cuda.add_to_tables(
            tables, _t(step["codes"], torch.int32), _t(step["values"], dtype), mask=_t(step["mask"], torch.bool),
            hash_bits=step["tau"], outer=None if step["outer"] is None else _t(step["outer"], dtype),
        )  # fmt: skip
        assert _rel(grown.cpu(), tables.double().cpu().numpy() + _tables_reference(step, dtype)) < 2e-5


def test_table_primitives_are_bitwise_reproducible_and_ignore_masked_content():
    cuda = _cuda()
    pb = _table_problem(np.random.default_rng(21), n=2000, width=16, channels=32, tau=4)
    dirty = dict(pb, values=np.where(pb["mask"][..., None], pb["values"], np.nan))
    runs = [_tables_on_gpu(x) for x in (pb, pb, dirty)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    codes, mask, values = _t(pb["codes"], torch.int32), _t(pb["mask"], torch.bool), _t(dirty["values"])
    reads = [cuda.read_buckets(codes, runs[0], mask=mask, weights=values) for _ in range(2)]
    assert torch.equal(*reads) and (reads[0][~mask] == 0).all()
    grown = [
        cuda.add_to_tables(runs[0], codes, values, mask=mask, hash_bits=4, outer=values[..., :16]) for _ in range(2)
    ]
    assert torch.equal(*grown)


def _attention_inputs(seed, *, dtype, n=300, dim=64, dv=48, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 4, n, d, generator=gen) for d in (dim, dim, dv))
    mask = torch.rand(2, 4, n, generator=gen) < 0.9
    to = dict(device=STATE_DEVICE, dtype=dtype)
    q, k, v = (x.to(**to).requires_grad_(requires_grad) for x in (q, k, v))
    return q, k, v, mask.to(STATE_DEVICE), torch.randn(2, 4, n, dv, generator=gen).to(STATE_DEVICE)


def _chunked(q, k, v, mask, bounds, planes, **options):
    import yoso

    state, outs = None, []
    for a, b in zip(bounds[:-1], bounds[1:]):
        chunk = [x[..., a:b, :] for x in (q, k, v)]
        out, state = yoso.attention(*chunk, key_padding_mask=mask[..., a:b], causal=True, planes=planes,
                                    initial_state=state, output_final_state=True, **options)  # fmt: skip
        outs.append(out)
    return torch.cat(outs, dim=-2), state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_causal_call_equals_the_one_shot_call(dtype):
    """A prefill cut at random places, one-token chunks, then token-by-token decoding, carrying the state:
    the output and the final tables of the one-shot causal call (which runs the cumulation kernels)."""
    import yoso

    m, tau = 16, 8
    q, k, v, mask, _ = _attention_inputs(22, dtype=dtype)
    planes = torch.as_tensor(yoso.hash_planes(m, tau, 64, seed=3), device=STATE_DEVICE)
    options = dict(num_hashes=m, hash_bits=tau)
    with yoso.set_backend(STATE_BACKEND):
        want, want_state = yoso.attention(q, k, v, key_padding_mask=mask, causal=True, planes=planes,
                                          output_final_state=True, **options)  # fmt: skip
        got, state = _chunked(q, k, v, mask, [0, 1, 97, 98, 200, 296, 297, 298, 299, 300], planes, **options)
    tol = 2e-5 if dtype == torch.float32 else 1e-2  # bf16 outputs: one rounding of each
    assert _rel(got.float().cpu(), want.float().cpu()) < tol
    assert state.tables.dtype == torch.float32 and _rel(state.tables.cpu(), want_state.tables.cpu()) < 2e-5


def test_chunked_gradients_equal_the_one_shot_call():
    """With differentiable_state=True the gradients w.r.t. every chunk's q, k, v are the one-shot call's
    (the lower bound's terms between chunks through the key tables, read with weights)."""
    import yoso

    m, tau = 8, 6
    q, k, v, mask, cot = _attention_inputs(23, dtype=torch.float32, n=200, requires_grad=True)
    planes = torch.as_tensor(yoso.hash_planes(m, tau, 64, seed=4), device=STATE_DEVICE)
    options = dict(num_hashes=m, hash_bits=tau)
    with yoso.set_backend(STATE_BACKEND):
        want = yoso.attention(q, k, v, key_padding_mask=mask, causal=True, planes=planes, **options)
        want_grads = torch.autograd.grad((want * cot).sum(), (q, k, v))
        got, state = _chunked(q, k, v, mask, [0, 1, 60, 61, 199, 200], planes, differentiable_state=True, **options)
        grads = torch.autograd.grad((got * cot).sum(), (q, k, v))
    assert _rel(got.detach().cpu(), want.detach().cpu()) < 2e-5
    assert state.key_tables.shape == (2, 4, m, 2**tau, 48, 64)
    for name, g, w in zip("qkv", grads, want_grads):
        assert _rel(g.cpu(), w.cpu()) < 1e-4, name
