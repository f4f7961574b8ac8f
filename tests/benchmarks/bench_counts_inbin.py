"""How much of the counts model's per-bin error is where in its energy bin a bin's samples
lie, and whether per-bin moments of that position would repair it (``make bench``):
writes bench-results/counts_inbin.json.

On the README's Ge set-up (the ``raman`` truth, omega = 10 deg, one core), every folded
sample of the exact expected fold (:func:`consumers.reduction.moments.folded_samples`:
every 2nd pixel, 4 energies a bin) with its modes diagonalised at its own Q, three ways:

* ``point``: each mode's resolution Gaussian at the sample's own energy (the exact fold,
  :func:`model_server.refinement.exact.exact_one_phonon_fold`);
* ``bin_uniform``: the Gaussian averaged over the sample's whole energy bin, as the
  counts model takes every bin's samples (spread uniformly);
* ``quadratic``: the bin average plus the first two Legendre terms of the bin's weighted
  distribution of sample positions (their mean and mean square, two numbers a bin that
  the moments could keep); the Gaussian's integrals against them are closed forms in the
  same erfc and exp terms as the bin average;
* ``linear_by_mode``: the bin average plus the first Legendre term of the positions
  weighted by each mode's own intensity at each sample (``sum w S_m x / sum w S_m`` per
  bin and mode): what a moment ``sum w x M(Q')`` (one more structure-factor tensor a bin,
  contracted with each mode's eigenvector as ``sum w M(Q')`` is) would give the model.

Energy loss lines only: the gain lines sit at negative energy transfers, below the
fitted bins. Per bin, over the bins that would hold more than 10 counts in the
README run (as ``bench_counts_model``): median, 90th percentile and share within 2 % of
``|x / point - 1|`` for ``bin_uniform``, ``quadratic``, ``linear_by_mode``, the counts
model, and the counts model times ``quadratic / bin_uniform`` and ``linear_by_mode /
bin_uniform`` (what either set of moments would give it).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
from scipy.special import erf
from threadpoolctl import threadpool_limits

from consumers.reduction.moments import folded_samples, orientation_moments
from simulations.lattice.sqe import CoherentSQE, bose_occupation
from tests.ge_moments import TEMPERATURE, ge_run

RESULTS = Path(os.environ.get("BENCH_DIR", "bench-results"))

#: Folded signal counts per orientation of the README run, and its orientations.
SIGNAL_PER_ORIENTATION, ORIENTATIONS = 12600.0, 120
E_SUBSTEPS = 4


def _bin_integrals(
    lo: np.ndarray, de: float, centre: np.ndarray, sigma: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of a unit-area Gaussian (``centre``, ``sigma``, meV) over the bin ``[lo, lo + de]``
    with ``x = (E - mid) / (de / 2)`` in [-1, 1]: the bin averages of ``G``, ``x G`` and
    ``P2(x) G`` (1/meV, the arrays' broadcast shape)."""
    zl, zh = (lo - centre) / sigma, (lo + de - centre) / sigma
    i0 = 0.5 * (erf(zh / math.sqrt(2)) - erf(zl / math.sqrt(2)))
    pl = np.exp(-0.5 * zl * zl) / math.sqrt(2 * math.pi)
    ph = np.exp(-0.5 * zh * zh) / math.sqrt(2 * math.pi)
    i1 = sigma * (pl - ph)  # int (E - centre) G
    i2 = sigma * sigma * (i0 + zl * pl - zh * ph)  # int (E - centre)^2 G
    d = centre - (lo + 0.5 * de)
    half = 0.5 * de
    j1 = (i1 + d * i0) / half
    j2 = (i2 + 2 * d * i1 + d * d * i0) / half**2
    return i0 / de, j1 / de, 0.5 * (3 * j2 - i0) / de


