"""How far YOSO is from its expectation, and its expectation from softmax (the paper's Fig. 8).

For each N and m: the mean angle (degrees) between corresponding output rows of N-YOSO-m and
N-YOSO-E, and between N-YOSO-E and softmax attention ``softmax(tau * q̂·k̂) V`` (as ``yoso demo``
defines it). Angles are averaged over every row of several independent samples, each a single
head of N tokens. Two kinds of input:

* ``clustered`` -- queries and keys around 16 shared cluster centres (``yoso_bench.demo.clustered_sample``):
  attention is peaked, as in trained models;
* ``gaussian`` -- i.i.d. Gaussian q, k, v: nearly flat attention, for contrast (with small m some
  queries collide with no key at all: see :func:`measure`).

Everything runs in float32 on the backend's own framework and device.
"""

from __future__ import annotations

import numpy as np

import yoso
from yoso.testing import to_framework, to_numpy

from .demo import clustered_sample, mean_angle_degrees, softmax_attention

DATA = {
    "clustered": "unit q, k around 16 shared cluster centres (spread 0.6; yoso_bench.demo.clustered_sample), "
    "Gaussian v: peaked attention",
    "gaussian": "i.i.d. standard Gaussian q, k, v: nearly flat attention",
}


def sample(kind: str, n: int, dim: int, samples: int, seed: int):
    """``q, k, v`` of shape ``[samples, n, dim]`` (float64 NumPy)."""
    if kind == "clustered":
        parts = [clustered_sample(n, dim, seed=seed + s) for s in range(samples)]
        return tuple(np.stack([p[i] for p in parts]) for i in range(3))
    if kind == "gaussian":
        rng = np.random.default_rng(seed)
        return tuple(rng.standard_normal((samples, n, dim)) for _ in range(3))
    raise ValueError(f"unknown fidelity data {kind!r}")


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def measure(*, framework: str, device: str, n: int, dim: int, tau: int, hashes, samples: int, seed: int, kind: str):
    """Angles at one N: ``({m: (degrees, share of zero rows)}, softmax_vs_e_degrees)``.

    A query that collides with no key in any of its m hashes gets a zero N-YOSO-m row; it counts as
    90 degrees (``yoso_bench.demo.mean_angle_degrees``) and its share is reported beside the angle.
    """
    q, k, v = sample(kind, n, dim, samples, seed)
    qf, kf, vf = (to_framework(x.astype(np.float32), framework, device) for x in (q, k, v))
    expected = to_numpy(yoso.attention(qf, kf, vf, mode="expectation", hash_bits=tau))
    soft = np.stack([softmax_attention(_unit(q[s]), _unit(k[s]), v[s], tau) for s in range(samples)])
    sampled = {}
    for m in hashes:
        out = to_numpy(yoso.attention(qf, kf, vf, num_hashes=m, hash_bits=tau, seed=seed + m))
        zero_rows = float(np.mean(~np.any(out != 0, axis=-1)))
        sampled[m] = (mean_angle_degrees(out, expected), zero_rows)
    return sampled, mean_angle_degrees(soft, expected)
