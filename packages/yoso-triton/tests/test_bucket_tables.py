"""The bucket-table primitives (kernels/state.py: ``bucket_tables``, ``read_buckets``, ``add_to_tables``)
against ``yoso_reference``, beyond the conformance suite (conformance/test_tables.py, test_state.py):

* both tilings (the GPU's: several chunks per bucket, channel tiles of the plain and outer tables and
  of the weighted reads, one bucket per program) and both sorts; both paths of ``add_to_tables`` (all
  tokens sorted and summed onto the old tables, and the straight adds of a short chunk);
* ``hash_bits`` up to 16 (the API's maximum), hash groups and grid chunks (``first_hash`` offsets);
* half-precision inputs: float32 tables at float32 accuracy (products of halves are exact in fp32);
* a one-token step: no sort, only the token's ``m`` rows change, the input tables are left as they were;
* masked content (NaN) never reaches a sum; bitwise reproducible and layout independent.

Shapes stay small: under the GPU tiling the interpreter pays ~15 ms per (bucket, hash, tile) program.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import yoso
import yoso_reference as ref

F32_TOL = 2e-5


def _t(x, device, dtype=torch.float32):
    if x is None:
        return None
    if x.dtype == bool or np.issubdtype(x.dtype, np.integer):
        return torch.as_tensor(x if x.dtype == bool else x.astype(np.int32), device=device)
    return torch.as_tensor(x, device=device).to(dtype)


def _np(t):
    return t.detach().cpu().double().numpy()


def rel_err(a, b) -> float:
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / (scale if scale > 0 else 1.0))


def _problem(rng, batch, n, channels, width, m, tau):
    mask = rng.random((batch, n)) < 0.75
    mask[:, 0] = True
    return dict(
        codes=rng.integers(0, 2**tau, (batch, m, n)),
        values=rng.standard_normal((batch, n, channels)),
        outer=rng.standard_normal((batch, n, width)),
        weights=rng.standard_normal((batch, n, channels)),
        mask=mask,
        tables=rng.standard_normal((batch, m, 2**tau, channels)),
        outer_tables=rng.standard_normal((batch, m, 2**tau, channels, width)),
    )


def _check(pb, device, tau, monkeypatch, dtype=torch.float32, tol=F32_TOL, short=12):
    """Every primitive and variant on one problem against the oracle (run on the inputs as passed):
    add_to_tables both ways -- all tokens sorted onto the old tables, the first ``short`` straight in."""
    from yoso_triton import launch

    t = {
        name: _t(x, device, dtype if name in ("values", "outer", "weights") else torch.float32)
        for name, x in pb.items()
    }
    rounded = {name: _np(x) if x.is_floating_point() else x.cpu().numpy() for name, x in t.items()}
    codes, mask = t["codes"], t["mask"]
    for outer, old in ((None, "tables"), ("outer", "outer_tables")):
        extra, want_extra = (None, None) if outer is None else (t[outer], rounded[outer])
        got = launch.bucket_tables(codes, t["values"], mask=mask, hash_bits=tau, outer=extra)
        want = ref.bucket_tables(pb["codes"], rounded["values"], mask=pb["mask"], hash_bits=tau, outer=want_extra)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert rel_err(_np(got), want) < tol, ("bucket_tables", outer)
        weights, want_weights = (None, None) if outer is None else (t["weights"], rounded["weights"])
        read = launch.read_buckets(codes, got, mask=mask, weights=weights)
        want_read = ref.read_buckets(pb["codes"], want, mask=pb["mask"], weights=want_weights)
        assert rel_err(_np(read), want_read) < tol, ("read_buckets", outer)
        assert (_np(read)[~pb["mask"]] == 0).all(), "masked readers must be exact zeros"
        for n, path in ((codes.shape[2], 0), (short, 1 << 20)):  # ADD_TOKENS: sorted, then straight adds
            monkeypatch.setattr(launch, "ADD_TOKENS", path)
            part = None if extra is None else extra[:, :n]
            added = launch.add_to_tables(
                t[old], codes[..., :n], t["values"][:, :n], mask=mask[:, :n], hash_bits=tau, outer=part
            )
            want = ref.bucket_tables(
                pb["codes"][..., :n], rounded["values"][:, :n], mask=pb["mask"][:, :n], hash_bits=tau,
                outer=None if want_extra is None else want_extra[:, :n],
            )  # fmt: skip
            assert added.dtype == torch.float32 and rel_err(_np(added), pb[old] + want) < tol, ("add", outer, n)


@pytest.fixture(params=["interpreter-tiles", "gpu-tiles"])
def tiling(request, monkeypatch, device):
    from yoso_triton import launch

    if request.param == "gpu-tiles":
        monkeypatch.setattr(launch, "INTERPRETER_BLOCKS", False)
    elif not launch.INTERPRET:
        pytest.skip("interpreter tiles are used only under TRITON_INTERPRET=1")
    return request.param


CASES = [
    # batch, n, channels, outer width, m, tau, tokens added straight
    (2, 37, 5, 3, 2, 2, 12),  # odd sizes; GPU tiles: several chunks per bucket
    (1, 20, 130, 40, 1, 2, 20),  # GPU tiles: 2 plain and 3 outer channel tiles, 2 read tiles, 9 weight steps,
    # two steps of straight adds
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_tilings(backend, device, tiling, rng, monkeypatch, case):
    *shape, tau, short = case
    _check(_problem(rng, *shape, tau), device, tau, monkeypatch, short=short)


@pytest.mark.parametrize("sort", ["counting", "radix"])
def test_sorts(backend, device, monkeypatch, rng, sort):
    from yoso_triton import launch

    monkeypatch.setattr(launch, "SORT", sort)
    _check(_problem(rng, 3, 30, 4, 6, 2, 5), device, 5, monkeypatch, short=3)


def test_largest_hash_bits(backend, device, rng, monkeypatch):
    """hash_bits=16 (the API's maximum; radix sort): 2**16 rows per hash, almost all empty."""
    _check(_problem(rng, 1, 20, 3, 2, 1, 16), device, 16, monkeypatch, short=3)


def test_hash_groups_and_grid_chunks(backend, device, rng, monkeypatch):
    """Hashes in groups of one (the sums) and grid chunks of two (the straight adds): offsets by first_hash."""
    from yoso_triton import launch

    monkeypatch.setattr(launch, "GROUP_BYTES", 1)
    monkeypatch.setattr(launch, "MAX_GRID_YZ", 2)
    _check(_problem(rng, 2, 9, 3, 2, 5, 3), device, 3, monkeypatch, short=9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_inputs_give_float32_tables(backend, device, rng, monkeypatch, dtype):
    """Half values, outer factors and weights: float32 tables and reads at float32 accuracy, against the
    oracle on the same (rounded) inputs; a half factor meeting a float32 one is exact too."""
    from yoso_triton import launch

    pb = _problem(rng, 2, 25, 6, 4, 3, 3)
    _check(pb, device, 3, monkeypatch, dtype=dtype, short=5)
    values, outer = _t(pb["values"], device, dtype), _t(pb["outer"], device)
    got = launch.bucket_tables(_t(pb["codes"], device), values, mask=None, hash_bits=3, outer=outer)
    want = ref.bucket_tables(pb["codes"], _np(values), hash_bits=3, outer=pb["outer"])
    assert got.dtype == torch.float32 and rel_err(_np(got), want) < F32_TOL


@pytest.mark.parametrize("with_outer", [False, True], ids=["plain", "outer"])
def test_one_token_step_touches_only_its_rows(backend, device, rng, monkeypatch, with_outer):
    """A decoding step adds one token without sorting: its m rows change (by exactly its value, or outer
    product), every other entry keeps its bits, and the tables passed in are left unchanged."""
    from yoso_triton import launch

    def no_sort(*args, **kwargs):
        raise AssertionError("a one-token step must not sort")

    monkeypatch.setattr(launch, "Sorted", no_sort)
    batch, m, tau, channels, width = 2, 4, 6, 8, 5
    pb = _problem(rng, batch, 1, channels, width, m, tau)
    old = pb["outer_tables" if with_outer else "tables"]
    tables = _t(old, device)
    before = tables.clone()
    extra = _t(pb["outer"], device) if with_outer else None
    for mask in (np.array([[True], [False]]), None):
        got = launch.add_to_tables(
            tables,
            _t(pb["codes"], device),
            _t(pb["values"], device),
            mask=None if mask is None else _t(mask, device),
            hash_bits=tau,
            outer=extra,
        )
        assert torch.equal(tables, before), "the input tables must not change"
        want = old + ref.bucket_tables(
            pb["codes"], pb["values"], mask=mask, hash_bits=tau, outer=pb["outer"] if with_outer else None
        )
        assert rel_err(_np(got), want) < F32_TOL
        touched = np.zeros(old.shape[:3], bool)
        for b in range(batch):
            if mask is None or mask[b, 0]:
                touched[b, np.arange(m), pb["codes"][b, :, 0]] = True
        assert torch.equal(got[torch.as_tensor(~touched)], before[torch.as_tensor(~touched)])


def test_masked_content_never_reaches_a_sum(backend, device, rng):
    """NaN in the masked tokens' values and outer factors, and in the masked readers' weights."""
    from yoso_triton import launch

    pb = _problem(rng, 2, 40, 5, 3, 2, 3)
    for name in ("values", "outer", "weights"):
        pb[name][~pb["mask"]] = np.nan
    clean = {name: np.where(pb["mask"][..., None], pb[name], 0.0) for name in ("values", "outer", "weights")}
    codes, mask = _t(pb["codes"], device), _t(pb["mask"], device)
    for outer in (None, "outer"):
        for n in (40, 3):  # the sorted sums and the straight adds
            extra = None if outer is None else _t(pb[outer][:, :n], device)
            want_extra = None if outer is None else clean[outer][:, :n]
            old = pb["tables" if outer is None else "outer_tables"]
            got = launch.add_to_tables(
                _t(old, device), codes[..., :n], _t(pb["values"][:, :n], device), mask=mask[:, :n], hash_bits=3,
                outer=extra,
            )  # fmt: skip
            want = ref.bucket_tables(pb["codes"][..., :n], clean["values"][:, :n], hash_bits=3, outer=want_extra)
            assert rel_err(_np(got), old + want) < F32_TOL
        extra = None if outer is None else _t(pb[outer], device)
        tables = launch.bucket_tables(codes, _t(pb["values"], device), mask=mask, hash_bits=3, outer=extra)
        weights = None if outer is None else _t(pb["weights"], device)
        read = _np(launch.read_buckets(codes, tables, mask=mask, weights=weights))
        want_read = ref.read_buckets(
            pb["codes"], _np(tables), mask=pb["mask"], weights=None if outer is None else clean["weights"]
        )
        assert np.isfinite(read).all() and rel_err(read, want_read) < F32_TOL


def test_bitwise_reproducible_and_layout_independent(backend, device, rng):
    """Run to run and contiguous or not (codes, values, factors, weights, tables as strided views), the
    same bits: every sum has a fixed order."""
    from yoso_triton import launch

    pb = _problem(rng, 2, 90, 6, 4, 3, 3)

    def strided(x):  # the same numbers as a non-contiguous view
        wide = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]

    def run(view):
        codes = _t(pb["codes"], device)
        codes = codes.transpose(0, 1).contiguous().transpose(0, 1) if view is strided else codes
        args = {n: view(_t(pb[n], device)) for n in ("values", "outer", "weights", "tables", "outer_tables")}
        mask = _t(pb["mask"], device)
        results = []
        for outer, old in ((None, "tables"), (args["outer"], "outer_tables")):
            tables = launch.bucket_tables(codes, args["values"], mask=mask, hash_bits=3, outer=outer)
            weights = None if outer is None else args["weights"]
            results += [tables, launch.read_buckets(codes, view(tables), mask=mask, weights=weights)]
            for n in (90, 2):
                results.append(
                    launch.add_to_tables(
                        args[old], codes[..., :n], args["values"][:, :n], mask=mask[:, :n], hash_bits=3,
                        outer=None if outer is None else outer[:, :n],
                    )
                )  # fmt: skip
        return results

    first = run(lambda x: x)
    for again in (run(lambda x: x), run(strided)):
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_the_primitives_and_the_flag(backend):
    """The launch functions have the primitives' signatures; has_tables is set and no state call is refused
    for needing tables."""
    from yoso_triton import launch

    for name in ("bucket_tables", "read_buckets", "add_to_tables"):
        want = list(inspect.signature(getattr(yoso.backends.Backend, name)).parameters.values())[1:]
        got = list(inspect.signature(getattr(launch, name)).parameters.values())
        assert [(p.name, p.kind) for p in got] == [(p.name, p.kind) for p in want], name
    assert backend.has_tables
    call = yoso.backends.Call(
        framework="torch", device=backend.devices[0], dtype="bfloat16", batch=4, n_query=1, n_key=1, dim=64,
        value_dim=64, mode="sample", hashing="gaussian", backward="lower_bound", causal=True, num_hashes=32,
        hash_bits=16, requires_grad=True, tables=True,
    )  # fmt: skip
    assert backend.unsupported(call) is None
    assert not any("bucket-table access" in f for f in backend.missing_features())