def _stats(x: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    r = np.abs(x / ref - 1.0)
    return {
        "median": round(float(np.median(r)), 5),
        "p90": round(float(np.percentile(r, 90)), 5),
        "within_2pc": round(float(np.mean(r <= 0.02)), 4),
    }


def bench_counts_inbin() -> None:
    run = ge_run()
    refiner, folder = run.refiner, run.folder
    grid = folder.grid
    omega = 10.0
    t0 = time.perf_counter()
    with threadpool_limits(1):
        moments = orientation_moments(folder, refiner.constants, omega)
        model = refiner.counts_model(moments)
        lam = model.evaluate(model.theta(run.truth), jacobian=False).expected
        sqe = CoherentSQE(
            refiner.setup.basis, run.truth, temperature=TEMPERATURE, resolution=model.resolution
        )
        rows, q, sub, w = folded_samples(folder, omega, e_substeps=E_SUBSTEPS)
        col = sub // E_SUBSTEPS
        bins = folder.table.star_index[rows] * grid.n_e + col
        edges = np.asarray(grid.energy_edges, dtype=float)
        de = float(edges[1] - edges[0])
        lo = edges[0] + col * de
        e_sample = edges[0] + (sub + 0.5) * de / E_SUBSTEPS
        x = (e_sample - lo - 0.5 * de) / (0.5 * de)  # position in the bin, [-1, 1]
        n_bins = grid.n_q * grid.n_e
        weight = np.bincount(bins, w, n_bins)
        safe = np.where(weight > 0, weight, 1.0)
        a1 = 3.0 * np.bincount(bins, w * x, n_bins) / safe  # Legendre coefficients
        # each sample stands for its sub-step (width 2 / E_SUBSTEPS in x): its variance
        # added, evenly weighted sub-steps give the uniform density exactly (a2 = 0)
        x2 = np.bincount(bins, w * x * x, n_bins) / safe + 1.0 / (3.0 * E_SUBSTEPS**2)
        a2 = 2.5 * (3.0 * x2 - 1.0)
        point, uniform, quadratic = (np.zeros(n_bins) for _ in range(3))
        n_modes = sqe.structure_factors(q[:1])[0].shape[1]
        # per (bin, mode): sum w S, sum w S x, sum w S g0, sum w S g1 (S the mode's loss
        # intensity at the sample): the first Legendre term weighted by each mode
        by_mode = np.zeros((4, n_bins, n_modes))
        for s0 in range(0, len(bins), 65536):
            sl = slice(s0, s0 + 65536)
            e_mode, sf = sqe.structure_factors(q[sl])
            sigma = sqe.resolution.sigma(np.abs(e_mode))
            loss = sf * (bose_occupation(e_mode, TEMPERATURE) + 1.0)
            z = (e_sample[sl, None] - e_mode) / sigma
            g = np.exp(-0.5 * z * z) / (math.sqrt(2 * math.pi) * sigma)
            g0, g1, g2 = _bin_integrals(lo[sl, None], de, e_mode, sigma)
            b = bins[sl]
            point += np.bincount(b, np.sum(loss * g, 1) * w[sl], n_bins)
            uniform += np.bincount(b, np.sum(loss * g0, 1) * w[sl], n_bins)
            corr = g0 + a1[b, None] * g1 + a2[b, None] * g2
            quadratic += np.bincount(b, np.sum(loss * corr, 1) * w[sl], n_bins)
            ws = loss * w[sl, None]
            for m in range(n_modes):
                for i, term in enumerate((ws, ws * x[sl, None], ws * g0, ws * g1)):
                    by_mode[i, :, m] += np.bincount(b, term[:, m], n_bins)
        s_sum, x_sum, p0, p1 = by_mode
        a1_mode = 3.0 * x_sum / np.where(s_sum > 0, s_sum, 1.0)
        linear_by_mode = np.sum(p0 + a1_mode * p1, axis=1)
    alias = np.asarray(folder.table.alias)

    def fitted(a: np.ndarray) -> np.ndarray:
        return np.asarray(a.reshape(grid.n_q, grid.n_e)[alias].reshape(-1)[model.bins])

    point, uniform, quadratic = fitted(point), fitted(uniform), fitted(quadratic)
    linear_by_mode = fitted(linear_by_mode)
    use = point * SIGNAL_PER_ORIENTATION * ORIENTATIONS / point.sum() > 10
    ok = use & (uniform > 0)
    out = {
        "material": "Ge",
        "omega_deg": omega,
        "fitted_bins": int(use.sum()),
        "energy_bin_mev": de,
        "rms_mean_position": round(float(np.sqrt(np.mean((fitted(a1) / 3.0)[use] ** 2))), 4),
        "against_point": {
            "bin_uniform": _stats(uniform[use], point[use]),
            "quadratic": _stats(quadratic[use], point[use]),
            "model": _stats(lam[use], point[use]),
            "linear_by_mode": _stats(linear_by_mode[use], point[use]),
            "model_times_quadratic_over_uniform": _stats(
                (lam * quadratic / np.where(uniform > 0, uniform, 1.0))[ok], point[ok]
            ),
            "model_times_linear_by_mode_over_uniform": _stats(
                (lam * linear_by_mode / np.where(uniform > 0, uniform, 1.0))[ok], point[ok]
            ),
        },
        "model_against_bin_uniform": _stats(lam[use], uniform[use]),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "counts_inbin.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
