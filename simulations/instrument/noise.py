"""Noise on folded spectra I(q, E): constant background B and Poisson counting scale P.

What the seed paper says
------------------------
Sable et al., *Digital Discovery* (2026), DOI 10.1039/d6dd00008h, section "Benchmarking
predictive performance and robustness to spectral noise on simulated data for Ge and Nb":

    "The noise model was designed to reflect the physical and statistical processes of INS,
    incorporating a tunable constant background component (B) and scalable Poisson counting
    statistics (P) (see SI Section 4)."

    "we applied 25 combinations of background and Poisson noise (spanning a 5 x 5 parameter
    grid, shown in SI Fig. 21-24) across the test datasets"

and the caption of Fig. 2(c): "Example spectra perturbed with increasing constant background
(B) and Poisson counting noise (P); signal-to-noise ratios (SNRs) are indicated in each
input." The model inputs are Min-Max scaled spectra (section "Framework for ML-driven force
constant inversion...", Stage III: "Following Min-Max scaling to match the intensity range of
the training data").

The equation, the direction of P and the 25 values are in SI Section 4 and SI Fig. 21-24,
which are **not** in the text available to this project. The main text fixes only that B is
a constant added to the spectrum and that P scales Poisson counting statistics.

What is implemented (our reading, stated so that it can be checked against the SI)
---------------------------------------------------------------------------------
With I the (min-max scaled, so dimensionless, peak 1) spectrum::

    N ~ Poisson(P * (I + B))        counts per (q, E) bin
    I_noisy = N / P                 back in the units of I

so that E[I_noisy] = I + B and Var[I_noisy] = (I + B) / P. P is the number of counts that
one unit of intensity (the spectrum's maximum after min-max scaling) gives: a **larger P
means more counts and less noise** (relative error 1/sqrt(P (I + B)) in a bin), and
P -> infinity is the noiseless limit I + B. B = 0 leaves only the counting noise of the
signal itself; B > 0 raises the floor and adds its own counting noise everywhere, which is
what lowers the SNR of sparse phonon spectra. Apply :func:`minmax_scale` afterwards to give
a model the intensity range it was trained on, as the paper does for every input.

The grid
--------
Because the paper's values are not available, :data:`NOISE_GRID_BACKGROUNDS` and
:data:`NOISE_GRID_POISSON` are our choice, half-decade steps from mild to severe:
B in {0, 0.01, 0.03, 0.1, 0.3} of the spectrum's maximum, and P in {1000, 300, 100, 30, 10}
counts at the maximum (SNR of the brightest bin about 32 down to about 3).
"""

from __future__ import annotations

import logging
import math
from typing import Final

import numpy as np
from numpy.typing import ArrayLike, NDArray

from simulations.exceptions import NoiseError

__all__ = [
    "NOISE_GRID_BACKGROUNDS",
    "NOISE_GRID_POISSON",
    "add_noise",
    "counting_noise",
    "minmax_scale",
    "noise_grid",
]

logger = logging.getLogger(__name__)

#: Constant backgrounds B of the 5 x 5 grid, in units of the min-max scaled spectrum (our
#: choice; the paper's values are in its SI Fig. 21-24), mildest first.
NOISE_GRID_BACKGROUNDS: Final[tuple[float, ...]] = (0.0, 0.01, 0.03, 0.1, 0.3)
#: Poisson scales P of the 5 x 5 grid, counts per unit intensity (our choice), mildest
#: (most counts) first.
NOISE_GRID_POISSON: Final[tuple[float, ...]] = (1000.0, 300.0, 100.0, 30.0, 10.0)

# numpy's Poisson sampler refuses lam above about 9.2e18; stay well below.
_MAX_LAM: Final = 1e17


def noise_grid() -> list[tuple[float, float]]:
    """The 25 (B, P) pairs of the robustness grid, B-major: B[0] with every P, then B[1]...

    Returns
    -------
    list of (background, poisson_scale)
        25 pairs from :data:`NOISE_GRID_BACKGROUNDS` x :data:`NOISE_GRID_POISSON`, mildest
        first in each.
    """
    return [(b, p) for b in NOISE_GRID_BACKGROUNDS for p in NOISE_GRID_POISSON]


