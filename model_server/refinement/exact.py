"""The exact-fold correction of the counts model: a fixed factor per bin, made once near
the optimum, that takes the fast model to the exact expected fold.

The counts model (:mod:`model_server.refinement.counts`) takes the modes at each bin's
path point and the folding tube's offsets to first order: against the exact expected fold
(the cross-section diagonalised at every folded sample's own Q and energy,
:func:`exact_one_phonon_fold`) it is about 4 % per bin
off (docs/refinement.md). That error is a smooth function of the force constants, so the
ratio ``exact(c0) / model(c0)`` of the one-phonon parts at a point ``c0`` near the optimum,
held fixed, corrects the model near ``c0``: a control variate. On single orientations of
the README's Ge run (``make bench``, ``bench-results/counts_model.json``), factors made
0.5 % from the truth in every coefficient leave the corrected model 0.4 % (median; 90th
percentile 1.3-1.4 %) per bin from the exact fold at the truth, 2 % from it 1.5-1.6 %
(5.1-5.6 %), against 4.0-4.1 % (14-17 %) uncorrected: the nearer the point, the better.

The exact fold costs about 19 s an orientation on one core (1.5 million samples, each a
diagonalised dynamical matrix; ``workers`` fold several at a time), so the correction is
an offline step for a run's final estimate (``steer estimate --refine --exact``), not
the live loop's. It is made on the
path's bins, the wedge's or the path's split by zone class (the exact fold puts each
sample in its zone's class row, as the moments do).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from consumers.reduction.folding import Folder
from consumers.reduction.moments import (
    BinMoments,
    folded_samples,
    point_operations,
    star_operations,
)
from model_server.exceptions import RefinementError
from model_server.refinement.counts import CountsModel
from model_server.refinement.fit import Refined
from model_server.refinement.refiner import RunRefiner, file_inputs
from simulations.lattice.grid import ZoneClasses
from simulations.lattice.sqe import CoherentSQE

__all__ = [
    "FLOOR",
    "ExactCorrection",
    "corrected_model",
    "exact_correction",
    "exact_one_phonon_fold",
    "exact_run_fold",
    "refine_file_exact",
]

#: Below this fraction of its largest value, the model's one-phonon part of a bin is not
#: scaled (a factor of a near-zero part would be huge): the exact fold is added instead.
FLOOR = 1e-6


@dataclass(frozen=True, slots=True, kw_only=True)
class ExactCorrection:
    """Per-bin factors ``exact / model`` of the one-phonon part, made at ``at``.

    Attributes
    ----------
    factors
        (n_q * n_E,) float, > 0; 1 where either fold is empty, or where the model's part
        is below :data:`FLOOR` of its largest.
    additive
        (n_q * n_E,) float: where no factor is made, what the exact fold holds beyond the
        model's part (a mode the model does not reach there; >= 0), added as a fixed
        signal; 0 elsewhere.
    at
        (n_coeff,) the coefficients they were made at, eV/A^2.
    orientations
        Orientations summed.
    seconds
        Wall time of the exact fold.
    """

    factors: NDArray[np.float64]
    additive: NDArray[np.float64]
    at: NDArray[np.float64]
    orientations: int
    seconds: float

    def summary(self, model: CountsModel) -> dict[str, float | int]:
        """JSON-ready: the fitted bins given a factor and how far their factors lie from 1
        (median and 90th percentile of ``|factor - 1|``), the bins given an additive part,
        the orientations and the seconds."""
        f = self.factors[model.bins]
        made = f != 1.0
        dev = np.abs(f[made] - 1.0) if made.any() else np.zeros(1)
        return {
            "orientations": self.orientations,
            "bins_scaled": int(made.sum()),
            "median_abs_deviation": round(float(np.median(dev)), 5),
            "p90_abs_deviation": round(float(np.percentile(dev, 90)), 5),
            "bins_added": int(np.count_nonzero(self.additive[model.bins])),
            "seconds": round(self.seconds, 1),
        }


def exact_one_phonon_fold(
    folder: Folder,
    model: CoherentSQE,
    omega: float,
    *,
    classes: ZoneClasses | None = None,
    inverse_ops: NDArray[np.float64] | None = None,
    e_substeps: int = 4,
    pixel_stride: int = 2,
    chunk: int = 65536,
) -> NDArray[np.float64]:
    """(n_q, n_E) (with ``classes``, (n_q * n_classes, n_E)) alias-expanded expected
    one-phonon fold of one orientation, unit charge:
    the coherent one-phonon cross-section evaluated exactly at every folded sample's own Q
    and energy (``model``'s modes diagonalised there, no phonon table, no super-pixels,
    its Debye-Waller factors and resolution), times the sample's weight
    (:func:`consumers.reduction.moments.folded_samples`), summed per bin.

    With ``classes`` (more than one) each sample goes to the row of its zone's
    structure-factor class, ``(n_q * n_classes, n_E)`` on the grid of
    :func:`~simulations.lattice.grid.make_class_grid`, the class taken as
    :meth:`~consumers.reduction.folding.Folder.fold_classes` and the moments take it
    (``inverse_ops`` from :func:`~consumers.reduction.moments.star_operations`, made when
    not given); summed over the classes it is the path's fold.

    The reference for the counts model and for the prediction endpoint's coarser fold
    (:class:`model_server.prediction.expected.FoldSampler`; the same samples by default,
    every 2nd pixel at 4 energies a bin); units as theirs (the cross-section in
    mbarn/(sr meV) per atom times sr meV). About 19 s an orientation of the README's Ge
    run on one core (1.5 million samples).
    """
    grid = folder.grid
    rows, q, sub, weight = folded_samples(
        folder, omega, e_substeps=e_substeps, pixel_stride=pixel_stride
    )
    iq = folder.table.star_index[rows]
    alias = np.asarray(folder.table.alias, dtype=np.int64)
    n_rows = grid.n_q
    if classes is not None and classes.n_classes > 1:
        if inverse_ops is None:
            inverse_ops = star_operations(folder, point_operations(model.crystal))
        iq = iq * classes.n_classes + folder.zone_class_of(q, rows, iq, classes, inverse_ops)
        alias = classes.expand(alias)
        n_rows *= classes.n_classes
    bins = iq * grid.n_e + sub // e_substeps
    edges = np.asarray(grid.energy_edges, dtype=float)
    e_sample = edges[0] + (sub + 0.5) * (edges[1] - edges[0]) / e_substeps
    value = np.empty(len(bins))
    for start in range(0, len(bins), chunk):
        sl = slice(start, start + chunk)
        e_mode, sf = model.structure_factors(q[sl])  # (n, n_m) meV, mbarn per atom
        value[sl] = model.sqe_at(e_mode, sf, e_sample[sl]) * weight[sl]
    out = np.bincount(bins, weights=value, minlength=n_rows * grid.n_e)
    return np.asarray(out.reshape(n_rows, grid.n_e)[alias], dtype=np.float64)


def exact_run_fold(
    folder: Folder,
    sqe: CoherentSQE,
    omegas: Sequence[float],
    charges: Sequence[float],
    *,
    classes: ZoneClasses | None = None,
    progress: bool = False,
    workers: int = 1,
    pixel_stride: int = 2,
) -> NDArray[np.float64]:
    """(n_q, n_E) the exact one-phonon fold of a run: every orientation's
    :func:`exact_one_phonon_fold` times its proton charge, summed (the moments' units);
    with ``classes``, ``(n_q * n_classes, n_E)`` split by zone class.

    ``workers`` > 1 folds that many orientations at a time on threads (the samples'
    walk, the dynamical matrices and the eigensolver run without the GIL); the sum is
    taken in the orientations' order either way, so the result does not depend on it.
    ``pixel_stride``: as :func:`exact_one_phonon_fold`'s (every 2nd pixel, as the moments).
    """
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import ExitStack

    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    if len(omegas) != len(charges) or not len(omegas):
        raise RefinementError("the exact fold needs one charge per orientation, and some")
    if workers < 1:
        raise RefinementError(f"the exact fold needs at least one worker (got {workers})")
    n_classes = 1 if classes is None else classes.n_classes
    ops = star_operations(folder, point_operations(sqe.crystal)) if n_classes > 1 else None
    out = np.zeros((folder.grid.n_q * n_classes, folder.grid.n_e))
    pairs = list(zip(omegas, charges, strict=True))

    def one(pair: tuple[float, float]) -> NDArray[np.float64]:
        w, c = pair
        return float(c) * exact_one_phonon_fold(
            folder, sqe, float(w), classes=classes, inverse_ops=ops, pixel_stride=pixel_stride
        )

    with (
        tqdm(total=len(pairs), desc="exact fold", unit="orient", disable=not progress) as bar,
        ExitStack() as stack,
    ):
        parts: Iterable[NDArray[np.float64]] = map(one, pairs)
        if workers > 1 and len(pairs) > 1:
            stack.enter_context(threadpool_limits(1))  # the workers are the parallelism
            pool = stack.enter_context(ThreadPoolExecutor(min(workers, len(pairs))))
            parts = pool.map(one, pairs)
        for part in parts:  # in order: the same sum for any worker count
            out += part
            bar.update()
    return out


def exact_correction(
    refiner: RunRefiner,
    moments: BinMoments,
    folder: Folder,
    omegas: Sequence[float],
    charges: Sequence[float],
    at: NDArray[np.float64],
    *,
    progress: bool = False,
    workers: int = 1,
) -> ExactCorrection:
    """The factors of a run at the coefficients ``at``: the exact fold of its orientations
    (``folder``, ``omegas`` in deg, ``charges`` in uC, as ``moments`` were summed) over
    the one-phonon part of the run's counts model there."""
    at = np.asarray(at, dtype=float)
    t0 = time.perf_counter()
    plain = refiner.counts_model(moments)
    sqe = CoherentSQE(plain.basis, at, temperature=plain.temperature, resolution=plain.resolution)
    exact = exact_run_fold(
        folder, sqe, omegas, charges, classes=refiner.classes, progress=progress, workers=workers
    ).reshape(-1)
    one = np.zeros_like(exact)
    one[plain.bins] = plain.evaluate(plain.theta(at), jacobian=False).expected
    ok = (one > FLOOR * max(float(one.max()), 1e-300)) & (exact > 0)
    factors = np.where(ok, exact / np.where(ok, one, 1.0), 1.0)
    additive = np.where(ok, 0.0, np.maximum(exact - one, 0.0))
    return ExactCorrection(
        factors=np.asarray(factors, dtype=np.float64),
        additive=np.asarray(additive, dtype=np.float64),
        at=at,
        orientations=len(omegas),
        seconds=time.perf_counter() - t0,
    )


def corrected_model(
    refiner: RunRefiner, moments: BinMoments, correction: ExactCorrection
) -> CountsModel:
    """The run's model with the factors: its fixed signal the multiphonon part made at the
    correction's point plus the correction's additive part."""
    return refiner.counts_model(
        moments,
        extra=refiner.multiphonon(moments, correction.at) + correction.additive,
        correction=correction.factors,
    )


def refine_file_exact(
    path: str | Path,
    start: Mapping[str, float] | None = None,
    *,
    first: int | None = None,
    spread: Mapping[str, float] | None = None,
    passes: int = 1,
    on_pass: Callable[[int, Refined, float], None] | None = None,
    progress: bool = False,
    workers: int = 1,
) -> tuple[Refined, Refined, dict[str, Any]]:
    """:func:`model_server.refinement.refiner.refine_file`, then the fit again with the
    exact-fold correction made at its optimum (:func:`exact_correction`; about 19 s an
    orientation on one core); with ``passes`` > 1, the correction is made again at each
    corrected optimum and the fit repeated, so that the last correction is made within
    ``moved_std[-1]`` std of where the fit ends (the factors hold best near the point
    they were made at).

    Returns ``(corrected, model_only, correction)``: the last corrected fit, the first fit
    and the last correction's summary (orientations, the factors' median and
    90th-percentile distance from 1 in the fitted bins, seconds), with ``passes`` and, per
    pass, the largest move of a coefficient in units of its std from the point the pass's
    correction was made at (``moved_std``: how far from converged the passes are; 0 for a
    coefficient of zero std). A later pass whose fit does not converge is not returned:
    the last converged pass is, with ``stopped`` saying which pass failed.
    ``on_pass(k, fit, moved_std)`` is called after the k-th corrected fit (from 1): each
    pass costs the exact fold again, so a caller can show the fits as they come.
    ``workers``: orientations folded at a time (:func:`exact_run_fold`)."""
    from consumers.reduction.pipeline import run_folder

    if passes < 1:
        raise RefinementError(f"passes must be >= 1 (got {passes})")
    counts, run_start, omegas, charges, moments, refiner = file_inputs(path, first, progress)
    fit = refiner.refine(counts, moments, start, spread=spread)
    if not fit.converged:
        raise RefinementError(
            "the refinement did not converge: no optimum to make the exact correction at"
        )
    _, folder = run_folder(
        dict(run_start), tolerance=refiner.table.tolerance, wedge_mesh=refiner.wedge_mesh
    )
    assert isinstance(folder, Folder)  # read_counts_file's moments are single-crystal ones
    at = fit
    moved: list[float] = []
    kept: tuple[Refined, dict[str, Any]] | None = None
    for done in range(passes):
        if progress and passes > 1:
            print(f"exact-fold correction, pass {done + 1} of {passes}", file=sys.stderr)
        correction = exact_correction(
            refiner, moments, folder, omegas, charges, at.mean, progress=progress, workers=workers
        )
        model = corrected_model(refiner, moments, correction)
        best = {n: float(v) for n, v in zip(refiner.names, at.mean, strict=True)}
        corrected = refiner.refine(counts, moments, best, model=model, warm=at.theta)
        step = np.abs(corrected.mean - at.mean)
        std = corrected.std
        scaled = np.where(std > 0, step / np.where(std > 0, std, 1.0), 0.0)
        moved.append(float(np.max(scaled)))
        if on_pass is not None:
            on_pass(done + 1, corrected, moved[-1])
        if not corrected.converged and kept is not None:
            # a later pass that fails keeps the last converged one (and says so)
            last, summary = kept
            return last, fit, summary | {"stopped": f"pass {done + 1} did not converge"}
        kept = (
            corrected,
            correction.summary(model)
            | {"passes": len(moved), "moved_std": [round(m, 3) for m in moved]},
        )
        if not corrected.converged:
            break
        at = corrected
    assert kept is not None  # passes >= 1
    return kept[0], fit, kept[1]
