"""Folding neutron events into the symmetrized spectrum I(q, E) with a lookup table.

Per event: (pixel, time of flight) -> (Q_lab, E) -> Q in primitive r.l.u. at the
orientation's omega -> fractional coordinates modulo 1 (exact by periodicity) -> a voxel of
a fine grid of the reciprocal cell -> the few q-path *star* points (every path point under
every point-group operation and time reversal, with periodic images) that can be the
nearest one for any Q inside that voxel -> the exact nearest of them; kept if it lies
within ``tolerance`` (1/Angstrom) -> (q, E) bin.

Mapping into the first zone and the irreducible wedge and then taking the nearest path
point is the same as taking the nearest point of the path's star over all periodic
images: point-group operations and lattice translations preserve distances. The voxel
candidate lists make this O(1) per event and *exact*: for a voxel with centre c and
half-diagonal r, the nearest star point of any Q in the voxel lies within
``d_min(c) + 2 r`` of c, so those star points are its candidates; voxels farther than
``tolerance + r`` from every star point have none. The result therefore equals the
brute-force :class:`simulations.instrument.binning.ReferenceBinning` up to floating-point ties and
the float32 rounding of the per-pixel constants (:meth:`Folder.pixel_table`), which can
move only events within about 1e-6 r.l.u. or 5e-6 meV of a boundary (none of the 1e6
events of the test against the brute force).

The table is :mod:`consumers.reduction.table`; the fused per-event loop and the coverage
loop are compiled with numba (:mod:`consumers.reduction.kernels`; see the benchmark in
``tests/benchmarks/bench_fold.py``); coverages are cached by
:mod:`consumers.reduction.coverage_cache`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from consumers.exceptions import FoldError
from consumers.reduction import coverage_cache, kernels
from consumers.reduction import table as fold_table
from consumers.reduction.coverage_cache import (
    CoverageKey,
    read_coverage,
    recall,
    remember,
    write_coverage,
)
from consumers.reduction.kernels import coverage_kernel, fold_kernel
from consumers.reduction.table import FoldTable
from simulations.instrument.spectrometer import Instrument, Orientation, energy_to_speed
from simulations.lattice.grid import Grid, ZoneClasses
from simulations.units import E_PER_K2, E_PER_V2, K_PER_V

logger = logging.getLogger(__name__)

__all__ = ["DROP_REASONS", "CoverageSamples", "Folder"]

#: Reasons an event is not folded, in the order of :attr:`Folder.dropped`.
DROP_REASONS = ("energy_out_of_range", "off_path", "bad_time_of_flight", "unknown_pixel")

_NO_ASSIGN = np.zeros(0, dtype=np.int64)
_NO_LUT = np.zeros(0, dtype=np.int32)

_MODULE_DIGEST: bytes | None = None


def _module_digest() -> bytes:
    """Digest of the source of every module a coverage's values depend on (this one, the
    kernels, the fold table and the coverage cache): a changed coverage or fold algorithm
    never reads the coverages an old one wrote."""
    global _MODULE_DIGEST
    if _MODULE_DIGEST is None:
        h = hashlib.blake2b(digest_size=16)
        for module in (__file__, kernels.__file__, fold_table.__file__, coverage_cache.__file__):
            h.update(Path(str(module)).read_bytes())
        _MODULE_DIGEST = h.digest()
    return _MODULE_DIGEST


@dataclass(frozen=True, slots=True, kw_only=True)
class CoverageSamples:
    """The (pixel, energy) samples of a coverage (:meth:`Folder.coverage_samples`).

    Attributes
    ----------
    pixels
        (n_pix,) int64 rows of the sampled pixels.
    solid
        (n_pix,) float64 solid angle of each sampled pixel times the pixel stride, sr.
    v_f
        (n_sub,) float64 final speed of each energy sample, m/s (falling with the sample).
    w_e
        (n_sub,) float64 ``k_f/k_i dE`` of each energy sample, meV.
    col
        (n_sub,) int64 energy bin of each sample.
    """

    pixels: NDArray[np.int64]
    solid: NDArray[np.float64]
    v_f: NDArray[np.float64]
    w_e: NDArray[np.float64]
    col: NDArray[np.int64]


class Folder:
    """Folds events of one run (one instrument, crystal mounting and Ei) into I(q, E).

    Parameters
    ----------
    table
        The lookup table for the material's grid.
    grid
        The (q, E) grid (uniform energy bins).
    instrument, orientation
        Geometry and UB of the run.
    ei
        Incident energy, meV.
    """

    def __init__(
        self,
        table: FoldTable,
        grid: Grid,
        instrument: Instrument,
        orientation: Orientation,
        ei: float,
    ) -> None:
        edges = grid.energy_edges
        if not np.allclose(np.diff(edges), edges[1] - edges[0]):
            raise FoldError("the fold kernel needs uniform energy bins")
        if not ei > edges[-1]:
            raise FoldError(f"Ei = {ei} meV is below the grid's top energy {edges[-1]} meV")
        self.table = table
        self.grid = grid
        self.instrument = instrument
        self.orientation = orientation
        self.ei = float(ei)
        self._l2 = np.ascontiguousarray(instrument.l2)
        self._dirs = np.ascontiguousarray(instrument.directions)
        self._t_i = instrument.l1 / float(energy_to_speed(ei))
        self._ki = math.sqrt(ei / E_PER_K2)
        self._e0 = float(edges[0])
        self._de = float(edges[1] - edges[0])
        # detector id -> pixel row inside the kernel: an offset for a regular array, else a
        # dense table over the id range (ids spread too widely are looked up beforehand)
        ids = np.asarray(instrument.pixel_ids, dtype=np.int64)
        self._id0 = int(ids.min()) if len(ids) else 0
        span = int(ids.max()) - self._id0 + 1 if len(ids) else 0
        self._lut: NDArray[np.int32] | None = None
        offsets = instrument.ids_consecutive
        self._dense_ids = offsets or span <= max(4 * len(ids), 1 << 20)
        if not offsets and self._dense_ids:
            self._lut = np.full(span, -1, dtype=np.int32)
            self._lut[ids - self._id0] = np.arange(len(ids), dtype=np.int32)
        self._n_ids = span
        self._pixel_tables: dict[float, tuple[NDArray[np.float32], NDArray[np.float64]]] = {}
        self._signature: str | None = None

    @property
    def signature(self) -> str:
        """Digest of everything a coverage depends on (the table, the grid's energy bins,
        the detector, the UB, Ei, and the reduction code that computes it): equal
        signatures give equal coverages."""
        if self._signature is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(_module_digest())
            for f in fields(self.table):
                h.update(f.name.encode())
                h.update(np.ascontiguousarray(getattr(self.table, f.name)).tobytes())
            for a in (
                self.grid.energy_edges,
                self._dirs,
                self.instrument.solid_angles,
                np.asarray(self.orientation.lab_to_rlu_matrix(0.0)),
                np.array([self.ei, self.grid.n_q, self.grid.n_e], dtype=float),
            ):
                h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
            self._signature = h.hexdigest()
        return self._signature

    def pixel_index(self, pixel_id: NDArray[np.integer]) -> NDArray[np.int64]:
        """Row index of detector ids; -1 for ids the instrument does not have."""
        return self.instrument.pixel_rows(pixel_id)

    def pixel_table(self, omega: float) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
        """Per-pixel constants of the kernel at goniometer angle ``omega`` (degrees).

        Returns ``(pix, h_inf)``: pix (n_pixels, 4) holds ``E_PER_V2 l2^2`` (meV s^2) and
        ``K_PER_V l2 M d`` (r.l.u. s) for the unit direction d of each pixel and the lab ->
        r.l.u. matrix M, so that an event with final flight time t_f has
        ``E = Ei - pix[:, 0] / t_f^2`` and ``Q = h_inf - pix[:, 1:] / t_f`` (r.l.u.), with
        ``h_inf = M k_i``. Cached for the last few angles.

        ``pix`` is float32 (the kernel computes in float64): 16 bytes a pixel keep the
        table of an ARCS-sized detector (1.6 MB) in the caches, which makes the kernel
        faster by a tenth to a half here. Its rounding (relative 6e-8: 5e-6 meV in E,
        about 1e-6 r.l.u. in Q) moves only events that close to a bin or tolerance
        boundary; the test against the brute force bounds them.
        """
        key = float(omega)
        hit = self._pixel_tables.get(key)
        if hit is not None:
            return hit
        m = np.asarray(self.orientation.lab_to_rlu_matrix(omega), dtype=np.float64)
        pix = np.empty((self.instrument.n_pixels, 4), dtype=np.float32)
        pix[:, 0] = E_PER_V2 * self._l2**2
        pix[:, 1:] = (K_PER_V * self._l2)[:, None] * (self._dirs @ m.T)
        h_inf = np.ascontiguousarray(m @ np.array([0.0, 0.0, self._ki]))
        if len(self._pixel_tables) >= 4:
            self._pixel_tables.pop(next(iter(self._pixel_tables)))
        self._pixel_tables[key] = (pix, h_inf)
        return pix, h_inf

    def _kernel(
        self,
        ids: NDArray[np.integer],
        tof_ns: NDArray[np.number],
        omega: float,
        hist: NDArray[np.float64],
        *,
        dropped: NDArray[np.int64] | None = None,
        assigned: NDArray[np.int64] | None = None,
    ) -> NDArray[np.int64]:
        """Run the fold kernel; ``hist`` is the padded ((n_q + 1) * (n_E + 1),) histogram.

        ``ids`` are detector ids. Returns the drop counts.
        """
        if dropped is None:
            dropped = np.zeros(len(DROP_REASONS), dtype=np.int64)
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise FoldError(f"pixel ids must be integers, got {ids.dtype}")
        if ids.dtype == np.uint64:  # numba would mix it with int64 into float64
            ids = np.where(ids < 2**63, ids, np.uint64(2**63 - 1)).astype(np.int64)
        if self._dense_ids:
            id0, n_ids, lut = self._id0, self._n_ids, self._lut
        else:  # ids spread too widely for a dense table: look them up beforehand
            ids, id0, n_ids, lut = self.pixel_index(ids), 0, self.instrument.n_pixels, None
        tof = np.asarray(tof_ns)
        if tof.dtype.kind not in "iuf":
            raise FoldError(f"times of flight must be numbers, got {tof.dtype}")
        pix, h_inf = self.pixel_table(omega)
        t = self.table
        fold_kernel(
            ids,
            tof,
            id0,
            n_ids,
            _NO_LUT if lut is None else lut,
            lut is not None,
            pix,
            self._t_i,
            self.ei,
            h_inf,
            t.voxels,
            t.live,
            t.rank,
            t.offsets,
            t.candidates,
            t.star_xyz,
            t.star_index,
            t.reciprocal,
            t.tolerance**2,
            self._e0,
            1.0 / self._de,
            self.grid.n_q,
            self.grid.n_e,
            hist,
            dropped,
            _NO_ASSIGN if assigned is None else assigned,
            assigned is not None,
        )
        return dropped

    def _hist(self) -> NDArray[np.float64]:
        """A zeroed padded histogram for :meth:`_kernel`."""
        return np.zeros((self.grid.n_q + 1) * (self.grid.n_e + 1))

    def _unpad(self, hist: NDArray[np.float64]) -> NDArray[np.float64]:
        """(n_q, n_E) view of a padded histogram, without the drop row and column."""
        return hist.reshape(self.grid.n_q + 1, self.grid.n_e + 1)[:-1, :-1]

    def fold(
        self,
        pixel_id: NDArray[np.integer],
        tof_ns: NDArray[np.number],
        omega: float,
        counts: NDArray[np.float64] | None = None,
    ) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
        """Fold events taken at goniometer angle ``omega`` (degrees).

        ``pixel_id`` (n,) integer detector ids, ``tof_ns`` (n,) times of flight in ns
        (integer or float). Returns ``(counts, dropped)``: (n_q, n_E) float64 counts
        (``counts`` is added to in place when given) and (4,) int64 dropped events per
        :data:`DROP_REASONS`.
        """
        if not np.isfinite(omega):
            raise FoldError(f"goniometer angle must be finite, got {omega}")
        out = np.zeros(self.grid.shape) if counts is None else counts
        hist = self._hist()
        dropped = self._kernel(pixel_id, tof_ns, omega, hist)
        out += self._unpad(hist)
        out[:] = out[self.table.alias]
        return out, dropped

    def assign(
        self, pixel_id: NDArray[np.integer], tof_ns: NDArray[np.number], omega: float
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Per-event (q index, E index) as folded; -1 for events not folded.

        The q index is the canonical one (see :attr:`FoldTable.alias`).
        """
        assigned = np.empty(len(tof_ns), dtype=np.int64)
        self._kernel(pixel_id, tof_ns, omega, self._hist(), assigned=assigned)
        ok = assigned >= 0
        return (
            np.where(ok, assigned // self.grid.n_e, -1),
            np.where(ok, assigned % self.grid.n_e, -1),
        )

    def fold_classes(
        self,
        pixel_id: NDArray[np.integer],
        tof_ns: NDArray[np.number],
        omega: float,
        classes: ZoneClasses,
        inverse_ops: NDArray[np.float64],
        counts: NDArray[np.float64] | None = None,
    ) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
        """:meth:`fold`, each event's bin split by the structure-factor class of its zone.

        The class is that of ``G'``, the reciprocal lattice vector of the event's Q taken
        back into its path point's frame (``Q R^-1`` with R the star operation of the
        star point it folds to; ``inverse_ops`` from
        :func:`consumers.reduction.moments.star_operations`), as the moments take it
        (:func:`~consumers.reduction.moments.orientation_moments` with ``classes``).
        Returns ``(counts, dropped)``: (n_q * n_classes, n_E) float64 counts on the grid
        of :func:`~simulations.lattice.grid.make_class_grid` (alias rows filled; added to
        ``counts`` in place when given), and the drops of :meth:`fold`. Their sum over the
        classes is :meth:`fold`'s counts.
        """
        if not np.isfinite(omega):
            raise FoldError(f"goniometer angle must be finite, got {omega}")
        n = classes.n_classes
        n_q, n_e = self.grid.shape
        shape = (n_q * n, n_e)
        if counts is not None and counts.shape != shape:
            raise FoldError(f"counts of shape {counts.shape}, the class grid is {shape}")
        out = np.zeros(shape) if counts is None else counts
        ids = np.asarray(pixel_id)
        tof = np.asarray(tof_ns)
        assigned = np.empty(len(tof), dtype=np.int64)
        dropped = self._kernel(ids, tof, omega, self._hist(), assigned=assigned)
        ok = np.nonzero(assigned >= 0)[0]
        pix, h_inf = self.pixel_table(omega)
        p = self.pixel_index(ids[ok])
        inv = 1.0 / (tof[ok] * 1e-9 - self._t_i)
        h = h_inf[None, :] - inv[:, None] * pix[p, 1:].astype(np.float64)
        t = self.table
        rows = np.empty(len(ok), dtype=np.int64)
        kernels.star_rows_kernel(
            np.ascontiguousarray(h),
            t.voxels,
            t.live,
            t.rank,
            t.offsets,
            t.candidates,
            t.star_xyz,
            t.reciprocal,
            t.tolerance**2,
            rows,
        )
        b = assigned[ok]
        iq, ie = b // n_e, b % n_e
        found = rows >= 0
        odd = int(np.count_nonzero(~found | (t.star_index[np.maximum(rows, 0)] != iq)))
        if odd:  # a rounding apart from the fold kernel's search: not seen, but not lost
            logger.warning(
                "omega %s: %d of %d events folded to another star point on the class "
                "search; counted in class 0",
                omega,
                odd,
                len(ok),
            )
        cls = np.where(
            found, self.zone_class_of(h, np.maximum(rows, 0), iq, classes, inverse_ops), 0
        )
        hist = np.bincount((iq * n + cls) * n_e + ie, minlength=n_q * n * n_e)
        out += hist.reshape(shape)
        out[:] = out[classes.expand(t.alias)]
        return out, dropped

    def zone_class_of(
        self,
        h: NDArray[np.float64],
        rows: NDArray[np.integer],
        iq: NDArray[np.integer],
        classes: ZoneClasses,
        inverse_ops: NDArray[np.float64],
    ) -> NDArray[np.int64]:
        """(n,) the structure-factor class of each Q ``h`` ((n, 3) r.l.u. of the lab) folded
        to star point ``rows`` of path point ``iq``: the class of ``G'`` with ``h R^-1 =
        q_path + G' + delta`` (R the star point's operation, ``inverse_ops`` from
        :func:`consumers.reduction.moments.star_operations`), as the moments' kernel takes
        it."""
        rotated = np.einsum("na,nab->nb", h, inverse_ops[rows])
        g = np.floor(rotated - self.grid.qpath.qpoints[iq] + 0.5).astype(np.int64)
        return np.asarray(classes.of(g), dtype=np.int64)

    def coverage(
        self, omega: float, *, e_substeps: int = 4, pixel_stride: int = 2, cache: bool = True
    ) -> NDArray[np.float64]:
        """(n_q, n_E) float: sum of k_f/k_i dOmega dE over detector cells folded into each bin.

        Units sr meV. Exposure = proton charge x coverage, so that counts / exposure
        estimates S(q, E) up to a constant for any orientation. Every ``pixel_stride``-th
        pixel (weighted by the stride) is sampled at ``e_substeps`` energies per bin
        (midpoint rule) by a fused kernel. Against every pixel at 16
        energies per bin, the default is off by a median 1.8 % per bin (90th percentile
        5 %) for one orientation; the error is in the energy sampling of the tube crossings
        and averages down over orientations. Thread-safe (it holds no state), and the
        kernel releases the GIL, so that it runs beside the consumer's Python work.

        Coverages are cached (:mod:`consumers.reduction.coverage_cache`), keyed by
        :attr:`signature` (which includes the reduction code), angle and sampling: in memory
        for the process (the last ``COVERAGE_CACHE_SIZE``), so that the service computes
        each angle once for the advisor's candidates and the consumer's exposure, and on
        disk under ``coverage_cache_dir()`` (bounded by ``$STEER_COVERAGE_CACHE_MB``,
        default ``COVERAGE_DISK_MB``), so that a coverage depends only on the set-up and is
        computed once per machine, like the fold table: the next run of a set-up, a
        restarted consumer, ``steer fold`` of a recorded run, or every run after
        ``steer coverage`` read it (1 ms against 0.3 s). The files hold the float64 values
        as computed, so a read gives bitwise the same exposure. A file that cannot be read
        or does not fit is recomputed and rewritten; one that cannot be written is only
        logged. ``cache=False`` computes afresh and touches neither (benchmarks). A copy
        is returned.
        """
        omega = float(omega)
        if not np.isfinite(omega):
            raise FoldError(f"goniometer angle must be finite, got {omega}")
        key = self._coverage_key(omega, e_substeps, pixel_stride)
        if cache:
            hit = recall(key)
            if hit is not None:
                return hit
            stored = read_coverage(key, self.grid.shape)
            if stored is not None:
                remember(key, stored)
                return stored
        samples = self.coverage_samples(e_substeps=e_substeps, pixel_stride=pixel_stride)
        dm, h_inf = self.sample_rays(samples, omega)
        hist = np.zeros(self.grid.n_q * self.grid.n_e)
        self.fold_samples(samples, dm, h_inf, hist)
        out = np.asarray(hist.reshape(self.grid.shape)[self.table.alias])
        if cache:
            remember(key, out)
            write_coverage(key, out)
        return out

    def coverage_samples(self, *, e_substeps: int = 4, pixel_stride: int = 2) -> CoverageSamples:
        """The (pixel, energy) samples of :meth:`coverage`: every ``pixel_stride``-th pixel
        (weighted by the stride) at ``e_substeps`` energies per bin (midpoint rule)."""
        n_sub = self.grid.n_e * e_substeps
        de = self._de / e_substeps
        energies = self._e0 + (np.arange(n_sub) + 0.5) * de
        pix = np.arange(0, self.instrument.n_pixels, pixel_stride)
        return CoverageSamples(
            pixels=pix,
            solid=np.ascontiguousarray(self.instrument.solid_angles[pix] * pixel_stride),
            v_f=np.asarray(energy_to_speed(np.asarray(self.ei - energies, dtype=np.float64))),
            w_e=np.sqrt((self.ei - energies) / self.ei) * de,
            col=np.arange(n_sub, dtype=np.int64) // e_substeps,
        )

    def sample_rays(
        self, samples: CoverageSamples, omega: float
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """The sampled pixels' trajectories at goniometer angle ``omega`` (degrees).

        Returns ``(dm, h_inf)``: dm (n_pix, 3) float64 ``K_PER_V M d`` (r.l.u. per m/s) of
        each sampled pixel's unit direction d and the lab -> r.l.u. matrix M, and h_inf (3,)
        float64 ``M k_i`` (r.l.u.), so that a sample of final speed v_f lies at
        ``Q = h_inf - v_f dm`` (r.l.u.).
        """
        m = np.asarray(self.orientation.lab_to_rlu_matrix(omega), dtype=np.float64)
        dm = np.ascontiguousarray(K_PER_V * (self._dirs[samples.pixels] @ m.T))
        h_inf = np.ascontiguousarray(m @ np.array([0.0, 0.0, self._ki]))
        return dm, h_inf

    def fold_samples(
        self,
        samples: CoverageSamples,
        dm: NDArray[np.float64],
        h_inf: NDArray[np.float64],
        coverage: NDArray[np.float64],
        *,
        rows: slice = slice(None),
        group: NDArray[np.int64] | None = None,
        s_group: NDArray[np.float64] | None = None,
        signal: NDArray[np.float64] | None = None,
    ) -> int:
        """Fold the samples of one orientation (:meth:`sample_rays`) with their weights.

        Adds every folded sample's weight (sr meV) to ``coverage``, the (n_q * n_E,)
        float64 histogram before alias expansion (:attr:`FoldTable.alias`). ``rows``
        limits it to those sampled pixels (rows of ``dm``), so that threads can share an
        orientation. With ``signal``, each sample's weight times
        ``s_group[group[pixel], bin]`` is added to ``signal`` as well (``group``: (n_pix,)
        int64 row of ``s_group``, (n_groups, n_E) float64, of every sampled pixel; or
        several channels at once: ``s_group`` (n_groups, n_E, n_ch) and ``signal``
        (n_ch, n_q * n_E)). Runs without the GIL; returns the number of samples computed.
        """
        t = self.table
        args = (
            dm[rows],
            samples.solid[rows],
            samples.v_f,
            samples.w_e,
            samples.col,
            h_inf,
            t.voxels,
            t.live,
            t.rank,
            t.offsets,
            t.candidates,
            t.star_xyz,
            t.star_index,
            t.reciprocal,
            t.tolerance**2,
            self.grid.n_q,
            self.grid.n_e,
            t.clear,
            coverage,
        )
        if signal is None:
            return int(coverage_kernel(*args))
        if group is None or s_group is None:
            raise FoldError("folding a signal needs the pixels' groups and the groups' signal")
        if s_group.ndim == 2:  # one channel
            s_group, signal = s_group[:, :, None], signal[None, :]
        if s_group.ndim != 3 or signal.shape != (s_group.shape[2], self.grid.n_q * self.grid.n_e):
            raise FoldError(
                f"signals of shape {s_group.shape} cannot fill a histogram of {signal.shape}"
            )
        return int(coverage_kernel(*args, True, group[rows], np.ascontiguousarray(s_group), signal))

    def on_disk(self, omega: float, *, e_substeps: int = 4, pixel_stride: int = 2) -> bool:
        """Whether the disk cache holds a usable coverage of this set-up at ``omega``."""
        key = self._coverage_key(omega, e_substeps, pixel_stride)
        return read_coverage(key, self.grid.shape) is not None

    def _coverage_key(self, omega: float, e_substeps: int, pixel_stride: int) -> CoverageKey:
        """Key of a coverage in both caches: set-up, angle and sampling."""
        return (self.signature, float(omega), int(e_substeps), int(pixel_stride))
