"""Noise model: constant background B and Poisson scale P on I(q, E), and counting noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from simulations.exceptions import NoiseError, SimulationError
from simulations.instrument.noise import (
    NOISE_GRID_BACKGROUNDS,
    NOISE_GRID_POISSON,
    add_noise,
    counting_noise,
    minmax_scale,
    noise_grid,
)


def spectrum(n_q: int = 8, n_E: int = 10, seed: int = 3) -> np.ndarray:
    """A sparse min-max scaled (n_q, n_E) spectrum: zeros with a few peaks, max exactly 1."""
    r = np.random.default_rng(seed)
    s = np.where(r.random((n_q, n_E)) < 0.3, r.random((n_q, n_E)), 0.0)
    s[0, 0] = 1.0
    return s


@pytest.mark.parametrize("shape", [(8, 10), (3, 8, 10), (2, 3, 8, 10)])
def test_shape_is_kept(shape: tuple[int, ...]) -> None:
    spectra = np.broadcast_to(spectrum(), shape)
    out = add_noise(spectra, background=0.1, poisson_scale=30, rng=np.random.default_rng(0))
    assert out.shape == shape
    assert out.dtype == np.float64
    assert np.all(out >= 0)


def test_float32_stays_float32() -> None:
    out = add_noise(
        spectrum().astype(np.float32),
        background=0.0,
        poisson_scale=10,
        rng=np.random.default_rng(0),
    )
    assert out.dtype == np.float32


def test_deterministic_for_a_seed() -> None:
    s = spectrum()

    def draw(seed: int) -> np.ndarray:
        return add_noise(s, background=0.03, poisson_scale=100, rng=np.random.default_rng(seed))

    assert_array_equal(draw(1), draw(1))
    assert not np.array_equal(draw(1), draw(2))


def test_values_are_counts_over_p() -> None:
    out = add_noise(spectrum(), background=0.1, poisson_scale=30, rng=np.random.default_rng(5))
    assert_allclose(out * 30, np.round(out * 30), atol=1e-9)


def test_noiseless_limit_p_infinite() -> None:
    s = spectrum()
    rng = np.random.default_rng(0)
    assert_array_equal(add_noise(s, background=0.0, poisson_scale=math.inf, rng=rng), s)
    # A constant background alone shifts every bin by B.
    assert_allclose(add_noise(s, background=0.1, poisson_scale=math.inf, rng=rng), s + 0.1)


def test_large_p_converges_to_the_clean_spectrum() -> None:
    s = spectrum()
    p = 1e8
    out = add_noise(s, background=0.0, poisson_scale=p, rng=np.random.default_rng(0))
    # Per-bin standard deviation sqrt(I / P) <= 1e-4; 6 sigma.
    assert_allclose(out, s, rtol=0, atol=6 * math.sqrt(1 / p))


def test_b_zero_keeps_empty_bins_empty() -> None:
    # Without background, a bin with no signal has expected count 0 and so exactly 0 counts.
    s = spectrum()
    out = add_noise(s, background=0.0, poisson_scale=10, rng=np.random.default_rng(0))
    assert np.all(out[s == 0] == 0)
    out_b = add_noise(s, background=0.3, poisson_scale=10, rng=np.random.default_rng(0))
    assert np.any(out_b[s == 0] > 0)


def test_mean_and_variance_of_many_draws() -> None:
    s = spectrum()
    b, p, n = 0.05, 20.0, 4000
    draws = add_noise(
        np.broadcast_to(s, (n, *s.shape)),
        background=b,
        poisson_scale=p,
        rng=np.random.default_rng(11),
    )
    expected_mean = s + b
    expected_var = (s + b) / p
    # Standard error of the mean per bin: sqrt(var / n) <= 0.0036; 5 standard errors.
    assert np.all(np.abs(draws.mean(axis=0) - expected_mean) < 5 * np.sqrt(expected_var / n))
    # Relative standard error of a sample variance is about sqrt((2 + 1/(P(I+B))) / n)
    # <= 0.027 here; allow 15 % (over 5 of them).
    assert_allclose(draws.var(axis=0, ddof=1), expected_var, rtol=0.15)


def test_larger_p_means_less_noise() -> None:
    s = spectrum()
    rng = np.random.default_rng(4)
    spread = [
        np.std(
            add_noise(np.broadcast_to(s, (200, *s.shape)), background=0.1, poisson_scale=p, rng=rng)
            - s
        )
        for p in NOISE_GRID_POISSON  # mildest (largest P) first
    ]
    assert spread == sorted(spread)


def test_counting_noise_returns_counts_and_variance() -> None:
    expected = np.array([[0.0, 0.5, 3.0], [10.0, 100.0, 1000.0]])
    counts, variance = counting_noise(
        np.broadcast_to(expected, (5000, 2, 3)), np.random.default_rng(2)
    )
    assert counts.dtype == np.int64
    assert variance.dtype == np.float64
    assert_array_equal(variance, counts)
    assert np.all(counts[:, 0, 0] == 0)
    # Standard error of the mean sqrt(lam / 5000); 5 standard errors (and > 0 for lam = 0).
    tol = 5 * np.sqrt(np.maximum(expected, 1e-12) / 5000)
    assert np.all(np.abs(counts.mean(axis=0) - expected) <= tol)


def test_noise_grid_is_5_by_5() -> None:
    grid = noise_grid()
    assert len(grid) == 25
    assert len(set(grid)) == 25
    assert len(NOISE_GRID_BACKGROUNDS) == len(NOISE_GRID_POISSON) == 5
    assert grid[:5] == [(NOISE_GRID_BACKGROUNDS[0], p) for p in NOISE_GRID_POISSON]
    assert all(b >= 0 and p > 0 for b, p in grid)


def test_minmax_scale() -> None:
    r = np.random.default_rng(0)
    spectra = r.random((4, 8, 10)) * 7 + 2
    spectra[3] = 5.0  # a constant spectrum
    out = minmax_scale(spectra)
    assert_allclose(out[:3].min(axis=(1, 2)), 0)
    assert_allclose(out[:3].max(axis=(1, 2)), 1)
    assert_array_equal(out[3], 0)


@pytest.mark.parametrize(
    ("spectra", "kwargs", "match"),
    [
        (-spectrum() - 0.1, {}, "non-negative"),
        (np.full((2, 2), np.nan), {}, "non-finite"),
        (np.ones(5), {}, r"\(\.\.\., n_q, n_E\)"),
        (spectrum(), {"background": -0.1}, "background B"),
        (spectrum(), {"background": math.nan}, "background B"),
        (spectrum(), {"poisson_scale": 0.0}, "poisson_scale P"),
        (spectrum(), {"poisson_scale": -5.0}, "poisson_scale P"),
        (spectrum(), {"poisson_scale": math.nan}, "poisson_scale P"),
        (spectrum(), {"rng": 42}, "numpy.random.Generator"),
        (spectrum(), {"poisson_scale": 1e18}, "too large"),
    ],
)
def test_bad_input_is_a_clear_error(spectra: np.ndarray, kwargs: dict, match: str) -> None:
    args: dict = {"background": 0.0, "poisson_scale": 10.0, "rng": np.random.default_rng(0)}
    with pytest.raises(NoiseError, match=match) as info:
        add_noise(spectra, **(args | kwargs))
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, SimulationError)


def test_counting_noise_rejects_negative_counts() -> None:
    with pytest.raises(NoiseError, match="non-negative"):
        counting_noise(np.array([1.0, -1.0]), np.random.default_rng(0))
