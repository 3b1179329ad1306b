"""Shared machinery of the conformance suite: targets, framework adapters, data and tolerances.

A *target* is one backend seen through one caller framework (``reference`` through NumPy, through
torch, ...). API-level tests take a target; kernel-level tests call a backend's primitives directly on
its own framework's arrays. The oracle is always ``yoso_reference`` in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import yoso_reference as ref
from yoso.testing import max_ratio, to_framework, to_numpy

# Relative error allowed against the float64 oracle, by the dtype the backend computed in.
# docs/testing.md#tolerances: float32 well under 1e-4.
REL_TOL = {"float64": 1e-10, "float32": 2e-5}


def most_precise_dtype(backend) -> str:
    return "float64" if "float64" in backend.dtypes else "float32"


def convert(x: np.ndarray, framework: str, device: str, dtype: str, int_dtype=None):
    """NumPy ``x`` as a ``framework`` array on ``device``: floats in ``dtype``, bools as they are,
    integers as they are or in ``int_dtype``."""
    if x.dtype == bool:
        return to_framework(x, framework, device)
    if np.issubdtype(x.dtype, np.integer):
        return to_framework(x if int_dtype is None else x.astype(int_dtype), framework, device)
    return to_framework(np.asarray(x, dtype=np.float64), framework, device, dtype)


class _OnBackend:
    """What Target and Kernel share: the backend's name and the dtype exactness tests use."""

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def dtype(self) -> str:
        """The most precise dtype the backend computes in, unless --dtype / YOSO_TEST_DTYPE asks for one."""
        return self.requested_dtype or most_precise_dtype(self.backend)


@dataclass(frozen=True)
class Target(_OnBackend):
    backend: object  # a yoso.backends.Backend
    framework: str  # the caller's array type
    device: str
    requested_dtype: str | None = None  # conftest's --dtype / YOSO_TEST_DTYPE; None: the most precise

    def array(self, x: np.ndarray, dtype: str | None = None):
        """``x`` in this target's caller framework, on its device, in ``dtype`` (default: self.dtype);
        bool and integer arrays keep their dtype (bad-input tests pass integer arrays on purpose)."""
        return convert(x, self.framework, self.device, dtype or self.dtype)

    def attention(self, q, k, v, **kwargs) -> np.ndarray:
        """``yoso.attention`` on NumPy inputs converted to this target; the result as float64 NumPy."""
        import yoso

        converted = {
            name: (self.array(val) if isinstance(val, np.ndarray) and name != "planes" else val)
            for name, val in kwargs.items()
        }
        with yoso.set_backend(self.name):
            return to_numpy(yoso.attention(self.array(q), self.array(k), self.array(v), **converted))

    def hash_codes(self, x, **kwargs) -> np.ndarray:
        """``yoso.hash_codes`` of NumPy rows converted to this target; the codes as int64 NumPy."""
        import yoso

        with yoso.set_backend(self.name):
            codes = yoso.hash_codes(self.array(x), **kwargs)
        assert str(codes.dtype).endswith("int32"), f"hash codes must be int32, got {codes.dtype}"
        return to_numpy(codes).astype(np.int64)

    def attention_and_grads(self, q, k, v, cotangent, **kwargs):
        """``(out, (dq, dk, dv))`` through the framework's own autograd (NumPy: ``attention_vjp``)."""
        import yoso

        masks = {n: self.array(val) for n, val in kwargs.items() if n.endswith("mask") and val is not None}
        kwargs = {**kwargs, **masks}
        with yoso.set_backend(self.name):
            if self.framework == "numpy":
                out, vjp = yoso.attention_vjp(self.array(q), self.array(k), self.array(v), **kwargs)
                return to_numpy(out), tuple(to_numpy(g) for g in vjp(cotangent.astype(self.dtype)))
            if self.framework == "torch":
                import torch

                inputs = [self.array(x).requires_grad_(True) for x in (q, k, v)]
                out = yoso.attention(*inputs, **kwargs)
                out.backward(torch.as_tensor(cotangent, device=out.device, dtype=out.dtype))
                return to_numpy(out), tuple(to_numpy(x.grad) for x in inputs)
            if self.framework == "jax":
                import jax

                inputs = [self.array(x) for x in (q, k, v)]
                out, vjp = jax.vjp(lambda *qkv: yoso.attention(*qkv, **kwargs), *inputs)
                grads = vjp(self.array(cotangent, str(out.dtype)))
                return to_numpy(out), tuple(to_numpy(g) for g in grads)
        raise NotImplementedError(f"no autograd adapter for {self.framework}")


