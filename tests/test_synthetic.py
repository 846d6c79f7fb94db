"""The vectors grown for index benchmarks: disjoint query and base pools, noise shaped like the
real residuals (covariance or variances only), reproducible from the seed."""
from __future__ import annotations

import numpy as np
import pytest

from fashionrec.indexing.synthetic import ResidualNoise, compressibility, effective_dimension, make_vectors


def correlated_rows(n=600, d=16, seed=0):
    """Non-negative rows whose spread lives mostly along 3 directions."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(0, 1, (n, 3)) @ rng.normal(0, 1, (3, d)) + rng.normal(0, 0.05, (n, d))
    return np.maximum(latent + 3, 0).astype(np.float32)


def test_effective_dimension_counts_directions_of_spread():
    rng = np.random.default_rng(0)
    assert effective_dimension(rng.normal(0, 1, (20000, 8))) == pytest.approx(8, rel=0.02)
    line = np.outer(rng.normal(0, 1, 500), rng.normal(0, 1, 8))
    assert effective_dimension(line) == pytest.approx(1, abs=1e-6)


@pytest.mark.parametrize("model", ["covariance", "diagonal"])
def test_noise_matches_the_residual_spread(model):
    residuals = correlated_rows(2000) - 3
    noise = ResidualNoise(residuals, scale=0.5, model=model).sample(200_000, np.random.default_rng(1))
    target = 0.25 * np.cov(residuals, rowvar=False, bias=True)
    got = np.cov(noise, rowvar=False)
    # Both models keep every dimension's variance...
    assert np.allclose(np.diag(got), np.diag(target), rtol=0.03)
    off_diagonal = ~np.eye(len(target), dtype=bool)
    if model == "covariance":
        # ...only the covariance model keeps the correlations, and with them the low effective dimension.
        assert np.abs(got - target)[off_diagonal].max() < 0.03 * np.abs(target).max()
        assert effective_dimension(noise) == pytest.approx(effective_dimension(residuals), rel=0.05)
    else:
        assert np.abs(got[off_diagonal]).max() < 0.03 * np.abs(target).max()
        assert effective_dimension(noise) > 2 * effective_dimension(residuals)


def test_queries_and_base_grow_from_disjoint_real_rows():
    real = correlated_rows()
    # Without mixing and noise every grown vector is a copy of its anchor row.
    base, queries = make_vectors(real, 3000, 200, seed=3, noise=0.0, mix=0.0)
    as_set = lambda rows: {row.tobytes() for row in rows}  # noqa: E731
    real_rows = as_set(real)
    assert as_set(base) <= real_rows and as_set(queries) <= real_rows
    assert not as_set(base) & as_set(queries)
    assert len(as_set(queries)) > 40   # drawn from the whole 10% query pool, not a few rows


def test_growing_is_seeded_and_keeps_non_negative_features_non_negative():
    real = correlated_rows()
    first = make_vectors(real, 500, 50, seed=7)
    again = make_vectors(real, 500, 50, seed=7)
    other = make_vectors(real, 500, 50, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])
    assert first[0].min() >= 0 and first[0].dtype == np.float32
    with pytest.raises(ValueError, match="real rows"):
        make_vectors(real[:50], 10, 5, seed=0)
    with pytest.raises(ValueError, match="noise model"):
        make_vectors(real, 10, 5, seed=0, noise_model="isotropic")


def test_compressibility_compares_real_and_grown_rows_of_equal_size():
    real = correlated_rows(n=1200, d=32)
    result = compressibility(real, factory="PQ4", seed=0)
    assert result["n"] == 1080 and result["queries"] == 120
    for name in ("real", "grown"):
        assert 0.0 < result[f"recall_at_10_{name}"] <= 1.0
    # Exact codes recall everything, on both sets.
    exact = compressibility(real, factory="Flat", seed=0)
    assert exact["recall_at_10_real"] == exact["recall_at_10_grown"] == 1.0
