"""The adversarial catalogue (``catalogue.py``) through every front end, plus randomised property tests.

Each case runs through every front end of its kind, on every target (backend x caller framework):

* kind ``qkv``: ``yoso.attention``, its gradients (``yoso.attention_vjp`` for NumPy, the framework's autograd
  for torch and JAX), ``yoso.backend_for``;
* kind ``rows``: ``yoso.hash_codes``; kind ``planes``: ``yoso.hash_planes`` (once: it takes no arrays);
* kind ``layer``: ``yoso_models.nn.YosoSelfAttention``, ``yoso_models.nnx.YosoAttention`` and the transformers
  integration's attention function -- skipped, with the reason, where yoso_models or the layer's framework is
  not installed (the ``models`` nox session installs both and sets ``YOSO_TEST_REQUIRE_MODELS=1``, so there
  they fail instead).

A new front end joins by one fixture decorated with ``@front_end(kind)``, returning an object with
``call(inputs) -> result`` (and, for layers, ``build``/``names``): every case of that kind then runs through it.
"""

from __future__ import annotations

import math
import os
import re
import types
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
from catalogue import LAYERS, PLANES, QKV, ROWS, Case, Draw, Native, Raises

import yoso
from harness import REL_TOL, assert_close, random_mask, untied
from harness import planes as draw_planes
from yoso.testing import to_framework, to_numpy

# ---- front ends -----------------------------------------------------------------------------------------

_FRONT_ENDS: dict[str, list[str]] = {"qkv": [], "rows": [], "planes": [], "layer": []}
_FRAMEWORK: dict[str, str] = {}  # front end -> the only caller framework it takes (layers)


def front_end(kind: str, framework: str | None = None):
    """Register a fixture as a front end of ``kind``: every catalogue case of that kind runs through it (on
    the targets of ``framework`` only, if given)."""

    def register(function):
        _FRONT_ENDS[kind].append(function.__name__)
        if framework is not None:
            _FRAMEWORK[function.__name__] = framework
        return pytest.fixture(function)

    return register


_CASES = {"qkv": QKV, "rows": ROWS, "planes": PLANES, "layer": LAYERS}


def _runs(front: str, case: Case) -> bool:
    """Whether ``case`` goes through ``front``: every refusal does; a property goes through the gradients
    front end only where the case asks for it (``grads``: each costs a backward pass, slow in Triton's
    interpreter), and through the layers the case names."""
    if front == "gradients":
        return isinstance(case.expect, Raises) or case.grads
    layer = _LAYER_NAMES.get(front)
    return layer is None or not case.layers or layer in case.layers


def _layer_targets(config, framework: str) -> list[tuple[str, str]]:
    """The selected (backend, caller framework) pairs whose framework a layer takes (conftest's targets)."""
    import conftest

    pairs = []
    for name in conftest._selected(config):
        backend, _ = conftest._load(name)
        frameworks = conftest._frameworks(backend) if backend is not None else (framework,)
        pairs += [(name, framework)] if framework in frameworks else []
    return pairs


def pytest_generate_tests(metafunc):
    for kind, names in _FRONT_ENDS.items():
        if f"{kind}_front" not in metafunc.fixturenames:
            continue
        pairs = [(name, case) for name in names for case in _CASES[kind] if _runs(name, case)]
        if "layer_target" in metafunc.fixturenames:  # a layer runs only on the targets of its framework
            combos = [
                (name, case, t) for name, case in pairs for t in _layer_targets(metafunc.config, _FRAMEWORK[name])
            ]
            ids = [f"{name}-{case.id}-{t[0]}-{t[1]}" for name, case, t in combos]
            names = (f"{kind}_front", "case", "layer_target")
            metafunc.parametrize(names, combos, ids=ids, indirect=[f"{kind}_front", "layer_target"])
            continue
        ids = [f"{name}-{case.id}" for name, case in pairs]
        metafunc.parametrize((f"{kind}_front", "case"), pairs, ids=ids, indirect=[f"{kind}_front"])


@pytest.fixture
def layer_target(request):
    """Like conftest's ``target``, parametrised here: only the targets a layer's framework has."""
    import conftest

    return conftest._target(request)


@pytest.fixture
def qkv_front(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def rows_front(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def planes_front(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def layer_front(request):
    return request.getfixturevalue(request.param)


# What a result's properties depend on: the glues and yoso._core hand every backend unit rows, zeroed masked
# rows and rescaled values, so a property of the result (finite, no leak, scale-free, NaN under tracing) is
# decided above the kernels; the kernels' own handling of masks and hashes is what the rest of the suite
# checks on each backend. YOSO_TEST_CATALOGUE=refusals (the nox sessions of the interpreted Pallas and
# Triton kernels, whose every program costs seconds there) runs only the refusals; the reference and jax
# sessions, whose glues serve all three caller frameworks, run everything.
CATALOGUE = os.environ.get("YOSO_TEST_CATALOGUE", "all")
if CATALOGUE not in ("all", "refusals"):
    raise ValueError(f"YOSO_TEST_CATALOGUE must be 'all' or 'refusals', got {CATALOGUE!r}")


def _properties_run_here() -> None:
    if CATALOGUE == "refusals":
        pytest.skip("YOSO_TEST_CATALOGUE=refusals: result properties are checked in the reference and jax sessions")


ARRAYS = ("q", "k", "v", "x", "key_padding_mask", "query_mask")


def convert(target, case: Case, inputs: dict) -> dict:
    """A case's inputs for ``target``: NumPy arrays of the arguments in the caller's framework (floats in the
    case's or the target's dtype, other dtypes kept), Natives made by the framework, everything else as is
    (``planes`` stay NumPy: every framework takes them)."""
    out = {}
    for name, value in inputs.items():
        if name == "reference":
            continue
        if isinstance(value, Native):
            try:
                value = value.make(target.framework)
            except LookupError:
                pytest.skip(f"{case.id}: no such input in {target.framework}")
        elif isinstance(value, np.ndarray) and name in ARRAYS:
            floating = np.issubdtype(value.dtype, np.floating) and value.dtype.isnative
            if floating and value.dtype != np.longdouble:
                value = target.array(value, case.dtype or target.dtype)
            else:
                value = to_framework(value, target.framework, target.device)
        out[name] = value
    return out


def _cotangent(out):
    """A fixed, non-trivial output gradient (a plain sum would vanish: N-YOSO rows are unit vectors)."""
    return np.sin(0.7 * np.arange(math.prod(out.shape))).reshape(tuple(out.shape))


@dataclass
class QkvFront:
    name: str
    target: object
    computes: bool = True

    def call(self, inputs: dict) -> dict:
        q, k, v = (inputs.pop(n) for n in "qkv")
        with yoso.set_backend(self.target.name):
            if self.name == "backend_for":
                return {"backend": yoso.backend_for(q, k, v, **inputs)}
            if self.name == "attention":
                return {"out": to_numpy(yoso.attention(q, k, v, **inputs))}
            return self._gradients(q, k, v, inputs)

    def _gradients(self, q, k, v, options):
        fw = self.target.framework
        if fw == "numpy":
            out, vjp = yoso.attention_vjp(q, k, v, **options)
            return {"out": to_numpy(out), "grads": [to_numpy(g) for g in vjp(_cotangent(out).astype(out.dtype))]}
        if fw == "torch":
            import torch

            inputs = [x.detach().requires_grad_() if _float_tensor(x) else x for x in (q, k, v)]
            out = yoso.attention(*inputs, **options)
            out.backward(torch.as_tensor(_cotangent(out), dtype=out.dtype, device=out.device))
            return {"out": to_numpy(out), "grads": [to_numpy(x.grad) for x in inputs]}
        import jax

        if not all(isinstance(x, jax.Array) for x in (q, k, v)):
            return {"out": to_numpy(yoso.attention(q, k, v, **options))}  # raises, as the case expects
        out, vjp = jax.vjp(lambda *qkv: yoso.attention(*qkv, **options), q, k, v)
        grads = vjp(self.target.array(_cotangent(out), str(out.dtype)))
        return {"out": to_numpy(out), "grads": [to_numpy(g) for g in grads]}


def _float_tensor(x) -> bool:
    import torch

    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.element_size() > 1 and x.device.type != "meta"


@front_end("qkv")
def attention(target):
    return QkvFront("attention", target)


@front_end("qkv")
def gradients(target):
    return QkvFront("gradients", target)


@front_end("qkv")
def backend_for(target):
    return QkvFront("backend_for", target, computes=False)


@dataclass
class RowsFront:
    target: object

    def call(self, inputs: dict) -> dict:
        x = inputs.pop("x")
        with yoso.set_backend(self.target.name):
            return {"codes": to_numpy(yoso.hash_codes(x, **inputs)), "hash_bits": inputs.get("hash_bits", 8)}


@front_end("rows")
def hash_codes(target):
    return RowsFront(target)


@dataclass
class PlanesFront:
    target: object

    def call(self, inputs: dict) -> dict:
        return {"planes": yoso.hash_planes(**inputs), "args": inputs}


@front_end("planes")
def hash_planes(target):
    from yoso.testing import framework_for

    if target.framework != framework_for(target.backend):
        pytest.skip("yoso.hash_planes takes no arrays: run once per backend, from its own framework's target")
    return PlanesFront(target)


# ---- the layers -----------------------------------------------------------------------------------------


def _models(module: str, framework: str):
    """``yoso_models.<module>``, or a skip (a failure under YOSO_TEST_REQUIRE_MODELS=1) saying what is missing."""
    import importlib

    try:
        importlib.import_module(framework)
        return importlib.import_module(f"yoso_models.{module}")
    except ImportError as exc:
        if os.environ.get("YOSO_TEST_REQUIRE_MODELS") == "1":
            pytest.fail(f"yoso_models.{module} is required (YOSO_TEST_REQUIRE_MODELS=1) but cannot load: {exc}")
        pytest.skip(f"yoso_models.{module} cannot load ({exc}); the models nox session runs these cases")


class TorchLayer:
    """``yoso_models.nn.YosoSelfAttention``."""

    names = {"width": "embed_dim", "heads": "num_heads", "input": "x", "mask": "key_padding_mask", "dropout": "dropout"}

    def __init__(self, target):
        self.nn, self.target = _models("nn", "torch"), target

    def build(self, options: dict):
        options = dict(options)
        return self.nn.YosoSelfAttention(options.pop("width"), options.pop("heads"), **options)

    def call(self, layer, inputs: dict, *, training: bool, seed: int = 0):
        import torch

        layer.train(training)
        x, mask = (_torch(inputs.get(n)) for n in ("input", "mask"))
        torch.manual_seed(seed)
        with yoso.set_backend(self.target.name):
            return to_numpy(layer(x, key_padding_mask=mask))


def _torch(x):
    import torch

    return torch.as_tensor(x) if isinstance(x, np.ndarray) else x


class FlaxLayer:
    """``yoso_models.nnx.YosoAttention`` (built anew per call: its hashing stream is the same each time)."""

    names = {
        "width": "in_features",
        "heads": "num_heads",
        "input": "inputs_q",
        "mask": "key_padding_mask",
        "dropout": "dropout_rate",
    }

    def __init__(self, target):
        self.nnx, self.target = _models("nnx", "flax"), target

    def build(self, options: dict):
        from flax import nnx

        options = dict(options)
        width, heads = options.pop("width"), options.pop("heads")
        if "dropout" in options:
            options["dropout_rate"] = options.pop("dropout")
        return lambda: self.nnx.YosoAttention(heads, width, **options, rngs=nnx.Rngs(params=0, hashing=1, dropout=2))

    def call(self, build, inputs: dict, *, training: bool, seed: int = 0):
        import jax.numpy as jnp

        layer = build()
        layer.train() if training else layer.eval()
        x, mask = (
            jnp.asarray(v) if isinstance(v, np.ndarray) else v for v in (inputs.get("input"), inputs.get("mask"))
        )
        extra = {n: v for n, v in inputs.items() if n not in ("input", "mask", "reference")}
        with yoso.set_backend(self.target.name):
            return to_numpy(layer(x, key_padding_mask=mask, **extra))


class TransformersAttention:
    """The function ``yoso_models.transformers.register`` gives transformers' ``AttentionInterface``, called as
    a BERT self-attention calls it: q = k = v = the input split into heads, the 4-D boolean mask transformers
    builds from a padding mask (and causality)."""

    names = {"width": "hidden_size", "heads": "num_heads", "input": "query", "mask": "attention_mask"}

    def __init__(self, target):
        self.hf, self.target = _models("transformers", "transformers"), target

    def build(self, options: dict):
        import transformers

        options = dict(options)
        heads, causal = options.pop("heads"), options.pop("causal", False)
        options.pop("width")
        name = self.hf.register("yoso-catalogue", **options)
        return heads, causal, transformers.AttentionInterface()[name]

    def call(self, built, inputs: dict, *, training: bool, seed: int = 0):
        import torch

        heads, causal, function = built
        x, mask = (_torch(inputs.get(n)) for n in ("input", "mask"))
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            x = x.reshape(x.shape[:-1] + (heads, -1)).movedim(-2, -3) if x.dim() >= 2 else x.reshape(heads, -1)
        attention_mask = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and isinstance(x, torch.Tensor) and x.dim() >= 2:
            n = x.shape[-2]
            attention_mask = mask[:, None, None, :].expand(mask.shape[0], 1, n, mask.shape[1])
            if causal:
                attention_mask = attention_mask & torch.ones(n, mask.shape[1], dtype=torch.bool).tril()
        elif mask is not None:
            attention_mask = mask
        module = types.SimpleNamespace(training=training, is_causal=causal)
        torch.manual_seed(seed)
        with yoso.set_backend(self.target.name):
            out, _ = function(module, x, x, x, attention_mask)
        return to_numpy(out.flatten(-2))


@front_end("layer", framework="torch")
def nn_layer(layer_target):
    return TorchLayer(layer_target)


@front_end("layer", framework="jax")
def nnx_layer(layer_target):
    return FlaxLayer(layer_target)


@front_end("layer", framework="torch")
def transformers_attention(layer_target):
    return TransformersAttention(layer_target)


_LAYER_NAMES = {"nn_layer": "nn", "nnx_layer": "nnx", "transformers_attention": "hf"}


# ---- what must hold ---------------------------------------------------------------------------------------


def _named(message: str, argument: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(argument)}(?![\w])", message) is not None


def check_raises(expect: Raises, run, *, argument: str | None = None) -> None:
    with pytest.raises(expect.error) as info:
        run()
    message = str(info.value)
    argument = argument or expect.argument
    assert _named(message, argument), f"the message must name {argument!r}: {message}"
    if expect.match:
        assert re.search(expect.match, message), f"the message must match {expect.match!r}: {message}"


def _arrays(result: dict):
    return [result["out"], *result.get("grads", [])] if "out" in result else []


def _assert_finite(result: dict, target) -> None:
    if "backend" in result:
        assert result["backend"] == target.name
    for x in _arrays(result):
        assert np.isfinite(x).all(), "finite inputs must give finite outputs and gradients"


def _assert_equal(result: dict, twin: dict, what: str) -> None:
    if "backend" in result:
        assert result == twin
        return
    for x, y in zip(_arrays(result), _arrays(twin)):
        np.testing.assert_array_equal(x, y, err_msg=what)
    if "codes" in result:
        np.testing.assert_array_equal(result["codes"], twin["codes"], err_msg=what)


def _tolerance(case: Case, target) -> float:
    dtype = case.dtype or target.dtype
    return 2e-2 if dtype in ("float16", "bfloat16") else 10 * REL_TOL[dtype]


def run_holds(case: Case, front, target, inputs: dict) -> None:
    prop = case.expect.prop

    def again(d):
        return front.call(convert(target, case, d))

    if prop == "warns":
        with pytest.warns(UserWarning, match="False everywhere"):
            result = again(inputs)
        _assert_finite(result, target)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing else here may warn
        result = again(inputs)
        reference = again(inputs["reference"]) if "reference" in inputs else None
    if "backend" in result:  # yoso.backend_for: accepted, and the backend chosen is the target's
        assert result["backend"] == target.name
        return
    if prop in ("finite", "codes_in_range", "planes_layout", "zero_row_code_0"):
        _assert_finite(result, target)
    if prop == "codes_in_range" or prop == "zero_row_code_0":
        codes = result["codes"]
        assert ((codes >= 0) & (codes < 2 ** result["hash_bits"])).all()
        if prop == "zero_row_code_0":
            zero = np.all(np.asarray(inputs["x"]) == 0, axis=-1)
            assert (codes[zero] == 0).all(), "a zero row hashes to code 0 (docs/math.md#zero-vectors)"
    elif prop == "planes_layout":
        args, planes = result["args"], result["planes"]
        m, tau, dim = (int(args[n]) for n in ("num_hashes", "hash_bits", "dim"))
        if args.get("hashing", "gaussian") == "gaussian":
            assert planes.shape == (m, tau, dim) and np.isfinite(planes).all()
        else:
            d_pad = 1 << max(0, dim - 1).bit_length()
            assert planes.shape == (-(-m // (d_pad // tau)), 3, d_pad) and np.isin(planes, (-1, 1)).all()
    elif prop == "unit_rows":
        _assert_finite(result, target)
        norms = np.linalg.norm(result["out"], axis=-1)
        np.testing.assert_allclose(norms, 1.0, atol=_tolerance(case, target))
    elif prop == "directions":
        _assert_finite(result, target)
        if "out" in result:
            assert_close(result["out"], reference["out"], target.dtype, f"{case.id}: scaled inputs", factor=10)
    elif prop in ("masked_twin", "same_as"):
        _assert_finite(result, target)
        _assert_equal(result, reference, f"{case.id}: must equal its twin bitwise")
    elif prop != "finite":
        raise AssertionError(f"unknown property {prop!r}")


def _applies(case: Case, target) -> None:
    if case.frameworks and target.framework not in case.frameworks:
        pytest.skip(f"{case.id} is for {', '.join(case.frameworks)} callers")
    dtype = case.dtype
    if dtype is not None and dtype not in target.backend.dtypes:
        pytest.skip(f"{target.name} does not compute in {dtype}")


# ---- the catalogue's tests -------------------------------------------------------------------------------


def test_qkv_case(qkv_front, case, target, rng):
    _applies(case, target)
    inputs = case.inputs(Draw(rng, target.framework, case.dtype or target.dtype))
    if isinstance(case.expect, Raises):
        if case.expect.computed and not qkv_front.computes:
            qkv_front.call(convert(target, case, inputs))  # backend_for computes nothing: nothing to refuse
            return
        check_raises(case.expect, lambda: qkv_front.call(convert(target, case, inputs)))
    else:
        _properties_run_here()
        run_holds(case, qkv_front, target, inputs)


def test_rows_case(rows_front, case, target, rng):
    _applies(case, target)
    inputs = case.inputs(Draw(rng, target.framework, case.dtype or target.dtype))
    if isinstance(case.expect, Raises):
        check_raises(case.expect, lambda: rows_front.call(convert(target, case, inputs)))
    else:
        run_holds(case, rows_front, target, inputs)


def test_planes_case(planes_front, case, target, rng):
    inputs = case.inputs(Draw(rng, "numpy", "float64"))
    if isinstance(case.expect, Raises):
        check_raises(case.expect, lambda: planes_front.call(dict(inputs)))
    else:
        run_holds(case, planes_front, target, inputs)


def test_layer_case(layer_front, case, layer_target, rng):
    front = layer_front
    inputs = case.inputs(Draw(rng, layer_target.framework, "float32"))
    values = {n: v.make(layer_target.framework) if isinstance(v, Native) else v for n, v in inputs.items()}
    values = {
        n: v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype == np.float64 else v for n, v in values.items()
    }
    expect = case.expect
    if isinstance(expect, Raises):
        argument = front.names.get(expect.argument, expect.argument)
        check_raises(expect, lambda: front.call(front.build(case.options), values, training=True), argument=argument)
        return
    _properties_run_here()
    layer = front.build(case.options)
    if expect.prop == "warns":
        with pytest.warns(UserWarning, match="False everywhere"):
            out = front.call(layer, values, training=True)
        assert np.isfinite(out).all()
        return
    out = front.call(layer, values, training=True)
    if expect.prop == "finite":
        assert np.isfinite(out).all()
        return
    assert expect.prop == "no_leak", expect.prop
    reference = inputs["reference"]
    twin = front.call(layer, {**reference, "input": reference["input"].astype(np.float32)}, training=True)
    real = np.asarray(inputs["mask"])
    assert np.isfinite(out[real]).all(), "real tokens' outputs must stay finite"
    np.testing.assert_array_equal(out[real], twin[real], err_msg="padded tokens changed real tokens' outputs")


# ---- randomised properties on every backend ---------------------------------------------------------------

GARBAGE = (np.nan, np.inf, -np.inf, 1e30, -1e4, 3e38)


@pytest.mark.parametrize("trial", range(3))
def test_random_padding_never_leaks(target, rng, trial):
    """Masked rows of q, k, v may hold anything: outputs and gradients are bitwise those of zeros there."""
    _properties_run_here()
    lead = [(2,), (3,), (2, 2)][trial]
    n = int(rng.integers(2, 9))
    causal, mode = bool(rng.integers(2)), ("sample", "expectation")[trial % 2]
    nq = n if causal else int(rng.integers(1, 9))
    q, k, v = (rng.standard_normal(lead + shape) for shape in ((nq, 4), (n, 4), (n, 3)))
    kpm = random_mask(rng, lead + (n,))
    qm = random_mask(rng, (lead[-1], nq) if trial == 2 else lead + (nq,))  # broadcast over the first dim
    masks = dict(q=np.broadcast_to(qm, lead + (nq,)), k=kpm, v=kpm)
    bad = dict(q=q.copy(), k=k.copy(), v=v.copy())
    for name, mask in masks.items():  # garbage in the masked rows, the original rows elsewhere
        bad[name][~mask] = rng.choice(GARBAGE, size=(int((~mask).sum()), bad[name].shape[-1]))
    good = {name: np.where(mask[..., None], x, 0) for (name, mask), x in zip(masks.items(), (q, k, v))}
    options = dict(key_padding_mask=kpm, query_mask=qm, causal=causal, mode=mode, seed=trial, num_hashes=4, hash_bits=3)
    cotangent = rng.standard_normal(lead + (nq, 3))
    out, grads = target.attention_and_grads(bad["q"], bad["k"], bad["v"], cotangent, **options)
    want, want_grads = target.attention_and_grads(good["q"], good["k"], good["v"], cotangent, **options)
    np.testing.assert_array_equal(out, want)
    assert (out[~masks["q"]] == 0).all(), "masked query rows are exact zeros"
    for g, w, mask in zip(grads, want_grads, masks.values()):
        np.testing.assert_array_equal(g, w)
        assert (g[~mask] == 0).all(), "masked rows get exact zero gradients"


@pytest.mark.parametrize("trial", range(3))
def test_random_scales_never_matter(target, rng, trial):
    """Each row of q and k, and each batch row of v, rescaled by a random power of ten up to the dtype's
    limits (1e±30 in float32): the same output, for every finite input."""
    _properties_run_here()
    span = 30 if target.dtype == "float32" else 200
    lead, mode = (2,), ("sample", "expectation", "sample")[trial]
    p = draw_planes(rng, 4, 3, 4)
    q, k = untied(rng, lead + (5, 4), p[None], "gaussian"), untied(rng, lead + (6, 4), p[None], "gaussian")
    v = rng.standard_normal(lead + (6, 3))
    options = dict(mode=mode, planes=p, num_hashes=4, hash_bits=3, causal=False)
    want = target.attention(q, k, v, **options)
    q_scale = 10.0 ** rng.integers(-span, span + 1, size=lead + (5, 1))
    k_scale = 10.0 ** rng.integers(-span, span + 1, size=lead + (6, 1))
    v_scale = 10.0 ** rng.integers(-span, span + 1, size=lead + (1, 1))
    got = target.attention(q * q_scale, k * k_scale, v * v_scale, **options)
    assert_close(got, want, target.dtype, "rescaled rows", factor=10)


def test_sampling_is_unbiased_with_zero_rows(target, rng):
    """E[YOSO-m] = YOSO-E for every finite input, zero rows included: zero queries and keys are masked in
    both modes (without that, a zero query and a zero key collide in every hash, where YOSO-E gives 2^-tau).
    2000 independent draws of hash functions, one per batch row; 5 standard errors."""
    _properties_run_here()
    draws, m, tau = 2000, 1, 2
    q, k, v = rng.standard_normal((4, 3)), rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    q[0], k[0], k[3] = 0, 0, 0
    planes = np.stack([yoso.hash_planes(m, tau, 3, seed=rng) for _ in range(draws)])
    b = lambda x: np.ascontiguousarray(np.broadcast_to(x, (draws,) + x.shape))  # noqa: E731
    samples = target.attention(b(q), b(k), b(v), planes=planes, num_hashes=m, hash_bits=tau, normalize=False)
    exact = target.attention(q, k, v, mode="expectation", hash_bits=tau, normalize=False)
    mean, error = samples.mean(axis=0), samples.std(axis=0) / np.sqrt(draws)
    assert (np.abs(mean - exact) <= 5 * error + 1e-12).all(), f"mean {mean} vs YOSO-E {exact}"
    assert (samples[:, 0] == 0).all() and (exact[0] == 0).all(), "a zero query attends to nothing"


def test_traced_calls_give_nan_for_nan_inputs(target, rng):
    """Under jax.jit and torch.compile the value checks cannot run: a NaN input must then give NaN outputs
    (its own row for q, its whole batch row for k and v, everything for planes), never a plausible number."""
    _properties_run_here()
    q, k, v = rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 6, 4)), rng.standard_normal((2, 6, 3))
    p = yoso.hash_planes(4, 3, 4, seed=0)
    if target.framework == "numpy":
        pytest.skip("NumPy calls are never traced: their values are always checked")
    if target.framework == "jax":
        import jax

        # One traced function each, called on same-shaped inputs: one trace (and compilation) each.
        run = jax.jit(lambda q, k, v, p: yoso.attention(q, k, v, planes=p, num_hashes=4, hash_bits=3))
        codes = jax.jit(lambda x, p: yoso.hash_codes(x, planes=p, num_hashes=4, hash_bits=3))
    else:
        import torch

        run = torch.compile(
            lambda q, k, v, p: yoso.attention(q, k, v, planes=p, num_hashes=4, hash_bits=3),
            backend="eager",
            fullgraph=True,
        )
        codes = torch.compile(
            lambda x, p: yoso.hash_codes(x, planes=p, num_hashes=4, hash_bits=3), backend="eager", fullgraph=True
        )

    arrays = lambda *xs: [target.array(x) for x in xs]  # noqa: E731
    planes = target.array(p)
    with yoso.set_backend(target.name):
        qn = q.copy()
        qn[0, 1] = np.nan
        out = to_numpy(run(*arrays(qn, k, v), planes))
        assert (
            np.isnan(out[0, 1]).all() and np.isfinite(np.delete(out[0], 1, axis=0)).all() and np.isfinite(out[1]).all()
        )
        kn = k.copy()
        kn[1, 2] = np.nan
        out = to_numpy(run(*arrays(q, kn, v), planes))
        assert np.isnan(out[1]).all() and np.isfinite(out[0]).all()
        pn = p.copy()
        pn[0, 0, 0] = np.nan
        assert np.isnan(to_numpy(run(*arrays(q, k, v), target.array(pn)))).all()
        got = to_numpy(codes(target.array(qn), planes))
        assert (got[0, 1] == -1).all() and (np.delete(got, 1, axis=1)[0] >= 0).all()


# Environment variables a backend reads, each with values it must refuse naming the variable (never dropped,
# and never a silent fall-back to another backend).
SETTINGS = {
    "triton": [("YOSO_TRITON_MAX_TABLE_BYTES", value) for value in ("lots", "0", "-1", "4.5GB")],
}


def test_bad_backend_settings_are_named(target, monkeypatch, rng):
    if target.name not in SETTINGS:
        pytest.skip(f"the {target.name!r} backend reads no setting a user could get wrong")
    q, k, v = rng.standard_normal((1, 3, 4)), rng.standard_normal((1, 3, 4)), rng.standard_normal((1, 3, 2))
    arrays = [target.array(x) for x in (q, k, v)]
    for variable, value in SETTINGS[target.name]:
        monkeypatch.setenv(variable, value)
        for choice in (target.name, None):
            with yoso.set_backend(choice), pytest.raises(ValueError, match=rf"{variable}.*{re.escape(repr(value))}"):
                yoso.attention(*arrays, seed=0, num_hashes=2, hash_bits=2)
