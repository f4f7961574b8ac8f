"""The advisor behind bluesky-adaptive's interfaces, so that a bluesky plan can ask "where next?".

:class:`OrientationAgent` offers both of bluesky-adaptive's agent interfaces:

* the classic ``tell`` / ``ask`` / ``report`` of its agents: ``tell(omega, estimate)``
  after an orientation was measured and the model server updated the FCs, ``ask(n)`` for
  the next ``n`` angles, ``report()`` for the latest ranking;
* the ``Optimizer`` protocol of bluesky-adaptive 1.x (``suggest`` / ``ingest`` /
  ``get_best_points``), so that ``bluesky_adaptive.plans.optimize`` drives the goniometer
  (an ``ophyd`` motor named like :attr:`OrientationAgent.motor`) with it.

Outcomes (``tell``'s ``y``, ``ingest``'s points) carry the model server's estimate after the
measurement: ``fc_mean`` and ``fc_std`` (eV/A^2, in the advisor's FC order) and optionally
``counts`` / ``exposure`` (the run's folded arrays so far) for the counts scale. An
example plan with ``ophyd.sim`` devices is in the README and in
``tests/steering/advisor/test_agent.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from steering.advisor.ranking import Advisor, Ranking, check_score, check_weighting
from steering.exceptions import AdvisorError

__all__ = ["OrientationAgent"]


class OrientationAgent:
    """Suggests goniometer angles with an :class:`~steering.advisor.ranking.Advisor`.

    Parameters
    ----------
    advisor
        The run's advisor.
    omegas
        (n_c,) candidate angles, degrees.
    coverage
        (n_c, n_q, n_E) their coverage (sr meV).
    motor
        Name of the goniometer axis in suggestions (the ophyd motor's name).
    charge
        Proton charge of one orientation, uC.
    remeasure
        Offer angles already measured too (the advisor decides whether they pay).
    score, weighting
        What the advisor sorts by and how it weighs the spectrum's bins
        (:meth:`steering.advisor.ranking.Advisor.rank`).
    """

    def __init__(
        self,
        advisor: Advisor,
        omegas: Sequence[float] | NDArray[np.float64],
        coverage: NDArray[np.floating],
        *,
        motor: str = "omega",
        charge: float = 1.0,
        remeasure: bool = False,
        score: str = "spectrum",
        weighting: str = "scarcity",
    ) -> None:
        check_score(score)
        check_weighting(weighting)
        self.score = score
        self.weighting = weighting
        self.advisor = advisor
        self.omegas = np.asarray(omegas, dtype=float)
        self.coverage = np.asarray(coverage, dtype=float)
        if len(self.omegas) == 0:
            raise AdvisorError("the agent needs at least one candidate angle")
        if self.coverage.shape[0] != len(self.omegas):
            raise AdvisorError("one coverage per candidate angle")
        self.motor = motor
        self.charge = float(charge)
        self.remeasure = bool(remeasure)
        self.measured: list[float] = []
        self.mean: NDArray[np.float64] | None = None
        self.std: NDArray[np.float64] | None = None
        self.counts: NDArray[np.float64] | None = None
        self.exposure: NDArray[np.float64] | None = None
        self.last_ranking: Ranking | None = None
        self._ids = itertools.count()
        self._pending: dict[int, float] = {}

    # -- classic agent interface ------------------------------------------------------------

    def tell(self, x: float, y: Mapping[str, Any]) -> dict[str, Any]:
        """An orientation at angle ``x`` (degrees) was measured; ``y`` holds the estimate
        after it (``fc_mean``, ``fc_std``, optional ``counts`` and ``exposure``).
        Returns the document the agent keeps of it."""
        n_fc = len(self.advisor.fc_names)
        try:
            mean = np.asarray(y["fc_mean"], dtype=float).ravel()
            std = np.asarray(y["fc_std"], dtype=float).ravel()
        except (KeyError, TypeError, ValueError) as exc:
            raise AdvisorError(f"an outcome needs fc_mean and fc_std: {exc}") from exc
        if mean.shape != (n_fc,) or std.shape != (n_fc,):
            raise AdvisorError(f"fc_mean and fc_std need {n_fc} values each")
        self.measured.append(float(x))
        self.mean, self.std = mean, std
        if "counts" in y and "exposure" in y:
            self.counts = np.asarray(y["counts"], dtype=float)
            self.exposure = np.asarray(y["exposure"], dtype=float)
        return {"omega": float(x), "fc_mean": mean.tolist(), "fc_std": std.tolist()}

    def ask(self, batch_size: int = 1) -> tuple[list[dict[str, Any]], list[float]]:
        """The next ``batch_size`` angles: ``(documents, omegas)``; the documents hold
        each angle's score and expected std."""
        if batch_size < 1:
            raise AdvisorError(f"batch_size must be >= 1, got {batch_size}")
        ranking = self._rank()
        picks = [
            c
            for c in ranking.candidates
            if self.remeasure or not any(abs(c.omega - m) < 1e-6 for m in self.measured)
        ][:batch_size]
        if not picks:
            raise AdvisorError("every candidate angle has been measured")
        return [c.to_dict() | {"basis": ranking.basis} for c in picks], [c.omega for c in picks]

    def report(self) -> dict[str, Any]:
        """The latest ranking (top 10) and estimate, JSON-ready."""
        ranking = self.last_ranking or self._rank()
        out = ranking.to_dict(top=10)
        out["measured"] = list(self.measured)
        if self.mean is not None and self.std is not None:
            out["estimate"] = {
                n: {"mean": float(m), "std": float(s)}
                for n, m, s in zip(self.advisor.fc_names, self.mean, self.std, strict=True)
            }
        return out

    # -- bluesky-adaptive 1.x Optimizer protocol ----------------------------------------------

    def suggest(self, num_points: int | None = None) -> list[dict[str, Any]]:
        """``[{motor: omega, "_id": n}, ...]`` for ``bluesky_adaptive.plans.optimize``."""
        _, omegas = self.ask(num_points or 1)
        out = []
        for w in omegas:
            i = next(self._ids)
            self._pending[i] = w
            out.append({self.motor: w, "_id": i})
        return out

    def ingest(self, points: Sequence[Mapping[str, Any]]) -> None:
        """Outcomes of suggested (or external) points: each with the angle (under the motor's
        name, or the suggestion's ``_id``) and the estimate after it."""
        for p in points:
            w = p.get(self.motor)
            if w is None:
                w = self._pending.pop(p.get("_id", -1), None)
            if w is None:
                raise AdvisorError(f"outcome {dict(p)} names no angle ({self.motor!r} or _id)")
            self.tell(float(w), p)

    def get_best_points(self) -> list[tuple[Any, dict[str, Any], dict[str, Any]]]:
        """The best next angle as ``(_id, {motor: omega}, {"score": ...})``."""
        docs, omegas = self.ask(1)
        return [("next", {self.motor: omegas[0]}, {"score": docs[0]["score"]})]

    # -- internals ---------------------------------------------------------------------------

    def _rank(self) -> Ranking:
        kwargs: dict[str, Any] = {}
        if self.mean is not None:
            kwargs = {"mean": self.mean, "std": self.std}
            if self.counts is not None:
                kwargs.update(counts=self.counts, exposure=self.exposure)
        self.last_ranking = self.advisor.rank(
            self.omegas,
            self.coverage,
            measured=self.measured,
            charge=self.charge,
            score=self.score,
            weighting=self.weighting,
            **kwargs,
        )
        return self.last_ranking
