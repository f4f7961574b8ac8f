"""Snapshot -> estimate -> advice: the model server and the advisor beside a consumer.

:class:`SteeringLoop` is a :class:`consumers.messages.SnapshotSink`. After every completed
orientation it estimates the FCs of the cumulative folded spectrum
(an :class:`Estimator`: :class:`model_server.inversion.inference.Estimator`), ranks the
candidate angles
(:class:`steering.advisor.ranking.Advisor`) under that estimate, keeps both in its history and hands
the advice to its sinks:

* :class:`KafkaAdviceSink`: the ranking as JSON on ``<prefix>_advice`` (key: run id) and the
  same as bluesky documents (a ``steer_advice`` run: one Event per update in the
  ``advice`` stream) on ``<prefix>_advice_docs``, in the ``bluesky-json`` convention of the
  run topics (kept off the run's own bluesky topic, whose consumer would take a second
  RunStart for a new run);
* :class:`AdviceDocuments` alone, with any ``(name, doc)`` callback (a bluesky Publisher,
  a RunEngine subscription, a list in tests).

After the ranking, the people's controls of the advice
(:class:`steering.advisor.controls.AdvisorControls`: pause, excluded angles, a forced next
angle) are applied (:meth:`SteeringLoop._apply_controls`): every advice says the advisor's
``state``, the ``next`` angle and where it came from, and the ``controls``.

The candidates' coverages come from the run's metadata (instrument, mounting, Ei; the
planned angles by default) and are computed on a background thread when the run starts;
until they are all ready, the ranking covers the ones that are (and says how many).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray

from consumers.reduction.accumulate import OrientationRecord, Snapshot
from consumers.reduction.pipeline import coverage_angle
from steering import metrics
from steering.advisor.controls import AdvisorControls
from steering.advisor.planner import InformationPlanner, PlanNotReady
from steering.advisor.ranking import Advisor, check_score, check_weighting
from steering.exceptions import AdvisorError

if TYPE_CHECKING:
    from model_server.refinement.exact import LiveExactCorrection
    from model_server.refinement.fit import Refined
    from model_server.refinement.refiner import RunRefiner
    from model_server.refinement.scan import BackgroundScan, ScanResult

__all__ = [
    "AdviceDocuments",
    "AdviceSink",
    "CandidateCoverage",
    "Estimator",
    "FCEstimate",
    "KafkaAdviceSink",
    "SteeringLoop",
]

logger = logging.getLogger(__name__)

#: the plan keeps its nodes' Jacobians while the posterior mean stays within this many std
PLAN_REUSE = 1.0

#: where every advice dict goes (a Kafka producer, the service's history and live state)
AdviceSink = Callable[[dict[str, Any]], None]


class FCEstimate(Protocol):
    """What the loop reads of an estimate
    (:class:`model_server.inversion.inference.Estimate`)."""

    @property
    def mean(self) -> NDArray[np.float64]:
        """(n_fc,) FC means, eV/A^2, in the advisor's order."""
        ...

    @property
    def std(self) -> NDArray[np.float64]:
        """(n_fc,) FC standard deviations, eV/A^2."""
        ...

    @property
    def model_version(self) -> str:
        """The model that made it."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (FCs keyed by name), the ``estimate`` of every advice."""
        ...


class Estimator(Protocol):
    """What the loop asks of the model server: one estimate per spectrum
    (:class:`model_server.inversion.inference.Estimator`)."""

    def estimate(self, spectrum: NDArray[np.float64], mask: NDArray[np.bool_]) -> FCEstimate:
        """The FC estimate of a (n_q, n_E) I(q, E) (1/(uC sr meV), NaN where unmeasured)
        and its (n_q, n_E) mask (True where measured)."""
        ...


def _key(dtype: str, shape: list[int] | None = None, units: str = "") -> dict[str, Any]:
    """An event-model data key of the advice stream."""
    key: dict[str, Any] = {"source": "steer", "dtype": dtype, "shape": shape or []}
    if units:
        key["units"] = units
    return key


