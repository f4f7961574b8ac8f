"""The coherent one-phonon powder spectrum: S(Q, E) of a crystal averaged over every
direction of Q at each |Q| (the prediction endpoint's ``powder`` output and the simulated
sample can's phonons)."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from simulations.lattice.sqe import CoherentSQE, bose_occupation

__all__ = ["powder_spectrum"]

#: Elements of the eigenvector arrays of one batch of |Q| points (~64 MB complex).
_CHUNK_ELEMENTS = 4_000_000


def _fibonacci_sphere(n: int) -> NDArray[np.float64]:
    """(n, 3) quasi-uniform unit vectors."""
    k = np.arange(n) + 0.5
    z = 1.0 - 2.0 * k / n
    r = np.sqrt(np.maximum(0.0, 1.0 - z * z))
    phi = math.pi * (3.0 - math.sqrt(5.0)) * k
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1)


def _broadening_matrix(
    model: CoherentSQE, energies: NDArray[np.float64], fine: NDArray[np.float64]
) -> NDArray[np.float64]:
    """(n_fine, n_E): unit-area Gaussians of width sigma(|e_fine|) centred at each fine
    energy, evaluated at ``energies`` (as :meth:`CoherentSQE.sqe_from_modes` does)."""
    sigma = model.resolution.sigma(np.abs(fine))[:, None]
    z = (energies[None, :] - fine[:, None]) / sigma
    out: NDArray[np.float64] = np.exp(-0.5 * z * z) / (math.sqrt(2 * math.pi) * sigma)
    return out


def powder_spectrum(
    model: CoherentSQE,
    q: NDArray[np.float64],
    energies: NDArray[np.float64],
    *,
    directions: int = 128,
    seed: int = 0,
) -> NDArray[np.float64]:
    """(n_Q, n_E) spherical average of ``model``'s S(Q, E) at |Q| = ``q`` (1/Angstrom),
    mbarn/meV per atom.

    At every |Q| the Fibonacci sphere of ``directions`` points is turned by a random rotation
    (seeded). Mode energies go onto a fine energy grid (1/10 of the narrowest resolution
    width, each mode split linearly between its two nearest points, which keeps its weight
    and mean energy) that one matrix broadens with sigma(E) of the mode: the same
    Gaussians as :meth:`CoherentSQE.sqe_from_modes`, loss and gain. The |Q| points are
    processed in batches that keep the eigenvectors of one batch under ~64 MB.
    """
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    base = _fibonacci_sphere(directions)
    q = np.asarray(q, dtype=float)
    rot = Rotation.random(len(q), random_state=rng).as_matrix()  # (n_Q, 3, 3)
    to_rlu = np.linalg.inv(model.crystal.reciprocal_lattice)
    energies = np.asarray(energies, dtype=float)
    res = model.resolution
    sig_grid = res.sigma(np.linspace(0, res.e_max, 64))
    sig_min, sig_max = float(np.min(sig_grid)), float(np.max(sig_grid))
    step = max(sig_min / 10.0, 1e-3)
    # Modes more than 8 sigma_max above the top energy add nothing (< 1e-14 of a peak).
    top = float(np.abs(energies).max()) + 8.0 * sig_max + 1.0
    n_half = math.ceil(top / step)
    fine = np.asarray(step * np.arange(-n_half, n_half + 1), dtype=np.float64)
    n_fine = len(fine)
    hist = np.zeros(len(q) * n_fine)
    n_at = model.crystal.n_atoms
    rows_per_batch = max(1, _CHUNK_ELEMENTS // (directions * 9 * n_at * n_at))
    for start in range(0, len(q), rows_per_batch):
        sl = slice(start, min(len(q), start + rows_per_batch))
        dirs = np.einsum("qij,dj->qdi", rot[sl], base)
        q_cart = (q[sl, None, None] * dirs).reshape(-1, 3)
        e_mode, sf = model.structure_factors(q_cart @ to_rlu)  # (n_rows * n_dir, n_m)
        n = bose_occupation(e_mode, model.temperature)
        keep = (sf > 0) & (e_mode < top)
        row = np.repeat(np.arange(sl.start, sl.stop), directions * e_mode.shape[1]).reshape(
            e_mode.shape
        )
        centres = np.concatenate([e_mode[keep], -e_mode[keep]])
        weights = np.concatenate([(sf * (n + 1.0))[keep], (sf * n)[keep]])
        rows = np.concatenate([row[keep], row[keep]])
        x = (centres - fine[0]) / step
        lo = np.clip(np.floor(x).astype(np.int64), 0, n_fine - 2)
        frac = np.clip(x - lo, 0.0, 1.0)
        hist += np.bincount(rows * n_fine + lo, weights * (1 - frac), minlength=hist.size)
        hist += np.bincount(rows * n_fine + lo + 1, weights * frac, minlength=hist.size)
    table = hist.reshape(len(q), n_fine)
    used = np.nonzero(table.any(axis=0))[0]
    kernel = _broadening_matrix(model, energies, fine[used])
    out: NDArray[np.float64] = table[:, used] @ kernel / directions
    return out
