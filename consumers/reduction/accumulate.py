"""Accumulators of folded counts and exposure, per orientation and for the whole run.

``I = counts / exposure`` with exposure = weight x coverage (sr meV, from the instrument
model), so intensities of different orientations are comparable; bins that no orientation
measured are masked (NaN), never zero. The weight (:data:`NORMALISATIONS`) is the
orientation's proton charge (uC; the default: I in 1/(uC sr meV)) or its counts in one beam
monitor (``"monitor"``: I in counts per monitor count, 1/(sr meV)); both are recorded per
orientation whichever is used. Variance from Poisson counts:
``var(I) = counts / exposure^2`` (an empty but measured bin gets ``1 / exposure^2``, the
variance of one count, so that it is not taken as exact).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from consumers.exceptions import FoldError
from consumers.reduction.moments import BinMoments, MomentsRing
from simulations.lattice.grid import Grid, PowderGrid

logger = logging.getLogger(__name__)

__all__ = ["NORMALISATIONS", "OrientationRecord", "RunAccumulator", "Snapshot"]

#: What an orientation's exposure is weighted by: its proton charge (uC) or its counts in
#: one beam monitor.
NORMALISATIONS = ("proton_charge", "monitor")


@dataclass(frozen=True, slots=True, kw_only=True)
class OrientationRecord:
    """One completed orientation.

    Attributes
    ----------
    index
        0-based order in which it was completed.
    omega
        Goniometer angle, degrees.
    proton_charge
        uC over the counting window.
    events, folded
        Events in the window and events that landed in a (q, E) bin.
    dropped
        Events not folded, per reason.
    monitor_counts
        Beam-monitor events over the counting window, per monitor source.
    monitor_incomplete
        Monitor sources whose stream stopped before the window's end (their counts are
        partial or missing).
    weight
        What the exposure was weighted by: ``proton_charge`` (uC) or the chosen monitor's
        counts, per the run's normalisation; None for a record from before it was kept.
    normalised
        False when the run is normalised by a monitor whose counts this orientation lacks
        and no complete orientation gave a monitor-per-charge ratio to estimate them: its
        counts and exposure are kept per orientation but left out of the run's total.
    """

    index: int
    omega: float
    proton_charge: float
    events: int
    folded: int
    dropped: dict[str, int]
    monitor_counts: dict[str, int] = field(default_factory=dict)
    monitor_incomplete: tuple[str, ...] = ()
    weight: float | None = None
    normalised: bool = True

    @property
    def monitor_total(self) -> int:
        """Events of every monitor over the window."""
        return int(sum(self.monitor_counts.values()))

    def to_json(self) -> dict[str, Any]:
        """JSON-ready fields (checkpoints, summaries)."""
        return {
            "omega": self.omega,
            "proton_charge": self.proton_charge,
            "events": self.events,
            "folded": self.folded,
            "dropped": self.dropped,
            "monitor_counts": self.monitor_counts,
            "monitor_total": self.monitor_total,
            "monitor_incomplete": list(self.monitor_incomplete),
            "weight": self.weight,
            "normalised": self.normalised,
        }

    @classmethod
    def from_json(cls, index: int, js: dict[str, Any]) -> OrientationRecord:
        """The record of :meth:`to_json` (``index``: its place in the run; the monitor and
        normalisation fields default for a checkpoint from before they were kept)."""
        return cls(
            index=index,
            omega=js["omega"],
            proton_charge=js["proton_charge"],
            events=js["events"],
            folded=js["folded"],
            dropped=js["dropped"],
            monitor_counts=dict(js.get("monitor_counts", {})),
            monitor_incomplete=tuple(js.get("monitor_incomplete", ())),
            weight=js.get("weight"),
            normalised=bool(js.get("normalised", True)),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """The folded spectrum at one moment.

    Attributes
    ----------
    intensity
        (n_q, n_E) float: counts / exposure (1 / (uC sr meV)); NaN where unmeasured.
    variance
        (n_q, n_E) float: Poisson variance of ``intensity``; NaN where unmeasured.
    counts, exposure
        (n_q, n_E) float.
    mask
        (n_q, n_E) bool: True where measured (exposure > 0).
    n_orientations
        Orientations folded so far.
    moments
        The per-bin moments of the folded cells (:mod:`consumers.reduction.moments`),
        summed like the exposure, for the likelihood refinement; None when the run's
        material has no reference force constants to take them with. On the grid of
        ``class_counts`` when the run is split by zone class.
    class_counts
        (n_q * n_classes, n_E) float: the counts split by the zone class of each event's
        Brillouin zone (:func:`~simulations.lattice.grid.make_class_grid`'s rows, ``q *
        n_classes + class``), what the refinement fits; their sum over classes is
        ``counts``. None for a run folded on the path alone.
    n_classes
        The zone classes of ``class_counts`` (1 without a split).
    """

    intensity: NDArray[np.float64]
    variance: NDArray[np.float64]
    counts: NDArray[np.float64]
    exposure: NDArray[np.float64]
    mask: NDArray[np.bool_]
    n_orientations: int
    moments: BinMoments | None = None
    class_counts: NDArray[np.float64] | None = None
    n_classes: int = 1

    @property
    def fitted_counts(self) -> NDArray[np.float64]:
        """The counts the refinement fits with :attr:`moments`: the zone classes' when the
        run is split by them, else the path's."""
        return self.counts if self.class_counts is None else self.class_counts

    @classmethod
    def of(
        cls,
        counts: NDArray[np.float64],
        exposure: NDArray[np.float64],
        n: int,
        moments: BinMoments | None = None,
        *,
        copy_moments: bool = True,
    ) -> Snapshot:
        """The spectrum of ``counts`` over ``exposure`` (copied) after ``n`` orientations
        (with a copy of ``moments``; ``copy_moments=False``: the set itself, for one that is
        never changed again, :class:`~consumers.reduction.moments.MomentsRing`)."""
        mask = exposure > 0
        safe = np.where(mask, exposure, 1.0)
        return cls(
            intensity=np.where(mask, counts / safe, np.nan),
            variance=np.where(mask, np.maximum(counts, 1.0) / safe**2, np.nan),
            counts=counts.copy(),
            exposure=exposure.copy(),
            mask=mask,
            n_orientations=n,
            moments=moments.copy() if moments is not None and copy_moments else moments,
        )