class AdviceDocuments:
    """Advice as a bluesky run of its own: start, an ``advice`` descriptor, one Event per
    update (best angle, its score, the top angles and scores, the estimate, the run's state,
    the next angle, whether the target is met and the expected beam time to it), stop.

    ``emit(name, doc)`` receives the documents (event-model's schemas).
    """

    def __init__(
        self, emit: Callable[[str, dict[str, Any]], None], *, run_id: str, material: str
    ) -> None:
        self.emit = emit
        self.run_id = run_id
        self.material = material
        self._bundle: Any = None
        self._desc: Any = None

    def publish(self, advice: dict[str, Any]) -> None:
        """One advice update as an Event (the run and descriptor open on the first)."""
        import event_model

        now = time.time()
        ranking = advice["ranking"]
        top = ranking["candidates"][:10]
        if self._bundle is None:
            self._bundle = event_model.compose_run(
                time=now,
                metadata={
                    "plan_name": "steer_advice",
                    "run_id": self.run_id,
                    "material": self.material,
                    "fc_names": ranking["fc_names"],
                },
            )
            self.emit("start", dict(self._bundle.start_doc))
            self._desc = self._bundle.compose_descriptor(
                name="advice",
                data_keys={
                    "n_orientations": _key("integer"),
                    "best_omega": _key("number", units="deg"),
                    "best_score": _key("number"),
                    "top_omegas": _key("array", [len(top)], units="deg"),
                    "top_scores": _key("array", [len(top)]),
                    "basis": _key("string"),
                    "fc_mean": _key("array", [len(ranking["fc_names"])], units="eV/A^2"),
                    "fc_std": _key("array", [len(ranking["fc_names"])], units="eV/A^2"),
                    "state": _key("string"),
                    "next_omega": _key("number", units="deg"),
                    "target_met": _key("boolean"),
                    "expected_beam_time_s": _key("number", units="s"),
                },
                time=now,
            )
            self.emit("descriptor", dict(self._desc.descriptor_doc))
        est = advice.get("estimate") or {}
        names = ranking["fc_names"]
        data = {
            "n_orientations": int(advice["n_orientations"]),
            "best_omega": float(top[0]["omega"]) if top else float("nan"),
            "best_score": float(top[0]["score"]) if top else float("nan"),
            "top_omegas": [float(c["omega"]) for c in top],
            "top_scores": [float(c["score"]) for c in top],
            "basis": str(ranking["basis"]),
            "fc_mean": [float(est["fc"][n]["mean"]) for n in names] if est else [],
            "fc_std": [float(est["fc"][n]["std"]) for n in names] if est else [],
            # the run's state and the stop criterion (NaN: no next angle / no estimate)
            "state": str(advice.get("state") or "measuring"),
            "next_omega": float((advice.get("next") or {}).get("omega", float("nan"))),
            "target_met": bool((advice.get("stop") or {}).get("met", False)),
            "expected_beam_time_s": float(
                (advice.get("stop") or {}).get("expected_beam_time_s") or float("nan")
            ),
        }
        event = self._desc.compose_event(data=data, timestamps=dict.fromkeys(data, now), time=now)
        self.emit("event", dict(event))

    def close(self, exit_status: str = "success") -> None:
        """Close the advice run (a stop document), if one was opened."""
        if self._bundle is not None:
            self.emit("stop", dict(self._bundle.compose_stop(exit_status=exit_status)))
            self._bundle = None


class KafkaAdviceSink:
    """Advice to Kafka: JSON on ``<prefix>_advice``, bluesky documents on
    ``<prefix>_advice_docs`` (``schema: bluesky-json`` header, payload ``[name, doc]``)."""

    def __init__(self, bootstrap: str, prefix: str, *, run_id: str, material: str) -> None:
        from kafka import KafkaProducer

        from consumers.kafka import ensure_topics

        self.topic = f"{prefix}_advice"
        self.docs_topic = f"{prefix}_advice_docs"
        ensure_topics(bootstrap, [self.topic, self.docs_topic])
        from consumers.kafka import client_security

        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap, max_request_size=8 << 20, **client_security()
        )
        self._key = run_id.encode()
        self.documents = AdviceDocuments(self._send_doc, run_id=run_id, material=material)

    def _send_doc(self, name: str, doc: dict[str, Any]) -> None:
        from simulations.jsonutil import json_default

        payload = json.dumps([name, doc], default=json_default).encode()
        self._producer.send(
            self.docs_topic,
            value=payload,
            key=self._key,
            headers=[("schema", b"bluesky-json"), ("document", name.encode())],
        )

    def __call__(self, advice: dict[str, Any]) -> None:
        from simulations.jsonutil import json_default

        if advice.get("ranking") is None:  # an estimate without a ranking: nothing to advise
            return
        self._producer.send(
            self.topic,
            value=json.dumps(advice, default=json_default).encode(),
            key=self._key,
            headers=[("schema", b"steer-advice-json")],
        )
        self.documents.publish(advice)

    def close(self) -> None:
        self.documents.close()
        self._producer.flush()
        self._producer.close()