def _check_rng(rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise NoiseError(
            f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
            f"got {type(rng).__name__}"
        )
    return rng


def _nonnegative_finite(values: ArrayLike, what: str) -> NDArray[np.floating]:
    arr = np.asarray(values)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise NoiseError(f"{what} must be a real numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False) if arr.dtype.kind != "f" else arr
    if arr.size:
        if not np.all(np.isfinite(arr)):
            n_bad = int(np.count_nonzero(~np.isfinite(arr)))
            raise NoiseError(
                f"{what} has {n_bad} non-finite values (NaN or inf); noise applies to "
                "simulated spectra, fill or drop masked bins first"
            )
        lowest = float(arr.min())
        if lowest < 0:
            raise NoiseError(
                f"{what} must be non-negative (counts and intensities are), min is {lowest:g}"
            )
    return arr


def counting_noise(
    expected_counts: ArrayLike, rng: np.random.Generator
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Count a finite number of events: Poisson draws around expected counts.

    Parameters
    ----------
    expected_counts
        (...) float, expected number of events per bin (>= 0, finite).
    rng
        The generator to draw from; the same generator state gives the same counts.

    Returns
    -------
    counts
        (...) int64, observed counts N ~ Poisson(expected_counts), bin by bin.
    variance
        (...) float64, the usual variance estimate of a Poisson count, equal to ``counts``
        (a bin with 0 counts gets variance 0; weight such bins with care).

    Raises
    ------
    NoiseError
        If an expected count is negative, non-finite or too large to sample (> 1e17), or
        ``rng`` is not a ``numpy.random.Generator``.
    """
    rng = _check_rng(rng)
    lam = _nonnegative_finite(expected_counts, "expected_counts")
    if lam.size and float(lam.max()) > _MAX_LAM:
        raise NoiseError(
            f"expected counts up to {float(lam.max()):.3g} are too large to sample "
            f"(max {_MAX_LAM:.0e}); for the noiseless limit use poisson_scale=math.inf"
        )
    counts = rng.poisson(lam).astype(np.int64, copy=False)
    return counts, counts.astype(np.float64)


def add_noise(
    spectra: ArrayLike,
    *,
    background: float,
    poisson_scale: float,
    rng: np.random.Generator,
) -> NDArray[np.floating]:
    """Add a constant background and Poisson counting noise to spectra I(q, E).

    ``I_noisy = Poisson(poisson_scale * (I + background)) / poisson_scale``, drawn
    independently in every bin; see the module docstring for the paper's text and why this
    is our reading of it.

    Parameters
    ----------
    spectra
        (..., n_q, n_E) float, non-negative intensities, as a rule min-max scaled to [0, 1]
        (any leading batch dimensions).
    background
        B >= 0, constant added to every bin, in the units of ``spectra`` (a fraction of the
        maximum for min-max scaled spectra).
    poisson_scale
        P > 0, counts per unit intensity. Larger P means more counts and *less* noise:
        a bin's relative error is 1 / sqrt(P (I + B)). ``math.inf`` gives the noiseless
        ``I + B`` (no draws are made).
    rng
        The generator to draw from; the same generator state gives the same output.

    Returns
    -------
    NDArray
        (..., n_q, n_E), the input's float dtype (float64 for integer input); its
        expected value is ``I + B`` and its variance ``(I + B) / P``. Not rescaled: apply
        :func:`minmax_scale` to get model inputs.

    Raises
    ------
    NoiseError
        If ``spectra`` has fewer than 2 dimensions or negative / non-finite values,
        ``background`` is negative or not finite, ``poisson_scale`` is not positive (or NaN),
        or ``rng`` is not a ``numpy.random.Generator``.
    """
    rng = _check_rng(rng)
    arr = _nonnegative_finite(spectra, "spectra")
    if arr.ndim < 2:
        raise NoiseError(f"spectra must be (..., n_q, n_E), got shape {arr.shape}")
    b = float(background)
    if not math.isfinite(b) or b < 0:
        raise NoiseError(f"background B must be finite and >= 0, got {background!r}")
    p = float(poisson_scale)
    if math.isnan(p) or p <= 0:
        raise NoiseError(
            f"poisson_scale P must be > 0 (counts per unit intensity; math.inf for no "
            f"counting noise), got {poisson_scale!r}"
        )
    dtype = arr.dtype
    mean = arr.astype(np.float64, copy=False) + b
    if math.isinf(p):
        return mean.astype(dtype, copy=False)
    counts, _ = counting_noise(mean * p, rng)
    return (counts / p).astype(dtype, copy=False)


def minmax_scale(spectra: ArrayLike) -> NDArray[np.floating]:
    """Min-max scale each spectrum to [0, 1] over its last two axes (q, E).

    Parameters
    ----------
    spectra
        (..., n_q, n_E) float.

    Returns
    -------
    NDArray
        (..., n_q, n_E), same float dtype (float64 for integer input), each spectrum mapped
        by ``(I - min) / (max - min)``; a constant spectrum becomes all zeros.

    Raises
    ------
    NoiseError
        If ``spectra`` has fewer than 2 dimensions or non-finite values.
    """
    arr = np.asarray(spectra)
    if arr.ndim < 2:
        raise NoiseError(f"spectra must be (..., n_q, n_E), got shape {arr.shape}")
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    if arr.size == 0:
        return arr.copy()
    if not np.all(np.isfinite(arr)):
        raise NoiseError("spectra have non-finite values (NaN or inf); cannot min-max scale")
    lo = arr.min(axis=(-2, -1), keepdims=True)
    span = arr.max(axis=(-2, -1), keepdims=True) - lo
    safe = np.where(span > 0, span, 1)
    return ((arr - lo) / safe).astype(arr.dtype, copy=False)
