"""Hash codes: exact agreement with the oracle away from sign ties, and the right collision statistics."""

from __future__ import annotations

import numpy as np
import pytest

import yoso
import yoso_reference as ref
from harness import planes as draw_planes
from harness import projections, to_numpy, unit, untied

# For one rotation the Hadamard fast hash is not SimHash: its collision frequency only approximates
# (1 - theta/pi)^tau. Measured deviations for D' >= 16 stay below 0.03 (absolute, on p in [0, 1]);
# the suite allows 0.05 on top of the sampling error.
HADAMARD_COLLISION_TOLERANCE = 0.05


@pytest.mark.parametrize("hashing", ["gaussian", "hadamard"])
@pytest.mark.parametrize(
    "batch, n, dim, num_hashes, hash_bits, per_head",
    [(1, 1, 4, 1, 1, False), (2, 7, 33, 5, 3, False), (3, 63, 64, 8, 8, True), (1, 129, 60, 3, 16, False)],
)
def test_codes_match_reference(kernel, rng, hashing, batch, n, dim, num_hashes, hash_bits, per_head):
    if hashing == "hadamard" and hash_bits > ref.padded_dim(dim):
        pytest.skip("hash_bits exceeds the Hadamard size")
    lead = (batch,) if per_head else ()
    p = draw_planes(rng, num_hashes, hash_bits, dim, hashing, lead=lead)
    p = p if per_head else p[None]
    x = unit(rng.standard_normal((batch, n, dim)))
    x_native = kernel.array(x)
    codes = to_numpy(
        kernel.backend.hash_codes(
            x_native, kernel.array(p), hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits
        )
    ).astype(np.int64)
    assert codes.shape == (batch, num_hashes, n)
    # The oracle hashes exactly what the backend received (after its dtype rounding), in float64.
    expected = ref.hash_codes(to_numpy(x_native), p, hashing=hashing, num_hashes=num_hashes, hash_bits=hash_bits)
    # Codes may differ only where some bit of that hash is a near-tie that rounding can flip.
    proj = projections(to_numpy(x_native), p, hashing, hash_bits)[..., : num_hashes * hash_bits]
    tie = (np.abs(proj) < 1e-5).reshape(batch, n, num_hashes, hash_bits).any(-1).transpose(0, 2, 1)
    mismatched = (codes != expected) & ~tie
    assert not mismatched.any(), f"{int(mismatched.sum())} codes differ away from ties"
    assert codes.min() >= 0 and codes.max() < 2**hash_bits


@pytest.mark.parametrize("hashing", ["gaussian", "hadamard"])
@pytest.mark.parametrize("lead, per_head", [((), False), ((2, 3), False), ((2, 3), True)], ids=["2d", "4d", "per-head"])
def test_public_hash_codes_match_reference(target, rng, hashing, lead, per_head):
    """``yoso.hash_codes`` on every backend and framework: the oracle's codes of the unit rows, ``[..., N, m]``,
    away from sign ties; per-head planes broadcast like ``yoso.attention``'s."""
    n, dim, m, tau = 9, 12, 5, 3
    p = draw_planes(rng, m, tau, dim, hashing, lead=(1, 3) if per_head else ())
    flat_planes = np.broadcast_to(p, lead + p.shape[2:]).reshape((-1,) + p.shape[2:]) if per_head else p[None]
    x = untied(rng, (int(np.prod(lead)), n, dim), flat_planes, hashing, tau).reshape(lead + (n, dim)) * 3.0
    got = target.hash_codes(x, planes=p, num_hashes=m, hash_bits=tau, hashing=hashing)
    flat = x.reshape((-1, n, dim))
    want = ref.hash_codes(unit(flat), flat_planes, hashing=hashing, num_hashes=m, hash_bits=tau)
    assert got.shape == lead + (n, m)
    np.testing.assert_array_equal(got.reshape(-1, n, m), want.transpose(0, 2, 1))
    seeded = target.hash_codes(x, seed=5, num_hashes=m, hash_bits=tau, hashing=hashing)
    drawn = yoso.hash_planes(m, tau, dim, hashing=hashing, seed=5)
    np.testing.assert_array_equal(
        seeded, target.hash_codes(x, planes=drawn, num_hashes=m, hash_bits=tau, hashing=hashing)
    )


def test_zero_row_hashes_to_bucket_zero(kernel, rng):
    p = draw_planes(rng, 4, 5, 8)[None]
    x = np.zeros((1, 2, 8))
    codes = to_numpy(
        kernel.backend.hash_codes(kernel.array(x), kernel.array(p), hashing="gaussian", num_hashes=4, hash_bits=5)
    )
    assert (codes == 0).all(), "a zero projection is bit 0 (strict >)"


def _pair_at_cosine(rng, dim, cosine):
    a = rng.standard_normal(dim)
    a /= np.linalg.norm(a)
    b = rng.standard_normal(dim)
    b -= (b @ a) * a
    b /= np.linalg.norm(b)
    return a, cosine * a + np.sqrt(1 - cosine**2) * b


@pytest.mark.parametrize("hash_bits", [1, 3])
def test_gaussian_collision_frequency(kernel, rng, hash_bits):
    """With Gaussian planes P[h(a) = h(b)] = (1 - theta/pi)^tau exactly: binomial frequencies, 5 sigma."""
    num_hashes, dim = 6000, 16
    cosines = np.array([-0.6, 0.0, 0.5, 0.9, 0.99])
    pairs = [_pair_at_cosine(rng, dim, c) for c in cosines]
    x = np.stack([np.stack(p) for p in pairs])  # [pairs, 2, D]: each pair is one batch row
    p = yoso.hash_planes(num_hashes, hash_bits, dim, seed=rng)[None]
    codes = to_numpy(
        kernel.backend.hash_codes(
            kernel.array(x), kernel.array(p), hashing="gaussian", num_hashes=num_hashes, hash_bits=hash_bits
        )
    )
    freq = (codes[:, :, 0] == codes[:, :, 1]).mean(axis=1)
    prob = ref.collision_probability(cosines, hash_bits)
    sigma = np.sqrt(prob * (1 - prob) / num_hashes)
    assert np.all(np.abs(freq - prob) <= 5 * sigma + 1e-12), f"freq {freq} vs p {prob} (sigma {sigma})"


@pytest.mark.parametrize("dim", [16, 64])
def test_hadamard_collision_frequency(kernel, rng, dim):
    """The structured rotation approximates SimHash (documented tolerance, see the constant above)."""
    hash_bits, num_hashes = 2, 4096
    cosines = np.array([0.0, 0.5, 0.9])
    x = np.stack([np.stack(_pair_at_cosine(rng, dim, c)) for c in cosines])
    p = yoso.hash_planes(num_hashes, hash_bits, dim, hashing="hadamard", seed=rng)[None]
    codes = to_numpy(
        kernel.backend.hash_codes(
            kernel.array(x), kernel.array(p), hashing="hadamard", num_hashes=num_hashes, hash_bits=hash_bits
        )
    )
    freq = (codes[:, :, 0] == codes[:, :, 1]).mean(axis=1)
    prob = ref.collision_probability(cosines, hash_bits)
    # Hashes within one rotation are dependent, so the sampling error is estimated per rotation.
    per_rotation = ref.padded_dim(dim) // hash_bits
    rotations = -(-num_hashes // per_rotation)
    sigma = np.sqrt(prob * (1 - prob) / rotations)
    assert np.all(np.abs(freq - prob) <= HADAMARD_COLLISION_TOLERANCE + 5 * sigma), f"freq {freq} vs p {prob}"
