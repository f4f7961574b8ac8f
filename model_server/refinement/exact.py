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
diagonalised dynamical matrix; ``workers`` fold several at a time). Offline, for a run's
final estimate, the correction is made for the whole run at once (``steer estimate
--refine --exact``); live, :class:`LiveExactCorrection` makes it one orientation at a
time on a spare core while the next one counts (``steer serve --exact-correction``). It
is made on the path's bins, the wedge's (offline) or the path's split by zone class (the
exact fold puts each sample in its zone's class row, as the moments do).

A cheaper correction of the same kind (``steer estimate --refine --first-order``): the
counts model's first-order terms across the tube that its fits leave out (each mode's
intensity-weighted offsets and its eigenvector's change, and close modes split together,
:meth:`~model_server.refinement.counts.CountsModel.first_order`), from each orientation's
offsets' tensors (:func:`run_offset_tensors`, 1.4-2.8 s an orientation), as factors made
at the optimum (:func:`first_order_correction`). On the same single orientations they leave
the model 0.51 % per bin (median) from the exact fold at the truth, 89 % of the bins within
2 %.
"""

from __future__ import annotations

import contextlib
import math
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
    offset_tensors,
    orientation_moments,
    point_operations,
    star_operations,
)
from model_server.exceptions import RefinementError
from model_server.refinement.counts import FLOOR, CountsModel, ExactCorrection
from model_server.refinement.fit import Refined
from model_server.refinement.refiner import RunRefiner, file_inputs
from simulations.lattice.grid import ZoneClasses
from simulations.lattice.sqe import CoherentSQE

__all__ = [
    "FLOOR",
    "ExactCorrection",
    "LiveExactCorrection",
    "corrected_model",
    "exact_correction",
    "exact_one_phonon_fold",
    "exact_run_fold",
    "first_order_correction",
    "refine_file_exact",
    "run_offset_tensors",
]


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
    one = _one_phonon_part(plain, at, len(exact))
    factors, ok = _factors(one, exact)
    additive = np.where(ok, 0.0, np.maximum(exact - one, 0.0))
    return ExactCorrection(
        factors=factors,
        additive=np.asarray(additive, dtype=np.float64),
        at=at,
        orientations=len(omegas),
        seconds=time.perf_counter() - t0,
    )


def run_offset_tensors(
    refiner: RunRefiner,
    folder: Folder,
    omegas: Sequence[float],
    charges: Sequence[float],
    *,
    progress: bool = False,
) -> NDArray[np.complex128]:
    """(n_bins, 3, 3N, 3N) the offsets' tensors of a run
    (:func:`~consumers.reduction.moments.offset_tensors` of every orientation, ``omegas``
    in deg, times its charge in uC, summed in order as the moments are), on the refiner's
    bins (the path's, or split by zone class). Each angle is taken as the moments take it
    (:func:`~consumers.reduction.pipeline.coverage_angle`), so that the tensors and the
    moments come from the same samples. 1.4-1.9 s an orientation of one core on the path,
    about 2.8 s on Ge's zone classes (measured on a loaded machine)."""
    from tqdm import tqdm

    from consumers.reduction.pipeline import coverage_angle

    if len(omegas) != len(charges) or not len(omegas):
        raise RefinementError(
            "the offsets' tensors need one charge per orientation, and some "
            f"(got {len(omegas)} angles and {len(charges)} charges)"
        )
    bad = [c for c in charges if not (math.isfinite(float(c)) and float(c) >= 0.0)]
    if bad:
        raise RefinementError(f"charges must be finite and >= 0 (got {bad[0]})")
    classes = refiner.classes
    ops = star_operations(folder, refiner.constants.operations)
    out: NDArray[np.complex128] | None = None
    pairs = list(zip(omegas, charges, strict=True))
    for omega, charge in tqdm(pairs, desc="offsets' tensors", unit="orient", disable=not progress):
        part = offset_tensors(
            folder, refiner.constants, coverage_angle(omega), inverse_ops=ops, classes=classes
        )
        part *= float(charge)
        if out is None:
            out = part
        else:
            out += part
    assert out is not None
    return out


def first_order_correction(
    refiner: RunRefiner,
    moments: BinMoments,
    tensor_d: NDArray[np.complex128],
    at: NDArray[np.float64],
    *,
    orientations: int,
    seconds: float = 0.0,
) -> ExactCorrection:
    """The factors of a run at the coefficients ``at`` from the counts model's first-order
    terms across the tube: its one-phonon part with them
    (:meth:`~model_server.refinement.counts.CountsModel.first_order`, from the run's
    offsets' tensors ``tensor_d``, :func:`run_offset_tensors`) over the part without, per
    bin (1 below the floor). Like :func:`exact_correction`'s, they correct the model near
    ``at``; ``seconds``: what the tensors cost, added to the factors'."""
    at = np.asarray(at, dtype=float)
    t0 = time.perf_counter()
    plain = refiner.counts_model(moments)
    one = _one_phonon_part(plain, at, len(moments.weight))
    first = np.zeros_like(one)
    first[plain.bins] = plain.first_order(plain.theta(at), tensor_d)
    return ExactCorrection(
        factors=_factors(one, first)[0],
        additive=np.zeros_like(one),
        at=at,
        orientations=orientations,
        seconds=seconds + time.perf_counter() - t0,
    )


def _one_phonon_part(plain: CountsModel, at: NDArray[np.float64], n: int) -> NDArray[np.float64]:
    """(n,) the one-phonon part of the model ``plain`` (no fixed signal, no correction) at
    the coefficients ``at`` on the moments' ``n`` bins, 0 where it fits none."""
    one = np.zeros(n)
    one[plain.bins] = plain.evaluate(plain.theta(at), jacobian=False).expected
    return one


def _factors(
    one: NDArray[np.float64], target: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """The factors ``target / one`` per bin where the model's part ``one`` is above
    :data:`FLOOR` of its largest and ``target`` > 0, 1 elsewhere; and where they were made."""
    ok = (one > FLOOR * max(float(one.max()), 1e-300)) & (target > 0)
    factors = np.where(ok, target / np.where(ok, one, 1.0), 1.0)
    return np.asarray(factors, dtype=np.float64), ok


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
    first_order: bool = False,
) -> tuple[Refined, Refined, dict[str, Any]]:
    """:func:`model_server.refinement.refiner.refine_file`, then the fit again with the
    exact-fold correction made at its optimum (:func:`exact_correction`; about 19 s an
    orientation on one core), or with ``first_order`` the first-order terms' correction
    (:func:`first_order_correction`; the run's offsets' tensors, 1.4-2.8 s an
    orientation, made once for all passes); with ``passes`` > 1, the correction is made
    again at each corrected optimum and the fit repeated, so that the last correction is
    made within
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
    exact pass costs the exact fold again, so a caller can show the fits as they come.
    ``workers``: orientations folded exactly at a time (:func:`exact_run_fold`; the
    first-order tensors are made one orientation after another)."""
    from consumers.reduction.pipeline import run_folder

    if passes < 1:
        raise RefinementError(f"passes must be >= 1 (got {passes})")
    counts, run_start, omegas, charges, moments, refiner = file_inputs(path, first, progress)
    fit = refiner.refine(counts, moments, start, spread=spread)
    if not fit.converged:
        raise RefinementError(
            "the refinement did not converge: no optimum to make the correction at"
        )
    _, folder = run_folder(
        dict(run_start), tolerance=refiner.table.tolerance, wedge_mesh=refiner.wedge_mesh
    )
    assert isinstance(folder, Folder)  # read_counts_file's moments are single-crystal ones
    at = fit
    moved: list[float] = []
    kept: tuple[Refined, dict[str, Any]] | None = None
    tensor_d: NDArray[np.complex128] | None = None
    made = 0.0
    if first_order:
        t0 = time.perf_counter()
        tensor_d = run_offset_tensors(refiner, folder, omegas, charges, progress=progress)
        made = time.perf_counter() - t0
    for done in range(passes):
        if progress and passes > 1:
            kind = "first-order" if first_order else "exact-fold"
            print(f"{kind} correction, pass {done + 1} of {passes}", file=sys.stderr)
        if tensor_d is not None:
            correction = first_order_correction(
                refiner, moments, tensor_d, at.mean, orientations=len(omegas), seconds=made
            )
        else:
            correction = exact_correction(
                refiner,
                moments,
                folder,
                omegas,
                charges,
                at.mean,
                progress=progress,
                workers=workers,
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


@dataclass(frozen=True, slots=True)
class _Part:
    """One orientation's share of the live correction: the bins it reaches and, there,
    its exact one-phonon fold minus the counts model's one-phonon part (both at ``at``,
    times the orientation's exposure weight)."""

    omega: float
    weight: float
    at: NDArray[np.float64]
    bins: NDArray[np.int64]
    excess: NDArray[np.float64]
    seconds: float


class LiveExactCorrection:
    """The exact-fold correction of a running fit, made one orientation at a time on a
    background thread while the next orientation counts.

    Each completed orientation (:meth:`add`) is folded exactly
    (:func:`exact_one_phonon_fold`) at the running estimate's coefficients (:meth:`update`)
    and its counts model's one-phonon part is evaluated there from the orientation's own
    moments (:func:`~consumers.reduction.moments.orientation_moments`, the moments the
    run's snapshot summed); their difference per bin, times the orientation's exposure
    weight, is kept. :meth:`correction` turns the sum of the differences into the
    factors of :class:`~model_server.refinement.counts.ExactCorrection` against the run's
    one-phonon part at the running estimate: ``(model + excess) / model`` per bin, so that
    a bin reached by corrected and uncorrected orientations alike has the exact fold of
    the first plus the model of the others. With every orientation folded at one point
    ``c0``, the corrected model is the exact fold at ``c0`` to 0.06-0.09 % per bin
    (median, 2-4 orientations of the README's Ge run, against 3 % uncorrected): the model
    of the summed moments pools the orientations' offsets in a bin, so it is not quite
    the sum of their models (of one orientation, it is the exact fold, as the offline
    correction made at ``c0``, :func:`exact_correction`).

    When no orientation waits, the worker folds again the one made farthest (in the
    running estimate's std) from the running estimate, once that is more than
    ``refresh_std`` std away: the factors hold best near where they were made. About 19 s
    an orientation on one core (README's Ge set-up): inside a one-minute count, so a run
    counted in real time keeps its correction current on one spare core. The thread runs
    at ``nice`` (Linux: its own scheduling priority) below the live fit.

    Parameters
    ----------
    refiner
        The run's refiner (its binning: the path's or its zone classes').
    folder
        The run's folder (its fold table the refiner's).
    refresh_std
        How far, in std of the running estimate, an orientation's correction may have been
        made before it is made again when the worker is idle; ``inf``: never again.
    nice
        How much lower than the process the worker thread runs (Linux; elsewhere, as the
        process).
    pixel_stride
        As :func:`exact_one_phonon_fold`'s; the moments' (2) for a live run.
    start
        Start the worker thread (False: a correction that folds nothing, for checks).
    """

    def __init__(
        self,
        refiner: RunRefiner,
        folder: Folder,
        *,
        refresh_std: float = 1.0,
        nice: int = 10,
        pixel_stride: int = 2,
        start: bool = True,
    ) -> None:
        import threading

        if refiner.binning not in ("path", "classes"):
            raise RefinementError(
                f"the live exact-fold correction is made on the path's bins or its zone "
                f"classes, not on the {refiner.binning}'s"
            )
        if not refresh_std > 0:
            raise RefinementError(f"refresh_std must be > 0 std (got {refresh_std})")
        self.refiner = refiner
        self.folder = folder
        self.refresh_std = float(refresh_std)
        self.nice = int(nice)
        self.pixel_stride = int(pixel_stride)
        self._ops = (
            star_operations(folder, point_operations(refiner.setup.crystal))
            if refiner.classes is not None and refiner.classes.n_classes > 1
            else None
        )
        self._cond = threading.Condition()
        self._queue: list[int] = []  # orientations waiting for their first fold, in order
        self._added: list[tuple[float, float]] = []  # (omega, weight) of every orientation
        self._parts: dict[int, _Part] = {}
        #: (n_bins,) the kept parts' excess summed, kept as they come and go (a refresh
        #: takes its orientation's old part out), so that a fit's correction does not sum
        #: every part again (120 orientations of zone classes: 7 million elements)
        self._excess = np.zeros(refiner.grid.n_q * refiner.grid.n_e)
        self._at: NDArray[np.float64] | None = None
        self._std: NDArray[np.float64] | None = None
        #: orientations whose refresh failed: they keep their earlier fold, not retried
        self._gave_up: set[int] = set()
        #: the summary when the worker was stopped (its parts are let go then)
        self._final: dict[str, Any] | None = None
        #: no fold is made again from now on (the run is ending: :meth:`wait`)
        self._no_refresh = False
        self._busy = False
        self._closed = False
        #: folds made (first folds and refreshes), refreshes alone, failed folds
        self.folded = 0
        self.refreshed = 0
        self.failed = 0
        #: the last failure's message (a fold that fails is logged and not retried)
        self.error: str | None = None
        #: bumped whenever a fold is kept: a fit made before it did not use it
        self.version = 0
        self._thread = threading.Thread(target=self._work, name="exact-correction", daemon=True)
        if start:
            self._thread.start()

    def add(self, omega: float, weight: float) -> None:
        """A completed orientation at goniometer angle ``omega`` (deg) whose moments the
        run's snapshots hold times ``weight`` (its exposure weight: proton charge in uC, or
        the monitor's counts); queued for its exact fold. One with no exposure adds
        nothing to the snapshots: it is not folded."""
        if not (math.isfinite(omega) and math.isfinite(weight) and weight >= 0):
            raise RefinementError(
                f"an orientation needs a finite angle and exposure weight >= 0 (got "
                f"{omega}, {weight})"
            )
        if weight == 0:
            return
        with self._cond:
            self._added.append((float(omega), float(weight)))
            self._queue.append(len(self._added) - 1)
            self._cond.notify_all()

    def update(self, at: NDArray[np.float64], std: NDArray[np.float64]) -> None:
        """The running estimate: coefficients ``at`` and their std ((n_coeff,), eV/A^2),
        where the next folds are made and against which the made ones are judged."""
        at = np.asarray(at, dtype=float).copy()
        std = np.asarray(std, dtype=float).copy()
        if at.shape != (len(self.refiner.names),) or std.shape != at.shape:
            raise RefinementError(
                f"expected {len(self.refiner.names)} coefficients and std, got {at.shape}, "
                f"{std.shape}"
            )
        with self._cond:
            if self._closed:  # no fold is made any more
                return
            self._at, self._std = at, std
            self._cond.notify_all()

    def _distance(self, part: _Part) -> float:
        """How far (largest |difference| / std over the coefficients) ``part`` was made
        from the running estimate; 0 when there is none."""
        if self._at is None or self._std is None:
            return 0.0
        std = np.where(self._std > 0, self._std, np.inf)
        return float(np.max(np.abs(part.at - self._at) / std))

    def _next(self) -> tuple[int, NDArray[np.float64]] | None:
        """The next orientation to fold and where (under the lock), or None."""
        if self._at is None:
            return None
        if self._queue:
            return self._queue.pop(0), self._at.copy()
        due = self._refreshable()
        if not due:
            return None
        far = max(due, key=lambda k: self._distance(self._parts[k]))
        if self._distance(self._parts[far]) > self.refresh_std:
            return far, self._at.copy()
        return None

    def _refreshable(self) -> list[int]:
        """(under the lock) The folded orientations that may be folded again (none whose
        refresh failed; none with ``refresh_std`` inf)."""
        if self._no_refresh or not math.isfinite(self.refresh_std):
            return []
        return [k for k in self._parts if k not in self._gave_up]

    def _work(self) -> None:
        """The worker thread: folds what :meth:`_next` gives until :meth:`close`."""
        import logging
        import os
        import threading

        log = logging.getLogger(__name__)
        if self.nice > 0 and hasattr(os, "setpriority"):
            tid = threading.get_native_id()
            with contextlib.suppress(OSError):  # Linux: a thread's own priority
                now = os.getpriority(os.PRIO_PROCESS, tid)
                os.setpriority(os.PRIO_PROCESS, tid, min(19, now + self.nice))
        while True:
            with self._cond:
                job = None
                while not self._closed and (job := self._next()) is None:
                    self._cond.wait()
                if self._closed or job is None:
                    return
                self._busy = True
                index, at = job
                omega, weight = self._added[index]
            error: Exception | None = None
            try:
                part: _Part | None = self._fold(omega, weight, at)
            except Exception as exc:
                part, error = None, exc
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                if self._closed:  # stopped while it folded: let it go
                    return
                if part is not None:
                    try:
                        self._keep(index, part)
                    except Exception as exc:
                        error = exc
                if error is not None:  # the worker goes on
                    log.warning(
                        "exact fold of the orientation at %.3f deg failed: %s", omega, error
                    )
                    self.failed += 1
                    self.error = f"omega {omega:g} deg: {error}"
                    # not tried again: uncorrected (a first fold), or its earlier fold kept
                    self._gave_up.add(index)

    def _keep(self, index: int, part: _Part) -> None:
        """Keep ``part`` as the ``index``-th orientation's (in place of its earlier one)
        in the parts and their running sum."""
        with self._cond:
            old = self._parts.get(index)
            if len(part.bins) and part.bins[-1] >= len(self._excess):  # bins are sorted
                raise RefinementError(
                    f"a fold reaching bin {part.bins[-1]}, the correction's grid has "
                    f"{len(self._excess)}"
                )
            if old is not None:
                self.refreshed += 1
                self._excess[old.bins] -= old.excess  # a part's bins are distinct
            self._excess[part.bins] += part.excess
            self._parts[index] = part
            self.folded += 1
            self.version += 1

    def _fold(self, omega: float, weight: float, at: NDArray[np.float64]) -> _Part:
        """One orientation's :class:`_Part` at ``at``."""
        t0 = time.perf_counter()
        refiner = self.refiner
        classes = refiner.classes
        moments = orientation_moments(
            self.folder,
            refiner.constants,
            omega,
            pixel_stride=self.pixel_stride,
            inverse_ops=self._ops,
            classes=classes,
        )
        plain = refiner.counts_model(moments)
        one = _one_phonon_part(plain, at, moments.weight.shape[0])
        sqe = CoherentSQE(
            plain.basis, at, temperature=plain.temperature, resolution=plain.resolution
        )
        exact = exact_one_phonon_fold(
            self.folder,
            sqe,
            omega,
            classes=classes,
            inverse_ops=self._ops,
            pixel_stride=self.pixel_stride,
        ).reshape(-1)
        bins = np.flatnonzero((exact != 0) | (one != 0))
        if not (np.all(np.isfinite(exact[bins])) and np.all(np.isfinite(one[bins]))):
            raise RefinementError("the exact fold or the model is not finite")
        return _Part(
            omega=omega,
            weight=weight,
            at=at,
            bins=bins,
            excess=weight * (exact[bins] - one[bins]),
            seconds=time.perf_counter() - t0,
        )

    def correction(self, moments: BinMoments) -> ExactCorrection | None:
        """The correction of a fit of the run's ``moments`` (its snapshot's, the sum of the
        added orientations' at their weights) from the orientations folded so far, against
        their one-phonon part at the running estimate; None before the first fold."""
        n = moments.weight.shape[0]
        with self._cond:
            parts = list(self._parts.values())
            at = None if self._at is None else self._at.copy()
            excess = self._excess.copy()
            version = self.version
        if not parts or at is None:
            return None
        if len(excess) != n:
            raise RefinementError(
                f"the exact-fold correction was made on {len(excess)} bins, the snapshot's "
                f"moments have {n}"
            )
        plain = self.refiner.counts_model(moments)
        total = _one_phonon_part(plain, at, n)
        factors, ok = _factors(total, total + excess)
        additive = np.where(ok, 0.0, np.maximum(excess, 0.0))
        return ExactCorrection(
            factors=factors,
            additive=np.asarray(additive, dtype=np.float64),
            at=at,
            orientations=len(parts),
            seconds=float(sum(p.seconds for p in parts)),
            version=version,
        )

    def summary(self) -> dict[str, Any]:
        """JSON-ready state: orientations added, folded (their latest fold kept),
        waiting, folds made and refreshes, failures, the largest distance (std of the
        running estimate) of a kept fold from it, and the mean seconds of a fold."""
        with self._cond:
            if self._final is not None:
                return dict(self._final)
            parts = list(self._parts.values())
            far = max((self._distance(p) for p in parts), default=0.0)
            out: dict[str, Any] = {
                "orientations": len(self._added),
                "corrected": len(parts),
                "waiting": len(self._queue) + int(self._busy),
                "folds": self.folded,
                "refreshed": self.refreshed,
                "failed": self.failed,
                "made_within_std": round(far, 3),
                "fold_seconds": round(float(np.mean([p.seconds for p in parts])), 2)
                if parts
                else None,
            }
            if self.error is not None:
                out["error"] = self.error
        return out

    def idle(self) -> bool:
        """No orientation waits, no fold runs and none is due again."""
        with self._cond:
            return not self._busy and self._next_due() is False

    def _next_due(self) -> bool:
        """(under the lock) Whether the worker has something to fold now."""
        if self._at is None:
            return False
        if self._queue:
            return True
        due = self._refreshable()
        if not due:
            return False
        return max(self._distance(self._parts[k]) for k in due) > self.refresh_std

    def wait(
        self,
        timeout: float,
        cancelled: Callable[[], bool] | None = None,
        *,
        refreshes: bool = True,
    ) -> bool:
        """Wait at most ``timeout`` s until :meth:`idle` (``cancelled``, asked every half
        second, ends the wait); True when idle. ``refreshes=False`` (the run is ending):
        until every orientation added has had its first fold and none is under way; from
        then on no fold is made again (a refresh under way finishes)."""
        deadline = time.monotonic() + max(0.0, float(timeout))
        with self._cond:
            if not refreshes:
                self._no_refresh = True
                if self._at is None:  # nothing can be folded
                    return not self._busy and not self._queue
            while self._busy or (self._next_due() if refreshes else bool(self._queue)):
                if self._closed or not self._thread.is_alive():
                    return False
                left = deadline - time.monotonic()
                if left <= 0 or (cancelled is not None and cancelled()):
                    return False
                self._cond.wait(min(0.5, left))
            return True

    def close(self) -> None:
        """Stop the worker (a fold under way finishes on its own and is let go) and let
        the folds go (about 1 MB an orientation on Ge's zone classes); :meth:`summary`
        keeps saying what was made."""
        with self._cond:
            if self._closed:
                return
            self._final = self.summary()
            self._closed = True
            self._parts.clear()
            self._queue.clear()
            self._cond.notify_all()
