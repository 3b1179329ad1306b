"""Hash functions as explicit arrays: their layouts and how they are drawn.

``hashing="gaussian"``: ``planes[s, b]`` is hyperplane ``b`` of hash ``s``, shape ``(m, tau, D)``;
bit ``b`` of hash ``s`` of a vector ``x`` is ``planes[s, b] · x > 0`` and the code is
``sum_b 2**b * bit_b``.

``hashing="hadamard"``: the fast structured rotation ``u = H D3 H D2 H D1 x`` (``H`` the Hadamard
transform of size ``D'``, the next power of two >= D, on the zero-padded ``x``; ``D1..D3`` random
±1 diagonals). ``planes`` holds the diagonals, shape ``(R, 3, D')`` with entries ±1; one rotation
yields ``D' // tau`` hashes (so ``tau <= D'``), hash ``s`` taking the ``tau`` consecutive signs of
rotation ``s // (D' // tau)`` from coordinate ``(s % (D' // tau)) * tau``; ``R = ceil(m / (D' // tau))``.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy loads with the first call, not with `import yoso`
    import numpy as np

MAX_HASH_BITS = 16  # 2^16 buckets per hash table; larger tables do not fit fast memory anywhere
# The variance of YOSO-m falls as 1/m: beyond a few hundred hashes the sampling error is below float32
# rounding of the output anyway. The bound keeps absurd counts (2**31, 10**30) from failing deep inside
# an allocator or an integer conversion: they are refused here, naming the argument.
MAX_NUM_HASHES = 1 << 16


def padded_dim(dim: int) -> int:
    """``D'``: the next power of two >= ``dim``."""
    return 1 << max(0, int(dim) - 1).bit_length()


def planes_shape(num_hashes: int, hash_bits: int, dim: int, hashing: str) -> tuple[int, ...]:
    """The shape of one set of hash functions (without leading per-head dims)."""
    if hashing == "gaussian":
        return (num_hashes, hash_bits, dim)
    d_pad = padded_dim(dim)
    if hash_bits > d_pad:
        raise ValueError(
            f"hashing='hadamard' needs hash_bits <= {d_pad} (the Hadamard size for D={dim}), got hash_bits={hash_bits}"
        )
    per_rotation = d_pad // hash_bits
    return (-(-num_hashes // per_rotation), 3, d_pad)


def check_hash_args(num_hashes, hash_bits, hashing) -> None:
    """Validate the hyperparameters that shape the hash functions."""
    for name, value in (("num_hashes", num_hashes), ("hash_bits", hash_bits)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if num_hashes < 1:
        raise ValueError(f"num_hashes must be >= 1, got {num_hashes}")
    if num_hashes > MAX_NUM_HASHES:
        raise ValueError(
            f"num_hashes must be <= {MAX_NUM_HASHES} (the variance of YOSO-m falls as 1/num_hashes; far fewer "
            f"already sample below float32 rounding), got {num_hashes}"
        )
    if not 1 <= hash_bits <= MAX_HASH_BITS:
        raise ValueError(
            f"hash_bits must be in [1, {MAX_HASH_BITS}] (tables hold 2**hash_bits buckets per hash), got {hash_bits}"
        )
    if hashing not in ("gaussian", "hadamard"):
        raise ValueError(f"hashing must be 'gaussian' or 'hadamard', got {hashing!r}")


def check_seed(seed) -> None:
    """Refuse what :func:`rng_from_seed` cannot use, without drawing anything (YOSO-E draws nothing but
    refuses a bad seed all the same)."""
    import numpy as np

    if isinstance(seed, np.random.Generator):
        return
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
        raise TypeError(f"seed must be None, a non-negative int or a numpy.random.Generator, got {seed!r}")


def rng_from_seed(seed) -> np.random.Generator:
    """``None`` (fresh entropy), a non-negative int, or a ``numpy.random.Generator`` (used as is)."""
    import numpy as np

    check_seed(seed)
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def hash_planes(num_hashes: int, hash_bits: int, dim: int, *, hashing: str = "gaussian", seed=None) -> np.ndarray:
    """Draw hash functions as a float64 NumPy array (layouts in this module's docstring).

    ``seed``: None draws fresh ones, an int reproduces them, a ``numpy.random.Generator`` is used as is.
    The same array passed as ``planes=`` makes every backend compute the same hash codes.
    """
    check_hash_args(num_hashes, hash_bits, hashing)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    return draw(planes_shape(int(num_hashes), int(hash_bits), int(dim), hashing), hashing, rng_from_seed(seed))


def draw(shape: tuple[int, ...], hashing: str, rng: np.random.Generator) -> np.ndarray:
    """Gaussian hyperplanes or ±1 diagonals of ``shape``, float64."""
    import numpy as np

    if hashing == "gaussian":
        return rng.standard_normal(shape)
    return rng.integers(0, 2, size=shape).astype(np.float64) * 2 - 1


KEPT_PLANES_ELEMENTS = 1 << 20  # hash functions kept per seed up to this size (8 MiB of float64 each)


def draw_for_seed(shape: tuple[int, ...], hashing: str, seed) -> np.ndarray:
    """:func:`draw` from ``seed`` (None, an int or a Generator). An int seed's hash functions -- the same for
    every framework, device and backend -- are drawn once per (shape, hashing, seed) and kept, read-only:
    a training loop passing ``seed=0`` would otherwise draw the same ones at every step. (Not beyond
    ``KEPT_PLANES_ELEMENTS``: 64 kept sets of huge hash functions would hold gigabytes.)"""
    small = math.prod(shape) <= KEPT_PLANES_ELEMENTS
    if small and isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return _drawn_once(tuple(shape), hashing, int(seed))
    return draw(shape, hashing, rng_from_seed(seed))


@functools.lru_cache(maxsize=64)
def _drawn_once(shape: tuple[int, ...], hashing: str, seed: int) -> np.ndarray:
    planes = draw(shape, hashing, rng_from_seed(seed))
    planes.flags.writeable = False
    return planes
