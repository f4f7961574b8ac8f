"""Accumulators of folded counts and exposure, per orientation and for the whole run.

``I = counts / exposure`` with exposure = proton charge (uC) x coverage (sr meV, from the
instrument model), so intensities of different orientations are comparable; bins that no
orientation measured are masked (NaN), never zero. Variance from Poisson counts:
``var(I) = counts / exposure^2`` (an empty but measured bin gets ``1 / exposure^2``, the
variance of one count, so that it is not taken as exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from consumers.exceptions import FoldError
from consumers.reduction.moments import BinMoments
from simulations.lattice.grid import Grid

__all__ = ["OrientationRecord", "RunAccumulator", "Snapshot"]


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
    """

    index: int
    omega: float
    proton_charge: float
    events: int
    folded: int
    dropped: dict[str, int]


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
        material has no reference force constants to take them with.
    """

    intensity: NDArray[np.float64]
    variance: NDArray[np.float64]
    counts: NDArray[np.float64]
    exposure: NDArray[np.float64]
    mask: NDArray[np.bool_]
    n_orientations: int
    moments: BinMoments | None = None

    @classmethod
    def of(
        cls,
        counts: NDArray[np.float64],
        exposure: NDArray[np.float64],
        n: int,
        moments: BinMoments | None = None,
    ) -> Snapshot:
        """The spectrum of ``counts`` over ``exposure`` (copied) after ``n`` orientations
        (with a copy of ``moments``)."""
        mask = exposure > 0
        safe = np.where(mask, exposure, 1.0)
        return cls(
            intensity=np.where(mask, counts / safe, np.nan),
            variance=np.where(mask, np.maximum(counts, 1.0) / safe**2, np.nan),
            counts=counts.copy(),
            exposure=exposure.copy(),
            mask=mask,
            n_orientations=n,
            moments=None if moments is None else moments.copy(),
        )


@dataclass(slots=True)
class RunAccumulator:
    """Counts and exposure of one run, per orientation and cumulatively."""

    grid: Grid
    counts: NDArray[np.float64] = field(init=False)
    exposure: NDArray[np.float64] = field(init=False)
    per_orientation_counts: list[NDArray[np.float32]] = field(default_factory=list)
    per_orientation_exposure: list[NDArray[np.float32]] = field(default_factory=list)
    records: list[OrientationRecord] = field(default_factory=list)
    #: the run's per-bin moments (charge-weighted), None when they are not taken
    moments: BinMoments | None = None

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.grid.shape)
        self.exposure = np.zeros(self.grid.shape)

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
    ) -> OrientationRecord:
        """Add one completed orientation (its folded counts and coverage, and its moments
        at unit charge when the run takes them).

        ``events - sum(dropped)`` events were folded (rows of path points that alias an
        earlier one hold copies, so ``counts.sum()`` can be larger).
        """
        if counts.shape != self.grid.shape or coverage.shape != self.grid.shape:
            raise FoldError(f"expected arrays of shape {self.grid.shape}, got {counts.shape}")
        if not (np.isfinite(proton_charge) and proton_charge >= 0):
            raise FoldError(f"proton charge must be finite and >= 0, got {proton_charge}")
        exposure = proton_charge * coverage
        if moments is not None and self.moments is not None:
            self.moments.add(moments, proton_charge)
        self.counts += counts
        self.exposure += exposure
        self.per_orientation_counts.append(counts.astype(np.float32))
        self.per_orientation_exposure.append(exposure.astype(np.float32))
        rec = OrientationRecord(
            index=len(self.records),
            omega=float(omega),
            proton_charge=float(proton_charge),
            events=int(events),
            folded=int(events) - int(sum(dropped.values())),
            dropped=dict(dropped),
        )
        self.records.append(rec)
        return rec

    def snapshot(self) -> Snapshot:
        """The cumulative spectrum."""
        return Snapshot.of(self.counts, self.exposure, len(self.records), self.moments)

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
