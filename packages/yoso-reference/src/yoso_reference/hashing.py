"""Hash codes: SimHash with Gaussian hyperplanes, and the fast structured (Hadamard) rotation.

Conventions shared by every backend (docs/math.md#hash-functions):

* ``x`` is ``[B, N, D]`` (already unit-normalised by the caller; scale never changes a sign).
* Gaussian planes are ``[P, m, tau, D]`` with ``P`` either 1 (shared) or ``B`` (one set per batch row).
  Bit ``b`` of hash ``s`` is ``planes[s, b] · x > 0`` -- strict, so a zero projection gives bit 0 --
  and the code is ``sum_b 2**b * bit_b``.
* Hadamard planes are ``[P, R, 3, D']``: ``R`` rotations, each three random ±1 diagonals, with
  ``D'`` the next power of two ``>= D``. Rotation ``r`` maps the zero-padded ``x`` to
  ``u = H·d3 ⊙ (H·d2 ⊙ (H·d1 ⊙ x))`` (``H`` the unnormalised Sylvester–Hadamard matrix);
  one rotation gives ``D' // tau`` hashes, hash ``s`` taking the ``tau`` consecutive signs of
  rotation ``s // (D' // tau)`` starting at coordinate ``(s % (D' // tau)) * tau``.

Codes are returned as ``int32`` arrays of shape ``[B, m, N]`` (every backend's codes are int32; ``tau <= 16``).
"""

from __future__ import annotations

import numpy as np


def padded_dim(dim: int) -> int:
    """The Hadamard transform size: the next power of two >= ``dim``."""
    return 1 << max(0, int(dim) - 1).bit_length()


def hashes_per_rotation(dim: int, hash_bits: int) -> int:
    """How many ``hash_bits``-bit hashes one structured rotation of a ``dim``-vector yields."""
    return padded_dim(dim) // hash_bits


def num_rotations(num_hashes: int, hash_bits: int, dim: int) -> int:
    """Rotations needed for ``num_hashes`` hashes (0 when ``hash_bits`` exceeds the padded dim)."""
    per = hashes_per_rotation(dim, hash_bits)
    return -(-num_hashes // per) if per else 0


def sylvester_hadamard(n: int) -> np.ndarray:
    """The unnormalised ``n x n`` Hadamard matrix (``n`` a power of two), entries ±1."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _bits_to_codes(projections: np.ndarray, num_hashes: int, hash_bits: int) -> np.ndarray:
    """``[B, N, m*tau]`` projections -> ``[B, m, N]`` codes (strictly positive -> bit 1)."""
    b, n, _ = projections.shape
    bits = (projections > 0).reshape(b, n, num_hashes, hash_bits).astype(np.int32)
    codes = (bits << np.arange(hash_bits, dtype=np.int32)).sum(axis=-1, dtype=np.int32)
    return np.ascontiguousarray(codes.transpose(0, 2, 1))


def gaussian_codes(x: np.ndarray, planes: np.ndarray) -> np.ndarray:
    """SimHash codes of ``x [B, N, D]`` under ``planes [P, m, tau, D]`` -> ``[B, m, N]``."""
    p, m, tau, d = planes.shape
    flat = planes.reshape(p, m * tau, d).astype(x.dtype)
    projections = x @ flat.transpose(0, 2, 1)  # [B, N, m*tau]; P broadcasts against B
    return _bits_to_codes(projections, m, tau)


def hadamard_rotate(x: np.ndarray, diagonals: np.ndarray) -> np.ndarray:
    """Structured rotations of ``x [B, N, D]`` by ``diagonals [P, R, 3, D']`` -> ``[B, N, R, D']``."""
    p, r, _, d_pad = diagonals.shape
    b, n, d = x.shape
    h = sylvester_hadamard(d_pad).astype(x.dtype)
    u = np.zeros((b, n, 1, d_pad), dtype=x.dtype)
    u[..., :d] = x[:, :, None, :]
    diag = diagonals.astype(x.dtype)[:, None]  # [P, 1, R, 3, D'] broadcasts over N
    for step in range(3):
        u = (u * diag[..., step, :]) @ h
    return u


def hadamard_codes(x: np.ndarray, diagonals: np.ndarray, num_hashes: int, hash_bits: int) -> np.ndarray:
    """Fast-hash codes of ``x [B, N, D]`` -> ``[B, m, N]`` (see the module docstring for the layout)."""
    u = hadamard_rotate(x, diagonals)  # [B, N, R, D']
    b, n, r, d_pad = u.shape
    per = d_pad // hash_bits
    # Keep the first `per * tau` coordinates of each rotation, then the first m hashes overall.
    used = u[..., : per * hash_bits].reshape(b, n, r * per * hash_bits)
    return _bits_to_codes(used[..., : num_hashes * hash_bits], num_hashes, hash_bits)


def hash_codes(x: np.ndarray, planes: np.ndarray, *, hashing: str, num_hashes: int, hash_bits: int) -> np.ndarray:
    """Dispatch on the hashing scheme; see :func:`gaussian_codes` and :func:`hadamard_codes`."""
    if hashing == "gaussian":
        return gaussian_codes(x, planes)
    if hashing == "hadamard":
        return hadamard_codes(x, planes, num_hashes, hash_bits)
    raise ValueError(f"hashing must be 'gaussian' or 'hadamard', got {hashing!r}")
