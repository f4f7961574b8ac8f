"""The Poisson-likelihood refinement of a powder run: force constants from S(|Q|, E) counts.

The counts of the bins above the elastic line are modelled as::

    lambda(|Q|, E) = k [S_1(|Q|, E; c) + S_mp(|Q|, E)] X(|Q|, E) + b T(|Q|, E)

* ``S_1``: the coherent one-phonon powder average of the coefficients ``c``
  (:class:`~simulations.lattice.powder_forward.PowderForwardModel`, the shell average
  on a ``mesh``^3 q mesh, averaged over each energy bin), mbarn/(sr meV) per atom;
* ``S_mp``: the sample's multiphonon scattering (orders 2-3, incoherent approximation:
  :class:`~simulations.lattice.backgrounds.IncoherentScattering`), a fixed template made
  with the phonons of the fit's start and made again at the optimum when the coefficients
  moved by more than 1 % (then the fit is repeated once from there);
* ``X``: the exposure of the folded run (proton charge x sr meV);
* ``T``: the share of a background flat in time of flight in each bin
  (:meth:`~consumers.reduction.powder.PowderFolder.flat_background`), ``b`` its events;
* ``k``: one scale (flux x sample size), fitted as ``log k``.

Levenberg-Marquardt on the Poisson deviance with the Fisher information
``F = J^T diag(1/lambda) J``; the Jacobian in the coefficients by forward differences (the
forward model evaluates the base set and the shifted ones in one batch), exact in
``log k`` and ``b``. Covariance: the Laplace approximation ``F^-1`` at the optimum, times
Pearson's chi^2 per degree of freedom when that exceeds 1 (as the single-crystal
refinement does). The result is a :class:`~model_server.refinement.fit.Refined`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from consumers.reduction.powder import PowderFolder
from model_server.exceptions import RefinementError
from model_server.refinement.fit import Refined, deviance, laplace_covariance
from simulations.exceptions import SimulationError
from simulations.instrument.spectrometer import Instrument
from simulations.lattice.backgrounds import elastic_reach, powder_multiphonon
from simulations.lattice.grid import PowderGrid
from simulations.lattice.materials import setup
from simulations.lattice.powder import POWDER_Q_SIGMA
from simulations.lattice.powder_forward import PowderForwardModel
from simulations.lattice.sqe import CoherentSQE

__all__ = [
    "PowderRefiner",
    "PowderRun",
    "powder_run_from_file",
    "reference_start",
    "refine_powder_file",
]

logger = logging.getLogger(__name__)

#: q mesh of the refinement's shell average (points per axis).
POWDER_FIT_MESH = 32
#: Relative change of the coefficients beyond which the multiphonon template is remade.
TEMPLATE_TOLERANCE = 0.01
#: Relative step of the forward differences of the coefficients.
_FD_STEP = 1e-4
#: Bins with fewer expected counts than this share of the mean are still fitted; none is
#: dropped for its counts (the deviance handles zeros).
NUISANCE_NAMES = ("log_scale", "background")


@dataclass(frozen=True, slots=True, kw_only=True)
class PowderRun:
    """What the refinement needs of a folded powder run.

    Attributes
    ----------
    counts, exposure
        (n_Q, n_E) float: folded counts and exposure (uC sr meV).
    grid
        The run's powder grid.
    material, ei, temperature
        Shipped material, Ei (meV), sample temperature (K).
    instrument
        The detector (for the flat background's shape).
    q_sigma
        Gaussian |Q| resolution, 1/A (a simulated run's records it; else
        :data:`~simulations.lattice.powder.POWDER_Q_SIGMA`).
    """

    counts: NDArray[np.float64]
    exposure: NDArray[np.float64]
    grid: PowderGrid
    material: str
    ei: float
    temperature: float
    instrument: Instrument
    q_sigma: float = POWDER_Q_SIGMA


class PowderRefiner:
    """Fit a powder run's counts (the module docstring).

    Parameters
    ----------
    run
        The folded run.
    shells
        Neighbour shells of the force-constant model (2: the 5 coefficients of Al to the
        2nd neighbour, as the powder-VAE paper fitted).
    fixed
        Values (eV/A^2) of coefficients of the basis held fixed (default: none).
    mesh
        q mesh of the shell average.
    q_sigma
        |Q| resolution of the model, 1/A (default: the run's).
    """

    def __init__(
        self,
        run: PowderRun,
        *,
        shells: int = 2,
        fixed: dict[str, float] | None = None,
        mesh: int = POWDER_FIT_MESH,
        q_sigma: float | None = None,
    ) -> None:
        if run.counts.shape != run.grid.shape or run.exposure.shape != run.grid.shape:
            raise RefinementError(
                f"counts {run.counts.shape} and exposure {run.exposure.shape} are not on the "
                f"powder grid {run.grid.shape}"
            )
        self.run = run
        self.setup = setup(run.material, shells=shells)
        basis = self.setup.basis
        fixed = dict(fixed or {})
        unknown = sorted(set(fixed) - set(basis.names))
        if unknown:
            raise RefinementError(f"no coefficients {unknown} in {basis.names}")
        self.names = tuple(n for n in basis.names if n not in fixed)
        reference = np.array([fixed.get(n, 0.0) for n in basis.names])
        self.resolution = run.instrument.resolution(run.ei)
        self.forward = PowderForwardModel(
            basis,
            run.grid.q_centres,
            run.grid.energy_edges,
            self.resolution,
            run.temperature,
            average="shells",
            mesh=mesh,
            q_sigma=run.q_sigma if q_sigma is None else q_sigma,
            bins=True,
            dw_mesh=12,
            free=self.names,
            reference=reference,
        )
        self._reference = reference
        folder = PowderFolder(run.grid, run.instrument, run.ei)
        e = run.grid.energy_centres
        self.fitted = (run.exposure > 0) & (e > elastic_reach(self.resolution))[None, :]
        if not self.fitted.any():
            raise RefinementError("no measured bins above the elastic line: nothing to refine")
        self._x = run.exposure[self.fitted]
        self._t = folder.flat_background()[self.fitted]
        self._y = run.counts[self.fitted]
        self._mp: NDArray[np.float64] | None = None
        self._mp_at: NDArray[np.float64] | None = None

    @property
    def n_coefficients(self) -> int:
        """Coefficients fitted."""
        return len(self.names)

    def full(self, c: NDArray[np.float64]) -> NDArray[np.float64]:
        """The basis's full coefficient vector of fitted coefficients ``c`` (eV/A^2)."""
        out = self._reference.copy()
        idx = [self.setup.basis.index(n) for n in self.names]
        out[idx] = c
        return out

    def multiphonon(self, c: NDArray[np.float64]) -> NDArray[np.float64]:
        """(n_fitted,) multiphonon S (mbarn/(sr meV) per atom) of the fitted bins with the
        phonons of coefficients ``c`` (orders 2-3, incoherent approximation)."""
        model = CoherentSQE(
            self.setup.basis,
            self.full(c),
            temperature=self.run.temperature,
            resolution=self.resolution,
        )
        g = self.run.grid
        try:
            s = powder_multiphonon(model, g.q_centres, g.energy_centres)
        except SimulationError as exc:
            raise RefinementError(f"the multiphonon template: {exc}") from exc
        return np.asarray(s[self.fitted])

    def _signal(
        self, c: NDArray[np.float64], jacobian: bool
    ) -> tuple[NDArray[np.float64], NDArray[np.float64] | None, bool]:
        """(one-phonon S of the fitted bins, its derivatives (n_fitted, n_c) or None,
        stable)."""
        sets = [c]
        steps = _FD_STEP * np.maximum(np.abs(c), 1e-2)
        if jacobian:
            sets += [c + steps[i] * np.eye(len(c))[i] for i in range(len(c))]
        out = self.forward.spectra(np.array(sets))
        s = out.intensity[:, self.fitted]
        d = None
        if jacobian:
            d = ((s[1:] - s[0][None, :]) / steps[:, None]).T
        return s[0], d, bool(out.stable[0])

    def expected(
        self, theta: NDArray[np.float64], jacobian: bool = False
    ) -> tuple[NDArray[np.float64], NDArray[np.float64] | None, bool]:
        """Expected counts of the fitted bins at ``theta`` = (c, log k, b), their Jacobian
        (n_fitted, n_params) when asked, and whether the lattice is stable."""
        k = self.n_coefficients
        c, log_k, b = theta[:k], theta[k], theta[k + 1]
        assert self._mp is not None
        s1, ds, stable = self._signal(c, jacobian)
        scale = math.exp(log_k)
        signal = scale * (s1 + self._mp) * self._x
        lam = signal + b * self._t
        jac = None
        if jacobian:
            assert ds is not None
            jac = np.empty((len(lam), k + 2))
            jac[:, :k] = scale * ds * self._x[:, None]
            jac[:, k] = signal
            jac[:, k + 1] = self._t
        return lam, jac, stable

    def _start(self, c: NDArray[np.float64]) -> NDArray[np.float64]:
        """(c, log k, b) with the scale and background started from the counts."""
        s1, _, _ = self._signal(c, False)
        assert self._mp is not None
        model = float(np.sum((s1 + self._mp) * self._x))
        total = float(self._y.sum())
        if model <= 0 or total <= 0:
            raise RefinementError("no counts or no signal in the fitted bins")
        b = 0.05 * total / max(float(self._t.sum()), 1e-12)
        return np.concatenate([c, [math.log(0.95 * total / model), b]])

    def _descend(
        self, theta: NDArray[np.float64], max_iter: int
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], int, bool]:
        """Levenberg-Marquardt: (theta, lambda, Fisher, iterations, converged)."""
        y = self._y
        lam, jac, stable = self.expected(theta, jacobian=True)
        if not stable or np.any(lam <= 0):
            raise RefinementError("the start has no stable lattice or a non-positive bin")
        dev = deviance(y, lam)
        damping = 1e-3
        k = self.n_coefficients
        converged = False
        iterations = 0
        for _ in range(max_iter):
            iterations += 1
            assert jac is not None
            fisher = jac.T @ (jac / lam[:, None])
            grad = jac.T @ (1.0 - y / lam)
            accepted = False
            for _ in range(12):
                a = fisher + damping * np.diag(np.diag(fisher))
                try:
                    step = -np.linalg.solve(a, grad)
                except np.linalg.LinAlgError:
                    step = -np.linalg.lstsq(a, grad, rcond=None)[0]
                trial = theta + step
                trial[k + 1] = max(trial[k + 1], 0.0)
                lam_t, _, stable_t = self.expected(trial)
                if stable_t and np.all(lam_t > 0) and deviance(y, lam_t) < dev:
                    accepted = True
                    break
                damping *= 10.0
            if not accepted:
                converged = True  # no step lowers the deviance: a minimum
                break
            sd = np.sqrt(np.maximum(np.diag(np.linalg.pinv(fisher)), 1e-300))
            small = bool(np.all(np.abs(trial - theta) <= 1e-3 * sd))
            new_dev = deviance(y, lam_t)
            change = dev - new_dev
            theta = trial
            lam, jac, _ = self.expected(theta, jacobian=True)
            dev = deviance(y, lam)
            damping = max(damping / 10.0, 1e-7)
            if small or change < 1e-4:
                converged = True
                break
        assert jac is not None
        fisher = jac.T @ (jac / lam[:, None])
        return theta, lam, fisher, iterations, converged

    def refine(
        self, start: NDArray[np.float64] | dict[str, float], *, max_iter: int = 40
    ) -> Refined:
        """Fit from ``start`` (the fitted coefficients, eV/A^2, in :attr:`names` order or
        by name).

        Raises
        ------
        RefinementError
            No counts, a start without a stable lattice, a bad start.
        """
        t0 = time.perf_counter()
        c0 = self._as_vector(start)
        self._mp, self._mp_at = self.multiphonon(c0), c0
        theta = self._start(c0)
        theta, lam, fisher, iterations, converged = self._descend(theta, max_iter)
        k = self.n_coefficients
        moved = np.linalg.norm(theta[:k] - c0) > TEMPLATE_TOLERANCE * np.linalg.norm(c0)
        if moved:  # the multiphonon of the optimum's phonons, and the fit again from there
            try:
                self._mp, self._mp_at = self.multiphonon(theta[:k]), theta[:k].copy()
                theta, lam, fisher, more, converged = self._descend(theta, max_iter)
                iterations += more
            except RefinementError as exc:
                logger.info("multiphonon template kept from the start: %s", exc)
        y = self._y
        dof = max(len(y) - len(theta), 1)
        pearson = float(np.sum((y - lam) ** 2 / lam) / dof)
        cov, std, inflation = laplace_covariance(fisher, k, pearson)
        return Refined(
            names=self.names,
            mean=theta[:k].copy(),
            std=std,
            covariance=cov,
            nuisance={"log_scale": float(theta[k]), "background": float(theta[k + 1])},
            deviance=deviance(y, lam),
            dof=dof,
            pearson_chi2_per_dof=pearson,
            inflation=inflation,
            iterations=iterations,
            converged=converged,
            seconds=time.perf_counter() - t0,
            n_bins=len(y),
            theta=theta.copy(),
        )

    def _as_vector(self, start: NDArray[np.float64] | dict[str, float]) -> NDArray[np.float64]:
        if isinstance(start, dict):
            missing = [n for n in self.names if n not in start]
            if missing:
                raise RefinementError(f"the start lacks {', '.join(missing)}")
            return np.array([float(start[n]) for n in self.names])
        c = np.asarray(start, dtype=float)
        if c.shape != (self.n_coefficients,) or not np.all(np.isfinite(c)):
            raise RefinementError(
                f"a start needs {self.n_coefficients} finite coefficients "
                f"({', '.join(self.names)}), got shape {c.shape}"
            )
        return c


def powder_run_from_file(path: str | Path, *, first: int | None = None) -> PowderRun:
    """The :class:`PowderRun` of a folded powder run's NeXus file (``steer fold --out``);
    ``first``: only its first N steps.

    Raises
    ------
    RefinementError
        A file that is not a folded powder run, or one without the run start's metadata.
    """
    import json

    import h5py

    path = Path(path)
    if not path.exists():
        raise RefinementError(f"no folded-run file at {path} (write one with steer fold --out)")
    try:
        with h5py.File(path, "r") as f:
            e = f["entry"]
            if str(e.attrs.get("sample_kind", "single_crystal")) != "powder":
                raise RefinementError(f"{path} is a single-crystal run, not a powder's")
            meta = json.loads(str(e.attrs["metadata"])).get("run_start") or {}
            q_edges = np.asarray(e["grid/q_edges"][()], float)
            e_edges = np.asarray(e["grid/energy_edges"][()], float)
            if first is None:
                counts = np.asarray(e["iqe/counts"][()], float)
                exposure = np.asarray(e["iqe/exposure"][()], float)
            else:
                n = len(e["orientations/counts"])
                if not 0 < first <= n:
                    raise RefinementError(f"{path} has {n} steps; cannot take the first {first}")
                counts = np.asarray(e["orientations/counts"][:first], float).sum(axis=0)
                exposure = np.asarray(e["orientations/exposure"][:first], float).sum(axis=0)
    except RefinementError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise RefinementError(f"{path} is not a folded powder-run file: {exc}") from exc
    try:
        material = str(meta["material"])
        ei = float(meta["ei_meV"])
        instrument = Instrument.from_metadata(dict(meta["instrument"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise RefinementError(f"{path}: the run start lacks {exc}: cannot refine") from exc
    return PowderRun(
        counts=counts,
        exposure=exposure,
        grid=PowderGrid(q_edges=q_edges, energy_edges=e_edges),
        material=material,
        ei=ei,
        temperature=float(meta.get("temperature_K", 5.0)),
        instrument=instrument,
        q_sigma=float(
            (meta.get("simulation") or {}).get("powder_q_sigma_inv_angstrom", POWDER_Q_SIGMA)
        ),
    )


def refine_powder_file(
    path: str | Path,
    start: dict[str, float] | Sequence[float],
    *,
    first: int | None = None,
    shells: int = 2,
) -> Refined:
    """Refine a folded powder run's file from ``start`` (coefficients by name)."""
    run = powder_run_from_file(path, first=first)
    refiner = PowderRefiner(run, shells=shells)
    return refiner.refine(start if isinstance(start, dict) else np.asarray(start, float))


def reference_start(material: str, names: Sequence[str]) -> NDArray[np.float64]:
    """The shipped reference set's values (eV/A^2) of coefficients ``names`` of
    ``material``: the start of a refinement without a model's estimate."""
    from simulations.fcdb.reference import load_reference

    ref = load_reference(material)
    missing = [n for n in names if n not in ref.names]
    if missing:
        raise RefinementError(f"no reference values of {missing} for {material}")
    return np.array([ref.mean[ref.names.index(n)] for n in names])
