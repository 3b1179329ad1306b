"""The API around the math: backend discovery and selection, and the ``yoso`` command."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

import yoso
from yoso import backends, cli


class RecordingBackend(backends.Backend):
    """A mock backend: delegates to the reference and records which primitives ran."""

    name = "mock"
    priority = 1000
    frameworks = ("numpy",)
    dtypes = ("float32",)  # deliberately narrow: float64 calls must not reach it automatically
    description = "test double"

    def __init__(self):
        self.calls = []
        self._ref = backends.get("reference")

    def __getattribute__(self, attr):
        primitives = ("hash_codes", "cumulate", "sampled_grads", "expectation_forward", "expectation_backward")
        if attr in primitives:
            self.calls.append(attr)
            return getattr(self._ref, attr)
        return super().__getattribute__(attr)


@pytest.fixture
def mock():
    backend = RecordingBackend()
    backends.register(backend)
    yield backend
    backends.unregister("mock")


def _qkv(dtype="float32"):
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal((2, 9, 4)).astype(dtype) for _ in range(3))


def test_reference_is_installed_and_available():
    assert "reference" in backends.installed_backends()
    assert "reference" in yoso.available_backends()


def test_set_backend_is_a_thread_local_context_manager(mock):
    assert backends.explicit_choice() is None
    with yoso.set_backend("reference"):
        assert yoso.get_backend() == "reference"
        seen = {}
        worker = threading.Thread(target=lambda: seen.setdefault("name", backends.explicit_choice()))
        worker.start()
        worker.join()
        assert seen["name"] is None, "another thread must not see this thread's choice"
        with yoso.set_backend("mock"):
            assert yoso.get_backend() == "mock"
        assert yoso.get_backend() == "reference"
    assert backends.explicit_choice() is None


def test_set_backend_without_with_and_reset():
    yoso.set_backend("reference")
    try:
        assert yoso.get_backend() == "reference"
    finally:
        yoso.set_backend(None)
    assert backends.explicit_choice() is None


def test_unknown_backend_lists_installed():
    with pytest.raises(ValueError, match=r"unknown yoso backend 'nope'.*installed backends: .*reference"):
        yoso.set_backend("nope")
    with pytest.raises(TypeError, match="backend name"):
        yoso.set_backend(3)


def test_env_var_selects_and_is_validated(monkeypatch, mock):
    monkeypatch.setenv("YOSO_BACKEND", "mock")
    assert yoso.get_backend() == "mock"
    yoso.attention(*_qkv(), seed=0)
    assert "cumulate" in mock.calls
    monkeypatch.setenv("YOSO_BACKEND", "nope")
    with pytest.raises(ValueError, match="installed backends"):
        yoso.attention(*_qkv(), seed=0)


def test_explicit_choice_is_strict(mock):
    with yoso.set_backend("mock"):
        with pytest.raises(ValueError, match=r"'mock' backend does not support dtype float64"):
            yoso.attention(*_qkv("float64"), seed=0)


def test_automatic_choice_takes_the_best_backend_that_supports_the_call(mock):
    yoso.attention(*_qkv("float64"), seed=0)
    assert mock.calls == [], "float64 is beyond the mock: automatic choice must fall back to the reference"
    yoso.attention(*_qkv("float32"), seed=0)
    assert mock.calls[:2] == ["hash_codes", "hash_codes"] and "cumulate" in mock.calls
    out, vjp = yoso.attention_vjp(*_qkv("float32"), seed=0)
    vjp(np.ones_like(out))
    assert "sampled_grads" in mock.calls


class _BrokenEntryPoint:
    name = "broken"
    value = "broken_module:Backend"
    dist = None

    def load(self):
        raise ImportError("no module named broken_module")


def test_broken_backend_is_reported_not_raised(monkeypatch):
    entries = dict(backends._discover())
    entries["broken"] = backends._Entry("broken", "test", entry_point=_BrokenEntryPoint())
    monkeypatch.setattr(backends, "_entries", entries)
    assert "broken" not in yoso.available_backends()
    row = next(r for r in backends.status() if r["name"] == "broken")
    assert not row["available"] and "no module named broken_module" in row["reason"]
    with pytest.raises(ValueError, match="cannot run here.*broken_module"):
        yoso.set_backend("broken")
    yoso.attention(*_qkv(), seed=0)  # everything else keeps working


def _loaded_after(code: str, env: dict | None = None) -> list[str]:
    """The heavy modules a fresh interpreter has loaded after running ``code``."""
    import os

    probe = f"{code}\nimport sys; print(sorted({{m.split('.')[0] for m in sys.modules}}))"
    environment = {**os.environ, **(env or {})}
    environment.pop("YOSO_BACKEND", None) if env is None else None
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=environment)
    loaded = eval(out.stdout.strip().splitlines()[-1])  # a printed list of names
    heavy = ("numpy", "torch", "jax", "triton", "cuda", "yoso_reference", "yoso_jax", "yoso_triton", "yoso_cuda")
    return [m for m in loaded if m in heavy]


def test_import_yoso_loads_no_backend_and_no_numpy():
    assert _loaded_after("import yoso") == []


def test_a_numpy_call_probes_only_backends_serving_numpy():
    """Automatic selection looks at the array type first: a NumPy call never imports torch, and imports
    jax only where the jax backend (the fast CPU path for NumPy) is installed and picked."""
    call = "import numpy as np, yoso\nx = np.ones((2, 8, 4))\nyoso.attention(x, x, x, seed=0)"
    loaded = _loaded_after(call)  # (backend classes load -- they are light -- but not their frameworks)
    assert "torch" not in loaded and "triton" not in loaded and "cuda" not in loaded, loaded
    explicit = _loaded_after(call, env={"YOSO_BACKEND": "reference"})
    assert "torch" not in explicit and "jax" not in explicit, explicit


def test_eager_torch_calls_do_not_load_dynamo_and_compiled_selection_is_one_graph():
    """torch.compile's machinery (torch._dynamo, ~3 s to import) is loaded by torch.compile, not by an eager
    yoso call; and the backend picked automatically while torch.compile traces is folded in as a constant (the
    discovery and probing are not traced: no graph break), with dynamo loaded after yoso's torch glue; a
    call with an int seed traces whole too."""
    pytest.importorskip("torch")
    code = (
        "import sys, torch, yoso\n"
        "planes = torch.as_tensor(yoso.hash_planes(4, 3, 8, seed=0), dtype=torch.float32)\n"
        "q = torch.randn(2, 16, 8)\n"
        "layer = lambda q: yoso.attention(q, q, q, planes=planes, num_hashes=4, hash_bits=3)\n"
        "eager = layer(q)\n"
        "assert 'torch._dynamo' not in sys.modules, 'an eager call loaded torch._dynamo'\n"
        "compiled = torch.compile(layer, backend='aot_eager', fullgraph=True)(q)\n"
        "torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)\n"
        # an int seed: NumPy draws the hash functions, inside an op (yoso::planes_for_seed) under torch.compile
        "seeded = lambda q: yoso.attention(q, q, q, seed=3, num_hashes=4, hash_bits=3)\n"
        "compiled = torch.compile(seeded, backend='aot_eager', fullgraph=True)(q)\n"
        "torch.testing.assert_close(compiled, seeded(q), rtol=1e-5, atol=1e-6)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-4000:]


def test_selection_never_probes_backends_that_cannot_serve_the_arrays():
    probed = []

    class TorchOnly(backends.Backend):
        name = "torch-only"
        priority = 10**6
        framework = "torch"
        frameworks = ("torch",)

        def availability(self):
            probed.append(self.name)
            return None

    backends.register(TorchOnly())
    try:
        yoso.attention(*_qkv(), seed=0)
        assert probed == [], "a NumPy call must not ask a torch-only backend whether it can run"
    finally:
        backends.unregister("torch-only")


def test_backend_for_names_the_backend_a_call_runs_on(mock):
    q, k, v = _qkv("float32")
    assert yoso.backend_for(q, k, v) == "mock"
    assert yoso.backend_for(*_qkv("float64")) != "mock"  # beyond the mock's dtypes
    with yoso.set_backend("reference"):
        assert yoso.backend_for(q, k, v) == "reference"
    with pytest.raises(TypeError, match="unexpected keyword"):
        yoso.backend_for(q, k, v, nonsense=1)


def test_a_known_backend_that_is_not_installed_names_its_package(monkeypatch):
    entries = {n: e for n, e in backends._discover().items() if n != "triton"}
    monkeypatch.setattr(backends, "_entries", entries)
    with pytest.raises(ValueError, match=r"unknown yoso backend 'triton'; it comes with the yoso-triton package"):
        yoso.set_backend("triton")


def test_a_bad_env_var_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("YOSO_BACKEND", "nope")
    for attempt in (yoso.get_backend, lambda: yoso.attention(*_qkv(), seed=0)):
        with pytest.raises(
            ValueError, match=r"unknown yoso backend 'nope' \(from the YOSO_BACKEND environment variable\)"
        ):
            attempt()


def test_info_lists_backends_and_reasons(capsys, monkeypatch):
    entries = dict(backends._discover())
    entries["broken"] = backends._Entry("broken", "test", entry_point=_BrokenEntryPoint())
    monkeypatch.setattr(backends, "_entries", entries)
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "reference" in text and "available" in text
    assert "broken" in text and "UNAVAILABLE" in text and "broken_module" in text
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {row["name"] for row in data["backends"]} >= {"reference", "broken"}
    assert data["cpu"] and "numpy" in data["packages"] and "yoso-parallel" in data["packages"]


def test_hash_planes_layouts():
    g = yoso.hash_planes(5, 3, 10, seed=1)
    assert g.shape == (5, 3, 10) and g.dtype == np.float64
    np.testing.assert_array_equal(g, yoso.hash_planes(5, 3, 10, seed=1))
    h = yoso.hash_planes(6, 3, 10, hashing="hadamard", seed=1)
    assert h.shape == (2, 3, 16) and set(np.unique(h)) == {-1.0, 1.0}  # D'=16: 5 hashes per rotation, 6 need 2
    with pytest.raises(ValueError, match="hash_bits <= 4"):
        yoso.hash_planes(4, 8, 3, hashing="hadamard")
    with pytest.raises(ValueError, match="num_hashes must be >= 1"):
        yoso.hash_planes(0, 3, 10)
    with pytest.raises(TypeError, match="seed"):
        yoso.hash_planes(4, 3, 10, seed=1.5)


class _SettingBackend(RecordingBackend):
    """A backend with a setting of its own, read in unsupported() as yoso-triton reads its table budget."""

    name = "setting"
    dtypes = ("float32", "float64")

    def unsupported(self, call):
        import os

        value = os.environ.get("YOSO_TEST_SETTING", "1")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"YOSO_TEST_SETTING must be a positive integer, got {value!r}")
        return super().unsupported(call)


def test_a_bad_backend_setting_is_named_not_dropped(monkeypatch):
    backends.register(_SettingBackend())
    try:
        for value in ("lots", "0", "-3"):
            monkeypatch.setenv("YOSO_TEST_SETTING", value)
            for choice in (None, "setting"):  # automatic selection must not skip it silently
                with yoso.set_backend(choice), pytest.raises(ValueError, match=rf"YOSO_TEST_SETTING.*{value!r}"):
                    yoso.attention(*_qkv(), seed=0)
            with pytest.raises(ValueError, match="YOSO_TEST_SETTING"):
                yoso.backend_for(*_qkv(), seed=0)
    finally:
        backends.unregister("setting")
