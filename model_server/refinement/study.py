"""The calibration study of the refinement: are its errors honest, and do they shrink as
they should? (``steer evaluate-posterior``).

For ``n_truths`` force-constant sets (the named sets of the material first: ``mlff_mean``,
``raman``, every model of the reference ensemble; then draws from the training domain,
with the coefficients the VAE does not vary at the reference mean; dynamically unstable
sets are skipped) and every level (the first ``k`` orientations of the README run's
rotation 0, 1, ..., 119 deg, times a count scale ``c``):

1. the expected counts ``lambda`` of every measured canonical bin come from the same
   :class:`~model_server.refinement.counts.CountsModel` the fit uses (exact modes at the
   path points, no phonon-table interpolation), with the scale and background of the
   README run (:func:`count_calibration`) times ``c``;
2. a Poisson replica of ``lambda`` is expanded to the whole grid (alias copies) with its
   exposure, as the folding pipeline would give it, and the VAE start (an injected
   :class:`StartFunction`: this module never imports the VAE) is taken from it;
3. the refinement (:class:`~model_server.refinement.refiner.RunRefiner`, its prior) fits
   it; ``z = (mean - truth) / std`` is recorded, with the Cramer-Rao bound: the diagonal
   of the inverse Fisher information ``J^T diag(1/lambda) J`` at the truth (plus the
   prior's precision) of the same model.

The statistics (:mod:`~model_server.refinement.posterior_stats`): per level, the coverage
of mean +- 1 and 2 std over FC0-FC3 (and over every coefficient), RMSE / sqrt(CRB), mean z
(bias / std) and the mean std per coefficient; over the levels, the log-log slope of the
mean std against the counts and per coefficient the chi^2 of the histogram of Phi(z)
against a uniform one (simulation-based calibration). Fits that fail or do not converge are
counted and left out of the statistics (an unstable VAE start is one such failure: the
service then falls back to the VAE).

Count scale 1 is the README run: 200,000 events per orientation over the whole detector,
a tenth of them flat background. The signal scale per orientation is the one
:func:`simulations.runs.simulate.simulate_run` calibrates for the truth (the mean
whole-detector signal of up to 8 evenly spaced orientations of the run); the background
amplitude spreads the background events as :meth:`OrientationSimulator.sample` does (pixel
by solid angle, flat in time of flight over ``[t(1.5 Ei), t(0.05 Ei)]``) on the moments'
background shape (checked against folded simulated events by the tests).

The cumulative moments of the levels are cached on disk under
:func:`consumers.reduction.table.table_cache_dir` (``moments/``, 36 MB a level on the Ge
grid, not pruned: remove the folder to free it), keyed by the folder's signature, the
structure constants, the moments' code and the angles; the whole README run's 120
orientations take about a minute to compute.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from consumers.reduction.folding import Folder
from consumers.reduction.moments import (
    BinMoments,
    StructureConstants,
    orientation_moments,
    star_operations,
)
from consumers.reduction.table import table_cache_dir
from model_server.exceptions import RefinementError
from model_server.refinement.counts import CountsModel
from model_server.refinement.fit import Prior
from model_server.refinement.posterior_stats import (
    SBC_BINS,
    FitRecord,
    finite_or_none,
    level_summary,
    over_levels,
    sbc_chi2,
    targets,
)
from model_server.refinement.refiner import WEDGE_MESH, RunRefiner
from simulations.fcdb.reference import ReferenceEnsemble
from simulations.instrument.spectrometer import Instrument, Orientation, energy_to_speed
from simulations.lattice.force_constants import FCBasis
from simulations.lattice.grid import Grid, ZoneClasses
from simulations.lattice.sqe import mesh_points
from simulations.units import E_PER_V2, VASP_TO_THZ

__all__ = [
    "README_ANGLES",
    "CountCalibration",
    "StartFunction",
    "StudySettings",
    "Truth",
    "background_per_event",
    "count_calibration",
    "cramer_rao",
    "cumulative_moments",
    "is_stable",
    "posterior_study",
    "study_truths",
]

logger = logging.getLogger(__name__)

#: The README run's goniometer angles, degrees (``steer simulate run --omegas 0:120:1``).
README_ANGLES = tuple(float(w) for w in range(120))

#: Frequency (THz) below which a truth's mode counts as imaginary (the forward model's).
IMAGINARY_TOL_THZ = 0.05

#: The refinement's binnings (:attr:`StudySettings.binning`).
BINNINGS = ("path", "wedge", "classes")

#: Version of the cached cumulative moments' file layout.
_CACHE_FORMAT = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class StudySettings:
    """What :func:`posterior_study` runs.

    Attributes
    ----------
    material
        Shipped material with a reference FC set.
    n_truths
        Force-constant sets (named sets first, then training-domain draws).
    seed
        Seed of the draws and of the Poisson replicas.
    orientations
        Levels: the first ``k`` angles of ``angles`` each.
    count_scales
        Count levels: multiples of the README run's counts (signal and background).
    angles
        Goniometer angles of the run, degrees, in measurement order.
    events_per_orientation, background_fraction
        Count scale 1: events per orientation over the whole detector, and their
        background share (the README run's).
    ei
        Incident energy, meV (default: the material's).
    temperature
        Sample temperature, K.
    u, v
        Orientation vectors of the mounted crystal.
    max_iter
        Levenberg-Marquardt iterations per fit.
    cache
        Keep the cumulative moments on disk.
    binning
        What the refinement fits: ``"path"`` (the folding tube around the q-path, the
        service's default) or ``"wedge"`` (every event of the zone, binned on the
        irreducible points of a Gamma-centred ``wedge_mesh^3`` mesh:
        :meth:`RunRefiner.wedge`) or ``"classes"`` (the path's bins split by the
        structure-factor class of each cell's zone: :meth:`RunRefiner.zone_split`); the
        VAE's start comes from the path's I(q, E) in every case (for ``"classes"`` the sum
        of the classes' counts).
    wedge_mesh
        Points per axis of the wedge's mesh.
    """

    material: str = "Ge"
    n_truths: int = 20
    seed: int = 0
    orientations: tuple[int, ...] = (1, 2, 5, 10, 20, 60, 120)
    count_scales: tuple[float, ...] = (0.25, 1.0, 4.0)
    angles: tuple[float, ...] = README_ANGLES
    events_per_orientation: float = 2e5
    background_fraction: float = 0.1
    ei: float | None = None
    temperature: float = 5.0
    u: tuple[float, float, float] = (1.0, 0.0, 0.0)
    v: tuple[float, float, float] = (0.0, 1.0, 0.0)
    max_iter: int = 40
    cache: bool = True
    binning: str = "path"
    wedge_mesh: int = WEDGE_MESH

    def validate(self) -> None:
        """Raise :class:`RefinementError` for settings the study cannot run."""
        if self.n_truths < 1:
            raise RefinementError(f"--truths must be >= 1, got {self.n_truths}")
        if not self.orientations:
            raise RefinementError("give at least one orientation count (--orientations)")
        n = len(self.angles)
        for k in self.orientations:
            if not 1 <= k <= n:
                raise RefinementError(
                    f"orientation count {k} is outside 1..{n} (the run has {n} orientations)"
                )
        if len(set(self.orientations)) != len(self.orientations):
            raise RefinementError(f"orientation counts repeat: {list(self.orientations)}")
        if not self.count_scales:
            raise RefinementError("give at least one count scale (--count-scales)")
        for c in self.count_scales:
            if not (math.isfinite(c) and c > 0):
                raise RefinementError(f"count scales must be finite and > 0, got {c}")
        if len(set(self.count_scales)) != len(self.count_scales):
            raise RefinementError(f"count scales repeat: {list(self.count_scales)}")
        if not (math.isfinite(self.events_per_orientation) and self.events_per_orientation > 0):
            raise RefinementError(
                f"events per orientation must be > 0, got {self.events_per_orientation}"
            )
        if not 0 <= self.background_fraction < 1:
            raise RefinementError(
                f"background fraction must be within [0, 1), got {self.background_fraction}"
            )
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise RefinementError(f"temperature must be >= 0 K, got {self.temperature}")
        if self.max_iter < 1:
            raise RefinementError(f"max_iter must be >= 1, got {self.max_iter}")
        if self.binning not in BINNINGS:
            raise RefinementError(
                f"binning must be one of {', '.join(BINNINGS)}, got {self.binning!r}"
            )
        if self.wedge_mesh < 2:
            raise RefinementError(f"the wedge mesh needs >= 2 points, got {self.wedge_mesh}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the ``settings`` of the study's result)."""
        return {
            "material": self.material,
            "n_truths": self.n_truths,
            "seed": self.seed,
            "orientations": list(self.orientations),
            "count_scales": list(self.count_scales),
            "angles_deg": [self.angles[0], self.angles[-1], len(self.angles)],
            "events_per_orientation": self.events_per_orientation,
            "background_fraction": self.background_fraction,
            "ei_meV": self.ei,
            "temperature_K": self.temperature,
            "u": list(self.u),
            "v": list(self.v),
            "max_iter": self.max_iter,
            "binning": self.binning,
        } | ({"wedge_mesh": self.wedge_mesh} if self.binning == "wedge" else {})


class StartFunction(Protocol):
    """The VAE's estimate of a folded spectrum: the refinement's start.

    Called with ``intensity`` ((n_q, n_E) float, counts / exposure, NaN where unmeasured)
    and ``mask`` ((n_q, n_E) bool, True where measured); returns the means by coefficient
    name (eV/A^2), or ``(means, stds)`` to report the VAE's own errors beside the
    refinement's.
    """

    def __call__(
        self, intensity: NDArray[np.float64], mask: NDArray[np.bool_]
    ) -> Mapping[str, float] | tuple[Mapping[str, float], Mapping[str, float]]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Truth:
    """A true force-constant set of the study.

    Attributes
    ----------
    name
        The named set, or ``domain-<i>`` for a draw from the training domain.
    coefficients
        (n_coeff,) eV/A^2, in the basis's order.
    """

    name: str
    coefficients: NDArray[np.float64]


@dataclass(frozen=True, slots=True, kw_only=True)
class CountCalibration:
    """The counts of one orientation at count scale 1 for a truth.

    Attributes
    ----------
    log_scale
        ``log s``: counts per unit of the model's signal per orientation (unit charge).
    background
        The background amplitude on the moments' background shape per orientation.
    signal_per_scale
        Mean whole-detector signal of an orientation per unit scale (mbarn sr per atom).
    """

    log_scale: float
    background: float
    signal_per_scale: float


# -- truths --------------------------------------------------------------------------------


def is_stable(basis: FCBasis, grid: Grid, coefficients: NDArray[np.float64]) -> bool:
    """Whether no mode is imaginary (below ``-IMAGINARY_TOL_THZ``) on the path or on a
    Gamma-centred 8^3 mesh."""
    q = np.concatenate([np.asarray(grid.qpath.qpoints, dtype=float), mesh_points(8)])
    d = np.einsum("k,kqij->qij", np.asarray(coefficients, dtype=float), basis.dynamical_basis(q))
    lowest = float(np.linalg.eigvalsh(d).min())
    return lowest >= -((IMAGINARY_TOL_THZ / VASP_TO_THZ) ** 2)


def named_set_order(ref: ReferenceEnsemble) -> list[str]:
    """The material's named FC sets as truths come from them: ``mlff_mean``, ``raman``,
    then the ML force fields'."""
    names = ref.fc_set_names()
    order: list[str] = [n for n in ("mlff_mean", "raman") if n in names]
    return order + [n for n in names if n not in order]


def study_truths(
    ref: ReferenceEnsemble, basis: FCBasis, grid: Grid, n: int, rng: np.random.Generator
) -> tuple[list[Truth], int]:
    """``n`` stable truths: the named sets (``mlff_mean``, ``raman``, the models), then
    draws of the kept coefficients uniform in the training domain (the others at the
    reference mean). Returns them and the number of unstable sets skipped."""
    from simulations.fcdb.dataset import sample_domain
    from simulations.fcdb.reference import named_fc_set

    order = named_set_order(ref)
    truths: list[Truth] = []
    skipped = 0
    for name in order:
        if len(truths) == n:
            break
        c = named_fc_set(ref.material, name)
        if is_stable(basis, grid, c):
            truths.append(Truth(name=name, coefficients=c))
        else:
            skipped += 1
    kept = ref.kept_index
    drawn = 0
    while len(truths) < n:
        if drawn > 50 * n:
            raise RefinementError(
                f"only {len(truths)} of {drawn} draws from the training domain are stable"
            )
        c = ref.mean.copy()
        c[kept] = sample_domain(ref.domain, 1, rng)[0]
        drawn += 1
        if is_stable(basis, grid, c):
            truths.append(Truth(name=f"domain-{drawn - 1}", coefficients=c))
        else:
            skipped += 1
    return truths, skipped


# -- counts --------------------------------------------------------------------------------


def background_per_event(instrument: Instrument, ei: float) -> float:
    """The background amplitude (on the moments' ``background`` shape, in (ms/m)^3) of one
    flat background event per orientation, spread as the event simulator spreads it.

    A background event lands on pixel p with probability ``dOmega_p / Omega`` and at a
    time of flight uniform over ``L2 (1/v(0.05 Ei) - 1/v(1.5 Ei))``; a cell of energy width
    dE holds ``dt = L2 dE / (2 E_PER_V2 v_f^3)`` of it, so its expected count is
    ``dOmega dE / v_f^3 / (Omega 2 E_PER_V2 (1/v(0.05 Ei) - 1/v(1.5 Ei)))`` (L2 cancels).
    """
    span = float(1.0 / energy_to_speed(0.05 * ei) - 1.0 / energy_to_speed(1.5 * ei))  # s/m
    omega = float(np.sum(instrument.solid_angles))  # sr
    ms_per_m_cubed = 1e-9  # the shape is in (ms/m)^3: (1e-3 s/m)^3
    return ms_per_m_cubed / (omega * 2.0 * E_PER_V2 * span)


def count_calibration(
    refiner: RunRefiner,
    orientation: Orientation,
    coefficients: NDArray[np.float64],
    angles: Sequence[float],
    *,
    events_per_orientation: float,
    background_fraction: float,
) -> CountCalibration:
    """The scale and background of count scale 1 for the truth ``coefficients``: the
    README run's signal (as :func:`simulations.runs.simulate.simulate_run` calibrates it)
    and background events per orientation."""
    from simulations.instrument.events import OrientationSimulator
    from simulations.lattice.sqe import CoherentSQE
    from simulations.runs.simulate import calibration_angles

    model = CoherentSQE(
        refiner.setup.basis,
        np.asarray(coefficients, dtype=float),
        temperature=refiner.temperature,
        resolution=refiner.resolution,
    )
    sim = OrientationSimulator(model, refiner.instrument, orientation, refiner.ei)
    signal = float(np.mean([sim.expected(float(w)).sum() for w in calibration_angles(angles)]))
    if not signal > 0:
        raise RefinementError("the truth gives no signal on the detector: cannot calibrate")
    n_signal = (1.0 - background_fraction) * events_per_orientation
    n_background = background_fraction * events_per_orientation
    return CountCalibration(
        log_scale=math.log(n_signal / signal),
        background=n_background * background_per_event(refiner.instrument, refiner.ei),
        signal_per_scale=signal,
    )


# -- moments -------------------------------------------------------------------------------


def _moments_key(
    folder: Folder,
    constants: StructureConstants,
    angles: Sequence[float],
    classes: ZoneClasses | None = None,
) -> str:
    """Hash of everything the cumulative moments of ``angles`` depend on."""
    import consumers.reduction.moments as moments_module

    h = hashlib.blake2b(digest_size=16)
    h.update(Path(str(moments_module.__file__)).read_bytes())
    h.update(folder.signature.encode())
    h.update(constants.digest().encode())
    h.update(np.asarray([*angles, _CACHE_FORMAT], dtype=np.float64).tobytes())
    if classes is not None and classes.n_classes > 1:
        h.update(classes.digest().encode())
    return h.hexdigest()


def _read_moments(path: Path) -> BinMoments | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            return BinMoments.from_arrays({k: f[k] for k in f.files}, prefix="")
    except FileNotFoundError:
        return None
    except Exception as exc:  # a damaged file: computed again and overwritten
        logger.warning("cached moments %s unreadable (%s): computing them again", path, exc)
        return None


def _write_moments(path: Path, moments: BinMoments) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp.npz")
        np.savez(tmp, allow_pickle=False, **moments.arrays(prefix=""))
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("moments not cached in %s: %s", path.parent, exc)


def cumulative_moments(
    folder: Folder,
    constants: StructureConstants,
    angles: Sequence[float],
    levels: Sequence[int],
    *,
    cache_dir: Path | None = None,
    progress: bool = False,
    classes: ZoneClasses | None = None,
) -> Iterator[tuple[int, BinMoments]]:
    """Yield ``(k, moments of the first k angles)`` (unit charge each) for every ``k`` of
    ``levels`` in ascending order; only the running sum is held.

    With ``cache_dir`` (e.g. ``table_cache_dir() / "moments"``) each level is read from
    there when it was computed before, and written there when not. With ``classes`` the
    bins are split by zone class (:func:`~consumers.reduction.moments.orientation_moments`).
    """
    from tqdm import tqdm

    ops = star_operations(folder, constants.operations)
    n_classes = 1 if classes is None else classes.n_classes
    n_bins = folder.grid.n_q * n_classes * folder.grid.n_e
    acc = BinMoments.zeros(n_bins, constants.n_branches)
    done = 0
    todo = sorted(set(levels))
    with tqdm(
        total=todo[-1] if todo else 0, desc="moments", unit="orient", disable=not progress
    ) as bar:
        for k in todo:
            path = None
            if cache_dir is not None:
                key = _moments_key(folder, constants, angles[:k], classes)
                path = cache_dir / f"cumulative-{key}.npz"
                hit = _read_moments(path)
                if hit is not None and hit.n_orientations == k:
                    acc, done = hit, k
                    bar.update(k - bar.n)
                    yield k, hit.copy()
                    continue
            for w in angles[done:k]:
                acc.add(
                    orientation_moments(
                        folder, constants, float(w), inverse_ops=ops, classes=classes
                    ),
                    1.0,
                )
                bar.update(1)
            done = k
            if path is not None:
                _write_moments(path, acc)
            yield k, acc.copy()


# -- one fit -------------------------------------------------------------------------------


def cramer_rao(model: CountsModel, theta: NDArray[np.float64], prior: Prior) -> NDArray[np.float64]:
    """(n_coeff,) the Cramer-Rao bound of the coefficients ((eV/A^2)^2): the diagonal of
    the inverse of the Fisher information ``J^T diag(1/lambda) J`` at ``theta`` plus the
    prior's precision."""
    ev = model.evaluate(theta)
    assert ev.jacobian is not None
    jac, lam = ev.jacobian, ev.expected
    prec = np.concatenate([prior.precision, np.zeros(model.n_params - model.n_coefficients)])
    fisher = jac.T @ (jac / lam[:, None]) + np.diag(prec)
    try:
        cov = np.linalg.inv(fisher)
    except np.linalg.LinAlgError:
        cov = np.linalg.pinv(fisher)
    return np.asarray(np.diag(cov)[: model.n_coefficients], dtype=np.float64)


def _split_start(
    out: Mapping[str, float] | tuple[Mapping[str, float], Mapping[str, float]],
) -> tuple[dict[str, float], dict[str, float]]:
    if isinstance(out, tuple):
        mean, std = out
        return {k: float(v) for k, v in mean.items()}, {k: float(v) for k, v in std.items()}
    return {k: float(v) for k, v in out.items()}, {}


@dataclass(frozen=True, slots=True, kw_only=True)
class _Level:
    """The models and the VAE's view of one orientation level."""

    k: int
    moments: BinMoments
    model: CountsModel  # the fit's (fitted bins)
    full: CountsModel  # every measured canonical bin (the data the VAE sees)
    alias: NDArray[np.int64]
    view: _Level | None = None  # the path's level, whose I(q, E) the VAE sees (wedge fits)


def _replica(
    level: _Level, lam_full: NDArray[np.float64], rng: np.random.Generator
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_]]:
    """A Poisson replica of the expected counts of every measured canonical bin, expanded
    to the whole grid: (counts, intensity (NaN where unmeasured), mask), all (n_q, n_E)."""
    grid = level.full.grid
    canonical = np.zeros(grid.n_q * grid.n_e)
    canonical[level.full.bins] = rng.poisson(lam_full)
    counts = canonical.reshape(grid.shape)[level.alias]
    exposure = level.moments.weight.reshape(grid.shape)[level.alias]
    mask = exposure > 0
    intensity = np.where(mask, counts / np.where(mask, exposure, 1.0), np.nan)
    return counts, intensity, mask


def _path_view(
    level: _Level, counts: NDArray[np.float64], classes: ZoneClasses
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """The path's (intensity, mask), (n_q, n_E), of counts split by zone class
    ((n_q * n_classes, n_E)): the classes' counts and exposures summed."""
    grid = level.full.grid
    exposure = level.moments.weight.reshape(grid.shape)[level.alias]
    c = classes.merge(counts)
    w = classes.merge(exposure)
    mask = w > 0
    return np.where(mask, c / np.where(mask, w, 1.0), np.nan), mask


def _fit_one(
    refiner: RunRefiner,
    level: _Level,
    truth: Truth,
    theta: NDArray[np.float64],
    lam_full: NDArray[np.float64],
    scale: float,
    start_fn: StartFunction,
    rng: np.random.Generator,
    max_iter: int,
    view_lam: NDArray[np.float64] | None = None,
) -> FitRecord:
    """Simulate, start from the VAE, refine, and compare with the truth and its CRB.

    ``theta``: the true parameter vector of the fit's model at count scale ``scale``;
    ``lam_full``: the expected counts of every measured canonical bin (:attr:`_Level.full`)
    at that scale; ``view_lam``: those of the path's level (:attr:`_Level.view`) when the
    fit bins another way, whose replica (drawn after the fit's) the VAE sees.
    """
    t0 = time.perf_counter()
    k = level.model.n_coefficients
    nan = np.full(k, np.nan)
    record: dict[str, Any] = {
        "truth": truth.name,
        "orientations": level.k,
        "count_scale": float(scale),
        "converged": False,
        "error": nan,
        "std": nan,
        "crb": nan,
    }
    counts, intensity, mask = _replica(level, lam_full, rng)
    if level.view is not None and view_lam is not None:
        _, intensity, mask = _replica(level.view, view_lam, rng)
    elif refiner.classes is not None and refiner.classes.n_classes > 1:
        intensity, mask = _path_view(level, counts, refiner.classes)
    record["counts"] = float(level.model.observed(counts).sum())
    try:
        vae_mean, vae_std = _split_start(start_fn(intensity, mask))
    except Exception as exc:  # whatever the injected start raises: this fit has no start
        return FitRecord(**record, reason=f"start: {exc}", wall_seconds=time.perf_counter() - t0)
    names = refiner.names
    record["vae_error"] = {
        n: v - float(truth.coefficients[names.index(n)]) for n, v in vae_mean.items() if n in names
    }
    record["vae_std"] = {n: v for n, v in vae_std.items() if n in names}
    try:
        fit = refiner.refine(
            counts,
            level.moments,
            [vae_mean],
            model=level.model,
            spread=vae_std or None,
            max_iter=max_iter,
        )
    except RefinementError as exc:
        return FitRecord(
            **record, reason=f"refinement: {exc}", wall_seconds=time.perf_counter() - t0
        )
    record |= {
        "converged": fit.converged,
        "error": fit.mean - truth.coefficients,
        "std": fit.std,
        "crb": cramer_rao(level.model, theta, refiner.prior),
        "deviance_per_dof": fit.deviance_per_dof,
        "iterations": fit.iterations,
        "seconds": fit.seconds,
        "start": fit.start,
    }
    reason = "" if fit.converged else f"not converged in {fit.iterations} iterations"
    return FitRecord(**record, reason=reason, wall_seconds=time.perf_counter() - t0)


# -- the study -----------------------------------------------------------------------------


def _build_level(
    refiner: RunRefiner, k: int, moments: BinMoments, view: _Level | None = None
) -> _Level:
    """The fit's model and the full model (every measured canonical bin) of a level."""
    full = refiner.model(moments, exclusion=-1.0)  # every measured bin, zone centres too
    return _Level(
        k=k,
        moments=moments,
        model=refiner.model(moments),
        full=full,
        alias=refiner.alias,
        view=view,
    )


def _check_truths(truths: Sequence[Truth], n_coeff: int) -> list[Truth]:
    out = list(truths)
    if not out:
        raise RefinementError("the study needs at least one truth")
    for t in out:
        if np.shape(t.coefficients) != (n_coeff,):
            raise RefinementError(
                f"truth {t.name!r} has {np.shape(t.coefficients)} coefficients, the basis {n_coeff}"
            )
    return out


def _level_fits(
    refiner: RunRefiner,
    level: _Level,
    truths: Sequence[Truth],
    calib: Sequence[CountCalibration],
    settings: StudySettings,
    start_fn: StartFunction,
    bar: Any,
) -> dict[float, list[FitRecord]]:
    """Every truth at every count scale of one level, by count scale."""
    scales = settings.count_scales
    fits: dict[float, list[FitRecord]] = {c: [] for c in scales}
    for ti, (truth, cal) in enumerate(zip(truths, calib, strict=True)):
        unit = level.full.theta(
            truth.coefficients, log_scale=cal.log_scale, background=cal.background
        )
        lam_full = np.maximum(level.full.evaluate(unit, jacobian=False).expected, 0.0)
        view_lam = None
        if level.view is not None:
            view_unit = level.view.full.theta(
                truth.coefficients, log_scale=cal.log_scale, background=cal.background
            )
            view_lam = np.maximum(level.view.full.evaluate(view_unit, jacobian=False).expected, 0)
        for si, c in enumerate(scales):
            theta = level.model.theta(
                truth.coefficients,
                log_scale=cal.log_scale + math.log(c),
                background=c * cal.background,
            )
            # one stream per (truth, level, scale): a fit's replica does not depend on
            # which other levels or truths the study has
            rng = np.random.default_rng([settings.seed, 1, ti, level.k, si])
            fits[c].append(
                _fit_one(
                    refiner,
                    level,
                    truth,
                    theta,
                    c * lam_full,
                    c,
                    start_fn,
                    rng,
                    settings.max_iter,
                    None if view_lam is None else c * view_lam,
                )
            )
            bar.update(1)
    return fits


def posterior_study(
    settings: StudySettings,
    start_fn: StartFunction,
    *,
    progress: bool = False,
    instrument: Instrument | None = None,
    truths: Sequence[Truth] | None = None,
    records: list[FitRecord] | None = None,
) -> dict[str, Any]:
    """Run the calibration study (module docstring) and return its JSON-ready result.

    ``start_fn`` gives the refinement's start (the VAE's estimate) of every simulated
    spectrum; ``truths`` replaces the drawn truths (``settings.n_truths`` is then ignored);
    ``instrument`` defaults to :meth:`Instrument.arcs_like`; ``records``, when given, gets
    every fit's :class:`FitRecord` appended (the summaries do not keep them).

    Returns ``levels`` (per orientation count and count scale, in that order:
    ``coverage_1sigma``, ``coverage_2sigma``, ``rmse_over_crb``, ``bias_over_std``,
    ``mean_std`` by name, and :func:`~model_server.refinement.posterior_stats.level_summary`'s
    extras), ``std_count_slope``, ``sbc_chi2`` and ``sbc_p_value`` by name,
    ``std_ratio_120_over_1`` (FC0, per count scale) when both levels exist, ``truths``,
    ``settings``, ``targets``, ``n_fits``, ``converged_fraction`` and ``seconds``; None
    where nothing could be computed (no converged fit).

    Raises
    ------
    RefinementError
        For settings it cannot run (:meth:`StudySettings.validate`), a material without a
        reference FC set, or a training domain that is mostly unstable.
    """
    from tqdm import tqdm

    from simulations.fcdb.reference import load_reference
    from simulations.lattice.materials import setup

    t0 = time.perf_counter()
    settings.validate()
    ms = setup(settings.material)
    instrument = instrument or Instrument.arcs_like()
    ei = float(settings.ei if settings.ei is not None else ms.defaults.ei)
    path_refiner = RunRefiner(
        settings.material, instrument, ei, settings.temperature, material_setup=ms
    )
    refiner = path_refiner
    if settings.binning == "wedge":
        refiner = RunRefiner.wedge(
            settings.material,
            instrument,
            ei,
            settings.temperature,
            mesh=settings.wedge_mesh,
            material_setup=ms,
        )
    elif settings.binning == "classes":
        refiner = RunRefiner.zone_split(
            settings.material, instrument, ei, settings.temperature, material_setup=ms
        )
    orientation = Orientation.from_vectors(ms.crystal, settings.u, settings.v)
    path_folder = Folder(path_refiner.table, ms.grid, instrument, orientation, ei)
    folder = (
        path_folder  # the classes split the path's cells
        if refiner.classes is not None
        else Folder(refiner.table, refiner.grid, instrument, orientation, ei)
    )
    names = refiner.names
    skipped = 0
    if truths is None:
        rng = np.random.default_rng([settings.seed, 0])
        ref = load_reference(settings.material)
        truths, skipped = study_truths(ref, ms.basis, ms.grid, settings.n_truths, rng)
    truths = _check_truths(truths, len(names))
    calib = [
        count_calibration(
            refiner,
            orientation,
            t.coefficients,
            settings.angles,
            events_per_orientation=settings.events_per_orientation,
            background_fraction=settings.background_fraction,
        )
        for t in tqdm(truths, desc="calibration", unit="truth", disable=not progress)
    ]
    levels = sorted(settings.orientations)
    summaries: list[dict[str, Any]] = []
    every: list[FitRecord] = []
    n_fits = len(levels) * len(truths) * len(settings.count_scales)
    cache_dir = table_cache_dir() / "moments" if settings.cache else None
    views: Iterator[tuple[int, BinMoments] | None] = itertools.repeat(None)
    if settings.binning == "wedge":  # the VAE's view: the path's moments of each level
        views = cumulative_moments(
            path_folder, refiner.constants, settings.angles, levels, cache_dir=cache_dir
        )
    with tqdm(total=n_fits, desc="fits", unit="fit", disable=not progress) as bar:
        for (k, moments), path_level in zip(
            cumulative_moments(
                folder,
                refiner.constants,
                settings.angles,
                levels,
                cache_dir=cache_dir,
                progress=progress,
                classes=refiner.classes,
            ),
            views,
            strict=False,  # views repeats None for ever on the path
        ):
            view = None if path_level is None else _build_level(path_refiner, *path_level)
            level = _build_level(refiner, k, moments, view)
            fits = _level_fits(refiner, level, truths, calib, settings, start_fn, bar)
            for c, level_records in fits.items():
                summary = level_summary(
                    level_records, names, events=k * c * settings.events_per_orientation
                )
                summaries.append(summary)
                every += level_records
                logger.info(
                    "%d orientations x %g counts: %d/%d converged, 1/2 sigma coverage %.2f/%.2f",
                    k,
                    c,
                    summary["n_converged"],
                    summary["n_fits"],
                    summary["coverage_1sigma"],
                    summary["coverage_2sigma"],
                )
            del level, moments, view
    if records is not None:
        records += every
    sbc, sbc_p = sbc_chi2(every, names)
    result: dict[str, Any] = {
        "levels": summaries,
        **over_levels(summaries, names, len(settings.angles)),
        "sbc_chi2": sbc,
        "sbc_p_value": sbc_p,
        "sbc_bins": SBC_BINS,
    }
    result |= {
        "n_fits": len(every),
        "converged_fraction": sum(f.converged for f in every) / max(len(every), 1),
        "mean_seconds_per_fit": _mean_of([f.wall_seconds for f in every]),
        "mean_refine_seconds_per_fit": _mean_of([f.seconds for f in every if f.converged]),
        "truths": [t.name for t in truths],
        "n_unstable_skipped": skipped,
        "names": list(names),
        "settings": settings.to_dict() | {"ei_meV": ei, "instrument": instrument.name},
    }
    result["targets"] = targets(result, names)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return dict(finite_or_none(result))


def _mean_of(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan
