"""The running service: consumer + model server + advisor + run history + API state.

:class:`SteeringService` consumes the run topics of an instrument prefix
(:class:`consumers.service.ConsumerService`, following run after run) on a thread. After
every completed orientation a :class:`steering.loop.SteeringLoop` estimates the FCs and
ranks the candidate angles; the estimate and advice go to the run history
(:class:`steering.db.History`), to Kafka (``<prefix>_advice``, ``<prefix>_advice_docs``) and
to the live state the API serves (:class:`steering.api.state.LiveState`). With
``publish_livedata`` (the default) every snapshot's I(q, E) and every estimate also go to
``<prefix>_livedata`` as da00 for the facility's dashboards
(:class:`consumers.kafka.KafkaLivedataSink`).

With ``follow_replicas`` (``steer serve --follow-replicas``, the deployed, scaled-out
mode) it runs no consumer and no model of its own: a :class:`steering.follow.ReplicaFollower`
reads the consumers' snapshots (``<prefix>_folded``) and the model-server replicas'
estimates (``<prefix>_estimates``), and the service records them in the run history with
the same calls and JSON as in-process, updates the live state and feeds the advisor (the
replicas' estimate stands in for its own). An estimate of an orientation the history
already holds is not recorded again (redelivery after a restart). Only the snapshots go
to ``<prefix>_livedata`` then: the replicas publish their estimates there themselves.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from consumers.reduction.accumulate import OrientationRecord, Snapshot
from model_server.exceptions import ModelServerError
from steering import metrics
from steering.api.state import LiveState
from steering.db import History
from steering.exceptions import AdvisorError, SteeringError

if TYPE_CHECKING:
    from consumers.kafka import KafkaLivedataSink
    from consumers.streams import InstrumentConfig
    from model_server.inversion.inference import Estimator
    from model_server.refinement.refiner import RunRefiner
    from steering.advisor.controls import AdvisorControls
    from steering.advisor.planner import InformationPlanner
    from steering.follow import ReplicaFollower
    from steering.loop import CandidateCoverage, KafkaAdviceSink, SteeringLoop

__all__ = ["MAX_ORIENTATION_SPECTRA", "SteeringService"]

#: per-orientation spectra kept for the API, per run (float32 counts + exposure: 160 kB each
#: on the Ge grid)
MAX_ORIENTATION_SPECTRA = 720

logger = logging.getLogger(__name__)

#: what the estimates do when they fall behind the consumer (:class:`SteeringService`'s
#: ``estimates``)
ESTIMATE_MODES = ("latest", "every")
#: :attr:`SteeringService.estimate_yield_s`'s default (s): longer than a fit of the live run
#: (p50 ~0.6 s, p99 ~1.5 s at 120 orientations), much shorter than a count
ESTIMATE_YIELD_S = 2.0
#: complete runs whose summaries (:meth:`SteeringService.scan_summary`) are kept once
#: their loops are let go
RETIRED_RUNS = 256
#: complete runs whose last snapshot the API keeps in memory; older ones are served from
#: their exports (``<state>/runs/<run id>.h5``)
LIVE_COMPLETE_SNAPSHOTS = 8


def _scan_summary(loop: SteeringLoop) -> dict[str, Any] | None:
    """The background scans of a loop's fits, or None when it has no scan."""
    scan = loop.scan
    if scan is None:
        return None
    return {"started": scan.started, "skipped": scan.skipped, "error": scan.error}


@dataclasses.dataclass(slots=True)
class _Job:
    """A piece of the estimates thread's work, in the consumer's order: a snapshot to
    estimate (``snapshot`` set) or a run's end (``snapshot`` None)."""

    run_id: str
    work: Callable[[_Job], None]
    snapshot: Snapshot | None = None
    #: the orientation count of a newer snapshot of the run waiting behind this one
    superseded_by: int | None = None
    #: set when the job has run
    done: threading.Event = dataclasses.field(default_factory=threading.Event)


class _EstimateWorker:
    """Runs the estimates (VAE, refinement, ranking, plan) on their own thread, so that
    the consumer goes on folding while a snapshot is fitted.

    Jobs run in the order they came. With ``latest``, a snapshot whose run has a newer
    snapshot waiting is *superseded*: its moments are dropped at once (~135 MB for Ge's
    zone classes) and its job gets :attr:`_Job.superseded_by` (the service then gives it
    the VAE's estimate, flagged, and no fit), so the newest snapshot is refined as soon as
    the fit in progress ends instead of after every older one.
    """

    def __init__(self, *, latest: bool) -> None:
        self.latest = bool(latest)
        self._jobs: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._busy = False
        self._thread: threading.Thread | None = None

    def submit(self, job: _Job) -> bool:
        """Queue a job (starts the thread on the first one); returns whether the thread
        was idle (nothing queued or running before it)."""
        with self._cv:
            idle = not self._jobs and not self._busy
            if self.latest and job.snapshot is not None:
                for old in self._jobs:
                    if old.run_id == job.run_id and old.snapshot is not None:
                        if old.superseded_by is None and old.snapshot.moments is not None:
                            old.snapshot = dataclasses.replace(old.snapshot, moments=None)
                        old.superseded_by = job.snapshot.n_orientations
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="estimates", daemon=True)
                self._thread.start()
            self._cv.notify_all()
        return idle

    @property
    def pending(self) -> int:
        """Jobs waiting or running."""
        with self._cv:
            return len(self._jobs) + int(self._busy)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued job has run; False on ``timeout``."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def _work(self) -> None:
        while True:
            with self._cv:  # one thread for the service's life (a daemon)
                self._cv.wait_for(lambda: bool(self._jobs))
                job = self._jobs.popleft()
                self._busy = True
            try:
                job.work(job)
            except Exception:  # one snapshot's failure never stops the estimates
                logger.exception("the estimate of run %s failed", job.run_id)
            finally:
                job.done.set()
                del job  # the idle thread holds no snapshot (nor the service)
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()


