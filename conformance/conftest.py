"""Selects the backends the conformance suite runs against.

    pytest conformance --backend reference --backend triton
    YOSO_TEST_BACKENDS=reference,triton pytest conformance
    pytest conformance --dtype float32   # or YOSO_TEST_DTYPE=float32: float32 even where float64 exists
    YOSO_TEST_FRAMEWORKS=jax pytest conformance --backend pallas   # only these caller frameworks

Backends that cannot run here are skipped with their reason, unless ``--require-backend`` (or
``YOSO_TEST_REQUIRE=1``) is given: CI sets it, so a backend that fails to load is a failure, not a
quietly skipped suite.

Fixtures:
  target -- one backend through one caller framework (numpy, torch, ...): API-level tests
  torch_target -- the same, for torch-only tests (autograd.Function, compile, checkpointing)
  kernel -- one backend's primitives on its own arrays: kernel-level tests
"""

from __future__ import annotations

import os

import pytest

from harness import Kernel, Target


def pytest_addoption(parser):
    parser.addoption("--backend", action="append", default=None, help="backend to test (repeatable)")
    parser.addoption("--require-backend", action="store_true", help="fail instead of skipping unavailable backends")
    parser.addoption(
        "--dtype",
        default=None,
        choices=("float32", "float64"),
        help="dtype of the exactness tests (default: the most precise the backend has; also YOSO_TEST_DTYPE)",
    )


def _selected(config) -> list[str]:
    names = config.getoption("--backend") or os.environ.get("YOSO_TEST_BACKENDS", "reference").split(",")
    return [n.strip() for n in names if n.strip()]


def _frameworks(backend) -> tuple[str, ...]:
    """The caller frameworks to test a backend through: all it serves, or those in YOSO_TEST_FRAMEWORKS."""
    wanted = [f.strip() for f in os.environ.get("YOSO_TEST_FRAMEWORKS", "").split(",") if f.strip()]
    return tuple(f for f in backend.frameworks if not wanted or f in wanted)


def _required(config) -> bool:
    return config.getoption("--require-backend") or os.environ.get("YOSO_TEST_REQUIRE") == "1"


def _requested_dtype(request, backend) -> str | None:
    dtype = request.config.getoption("--dtype") or os.environ.get("YOSO_TEST_DTYPE") or None
    if dtype is not None and dtype not in backend.dtypes:
        _skip_or_fail(request, backend.name, f"dtype {dtype} was requested; it supports {', '.join(backend.dtypes)}")
    return dtype


def _load(name: str):
    """The backend object, or the reason it cannot run."""
    from yoso import backends

    try:
        return backends.get(name), None
    except ValueError as exc:
        return None, str(exc)


def pytest_generate_tests(metafunc):
    for fixture, only in (("target", None), ("torch_target", "torch")):
        if fixture not in metafunc.fixturenames:
            continue
        params, ids = [], []
        for name in _selected(metafunc.config):
            backend, reason = _load(name)
            frameworks = _frameworks(backend) if backend is not None else (only or "?",)
            for framework in frameworks:
                if only in (None, framework):
                    params.append((name, framework))
                    ids.append(f"{name}-{framework}")
        metafunc.parametrize(fixture, params, ids=ids, indirect=True)
    if "kernel" in metafunc.fixturenames:
        names = _selected(metafunc.config)
        metafunc.parametrize("kernel", names, ids=names, indirect=True)


def _skip_or_fail(request, name: str, reason: str):
    if _required(request.config):
        pytest.fail(f"backend {name!r} is required but cannot run: {reason}")
    pytest.skip(f"backend {name!r} unavailable: {reason}")


@pytest.fixture
def target(request) -> Target:
    return _target(request)


@pytest.fixture
def torch_target(request) -> Target:
    """Like ``target``, restricted to the backends that serve torch tensors."""
    return _target(request)


def _target(request) -> Target:
    name, framework = request.param
    backend, reason = _load(name)
    if backend is None:
        _skip_or_fail(request, name, reason)
    try:
        __import__(framework)
    except ImportError as exc:
        pytest.skip(f"{framework} is not installed ({exc})")
    device = backend.default_device() if framework == backend.framework else "cpu"
    return Target(backend, framework, device, _requested_dtype(request, backend))


@pytest.fixture
def kernel(request) -> Kernel:
    backend, reason = _load(request.param)
    if backend is None:
        _skip_or_fail(request, request.param, reason)
    return Kernel(backend, _requested_dtype(request, backend))


@pytest.fixture
def rng(request) -> np.random.Generator:  # noqa: F821
    """A generator seeded by the test's name: reproducible, and independent across tests."""
    import zlib

    import numpy as np

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