class CandidateCoverage:
    """Coverages of candidate angles for one run, computed on a background thread.

    ``meta`` is the run's pl72 metadata (``material``, ``instrument``, ``orientation``,
    ``ei_meV``, ``planned_omegas_deg``); ``omegas`` default to the planned angles.
    """

    def __init__(self, meta: dict[str, Any], omegas: Sequence[float] | None = None) -> None:
        from consumers.reduction.folding import Folder
        from consumers.reduction.table import FoldTable
        from simulations.instrument.spectrometer import Instrument, Orientation
        from simulations.lattice.materials import setup

        ms = setup(str(meta["material"]))
        ins = Instrument.from_metadata(dict(meta["instrument"]))
        o = meta["orientation"]
        orientation = Orientation.from_vectors(ms.crystal, tuple(o["u"]), tuple(o["v"]))
        w = meta.get("planned_omegas_deg", []) if omegas is None else omegas
        self.omegas = np.asarray(ins.check_omegas(np.asarray(w, dtype=float)), dtype=float)
        #: the run's folder (detector, mounting, Ei)
        self.folder = self._folder = Folder(
            FoldTable.cached(ms.crystal, ms.grid), ms.grid, ins, orientation, float(meta["ei_meV"])
        )
        self._done: list[NDArray[np.float64]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="candidate-coverage", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        for w in self.omegas:
            cov = self._folder.coverage(float(w))
            with self._lock:
                self._done.append(cov)

    def ready(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(omegas, coverages) of the candidates computed so far."""
        with self._lock:
            n = len(self._done)
            cov = np.stack(self._done) if n else np.zeros((0, *self._folder.grid.shape))
        return self.omegas[:n], cov

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for all; True when done."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


class SteeringLoop:
    """Estimate and advise after every completed orientation (a snapshot sink).

    Parameters
    ----------
    estimator
        The model server (:class:`Estimator`); None when the estimates are made elsewhere
        (the model-server replicas) and handed in with :meth:`advise`.
    advisor
        The run's advisor.
    candidates
        Candidate angles and their coverage (:class:`CandidateCoverage`).
    sinks
        Called with every advice dict (``ranking`` is None while no candidate coverage is
        ready or the advisor refused the input; ``error`` says why).
    estimate_sinks
        Called with every running estimate made here, before the ranking and the plan
        (:attr:`estimate_sinks`); the advice carries it again.
    run_id
        The run's id (in every advice).
    first_wait_s
        At the first orientation, wait this long at most for the candidates' coverages
        (they start with the run, and counting one orientation takes about a minute).
    score, weighting
        What the advisor sorts by and how it weighs the spectrum's bins
        (:meth:`steering.advisor.ranking.Advisor.rank`).
    controls
        The people's controls of the advice (shared with the API; default: none set).
    exact_correction
        Make the counts model's exact-fold correction one orientation at a time on a
        background thread while the next one counts
        (:class:`~model_server.refinement.exact.LiveExactCorrection`, about 19 s an
        orientation of one core on the README's Ge set-up), and fit every snapshot with
        what it has made so far; at the run's end the last snapshot is refitted with all of
        it (:meth:`settle_estimate`). Needs ``refiner`` on the path's bins or its zone
        classes.
    """

    #: overrides of the log carried in each advice (the history and the API have them all)
    ADVICE_OVERRIDES = 20

    def __init__(
        self,
        estimator: Estimator | None,
        advisor: Advisor,
        candidates: CandidateCoverage,
        *,
        sinks: Sequence[AdviceSink] = (),
        estimate_sinks: Sequence[AdviceSink] = (),
        run_id: str = "",
        first_wait_s: float = 60.0,
        score: str = "spectrum",
        weighting: str = "scarcity",
        refiner: RunRefiner | None = None,
        recheck_every: int = 10,
        planner: InformationPlanner | None = None,
        target: dict[str, Any] | None = None,
        controls: AdvisorControls | None = None,
        scan: bool = True,
        exact_correction: bool = False,
    ) -> None:
        check_score(score)
        check_weighting(weighting)
        self.score = score
        self.weighting = weighting
        self.estimator = estimator
        self.advisor = advisor
        self.candidates = candidates
        self.sinks = list(sinks)
        #: called with each running estimate as soon as it is made, before the ranking and
        #: the plan (~1-2 s of one core): ``run_id``, ``n_orientations``, ``omega``,
        #: ``estimate`` and ``seconds`` (from the orientation's hand-over)
        self.estimate_sinks = list(estimate_sinks)
        self.run_id = run_id
        self.history: list[dict[str, Any]] = []
        self.measured: list[float] = []
        self.first_wait_s = float(first_wait_s)
        self.refiner = refiner
        self.recheck_every = max(1, int(recheck_every))
        self._warm: NDArray[np.float64] | None = None
        #: the orientation count of the last snapshot fitted
        self._fitted_n = 0
        #: ranks the angles by the refined posterior's information per beam time and says
        #: when the target is met (None: the ranking alone suggests)
        self.planner = planner
        #: the target precision of the stop criterion (``{"std": {name: eV/A^2}}`` and/or
        #: ``{"d_criterion": eV/A^2}``)
        self.target = target
        #: (theta, covariance, inflation, cumulative model) of the last refined estimate
        self._posterior: tuple[Any, ...] | None = None
        self._last_next: dict[str, Any] | None = None
        #: the last advice has no plan only because the planner's information was still
        #: being computed (:meth:`finish` plans it when the run ends), with its record
        self._plan_pending = False
        self._last_record: OrientationRecord | None = None
        #: the last snapshot and its VAE estimate when its fit was taken (None when the
        #: last snapshot was not refined): a background answer that arrives after the run's
        #: last snapshot refits it (:meth:`settle_estimate`); dropped once that is done
        self._last_fit: tuple[Snapshot, dict[str, Any]] | None = None
        self.controls = controls if controls is not None else AdvisorControls()
        #: the service is stopping: the snapshots still handed over get the VAE's estimate
        #: (flagged) and no plan, so that a stop is not held up by fits (a fit on the zone
        #: classes of a few orientations can take tens of seconds)
        self.hurry = False
        #: the refinement's grid of starts around the VAE's estimate, on a thread, for the
        #: recheck snapshots' fits (:mod:`model_server.refinement.scan`); None: no scan
        self.scan: BackgroundScan | None = None
        if scan and refiner is not None:
            from model_server.refinement.scan import BackgroundScan

            self.scan = BackgroundScan(refiner.prior)
        #: the counts model's exact-fold correction, made on a thread (None: not made)
        self.exact: LiveExactCorrection | None = None
        #: the correction's version the last fit was made with
        self._exact_version = -1
        #: the orientations (record indices) queued for the correction
        self._noted: set[int] = set()
        if exact_correction and refiner is not None:
            self.exact = self._live_exact(refiner, candidates)

    def _live_exact(
        self, refiner: RunRefiner, candidates: CandidateCoverage
    ) -> LiveExactCorrection | None:
        """The run's live exact-fold correction on the candidates' detector, mounting and
        Ei with the refiner's fold table; None (logged) where it cannot be made."""
        from consumers.reduction.folding import Folder
        from model_server.refinement.exact import LiveExactCorrection

        try:
            c = candidates.folder
            folder = Folder(refiner.table, refiner.setup.grid, c.instrument, c.orientation, c.ei)
            return LiveExactCorrection(refiner, folder)
        except Exception as exc:  # the run goes on with the counts model as it is
            logger.warning(
                "run %s: no live exact-fold correction (%s): the fits use the counts model "
                "as it is",
                self.run_id,
                exc,
            )
            return None

    def _note_orientation(self, record: OrientationRecord) -> None:
        """A completed orientation whose moments the snapshots hold: queued for its exact
        fold (an orientation the run could not normalise was not added to them); once."""
        if self.exact is None or not record.normalised or record.index in self._noted:
            return
        self._noted.add(int(record.index))
        weight = record.weight if record.weight is not None else record.proton_charge
        try:  # at the angle its moments were taken at (the snapshot's)
            self.exact.add(coverage_angle(float(record.omega)), float(weight))
        except Exception as exc:  # that orientation stays uncorrected
            logger.warning(
                "run %s: the orientation at %s deg is not corrected: %s",
                self.run_id,
                record.omega,
                exc,
            )

    def note_folded(self, records: Sequence[OrientationRecord]) -> int:
        """Orientations the run folded before this loop saw them (a run restored from its
        checkpoint when the service restarted): queued for their exact folds as each
        completed orientation is, so that the correction covers the whole run and not only
        what was counted after the restart. Those already queued are not queued again.
        Returns how many were queued."""
        before = len(self._noted)
        for record in records:
            self._note_orientation(record)
        return len(self._noted) - before

    def __call__(self, snapshot: Snapshot, record: OrientationRecord) -> None:
        """A completed orientation: estimate, rank, publish (a
        :class:`consumers.messages.SnapshotSink`)."""
        if self.estimator is None:
            raise AdvisorError(
                "this steering loop has no estimator (it follows the model-server replicas): "
                "hand it their estimates with advise()"
            )
        t0 = time.perf_counter()
        self._note_orientation(record)
        est = self.estimator.estimate(snapshot.intensity, snapshot.mask)
        metrics.ESTIMATE_SECONDS.observe(time.perf_counter() - t0)
        metrics.MODEL_INFO.info({"version": str(est.model_version)})
        running, mean, std = self._running_estimate(snapshot, est)
        self._publish_estimate(snapshot, record, running, t0)  # before the ranking, the plan
        self.advise(snapshot, record, running, mean, std, started=t0)

    def _publish_estimate(
        self,
        snapshot: Snapshot,
        record: OrientationRecord,
        running: dict[str, Any],
        t0: float,
    ) -> dict[str, Any]:
        """The running estimate into the estimate sinks (``seconds`` from ``t0``). Returns
        the message sent."""
        message = {
            "run_id": self.run_id,
            "n_orientations": int(snapshot.n_orientations),
            "omega": float(record.omega),
            "estimate": running,
            "seconds": time.perf_counter() - t0,
        }
        for sink in self.estimate_sinks:
            try:
                sink(message)
            except Exception:
                logger.exception(
                    "estimate sink failed (after %d orientations)", int(snapshot.n_orientations)
                )
        return message

    def superseded(self, snapshot: Snapshot, record: OrientationRecord, newer: int) -> None:
        """A snapshot whose run has a newer one waiting (the estimates fell behind the
        consumer): the VAE's estimate alone, flagged, into the estimate sinks; no fit and
        no advice (the newer snapshot, which holds these counts too, gets both). Its
        angle counts as measured. ``newer`` is the waiting snapshot's orientation count."""
        from model_server.refinement.refiner import running_estimate

        if self.estimator is None:
            raise AdvisorError("this steering loop has no estimator (it follows the replicas)")
        t0 = time.perf_counter()
        self._note_orientation(record)
        est = self.estimator.estimate(snapshot.intensity, snapshot.mask)
        metrics.ESTIMATE_SECONDS.observe(time.perf_counter() - t0)
        metrics.MODEL_INFO.info({"version": str(est.model_version)})
        running = running_estimate(
            est.to_dict(),
            reason=f"superseded: the snapshot after {newer} orientations was already "
            "waiting; it is refined instead",
        )
        running["superseded_by"] = int(newer)
        self._last_fit = None
        self._publish_estimate(snapshot, record, running, t0)
        self.measured.append(float(record.omega))
        self._last_record = record

    def advise(
        self,
        snapshot: Snapshot,
        record: OrientationRecord,
        running: dict[str, Any],
        mean: NDArray[np.float64],
        std: NDArray[np.float64],
        *,
        started: float | None = None,
    ) -> None:
        """Rank the candidates under an estimate made elsewhere and publish the advice.

        Parameters
        ----------
        snapshot, record
            The cumulative spectrum and the orientation just completed.
        running
            The running estimate (JSON-ready, the advice's ``estimate``).
        mean, std
            (n_fc,) float, eV/A^2: the estimate in the advisor's order
            (:attr:`steering.advisor.ranking.Advisor.fc_names`).
        started
            ``time.perf_counter()`` when the orientation's work began (default: now); the
            advice's ``seconds`` count from it.
        """
        t0 = time.perf_counter() if started is None else started
        self.measured.append(float(record.omega))
        self._last_record = record
        t_est = time.perf_counter()
        if not self.history:  # started with the run; normally done before its first count
            self.candidates.wait(self.first_wait_s)
        omegas, coverage = self.candidates.ready()
        advice: dict[str, Any] = {
            "run_id": self.run_id,
            "n_orientations": int(snapshot.n_orientations),
            "omega": float(record.omega),
            "estimate": running,
            "candidates_ready": len(omegas),
            "candidates_total": len(self.candidates.omegas),
        }
        if len(omegas):
            try:
                ranking = self.advisor.rank(
                    omegas,
                    coverage,
                    mean=mean,
                    std=std,
                    counts=snapshot.counts,
                    exposure=snapshot.exposure,
                    measured=self.measured,
                    charge=max(float(record.proton_charge), 1e-9),
                    prior="information",
                    score=self.score,
                    weighting=self.weighting,
                )
                advice["ranking"] = ranking.to_dict(top=20)
                metrics.ADVISOR_SECONDS.observe(time.perf_counter() - t_est)
            except AdvisorError as exc:
                logger.warning("no advice after orientation %d: %s", record.index, exc)
                advice["ranking"] = None
                advice["error"] = str(exc)
        else:
            advice["ranking"] = None
            advice["error"] = "candidate coverages are still being computed"
        self._plan(advice, record)
        self._apply_controls(advice)
        advice["seconds"] = time.perf_counter() - t0
        self.history.append(advice)
        for sink in self.sinks:
            try:
                sink(advice)
            except Exception:
                logger.exception("advice sink failed (orientation %d)", record.index)

    def _plan(
        self, advice: dict[str, Any], record: OrientationRecord, *, background: bool = True
    ) -> None:
        """The information plan and the stop state of an advice.

        With a planner and a refined posterior: ``plan`` (candidates by expected gain per
        beam time, none in the controls' excluded ranges) and ``stop``
        (:class:`steering.advisor.planner.StopState` against the controls' target, else the
        loop's); ``state`` is ``"done"`` when the target is met. Without them ``plan`` and
        ``stop`` are None with the reason in ``plan_error`` (the ranking's best angle is
        then the next: :meth:`_apply_controls`). ``background``: the nodes' information
        is recomputed on a thread (the estimate is not held back; the last information is
        used meanwhile) rather than here (:meth:`finish`).
        """
        advice["plan"] = None
        advice["stop"] = None
        self._plan_pending = False
        planner = self.planner
        if planner is None:
            return
        if self.hurry:
            advice["plan_error"] = "the service is stopping"
            return
        if self._posterior is None:
            advice["plan_error"] = "no refined posterior yet (the plan needs the counts' fit)"
            return
        # the first orientation waits for the nodes a while (they start with the run)
        if not planner.prepared and (self.history or not planner.wait(self.first_wait_s)):
            advice["plan_error"] = "the planner's nodes are still being computed"
            self._plan_pending = True
            return
        theta, cov, inflation, model = self._posterior
        charge = max(float(record.proton_charge), 1e-9)
        forbidden = list(self.controls.excluded)
        target = self.controls.target or self.target
        t0 = time.perf_counter()
        try:
            planner.focus_on_target(cov, target)
            last = self._last_next
            if last is not None and abs(float(last["omega"]) - float(record.omega)) < 0.05:
                planner.observe(float(last["gain"]), last["covariance"], cov)
                self._last_next = None  # each prediction is observed once
            planner.refresh(
                theta,
                cov,
                model,
                charge=charge,
                inflation=inflation,
                reuse_within=PLAN_REUSE,
                background=background,  # the estimate is not held back by the nodes' Jacobians
            )
            t1 = time.perf_counter()
            cands = planner.rank(
                cov, current=float(record.omega), measured=self.measured, forbidden=forbidden
            )
            rank_s = time.perf_counter() - t1
            stop = planner.stop(cov, target, current=float(record.omega), forbidden=forbidden)
        except AdvisorError as exc:
            logger.warning("no plan after orientation %d: %s", record.index, exc)
            advice["plan_error"] = str(exc)
            self._plan_pending = isinstance(exc, PlanNotReady)
            return
        advice["plan"] = {
            "basis": "information-per-beam-time",
            "note": (
                "expected information gain of the refined posterior (nats) per second of "
                "beam time: counting + goniometer travel + settling"
            ),
            "criterion": [planner.names[i] for i in planner.index],
            "speed_deg_s": planner.cost.speed_deg_s,
            "settle_s": planner.cost.settle_s,
            "candidates": [c.to_dict() for c in cands[:20]],
            "refresh_seconds": round(planner.refresh_seconds, 4),
            "rank_seconds": round(rank_s, 4),
            "seconds": round(time.perf_counter() - t0, 4),
        }
        advice["stop"] = stop.to_dict()
        if stop.met:
            advice["state"] = "done"
            self._last_next = None
            return
        best = cands[0]
        self._last_next = {"omega": best.omega, "gain": best.gain, "covariance": cov}

    def finish(
        self, timeout: float, *, cancelled: Callable[[], bool] | None = None
    ) -> dict[str, Any] | None:
        """The run ended: plan its last advice if it has no plan only because the planner's
        information was still being computed (a run shorter than that computation: a fast
        replay, a run of a few orientations).

        Waits at most ``timeout`` s for the planner's nodes and the information being
        computed for them (:meth:`InformationPlanner.settle`), then plans that advice with
        the last posterior (its own, or :meth:`settle_estimate`'s when that refitted it;
        the nodes' information computed here if it is still missing or stale: a few
        seconds) and applies the controls again (without using up a forced angle twice).
        Returns the amended advice (it
        replaces the last of :attr:`history`; ``amended`` says why), or None when there is
        nothing to amend, the service is stopping, or the planner is still not ready (said
        in the log). ``cancelled``: asked every half second while it waits (the service:
        a stop was requested); True ends the wait with None.
        """
        record = self._last_record
        planner = self.planner
        if not self._plan_pending or self.hurry or planner is None or record is None:
            return None
        t0 = time.perf_counter()
        deadline = time.monotonic() + float(timeout)
        while True:
            if cancelled is not None and cancelled():
                return None
            left = deadline - time.monotonic()
            if planner.settle(min(0.5, max(left, 0.0))) or left <= 0:
                break
            if planner.prepared and not planner.computing:  # _plan computes the information
                break
        if not planner.prepared:
            logger.warning(
                "run %s ended before the planner's nodes were ready (waited %.0f s): "
                "its last advice has no plan",
                self.run_id,
                timeout,
            )
            return None
        advice = dict(self.history[-1])
        for key in ("plan_error", "state", "next"):
            advice.pop(key, None)
        self._plan(advice, record, background=False)
        if advice["plan"] is None:
            return None
        self._apply_controls(advice, again=True)
        advice["amended"] = (
            "planned at the run's end: the planner's information was still being computed "
            f"when this orientation was advised (waited {time.perf_counter() - t0:.1f} s)"
        )
        self.history[-1] = advice
        return advice

    def _apply_controls(self, advice: dict[str, Any], *, again: bool = False) -> None:
        """Apply the people's controls to an advice whose ranking is made (in place).

        The orientation just measured uses up a forced angle that was offered; excluded
        candidates leave the ranking's list (``excluded``: how many left); the advice gains
        ``state`` (``"paused"``, ``"waiting"`` without a ranking, else ``"measuring"``; a
        ``"done"`` set before is kept), ``next`` (``{"omega", "source": "advisor" |
        "forced", "by"}``, None when paused, done or nothing is allowed) and ``controls``
        (:meth:`AdvisorControls.to_dict` with the last :attr:`ADVICE_OVERRIDES` overrides).
        ``again``: the advice had its controls applied before (:meth:`finish`): the
        measured angle does not use up a forced angle again, and the ranking's list stays.
        """
        controls = self.controls
        if not again:
            controls.measured(float(advice["omega"]))
        ranking = advice.get("ranking")
        candidates: list[dict[str, Any]] = []
        if ranking is not None and again:
            candidates = list(ranking.get("candidates") or [])
        elif ranking is not None:
            listed = list(ranking.get("candidates") or [])
            ok = controls.allowed([float(c["omega"]) for c in listed])
            candidates = [c for c, good in zip(listed, ok, strict=True) if good]
            ranking["candidates"] = candidates
            ranking["excluded"] = len(listed) - len(candidates)
        plan = advice.get("plan")
        if plan is not None:  # the information plan decides (its ranges are the controls')
            candidates = list(plan["candidates"])
        if advice.get("state") != "done":
            advice["state"] = controls.state_name(ranked=ranking is not None or plan is not None)
        done = advice["state"] == "done"
        advice["next"] = None if done else controls.next_angle(candidates, offer=True)
        nxt = advice["next"]
        if plan is not None and nxt is not None and nxt["source"] == "advisor":
            best = next(c for c in candidates if float(c["omega"]) == float(nxt["omega"]))
            nxt.update(
                count_time_s=best["count_time_s"],
                gain=best["gain"],
                predicted_std=best["predicted_std"],
            )
        advice["controls"] = controls.to_dict(last=self.ADVICE_OVERRIDES)

    def _running_estimate(
        self, snapshot: Snapshot, est: FCEstimate
    ) -> tuple[dict[str, Any], NDArray[np.float64], NDArray[np.float64]]:
        """The running estimate of a snapshot: the likelihood refinement started from the
        VAE's estimate (and warm-started from the last optimum), else the VAE's estimate
        with the reason (never silently). Returns (the estimate dict of the advice, and
        the mean and std in the VAE's order for the advisor)."""
        from model_server.refinement.fit import MISFIT_RESTART
        from model_server.refinement.refiner import LIVE_TEMPLATE_TOLERANCE, running_estimate

        vae = est.to_dict()
        mean, std = np.asarray(est.mean, dtype=float), np.asarray(est.std, dtype=float)
        self._last_fit = None  # set again below when this snapshot's fit is taken
        if self.refiner is None:
            return running_estimate(vae), mean, std
        if snapshot.moments is None:
            return (
                running_estimate(vae, reason="the consumer took no moments for this run"),
                mean,
                std,
            )
        if self.hurry:
            metrics.REFINE_FALLBACKS.inc()
            return (
                running_estimate(
                    vae, reason="the service is stopping: not refined (the next snapshot is)"
                ),
                mean,
                std,
            )
        split = 1 if self.refiner.classes is None else self.refiner.classes.n_classes
        if snapshot.n_classes != split:
            return (
                running_estimate(
                    vae,
                    reason=f"the snapshot is split by {snapshot.n_classes} zone classes, the "
                    f"refinement by {split}",
                ),
                mean,
                std,
            )
        names = list(vae.get("fc", {}))
        start = {n: float(vae["fc"][n]["mean"]) for n in names}
        # a start from the VAE (and a scan) every ``recheck_every`` orientations: when the
        # count crossed a multiple of it since the last fit (superseded snapshots skip fits)
        n = int(snapshot.n_orientations)
        every = self.recheck_every
        recheck = self._warm is None or n // every > self._fitted_n // every
        # a later recheck's start from the VAE is fitted off the live path, in the
        # background (beside the scan's grid when one is due, else alone): the live fit
        # stays warm-only, ~1 s. Only while the background is busy does it fit here.
        offload = (
            recheck and self._warm is not None and self.scan is not None and not self.scan.running
        )
        starts = [start] if recheck and not offload else []
        scanned = self._scanned()
        if scanned is not None:
            starts.append(scanned.coefficients)  # beside the warm start: the lower wins
        # the run's first fit: a misfit's restarts toward the reference set (several fits,
        # tens of seconds on a few orientations' zone classes) go to the background scan
        # when it is free; the first answer is published at once, and the next snapshot
        # takes a lower minimum. A later recheck's live fit has no start of its own (the
        # VAE's goes to the background, restarts and all) unless the background is busy:
        # then its restarts run here, as a first fit's do while a scan runs.
        defer = (
            self._warm is None
            and self.scan is not None
            and not self.scan.running
            and self.scan.due(n)
        )
        t0 = time.perf_counter()
        try:
            correction = self._correction(snapshot)
            refined = self.refiner.refine(
                snapshot.fitted_counts,
                snapshot.moments,
                starts,
                warm=self._warm,
                restarts=not defer,
                template_tolerance=LIVE_TEMPLATE_TOLERANCE,
                correction=correction,
            )
        except Exception as exc:  # a failed fit never stops the run: the VAE stands in
            logger.warning("refinement failed at %d orientations: %s", snapshot.n_orientations, exc)
            metrics.REFINE_FALLBACKS.inc()
            return running_estimate(vae, reason=f"refinement failed: {exc}"), mean, std
        metrics.REFINE_SECONDS.observe(time.perf_counter() - t0)
        self._fitted_n = n  # a failed fit tries the recheck again at the next snapshot
        running = running_estimate(vae, refined, binning=self.refiner.binning)
        if recheck:  # converged or not, scanned on a thread when due (a deferring fit's is)
            submitted = self._submit_scan(snapshot, refined, start, vae, alone=offload)
            if defer and submitted and refined.pearson_chi2_per_dof > MISFIT_RESTART:
                running["restarts"] = "background scan"
                logger.info(
                    "fit at %d orientations misfits (Pearson chi2/dof %.2f > %.2f): its "
                    "restarts run in the background scan, the next snapshot takes their best",
                    n,
                    refined.pearson_chi2_per_dof,
                    MISFIT_RESTART,
                )
        if scanned is not None:
            adopted = refined.start == f"start {len(starts) - 1}"
            running["scan"] = scanned.to_dict() | {"adopted": adopted}
            if adopted:
                metrics.REFINE_SCANS.labels(kind=_scan_kind(scanned.grid), outcome="adopted").inc()
        if running["source"] != "refined":
            metrics.REFINE_FALLBACKS.inc()
            return running, mean, std
        self._take(refined)
        if self.exact is not None:
            running["exact_correction"] = self.exact.summary()
        if (self.scan is not None and self.scan.pending) or self.exact is not None:
            # an answer (a lower minimum, more of the correction) may come after the run
            self._last_fit = (snapshot, vae)
        index = {n: i for i, n in enumerate(refined.names)}
        sel = [index.get(n, -1) for n in names]
        if all(i >= 0 for i in sel) and len(sel) == len(mean):
            mean = refined.mean[sel].copy()
            std = refined.std[sel].copy()
        return running, mean, std

    def settle_estimate(
        self, timeout: float, *, cancelled: Callable[[], bool] | None = None
    ) -> dict[str, Any] | None:
        """The run ended: its last recheck's background fit (a grid scan or the fit from
        the VAE's start) may still be running, with no later snapshot left to take its
        answer, and the live exact-fold correction (:attr:`exact`) may still be folding
        the last orientations. Waits at most ``timeout`` s for both; when the background
        fit found a lower minimum, or the correction made more since the last fit, the
        last refined snapshot is fitted again (from the lower minimum beside the warm
        optimum; with all of the correction made by then), and the estimate is published
        to the estimate sinks (``amended`` says why) and returned.

        None (said in the log where it matters) when there is nothing to settle: no
        background fit or correction, none finished in time, nothing lower found and no
        more correction, the refit failed, or the service is stopping, ``timeout`` <= 0,
        or the warm optimum stayed lower. The settled estimate also replaces the one in the
        last advice of :attr:`history` (for :meth:`finish`). ``cancelled``: asked every
        half second while it waits; True ends the wait. The last snapshot is let go
        either way (it is kept only while a background answer may still come), and the
        correction's thread is stopped.
        """
        try:
            return self._settle(timeout, cancelled)
        finally:
            if self.exact is not None:
                self.exact.close()

    def _settle(
        self, timeout: float, cancelled: Callable[[], bool] | None
    ) -> dict[str, Any] | None:
        """:meth:`settle_estimate`'s work."""
        from model_server.refinement.refiner import LIVE_TEMPLATE_TOLERANCE, running_estimate

        last, self._last_fit = self._last_fit, None
        scan, exact = self.scan, self.exact
        if (
            last is None
            or (scan is None and exact is None)
            or self.refiner is None
            or self.hurry
            or timeout <= 0
        ):
            return None

        t0 = time.perf_counter()
        deadline = time.monotonic() + float(timeout)
        while scan is not None and scan.running:
            if cancelled is not None and cancelled():
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                logger.warning(
                    "run %s ended with its background fit still running (waited %.0f s): "
                    "its last estimate stands as published",
                    self.run_id,
                    timeout,
                )
                if exact is None:
                    return None
                break
            scan.join(min(0.5, left))
        scanned = self._scanned() if scan is not None and not scan.running else None
        more = False
        if exact is not None:
            # the first folds of the last orientations, not the folds made again (the
            # estimate moved by the refit would make more due; the last plan shares the wait)
            if not exact.wait(deadline - time.monotonic(), cancelled=cancelled, refreshes=False):
                logger.warning(
                    "run %s ended with its exact-fold correction still folding (%s): the "
                    "last estimate is refitted with what it made",
                    self.run_id,
                    exact.summary(),
                )
            if cancelled is not None and cancelled():
                return None
            more = exact.version != self._exact_version
        if scanned is None and not more:
            return None
        snapshot, vae = last
        record = self._last_record  # the last snapshot's orientation (advise() set it)
        if snapshot.moments is None or record is None:  # not refined, or never advised
            return None
        correction = self._correction(snapshot)
        more = more and correction is not None  # (one that could not be made: logged)
        correction_made = 0 if correction is None else correction.orientations
        if scanned is None and not more:
            return None
        try:
            refined = self.refiner.refine(
                snapshot.fitted_counts,
                snapshot.moments,
                [] if scanned is None else [scanned.coefficients],
                warm=self._warm,
                restarts=False,
                template_tolerance=LIVE_TEMPLATE_TOLERANCE,
                correction=correction,
            )
        except Exception as exc:  # the published estimate stands
            logger.warning("run %s: the refit at the run's end failed: %s", self.run_id, exc)
            return None
        if exact is not None:  # no fold is started for the refit's optimum
            exact.close()
        running = running_estimate(vae, refined, binning=self.refiner.binning)
        adopted = scanned is not None and refined.start == "start 0"
        if running["source"] != "refined" or not (adopted or more):
            # the warm optimum stayed lower (the answer was an earlier snapshot's) and the
            # model did not change: the published estimate stands
            return None
        why = []
        if scanned is not None and adopted:
            metrics.REFINE_SCANS.labels(kind=_scan_kind(scanned.grid), outcome="adopted").inc()
            running["scan"] = scanned.to_dict() | {"adopted": True}
            why.append(
                f"the background fit of the snapshot after {scanned.n_orientations} "
                "orientations found a lower minimum after the last snapshot was estimated"
            )
        if exact is not None:
            summary = exact.summary()
            running["exact_correction"] = summary
            if more:
                why.append(
                    f"the exact-fold correction had made {correction_made} of "
                    f"{int(snapshot.n_orientations)} orientations (made within "
                    f"{summary['made_within_std']} std of the estimate before the refit)"
                )
        self._take(refined)
        running["amended"] = (
            f"refitted at the run's end: {'; '.join(why)} (took {time.perf_counter() - t0:.1f} s)"
        )
        advised = self.history[-1] if self.history else None
        if advised is not None and int(advised.get("n_orientations", -1)) == int(
            snapshot.n_orientations
        ):
            advised["estimate"] = running  # a last plan made at the run's end goes with it
        message = self._publish_estimate(snapshot, record, running, t0)
        logger.info(
            "run %s: its last estimate (after %d orientations) refitted at the run's end "
            "(%s; deviance/dof %.4f)",
            self.run_id,
            int(snapshot.n_orientations),
            "; ".join(why),
            refined.deviance_per_dof,
        )
        return message

    def _correction(self, snapshot: Snapshot) -> Any:
        """The live exact-fold correction of the snapshot's fit (None: none made yet, or
        none made for this run); remembers which version of it the fit used."""
        if self.exact is None or snapshot.moments is None:
            return None
        try:
            correction = self.exact.correction(snapshot.moments)
        except Exception as exc:  # the fit goes on with the counts model as it is
            logger.warning(
                "run %s: the exact-fold correction could not be made for the fit of %d "
                "orientations (fitted without it): %s",
                self.run_id,
                int(snapshot.n_orientations),
                exc,
            )
            return None
        self._exact_version = 0 if correction is None else correction.version
        return correction

    def _take(self, refined: Refined) -> None:
        """A refined fit becomes the run's state: the next fit's warm start and the
        posterior the plan uses (with the cumulative model it was fitted on); the live
        exact-fold correction is made from now on where it is."""
        if self.exact is not None:
            k = len(self.exact.refiner.names)
            self.exact.update(refined.mean[:k], refined.std[:k])
        self._warm = refined.theta
        self._posterior = (
            refined.theta,
            refined.covariance,
            refined.inflation,
            getattr(self.refiner, "last_model", None),
        )

    def _scanned(self) -> ScanResult | None:
        """A finished background scan's lower minimum (once), else None."""
        if self.scan is None:
            return None
        result = self.scan.take()
        if result is None:
            return None
        metrics.REFINE_SCANS.labels(
            kind=_scan_kind(result.grid), outcome="found" if result.found else "none"
        ).inc()
        return result if result.found else None

    def _submit_scan(
        self,
        snapshot: Snapshot,
        refined: Refined,
        start: dict[str, float],
        vae: dict[str, Any],
        *,
        alone: bool = False,
    ) -> bool:
        """Hand a recheck's fit to the background scan when one is due (the VAE's std as
        its step); a snapshot offered while a scan runs is skipped. ``alone``: the live fit
        left out the VAE's start, so when no scan is due the background fits from that
        start alone (beside the live optimum). Returns whether a scan or fit started."""
        model = getattr(self.refiner, "last_model", None)
        if self.scan is None or self.refiner is None or model is None:
            return False
        grid = self.scan.due(snapshot.n_orientations)
        if not grid and not alone:
            return False
        spread = {n: float(v["std"]) for n, v in vae.get("fc", {}).items() if "std" in v}
        ok = self.scan.submit(
            model,
            snapshot.fitted_counts,
            refined,
            self.refiner.start_from(start),
            self.refiner.spread_from(spread),
            int(snapshot.n_orientations),
            grid=grid,
        )
        metrics.REFINE_SCANS.labels(
            kind=_scan_kind(grid), outcome="started" if ok else "skipped"
        ).inc()
        return ok


def _scan_kind(grid: bool) -> str:
    """The ``kind`` label of ``steer_refine_scans_total``: a grid scan or a single fit
    from the VAE's start."""
    return "grid" if grid else "start"


if TYPE_CHECKING:
    # checked by mypy only: the model server's estimator is an Estimator, the loop a sink
    from consumers.messages import SnapshotSink
    from model_server.inversion import inference

    def _estimator(e: inference.Estimator) -> Estimator:
        return e

    def _sink(loop: SteeringLoop) -> SnapshotSink:
        return loop
