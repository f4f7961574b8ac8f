"""Folding a powder sample's events into S(|Q|, E): no goniometer, no crystal axes.

Per event: (pixel, time of flight) -> final speed ``v_f = l2 / (tof - L1 / v_i)`` ->
``E = Ei - m v_f^2 / 2`` and ``k_f`` -> ``|Q|^2 = k_i^2 + k_f^2 - 2 k_i k_f cos(2 theta)``
with the pixel's scattering angle 2 theta -> (|Q|, E) bin of a
:class:`~simulations.lattice.grid.PowderGrid`. The exposure is, like a single crystal's,
``k_f/k_i dOmega dE`` (sr meV) of the detector cells that land in each bin
(:meth:`PowderFolder.coverage`), the same at every counting step, so that
counts / (proton charge x coverage) estimates S(|Q|, E) up to one constant and bins the
detector does not reach stay unmeasured (NaN).

:class:`PowderFolder` answers what :class:`consumers.reduction.pipeline.RunPipeline` asks of
a :class:`~consumers.reduction.folding.Folder` (``fold``, ``assign``, ``coverage``,
``signature``, ``grid``, ``instrument``, ``ei``), so that a powder run goes through the same
segmentation, accumulation, checkpoints and exports as a rotation run; the angle argument
is accepted and ignored. The drop reasons are those of
:data:`~consumers.reduction.folding.DROP_REASONS`, ``off_path`` meaning a |Q| outside the
grid.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numba
import numpy as np
from numpy.typing import NDArray

from consumers.exceptions import FoldError
from consumers.reduction import coverage_cache
from consumers.reduction.coverage_cache import read_coverage, recall, remember, write_coverage
from consumers.reduction.folding import DROP_REASONS
from simulations.instrument.spectrometer import Instrument, energy_to_speed
from simulations.lattice.grid import PowderGrid
from simulations.units import E_PER_K2, E_PER_V2, K_PER_V

__all__ = ["PowderFolder"]

#: Energy samples per bin and pixel stride of a powder coverage: every pixel, 8 energies a
#: bin (the coverage is computed once per run, so it can afford to be fine).
POWDER_E_SUBSTEPS = 8
POWDER_PIXEL_STRIDE = 1


@numba.njit(cache=True, nogil=True)
def _powder_fold_kernel(
    ids: np.ndarray,  # (n,) detector ids
    tof_ns: np.ndarray,  # (n,) int or float, ns
    id0: int,
    n_ids: int,
    lut: np.ndarray,  # (n_ids,) int32 id - id0 -> pixel row or -1, used when ``use_lut``
    use_lut: bool,
    pix: np.ndarray,  # (n_pix, 3) float64: E_PER_V2 l2^2 (meV s^2), K_PER_V l2 (1/A s), cos 2theta
    t_i: float,
    ei: float,
    ki: float,
    q0: float,
    inv_dq: float,
    e0: float,
    inv_de: float,
    n_q: int,
    n_e: int,
    hist: np.ndarray,  # (n_q * n_e,) float64
    dropped: np.ndarray,  # (4,) int64, in the order of DROP_REASONS
    assigned: np.ndarray,  # (n,) int64 bin iq * n_e + ie or -1 - reason, when ``record``
    record: bool,
) -> None:
    for i in range(ids.shape[0]):
        k = ids[i] - id0
        p = -1
        if k >= 0 and k < n_ids:
            p = lut[k] if use_lut else k
        reason = -1
        if p < 0:
            reason = 3
        else:
            t_f = tof_ns[i] * 1e-9 - t_i
            if not t_f > 0.0:
                reason = 2
            else:
                inv = 1.0 / t_f
                x = (ei - pix[p, 0] * inv * inv - e0) * inv_de
                if not (x >= 0.0 and x < n_e):
                    reason = 0
                else:
                    kf = pix[p, 1] * inv
                    q2 = ki * ki + kf * kf - 2.0 * ki * kf * pix[p, 2]
                    y = (math.sqrt(max(q2, 0.0)) - q0) * inv_dq
                    if not (y >= 0.0 and y < n_q):
                        reason = 1
                    else:
                        b = int(y) * n_e + int(x)
                        hist[b] += 1.0
                        if record:
                            assigned[i] = b
        if reason >= 0:
            dropped[reason] += 1
            if record:
                assigned[i] = -1 - reason


@numba.njit(cache=True, nogil=True)
def _powder_coverage_kernel(
    cos2t: np.ndarray,  # (n_pix,) cos 2theta of the sampled pixels
    solid: np.ndarray,  # (n_pix,) sr, times the stride
    kf: np.ndarray,  # (n_sub,) 1/A of each energy sample
    w_e: np.ndarray,  # (n_sub,) k_f/k_i dE, meV
    col: np.ndarray,  # (n_sub,) energy bin of each sample
    ki: float,
    q0: float,
    inv_dq: float,
    n_q: int,
    n_e: int,
    out: np.ndarray,  # (n_q * n_e,) float64
) -> None:
    for p in range(cos2t.shape[0]):
        c = cos2t[p]
        s = solid[p]
        for j in range(kf.shape[0]):
            q2 = ki * ki + kf[j] * kf[j] - 2.0 * ki * kf[j] * c
            y = (math.sqrt(max(q2, 0.0)) - q0) * inv_dq
            if y >= 0.0 and y < n_q:
                out[int(y) * n_e + col[j]] += s * w_e[j]


class PowderFolder:
    """Folds the events of one powder run (one instrument and Ei) into S(|Q|, E).

    Parameters
    ----------
    grid
        The (|Q|, E) grid (uniform bins).
    instrument
        The detector: pixel directions (the scattering angle), flight paths, solid angles.
    ei
        Incident energy, meV.
    """

    #: the sample kind this folder serves
    kind = "powder"

    def __init__(self, grid: PowderGrid, instrument: Instrument, ei: float) -> None:
        edges = grid.energy_edges
        if not (np.isfinite(ei) and ei > edges[-1]):
            raise FoldError(f"Ei = {ei} meV is not above the grid's top energy {edges[-1]} meV")
        self.grid = grid
        self.instrument = instrument
        self.ei = float(ei)
        self.orientation = None
        self._t_i = instrument.l1 / float(energy_to_speed(ei))
        self._ki = math.sqrt(ei / E_PER_K2)
        self._e0 = float(edges[0])
        self._de = float(edges[1] - edges[0])
        self._q0 = float(grid.q_edges[0])
        self._dq = float(grid.q_edges[1] - grid.q_edges[0])
        l2 = np.asarray(instrument.l2, dtype=np.float64)
        self._cos2t = np.ascontiguousarray(np.asarray(instrument.directions)[:, 2], dtype=float)
        self._pix = np.ascontiguousarray(
            np.stack([E_PER_V2 * l2**2, K_PER_V * l2, self._cos2t], axis=1)
        )
        ids = np.asarray(instrument.pixel_ids, dtype=np.int64)
        self._id0 = int(ids.min()) if len(ids) else 0
        span = int(ids.max()) - self._id0 + 1 if len(ids) else 0
        self._dense_ids = instrument.ids_consecutive or span <= max(4 * len(ids), 1 << 20)
        self._lut = np.zeros(0, dtype=np.int32)
        self._use_lut = False
        if not instrument.ids_consecutive and self._dense_ids:
            self._lut = np.full(span, -1, dtype=np.int32)
            self._lut[ids - self._id0] = np.arange(len(ids), dtype=np.int32)
            self._use_lut = True
        self._n_ids = span
        self._signature: str | None = None

    @property
    def signature(self) -> str:
        """Digest of everything the coverage depends on (grid, detector, Ei, this code)."""
        if self._signature is None:
            h = hashlib.blake2b(digest_size=16)
            for module in (__file__, coverage_cache.__file__):
                h.update(Path(str(module)).read_bytes())
            for a in (
                self.grid.q_edges,
                self.grid.energy_edges,
                self._pix,
                self.instrument.solid_angles,
                np.array([self.ei, self.instrument.l1], dtype=float),
            ):
                h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
            self._signature = "powder-" + h.hexdigest()
        return self._signature

    def pixel_index(self, pixel_id: NDArray[np.integer]) -> NDArray[np.int64]:
        """Row index of detector ids; -1 for ids the instrument does not have."""
        return self.instrument.pixel_rows(pixel_id)

    def _kernel(
        self,
        ids: NDArray[np.integer],
        tof_ns: NDArray[np.number],
        hist: NDArray[np.float64],
        assigned: NDArray[np.int64] | None = None,
    ) -> NDArray[np.int64]:
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise FoldError(f"pixel ids must be integers, got {ids.dtype}")
        if ids.dtype == np.uint64:  # numba would mix it with int64 into float64
            ids = np.where(ids < 2**63, ids, np.uint64(2**63 - 1)).astype(np.int64)
        tof = np.asarray(tof_ns)
        if tof.dtype.kind not in "iuf":
            raise FoldError(f"times of flight must be numbers, got {tof.dtype}")
        if len(ids) != len(tof):
            raise FoldError(f"{len(ids)} pixel ids for {len(tof)} times of flight")
        id0, n_ids, lut, use_lut = self._id0, self._n_ids, self._lut, self._use_lut
        if not self._dense_ids:  # ids spread too widely for a dense table
            ids, id0, n_ids, use_lut = self.pixel_index(ids), 0, self.instrument.n_pixels, False
        dropped = np.zeros(len(DROP_REASONS), dtype=np.int64)
        _powder_fold_kernel(
            ids,
            tof,
            id0,
            n_ids,
            lut,
            use_lut,
            self._pix,
            self._t_i,
            self.ei,
            self._ki,
            self._q0,
            1.0 / self._dq,
            self._e0,
            1.0 / self._de,
            self.grid.n_q,
            self.grid.n_e,
            hist,
            dropped,
            np.zeros(0, dtype=np.int64) if assigned is None else assigned,
            assigned is not None,
        )
        return dropped

    def fold(
        self,
        pixel_id: NDArray[np.integer],
        tof_ns: NDArray[np.number],
        omega: float = 0.0,
        counts: NDArray[np.float64] | None = None,
    ) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
        """Fold events: ``pixel_id`` (n,) integer detector ids, ``tof_ns`` (n,) times of
        flight in ns. ``omega`` is ignored (a powder has no orientation). Returns
        ``(counts, dropped)``: (n_Q, n_E) float64 counts (``counts`` is added to in place
        when given) and (4,) int64 dropped events per
        :data:`~consumers.reduction.folding.DROP_REASONS`."""
        out = np.zeros(self.grid.shape) if counts is None else counts
        hist = np.zeros(self.grid.n_q * self.grid.n_e)
        dropped = self._kernel(pixel_id, tof_ns, hist)
        out += hist.reshape(self.grid.shape)
        return out, dropped

    def assign(
        self, pixel_id: NDArray[np.integer], tof_ns: NDArray[np.number], omega: float = 0.0
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Per-event (|Q| index, E index) as folded; -1 for events not folded."""
        assigned = np.empty(len(tof_ns), dtype=np.int64)
        self._kernel(pixel_id, tof_ns, np.zeros(self.grid.n_q * self.grid.n_e), assigned)
        ok = assigned >= 0
        return (
            np.where(ok, assigned // self.grid.n_e, -1),
            np.where(ok, assigned % self.grid.n_e, -1),
        )

    def coverage(
        self,
        omega: float = 0.0,
        *,
        e_substeps: int = POWDER_E_SUBSTEPS,
        pixel_stride: int = POWDER_PIXEL_STRIDE,
        cache: bool = True,
    ) -> NDArray[np.float64]:
        """(n_Q, n_E) float: sum of k_f/k_i dOmega dE (sr meV) over the detector cells that
        fold into each bin, the same at every step (``omega`` is ignored).

        Every ``pixel_stride``-th pixel (weighted by the stride) at ``e_substeps`` energies
        per bin (midpoint rule). Cached in memory and on disk like a single crystal's
        coverage (:mod:`consumers.reduction.coverage_cache`), keyed by :attr:`signature`
        and the sampling; a copy is returned.
        """
        if e_substeps < 1 or pixel_stride < 1:
            raise FoldError(
                f"need e_substeps and pixel_stride >= 1, got {e_substeps}, {pixel_stride}"
            )
        key = (self.signature, 0.0, int(e_substeps), int(pixel_stride))
        if cache:
            hit = recall(key)
            if hit is not None:
                return hit
            stored = read_coverage(key, self.grid.shape)
            if stored is not None:
                remember(key, stored)
                return stored
        energies, de = self._energy_samples(e_substeps)
        solid = np.asarray(self.instrument.solid_angles, dtype=float)
        out = self._fold_samples(
            solid, np.sqrt((self.ei - energies) / self.ei) * de, e_substeps, pixel_stride
        )
        if cache:
            remember(key, out)
            write_coverage(key, out)
        return out.copy()

    def flat_background(
        self, *, e_substeps: int = POWDER_E_SUBSTEPS, pixel_stride: int = POWDER_PIXEL_STRIDE
    ) -> NDArray[np.float64]:
        """(n_Q, n_E) float: the share of a background flat in time of flight that folds into
        each bin: events on each pixel in proportion to its solid angle, their flight times
        uniform between those of final energies 1.5 Ei and 0.05 Ei (as the simulator draws
        its flat background), so that a pixel's events per meV are
        ``1 / (2 E_f v_f (1 / v(0.05 Ei) - 1 / v(1.5 Ei)))`` (its flight path cancels).
        The sum over the grid is the share that lands in it (< 1)."""
        energies, de = self._energy_samples(e_substeps)
        e_f = np.maximum(self.ei - energies, 1e-12)
        v_f = np.asarray(energy_to_speed(e_f), dtype=float)
        span = 1.0 / float(energy_to_speed(0.05 * self.ei)) - 1.0 / float(
            energy_to_speed(1.5 * self.ei)
        )
        inside = (e_f >= 0.05 * self.ei) & (e_f <= 1.5 * self.ei)
        per_mev = np.where(inside, 1.0 / (2.0 * e_f * v_f * span), 0.0)
        solid = np.asarray(self.instrument.solid_angles, dtype=float)
        return self._fold_samples(solid / solid.sum(), per_mev * de, e_substeps, pixel_stride)

    def _energy_samples(self, e_substeps: int) -> tuple[NDArray[np.float64], float]:
        """(energy transfers of the samples (n_E e_substeps,) meV, their width meV):
        ``e_substeps`` midpoints per bin."""
        de = self._de / e_substeps
        k = np.arange(self.grid.n_e * e_substeps, dtype=np.float64)
        return np.asarray(self._e0 + (k + 0.5) * de, dtype=np.float64), de

    def _fold_samples(
        self,
        pixel_weight: NDArray[np.float64],
        sample_weight: NDArray[np.float64],
        e_substeps: int,
        pixel_stride: int,
    ) -> NDArray[np.float64]:
        """(n_Q, n_E) sum of ``pixel_weight`` (n_pix,) x ``sample_weight`` (one per
        :meth:`_energy_samples`) over every ``pixel_stride``-th pixel (weighted by the
        stride) and energy sample, each in the bin of its |Q| and energy."""
        energies, _ = self._energy_samples(e_substeps)
        pix = np.arange(0, self.instrument.n_pixels, pixel_stride)
        hist = np.zeros(self.grid.n_q * self.grid.n_e)
        _powder_coverage_kernel(
            np.ascontiguousarray(self._cos2t[pix]),
            np.ascontiguousarray(pixel_weight[pix] * pixel_stride, dtype=float),
            np.sqrt(np.maximum(self.ei - energies, 0.0) / E_PER_K2),
            np.ascontiguousarray(sample_weight, dtype=float),
            np.arange(len(energies), dtype=np.int64) // e_substeps,
            self._ki,
            self._q0,
            1.0 / self._dq,
            self.grid.n_q,
            self.grid.n_e,
            hist,
        )
        return hist.reshape(self.grid.shape)

    def on_disk(
        self,
        omega: float = 0.0,
        *,
        e_substeps: int = POWDER_E_SUBSTEPS,
        pixel_stride: int = POWDER_PIXEL_STRIDE,
    ) -> bool:
        """Whether the disk cache holds this set-up's coverage."""
        key = (self.signature, 0.0, int(e_substeps), int(pixel_stride))
        return read_coverage(key, self.grid.shape) is not None
