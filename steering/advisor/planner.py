"""Where to measure next, in beam time: expected information of the refined posterior.

The likelihood refinement (:mod:`model_server.refinement`) gives the force constants'
posterior from the counts: its mean and covariance ``C`` (the Laplace approximation,
(n_coeff, n_coeff), (eV/A^2)^2). Measuring the goniometer angle ``omega`` for ``t``
seconds adds the Fisher information of that orientation's expected counts,

    F(omega; theta) = J^T diag(1 / lambda) J   (the coefficients' block)

with ``lambda`` and ``J = d lambda / d theta`` from the same expected-counts model the
refinement fits (:class:`model_server.refinement.counts.CountsModel`: eigenvector structure
factors at every detector cell's Q, Debye-Waller, Bose, 1/omega, resolution, the fold's
tube) on the per-bin moments of that one orientation, at the run's fitted scale and
background. The expected information gain of the measurement is

    gain = 1/2 [log det(C^-1 + (t / t0) q F) - log det C^-1]   (nats)

averaged over a few samples ``theta_s`` of the posterior (its mean and draws from
``N(mean, C)``; unstable lattices left out), ``q`` the proton charge of one standard count
of ``t0`` seconds. Its price is the beam time it costs:

    beam time = t + |omega - omega_now| / speed + settle (when the goniometer moves)

and the candidates are ranked by gain per beam time. Revisits are candidates like any other
angle; several counting times can be offered (``count_factors``); forbidden ranges (sample
environment shadows) are never suggested.

``F`` is computed on *nodes* every ``node_step`` degrees (the moments of one orientation
take ~0.3 s, its model and Jacobian ~0.1 s) and interpolated linearly between them; the
coverage of an orientation changes smoothly with the angle over the detector's tens of
degrees. The nodes' Fisher matrices are refreshed when the posterior moves
(:meth:`InformationPlanner.refresh`); ranking from them is cheap (:meth:`rank`).

The additive update ``C^-1 + F`` treats the new orientation as a separate measurement;
the refinement fits the *folded* sum of all orientations, which keeps less of each
orientation's Q-dependence (docs/refinement.md: the path fold's loss), so the realised
gain is smaller. :attr:`InformationPlanner.efficiency` tracks the ratio of realised to
predicted gain (:meth:`observe`) and discounts the expected beam time to the target with
it; the ranking itself compares candidates, which the common factor does not change.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from simulations.threads import yield_cpu
from steering.advisor.controls import allowed, check_target
from steering.exceptions import AdvisorError

__all__ = [
    "BeamCost",
    "InformationPlanner",
    "PlanCandidate",
    "PlanNotReady",
    "StopState",
    "check_ranges",
]

logger = logging.getLogger(__name__)


class PlanNotReady(AdvisorError):
    """The plan's information is still being computed (the advice says so; the run goes
    on)."""


@dataclass(frozen=True, slots=True)
class BeamCost:
    """What an orientation costs besides its count.

    Attributes
    ----------
    speed_deg_s
        Goniometer speed, deg/s (1 in the simulated runs).
    settle_s
        Seconds after every move before counting starts (1 in the simulated runs).
    """

    speed_deg_s: float = 1.0
    settle_s: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.speed_deg_s) and self.speed_deg_s > 0):
            raise AdvisorError(f"goniometer speed must be > 0 deg/s, got {self.speed_deg_s}")
        if not (math.isfinite(self.settle_s) and self.settle_s >= 0):
            raise AdvisorError(f"settle time must be >= 0 s, got {self.settle_s}")

    def travel_s(
        self, start: float | None, omegas: NDArray[np.float64] | float
    ) -> NDArray[np.float64]:
        """Seconds to move from ``start`` (None: no move is charged) to each angle."""
        w = np.asarray(omegas, dtype=float)
        if start is None:
            return np.zeros_like(w)
        d = np.abs(w - float(start))
        return np.asarray(d / self.speed_deg_s + np.where(d > 1e-9, self.settle_s, 0.0))


def check_ranges(
    ranges: Sequence[Sequence[float]], lo: float, hi: float
) -> list[tuple[float, float]]:
    """Validated forbidden angle ranges (closed, degrees) within the goniometer's
    ``[lo, hi]``: each a finite ``(start, stop)`` with ``start <= stop`` that overlaps the
    range. Raises :class:`AdvisorError` naming the bad one."""
    out = []
    for r in ranges:
        if len(r) != 2:
            raise AdvisorError(f"a forbidden range is (from, to) in degrees, got {r!r}")
        a, b = float(r[0]), float(r[1])
        if not (math.isfinite(a) and math.isfinite(b)):
            raise AdvisorError(f"forbidden range ({a}, {b}) is not finite")
        if a > b:
            raise AdvisorError(f"forbidden range ({a}, {b}) is empty: from > to")
        if b < lo or a > hi:
            raise AdvisorError(
                f"forbidden range ({a}, {b}) lies outside the goniometer's range ({lo}, {hi})"
            )
        out.append((a, b))
    return out


@dataclass(frozen=True, slots=True)
class PlanCandidate:
    """One candidate measurement.

    Attributes
    ----------
    omega
        Angle, degrees.
    count_time_s, travel_s, beam_time_s
        Its counting time, the move to it (with settling) and their sum.
    gain
        Expected information gain of the coefficients' posterior, nats.
    gain_per_minute
        ``gain`` per minute of beam time (the ranking's score).
    figure_of_merit
        Information still to be had here per minute of counting (no travel), nats/min.
    predicted_std
        Each coefficient's std after the measurement (at the posterior mean), eV/A^2.
    measured
        Whether the angle was measured before (a revisit).
    """

    omega: float
    count_time_s: float
    travel_s: float
    beam_time_s: float
    gain: float
    gain_per_minute: float
    figure_of_merit: float
    predicted_std: dict[str, float]
    measured: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "omega": self.omega,
            "count_time_s": self.count_time_s,
            "travel_s": round(self.travel_s, 3),
            "beam_time_s": round(self.beam_time_s, 3),
            "gain": self.gain,
            "gain_per_minute": self.gain_per_minute,
            "figure_of_merit": self.figure_of_merit,
            "predicted_std": self.predicted_std,
            "measured": self.measured,
        }


@dataclass(frozen=True, slots=True)
class StopState:
    """Where the run stands against its target.

    Attributes
    ----------
    state
        ``"done"`` (the posterior meets the target), ``"measuring"`` (reachable),
        ``"unreachable"`` (no plan within ``max_beam_time_s`` meets it) or ``"no target"``.
    target
        The target: ``{"std": {name: eV/A^2}}`` and/or ``{"d_criterion": eV/A^2}``.
    std
        The posterior's std now, per coefficient of the target.
    d_criterion
        ``det(C)^(1/(2k))`` over the planner's coefficients, eV/A^2.
    expected_beam_time_s
        Beam time of the greedy plan that meets the target (0 when done, None when
        unreachable), discounted by the fold's efficiency.
    expected_orientations
        Orientations of that plan.
    best_reachable_std
        Where the plan gets within ``max_beam_time_s`` (when unreachable).
    """

    state: str
    target: dict[str, Any] | None
    std: dict[str, float]
    d_criterion: float
    expected_beam_time_s: float | None
    expected_orientations: int | None
    best_reachable_std: dict[str, float] | None = None
    efficiency: float = 1.0
    plan: list[float] = field(default_factory=list)

    @property
    def met(self) -> bool:
        """True when done."""
        return self.state == "done"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the advice's ``stop``)."""
        return {
            "state": self.state,
            "met": self.met,
            "target": self.target,
            "std": self.std,
            "d_criterion": self.d_criterion,
            "expected_beam_time_s": self.expected_beam_time_s,
            "expected_orientations": self.expected_orientations,
            "best_reachable_std": self.best_reachable_std,
            "efficiency": round(self.efficiency, 4),
            "plan": self.plan[:20],
        }


def _logdet(p: NDArray[np.floating]) -> NDArray[np.float64]:
    """log det of a batch of symmetric positive-definite matrices (Cholesky)."""
    chol = np.linalg.cholesky(p)
    return np.asarray(2.0 * np.sum(np.log(np.diagonal(chol, axis1=-2, axis2=-1)), axis=-1))


class InformationPlanner:
    """Ranks goniometer angles by the refined posterior's expected information per beam
    time, and says when the run has met its target.

    Parameters
    ----------
    refiner
        The run's :class:`~model_server.refinement.refiner.RunRefiner` (material, energy
        resolution, temperature, fold table).
    folder
        The run's :class:`~consumers.reduction.folding.Folder` (detector, orientation).
    omegas
        (n_c,) candidate angles, degrees (the goniometer's range is their span).
    node_step
        Degrees between the nodes whose Fisher information is computed.
    samples
        Posterior points the gain is averaged over: the mean and ``samples - 1`` draws.
    count_time_s
        Seconds of one standard count (its proton charge is ``charge`` in :meth:`rank`).
    count_factors
        Counting times offered, as multiples of ``count_time_s``.
    cost
        Goniometer speed and settling time.
    coefficients
        The coefficients whose posterior volume is the criterion (default: all).
    pixel_stride
        Every how many detector pixels the nodes' moments take (4: ~0.3 s a node).
    seed
        Seed of the posterior draws.
    nodes
        The nodes' angles (default: every ``node_step`` over the candidates' span).
    """

    def __init__(
        self,
        refiner: Any,
        folder: Any,
        omegas: Sequence[float] | NDArray[np.float64],
        *,
        node_step: float = 2.0,
        samples: int = 3,
        count_time_s: float = 60.0,
        count_factors: Sequence[float] = (1.0,),
        cost: BeamCost | None = None,
        coefficients: Sequence[str] | None = None,
        pixel_stride: int = 4,
        e_substeps: int = 2,
        seed: int = 0,
        nodes: Sequence[float] | None = None,
    ) -> None:
        w = np.unique(np.asarray(omegas, dtype=float))
        if w.size == 0 or not np.all(np.isfinite(w)):
            raise AdvisorError("the planner needs at least one finite candidate angle")
        if not (math.isfinite(node_step) and node_step > 0):
            raise AdvisorError(f"node_step must be > 0 degrees, got {node_step}")
        if samples < 1:
            raise AdvisorError(f"samples must be >= 1, got {samples}")
        if not (math.isfinite(count_time_s) and count_time_s > 0):
            raise AdvisorError(f"count_time_s must be > 0, got {count_time_s}")
        factors = np.asarray(count_factors, dtype=float)
        if factors.size == 0 or not np.all(np.isfinite(factors) & (factors > 0)):
            raise AdvisorError(f"count factors must be > 0, got {list(count_factors)}")
        self.refiner = refiner
        self.folder = folder
        self.omegas = w
        self.lo, self.hi = float(w[0]), float(w[-1])
        n_nodes = max(2, math.ceil((self.hi - self.lo) / node_step) + 1)
        self.nodes = np.linspace(self.lo, self.hi, n_nodes) if self.hi > self.lo else w[:1]
        if nodes is not None:  # given: they must span the candidates
            self.nodes = np.unique(np.asarray(nodes, dtype=float))
            if self.nodes[0] > self.lo or self.nodes[-1] < self.hi:
                raise AdvisorError("the planner's nodes must span the candidate angles")
        self.samples = int(samples)
        self.count_time_s = float(count_time_s)
        self.count_factors = factors
        self.cost = cost or BeamCost()
        names = tuple(refiner.names)
        self.names = names
        sel = names if coefficients is None else tuple(coefficients)
        for n in sel:
            if n not in names:
                raise AdvisorError(f"{n!r} is not a coefficient of {refiner.material}")
        self.index = np.array([names.index(n) for n in sel])
        self.pixel_stride = int(pixel_stride)
        self.e_substeps = int(e_substeps)
        self.rng = np.random.default_rng(seed)
        self.efficiency = 1.0
        self._models: dict[float, Any] = {}
        #: (S, n_nodes, n_factors, k, k): what a count of each node adds to the precision
        self._fisher: NDArray[np.float64] | None = None
        self._node_cache: tuple[Any, Any, Any] | None = None
        self._charge = 1.0
        self._prepared = threading.Event()
        self._node_thread: threading.Thread | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.refresh_seconds = 0.0

    def focus(self, names: Sequence[str] | None) -> None:
        """Make the posterior volume of ``names`` the criterion (None: all coefficients):
        the coefficients a target names, so that the plan serves the stop criterion."""
        sel = self.names if not names else tuple(names)
        for n in sel:
            if n not in self.names:
                raise AdvisorError(f"{n!r} is not a coefficient of {self.refiner.material}")
        self.index = np.array([self.names.index(n) for n in sel])

    def focus_on_target(
        self, covariance: NDArray[np.float64], target: Mapping[str, Any] | None
    ) -> list[str]:
        """Focus the criterion on what the stop rule still lacks: the coefficients of the
        ``target``'s ``std`` whose posterior std is still above it (all of the target's
        once none is; every coefficient without a std target). Returns them."""
        std_target = dict((target or {}).get("std") or {})
        cov = np.asarray(covariance, dtype=float)
        names = [
            n
            for n, v in std_target.items()
            if math.sqrt(max(cov[self.names.index(n), self.names.index(n)], 0.0)) > v
        ] or list(std_target)
        self.focus(names or None)
        return [self.names[i] for i in self.index]

    # -- the nodes' Fisher information -------------------------------------------------------

    def _node_model(self, omega: float) -> Any:
        """The expected-counts model of one orientation at ``omega`` (unit charge)."""
        from consumers.reduction.moments import orientation_moments, star_operations

        hit = self._models.get(omega)
        if hit is not None:
            return hit
        r = self.refiner
        if not hasattr(self, "_ops"):
            self._ops = star_operations(self.folder, r.constants.operations)
        m = orientation_moments(
            self.folder,
            r.constants,
            float(omega),
            pixel_stride=self.pixel_stride,
            e_substeps=self.e_substeps,
            inverse_ops=self._ops,
            classes=r.classes,
            cache=False,  # walked once: kept as the node's model, never asked for again
        )
        try:
            model = r.counts_model(m)
        except Exception:  # an angle that reaches no fitted bin carries no information
            model = None
        self._models[omega] = model
        return model

    def prepare(self, *, progress: bool = False) -> None:
        """Build every node's model (the moments: ~0.3 s a node) ahead of the run."""
        from tqdm import tqdm

        for w in tqdm(self.nodes, desc="planner nodes", unit="node", disable=not progress):
            self._node_model(float(w))
        self._prepared.set()

    def start(self) -> None:
        """Build the nodes' models on a background thread (with the run's start)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.prepare, name="planner-nodes", daemon=True)
            self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for :meth:`start`'s work; True when every node is ready."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._prepared.is_set()

    def settle(self, timeout: float | None = None) -> bool:
        """Wait (at most ``timeout`` s in all) for the nodes' models and then for the node
        information being computed on a thread (:meth:`refresh` with ``background``).
        True when a plan can be ranked: :meth:`refresh` then uses information at hand and
        raises no :class:`PlanNotReady`."""
        deadline = None if timeout is None else time.monotonic() + float(timeout)

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        if not self.wait(left()):
            return False
        thread = self._node_thread
        if thread is not None:
            thread.join(left())
        return self._node_cache is not None

    @property
    def computing(self) -> bool:
        """Whether the nodes' information is being computed on a thread."""
        thread = self._node_thread
        return thread is not None and thread.is_alive()

    def held_bytes(self) -> dict[str, int]:
        """Bytes held by the nodes' models (``models``, :attr:`CountsModel.nbytes`: their
        own arrays) and by their last information terms (``terms``: expected counts and
        Jacobians at the posterior points)."""
        models = sum(m.nbytes for m in list(self._models.values()) if m is not None)
        cache = self._node_cache
        terms = 0
        if cache is not None:
            for per in cache[2]:
                for t in per:
                    if t is not None:  # expected counts and Jacobian (the bins: the model's)
                        terms += int(t[1].nbytes) + int(t[2].nbytes)
        return {"models": int(models), "terms": terms}

    @property
    def prepared(self) -> bool:
        """Whether every node's model is built."""
        return self._prepared.is_set()

    def refresh(
        self,
        theta: NDArray[np.float64],
        covariance: NDArray[np.float64],
        cumulative: Any,
        *,
        charge: float,
        inflation: float = 1.0,
        reuse_within: float = 0.0,
        background: bool = False,
    ) -> None:
        """Recompute what each node's count would add to the posterior, at the posterior's
        mean and draws.

        ``theta``: the refinement's full parameter vector at the optimum (coefficients,
        then ``log_scale``, ``background``, ``resolution_scale``, ``q_variance``);
        ``covariance``: (n_coeff, n_coeff) its coefficients' covariance; ``cumulative``:
        the :class:`~model_server.refinement.counts.CountsModel` of the counts folded so far
        (None before the first). The increment of a node is the Fisher information of the
        *folded* sum, ``sum_b (J_b + q J'_b)(J_b + q J'_b)^T / (lambda_b + q lambda'_b)``
        minus that of the counts so far (``J``, ``lambda`` the run's bins, ``J'``,
        ``lambda'`` the node's per uC, ``q = charge x`` each count factor, ``charge`` the uC
        of a standard count), divided by the refinement's
        covariance ``inflation``. ``reuse_within``: keep the nodes' own Jacobians when
        the mean moved by less than this many std since they were computed (they depend on
        the coefficients only). ``background``: recompute them on a thread and use the last
        ones meanwhile (the service: the estimate is not held back); raises
        :class:`PlanNotReady` while the first ones are being made.
        """
        t0 = time.perf_counter()
        theta = np.asarray(theta, dtype=float)
        k = len(self.names)
        cov = np.asarray(covariance, dtype=float)
        if cov.shape != (k, k) or theta.shape[0] < k:
            raise AdvisorError(f"the posterior needs {k} coefficients and a {k}x{k} covariance")
        if not (math.isfinite(charge) and charge > 0):
            raise AdvisorError(f"charge of a count must be > 0 uC, got {charge}")
        self._charge = float(charge)
        std = np.sqrt(np.maximum(np.diag(cov), 1e-300))
        reuse = (
            self._node_cache is not None
            and reuse_within > 0
            and float(np.max(np.abs(theta[:k] - self._node_cache[0][:k]) / std)) < reuse_within
        )
        if not reuse:
            points = self._points(theta, cov)
            if background and self._node_cache is not None:
                # the nodes' Jacobians at the new points are made on a thread; this refresh
                # uses the last ones (computed at an earlier estimate)
                self._nodes_in_background(points)
                reuse = True
            elif background:
                self._nodes_in_background(points)
                raise PlanNotReady("the plan's node information is being computed")
            else:
                self._node_cache = (theta.copy(), points, self._node_terms(points))
        assert self._node_cache is not None
        points = [np.concatenate([p[:k], theta[k:]]) for p in self._node_cache[1]]
        node_terms = self._node_cache[2]
        if reuse:
            points[0] = theta
        n_bins = int(np.prod(self.refiner.grid.shape))
        charge = self._charge
        factors = self.count_factors
        fisher = np.zeros((len(points), len(self.nodes), len(factors), k, k))
        use = np.ones(len(points), dtype=bool)
        for s, t in enumerate(points):
            lam_n = np.zeros(n_bins)
            jac_n = np.zeros((n_bins, k))
            if cumulative is not None:
                ev = cumulative.evaluate(t)
                if not ev.stable and s > 0:
                    use[s] = False
                    continue
                lam_n[cumulative.bins] = ev.expected
                jac_n[cumulative.bins] = ev.jacobian[:, :k]
            for j in range(len(self.nodes)):
                term = node_terms[j][s]
                if term is None:
                    continue
                bins, lam_c, jac_c = term
                ln = lam_n[bins]
                jn = jac_n[bins]
                safe_n = np.where(ln > 0, ln, 1.0)
                before = (jn / safe_n[:, None]).T @ jn
                for f, x in enumerate(factors):
                    q = charge * x
                    lt = np.maximum(ln + q * lam_c, 1e-12)
                    jt = jn + q * jac_c
                    inc = (jt / lt[:, None]).T @ jt - before
                    inc = 0.5 * (inc + inc.T) / max(inflation, 1.0)
                    vals, vecs = np.linalg.eigh(inc)
                    fisher[s, j, f] = (vecs * np.maximum(vals, 0.0)) @ vecs.T
        with self._lock:
            self._fisher = fisher[use] if use.any() else fisher[:1]
        self.refresh_seconds = time.perf_counter() - t0

    def _points(self, theta: NDArray[np.float64], cov: NDArray[np.float64]) -> list[Any]:
        """The posterior's mean and ``samples - 1`` draws (full parameter vectors)."""
        k = len(self.names)
        points = [theta.copy()]
        if self.samples > 1:
            chol = np.linalg.cholesky(0.5 * (cov + cov.T) + 1e-18 * np.eye(k))
            for _ in range(self.samples - 1):
                t = theta.copy()
                t[:k] = theta[:k] + chol @ self.rng.standard_normal(k)
                points.append(t)
        return points

    def _node_terms(self, points: list[Any]) -> list[Any]:
        """Each node's (bins, expected counts, coefficients' Jacobian) per uC at each
        point (None where the lattice is unstable or the node reaches no fitted bin)."""
        k = len(self.names)
        node_terms = []
        for w in self.nodes:
            model = self._node_model(float(w))
            per: list[tuple[Any, Any, Any] | None] = []
            for t in points:
                if model is None:
                    per.append(None)
                    continue
                ev = model.evaluate(t)
                if not ev.stable:
                    per.append(None)
                    continue
                # per uC of the node's count; the scale and background are the run's (the
                # coefficients' columns copied, in single precision: a view would hold the
                # whole Jacobian, and the ranking needs no more than 7 digits)
                per.append((model.bins, ev.expected, ev.jacobian[:, :k].astype(np.float32)))
            if model is not None:
                model.release()  # kept for the next refresh: its moments only
            node_terms.append(per)
        return node_terms

    def _nodes_in_background(self, points: list[Any]) -> None:
        """Recompute the nodes' terms at ``points`` on a thread (one at a time; a newer
        request waits for the next refresh)."""
        if self._node_thread is not None and self._node_thread.is_alive():
            return

        def work() -> None:
            yield_cpu()  # the estimates first
            try:
                terms = self._node_terms(points)
                self._node_cache = (points[0].copy(), points, terms)
            except Exception:  # logged; the plan goes on with the last terms
                logger.exception("the plan's node information failed")

        self._node_thread = threading.Thread(target=work, name="planner-refresh", daemon=True)
        self._node_thread.start()

    def candidate_fisher(self, omegas: NDArray[np.float64]) -> NDArray[np.float64]:
        """(S, n, n_factors, k, k): what a count of each angle adds to the precision
        ((eV/A^2)^-2), linear between the nodes."""
        with self._lock:
            fisher = self._fisher
        if fisher is None:
            raise AdvisorError("the planner has no posterior yet: refresh() it first")
        w = np.clip(np.asarray(omegas, dtype=float), self.nodes[0], self.nodes[-1])
        if len(self.nodes) == 1:
            return np.repeat(fisher[:, :1], len(w), axis=1)
        i = np.clip(np.searchsorted(self.nodes, w, side="right") - 1, 0, len(self.nodes) - 2)
        a = (w - self.nodes[i]) / (self.nodes[i + 1] - self.nodes[i])
        a = a[None, :, None, None, None]
        return np.asarray((1 - a) * fisher[:, i] + a * fisher[:, i + 1])

    # -- ranking -----------------------------------------------------------------------------

    def _precision(self, covariance: NDArray[np.float64]) -> NDArray[np.float64]:
        cov = np.asarray(covariance, dtype=float)
        k = len(self.names)
        if cov.shape != (k, k) or not np.all(np.isfinite(cov)):
            raise AdvisorError(f"the posterior covariance must be finite {k}x{k}")
        try:
            return np.asarray(np.linalg.inv(0.5 * (cov + cov.T)))
        except np.linalg.LinAlgError as exc:
            raise AdvisorError(f"the posterior covariance is singular: {exc}") from exc

    def _gains(
        self, prec: NDArray[np.float64], increments: NDArray[np.float64]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Gains (nats, (n, f), averaged over the samples) of the criterion's block and the
        covariances after each count at the mean ((n, f, k, k)); ``increments``
        (S, n, f, k, k)."""
        idx = self.index
        cov = np.linalg.inv(prec)
        base = -float(_logdet(cov[np.ix_(idx, idx)][None])[0])
        cov_after = np.linalg.inv(prec + increments)  # (S, n, f, k, k)
        block = cov_after[..., idx[:, None], idx[None, :]]
        gains = np.mean(-_logdet(block) - base, axis=0) / 2.0
        return np.asarray(gains), np.asarray(cov_after[0])

    def rank(
        self,
        covariance: NDArray[np.float64],
        *,
        current: float | None = None,
        forbidden: Sequence[Sequence[float]] = (),
        measured: Sequence[float] = (),
        omegas: Sequence[float] | None = None,
    ) -> list[PlanCandidate]:
        """Candidates best first by expected gain per beam time.

        ``covariance``: the coefficients' posterior now (the one :meth:`refresh` saw);
        ``current``: where the goniometer is (None: no travel charged); ``forbidden``:
        closed angle ranges never suggested; ``omegas``: the candidates (default: the
        planner's).
        """
        w = self.omegas if omegas is None else np.asarray(omegas, dtype=float)
        forbidden = check_ranges(forbidden, self.lo, self.hi) if len(forbidden) else []
        w = w[allowed(w, forbidden)]
        if w.size == 0:
            raise AdvisorError("every candidate angle lies in a forbidden range")
        prec = self._precision(covariance)
        gains, cov_after = self._gains(prec, self.candidate_fisher(w))  # (n, f)
        times = self.count_time_s * self.count_factors  # (f,)
        travel = self.cost.travel_s(current, w)
        beam = travel[:, None] + times[None, :]
        score = gains / beam
        best = np.argmax(score, axis=1)
        rows = np.arange(len(w))
        order = np.argsort(-score[rows, best], kind="stable")
        measured_set = {round(float(m), 6) for m in measured}
        sd = np.sqrt(np.maximum(np.diagonal(cov_after[rows, best], axis1=-2, axis2=-1), 0.0))
        out = []
        for i in order:
            f = best[i]
            out.append(
                PlanCandidate(
                    omega=float(w[i]),
                    count_time_s=float(times[f]),
                    travel_s=float(travel[i]),
                    beam_time_s=float(beam[i, f]),
                    gain=float(gains[i, f]),
                    gain_per_minute=float(60.0 * score[i, f]),
                    figure_of_merit=float(60.0 * gains[i, f] / times[f]),
                    predicted_std={n: float(sd[i, j]) for j, n in enumerate(self.names)},
                    measured=round(float(w[i]), 6) in measured_set,
                )
            )
        return out

    # -- when to stop ------------------------------------------------------------------------

    def _status(self, cov: NDArray[np.float64], target: Mapping[str, Any]) -> tuple[bool, float]:
        idx = self.index
        d = float(np.exp(_logdet(cov[np.ix_(idx, idx)][None])[0] / (2 * len(idx))))
        met = True
        for n, v in target.get("std", {}).items():
            met &= math.sqrt(max(cov[self.names.index(n), self.names.index(n)], 0.0)) <= v
        if "d_criterion" in target:
            met &= d <= target["d_criterion"]
        return bool(met), d

    def observe(
        self, predicted_gain: float, covariance_before: NDArray, covariance_after: NDArray
    ) -> None:
        """Update :attr:`efficiency` with the gain a measurement realised (the refinement's
        covariances before and after it) against the ``predicted_gain`` (nats)."""
        if not (predicted_gain > 1e-6):
            return
        idx = self.index
        before = _logdet(np.asarray(covariance_before)[np.ix_(idx, idx)][None])[0]
        after = _logdet(np.asarray(covariance_after)[np.ix_(idx, idx)][None])[0]
        ratio = float(np.clip(0.5 * (before - after) / predicted_gain, 0.05, 1.5))
        self.efficiency = 0.7 * self.efficiency + 0.3 * ratio

    def stop(
        self,
        covariance: NDArray[np.float64],
        target: Mapping[str, Any] | None,
        *,
        current: float | None = None,
        forbidden: Sequence[Sequence[float]] = (),
        max_beam_time_s: float | None = None,
        max_orientations: int = 1000,
    ) -> StopState:
        """The run's state against ``target`` and the expected beam time to meet it: the
        greedy plan (best gain per beam time, the posterior updated by each pick's Fisher
        information at the posterior mean times :attr:`efficiency`) until the target is
        met, ``max_beam_time_s`` (default: four sweeps of the range at the standard count)
        or ``max_orientations`` is spent."""
        cov = np.asarray(covariance, dtype=float)
        target = None if target is None else check_target(target, self.names)
        std_now = {n: float(math.sqrt(max(cov[i, i], 0.0))) for i, n in enumerate(self.names)}
        shown = (
            {n: std_now[n] for n in target.get("std", {})}
            if target
            else {n: std_now[n] for n in self.names[:4]}
        )
        if not target:
            _, d = self._status(cov, {})
            return StopState("no target", None, shown, d, None, None, efficiency=self.efficiency)
        met, d = self._status(cov, target)
        if met:
            return StopState("done", target, shown, d, 0.0, 0, efficiency=self.efficiency)
        budget = (
            4.0 * len(self.omegas) * self.count_time_s
            if max_beam_time_s is None
            else float(max_beam_time_s)
        )
        forbidden = check_ranges(forbidden, self.lo, self.hi) if len(forbidden) else []
        w = self.omegas[allowed(self.omegas, forbidden)]
        if w.size == 0:
            raise AdvisorError("every candidate angle lies in a forbidden range")
        # each pick's increment as computed against the counts so far, discounted by the
        # realised efficiency (later picks repeat more of what was folded)
        fisher = self.candidate_fisher(w)[:1] * self.efficiency  # (1, n, f, k, k)
        prec = self._precision(cov)
        spent, pos = 0.0, current
        plan: list[float] = []
        times = self.count_time_s * self.count_factors
        while spent < budget and len(plan) < max_orientations:
            gains, _ = self._gains(prec, fisher)
            beam = self.cost.travel_s(pos, w)[:, None] + times[None, :]
            score = gains / beam
            i, f = np.unravel_index(int(np.argmax(score)), score.shape)
            if gains[i, f] <= 1e-12:
                break
            prec = prec + fisher[0, i, f]
            spent += float(beam[i, f])
            pos = float(w[i])
            plan.append(pos)
            cov_p = np.linalg.inv(prec)
            ok, _ = self._status(cov_p, target)
            if ok:
                return StopState(
                    "measuring",
                    target,
                    shown,
                    d,
                    spent,
                    len(plan),
                    efficiency=self.efficiency,
                    plan=plan,
                )
        cov_p = np.linalg.inv(prec)
        best = {
            n: float(math.sqrt(max(cov_p[self.names.index(n), self.names.index(n)], 0.0)))
            for n in shown
        }
        return StopState(
            "unreachable",
            target,
            shown,
            d,
            None,
            None,
            best_reachable_std=best,
            efficiency=self.efficiency,
            plan=plan,
        )
