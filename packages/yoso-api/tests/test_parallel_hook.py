"""``group=`` / ``axis_name=``: the API's own rules, and the hand-off to the yoso-parallel engine found under
the ``yoso.parallel`` entry points (yoso/_parallel.py). The split computation itself is tested with that
package (packages/yoso-parallel/tests)."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest

import yoso
from yoso import _parallel


@pytest.fixture
def no_engines(monkeypatch):
    """A yoso without yoso-parallel: no entry points in the group, nothing loaded yet."""
    monkeypatch.setattr(_parallel, "_engines", {})
    real = importlib.metadata.entry_points

    def entry_points(**kwargs):
        return [] if kwargs.get("group") == _parallel.ENTRY_POINT_GROUP else real(**kwargs)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_group_needs_torch_tensors():
    x = np.ones((4, 8))
    with pytest.raises(TypeError, match="group= is a torch.distributed process group, for torch tensors"):
        yoso.attention(x, x, x, seed=0, group=object())


def test_axis_name_needs_jax_arrays():
    torch = pytest.importorskip("torch")
    x = torch.ones(4, 8)
    with pytest.raises(TypeError, match="axis_name= names a JAX mesh axis"):
        yoso.attention(x, x, x, seed=0, axis_name="sp")


def test_group_needs_agreeing_hash_functions():
    torch = pytest.importorskip("torch")
    x = torch.ones(4, 8)
    with pytest.raises(ValueError, match="seed=None draws hash functions per process"):
        yoso.attention(x, x, x, group=object())
    with pytest.raises(ValueError, match="generator= draws hash functions per process"):
        yoso.attention(x, x, x, generator=torch.Generator(), group=object())
    with pytest.raises(ValueError, match="not both"):
        yoso.attention(x, x, x, seed=0, group=object(), axis_name="sp")


def test_group_without_yoso_parallel_says_what_to_install(no_engines):
    torch = pytest.importorskip("torch")
    x = torch.ones(4, 8)
    with pytest.raises(ValueError, match=r"group=.*yoso-parallel") as info:
        yoso.attention(x, x, x, seed=0, group=object())
    assert "pip install yoso-parallel" in str(info.value)
    assert "pip install -e packages/yoso-parallel" in str(info.value)


def test_axis_name_without_yoso_parallel_says_what_to_install(no_engines):
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.ones((4, 8))
    with pytest.raises(ValueError, match=r"axis_name=.*pip install yoso-parallel"):
        yoso.attention(x, x, x, seed=0, axis_name="sp")


def test_a_broken_engine_says_why(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(_parallel, "_engines", {})
    broken = importlib.metadata.EntryPoint(name="torch", value="yoso_no_such_module", group=_parallel.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kwargs: [broken])
    x = torch.ones(4, 8)
    with pytest.raises(ValueError, match="yoso_no_such_module failed to load .ModuleNotFoundError"):
        yoso.attention(x, x, x, seed=0, group=object())


class _Engine:
    """An engine that records what the API hands it."""

    def __init__(self):
        self.checked, self.ran = [], []

    def check(self, arg, *, planes, key, lengths):
        self.checked.append((arg, lengths))
        return ("spec", arg)

    def attention(self, backend, prep):
        import torch

        self.ran.append((backend.name, prep.parallel, prep.lead, prep.q.shape))
        return torch.full(prep.lead + (prep.call.n_query, prep.call.value_dim), 2.0)


def test_the_engine_gets_the_checked_call(monkeypatch):
    torch = pytest.importorskip("torch")
    engine = _Engine()
    monkeypatch.setattr(_parallel, "_engines", {"torch": engine})
    group = object()
    q = torch.ones(2, 3, 5, 8)
    with yoso.set_backend("reference"):
        out = yoso.attention(q, q[:, :, :4], q[:, :, :4, :6], seed=0, group=group)
    assert engine.checked == [(group, (5, 4))]
    assert engine.ran == [("reference", ("spec", group), (2, 3), (6, 5, 8))]
    assert out.shape == (2, 3, 5, 6) and bool((out == 2.0).all())


def test_glue_helpers_are_there():
    """What yoso-parallel uses of the glue (yoso._parallel.glue_helpers) exists under these names."""
    pytest.importorskip("torch")
    assert callable(_parallel.glue_helpers("torch").unit)
    pytest.importorskip("jax")
    assert callable(_parallel.glue_helpers("jax").resolve_all)
