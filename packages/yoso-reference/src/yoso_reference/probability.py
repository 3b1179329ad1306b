"""Collision probability ``p(x) = (1 - arccos(x)/pi)^tau`` and the pieces of its derivative.

``x`` is the cosine between a unit query and a unit key. The true derivative

    p'(x) = tau (1 - theta/pi)^(tau-1) / (pi sqrt(1 - x^2))

diverges as ``x -> 1`` (paper eq. 3). Everything that uses it goes through the importance ratio
``w = p'/p = tau / (sin(theta) (pi - theta))``, clamped at ``max_ratio``, so ``p' = p * min(w, max_ratio)``
is finite everywhere (at ``x = -1`` it is 0, since ``p`` is). The lower-bound surrogate of paper eq. 4
replaces ``w`` by ``tau / 2`` (``min_theta 1/(sin(theta)(pi - theta)) ~ 0.55 >= 1/2``).
"""

from __future__ import annotations

import numpy as np


def collision_probability(x: np.ndarray, hash_bits: int) -> np.ndarray:
    """``(1 - arccos(x)/pi)^tau`` with ``x`` clipped to [-1, 1]."""
    theta = np.arccos(np.clip(x, -1.0, 1.0))
    return (1.0 - theta / np.pi) ** hash_bits


def importance_ratio(x: np.ndarray, hash_bits: int, max_ratio: float) -> np.ndarray:
    """``min(p'(x)/p(x), max_ratio)`` = ``min(tau / (sin(theta)(pi - theta)), max_ratio)``."""
    theta = np.arccos(np.clip(x, -1.0, 1.0))
    denominator = np.sin(theta) * (np.pi - theta)
    # Flooring the denominator at tau/max_ratio is the clamp, and it also avoids dividing by 0.
    return hash_bits / np.maximum(denominator, hash_bits / max_ratio)


def collision_derivative(x: np.ndarray, hash_bits: int, max_ratio: float) -> np.ndarray:
    """The clamped true derivative ``p(x) * min(w(x), max_ratio)``."""
    return collision_probability(x, hash_bits) * importance_ratio(x, hash_bits, max_ratio)


def lower_bound_derivative(x: np.ndarray, hash_bits: int) -> np.ndarray:
    """The paper's eq. 4 surrogate ``(tau/2) p(x)``, a lower bound of ``p'(x)``."""
    return 0.5 * hash_bits * collision_probability(x, hash_bits)


def triple_collision_probability(x_ab: np.ndarray, x_ac: np.ndarray, x_bc: np.ndarray, hash_bits: int) -> np.ndarray:
    """P[h(a) = h(b) = h(c)] for Gaussian SimHash with ``tau`` bits.

    One random hyperplane leaves three unit vectors on one side with probability
    ``1 - (theta_ab + theta_ac + theta_bc) / (2 pi)``; bits are independent. This gives the exact
    covariance of two collision indicators, hence the exact variance of YOSO-m.
    """
    thetas = sum(np.arccos(np.clip(x, -1.0, 1.0)) for x in (x_ab, x_ac, x_bc))
    return np.clip(1.0 - thetas / (2.0 * np.pi), 0.0, 1.0) ** hash_bits
