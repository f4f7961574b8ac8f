"""``steer`` commands that run the service: the status API with the live loop (``serve``), a
model-server replica (``model-serve``) and the whole service on a simulated run (``demo``)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from steering.cli.options import (
    BootstrapOpt,
    IdleExitOpt,
    InstrumentConfigOpt,
    JsonOpt,
    LiveBinningOpt,
    ModelDirOpt,
    NumericThreadsOpt,
    PrefixOpt,
    Score,
    StateDirOpt,
    Weighting,
    instrument_streams,
    limit_numeric_threads,
)
from steering.cli.output import emit

if TYPE_CHECKING:
    from collections.abc import Sequence

    from consumers.streams import InstrumentConfig
    from model_server.prediction.pool import PredictionPool
    from steering.advisor.queueserver import QueueSink
    from steering.api.app import LiveState
    from steering.api.limits import ServiceLimits
    from steering.db import History
    from steering.loop import AdviceSink
    from steering.service import SteeringService

__all__ = ["demo_cmd", "model_serve_cmd", "queue_sink", "serve_cmd"]

logger = logging.getLogger(__name__)


def _check_estimates(estimates: str) -> None:
    """Refuse an ``--estimates`` other than ``latest`` or ``every`` (before anything starts)."""
    if estimates not in ("latest", "every"):
        raise typer.BadParameter(f"latest or every, got {estimates!r}", param_hint="--estimates")


#: ``--estimates`` of ``steer serve`` and ``steer demo``
EstimatesOpt = Annotated[
    str,
    typer.Option(
        "--estimates",
        envvar="STEER_ESTIMATES",
        help="When the fits fall behind the consumer (a fast replay, a backlog after a "
        "restart): 'latest' refines the newest snapshot and gives the older ones waiting "
        "the VAE's estimate, flagged superseded_by; 'every' refines and advises every "
        "snapshot in order (the estimates then lag). The same at real time.",
    ),
]


def serve_cmd(
    host: Annotated[str, typer.Option("--host", envvar="STEER_HOST", help="Bind address.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option("--port", envvar="STEER_PORT", help="HTTP port.")] = 8000,
    database: Annotated[
        str,
        typer.Option(
            "--database", envvar="STEER_DATABASE_URL", help="SQLAlchemy URL of the run history."
        ),
    ] = "sqlite:///steer.db",
    bootstrap: Annotated[
        str | None,
        typer.Option(
            "--bootstrap",
            envvar=["STEER_KAFKA_BOOTSTRAP", "STEER_BOOTSTRAP"],
            help="Kafka to consume from (host:port); without it only the history is served.",
        ),
    ] = None,
    prefix: PrefixOpt = "arcs",
    state_dir: StateDirOpt = Path("steer_state"),
    model_dir: ModelDirOpt = Path("models"),
    advisor_score: Annotated[
        Score,
        typer.Option(
            "--advisor-score",
            envvar="STEER_ADVISOR_SCORE",
            help="What the advisor sorts by: spectrum (the D-optimal gain of the spectrum, "
            "what the learned estimator needs) or fc (the FC posterior's).",
        ),
    ] = "spectrum",
    advisor_weighting: Annotated[
        Weighting,
        typer.Option(
            "--advisor-weighting",
            envvar="STEER_ADVISOR_WEIGHTING",
            help="How the spectrum's gain weighs its bins: scarcity or uniform.",
        ),
    ] = "scarcity",
    target_std: Annotated[
        str | None,
        typer.Option(
            "--target-std",
            envvar="STEER_TARGET_STD",
            help="Every run's target precision, NAME=eV/A^2 pairs (e.g. "
            "1NN_xx=0.02,2NN_xx=0.002): the plan's stop criterion says done when the refined "
            "std of each is below it (a person can change it: POST /runs/{id}/advisor/target).",
        ),
    ] = None,
    plan: Annotated[
        bool,
        typer.Option(
            "--plan/--no-plan",
            envvar="STEER_PLAN",
            help="Rank angles by the refined posterior's information per beam time and say "
            "when the target is met (docs/advisor.md); off: the spectrum's ranking alone.",
        ),
    ] = True,
    scan: Annotated[
        bool,
        typer.Option(
            "--scan/--no-scan",
            envvar="STEER_SCAN",
            help="Every 10th snapshot, fit a grid of starts around the VAE's estimate on a "
            "background thread (lowest priority) and start the next snapshot's fit from a "
            "lower minimum it finds too (docs/refinement.md).",
        ),
    ] = True,
    exact_correction: Annotated[
        str,
        typer.Option(
            "--exact-correction",
            envvar="STEER_EXACT_CORRECTION",
            help="auto, on or off: make the counts model's exact-fold correction one "
            "orientation at a time on a background thread (nice +10, about 19 s an "
            "orientation of one core for the README's Ge run) and fit every snapshot with "
            "it; the last one is refitted with all of it at the run's end "
            "(docs/refinement.md). auto: on with 3 or more usable cores (the consumer and "
            "the fits keep two).",
        ),
    ] = "auto",
    final_wait: Annotated[
        float,
        typer.Option(
            "--final-wait",
            min=0.0,
            max=86400.0,
            envvar="STEER_FINAL_WAIT",
            help="Seconds a run's end waits for its last background fit, the rest of the "
            "exact-fold correction and the last plan before its last estimate is settled "
            "(0: no wait; the last estimate stays as the last snapshot's and a last advice "
            "without its plan stays so). The next run's estimates wait behind it.",
        ),
    ] = 30.0,
    livedata: Annotated[
        bool,
        typer.Option(
            "--livedata/--no-livedata",
            envvar="STEER_LIVEDATA",
            help="Publish I(q, E) snapshots and FC estimates as da00 on <prefix>_livedata "
            "for the facility's dashboards (docs/outputs.md).",
        ),
    ] = True,
    binning: LiveBinningOpt = "classes",
    estimates: EstimatesOpt = "latest",
    instrument_config: InstrumentConfigOpt = None,
    follow_replicas: Annotated[
        bool,
        typer.Option(
            "--follow-replicas",
            envvar="STEER_FOLLOW_REPLICAS",
            help="Deployed, scaled-out mode: run no consumer and no model here, but follow "
            "the consumers' snapshots on <prefix>_folded (steer consume --publish-snapshots) "
            "and the replicas' estimates on <prefix>_estimates (steer model-serve) into the "
            "run history, the page and the advisor. Needs --bootstrap.",
        ),
    ] = False,
    predict_warmup: Annotated[
        bool,
        typer.Option(
            "--predict-warmup/--no-predict-warmup",
            envvar="STEER_PREDICT_WARMUP",
            help="Have the prediction workers, started with the service, load what POST "
            "/predict needs (Ge's setup, tables and compiled kernels, the e3nn model) in the "
            "background; /health shows how far they are. Without it they only import their "
            "code, and the first requests load the rest.",
        ),
    ] = True,
    queueserver: Annotated[
        str | None,
        typer.Option(
            "--queueserver",
            envvar="STEER_QUEUESERVER",
            help="0MQ control address of a bluesky-queueserver RE Manager "
            "(tcp://127.0.0.1:60615): put the advisor's next orientation on its queue as a "
            "plan item after every orientation (docs/advisor.md, 'Into the control "
            "system'). Needs --bootstrap.",
        ),
    ] = None,
    queue_plan: Annotated[
        str,
        typer.Option(
            "--queue-plan",
            envvar="STEER_QUEUE_PLAN",
            help="The plan the queued items run, defined in the RE Manager's profile "
            "collection; called with omega=<deg> and count_time=<s>.",
        ),
    ] = "steer_count_at",
    queue_plan_kwargs: Annotated[
        str | None,
        typer.Option(
            "--queue-plan-kwargs",
            envvar="STEER_QUEUE_PLAN_KWARGS",
            help='Further keyword arguments of every queued item, a JSON object ({"md": '
            '{"proposal": "IPTS-1"}}).',
        ),
    ] = None,
    queue_count_time: Annotated[
        float | None,
        typer.Option(
            "--queue-count-time",
            envvar="STEER_QUEUE_COUNT_TIME",
            min=0.0,
            help="Seconds to count at each queued orientation where the advice gives none "
            "(default: the plan's).",
        ),
    ] = None,
    queue_autostart: Annotated[
        bool,
        typer.Option(
            "--queue-autostart/--no-queue-autostart",
            envvar="STEER_QUEUE_AUTOSTART",
            help="Switch the queue's autostart on, so that queued orientations run without "
            "anyone pressing start.",
        ),
    ] = False,
    threads: NumericThreadsOpt = 1,
) -> None:
    """Status API (FastAPI + uvicorn) over the run history; with --bootstrap also the
    consumer, model server and advisor of a prefix (with --follow-replicas: the advisor
    over the scaled-out consumers and model-server replicas; with --queueserver: its next
    orientation onto a bluesky-queueserver queue). State changes need STEER_API_TOKEN or one
    of the named STEER_API_TOKENS ("alice:tok1,bob:tok2")."""
    import os

    from model_server.prediction.pool import PredictionPool
    from steering.api.limits import ServiceLimits
    from steering.api.tokens import parse_tokens, token_table

    limits = ServiceLimits.from_env()  # a bad STEER_* limit stops the service before anything
    limit_numeric_threads(threads)

    token = os.environ.get("STEER_API_TOKEN") or None
    tokens = parse_tokens(os.environ.get("STEER_API_TOKENS"))  # and so do bad named tokens
    token_table(token, tokens)
    if follow_replicas:
        check_follow_options(bootstrap=bootstrap, instrument_config=instrument_config)
    streams = instrument_streams(instrument_config, prefix)  # and so does a bad config
    target = _parse_target(target_std)  # refused before anything starts
    if binning not in ("classes", "path"):
        raise typer.BadParameter(f"classes or path, got {binning!r}", param_hint="--binning")
    _check_estimates(estimates)
    exact = _exact_correction(exact_correction)
    queue = None
    if queueserver:  # and so do bad queue options
        queue = queue_sink(
            queueserver,
            bootstrap=bootstrap,
            plan=queue_plan,
            plan_kwargs=queue_plan_kwargs,
            count_time=queue_count_time,
            autostart=queue_autostart,
        )
    if streams is not None:
        prefix = streams.prefix
    # the prediction workers start first: they import and warm up in their own processes
    # while this one imports the API and starts the consumer
    pool = PredictionPool(
        workers=limits.predict_workers,
        queue=limits.predict_queue,
        budget_s=limits.predict_timeout_s,
        warmup=predict_warmup,
    )
    pool.start()
    try:
        from steering.api.app import LiveState
        from steering.db import History

        history = History(database)
        live = LiveState()
        service = None
        if bootstrap:
            service = _start_service(
                bootstrap,
                prefix,
                state_dir=state_dir,
                history=history,
                live=live,
                model_dir=model_dir,
                advisor_score=advisor_score,
                advisor_weighting=advisor_weighting,
                target=target,
                plan=plan,
                scan=scan,
                exact_correction=exact,
                final_wait_s=final_wait,
                livedata=livedata,
                streams=streams,
                follow_replicas=follow_replicas,
                advice_sinks=[queue] if queue is not None else [],
                binning=binning,
                estimates=estimates,
            )
    except BaseException:
        pool.close_now()
        if queue is not None:
            queue.close()
        raise
    if token is None and not tokens:
        logger.warning(
            "neither STEER_API_TOKEN nor STEER_API_TOKENS is set: state-changing endpoints "
            "are disabled"
        )
    elif tokens:
        logger.info("named API tokens: %s", ", ".join(sorted(tokens)))
    logger.info("request limits: %s", limits.to_dict())
    typer.echo(f"serving on http://{host}:{port}/ (OpenAPI at /docs)", err=True)
    try:
        _serve_until_stopped(
            history,
            live,
            token,
            tokens=tokens,
            host=host,
            port=port,
            service=service,
            limits=limits,
            pool=pool,
            state_dir=state_dir,
            model_dir=model_dir,
        )
    finally:
        if queue is not None:
            queue.close()
            logger.info("queue sink: %s", dict(queue.counts))


def check_follow_options(*, bootstrap: str | None, instrument_config: str | None) -> None:
    """Refuse ``--follow-replicas`` with what only the in-process consumer uses.

    Raises
    ------
    typer.BadParameter
        No ``--bootstrap`` (nothing to follow), or an ``--instrument-config`` (the run
        topics and sources are the consumers' business: give it to ``steer consume``).
    """
    if not bootstrap:
        raise typer.BadParameter(
            "follows <prefix>_folded and <prefix>_estimates on a Kafka: give --bootstrap "
            "(or STEER_KAFKA_BOOTSTRAP)",
            param_hint="--follow-replicas",
        )
    if instrument_config:
        raise typer.BadParameter(
            "--instrument-config sets the run topics of the in-process consumer, which "
            "--follow-replicas does not run: give it to steer consume --publish-snapshots",
            param_hint="--follow-replicas",
        )


def queue_sink(
    address: str,
    *,
    bootstrap: str | None,
    plan: str,
    plan_kwargs: str | None,
    count_time: float | None,
    autostart: bool,
) -> QueueSink:
    """The started queue sink of ``--queueserver`` (nothing is sent before the first advice).

    Raises
    ------
    typer.BadParameter
        No ``--bootstrap`` (no advice to queue), ``--queue-plan-kwargs`` that is not a JSON
        object, or bluesky-queueserver-api not installed.
    """
    import json

    from steering.advisor.queueserver import QueueSink

    if not bootstrap:
        raise typer.BadParameter(
            "queues the advice of the live loop, which needs a Kafka: give --bootstrap "
            "(or STEER_KAFKA_BOOTSTRAP)",
            param_hint="--queueserver",
        )
    kwargs: Any = {}
    if plan_kwargs:
        try:
            kwargs = json.loads(plan_kwargs)
        except json.JSONDecodeError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="--queue-plan-kwargs") from exc
        if not isinstance(kwargs, dict):
            raise typer.BadParameter(
                'a JSON object of keyword arguments ({"md": {...}})',
                param_hint="--queue-plan-kwargs",
            )
    try:
        sink = QueueSink.connect(
            address, plan=plan, plan_kwargs=kwargs, count_time=count_time, autostart=autostart
        )
    except ImportError as exc:
        raise typer.BadParameter(
            f"needs bluesky-queueserver-api ({exc}): pip install '.[queueserver]'",
            param_hint="--queueserver",
        ) from exc
    logger.info("advice -> %s(omega=..., ...) on the queue of %s", plan, address)
    return sink.start()


def _parse_target(text: str | None) -> dict[str, Any] | None:
    """``NAME=value,...`` -> ``{"std": {NAME: value}}`` (None when not given)."""
    if not text:
        return None
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            v = float(value)
        except ValueError:
            v = math.nan
        if not sep or not name.strip() or not (math.isfinite(v) and v > 0):
            raise typer.BadParameter(
                f"{part!r}: the target is NAME=eV/A^2 pairs with values > 0, e.g. "
                "1NN_xx=0.02,2NN_xx=0.002",
                param_hint="--target-std",
            )
        out[name.strip()] = v
    return {"std": out}


def _exact_correction(choice: str) -> bool:
    """``--exact-correction``'s choice as on or off (auto: on with 3 or more usable
    cores)."""
    from simulations.lattice.forward import usable_cores

    choice = choice.strip().lower()
    if choice not in ("auto", "on", "off"):
        raise typer.BadParameter(
            f"--exact-correction must be auto, on or off (got {choice!r})",
            param_hint="--exact-correction",
        )
    return choice == "on" or (choice == "auto" and usable_cores() >= 3)


def _start_service(
    bootstrap: str,
    prefix: str,
    *,
    state_dir: Path,
    history: History,
    live: LiveState,
    model_dir: Path,
    advisor_score: Score,
    advisor_weighting: Weighting,
    target: dict[str, Any] | None = None,
    plan: bool = True,
    scan: bool = True,
    exact_correction: bool = False,
    final_wait_s: float = 30.0,
    livedata: bool = True,
    streams: InstrumentConfig | None = None,
    follow_replicas: bool = False,
    advice_sinks: Sequence[AdviceSink] = (),
    binning: str = "classes",
    estimates: str = "latest",
) -> SteeringService:
    """Start the consumer, model server and advisor of ``prefix`` on the Kafka at
    ``bootstrap`` (the arguments: those of :class:`steering.service.SteeringService`)."""
    from steering.service import SteeringService

    service = SteeringService(
        bootstrap,
        prefix,
        state_dir=state_dir,
        history=history,
        live=live,
        model_dir=model_dir,
        advisor_score=advisor_score,
        advisor_weighting=advisor_weighting,
        target=target,
        plan=plan,
        scan=scan,
        exact_correction=exact_correction,
        final_plan_wait_s=final_wait_s,
        publish_livedata=livedata,
        streams=streams,
        follow_replicas=follow_replicas,
        advice_sinks=advice_sinks,
        binning=binning,
        estimates=estimates,
    )
    service.start()
    return service


def _serve_until_stopped(
    history: History,
    live: LiveState,
    token: str | None,
    *,
    tokens: dict[str, str] | None = None,
    host: str,
    port: int,
    service: SteeringService | None,
    limits: ServiceLimits,
    pool: PredictionPool,
    state_dir: Path,
    model_dir: Path,
) -> None:
    """Serve the status API with uvicorn on ``host``:``port`` until Ctrl-C or SIGTERM (exit 0),
    then stop ``service`` and ``pool``.

    The prediction workers of ``pool`` may still be warming up (in their own processes:
    neither the event loop nor ``/health`` waits for them). On the signal they are killed
    at once (the predictions in flight are answered 503), so that uvicorn's graceful
    shutdown does not wait for them: the process is gone within seconds.
    """
    import signal

    import uvicorn

    from steering.api.app import create_app

    class _Terminated(Exception):
        pass

    def _on_term(signum: int, frame: object) -> None:
        raise _Terminated

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            pool.close()
            super().handle_exit(sig, frame)

    app = create_app(
        history,
        token=token,
        tokens=tokens,
        live=live,
        limits=limits,
        predictions=pool,
        state_dir=state_dir,
        model_dir=model_dir,
    )
    # uvicorn shuts down on SIGTERM, then raises the signal again: here, so that the
    # consumer checkpoints and the process exits 0 (a restart, not a crash)
    signal.signal(signal.SIGTERM, _on_term)
    try:
        _Server(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=3)).run()
    except _Terminated:
        logger.info("SIGTERM: stopped")
    finally:
        pool.close_now()
        if service is not None:
            service.stop()


def model_serve_cmd(
    bootstrap: BootstrapOpt,
    prefix: PrefixOpt,
    model_dir: ModelDirOpt = Path("models"),
    partitions: Annotated[
        int,
        typer.Option(
            "--partitions", min=1, help="Partitions of <prefix>_folded when it is created."
        ),
    ] = 1,
    idle: IdleExitOpt = None,
    livedata: Annotated[
        bool,
        typer.Option(
            "--livedata/--no-livedata",
            envvar="STEER_LIVEDATA",
            help="Also publish every estimate as da00 on <prefix>_livedata for the "
            "facility's dashboards (docs/outputs.md).",
        ),
    ] = True,
    as_json: JsonOpt = False,
) -> None:
    """A stateless model-server replica: estimates every snapshot on <prefix>_folded
    (published by steer consume --publish-snapshots) and publishes it to
    <prefix>_estimates. Run as many as <prefix>_folded has partitions; they share them in
    the consumer group steer-<prefix>-model. Stop with SIGTERM or --idle-exit."""
    from model_server.replica import ModelReplica

    replica = ModelReplica(bootstrap, prefix, model_dir, partitions=partitions, livedata=livedata)
    try:
        replica.run(idle_exit_s=idle)
    finally:
        replica.close()
    emit(replica.summary(), as_json)


def demo_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's outputs.")] = Path(
        "demo_out"
    ),
    orientations: Annotated[
        int, typer.Option("--orientations", min=2, max=720, help="Angles of the run (0-120 deg).")
    ] = 60,
    events: Annotated[
        float, typer.Option("--events", min=1e3, help="Events per orientation (before folding).")
    ] = 2e5,
    speed: Annotated[
        float, typer.Option("--speed", min=1.0, help="Replay speed (x real time, 60 s/angle).")
    ] = 60.0,
    port: Annotated[
        int | None, typer.Option("--port", help="API / page port (default: a free one).")
    ] = None,
    keep_serving: Annotated[
        bool, typer.Option("--keep-serving", help="Keep the page up after the run (Ctrl-C).")
    ] = False,
    physics: Annotated[
        bool,
        typer.Option(
            "--physics", help="Also the physics demo (FC sets, phonopy export, training set)."
        ),
    ] = False,
    powder_series: Annotated[
        bool,
        typer.Option(
            "--powder-series",
            help="Instead: the Al powder temperature series (50-640 K, 10 steps each) "
            "through the service, run after run, with the page up; a figure of the "
            "service's force constants against temperature.",
        ),
    ] = False,
    scan: Annotated[
        bool,
        typer.Option(
            "--scan/--no-scan",
            envvar="STEER_SCAN",
            help="The fits' background scan for lower minima (steer serve --scan).",
        ),
    ] = True,
    exact_correction: Annotated[
        str,
        typer.Option(
            "--exact-correction",
            envvar="STEER_EXACT_CORRECTION",
            help="auto, on or off: the counts model's exact-fold correction made while the "
            "run goes (steer serve --exact-correction; about 19 s an orientation of one "
            "core, so at the default 60x the run ends long before it is made). auto: on "
            "with 3 or more usable cores.",
        ),
    ] = "auto",
    final_wait: Annotated[
        float,
        typer.Option(
            "--final-wait",
            min=0.0,
            help="Seconds the run's end waits for its last background fit, the rest of the "
            "exact-fold correction and the last plan before the last estimate is settled.",
        ),
    ] = 30.0,
    binning: LiveBinningOpt = "classes",
    estimates: EstimatesOpt = "latest",
    threads: NumericThreadsOpt = 1,
    as_json: JsonOpt = False,
) -> None:
    """The whole service on a simulated Ge run: embedded broker, fast replay, consumer, model
    server, advisor, API and live page; a progress view, then a summary and plots."""
    from steering.demo import run_demo, run_powder_series_demo

    limit_numeric_threads(threads)
    _check_estimates(estimates)
    exact = _exact_correction(exact_correction)
    if powder_series:
        emit(run_powder_series_demo(out, port=port, keep_serving=keep_serving), as_json)
        return
    result = run_demo(
        out,
        orientations=orientations,
        events_per_orientation=events,
        speed=speed,
        port=port,
        keep_serving=keep_serving,
        scan=scan,
        binning=binning,
        estimates=estimates,
        exact_correction=exact,
        final_wait_s=final_wait,
    )
    if physics:
        from simulations.demo import run_demo as physics_demo

        result["physics"] = physics_demo(out / "physics", n=500)
    if as_json:
        emit(result, True)
    else:
        from steering.demo import format_summary

        typer.echo(format_summary(result))
