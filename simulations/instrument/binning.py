"""A simple, slow, obviously-correct reference binning of events into I(q, E) on a q-path.

Used to check the synthetic instrument (and, later, the fast lookup-table folding of
``consumers``): each event's Q (primitive r.l.u.) is matched to the nearest point of the
*star* of the q-path (every path point under every point-group operation and time reversal,
with its periodic images) by a k-d tree in Cartesian coordinates; events farther than
``tolerance`` (1/Angstrom) from every star point are dropped. No lookup table, no wedge.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy.spatial import cKDTree

from simulations.lattice.crystals import Crystal
from simulations.lattice.grid import Grid

__all__ = ["ReferenceBinning"]


class ReferenceBinning:
    """Bin (Q, E) events onto a grid's q-path by nearest symmetry-equivalent path point.

    Parameters
    ----------
    crystal
        The crystal (primitive cell and its point group).
    grid
        The (q, E) grid; its q-path points are in primitive r.l.u.
    tolerance
        Largest distance (1/Angstrom) from an event's Q to a path point's star.
    """

    def __init__(self, crystal: Crystal, grid: Grid, tolerance: float = 0.05) -> None:
        self.crystal = crystal
        self.grid = grid
        self.tolerance = float(tolerance)
        rotations, _ = crystal.symmetry_operations()
        q = grid.qpath.qpoints  # (n_q, 3)
        ops = np.concatenate([rotations, -rotations]).astype(float)
        # q'(row) = q R: the star under all operations (the set is closed under inverses)
        star = np.einsum("qa,oab->oqb", q, ops).reshape(-1, 3)
        index = np.tile(np.arange(len(q)), len(ops))
        star = star - np.floor(star + 1e-9)
        # Points on symmetry elements map onto themselves, and a path may pass the same
        # point twice (or symmetry-equivalent points: U and K): keep each position once,
        # with its lowest path index; the other indices are *aliases* that get a copy.
        order = np.argsort(index, kind="stable")
        star, index = star[order], index[order]
        _, first = np.unique(np.round(star, 9) % 1.0, axis=0, return_index=True)
        first.sort()
        star, index = star[first], index[first]
        shifts = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)])
        images = (star[None, :, :] + shifts[:, None, :]).reshape(-1, 3)
        self._index = np.tile(index, len(shifts))
        #: (n_star, 3) float, 1/Angstrom: the star points and their periodic images.
        self.star_xyz = images @ crystal.reciprocal_lattice
        #: (n_star,) int: the path index of each star point.
        self.star_index = self._index
        self._tree = cKDTree(self.star_xyz)
        own = q - np.floor(q + 1e-9)
        _, at = self._tree.query(own @ crystal.reciprocal_lattice)
        #: (n_q,) int: the path index whose counts each path point shares (itself if none).
        self.alias = np.minimum(self._index[at], np.arange(len(q)))

    def q_index(self, q_rlu: NDArray[np.float64]) -> NDArray[np.int64]:
        """(n,) int: path index of each Q ((n, 3) primitive r.l.u.), -1 when too far."""
        q = np.atleast_2d(np.asarray(q_rlu, dtype=float))
        frac = q - np.floor(q)
        dist, idx = self._tree.query(frac @ self.crystal.reciprocal_lattice, k=1)
        out = self._index[np.minimum(idx, len(self._index) - 1)]
        return np.where(dist <= self.tolerance, out, -1).astype(np.int64)

    def histogram(
        self,
        q_rlu: NDArray[np.float64],
        energy: NDArray[np.float64],
        weights: NDArray[np.float64] | None = None,
    ) -> NDArray[np.float64]:
        """(n_q, n_E) float: summed weights (counts by default) of events per (q, E) bin."""
        iq = self.q_index(q_rlu)
        edges = self.grid.energy_edges
        ie = np.searchsorted(edges, np.asarray(energy, dtype=float), side="right") - 1
        ok = (iq >= 0) & (ie >= 0) & (ie < len(edges) - 1)
        shape = (self.grid.n_q, self.grid.n_e)
        flat = np.ravel_multi_index((iq[ok], ie[ok]), shape)
        w = None if weights is None else np.asarray(weights, dtype=float)[ok]
        hist = np.bincount(flat, weights=w, minlength=shape[0] * shape[1]).reshape(shape)
        return np.asarray(hist[self.alias], dtype=float)