@dataclass(frozen=True)
class Kernel(_OnBackend):
    """A backend's primitives on its own framework's arrays."""

    backend: object
    requested_dtype: str | None = None

    def array(self, x: np.ndarray, dtype: str | None = None):
        """``x`` on the backend's framework and default device; integers (hash codes) as int32."""
        if x is None:
            return None
        return convert(x, self.backend.framework, self.backend.default_device(), dtype or self.dtype, np.int32)


# ---- numbers ------------------------------------------------------------------------------------


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """``||actual - expected|| / ||expected||`` (absolute when expected is all zero)."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    scale = np.linalg.norm(expected)
    return float(np.linalg.norm(actual - expected) / (scale if scale > 0 else 1.0))


def assert_close(actual, expected, dtype: str, what: str = "", factor: float = 1.0) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != expected {expected.shape}"
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= factor * REL_TOL[dtype], f"{what}: relative error {err:.3g} > {factor * REL_TOL[dtype]:.1g} ({dtype})"


# ---- data ---------------------------------------------------------------------------------------


def unit(x: np.ndarray) -> np.ndarray:
    return ref.unit_rows(x)


def projections(x: np.ndarray, planes: np.ndarray, hashing: str, hash_bits: int | None = None) -> np.ndarray:
    """The normalised projections whose signs are the hash bits, ``[B, N, m*tau]`` in float64.

    Gaussian: cosines between the unit row and each plane. Hadamard: the rotated coordinates each hash
    reads (``hash_bits`` tells which), divided by their largest possible magnitude. Values near 0 are
    sign ties that rounding may flip.
    """
    x = unit(np.asarray(x, dtype=np.float64))
    if hashing == "gaussian":
        p = planes.reshape(planes.shape[0], -1, planes.shape[-1])
        p = p / np.linalg.norm(p, axis=-1, keepdims=True)
        return x @ p.transpose(0, 2, 1)
    u = ref.hadamard_rotate(x, planes) / planes.shape[-1] ** 1.5
    per = planes.shape[-1] // hash_bits
    return u[..., : per * hash_bits].reshape(u.shape[0], u.shape[1], -1)


def untied(
    rng: np.random.Generator,
    shape,
    planes: np.ndarray,
    hashing: str,
    hash_bits: int | None = None,
    margin: float = 1e-4,
) -> np.ndarray:
    """Gaussian rows ``[B, N, D]`` redrawn until no hash projection lies within ``margin`` of a tie.

    Backends may round differently from the float64 oracle; away from ties every precision gives the
    same codes, so tests can demand exact agreement.
    """
    x = rng.standard_normal(shape)
    for _ in range(200):
        near = (np.abs(projections(x, planes, hashing, hash_bits)) < margin).any(axis=-1)
        if not near.any():
            return x
        x[near] = rng.standard_normal((int(near.sum()), shape[-1]))
    raise AssertionError("could not draw tie-free rows; lower the margin")


def planes(rng: np.random.Generator, num_hashes: int, hash_bits: int, dim: int, hashing: str = "gaussian", lead=()):
    """Hash functions with leading dims, as ``yoso.hash_planes`` lays them out.

    Small Hadamard rotations can have coordinates that vanish for every input (e.g. ``H D H`` with
    ``D = ±I``): always a tie. Such diagonals are redrawn, so that tie-free inputs exist.
    """
    import yoso

    def one():
        for _ in range(100):
            p = yoso.hash_planes(num_hashes, hash_bits, dim, hashing=hashing, seed=rng)
            probes = rng.standard_normal((1, 16, dim))
            if (
                hashing == "gaussian"
                or np.abs(projections(probes, p[None], hashing, hash_bits)).max(axis=1).min() > 1e-3
            ):
                return p
        raise AssertionError("could not draw Hadamard diagonals without structural zeros")

    if not lead:
        return one()
    return np.stack([one() for _ in range(int(np.prod(lead)))]).reshape(tuple(lead) + one().shape)


def random_mask(rng: np.random.Generator, shape, keep: float = 0.7) -> np.ndarray:
    """A bool mask with about ``keep`` True, and at least one True per row."""
    mask = rng.random(shape) < keep
    mask[..., 0] = True
    return mask


def clamp(hash_bits: int) -> float:
    return max_ratio(hash_bits)