@dataclass(slots=True)
class RunAccumulator:
    """Counts and exposure of one run, per orientation and cumulatively.

    ``normalisation`` (:data:`NORMALISATIONS`) chooses each orientation's exposure weight:
    its proton charge (uC), or with ``"monitor"`` its counts in the beam monitor
    ``monitor`` (a source name). An orientation whose monitor stream stopped before its
    end is weighted by its charge times the run's monitor counts per uC over the complete
    orientations so far (logged); with none yet, it is kept but not added
    (:attr:`OrientationRecord.normalised`).
    """

    grid: Grid | PowderGrid
    counts: NDArray[np.float64] = field(init=False)
    exposure: NDArray[np.float64] = field(init=False)
    per_orientation_counts: list[NDArray[np.float32]] = field(default_factory=list)
    per_orientation_exposure: list[NDArray[np.float32]] = field(default_factory=list)
    records: list[OrientationRecord] = field(default_factory=list)
    #: keep each orientation's counts and exposure (off for a live run's zone-class split,
    #: whose path accumulator keeps them)
    keep_orientations: bool = True
    #: the run's per-bin moments (charge-weighted), None when they are not taken
    moments: BinMoments | None = None
    #: with a ring, each orientation's moments make a new set (:class:`MomentsRing`)
    #: instead of being added in place, and snapshots share the set instead of copying it
    #: (a live run's, whose snapshots are taken after every orientation); once set, kept
    moments_ring: MomentsRing | None = None
    normalisation: str = "proton_charge"
    #: the monitor source of ``"monitor"`` normalisation
    monitor: str | None = None

    def __post_init__(self) -> None:
        if self.normalisation not in NORMALISATIONS:
            raise FoldError(
                f"normalisation must be one of {', '.join(NORMALISATIONS)}, got "
                f"{self.normalisation!r}"
            )
        if self.normalisation == "monitor" and not self.monitor:
            raise FoldError(
                "normalisation 'monitor' needs the monitor's source name (monitor = ...)"
            )
        self.counts = np.zeros(self.grid.shape)
        self.exposure = np.zeros(self.grid.shape)

    @property
    def exposure_unit(self) -> str:
        """Unit of :attr:`exposure`: ``uC*sr*meV`` or, normalised by a monitor,
        ``sr*meV`` per monitor count (written ``counts*sr*meV``)."""
        return "uC*sr*meV" if self.normalisation == "proton_charge" else "counts*sr*meV"

    def weight_of(
        self, proton_charge: float, monitor_counts: dict[str, int], incomplete: tuple[str, ...]
    ) -> float | None:
        """The exposure weight of an orientation (see the class docstring); None when it
        cannot be known."""
        if self.normalisation == "proton_charge":
            return float(proton_charge)
        m = self.monitor
        assert m is not None
        if m in monitor_counts and m not in incomplete:
            return float(monitor_counts[m])
        good = [r for r in self.records if m in r.monitor_counts and m not in r.monitor_incomplete]
        charge = sum(r.proton_charge for r in good)
        if charge <= 0:
            logger.warning(
                "orientation %d: no counts of monitor %s and no complete orientation to "
                "estimate them from; kept, not added to the run's spectrum",
                len(self.records),
                m,
            )
            return None
        ratio = sum(r.monitor_counts[m] for r in good) / charge
        logger.warning(
            "orientation %d: monitor %s stopped; weight estimated from its proton charge "
            "(%.6g uC) x %.6g counts/uC",
            len(self.records),
            m,
            proton_charge,
            ratio,
        )
        return float(proton_charge) * ratio

    def add(
        self,
        counts: NDArray[np.float64],
        coverage: NDArray[np.float64],
        *,
        omega: float,
        proton_charge: float,
        events: int,
        dropped: dict[str, int],
        moments: BinMoments | None = None,
        monitor_counts: dict[str, int] | None = None,
        monitor_incomplete: tuple[str, ...] = (),
    ) -> OrientationRecord:
        """Add one completed orientation (its folded counts and coverage, its moments at
        unit weight when the run takes them, its beam-monitor counts per source and the
        monitors whose stream stopped before its end).

        ``events - sum(dropped)`` events were folded (rows of path points that alias an
        earlier one hold copies, so ``counts.sum()`` can be larger).
        """
        if counts.shape != self.grid.shape or coverage.shape != self.grid.shape:
            raise FoldError(f"expected arrays of shape {self.grid.shape}, got {counts.shape}")
        if not (np.isfinite(proton_charge) and proton_charge >= 0):
            raise FoldError(f"proton charge must be finite and >= 0, got {proton_charge}")
        monitors = {str(k): int(v) for k, v in (monitor_counts or {}).items()}
        weight = self.weight_of(proton_charge, monitors, monitor_incomplete)
        exposure = (0.0 if weight is None else weight) * coverage
        if weight is not None:
            if moments is not None and self.moments is not None:
                if self.moments_ring is not None:  # a new set: snapshots may hold the old
                    self.moments = self.moments_ring.plus(self.moments, moments, weight)
                else:
                    self.moments.add(moments, weight)
            self.counts += counts
            self.exposure += exposure
        if self.keep_orientations:
            self.per_orientation_counts.append(counts.astype(np.float32))
            self.per_orientation_exposure.append(exposure.astype(np.float32))
        rec = OrientationRecord(
            index=len(self.records),
            omega=float(omega),
            proton_charge=float(proton_charge),
            events=int(events),
            folded=int(events) - int(sum(dropped.values())),
            dropped=dict(dropped),
            monitor_counts=monitors,
            monitor_incomplete=tuple(monitor_incomplete),
            weight=weight,
            normalised=weight is not None,
        )
        self.records.append(rec)
        return rec

    def snapshot(self) -> Snapshot:
        """The cumulative spectrum."""
        return Snapshot.of(
            self.counts,
            self.exposure,
            len(self.records),
            self.moments,
            copy_moments=self.moments_ring is None,
        )

    def orientation_snapshot(self, index: int) -> Snapshot:
        """The spectrum of orientation ``index`` alone."""
        return Snapshot.of(
            self.per_orientation_counts[index].astype(float),
            self.per_orientation_exposure[index].astype(float),
            1,
        )

    def write_hdf5(
        self,
        path: str | Path,
        *,
        metadata: dict[str, object] | None = None,
        run_start: dict[str, Any] | None = None,
    ) -> Path:
        """Export I(q,E) with its errors, variance, counts, exposure, mask, the grid and the
        per-orientation data as a NeXus file (:func:`consumers.reduction.nexus.write_nexus`:
        NXentry, NXdata ``iqe``, NXsample and NXinstrument from ``run_start``, NXprocess).
        """
        from consumers.reduction.nexus import write_nexus

        return write_nexus(self, path, metadata=metadata, run_start=run_start)
