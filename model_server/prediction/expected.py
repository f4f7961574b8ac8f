"""The expected folded I(q, E) and detector S(Q, E) of the prediction endpoint.

:class:`GridSimulator` evaluates the coherent S(Q, E) on the super-pixels of the ARCS-like
detector at a grid's energy centres (the event simulator's expected-count machinery);
:class:`FoldSampler` folds every pixel's trajectory exactly as
:meth:`consumers.reduction.folding.Folder.coverage` does (every 2nd pixel, :data:`E_SUBSTEPS` energy
samples per bin) and adds each sample's coverage and coverage x S. See
:mod:`model_server.prediction.predict` for the physics and units.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.typing import NDArray

from consumers.reduction.folding import Folder
from simulations.instrument.events import OrientationSimulator, PhononTable
from simulations.instrument.spectrometer import (
    Instrument,
    Orientation,
    energy_to_k,
)
from simulations.lattice.sqe import CoherentSQE

__all__ = ["E_SUBSTEPS", "PIXEL_STRIDE", "FoldSampler", "GridSimulator", "accessible", "angle_bins"]

#: Fold sampling: the defaults of :meth:`Folder.coverage`.
PIXEL_STRIDE = 2
E_SUBSTEPS = 4


class GridSimulator(OrientationSimulator):
    """:class:`OrientationSimulator` whose energy grid is the centres of given bin edges
    (uniform), so that its expected counts line up with the (q, E) grid."""

    def __init__(
        self,
        model: CoherentSQE,
        instrument: Instrument,
        orientation: Orientation,
        ei: float,
        *,
        energy_edges: NDArray[np.float64],
        table: PhononTable,
        group_rows: int = 4,
    ) -> None:
        super().__init__(model, instrument, orientation, ei, table=table, group_rows=group_rows)
        edges = np.asarray(energy_edges, dtype=float)
        centres = 0.5 * (edges[1:] + edges[:-1])
        self.n_e = len(centres)
        self.kf_over_ki = np.asarray(energy_to_k(self.ei - centres)) / self._ki
        # The kernel gives exactly 0 more than 6 sigma_max above the highest mode (its own
        # skip): those energies are left out and padded with zeros.
        res = model.resolution
        cap = float(np.max(res.sigma(np.linspace(0.0, res.e_max, 64))))
        reach = table.max_energy + 6.0 * cap
        self.n_eval = int(np.searchsorted(centres, reach, side="right"))
        self.e_edges = edges[: self.n_eval + 1]
        self.e_centres = centres[: self.n_eval]
        self.e_step = float(edges[1] - edges[0])
        self._kf = np.asarray(energy_to_k(self.ei - self.e_centres))

    @property
    def group_of_pixel(self) -> NDArray[np.int64]:
        """(n_pixels,) super-pixel of every pixel."""
        group = np.empty(self.instrument.n_pixels, dtype=np.int64)
        group[self._members] = np.repeat(np.arange(self.n_groups), self._counts)
        return group

    @property
    def group_directions(self) -> NDArray[np.float64]:
        """(n_groups, 3) unit vectors of the super-pixel centres."""
        return np.asarray(self._group_dir)

    @property
    def group_solid_angles(self) -> NDArray[np.float64]:
        """(n_groups,) solid angles, sr."""
        return np.asarray(self._group_solid)

    def sqe(self, omega: float) -> NDArray[np.float64]:
        """(n_groups, n_E) S(Q, E) at the super-pixel centres, mbarn/(sr meV) per atom."""
        out = np.zeros((self.n_groups, self.n_e))
        if self.n_eval:
            out[:, : self.n_eval] = self.expected(omega) / self.cell_weights()
        return out


class FoldSampler:
    """The samples of :meth:`Folder.coverage` for one (instrument, Ei, grid)."""

    def __init__(
        self, folder: Folder, group_of_pixel: NDArray[np.int64], *, threads: int = 2
    ) -> None:
        self.folder = folder
        self.samples = folder.coverage_samples(e_substeps=E_SUBSTEPS, pixel_stride=PIXEL_STRIDE)
        self.group = np.ascontiguousarray(group_of_pixel[self.samples.pixels])
        self.threads = max(1, threads)

    def fold(
        self, omega: float, s_group: NDArray[np.float64]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(coverage, signal) of one orientation (alias-expanded): coverage (n_q, n_E);
        signal (n_q, n_E) for ``s_group`` (n_groups, n_E), or (n_ch, n_q, n_E) for several
        signals at once, ``s_group`` (n_groups, n_E, n_ch): one walk over the samples."""
        f = self.folder
        grid, t = f.grid, f.table
        dm, h_inf = f.sample_rays(self.samples, omega)
        single = s_group.ndim == 2
        stack = np.ascontiguousarray(s_group[:, :, None] if single else s_group, dtype=np.float64)
        n_ch = stack.shape[2]
        bounds = np.linspace(0, len(dm), self.threads + 1).astype(int)

        def work(k: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
            cov = np.zeros(grid.n_q * grid.n_e)
            sig = np.zeros((n_ch, grid.n_q * grid.n_e))
            rows = slice(bounds[k], bounds[k + 1])
            f.fold_samples(
                self.samples,
                dm,
                h_inf,
                cov,
                rows=rows,
                group=self.group,
                s_group=stack,
                signal=sig,
            )
            return cov, sig

        if self.threads == 1:
            parts = [work(0)]
        else:
            with ThreadPoolExecutor(self.threads) as pool:
                parts = list(pool.map(work, range(self.threads)))
        cov = np.sum([p[0] for p in parts], axis=0).reshape(grid.shape)
        sig = np.sum([p[1] for p in parts], axis=0).reshape(n_ch, *grid.shape)
        return cov[t.alias], (sig[0][t.alias] if single else sig[:, t.alias])


# -- powder and detector angles -----------------------------------------------------------


def accessible(
    q: NDArray[np.float64], energies: NDArray[np.float64], ei: float, ins: Instrument
) -> NDArray[np.bool_]:
    """(n_Q, n_E): |Q| reachable at E by some scattering angle the detector covers."""
    cos_tt = ins.directions[:, 2]
    lo, hi = float(cos_tt.min()), float(cos_tt.max())
    ki = float(energy_to_k(ei))
    kf = np.asarray(energy_to_k(np.maximum(ei - energies, 0.0)))[None, :]
    qq = np.asarray(q, dtype=float)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        c = (ki * ki + kf * kf - qq * qq) / (2 * ki * kf)
    return np.asarray((c >= lo) & (c <= hi) & (kf > 0))


def angle_bins(
    directions: NDArray[np.float64], step: float
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """In-plane angle bin edges (degrees) and the bin of every direction."""
    phi = np.degrees(np.arctan2(directions[:, 0], directions[:, 2]))
    lo = math.floor(float(phi.min()) / step) * step
    n = max(1, math.ceil((float(phi.max()) - lo) / step))
    if lo + n * step <= float(phi.max()):
        n += 1
    edges = np.asarray(lo + step * np.arange(n + 1), dtype=np.float64)
    idx = np.clip(((phi - lo) / step).astype(np.int64), 0, n - 1)
    return edges, idx
