"""Kernel tests of yoso_triton: they run on a GPU, or on the CPU under TRITON_INTERPRET=1.

Where neither is possible the tests are skipped with the reason -- unless YOSO_TEST_REQUIRE=1 (set by
nox in CI), which turns that into a failure, as for the conformance suite.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest


@pytest.fixture(scope="session")
def backend():
    from yoso_triton.backend import TritonBackend

    b = TritonBackend()
    reason = b.availability()
    if reason:
        if os.environ.get("YOSO_TEST_REQUIRE") == "1":
            pytest.fail(f"the triton backend is required but cannot run: {reason}")
        pytest.skip(reason)
    return b


@pytest.fixture(scope="session")
def device(backend) -> str:
    return backend.default_device()


@pytest.fixture
def rng(request) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def gpu_blocks(monkeypatch):
    """Launch with the GPU's block sizes even in the interpreter (small chunks, one bucket per program)."""
    from yoso_triton import launch

    monkeypatch.setattr(launch, "INTERPRETER_BLOCKS", False)
