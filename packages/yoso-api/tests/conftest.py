"""Fixtures of the API's own tests: what does not depend on a backend runs once, from each caller framework.

``caller`` is one framework's arrays (NumPy, torch, JAX; the ones not installed are skipped) with automatic
backend selection: argument checks happen before any backend is chosen, so they are the API's to test.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pytest

from yoso.testing import to_framework, to_numpy

FRAMEWORKS = ("numpy", "torch", "jax")


@dataclass(frozen=True)
class Caller:
    framework: str
    dtype: str = "float32"
    name: str | None = None  # the backend chosen for calls: None is automatic selection

    def array(self, x: np.ndarray, dtype: str | None = None):
        """NumPy ``x`` as this framework's array; floats in ``dtype`` (default float32), bools and ints as they are."""
        if x.dtype == bool or np.issubdtype(x.dtype, np.integer):
            return to_framework(x, self.framework)
        return to_framework(np.asarray(x, np.float64), self.framework, dtype=dtype or self.dtype)

    def attention(self, q, k, v, **kwargs) -> np.ndarray:
        import yoso

        converted = {n: self.array(x) if isinstance(x, np.ndarray) and n != "planes" else x for n, x in kwargs.items()}
        with yoso.set_backend(self.name):
            return to_numpy(yoso.attention(self.array(q), self.array(k), self.array(v), **converted))


@pytest.fixture(params=FRAMEWORKS)
def caller(request) -> Caller:
    pytest.importorskip(request.param)
    return Caller(request.param)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded by the test's name: reproducible, and independent across tests."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
