"""The sampled-gradient kernels' CUDA source, run on the CPU by the emulator of ``emulate.py``, against
``yoso_reference``: both forms of the lower bound and their per-bucket choice, through ``_ops.sampled_grads``
and its real launch plan.

This is no GPU result: blocks run one at a time and their threads in turn (emulator/emu.h), so races,
warp-level behaviour and timing are out of reach -- tests/test_gpu.py and benchmarks/gpu/cuda.sh are
for those. What it does check, without a GPU, is every index, tile walk, mask, causal order and
shared-memory size the launcher passes (a block writing past its shared memory fails the launch; one
reading memory it never wrote reads NaN).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from emulate import Emulator, asan_environment, compiler
from yoso_cuda import _ops, _plans, _runtime

import yoso_reference as ref

pytestmark = pytest.mark.skipif(
    compiler() is None or not sys.platform.startswith("linux"), reason="the kernel emulator needs g++ on Linux"
)
TOL = 2e-5  # fp32 arithmetic against float64 on the same (rounded) inputs


@pytest.fixture(scope="module")
def emulator():
    return Emulator()


@pytest.fixture
def run(emulator, monkeypatch):
    monkeypatch.setattr(_runtime, "launch", emulator.launch)
    monkeypatch.setattr(_runtime, "max_shared_memory", lambda index: 99 * 1024)
    emulator.launches.clear()
    return emulator


def _problem(seed, batch=2, n_query=70, n_key=70, dim=20, dv=12, m=3, tau=2, skew=0.6, masked=True):
    """Unit q, k; codes where a share ``skew`` of each side sits in bucket 1 (more rows than a tile)."""
    rng = np.random.default_rng(seed)
    qc = rng.integers(0, 2**tau, (batch, m, n_query))
    kc = rng.integers(0, 2**tau, (batch, m, n_key))
    qc[..., rng.random(n_query) < skew] = 1
    kc[..., rng.random(n_key) < skew] = 1
    return dict(
        q_codes=qc,
        k_codes=kc,
        q=ref.unit_rows(rng.standard_normal((batch, n_query, dim))),
        k=ref.unit_rows(rng.standard_normal((batch, n_key, dim))),
        v=rng.standard_normal((batch, n_key, dv)),
        grad=rng.standard_normal((batch, n_query, dv)),
        query_mask=rng.random((batch, n_query)) < 0.8 if masked else None,
        key_mask=rng.random((batch, n_key)) < 0.8 if masked else None,
        hash_bits=tau,
    )


def _cuda_args(pb, dtype=torch.float32):
    def t(x, dt=dtype):
        return None if x is None else torch.as_tensor(x).to(dt)

    arrays = [t(pb["q_codes"], torch.int32), t(pb["k_codes"], torch.int32)]
    arrays += [t(pb[x]) for x in ("q", "k", "v")] + [t(pb["grad"], torch.float32)]
    masks = dict(query_mask=t(pb["query_mask"], torch.bool), key_mask=t(pb["key_mask"], torch.bool))
    return arrays, masks


def _grads(pb, *, causal, form, dtype=torch.float32):
    arrays, masks = _cuda_args(pb, dtype)
    tau = pb["hash_bits"]
    return _ops.sampled_grads(*arrays, **masks, causal=causal, hash_bits=tau, backward="lower_bound",
                              max_ratio=10.0 * tau, form=form)  # fmt: skip


def _want(pb, *, causal, dtype=torch.float32):
    rounded = {x: torch.as_tensor(pb[x]).to(dtype).double().numpy() for x in ("q", "k", "v")}
    return ref.sampled_grads(
        pb["q_codes"], pb["k_codes"], rounded["q"], rounded["k"], rounded["v"], pb["grad"],
        query_mask=pb["query_mask"], key_mask=pb["key_mask"], causal=causal, hash_bits=pb["hash_bits"],
        backward="lower_bound", max_ratio=10.0 * pb["hash_bits"],
    )  # fmt: skip


def _rel(got, want):
    got = got.double().numpy()
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def _assert_matches(pb, *, causal, form, dtype=torch.float32):
    got = _grads(pb, causal=causal, form=form, dtype=dtype)
    for name, g, w in zip(("dq", "dk"), got, _want(pb, causal=causal, dtype=dtype)):
        assert torch.isfinite(g).all(), name
        assert _rel(g, w) < TOL, (name, _rel(g, w))
    return got


@pytest.mark.parametrize("blocks", [2048, 1], ids=["block-per-bucket", "one-block-loops"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("form", ["pairs", "tables", "auto"])
def test_forms_match_the_reference_on_skewed_buckets(run, monkeypatch, form, causal, blocks):
    """Bucket 1 holds ~60% of each side (> one 32-row tile); masks on both sides. With a grid of one
    bucket block per row, the table kernel's blocks walk every bucket in turn (_plans.table_grid)."""
    monkeypatch.setattr(_plans, "TABLE_BLOCKS", blocks)
    _assert_matches(_problem(0), causal=causal, form=form)
    if form != "pairs":
        grids = {grid for _p, name, grid, *_ in run.launches if name.startswith("sampled_grads_tables")}
        assert grids == {(4, 2, 2) if blocks == 2048 else (1, 2, 2)}
    names = {name.split("<")[0] for _program, name, *_ in run.launches}
    assert names == {"pairs": {"sampled_grads_hash"}, "tables": {"sampled_grads_tables"}}.get(
        form, {"sampled_grads_hash", "sampled_grads_tables"}
    )


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_exact_gradient_takes_the_pair_kernel(run, causal):
    """backward="exact" (importance-weighted pairs) with form="auto": the pair kernel alone, every bucket."""
    pb = _problem(7)
    arrays, masks = _cuda_args(pb)
    kw = dict(causal=causal, hash_bits=2, backward="exact", max_ratio=20.0)
    got = _ops.sampled_grads(*arrays, **masks, **kw, form="auto")
    want = ref.sampled_grads(pb["q_codes"], pb["k_codes"], *(pb[x] for x in ("q", "k", "v", "grad")),
                             query_mask=pb["query_mask"], key_mask=pb["key_mask"], **kw)  # fmt: skip
    assert _rel(got[0], want[0]) < TOL and _rel(got[1], want[1]) < TOL
    assert {name.split("<")[0] for _p, name, *_ in run.launches} == {"sampled_grads_hash"}


