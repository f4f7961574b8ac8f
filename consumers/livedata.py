"""Results as ``da00`` data arrays for the facility's live dashboards (ess-livedata).

Each message is one ``streaming_data_types.dataarray_da00`` DataArray. The source names are
the same for every run, so a dashboard subscribes once; the run is named in the signal
variable's ``source`` field (``run:<run_id>``) and the orientation count is a scalar
variable. The variable names follow ess-livedata's da00 <-> scipp convention: the data are
``signal``, their standard deviations ``errors``, every other variable is a coordinate
over the dimensions its ``axes`` name (a coordinate one longer than its dimension holds bin
edges).

=======================  ==========================================================
source name              variables
=======================  ==========================================================
``steer/iqe``            ``signal`` (q, energy) I(q, E), 1/(uC sr meV), NaN where
                         unmeasured; ``errors`` (q, energy) its Poisson standard
                         deviation; ``q`` (q,) distance along the q-path, 1/angstrom;
                         ``energy`` (energy + 1,) bin edges, meV; ``n_orientations``
``steer/iqe_coverage``   ``signal`` (q, energy) exposure = proton charge x coverage,
                         uC sr meV (0 where unmeasured); ``q``, ``energy``,
                         ``n_orientations`` as above
``steer/fc_estimate``    ``signal`` (fc,) posterior mean of each force constant,
                         eV/angstrom^2; ``errors`` (fc,) its standard deviation;
                         ``q05``, ``q95`` (fc,) the 5 % and 95 % quantiles; ``fc``
                         (fc,) index of the constant, whose names are the signal's
                         ``label`` (comma-separated); ``n_orientations``
=======================  ==========================================================

This module only encodes; :class:`consumers.kafka.KafkaLivedataSink` publishes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from streaming_data_types.dataarray_da00 import Variable, serialise_da00

from simulations.lattice.grid import Grid, PowderGrid

__all__ = [
    "FC_ESTIMATE_SOURCE",
    "FC_UNIT",
    "IQE_COVERAGE_SOURCE",
    "IQE_SOURCE",
    "IQE_UNIT",
    "estimate_da00",
    "snapshot_da00",
]

#: Source name of the cumulative I(q, E).
IQE_SOURCE = "steer/iqe"
#: Source name of the exposure (proton charge x coverage) of the cumulative I(q, E).
IQE_COVERAGE_SOURCE = "steer/iqe_coverage"
#: Source name of the running force-constant estimate.
FC_ESTIMATE_SOURCE = "steer/fc_estimate"

#: Unit of I(q, E) = counts / exposure (:mod:`consumers.reduction.accumulate`).
IQE_UNIT = "1/(uC*sr*meV)"
#: Unit of the exposure.
EXPOSURE_UNIT = "uC*sr*meV"
#: Unit of the force constants.
FC_UNIT = "eV/angstrom**2"


def _axes(grid: Grid | PowderGrid, n_orientations: int) -> list[Variable]:
    """The coordinates of an I(q, E) message: q-path distance (a powder's: |Q| bin edges),
    energy edges, count."""
    q = grid.q_edges if isinstance(grid, PowderGrid) else grid.qpath.distance
    powder = isinstance(grid, PowderGrid)
    return [
        Variable(
            name="q",
            data=np.asarray(q, dtype=np.float64),
            axes=["q"],
            unit="1/angstrom",
            label="|Q| (bin edges)" if powder else "distance along the q-path",
        ),
        Variable(
            name="energy",
            data=np.asarray(grid.energy_edges, dtype=np.float64),
            axes=["energy"],
            unit="meV",
            label="energy transfer (bin edges)",
        ),
        Variable(name="n_orientations", data=np.asarray(n_orientations, dtype=np.int64)),
    ]


def snapshot_da00(
    snapshot: Any, grid: Grid | PowderGrid, *, run_id: str, timestamp_ns: int
) -> dict[str, bytes]:
    """The da00 messages of one folded snapshot, by source name (:data:`IQE_SOURCE`,
    :data:`IQE_COVERAGE_SOURCE`).

    Parameters
    ----------
    snapshot
        A :class:`consumers.reduction.accumulate.Snapshot`: ``intensity``, ``variance``
        and ``exposure`` (n_q, n_E) float.
    grid
        The run's (q, E) grid: ``qpath.distance`` (n_q,) 1/Angstrom and ``energy_edges``
        (n_E + 1,) meV.
    run_id
        Named in the signal's ``source`` field as ``run:<run_id>``.
    timestamp_ns
        The messages' timestamp, ns since the Unix epoch.
    """
    shape = grid.shape
    if np.shape(snapshot.intensity) != shape:
        raise ValueError(
            f"snapshot of shape {np.shape(snapshot.intensity)} on a grid of shape {shape}"
        )
    axes = _axes(grid, int(snapshot.n_orientations))
    iqe = [
        Variable(
            name="signal",
            data=np.ascontiguousarray(snapshot.intensity, dtype=np.float64),
            axes=["q", "energy"],
            unit=IQE_UNIT,
            label="I(q, E)",
            source=f"run:{run_id}",
        ),
        Variable(
            name="errors",
            data=np.sqrt(np.ascontiguousarray(snapshot.variance, dtype=np.float64)),
            axes=["q", "energy"],
            unit=IQE_UNIT,
        ),
        *axes,
    ]
    coverage = [
        Variable(
            name="signal",
            data=np.ascontiguousarray(snapshot.exposure, dtype=np.float64),
            axes=["q", "energy"],
            unit=EXPOSURE_UNIT,
            label="exposure (proton charge x coverage)",
            source=f"run:{run_id}",
        ),
        *axes,
    ]
    return {
        IQE_SOURCE: serialise_da00(IQE_SOURCE, int(timestamp_ns), iqe),
        IQE_COVERAGE_SOURCE: serialise_da00(IQE_COVERAGE_SOURCE, int(timestamp_ns), coverage),
    }


def estimate_da00(message: Mapping[str, Any], *, timestamp_ns: int) -> bytes:
    """The da00 message (:data:`FC_ESTIMATE_SOURCE`) of one estimate message, as the
    steering loop records it and the replicas publish it on ``<prefix>_estimates``:
    ``run_id``, ``n_orientations`` and ``estimate`` with ``fc`` = {name: {``mean``,
    ``std``, ``q05``, ``q95``}} in eV/Angstrom^2.

    Raises
    ------
    ValueError
        For an estimate without force constants or in other units.
    """
    estimate = message["estimate"]
    fc = estimate.get("fc") or {}
    units = estimate.get("units", "eV/A^2")
    if not fc or units != "eV/A^2":
        raise ValueError(f"an estimate of {len(fc)} force constants in {units!r}")
    names = list(fc)

    def column(key: str) -> np.ndarray:
        return np.array([float(fc[n].get(key, np.nan)) for n in names], dtype=np.float64)

    variables = [
        Variable(
            name="signal",
            data=column("mean"),
            axes=["fc"],
            unit=FC_UNIT,
            label=",".join(names),
            source=f"run:{message.get('run_id')}",
        ),
        Variable(name="errors", data=column("std"), axes=["fc"], unit=FC_UNIT),
        Variable(name="q05", data=column("q05"), axes=["fc"], unit=FC_UNIT),
        Variable(name="q95", data=column("q95"), axes=["fc"], unit=FC_UNIT),
        Variable(name="fc", data=np.arange(len(names), dtype=np.int64), axes=["fc"]),
        Variable(
            name="n_orientations",
            data=np.asarray(int(message.get("n_orientations") or 0), dtype=np.int64),
        ),
    ]
    return serialise_da00(FC_ESTIMATE_SOURCE, int(timestamp_ns), variables)
