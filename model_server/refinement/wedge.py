"""The information in the folded path against the whole irreducible wedge of the zone.

The path fold keeps the events within the folding tube around the q-path (about 7 % of
them). Binned instead by the nearest point of a Gamma-centred ``mesh^3`` grid's star (a
q-voxel of the whole zone, folded into the irreducible wedge: the irreducible points of
the mesh play the part of the path's points), every event in the energy window counts.
The same moments and expected-counts model apply unchanged to that binning (and to the
path's bins split by the structure-factor class of each cell's zone), so the
Cramer-Rao bound ``sqrt(diag(F^-1))`` (F the Fisher information of the Poisson counts at
the truth, with the refinement's prior) compares what the two binnings can tell of the
force constants for the same run: same detector, angles, truth, scale and background.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from consumers.reduction.folding import Folder
from consumers.reduction.moments import BinMoments, orientation_moments, star_operations
from consumers.reduction.table import FoldTable
from model_server.refinement.counts import GAMMA_EXCLUSION, CountsModel
from model_server.refinement.refiner import RunRefiner
from simulations.instrument.spectrometer import Orientation
from simulations.lattice.grid import Grid, ZoneClasses, make_wedge_grid

__all__ = ["crb_comparison", "wedge_grid"]

logger = logging.getLogger(__name__)


def wedge_grid(refiner: RunRefiner, mesh: int) -> tuple[Grid, float]:
    """The grid whose "path" is the irreducible points of a Gamma-centred ``mesh^3`` mesh
    (same energy bins as the run's), and the folding radius (1/A) that reaches every Q."""
    return make_wedge_grid(refiner.setup.crystal, refiner.setup.grid.energy_edges, mesh)


def _moments(
    folder: Folder,
    refiner: RunRefiner,
    omegas: Sequence[float],
    levels: Sequence[int],
    *,
    stride: int,
    substeps: int,
    classes: ZoneClasses | None = None,
) -> dict[int, BinMoments]:
    """Cumulative moments of the first k angles (unit charge each) for every k of
    ``levels``; split by zone class with ``classes``."""
    ops = star_operations(folder, refiner.constants.operations)
    grid = folder.grid
    n_classes = 1 if classes is None else classes.n_classes
    acc = BinMoments.zeros(grid.n_q * n_classes * grid.n_e, refiner.constants.n_branches)
    out = {}
    for k, w in enumerate(omegas, start=1):
        acc.add(
            orientation_moments(
                folder,
                refiner.constants,
                float(w),
                e_substeps=substeps,
                pixel_stride=stride,
                inverse_ops=ops,
                classes=classes,
            ),
            1.0,
        )
        if k in levels:
            out[k] = acc.copy()
    return out


def crb_comparison(
    refiner: RunRefiner,
    orientation: Orientation,
    truth: NDArray[np.float64],
    omegas: Sequence[float],
    levels: Sequence[int],
    *,
    signal_per_orientation: float = 12600.0,
    background_share: float = 0.1,
    mesh: int = 16,
    pixel_stride: int = 4,
    e_substeps: int = 2,
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Cramer-Rao bounds of the path binning, the wedge binning and the path's bins split
    by zone class (:meth:`RunRefiner.zone_split`) of the same run.

    ``omegas``: the run's angles (deg) in order; ``levels``: orientation counts k (the
    first k angles) to report. The scale is set so that the path's fitted bins hold
    ``signal_per_orientation`` signal counts per orientation on average (the README run's
    folded share), with ``background_share`` of that as flat background; the wedge uses the
    same scale and background amplitude (they are properties of the run, not the binning).
    Returns ``{"levels": [{"orientations", "path": {name: crb}, "wedge": {...},
    "classes": {...}, "wedge_over_path": {...}, "classes_over_path": {...}, "counts":
    {"path", "wedge", "classes"}}], "mesh", "seconds", ...}``.
    """
    t0 = time.perf_counter()
    instrument = refiner.instrument
    ei = refiner.ei
    names = list(names or refiner.names[:4])
    levels = sorted({int(k) for k in levels})
    if not levels or levels[0] < 1 or levels[-1] > len(omegas):
        raise ValueError(f"orientation counts must be within 1..{len(omegas)}, got {levels}")
    w_grid, radius = wedge_grid(refiner, mesh)
    path_folder = Folder(refiner.table, refiner.setup.grid, instrument, orientation, ei)
    w_table = FoldTable.cached(refiner.setup.crystal, w_grid, tolerance=radius)
    wedge_folder = Folder(w_table, w_grid, instrument, orientation, ei)
    used = list(omegas[: levels[-1]])
    split = RunRefiner.zone_split(
        refiner.material, instrument, ei, refiner.temperature, material_setup=refiner.setup
    )
    path_m = _moments(path_folder, refiner, used, levels, stride=pixel_stride, substeps=e_substeps)
    wedge_m = _moments(
        wedge_folder, refiner, used, levels, stride=pixel_stride, substeps=e_substeps
    )
    class_m = _moments(
        path_folder,
        refiner,
        used,
        levels,
        stride=pixel_stride,
        substeps=e_substeps,
        classes=split.classes,
    )
    exclusion = GAMMA_EXCLUSION * refiner.table.tolerance
    out_levels = []
    for k in levels:
        path_model = refiner.model(path_m[k])
        wedge_model = CountsModel(
            refiner.setup.basis,
            w_grid,
            refiner.resolution,
            wedge_m[k],
            alias=w_table.alias,
            tolerance=radius,
            temperature=refiner.temperature,
            reference=refiner.reference,
            exclusion=exclusion,
        )
        theta = path_model.theta(truth)
        signal = path_model.evaluate(theta, jacobian=False).expected.sum()
        theta[-4] = math.log(signal_per_orientation * k / signal)
        theta[-3] = (
            background_share * signal_per_orientation * k / path_model.background_shape.sum()
        )
        row: dict[str, Any] = {"orientations": k}
        counts = {}
        models = (
            ("path", path_model),
            ("wedge", wedge_model),
            ("classes", split.model(class_m[k])),
        )
        for label, model in models:
            ev = model.evaluate(theta)
            assert ev.jacobian is not None
            fisher = ev.jacobian.T @ (ev.jacobian / ev.expected[:, None])
            prec = np.concatenate([refiner.prior.precision, np.zeros(4)])
            cov = np.linalg.inv(fisher + np.diag(prec))
            crb = np.sqrt(np.diag(cov))
            row[label] = {n: float(crb[refiner.names.index(n)]) for n in names}
            counts[label] = float(ev.expected.sum())
        row["wedge_over_path"] = {n: row["wedge"][n] / row["path"][n] for n in names}
        row["classes_over_path"] = {n: row["classes"][n] / row["path"][n] for n in names}
        row["counts"] = counts
        out_levels.append(row)
    return {
        "levels": out_levels,
        "names": names,
        "mesh": mesh,
        "wedge_points": w_grid.n_q,
        "zone_classes": 1 if split.classes is None else split.classes.n_classes,
        "wedge_radius_per_A": radius,
        "zone_centre_exclusion_per_A": exclusion,
        "pixel_stride": pixel_stride,
        "e_substeps": e_substeps,
        "signal_per_orientation": signal_per_orientation,
        "seconds": round(time.perf_counter() - t0, 1),
    }
