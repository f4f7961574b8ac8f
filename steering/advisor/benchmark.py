"""Beam time saved: strategies of choosing orientations compared on many simulated crystals.

``steer advise benchmark``. One set-up (the README's: Ge, ARCS-like detector, Ei 80 meV,
5 K, mounting u = [1,0,0], v = [0,1,0]), candidate angles every ``step`` degrees over
``[0, span)``, one standard count of ``count_time_s`` seconds per orientation at
``events_per_orientation`` detector events (10 % of them flat background), the goniometer
moving at 1 deg/s and settling 1 s after each move. For every truth x noise seed, each
strategy picks orientations one at a time (revisits allowed for those that want them) from
the goniometer's start at 0 degrees; each count is a Poisson replica of the expected
counts of that orientation (:class:`~model_server.refinement.counts.CountsModel` on the
orientation's own moments at the truth: the counts model is exact here, so the benchmark
measures the design, not the model's accuracy); the refinement fits the folded sum as the
service does (warm-started, the coefficients the VAE does not vary with their prior), on
the service's binning by default: the path's bins split by zone class (``binning``;
``"path"`` fits the q-path's bins alone).

**Primary metric**: beam time (counting + travel + settling) until the refined posterior's
std of FC0-FC3 is below the target (``target_fraction`` of each coefficient's training
domain width) *and* the truth lies within its 2-sigma interval, every one of the four.
Strategies whose picks do not depend on the data (sequential, random, coarse-to-fine, the
GP sampler, the oracle) are fitted from the first orientation where the Cramer-Rao bound at
the truth meets the target on (before it, the refined std cannot: the refinement's std is
the bound times at least 1); the advisor is fitted after every orientation (it plans with
the posterior). Common random numbers: the j-th count of candidate c has the same
replica in every strategy.

Strategies:

* ``advisor``: :class:`steering.advisor.planner.InformationPlanner` on the refined posterior
  (gain per beam time, posterior samples, revisits);
* ``sequential``: the sweep 0, step, 2 step, ... and back;
* ``random``: a random order of the candidates, then another;
* ``coarse-to-fine``: every 8th candidate, then the midpoints, and so on
  (:func:`steering.advisor.closedloop.spread_order`);
* ``gpcam``: a model-agnostic Gaussian-process uncertainty sampler on I(q, E) with gpCAM
  (:class:`gpcam.GPOptimizer` on the angle, its default Matern kernel, outputs the
  orientation's counts in 32 (q, E) blocks with their Poisson variances as the noise,
  hyperparameters trained after every count; ``ask`` picks the unmeasured candidate, then
  any, of largest mean posterior variance per second of beam time, gpCAM's cost function
  being the count + travel + settle time from the goniometer's position);
* ``gp``: the same sampler with scikit-learn's GP (Matern 5/2 and a fitted white-noise
  term instead of the Poisson variances, no cost: the largest predictive std);
* ``oracle``: the greedy D-optimal design at the true FCs (the planner with the truth as
  its posterior mean and the Cramer-Rao covariance: the upper bound).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from steering.advisor.closedloop import spread_order
from steering.advisor.planner import BeamCost, InformationPlanner
from steering.exceptions import AdvisorError

__all__ = ["STRATEGIES", "BenchmarkSetup", "beam_time_benchmark", "plot_benchmark"]

logger = logging.getLogger(__name__)

#: In-plane scattering angles (degrees) of the README's ARCS-like detector array.
DETECTOR_PHI = (-28.0, 135.0)

STRATEGIES = ("advisor", "sequential", "random", "coarse-to-fine", "gpcam", "gp", "oracle")

#: The coefficients of the target: the first four of the basis (FC0-FC3).
N_TARGET = 4

#: The data-independent strategies are fitted once the Cramer-Rao bound at the truth is
#: within this factor of the target (the refined std is evaluated at the estimate and can
#: fall a little below the bound at the truth; the bound is the orientations' models added,
#: a few per cent from the summed moments' model).
CRB_MARGIN = 1.25

#: The planner keeps its nodes' Jacobians while the posterior mean stays within this many
#: std of where they were computed.
REUSE = 1.0

#: The planner's nodes are every this many candidates (linear between them).
NODE_EVERY = 2


def node_indices(n: int) -> list[int]:
    """The candidates (of ``n``) that are the planner's nodes: every :data:`NODE_EVERY`-th
    and the last."""
    return sorted({*range(0, n, NODE_EVERY), n - 1})


@dataclass
class _Compact:
    """One candidate's moments on the bins it reaches (a :class:`BinMoments`' arrays at
    ``at``, the rest zero), the structure-factor tensors in single precision (1e-7
    relative, far below any count's noise): a third of the dense set's memory (one
    orientation reaches two thirds of the class grid's bins)."""

    at: NDArray[np.int64]
    arrays: dict[str, NDArray[Any]]
    n_bins: int
    n_orientations: int

    @classmethod
    def of(cls, m: Any) -> _Compact:
        at = np.flatnonzero((m.weight != 0) | (m.background != 0))
        names = ("tensor", "tensor_q2", "tensor_x", "offset1", "offset2", "weight", "background")
        arrays = {k: np.ascontiguousarray(getattr(m, k)[at]) for k in names}
        for k in ("tensor", "tensor_q2", "tensor_x"):
            arrays[k] = arrays[k].astype(np.complex64)
        return cls(at, arrays, len(m.weight), m.n_orientations)

    def add_to(self, acc: Any, charge: float = 1.0) -> None:
        """Add ``charge`` times these moments to the dense ``acc`` in place."""
        for k, v in self.arrays.items():
            getattr(acc, k)[self.at] += charge * v
        acc.n_orientations += self.n_orientations

    def dense(self) -> Any:
        """The dense :class:`BinMoments`."""
        from consumers.reduction.moments import BinMoments

        t = self.arrays["tensor"]
        out = BinMoments.zeros(self.n_bins, t.shape[1])
        self.add_to(out)
        return out


@dataclass
class BenchmarkSetup:
    """What every run of the benchmark shares: the refiner, the candidates' moments (on
    the bins each reaches), the expected-counts models (unit charge) of the planner's nodes,
    the target. A candidate's model that is not a node's is made again when it is needed
    (:meth:`model_at`): on zone classes every model holds ~145 MB, and all 60 of them with
    their moments took more than 12 GB."""

    refiner: Any
    folder: Any
    omegas: NDArray[np.float64]
    moments: list[Any]
    models: dict[int, Any]
    target: NDArray[np.float64]  # (N_TARGET,) std, eV/A^2
    names: tuple[str, ...]
    widths: NDArray[np.float64]
    count_time_s: float
    cost: BeamCost
    #: in-plane scattering angles of the detector array, degrees
    detector_phi: tuple[float, float] = DETECTOR_PHI

    @classmethod
    def build(
        cls,
        *,
        material: str = "Ge",
        step: float = 2.0,
        span: float = 120.0,
        target_fraction: float = 0.005,
        count_time_s: float = 60.0,
        pixel_stride: int = 4,
        e_substeps: int = 2,
        binning: str = "classes",
        detector_phi: tuple[float, float] = DETECTOR_PHI,
        progress: bool = False,
    ) -> BenchmarkSetup:
        """The README's set-up with candidates every ``step`` degrees over ``[0, span)``.
        ``binning`` is what the refinement fits: ``"classes"`` (the path's bins split by
        zone class, as ``steer serve`` refines them; the default) or ``"path"`` (the
        q-path's bins, the benchmark's set-up before zone classes became the live
        default). ``detector_phi``: the in-plane scattering angles (degrees) the ARCS-like
        array spans (default the README's -28..135; a narrower bank keeps the columns'
        spacing, 400 columns over the default's 163 degrees, so it sees less of Q at
        each angle)."""
        from tqdm import tqdm

        from consumers.reduction.folding import Folder
        from consumers.reduction.moments import orientation_moments, star_operations
        from consumers.reduction.table import FoldTable
        from model_server.refinement.refiner import RunRefiner
        from simulations.fcdb.reference import load_reference
        from simulations.instrument.spectrometer import Instrument, Orientation
        from simulations.lattice.materials import setup

        if not (0 < target_fraction < 1):
            raise AdvisorError(f"target fraction must be in (0, 1), got {target_fraction}")
        ms = setup(material)
        lo, hi = (float(v) for v in detector_phi)
        if not (math.isfinite(lo) and math.isfinite(hi) and -180.0 <= lo < hi <= 180.0):
            raise AdvisorError(
                f"the detector's in-plane angles must be -180 <= min < max <= 180, got {lo}:{hi}"
            )
        full = DETECTOR_PHI[1] - DETECTOR_PHI[0]
        ins = Instrument.arcs_like(
            n_columns=max(1, round(400 * (hi - lo) / full)), phi_min=lo, phi_max=hi
        )
        table = FoldTable.cached(ms.crystal, ms.grid)
        folder = Folder(
            table, ms.grid, ins, Orientation.from_vectors(ms.crystal, (1, 0, 0), (0, 1, 0)), 80.0
        )
        if binning == "classes":
            refiner = RunRefiner.zone_split(material, ins, 80.0, 5.0, material_setup=ms)
        elif binning == "path":
            refiner = RunRefiner(material, ins, 80.0, 5.0, table=table, material_setup=ms)
        else:
            raise AdvisorError(f"binning must be 'path' or 'classes', got {binning!r}")
        omegas = np.arange(0.0, span, step)
        ops = star_operations(folder, refiner.constants.operations)
        moments, models = [], {}
        nodes = set(node_indices(len(omegas)))
        for i, w in enumerate(tqdm(omegas, desc="candidates", unit="orient", disable=not progress)):
            m = orientation_moments(
                folder,
                refiner.constants,
                float(w),
                pixel_stride=pixel_stride,
                e_substeps=e_substeps,
                inverse_ops=ops,
                classes=refiner.classes,
            )
            moments.append(_Compact.of(m))
            if i in nodes:
                models[i] = refiner.counts_model(m)
        ref = load_reference(material)
        dom = np.asarray(ref.domain, dtype=float)
        widths = np.full(len(refiner.names), np.nan)
        for j, n in enumerate(ref.kept):
            widths[refiner.names.index(n)] = dom[j, 1] - dom[j, 0]
        if not np.all(np.isfinite(widths[:N_TARGET])):
            raise AdvisorError("the first four coefficients need a training domain")
        return cls(
            refiner=refiner,
            folder=folder,
            omegas=omegas,
            moments=moments,
            models=models,
            target=target_fraction * widths[:N_TARGET],
            names=tuple(refiner.names),
            widths=widths,
            count_time_s=float(count_time_s),
            cost=BeamCost(1.0, 1.0),
            detector_phi=(lo, hi),
        )

    def beam_time_s(self, start: float, omegas: NDArray[np.float64] | float) -> NDArray[np.float64]:
        """Seconds of beam time to measure each of ``omegas`` from the goniometer at
        ``start``: the move, its settling and one standard count."""
        return self.count_time_s + self.cost.travel_s(start, omegas)

    def empty_moments(self) -> Any:
        """Zero moments on the set-up's grid (the cumulative moments start here)."""
        from consumers.reduction.moments import BinMoments

        grid = self.refiner.grid
        return BinMoments.zeros(grid.n_q * grid.n_e, self.refiner.constants.n_branches)

    def model_of(self, moments: Any) -> Any:
        """The expected-counts model of ``moments``."""
        return self.refiner.counts_model(moments)

    def model_at(self, c: int) -> Any:
        """The expected-counts model of candidate ``c`` alone (unit charge): the node's,
        else made from its moments (not kept)."""
        hit = self.models.get(c)
        return hit if hit is not None else self.model_of(self.moments[c].dense())

    @property
    def node_models(self) -> dict[float, Any]:
        """The planner's node models by angle."""
        return {float(self.omegas[i]): m for i, m in self.models.items()}


def benchmark_truths(setup: BenchmarkSetup, n: int, seed: int) -> list[tuple[str, NDArray]]:
    """``n`` stable truths: the named sets (``mlff_mean``, ``raman``, the ML force fields),
    then alternately draws from the training domain's interior (central 80 % of every
    coefficient's range) and its edges (one coefficient in the outer 5 % of its range)."""
    from model_server.refinement.study import is_stable, named_set_order
    from simulations.fcdb.reference import load_reference, named_fc_set

    r = setup.refiner
    ref = load_reference(r.material)
    out: list[tuple[str, NDArray]] = []
    for name in named_set_order(ref)[:n]:
        c = named_fc_set(r.material, name)
        if is_stable(r.setup.basis, r.setup.grid, c):
            out.append((name, c))
    rng = np.random.default_rng(seed)
    dom = np.asarray(ref.domain, dtype=float)
    kept = ref.kept_index
    i = 0
    while len(out) < n:
        if i > 100 * n:
            raise AdvisorError("too few stable truths in the training domain")
        lo, hi = dom[:, 0], dom[:, 1]
        width = hi - lo
        edge = i % 2 == 1
        u = rng.uniform(0.1, 0.9, len(lo))
        if edge:
            j = rng.integers(len(lo))
            u[j] = rng.choice([rng.uniform(0.0, 0.05), rng.uniform(0.95, 1.0)])
        c = ref.mean.copy()
        c[kept] = lo + u * width
        i += 1
        if is_stable(r.setup.basis, r.setup.grid, c):
            out.append((f"{'edge' if edge else 'interior'}-{i - 1}", c))
    return out


class _Folded:
    """The folded sum's expected counts and Jacobian at the truth, added orientation by
    orientation (each orientation's own model at the truth: linear in the moments up to the
    offsets' ratios, so a close and cheap stand-in for the model of the summed moments).
    Used to decide when the data-independent strategies can first meet the target and as
    the oracle's posterior; every fit uses the exact model."""

    def __init__(self, n_bins: int, n_params: int, prior: NDArray[np.float64]) -> None:
        self.lam = np.zeros(n_bins)
        self.jac = np.zeros((n_bins, n_params))
        self.prior = prior  # (n_coeff,) prior precision

    def add(self, term: tuple[NDArray[np.int64], NDArray, NDArray]) -> None:
        bins, lam, jac = term
        self.lam[bins] += lam
        self.jac[bins] += jac

    @property
    def bins(self) -> NDArray[np.int64]:
        return np.nonzero(self.lam > 0)[0]

    def covariance(self) -> NDArray[np.float64]:
        """(n_coeff, n_coeff) the Cramer-Rao covariance (nuisances profiled)."""
        b = self.bins
        jac, lam = self.jac[b], self.lam[b]
        fisher = jac.T @ (jac / lam[:, None])
        k = len(self.prior)
        prec = np.concatenate([self.prior, np.zeros(fisher.shape[0] - k)])
        return np.asarray(np.linalg.pinv(fisher + np.diag(prec))[:k, :k])

    def evaluate(self, theta: NDArray[np.float64], *, jacobian: bool = True) -> Any:
        """The planner's view of the counts so far (at the truth, whatever ``theta``)."""
        from types import SimpleNamespace

        b = self.bins
        return SimpleNamespace(expected=self.lam[b], jacobian=self.jac[b], stable=True)


class _Run:
    """One truth x seed: its replicas (common to every strategy)."""

    def __init__(
        self,
        setup: BenchmarkSetup,
        truth: NDArray[np.float64],
        theta_truth: NDArray[np.float64],
        seed: int,
        truth_index: int,
        terms: list[tuple[NDArray[np.int64], NDArray, NDArray]],
    ) -> None:
        self.truth = truth
        self.theta_truth = theta_truth
        self.seed = seed
        self.truth_index = truth_index
        grid = setup.refiner.grid
        self.n_bins = grid.n_q * grid.n_e
        #: each candidate's (bins, expected counts, Jacobian) at the truth, unit charge
        self.terms = terms

    def replica(self, c: int, visit: int) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        """The ``visit``-th count of candidate ``c`` (common to every strategy)."""
        rng = np.random.default_rng([self.seed, self.truth_index, c, visit])
        bins, lam, _ = self.terms[c]
        return bins, rng.poisson(lam).astype(float)


def _terms(setup: BenchmarkSetup, theta: NDArray[np.float64]) -> list[Any]:
    """Each candidate's (bins, expected counts, Jacobian) at ``theta``."""
    out = []
    for c in range(len(setup.omegas)):
        model = setup.model_at(c)
        ev = model.evaluate(theta)
        out.append((model.bins, ev.expected, ev.jacobian))
    return out


@dataclass
class _Trace:
    """One strategy on one run."""

    picks: list[int]
    beam_time_s: list[float]
    std: dict[int, NDArray[np.float64]]
    error: dict[int, NDArray[np.float64]]
    to_target: int | None = None
    beam_to_target: float | None = None
    fits: int = 0
    #: the advisor's (predicted std of FC0-FC3 after its pick, the refined std after it)
    predictions: list[tuple[list[float], list[float]]] = field(default_factory=list)


def _fit(
    s: BenchmarkSetup,
    run: _Run,
    counts: NDArray[np.float64],
    model: Any,
    warm: NDArray[np.float64] | None,
    rng: np.random.Generator,
) -> tuple[Any, Any]:
    """The refinement of the folded counts so far (warm-started; a start 2 % from the truth
    on the free coefficients the first time, as the VAE's estimate is)."""
    from model_server.refinement.fit import refine

    starts = []
    if warm is None:
        r = s.refiner
        start = r.reference.copy()
        kept = [r.names.index(n) for n in r.free]
        start[kept] = run.truth[kept] * (1 + 0.02 * rng.standard_normal(len(kept)))
        starts.append(start)
    fit = refine(
        model, counts.reshape(s.refiner.grid.shape), starts, prior=s.refiner.prior, warm=warm
    )
    return fit, model


def _meets(s: BenchmarkSetup, fit: Any, truth: NDArray[np.float64]) -> bool:
    if not fit.converged:
        return False
    std = np.asarray(fit.std[:N_TARGET])
    err = np.abs(np.asarray(fit.mean[:N_TARGET]) - truth[:N_TARGET])
    return bool(np.all(std <= s.target) and np.all(err <= 2.0 * std))


def _unmeasured_first(visits: NDArray[np.int64]) -> NDArray[np.int64]:
    """The candidates a GP sampler chooses from: the unmeasured ones, all once every one
    has been measured."""
    fresh = visits == 0
    return np.nonzero(fresh)[0] if fresh.any() else np.arange(len(visits))


def _gp_pick(
    s: BenchmarkSetup, visits: NDArray[np.int64], features: dict[int, NDArray[np.float64]]
) -> int:
    """The GP uncertainty sampler's next candidate."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    done = sorted(features)
    x = s.omegas[done][:, None]
    y = np.stack([features[c] for c in done])
    y = (y - y.mean(axis=0)) / (y.std(axis=0) + 1e-12) if len(done) > 1 else y * 0
    kernel = ConstantKernel(1.0, (1e-3, 1e3)) * Matern(
        length_scale=10.0, length_scale_bounds=(1.0, 200.0), nu=2.5
    ) + WhiteKernel(1e-2, (1e-6, 1.0))
    gp = GaussianProcessRegressor(kernel=kernel, normalize_y=False, random_state=0)
    with warnings.catch_warnings():  # hyperparameters at their bounds are expected here
        warnings.simplefilter("ignore", ConvergenceWarning)
        gp.fit(x, y)
    _, sd = gp.predict(s.omegas[:, None], return_std=True)
    sd = sd if sd.ndim == 1 else sd.mean(axis=1)
    pool = _unmeasured_first(visits)
    return int(pool[np.argmax(sd[pool])])


@dataclass
class _GpData:
    """What the gpCAM sampler has seen: one row per count (revisits are rows of their own)."""

    omega: list[float] = field(default_factory=list)  # degrees
    blocks: list[NDArray[np.float64]] = field(default_factory=list)  # (32,) counts
    hyperparameters: NDArray[np.float64] | None = None  # last trained, the next start


#: gpCAM's default kernel's hyperparameters: signal variance, length scale (degrees).
GPCAM_BOUNDS = np.array([[1e-3, 1e3], [1.0, 200.0]])


def _gpcam_pick(s: BenchmarkSetup, visits: NDArray[np.int64], data: _GpData, pos: float) -> int:
    """gpCAM's uncertainty sampler's next candidate: the 32 block outputs standardised,
    their Poisson variances (in the same units, averaged over blocks: gpCAM's outputs share
    one noise vector) as the noise; the kernel trained locally from the last
    hyperparameters (deterministic); ``ask`` over the unmeasured candidates (all once
    every one is measured) with the mean posterior variance as the acquisition, divided
    by the beam time from ``pos`` (gpCAM's cost function)."""
    from gpcam import GPOptimizer

    x = np.asarray(data.omega, dtype=float)[:, None]
    raw = np.stack(data.blocks)  # (V, 32)
    if len(raw) > 1:
        mu, sd = raw.mean(axis=0), raw.std(axis=0)
        sd = np.where(sd > 0, sd, 1.0)
        y = (raw - mu) / sd
        noise = (np.maximum(raw, 1.0) / sd**2).mean(axis=1)
    else:
        y = np.zeros_like(raw)
        noise = np.full(1, 1e-2)

    def cost(origin: NDArray[np.float64], xs: NDArray[np.float64]) -> NDArray[np.float64]:
        return s.beam_time_s(float(origin[0]), np.asarray(xs)[:, 0])

    def mean_variance(xs: NDArray[np.float64], gpo: Any) -> NDArray[np.float64]:
        v = np.asarray(gpo.posterior_covariance(xs, variance_only=True)["v(x)"])
        return v.mean(axis=1) if v.ndim == 2 else v

    start = data.hyperparameters if data.hyperparameters is not None else np.array([1.0, 10.0])
    gp = GPOptimizer(x, y, init_hyperparameters=start, noise_variances=noise, cost_function=cost)
    if len(raw) > 2:
        with warnings.catch_warnings():  # hyperparameters at their bounds are expected here
            warnings.simplefilter("ignore")
            gp.train(
                hyperparameter_bounds=GPCAM_BOUNDS,
                init_hyperparameters=start,
                method="local",
                n_restarts=1,
                max_iter=200,
            )
        data.hyperparameters = np.asarray(gp.hyperparameters, dtype=float)
    pool = _unmeasured_first(visits)
    got = gp.ask(
        [np.array([float(s.omegas[c])]) for c in pool],
        acquisition_function=mean_variance,
        position=np.array([pos]),
        n=1,
        vectorized=True,
    )
    best = float(np.asarray(got["x"]).ravel()[0])
    return int(pool[np.argmin(np.abs(s.omegas[pool] - best))])


def _features(s: BenchmarkSetup, bins: NDArray[np.int64], y: NDArray[np.float64]) -> NDArray:
    """An orientation's counts summed into 8 q x 4 E blocks of the path's I(q, E) (the GP's
    outputs; zone classes summed back: the samplers see the spectrum, not the model)."""
    n_q, n_e = s.refiner.grid.shape
    dense = np.zeros(n_q * n_e)
    dense[bins] = y
    d = dense.reshape(n_q, n_e)
    if s.refiner.classes is not None:
        d = s.refiner.classes.merge(d)
        n_q = d.shape[0]
    qb = np.array_split(np.arange(n_q), 8)
    eb = np.array_split(np.arange(n_e), 4)
    return np.array([d[np.ix_(a, b)].sum() for a in qb for b in eb])


def _run_strategy(
    name: str,
    s: BenchmarkSetup,
    run: _Run,
    *,
    budget: int,
    checkpoints: set[int],
    samples: int,
) -> _Trace:
    """One strategy on one run, until the target is met or ``budget`` orientations."""
    n = len(s.omegas)
    rng = np.random.default_rng([run.seed, run.truth_index, 7])
    order: list[int] = []
    if name == "sequential":
        sweep = list(range(n)) + list(range(n - 1, -1, -1))
        order = [sweep[i % len(sweep)] for i in range(budget)]
    elif name == "random":
        while len(order) < budget:
            order += list(rng.permutation(n))
    elif name == "coarse-to-fine":
        base = spread_order(n)
        order = [base[i % n] for i in range(budget)]
    visits = np.zeros(n, dtype=np.int64)
    counts = np.zeros(run.n_bins)
    acc = s.empty_moments()
    folded = _Folded(run.n_bins, len(s.names) + 4, s.refiner.prior.precision)
    trace = _Trace(picks=[], beam_time_s=[], std={}, error={})
    pos = 0.0
    elapsed = 0.0
    warm = None
    planner: InformationPlanner | None = None
    if name in ("advisor", "oracle"):
        planner = InformationPlanner(
            s.refiner,
            s.folder,
            s.omegas,
            nodes=[float(s.omegas[i]) for i in node_indices(n)],
            samples=samples if name == "advisor" else 1,
            count_time_s=s.count_time_s,
            cost=s.cost,
            seed=run.seed,
        )
        planner._models = s.node_models
        planner._prepared.set()
    target = {"std": {n: float(v) for n, v in zip(s.names, s.target, strict=False)}}
    features: dict[int, NDArray[np.float64]] = {}
    gp_data = _GpData()
    screened = name != "advisor"
    post: tuple[Any, ...] | None = None
    predicted: list[float] | None = None
    for k in range(1, budget + 1):
        if k == 1:
            c = int(order[0]) if order else 0
        elif name in ("advisor", "oracle"):
            assert planner is not None
            assert post is not None
            theta, cov, infl, model = post
            planner.focus_on_target(cov, target)
            planner.refresh(theta, cov, model, charge=1.0, inflation=infl, reuse_within=REUSE)
            pick = planner.rank(cov, current=pos)[0]
            c = int(np.argmin(np.abs(s.omegas - pick.omega)))
            predicted = [pick.predicted_std[n] for n in s.names[:N_TARGET]]
        elif name == "gp":
            c = _gp_pick(s, visits, features)
        elif name == "gpcam":
            c = _gpcam_pick(s, visits, gp_data, pos)
        else:
            c = int(order[k - 1])
        bins, y = run.replica(c, int(visits[c]))
        counts[bins] += y
        visits[c] += 1
        s.moments[c].add_to(acc, 1.0)
        if screened:
            folded.add(run.terms[c])
        if name == "gp" and c not in features:
            features[c] = _features(s, bins, y)
        if name == "gpcam":
            gp_data.omega.append(float(s.omegas[c]))
            gp_data.blocks.append(_features(s, bins, y))
        elapsed += float(s.beam_time_s(pos, float(s.omegas[c])))
        pos = float(s.omegas[c])
        trace.picks.append(c)
        trace.beam_time_s.append(elapsed)
        model = None
        need_fit = name == "advisor" or k in checkpoints
        post = None
        if screened:
            crb_cov = folded.covariance()
            if not need_fit:
                crb = np.sqrt(np.maximum(np.diag(crb_cov)[:N_TARGET], 0.0))
                need_fit = bool(np.all(crb <= CRB_MARGIN * s.target))
            if name == "oracle":
                post = (run.theta_truth, crb_cov, 1.0, folded)
        if need_fit:
            if model is None:
                model = s.model_of(acc)
            fit, model = _fit(s, run, counts, model, warm, rng)
            trace.fits += 1
            if fit.converged:
                warm = fit.theta
            trace.std[k] = np.asarray(fit.std[:N_TARGET])
            trace.error[k] = np.abs(np.asarray(fit.mean[:N_TARGET]) - run.truth[:N_TARGET])
            if name == "advisor":
                post = (fit.theta, fit.covariance, fit.inflation, model)
                if predicted is not None and fit.converged:
                    trace.predictions.append((predicted, [float(v) for v in fit.std[:N_TARGET]]))
            if _meets(s, fit, run.truth):
                trace.to_target = k
                trace.beam_to_target = elapsed
                break
    return trace


def _bootstrap_ratio(
    a: Sequence[float | None], b: Sequence[float | None], rng: np.random.Generator, n: int = 2000
) -> dict[str, Any]:
    """Median of ``a`` over median of ``b`` (paired, never-met as infinite) and its paired
    bootstrap 95 % interval (null where infinite or undefined)."""
    x = np.array([math.inf if v is None else v for v in a], dtype=float)
    y = np.array([math.inf if v is None else v for v in b], dtype=float)

    def ratio(i: NDArray[np.int64]) -> float:
        mx, my = float(np.median(x[i])), float(np.median(y[i]))
        if math.isinf(my):
            return 0.0 if not math.isinf(mx) else math.nan
        return mx / my

    idx = np.arange(len(x))
    boot = np.array([ratio(rng.integers(0, len(x), len(x))) for _ in range(n)])
    boot = boot[np.isfinite(boot)]
    med = ratio(idx)
    ci = (
        [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
        if boot.size
        else [math.nan, math.nan]
    )
    # JSON has no infinity: a ratio whose strategy never met the target is null
    return {
        "median": med if math.isfinite(med) else None,
        "ci95": [v if math.isfinite(v) else None for v in ci],
    }


def beam_time_benchmark(
    *,
    truths: int = 30,
    seeds: int = 3,
    first_seed: int = 100,
    events_per_orientation: float = 2e5,
    strategies: Sequence[str] = STRATEGIES,
    target_fraction: float = 0.005,
    budget: int = 240,
    step: float = 2.0,
    span: float = 120.0,
    samples: int = 2,
    truth_seed: int = 100,
    first_truth: int = 0,
    binning: str = "classes",
    detector_phi: tuple[float, float] = DETECTOR_PHI,
    setup: BenchmarkSetup | None = None,
    progress: bool = False,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The benchmark's JSON result (``steer advise benchmark --json``)::

        {"strategies": {name: {"beam_time_to_target_s": [...], "orientations_to_target": [...],
                               "fits": [...]}},
         "ratios": {"advisor/sequential": {"median": x, "ci95": [lo, hi]}, ...},
         "truths": [...], "seeds": [...], "target": {name: std}, "curves": {...},
         "prediction": {"pairs": n, "correlation": {name: r}, "median_ratio": {name: x}}, ...}

    ``prediction`` pairs the std of FC0-FC3 the advisor predicted for each pick with the
    std the refinement reported after it (per coefficient, over every pick of every run).

    one entry per truth x seed in the order of ``runs`` (null where the target was not met
    within ``budget`` orientations).
    """
    from tqdm import tqdm

    from model_server.refinement.study import count_calibration

    t0 = time.perf_counter()
    for name in strategies:
        if name not in STRATEGIES:
            raise AdvisorError(f"unknown strategy {name!r}: choose from {', '.join(STRATEGIES)}")
    if truths < 1 or seeds < 1 or budget < 1:
        raise AdvisorError("truths, seeds and budget must be >= 1")
    if not (math.isfinite(events_per_orientation) and events_per_orientation > 0):
        raise AdvisorError(f"events per orientation must be > 0, got {events_per_orientation}")
    s = setup or BenchmarkSetup.build(
        step=step,
        target_fraction=target_fraction,
        binning=binning,
        detector_phi=detector_phi,
        progress=progress,
    )
    chosen = benchmark_truths(s, first_truth + truths, truth_seed)[first_truth:]
    seed_list = list(range(first_seed, first_seed + seeds))
    checkpoints = {1, 2, 4, 8, 16, 32, 64, 128}
    per: dict[str, dict[str, list[Any]]] = {
        n: {"beam_time_to_target_s": [], "orientations_to_target": [], "fits": []}
        for n in strategies
    }
    curves: dict[str, list[dict[str, Any]]] = {n: [] for n in strategies}
    predictions: list[tuple[list[float], list[float]]] = []
    runs = []
    bar = tqdm(
        total=len(chosen) * len(seed_list) * len(strategies), desc="benchmark", disable=not progress
    )
    for ti, (tname, coeffs) in enumerate(chosen):
        cal = count_calibration(
            s.refiner,
            s.folder.orientation,
            coeffs,
            list(s.omegas),
            events_per_orientation=events_per_orientation,
            background_fraction=0.1,
        )
        theta = s.models[0].theta(coeffs, log_scale=cal.log_scale, background=cal.background)
        terms = _terms(s, theta)
        for seed in seed_list:
            run = _Run(s, coeffs, theta, seed, ti, terms)
            runs.append({"truth": tname, "seed": seed})
            for name in strategies:
                tr = _run_strategy(
                    name, s, run, budget=budget, checkpoints=checkpoints, samples=samples
                )
                per[name]["beam_time_to_target_s"].append(tr.beam_to_target)
                per[name]["orientations_to_target"].append(tr.to_target)
                per[name]["fits"].append(tr.fits)
                predictions += tr.predictions
                curves[name].append(
                    {
                        "beam_time_s": [tr.beam_time_s[k - 1] for k in sorted(tr.std)],
                        "std": [tr.std[k].tolist() for k in sorted(tr.std)],
                        "error": [tr.error[k].tolist() for k in sorted(tr.std)],
                    }
                )
                bar.update()
            logger.info(
                "benchmark: truth %s seed %d: %s (%d of %d)",
                tname,
                seed,
                ", ".join(f"{n} {per[n]['orientations_to_target'][-1]}" for n in strategies),
                len(runs),
                len(chosen) * len(seed_list),
            )
            if on_result is not None:
                on_result({"truth": tname, "seed": seed, "done": len(runs)})
    bar.close()
    ratios, medians, prediction = _summary(per, predictions, s.names[:N_TARGET])
    return {
        "strategies": per,
        "ratios": ratios,
        "prediction": prediction,
        "median_beam_time_to_target_s": medians,
        "truths": [t for t, _ in chosen],
        "seeds": seed_list,
        "runs": runs,
        "target": {n: float(v) for n, v in zip(s.names[:N_TARGET], s.target, strict=True)},
        "target_fraction": target_fraction,
        "binning": s.refiner.binning,
        "detector_phi_deg": [float(v) for v in s.detector_phi],
        "events_per_orientation": events_per_orientation,
        "candidates_deg": [float(s.omegas[0]), float(s.omegas[-1]), float(step)],
        "count_time_s": s.count_time_s,
        "goniometer": {"speed_deg_s": s.cost.speed_deg_s, "settle_s": s.cost.settle_s},
        "budget_orientations": budget,
        "posterior_samples": samples,
        "curves": curves,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _summary(
    per: dict[str, dict[str, list[Any]]],
    predictions: list[tuple[list[float], list[float]]],
    names: Sequence[str],
) -> tuple[dict[str, Any], dict[str, float | None], dict[str, Any]]:
    """The ratios (advisor over each other strategy, paired bootstrap), the medians and
    the prediction check of a benchmark's per-run lists."""
    rng = np.random.default_rng(0)
    ratios = {}
    if "advisor" in per:
        for other in per:
            if other == "advisor":
                continue
            ratios[f"advisor/{other}"] = _bootstrap_ratio(
                per["advisor"]["beam_time_to_target_s"], per[other]["beam_time_to_target_s"], rng
            )
    medians: dict[str, float | None] = {}
    for name, entry in per.items():
        vals = [math.inf if v is None else v for v in entry["beam_time_to_target_s"]]
        med = float(np.median(vals))
        medians[name] = None if math.isinf(med) else med
    prediction: dict[str, Any] = {
        "pairs": len(predictions),
        "correlation": {},
        "median_ratio": {},
        "predicted": [p for p, _ in predictions],
        "reported": [g for _, g in predictions],
    }
    if len(predictions) > 2:
        pred = np.array([p for p, _ in predictions])
        got = np.array([g for _, g in predictions])
        for j, n in enumerate(names):
            prediction["correlation"][n] = float(np.corrcoef(pred[:, j], got[:, j])[0, 1])
            prediction["median_ratio"][n] = float(np.median(got[:, j] / pred[:, j]))
    return ratios, medians, prediction


def merge_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result of several runs of the benchmark on the same set-up: other truths or
    seeds (rows), or other strategies on the same truths and seeds (columns, matched by
    truth and seed), in any mix; the ratios, medians and prediction check made again over
    all of them. Every strategy must have exactly one result for every run."""
    if not results:
        raise AdvisorError("nothing to merge")
    first = results[0]
    #: what must agree, and its value in results written before the key existed
    keys: dict[str, Any] = {
        "target": None,
        "events_per_orientation": None,
        "candidates_deg": None,
        "count_time_s": None,
        "budget_orientations": None,
        "binning": "path",
        "detector_phi_deg": list(DETECTOR_PHI),
    }
    for r in results[1:]:
        for key, older in keys.items():
            if r.get(key, older) != first.get(key, older):
                raise AdvisorError(f"cannot merge benchmarks with different {key}")
    runs: list[tuple[str, int]] = []
    cells: dict[str, dict[tuple[str, int], tuple[dict[str, Any], Any]]] = {}
    predictions: list[tuple[list[float], list[float]]] = []
    for r in results:
        keyed = [(str(x["truth"]), int(x["seed"])) for x in r["runs"]]
        runs += [k for k in keyed if k not in runs]
        for n, entry in r["strategies"].items():
            own = cells.setdefault(n, {})
            for i, k in enumerate(keyed):
                if k in own:
                    raise AdvisorError(f"{n} has two results for truth {k[0]} seed {k[1]}")
                own[k] = ({f: v[i] for f, v in entry.items()}, r["curves"][n][i])
        pr = r.get("prediction", {})
        predictions += list(zip(pr.get("predicted", []), pr.get("reported", []), strict=True))
    order = [n for n in STRATEGIES if n in cells] + [n for n in cells if n not in STRATEGIES]
    per: dict[str, dict[str, list[Any]]] = {}
    curves: dict[str, list[Any]] = {}
    for n in order:
        missing = [k for k in runs if k not in cells[n]]
        if missing:
            t, seed = missing[0]
            raise AdvisorError(
                f"{n} has no result for truth {t} seed {seed} ({len(missing)} runs missing)"
            )
        fields = list(cells[n][runs[0]][0])
        per[n] = {f: [cells[n][k][0].get(f) for k in runs] for f in fields}
        curves[n] = [cells[n][k][1] for k in runs]
    out = dict(first)
    out["runs"] = [{"truth": t, "seed": seed} for t, seed in runs]
    out["truths"] = list(dict.fromkeys(t for t, _ in runs))
    out["seeds"] = sorted({seed for _, seed in runs})
    ratios, medians, prediction = _summary(per, predictions, list(first["target"]))
    out.update(
        strategies=per,
        curves=curves,
        ratios=ratios,
        median_beam_time_to_target_s=medians,
        prediction=prediction,
        seconds=round(sum(float(r.get("seconds", 0.0)) for r in results), 1),
        merged=len(results),
    )
    return out


def plot_benchmark(result: dict[str, Any], path: str | Path) -> None:
    """Two panels against beam time, per strategy: the share of runs (truth x seed) that
    have met the target, and the median over runs of the refined posterior's distance to
    it, ``max_i std_i / target_i`` over FC0-FC3 (each run's last fit before that time,
    kept after it stopped), with the RMS of ``|error| / target`` dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = np.array(list(result["target"].values()))
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.3), sharex=True)
    t_max = 0.0
    for runs in result["curves"].values():
        for r in runs:
            if r["beam_time_s"]:
                t_max = max(t_max, r["beam_time_s"][-1])
    grid = np.geomspace(60.0, max(t_max, 120.0), 80)
    for i, (name, entry) in enumerate(result["strategies"].items()):
        colour = f"C{i}"
        times = np.array(
            [math.inf if v is None else v for v in entry["beam_time_to_target_s"]], dtype=float
        )
        share = [(times <= t).mean() for t in grid]
        axes[0].step(grid / 60, share, where="post", color=colour, label=name)
        ratio = np.full((len(result["curves"][name]), len(grid)), np.nan)
        error = np.full_like(ratio, np.nan)
        for j, r in enumerate(result["curves"][name]):
            if not r["beam_time_s"]:
                continue
            bt = np.asarray(r["beam_time_s"])
            sd = np.asarray(r["std"]) / target
            er = np.asarray(r["error"]) / target
            k = np.searchsorted(bt, grid, side="right") - 1
            ok = k >= 0
            ratio[j, ok] = sd[k[ok]].max(axis=1)
            error[j, ok] = np.sqrt((er[k[ok]] ** 2).mean(axis=1))
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            axes[1].plot(grid / 60, np.nanmedian(ratio, axis=0), color=colour, label=name)
            axes[1].plot(
                grid / 60, np.sqrt(np.nanmean(error**2, axis=0)), color=colour, ls="--", lw=0.8
            )
    axes[0].set_ylabel("share of runs at the target")
    n_runs = len(result.get("runs") or []) or len(result["truths"]) * len(result["seeds"])
    axes[0].set_title(
        f"{n_runs} runs ({len(result['truths'])} truths, seeds "
        f"{min(result['seeds'])}-{max(result['seeds'])}), "
        f"{result['events_per_orientation']:.0e} events / orientation"
    )
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("max std / target (solid), RMS error / target (dashed)")
    axes[1].set_title("FC0-FC3, median over runs")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("beam time (min)")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