@pytest.mark.parametrize("form", ["tables", "auto"])
def test_cross_attention(run, form):
    _assert_matches(_problem(1, n_query=45, n_key=83, m=2), causal=False, form=form)


@pytest.mark.parametrize(
    "dim, dv, causal",
    [(256, 256, True), (1, 1, True), (65, 33, False), (17, 200, True), (64, 64, True)],
    ids=lambda x: str(x),
)
def test_table_tiles_and_slices(run, dim, dv, causal):
    """Each (TILE, DS) the planner picks, several column slices, head dims up to 256, one dim of 1."""
    pb = _problem(2, batch=1, n_query=40, n_key=40, dim=dim, dv=dv, m=1, tau=1, skew=0.5)
    _assert_matches(pb, causal=causal, form="tables")
    tile, ds = _plans.table_plan(dim, dv)
    assert {name for _p, name, *_ in run.launches} == {f"sampled_grads_tables<float, {tile}, {ds}>"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_half_inputs(run, dtype, causal):
    """fp16/bf16 q, k, v (grad is fp32), fp32 arithmetic: as accurate as fp32 on the rounded inputs."""
    _assert_matches(_problem(3, dim=24, dv=40, m=2), causal=causal, form="tables", dtype=dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_auto_takes_each_bucket_in_the_form_the_rule_picks(run, causal):
    """With one hash, every row of "auto" is bitwise the row of the form _plans.bucket_form names for its
    bucket: the kernels decide on the device exactly as the rule says, and each bucket is done once."""
    pb = _problem(4, batch=2, n_query=60, n_key=60, dim=4, dv=4, m=1, tau=3, skew=0.5)
    both = {form: _grads(pb, causal=causal, form=form) for form in ("pairs", "tables", "auto")}
    seen = set()
    for side, codes in ((0, pb["q_codes"]), (1, pb["k_codes"])):
        for b in range(2):
            for row, code in enumerate(codes[b, 0]):
                n_query = int((pb["q_codes"][b, 0] == code).sum())
                n_key = int((pb["k_codes"][b, 0] == code).sum())
                form = _plans.bucket_form(_plans.FORMS["auto"], n_query, n_key, 4, 4)
                seen.add(form)
                assert torch.equal(both["auto"][side][b, row], both[form][side][b, row]), (side, b, row, form)
    assert seen == {"pairs", "tables"}  # the problem has buckets of both kinds
    for side in (0, 1):
        assert not torch.equal(both["pairs"][side], both["tables"][side])  # the forms differ in rounding


def test_masked_rows_are_exact_zeros_and_their_content_never_leaks(run):
    """NaN/inf in masked rows of q, k, v, grad change nothing (bitwise), and masked rows' gradients are 0."""
    pb = _problem(5, dim=20, dv=12)
    clean = {form: _grads(pb, causal=True, form=form) for form in ("tables", "auto")}
    dirty = dict(pb)
    for x, mask in (("q", "query_mask"), ("grad", "query_mask"), ("k", "key_mask"), ("v", "key_mask")):
        dirty[x] = np.where(pb[mask][..., None], pb[x], np.nan)
    dirty["v"] = np.where(pb["key_mask"][..., None], dirty["v"], np.inf)
    for form in ("tables", "auto"):
        dq, dk = _grads(dirty, causal=True, form=form)
        assert torch.equal(dq, clean[form][0]) and torch.equal(dk, clean[form][1])
        assert (dq[torch.as_tensor(~pb["query_mask"])] == 0).all()
        assert (dk[torch.as_tensor(~pb["key_mask"])] == 0).all()


def test_emulator_reports_shared_memory_overruns(run, monkeypatch):
    """The emulator's own check: a launch that asks for less shared memory than the kernel uses fails."""
    monkeypatch.setattr(_plans, "table_smem", lambda tile, ds, dv: 4 * (2 * tile * (dv + 1)))
    with pytest.raises(RuntimeError, match="past the end of its dynamic shared memory"):
        _grads(_problem(6, m=1), causal=False, form="tables")


def test_no_out_of_bounds_access_under_address_sanitizer():
    """The CPU stand-in for compute-sanitizer's memcheck: both forms under AddressSanitizer, in a process
    with the ASan runtime preloaded (any bad access of a tensor or of shared memory aborts it)."""
    env = asan_environment()
    if env is None:
        pytest.skip("the C++ compiler has no AddressSanitizer runtime")
    script = Path(__file__).with_name("emulate.py")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "AddressSanitizer" not in result.stderr.replace("ASan doesn't fully support makecontext", "")
    assert result.stdout.count("ok  ") == 21 + 9, result.stdout  # the sampled gradients, the bucket tables