class SteeringService:
    """Consumer, model server and advisor of one instrument prefix, on a thread.

    Parameters
    ----------
    bootstrap, prefix
        Kafka and the instrument's topic prefix.
    state_dir
        The consumer's checkpoint folder (runs are exported to ``state_dir/runs``).
    history
        The run history.
    live
        State shared with the API.
    model_dir
        Folder of frozen models, one per material (``<model_dir>/<material lower>``).
    publish_advice
        Also publish the advice to Kafka.
    publish_livedata
        Also publish snapshots and estimates as da00 to ``<prefix>_livedata``.
    snapshot_max_delay_s
        The consumer's ``checkpoint_max_delay_s``: how long a completed orientation may wait
        for its checkpoint (and so for its estimate) while later ones are still folding.
        Shorter than the plain consumer's 5 s: steering wants the estimate soon, at the
        price of a little throughput when a backlog is read.
    first_wait_s
        How long the first estimate of a run waits for the advisor's candidate coverages
        (computed from the run start on a thread); then it ranks those ready.
    advisor_score, advisor_weighting
        What the advisor sorts by and how it weighs the spectrum's bins
        (:meth:`steering.advisor.ranking.Advisor.rank`).
    refine
        Refine the running estimate against the counts
        (:mod:`model_server.refinement`); off, the VAE's estimate is the running one.
    streams
        The instrument's streams (:class:`consumers.streams.InstrumentConfig`, e.g. from
        ``--instrument-config``): the topics read and which source is which. None: the
        simulator's four topics of ``prefix``.
    follow_replicas
        Follow the model-server replicas (``<prefix>_folded``, ``<prefix>_estimates``)
        instead of running a consumer and a model (the module docstring).
    follow_group
        The follower's consumer group (default ``steer-<prefix>-follow``).
    advice_sinks
        Further sinks of every run's advice (e.g. the bluesky-queueserver queue sink,
        :class:`steering.advisor.queueserver.QueueSink`); their owner closes them.
    binning
        What the refinement fits: ``"classes"`` (the path's bins split by zone class where
        the material has more than one; the consumer's ``zone_classes="auto"``) or
        ``"path"``.
    final_plan_wait_s
        When a run ends before the planner's information for its last advice is ready (a
        fast replay, a run of a few orientations), how long the run's end waits for it to
        plan that advice (:meth:`steering.loop.SteeringLoop.finish`); the run is marked
        complete after. The same wait (one deadline for both), before it, lets the last
        recheck's background fit finish: when that finds a lower minimum the last
        snapshot is refitted from it (:meth:`steering.loop.SteeringLoop.settle_estimate`),
        as it is when the live exact-fold correction made more in that time.
        0: the last advice keeps no plan and the last estimate stands as published.
    exact_correction
        Make the counts model's exact-fold correction of every run one orientation at a
        time on a background thread while the next one counts, and fit each snapshot
        with what it has made (:class:`~model_server.refinement.exact.LiveExactCorrection`;
        about 19 s an orientation of one spare core on the README's Ge set-up, at nice
        +10). Needs ``refine``.
    estimates
        What the estimates do when they fall behind the consumer (a replay faster than
        the fits, a backlog read after a restart). They run on their own thread, in
        order, so the consumer never waits for a fit. ``"latest"`` (default): a snapshot
        with a newer one of its run already waiting gets the VAE's estimate, flagged
        ``superseded`` (``fallback`` says by which), and no fit or advice; the newest is
        refined. ``"every"``: every snapshot is refined and advised, in order (the
        estimates then lag by as much as the fits take). At real time the two are the
        same: an orientation counts for a minute, a fit takes about one second.
    """

    def __init__(
        self,
        bootstrap: str,
        prefix: str,
        *,
        state_dir: str | Path,
        history: History,
        live: LiveState,
        model_dir: str | Path = "models",
        publish_advice: bool = True,
        publish_livedata: bool = True,
        snapshot_max_delay_s: float = 1.0,
        first_wait_s: float = 2.0,
        advisor_score: str = "spectrum",
        advisor_weighting: str = "scarcity",
        refine: bool = True,
        streams: InstrumentConfig | None = None,
        follow_replicas: bool = False,
        follow_group: str | None = None,
        plan: bool = True,
        scan: bool = True,
        plan_node_step: float = 5.0,
        target: dict[str, Any] | None = None,
        advice_sinks: Sequence[Callable[[dict[str, Any]], None]] = (),
        binning: str = "classes",
        final_plan_wait_s: float = 30.0,
        estimates: str = "latest",
        exact_correction: bool = False,
    ) -> None:
        from steering.advisor.ranking import check_score, check_weighting

        if estimates not in ESTIMATE_MODES:
            raise SteeringError(
                f"estimates must be one of {', '.join(ESTIMATE_MODES)}, got {estimates!r}"
            )
        self.estimates = estimates
        self._worker = _EstimateWorker(latest=estimates == "latest")
        #: how long the consumer waits for a snapshot's estimate when the estimates had
        #: nothing else to do (s): at real time the estimate then has the cores to itself,
        #: at a fast replay the consumer goes on after it (0: never waits)
        self.estimate_yield_s = ESTIMATE_YIELD_S

        if binning not in ("classes", "path"):
            raise SteeringError(f"binning must be classes or path, got {binning!r}")
        self.binning = binning
        if not (math.isfinite(final_plan_wait_s) and final_plan_wait_s >= 0):
            raise SteeringError(f"final_plan_wait_s must be >= 0 s, got {final_plan_wait_s}")
        self.final_plan_wait_s = float(final_plan_wait_s)

        check_score(advisor_score, "advisor score")
        check_weighting(advisor_weighting, "advisor weighting")
        self.advisor_score = advisor_score
        self.advisor_weighting = advisor_weighting
        self.bootstrap = bootstrap
        self.prefix = prefix
        #: which (topic, source) is which (None: the simulator's topics of ``prefix``)
        self.streams = streams
        self.state_dir = Path(state_dir)
        self.history = history
        self.live = live
        self.model_dir = Path(model_dir)
        self.publish_advice = publish_advice
        self.publish_livedata = bool(publish_livedata)
        self._livedata: KafkaLivedataSink | None = None
        self.snapshot_max_delay_s = float(snapshot_max_delay_s)
        self.first_wait_s = float(first_wait_s)
        self.refine = bool(refine)
        #: plan by the refined posterior's information per beam time (needs ``refine``)
        self.plan = bool(plan)
        self.plan_node_step = float(plan_node_step)
        #: scan the fits' grid of starts on a thread (:mod:`model_server.refinement.scan`)
        self.scan = bool(scan)
        #: make the counts model's exact-fold correction live (:class:`SteeringLoop`)
        self.exact_correction = bool(exact_correction) and self.refine
        #: the stop criterion's target precision for new runs (None: no target)
        self.target = target
        self._loops: dict[str, SteeringLoop] = {}
        #: complete runs whose loop was let go, oldest first: run id -> its loop's
        #: :meth:`scan_summary`, the last :data:`RETIRED_RUNS` runs
        self._retired: dict[str, dict[str, Any] | None] = {}
        #: the run starts (their metadata) of the last runs completed
        self._completed_meta: deque[dict[str, Any]] = deque(maxlen=16)
        #: run id -> the orientations a restored run held at its start
        #: (:meth:`_remember_restored`)
        self._restored: dict[str, list[OrientationRecord]] = {}
        #: each powder run's last refined coefficients (the next step's start)
        self._powder_last: dict[str, Any] = {}
        self._loop_lock = threading.Lock()
        self._sinks: dict[str, KafkaAdviceSink] = {}
        self._estimators: dict[str, Estimator] = {}
        self._thread: threading.Thread | None = None
        self.service: Any = None
        self.error: str | None = None
        #: why the last estimate could not be made (the model is unavailable), or None
        self.model_error: str | None = None
        #: seconds of estimate + advice of each orientation
        self.latencies: list[float] = []
        #: seconds from each orientation's close to its estimate in the history (what the
        #: page and ``/estimates`` see); see :meth:`latency_summary`
        self.chunk_to_estimate: list[float] = []
        #: seconds from each orientation's close to the first *refined* estimate that
        #: includes it (a superseded snapshot's orientation waits for the newer one's fit)
        self.chunk_to_refined: list[float] = []
        #: run id -> (orientation count, close time) of orientations no refined estimate
        #: includes yet
        self._unrefined: dict[str, list[tuple[int, float]]] = {}
        #: the close time of the snapshot whose estimate is being made, per thread
        self._tls = threading.local()
        self._unrefined_lock = threading.Lock()
        self.follow_replicas = bool(follow_replicas)
        self.follow_group = follow_group
        self.advice_sinks = list(advice_sinks)
        self.follower: ReplicaFollower | None = None
        #: run id -> orientation counts whose estimate / advice the history holds
        self._estimated: dict[str, set[int]] = {}
        self._advised: dict[str, set[int]] = {}
        #: run id -> why the advisor cannot follow it (logged once)
        self._no_advice: dict[str, str] = {}
        if not self.follow_replicas:
            live.reload = self.reload_models

    # -- model server ------------------------------------------------------------------------

    def estimator(self, material: str) -> Estimator:
        """The (cached) estimator of a material's frozen model."""
        from model_server.inversion.inference import Estimator

        key = material.lower()
        if key not in self._estimators:
            path = self.model_dir / key
            est = Estimator(path)
            self._estimators[key] = est
            self.live.model_version = str(est.model.version)
            self.history.add_model(self.live.model_version, material=material, path=str(path))
        return self._estimators[key]

    def reload_models(self) -> str:
        """Drop the loaded models; the next estimate loads them again. Returns a version."""
        materials = list(self._estimators)
        self._estimators.clear()
        for loop in list(self._loops.values()):
            loop.estimator = self.estimator(loop.advisor.material)
        for m in materials:
            if m not in self._estimators:
                self.estimator(m)
        return self.live.model_version or "none"

    # -- the consumer's callbacks ------------------------------------------------------------

    def _prepare(self, meta: dict[str, Any]) -> None:
        """A run started: load its model, advisor and candidates on a thread now, rather
        than when its first orientation completes."""

        if meta.get("sample_kind") == "powder":  # no single-crystal loop for a powder
            return
        self._remember_restored(meta)

        def work() -> None:
            try:
                with self._loop_lock:
                    if any(m is meta for m in self._completed_meta):
                        return  # the run ended before this thread got going
                    loop = self._make_loop(meta)
            except (ModelServerError, OSError) as exc:
                logger.warning("model unavailable at the run start: %s", exc)
                return
            except Exception:
                logger.exception("could not prepare the steering loop of a run")
                return
            if loop.refiner is None:
                return
            # the counts model's compiled kernels, before the first orientation's fit
            # needs them (a fresh install compiles them once, 10-20 s; then under a second)
            try:
                seconds = loop.refiner.warm_up()
            except Exception as exc:  # the first fit compiles them instead
                logger.warning("run %s: the counts model's warm-up failed: %s", loop.run_id, exc)
            else:
                logger.info("run %s: the counts model is ready (%.1f s)", loop.run_id, seconds)

        threading.Thread(target=work, name="prepare-run", daemon=True).start()

    def _remember_restored(self, meta: dict[str, Any]) -> None:
        """At a run's start, on the consumer's thread: the orientations its pipeline
        already holds (a run restored from its checkpoint when the service restarted),
        for :meth:`_note_restored`. Nothing for a new run."""
        pipeline = getattr(self.service, "pipeline", None)
        acc = None if pipeline is None or pipeline.meta is not meta else pipeline.acc
        if acc is not None and acc.records:
            self._restored[str(meta.get("run_id", "run"))] = list(acc.records)

    def _note_restored(self, loop: SteeringLoop, run_id: str) -> None:
        """A new loop's run was restored from its checkpoint: the orientations folded
        before the restart are queued for the loop's exact-fold correction (they would
        keep the uncorrected model otherwise); each orientation is queued once."""
        records = self._restored.pop(run_id, None)
        if not records or loop.exact is None:
            return
        queued = loop.note_folded(records)
        if queued:
            logger.info(
                "run %s: %d orientations folded before the restart queued for the "
                "exact-fold correction",
                run_id,
                queued,
            )

    def _loop_for(self, meta: dict[str, Any]) -> SteeringLoop:
        with self._loop_lock:
            return self._make_loop(meta)

    def _refiner(self, meta: dict[str, Any]) -> RunRefiner | None:
        """The run's likelihood refinement, or None (logged) when it cannot have one: its
        running estimate is then the VAE's, flagged as such."""
        if not self.refine:
            return None
        from model_server.refinement.refiner import RunRefiner

        # the consumer's binning: the path's bins split by zone class where it splits them
        classes = False
        if self.service is not None:
            pipe = self.service.pipeline
            split = pipe.classes is not None and (pipe.meta or {}).get("run_id") == meta.get(
                "run_id"
            )
            classes = split or (pipe.meta is None and pipe.zone_classes is True)
        try:
            return RunRefiner.from_metadata(meta, classes=classes)
        except (ModelServerError, ValueError, KeyError) as exc:
            logger.warning("run %s is not refined: %s", meta.get("run_id"), exc)
            return None

    def _planner(
        self, meta: dict[str, Any], refiner: RunRefiner | None, candidates: CandidateCoverage
    ) -> InformationPlanner | None:
        """The run's information planner (its nodes built on a background thread), or None
        without a refinement or with planning off."""
        if refiner is None or not self.plan or len(candidates.omegas) == 0:
            return None
        from steering.advisor.planner import BeamCost, InformationPlanner

        try:
            planner = InformationPlanner(
                refiner,
                candidates.folder,
                candidates.omegas,
                node_step=self.plan_node_step,
                samples=2,
                count_time_s=float(meta.get("count_time_s", 60.0)),
                cost=BeamCost(
                    float(meta.get("motor_speed_deg_s", 1.0)),
                    float(meta.get("settle_time_s", 1.0)),
                ),
            )
        except AdvisorError as exc:
            logger.warning("run %s has no information plan: %s", meta.get("run_id"), exc)
            return None
        planner.start()
        return planner

    def _make_loop(self, meta: dict[str, Any]) -> SteeringLoop:
        from steering.advisor.ranking import Advisor
        from steering.loop import CandidateCoverage, KafkaAdviceSink, SteeringLoop

        run_id = str(meta.get("run_id", "run"))
        loop = self._loops.get(run_id)
        if loop is not None:
            return loop
        material = str(meta["material"])
        estimator: Estimator | None = None
        if self.follow_replicas:  # the replicas estimate; the candidates need the mounting
            if not isinstance(meta.get("sample_orientation"), dict):
                raise SteeringError(
                    f"run {run_id}: its snapshots carry no sample orientation (u, v); the "
                    "consumers publishing <prefix>_folded are older than this service"
                )
            meta = {**meta, "orientation": meta["sample_orientation"]}
        else:
            # the model first: without it nothing else is made (the next orientation retries)
            estimator = self.estimator(material)
        rng = self.live.advisor_ranges.get(run_id)
        omegas = None
        if rng is not None:
            omegas = list(np.arange(rng["start"], rng["stop"], rng["step"]))
        candidates = CandidateCoverage(meta, omegas=omegas)
        # the people's controls of the advice: those set over the API (before the loop, or
        # before a restart: the history keeps them) and the goniometer range they are
        # checked against
        controls: AdvisorControls | None
        try:
            controls = self.live.controls_for(run_id, self.history)
        except AdvisorError as exc:  # the run goes on, with controls kept in memory only
            logger.error(
                "run %s: its stored advisor controls are damaged (%s): ignored", run_id, exc
            )
            controls = None
        if len(candidates.omegas):
            with self.live.lock:
                self.live.omega_ranges[run_id] = (
                    float(candidates.omegas.min()),
                    float(candidates.omegas.max()),
                )
        # the estimate is recorded (and on the page and the live-data topic) as soon as it is
        # made, the advice once ranked and planned; a replica's estimate is recorded as it
        # arrives (follow_estimate)
        sinks: list[Any] = [self._record_advice]
        estimate_sinks: list[Any] = []
        if not self.follow_replicas:
            estimate_sinks.append(self._record_estimate)
            if self._livedata is not None:
                estimate_sinks.append(self._livedata.estimate)
        if self.publish_advice:
            sink = KafkaAdviceSink(self.bootstrap, self.prefix, run_id=run_id, material=material)
            self._sinks[run_id] = sink
            sinks.append(sink)
        sinks.extend(self.advice_sinks)
        refiner = None if self.follow_replicas else self._refiner(meta)
        loop = SteeringLoop(
            estimator,
            Advisor(material, temperature=float(meta.get("temperature_K", 5.0))),
            candidates,
            refiner=refiner,
            planner=self._planner(meta, refiner, candidates),
            target=self.target,
            sinks=sinks,
            estimate_sinks=estimate_sinks,
            run_id=run_id,
            # rank with the candidates ready so far rather than hold the first estimate
            # back (the advice says how many are ready; the rest follow)
            first_wait_s=self.first_wait_s,
            score=self.advisor_score,
            weighting=self.advisor_weighting,
            controls=controls,
            scan=self.scan,
            exact_correction=self.exact_correction,
        )
        self._loops[run_id] = loop
        self._note_restored(loop, run_id)
        self.history.upsert_run(run_id, material=material, state="running")
        self._run_info(meta)
        from simulations.lattice.materials import setup

        self.live.grids[run_id] = {"energy": setup(material).grid.energy_centres.tolist()}
        return loop

    def _run_info(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The run's entry in the live state (material, temperature, angles, truth)."""
        run_id = str(meta.get("run_id", "run"))
        with self.live.lock:
            info = self.live.runs.get(run_id)
            if info is None:
                sim = meta.get("simulation")
                truth = sim.get("coefficients") if isinstance(sim, dict) else None
                info = self.live.runs[run_id] = {
                    "material": str(meta.get("material", "?")),
                    "temperature": float(meta.get("temperature_K", 5.0)),
                    "omegas": [],
                    "truth": dict(truth) if isinstance(truth, dict) else None,
                }
            return info

    def _on_snapshot(self, snapshot: Snapshot, record: OrientationRecord) -> None:
        meta = self.service.pipeline.meta or {}
        run_id = str(meta.get("run_id", "run"))
        acc = self.service.pipeline.acc
        if run_id not in self.live.grids and acc is not None:  # the folded run's own grid
            grid: dict[str, Any] = {"energy": acc.grid.energy_centres.tolist()}
            if getattr(acc.grid, "kind", "") == "powder":
                grid["q_edges"] = acc.grid.q_edges.tolist()
            self.live.grids[run_id] = grid
        self._live_snapshot(run_id, snapshot, record)
        if self._livedata is not None:  # best effort: logged and counted, never raises
            self._livedata.snapshot(snapshot, meta)
        closed_at = getattr(self.service, "closed_at", None)
        t0 = time.perf_counter()
        info = self._run_info(meta)
        with self.live.lock:
            info["omegas"].append(float(record.omega))
        # the run and its progress are on record whatever happens to the estimate
        summary = self.service.summary()
        summary.pop("finished_runs", None)
        self.history.upsert_run(
            run_id,
            material=str(meta.get("material", "?")),
            n_orientations=int(snapshot.n_orientations),
            summary=summary,
        )
        if closed_at is not None:
            with self._unrefined_lock:
                self._unrefined.setdefault(run_id, []).append((snapshot.n_orientations, closed_at))
        if meta.get("sample_kind") == "powder":  # reads the consumer's folder: on its thread
            self._tls.closed_at = closed_at
            self._estimate_and_advise(run_id, meta, snapshot, record, t0)
            return

        def work(job: _Job) -> None:
            assert job.snapshot is not None
            self._tls.closed_at = closed_at
            self._estimate_and_advise(
                run_id, meta, job.snapshot, record, t0, superseded_by=job.superseded_by
            )

        job = _Job(run_id, work, snapshot)
        if self._worker.submit(job) and self.estimate_yield_s > 0:
            # nothing else to estimate: the consumer yields the machine to this one for a
            # while (what it does next, the moments' file and the next orientation's
            # coverage, can wait: the count lasts a minute); behind a backlog, it goes on
            job.done.wait(self.estimate_yield_s)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every handed-over snapshot has its estimate (and every run's end is
        recorded); False on ``timeout``."""
        return self._worker.drain(timeout)

    def _powder_estimate(
        self,
        run_id: str,
        meta: dict[str, Any],
        snapshot: Snapshot,
        record: OrientationRecord,
        t0: float,
    ) -> None:
        """A powder run's running estimate: the likelihood refinement of its S(|Q|, E)
        counts (:class:`~model_server.refinement.powder.PowderRefiner`), started from the
        previous step's optimum or the reference set; no angle advice. A failed fit is
        logged and counted, and folding goes on."""
        from model_server.exceptions import RefinementError
        from model_server.refinement.powder import PowderRefiner, PowderRun, reference_start
        from model_server.refinement.refiner import running_estimate
        from simulations.lattice.powder import POWDER_Q_SIGMA

        pipe = self.service.pipeline
        if pipe.acc is None or pipe.folder is None or not self.refine:
            metrics.ESTIMATES_SKIPPED.labels(reason="powder_run").inc()
            return
        sim = meta.get("simulation")
        if not isinstance(sim, dict):
            sim = {}
        run = PowderRun(
            counts=snapshot.counts,
            exposure=snapshot.exposure,
            grid=pipe.acc.grid,  # type: ignore[arg-type]
            material=str(meta.get("material")),
            ei=float(pipe.folder.ei),
            temperature=float(meta.get("temperature_K", 5.0)),
            instrument=pipe.folder.instrument,
            q_sigma=float(sim.get("powder_q_sigma_inv_angstrom", POWDER_Q_SIGMA)),
        )
        try:
            refiner = PowderRefiner(run)
            start = self._powder_last.get(run_id)
            if start is None:
                start = reference_start(run.material, refiner.names)
            refined = refiner.refine(start)
        except (RefinementError, ValueError) as exc:
            metrics.REFINE_FALLBACKS.inc()
            logger.warning("run %s: powder refinement failed: %s", run_id, exc)
            return
        self._powder_last[run_id] = refined.mean.copy()
        source = "powder refinement (no powder model): started from the reference set"
        estimate = running_estimate({"model_version": source, "fc": {}}, refined)
        advice = {
            "run_id": run_id,
            "n_orientations": int(snapshot.n_orientations),
            "omega": float(record.omega),
            "estimate": estimate,
            "ranking": None,
            "seconds": time.perf_counter() - t0,
        }
        self._record_estimate(advice)
        self.latencies.append(time.perf_counter() - t0)

    def _live_snapshot(self, run_id: str, snapshot: Snapshot, record: OrientationRecord) -> None:
        """The run's latest snapshot and the orientation's own spectrum, for the API."""
        with self.live.lock:
            prev = self.live.snapshots.get(run_id)
            self.live.snapshots[run_id] = snapshot
            per = self.live.orientations.setdefault(run_id, {})
            if prev is not None and prev.n_orientations == snapshot.n_orientations - 1:
                per[int(record.index)] = (
                    (snapshot.counts - prev.counts).astype(np.float32),
                    (snapshot.exposure - prev.exposure).astype(np.float32),
                )
            elif snapshot.n_orientations == 1:
                per[int(record.index)] = (
                    snapshot.counts.astype(np.float32),
                    snapshot.exposure.astype(np.float32),
                )
            while len(per) > MAX_ORIENTATION_SPECTRA:
                per.pop(min(per))
            for old in list(self.live.orientations)[:-2]:  # the last two runs only
                self.live.orientations.pop(old)

    def _estimate_and_advise(
        self,
        run_id: str,
        meta: dict[str, Any],
        snapshot: Snapshot,
        record: OrientationRecord,
        t0: float,
        *,
        superseded_by: int | None = None,
    ) -> None:
        """The in-process loop on one snapshot (the model loaded when it can be);
        ``superseded_by``: a newer snapshot of the run is waiting (its orientation count),
        this one gets the VAE's estimate alone (:meth:`SteeringLoop.superseded`)."""
        if meta.get("sample_kind") == "powder":
            # the single-crystal models and the advisor's angles do not apply to S(|Q|, E):
            # the powder refinement of the counts gives the running estimate
            self._powder_estimate(run_id, meta, snapshot, record, t0)
            return
        try:
            loop = self._loop_for(meta)
        except (ModelServerError, OSError) as exc:
            # no model (missing, unreadable, being replaced): folding goes on, and the next
            # orientation tries again, so that estimates resume when the model is back
            metrics.ESTIMATES_SKIPPED.labels(reason="model_unavailable").inc()
            if self.model_error is None:
                logger.error(
                    "model server unavailable for run %s (%s): folding goes on; estimates "
                    "resume when the model is back",
                    run_id,
                    exc,
                )
            self.model_error = f"{type(exc).__name__}: {exc}"
            self.live.model_error = self.model_error
            return
        if self.model_error is not None:
            logger.info("model server back for run %s: estimating again", run_id)
            self.model_error = None
            self.live.model_error = None
        # a stop was asked for: what is left of this step is estimated fast (the VAE), so
        # that every checkpointed orientation is in the history before the process exits
        loop.hurry = self._stopping()
        if superseded_by is not None:
            metrics.ESTIMATES_SUPERSEDED.inc()
            loop.superseded(snapshot, record, superseded_by)
        else:
            loop(snapshot, record)
        self.latencies.append(time.perf_counter() - t0)

    def _record_estimate(self, message: dict[str, Any]) -> None:
        """The in-process loop's estimate sink: the running estimate into the history (its
        ``latency_s``: from the orientation's hand-over to the estimate) and onto the page,
        before the advice is ranked; the chunk-to-estimate latency is measured here."""
        run_id = str(message["run_id"])
        self.history.add_estimate(
            run_id,
            n_orientations=int(message["n_orientations"]),
            omega=float(message["omega"]),
            estimate=message["estimate"],
            latency_s=float(message.get("seconds", 0.0)),
        )
        closed_at = getattr(self._tls, "closed_at", None)
        now = time.time()
        if closed_at is not None:
            dt = max(now - closed_at, 0.0)
            self.chunk_to_estimate.append(dt)
            metrics.CHUNK_TO_ESTIMATE_SECONDS.observe(dt)
        if message["estimate"].get("source") == "refined":
            n = int(message["n_orientations"])
            with self._unrefined_lock:
                waiting = self._unrefined.get(run_id, [])
                done = [t for k, t in waiting if k <= n]
                self._unrefined[run_id] = [(k, t) for k, t in waiting if k > n]
            for t in done:
                dt = max(now - t, 0.0)
                self.chunk_to_refined.append(dt)
                metrics.CHUNK_TO_REFINED_SECONDS.observe(dt)
        self._notify(run_id, message)

    def _record_advice(self, advice: dict[str, Any], *, amend: bool = False) -> None:
        """The advice (when the advisor ranked) into the history: the ranking with the
        run's state, the next angle, the information plan and the stop state beside it.
        ``amend``: it replaces the run's advice after as many orientations
        (:meth:`_finish_plan`). The page is told again (its estimate came before)."""
        if advice.get("ranking") is not None:
            keys = ("state", "next", "plan", "stop", "amended")
            extra: dict[str, Any] = {k: advice[k] for k in keys if k in advice}
            record = self.history.amend_advice if amend else self.history.add_advice
            record(
                str(advice["run_id"]),
                n_orientations=int(advice["n_orientations"]),
                ranking={**advice["ranking"], **extra},
            )
            if not amend:
                self._notify(str(advice["run_id"]), advice)

    def _notify(self, run_id: str, message: dict[str, Any]) -> None:
        """Tell the page about a new estimate or advice (the loop's estimate or advice, or a
        replica's estimate message)."""
        fc = message["estimate"].get("fc", {})
        self.live.notify(
            run_id,
            n_orientations=int(message["n_orientations"]),
            omega=float(message["omega"]),
            fc={k: {"mean": v["mean"], "std": v["std"]} for k, v in fc.items()},
            out_of_domain=bool(message["estimate"].get("out_of_domain", False)),
        )

    # -- following the model-server replicas ---------------------------------------------------

    def _recorded(self, done: dict[str, set[int]], run_id: str, what: str) -> set[int]:
        """The orientation counts of a run whose estimates (``what="estimates"``) or advice
        the history holds (read once per run, then kept up to date)."""
        if run_id not in done:
            rows = (
                self.history.estimates(run_id)
                if what == "estimates"
                else self.history.advice(run_id, latest=False)
            )
            done[run_id] = {int(r["n_orientations"]) for r in rows}
        return done[run_id]

    def follow_snapshot(
        self, meta: dict[str, Any], snapshot: Snapshot, record: OrientationRecord
    ) -> None:
        """A consumer's snapshot from ``<prefix>_folded``: the page's spectrum, coverage and
        run, and the run's progress in the history (:class:`steering.follow.FollowHandler`)."""
        run_id = str(meta["run_id"])
        self._live_snapshot(run_id, snapshot, record)
        if self._livedata is not None:
            self._livedata.snapshot(snapshot, meta)
        if run_id not in self.live.grids:
            from simulations.lattice.materials import setup

            energy = setup(str(meta["material"])).grid.energy_centres.tolist()
            self.live.grids[run_id] = {"energy": energy}
        info = self._run_info(meta)
        with self.live.lock:  # redelivered snapshots do not add their angle twice
            if len(info["omegas"]) == record.index:
                info["omegas"].append(float(record.omega))
        run = self.history.run(run_id)
        if run is None or run["n_orientations"] < snapshot.n_orientations:
            self.history.upsert_run(
                run_id,
                material=str(meta.get("material", "?")),
                n_orientations=int(snapshot.n_orientations),
            )

    def follow_run_complete(self, run_id: str, summary: dict[str, Any]) -> None:
        """A consumer's run-complete message on ``<prefix>_folded``: the run is complete in
        the history, with the consumer's summary (:class:`steering.follow.FollowHandler`)."""
        run = self.history.run(run_id)
        self.history.upsert_run(
            run_id,
            material=str(run["material"]) if run else "?",
            state="complete",
            summary=summary,
        )
        logger.info("run %s complete (from its consumer)", run_id, extra={"run_id": run_id})

    def follow_estimate(self, message: dict[str, Any]) -> bool:
        """A replica's estimate from ``<prefix>_estimates`` into the history (as the
        in-process loop records it) and onto the page; False when the history already
        holds the estimate of that orientation (:class:`steering.follow.FollowHandler`)."""
        run_id = str(message["run_id"])
        n = int(message["n_orientations"])
        done = self._recorded(self._estimated, run_id, "estimates")
        if n in done:
            logger.info(
                "run %s: the estimate after %d orientations is already recorded (redelivered)",
                run_id,
                n,
                extra={"run_id": run_id},
            )
            return False
        material = str(message.get("material") or "?")
        if self.history.run(run_id) is None:  # the estimate came before the run's snapshot
            self.history.upsert_run(run_id, material=material, state="running")
        version = message.get("model_version")
        if isinstance(version, str) and version:
            self.live.model_version = version
            self.history.add_model(
                version, material=material, path=f"replica {message.get('replica')}"
            )
        self.history.add_estimate(
            run_id,
            n_orientations=n,
            omega=float(message["omega"]),
            estimate=message["estimate"],
            latency_s=float(message.get("seconds") or 0.0),
        )
        done.add(n)
        self._notify(run_id, message)
        return True

    def follow_pair(
        self,
        meta: dict[str, Any],
        snapshot: Snapshot,
        record: OrientationRecord,
        message: dict[str, Any],
    ) -> None:
        """An orientation's snapshot and its replica's estimate: the advisor ranks the
        candidates under that estimate (:class:`steering.follow.FollowHandler`)."""
        run_id = str(meta["run_id"])
        done = self._recorded(self._advised, run_id, "advice")
        if snapshot.n_orientations in done or run_id in self._no_advice:
            return
        try:
            loop = self._loop_for(meta)
        except (SteeringError, KeyError, TypeError, ValueError, OSError) as exc:
            self._no_advice[run_id] = f"{type(exc).__name__}: {exc}"
            logger.warning("run %s: no advice: %s", run_id, exc, extra={"run_id": run_id})
            return
        fc = message["estimate"]["fc"]
        nan = {"mean": np.nan, "std": np.nan}  # a missing FC: the advisor says which
        names = loop.advisor.fc_names
        mean = np.array([fc.get(n, nan)["mean"] for n in names], dtype=float)
        std = np.array([fc.get(n, nan)["std"] for n in names], dtype=float)
        t0 = time.perf_counter()
        loop.advise(snapshot, record, message["estimate"], mean, std)
        done.add(snapshot.n_orientations)
        self.latencies.append(time.perf_counter() - t0)

    @property
    def active_runs(self) -> list[str]:
        """The runs with a loop: running, or complete and not yet let go (:meth:`_retire`)."""
        return list(self._loops)

    def scan_summary(self, run_id: str) -> dict[str, Any] | None:
        """The background scans of a run's fits (:mod:`model_server.refinement.scan`):
        ``started``, ``skipped`` (one was running), the last ``error``; None when the run's
        loop has no scan (or the run is not known). A complete run's is kept after its loop
        is let go."""
        loop = self._loops.get(run_id)
        return self._retired.get(run_id) if loop is None else _scan_summary(loop)

    def latency_summary(self, *, refined: bool = False) -> dict[str, float | int | None]:
        """p50 / p99 / max (s) of :attr:`chunk_to_estimate` (``refined``: of
        :attr:`chunk_to_refined`) and the count."""

        lat = np.asarray(self.chunk_to_refined if refined else self.chunk_to_estimate, dtype=float)
        if not len(lat):
            return {"n": 0, "p50_s": None, "p99_s": None, "max_s": None}
        return {
            "n": len(lat),
            "p50_s": round(float(np.percentile(lat, 50)), 4),
            "p99_s": round(float(np.percentile(lat, 99)), 4),
            "max_s": round(float(lat.max()), 4),
        }

    def _on_run_complete(self, summary: dict[str, Any], acc: Any) -> None:
        """A run's end: recorded after its snapshots' estimates (on the estimates' thread,
        behind them), its last advice planned first when it can be."""
        meta = self.service.pipeline.meta or {}
        run_id = str(summary.get("run_id") or meta.get("run_id"))
        material = str(meta.get("material", "?"))
        self._completed_meta.append(meta)  # a late run-start preparation makes no loop

        def work(job: _Job) -> None:
            # one wait for both: the estimates' thread serves the next run too
            deadline = time.monotonic() + self.final_plan_wait_s
            self._finish_estimate(run_id, self.final_plan_wait_s)
            self._finish_plan(run_id, max(deadline - time.monotonic(), 0.0))
            self.history.upsert_run(
                run_id,
                material=material,
                state="complete",
                summary={k: v for k, v in summary.items() if k != "path"},
                export_path=str(summary.get("path")) if summary.get("path") else None,
            )
            with self._unrefined_lock:
                self._unrefined.pop(run_id, None)
            sink = self._sinks.pop(run_id, None)
            if sink is not None:
                sink.close()
            self._retire(run_id)

        self._worker.submit(_Job(run_id, work))

    def _retire(self, run_id: str) -> None:
        """A complete run's loop is let go: its planner's node models, the candidates'
        coverage, the refiner and the correction's folds would otherwise stay for as long
        as the service runs, a run's worth for every run.
        What is asked of the run later (:meth:`scan_summary`) is kept, and the live
        snapshot the API serves keeps its spectrum without the moments (tens of MB); the
        last :data:`LIVE_COMPLETE_SNAPSHOTS` complete runs keep theirs, older ones are
        served from their exports. A later run of the same id gets a loop of its own.
        Called behind the run's last estimate, on the estimates' thread: no snapshot of the
        run is left to need it."""
        with self._loop_lock:
            loop = self._loops.get(run_id)
            self._retired.pop(run_id, None)  # (a run of the same id before: now the newest)
            self._retired[run_id] = None if loop is None else _scan_summary(loop)
            while len(self._retired) > RETIRED_RUNS:
                self._retired.pop(next(iter(self._retired)))
            self._loops.pop(run_id, None)
            self._restored.pop(run_id, None)
            self._powder_last.pop(run_id, None)
        if loop is not None and loop.exact is not None:
            loop.exact.close()  # (settled already: a no-op unless the settle failed)
        active = set(self.active_runs)
        with self.live.lock:
            snap = self.live.snapshots.get(run_id)
            if snap is not None and snap.moments is not None:
                self.live.snapshots[run_id] = dataclasses.replace(snap, moments=None)
            kept = [r for r in self._retired if r in self.live.snapshots and r not in active]
            for old in kept[:-LIVE_COMPLETE_SNAPSHOTS]:
                self.live.snapshots.pop(old, None)
        if loop is not None:
            logger.info("run %s: complete, its loop let go", run_id)

    def _stopping(self) -> bool:
        """Whether the consumer was asked to stop."""
        return bool(getattr(self.service, "_stop_requested", False))

    def _finish_estimate(self, run_id: str, wait_s: float) -> None:
        """The run's last estimate is refitted when its background fit (the last recheck's
        scan or fit from the VAE's start) finishes after the last snapshot and finds a
        lower minimum (:meth:`steering.loop.SteeringLoop.settle_estimate`, waiting at most
        ``wait_s``): a second estimate after as many orientations goes into the history
        and onto the page, flagged ``amended``; the chunk-to-estimate latency does not
        count it. The run's last snapshot is let go either way."""
        loop = self._loops.get(run_id)
        if loop is None:
            return
        if wait_s <= 0:
            loop.settle_estimate(0.0)  # no wait: it only lets the snapshot go
            return
        loop.hurry = self._stopping()
        self._tls.closed_at = None  # not a chunk's estimate
        try:
            loop.settle_estimate(wait_s, cancelled=self._stopping)
        except Exception:  # the run is complete whatever happens to its last refit
            logger.exception("run %s: the last estimate could not be settled", run_id)

    def _finish_plan(self, run_id: str, wait_s: float) -> None:
        """The run's last advice gets its plan if the run ended before the planner's
        information was ready: amended in the history and on the advice topic (not sent to
        the other sinks again: a queue would get a second item)."""
        loop = self._loops.get(run_id)
        if loop is None or self.final_plan_wait_s <= 0:
            return
        loop.hurry = self._stopping()
        try:
            advice = loop.finish(wait_s, cancelled=self._stopping)
        except Exception:  # the run is complete whatever happens to its last plan
            logger.exception("run %s: the last advice could not be planned", run_id)
            return
        if advice is None or advice.get("ranking") is None:
            return
        self._record_advice(advice, amend=True)
        sink = self._sinks.get(run_id)
        if sink is not None:
            try:
                sink(advice)
            except Exception:
                logger.exception("run %s: the amended last advice was not published", run_id)
        logger.info(
            "run %s: its last advice (after %d orientations) planned at the run's end",
            run_id,
            int(advice["n_orientations"]),
        )

    # -- thread ------------------------------------------------------------------------------

    def start(self, *, idle_exit_s: float | None = None) -> None:
        """Start consuming on a thread (follows run after run), or, with
        ``follow_replicas``, following the replicas."""
        if self.follow_replicas:
            self._start_following(idle_exit_s)
            return
        from consumers.kafka import KafkaSource
        from consumers.service import ConsumerService

        topics = self.streams.topics() if self.streams is not None else None
        source = KafkaSource(self.bootstrap, self.prefix, topics=topics)
        if self.publish_livedata and self._livedata is None:
            from consumers.kafka import KafkaLivedataSink

            self._livedata = KafkaLivedataSink(self.bootstrap, self.prefix)
        self.service = ConsumerService(
            source,
            self.state_dir,
            on_snapshot=self._on_snapshot,
            on_run_complete=self._on_run_complete,
            on_run_start=self._prepare,
            follow=True,
            streams=self.streams,
            zone_classes="auto" if self.binning == "classes" else False,
        )
        self.service.checkpoint_max_delay_s = self.snapshot_max_delay_s

        def work() -> None:
            try:
                self.service.run(idle_exit_s=idle_exit_s)
            except Exception as exc:  # the API stays up and says what happened
                self.error = f"{type(exc).__name__}: {exc}"
                logger.exception("consumer stopped")
            finally:
                source.close()
                # every handed-over snapshot gets its estimate before the thread ends (a
                # stop estimates what is left fast: the loop's hurry)
                self._worker.drain()

        self._thread = threading.Thread(target=work, name="consumer", daemon=True)
        self._thread.start()

    def _start_following(self, idle_exit_s: float | None) -> None:
        from steering.follow import ReplicaFollower

        if self.publish_livedata and self._livedata is None:
            from consumers.kafka import KafkaLivedataSink

            self._livedata = KafkaLivedataSink(self.bootstrap, self.prefix)
        follower = self.follower = ReplicaFollower(
            self.bootstrap, self.prefix, self, group_id=self.follow_group
        )

        def work() -> None:
            try:
                follower.run(idle_exit_s=idle_exit_s)
            except Exception as exc:  # the API stays up and says what happened
                self.error = f"{type(exc).__name__}: {exc}"
                logger.exception("follower of the replicas stopped")
            finally:
                follower.close()

        self._thread = threading.Thread(target=work, name="follow-replicas", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the consumer (or the follower) to stop (it checkpoints) and wait."""
        if self.follower is not None:
            self.follower.stop()
        if self.service is not None:
            self.service._request_stop()
        t0 = time.monotonic()
        if self._thread is not None:
            self._thread.join(timeout)
        # the estimates left (made fast: the loop's hurry) before the sinks close
        if not self._worker.drain(max(timeout - (time.monotonic() - t0), 1.0)):
            logger.warning(
                "stopping with %d estimates not made (they are lost; the checkpointed "
                "counts are not)",
                self._worker.pending,
            )
        for loop in list(self._loops.values()):  # no fold is made after the stop
            if loop.exact is not None:
                loop.exact.close()
        for sink in list(self._sinks.values()):
            sink.close()
        self._sinks.clear()
        if self._livedata is not None:
            self._livedata.close()
            self._livedata = None

    @property
    def running(self) -> bool:
        """The consumer thread is alive."""
        return self._thread is not None and self._thread.is_alive()
