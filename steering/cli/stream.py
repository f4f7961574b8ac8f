"""``steer`` commands on the event stream: fold a recorded run offline, precompute coverages,
replay and record runs on Kafka, run the live consumer, and bluesky's 0MQ proxy."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from consumers.exceptions import ConsumerError
from steering.cli.options import (
    BootstrapOpt,
    EiOpt,
    IdleExitOpt,
    InstrumentConfigOpt,
    InstrumentFileOpt,
    JsonOpt,
    PrefixOpt,
    QuietOpt,
    RunArg,
    RunOutOpt,
    Segmentation,
    SegmentationOpt,
    StateDirOpt,
    ToleranceOpt,
    WedgeMeshOpt,
    ZmqFormat,
    ZmqFormatOpt,
    ZmqPrefixOpt,
    instrument_streams,
    parse_range,
    parse_vector,
)
from steering.cli.output import emit
from steering.exceptions import SteeringError

if TYPE_CHECKING:
    from consumers.kafka import KafkaDeadLetter, KafkaSource, MergedSource
    from consumers.reduction.folding import Folder
    from consumers.streams import InstrumentConfig
    from consumers.zmq import ZmqBlueskySource

__all__ = [
    "consume_cmd",
    "coverage_cmd",
    "fold_cmd",
    "record_cmd",
    "replay_cmd",
    "zmq_proxy_cmd",
]

logger = logging.getLogger(__name__)


def fold_cmd(
    run: RunArg,
    out: Annotated[
        Path | None, typer.Option("--out", help="HDF5 file for I(q,E), counts, exposure.")
    ] = None,
    mode: SegmentationOpt = "auto",
    tolerance: ToleranceOpt = 0.05,
    quiet: QuietOpt = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Simulated run: compare with the forward model of its true FC set "
            "(Pearson correlations, peaks on branches) under 'dispersion'.",
        ),
    ] = False,
    instrument_file: InstrumentFileOpt = None,
    instrument_config: InstrumentConfigOpt = None,
    prefix: Annotated[
        str | None,
        typer.Option(
            "--prefix",
            help="Fills {prefix} in --instrument-config's topics (default: the prefix the "
            "recorded file names).",
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="PNG of the folded I(q, E) (Bose-corrected) along the q-path; a simulated "
            "run's true branches dashed over it.",
        ),
    ] = None,
    binning: Annotated[
        str,
        typer.Option(
            "--binning",
            help="path: the events within --tolerance of the q-path's star (the VAE's and "
            "the page's I(q, E)); wedge: every event of the zone in the energy window, on "
            "the irreducible points of a Gamma-centred mesh (for steer estimate --refine "
            "--wedge: about 15x the counts of the path); classes: the path's bins split by "
            "the structure-factor class of each event's Brillouin zone (4 for Ge; for steer "
            "estimate --refine --binned).",
        ),
    ] = "path",
    wedge_mesh: WedgeMeshOpt = 16,
    as_json: JsonOpt = False,
) -> None:
    """Fold a recorded run offline through the consumers' code path (no broker)."""
    from consumers.offline import fold_recorded_run

    if binning not in ("path", "wedge", "classes"):
        raise typer.BadParameter(f"path, wedge or classes, got {binning!r}", param_hint="--binning")
    if binning == "wedge" and wedge_mesh < 2:
        raise typer.BadParameter(f"must be >= 2, got {wedge_mesh}", param_hint="--wedge-mesh")
    if binning != "path":
        for flag, given in (("--check", check), ("--plot", plot is not None)):
            if given:
                raise typer.BadParameter(
                    "compares along the q-path: fold with --binning path for it",
                    param_hint=flag,
                )

    streams = None
    if instrument_config:
        if prefix is None:
            from simulations.runs.recording import RunReader

            with RunReader(run) as reader:
                prefix = str(reader.metadata.get("prefix") or "") or None
        streams = instrument_streams(instrument_config, prefix)
    summary, acc = fold_recorded_run(
        run,
        out,
        mode=mode,
        tolerance=tolerance,
        progress=not quiet,
        check=check,
        instrument_file=instrument_file,
        streams=streams,
        wedge_mesh=wedge_mesh if binning == "wedge" else None,
        zone_classes=binning == "classes",
    )
    if plot is not None:
        _plot_fold(plot, summary, acc, run.name)
        summary["plot"] = str(plot)
    emit(summary, as_json)


def _plot_fold(plot: Path, summary: dict[str, Any], acc: Any, name: str) -> None:
    """Write ``steer fold --plot``: the folded spectrum with the truth's branches."""
    from steering.figures import dispersion_figure

    facts = summary.get("run") or {}
    material = facts.get("material")
    if not material:
        raise SteeringError("--plot: the run start names no material to draw the q-path of")
    png = dispersion_figure(
        acc.snapshot(),
        str(material),
        None,
        truth=facts.get("truth"),
        temperature=float(facts.get("temperature_K") or 5.0),
        title=f"{name}: {summary['orientations']} orientations, "
        f"{summary['events_folded']:,} events folded",
    )
    plot.write_bytes(png)


def coverage_cmd(
    run: Annotated[
        Path | None,
        typer.Option(
            "--run",
            help="Recorded run (.steer): its set-up (run start) and the angles it counted at.",
        ),
    ] = None,
    material: Annotated[
        str, typer.Option("--material", "-m", help="Shipped material (without --run).")
    ] = "Ge",
    angles: Annotated[
        str | None,
        typer.Option(
            "--angles",
            help="Goniometer angles start:stop[:step], degrees, below stop as the "
            "advisor's candidates (default: the run's angles with --run, else 0:120:1).",
        ),
    ] = None,
    ei: EiOpt = None,
    u: Annotated[str, typer.Option("--u", help="Mounting: u (along the beam at omega 0).")] = (
        "1,0,0"
    ),
    v: Annotated[str, typer.Option("--v", help="Mounting: v (in the horizontal plane).")] = (
        "0,1,0"
    ),
    tolerance: ToleranceOpt = 0.05,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Compute a set-up's coverages (exposure per unit charge) of its goniometer angles into
    the disk cache, before the run: its consumers then read them and compute none. Without
    --run: the ARCS-like instrument of the simulated runs."""
    from consumers.offline import precompute_coverages, run_setup
    from steering.advisor.ranking import candidate_omegas

    if run is not None:
        folder, run_angles = run_setup(run, tolerance=tolerance)
    else:
        folder, run_angles = _mounted_folder(material, ei, u, v, tolerance), []
    if angles is not None or run is None:
        # the advisor's candidates: the same angles, the same checks
        grid = candidate_omegas(*parse_range(angles or "0:120:1"), folder.instrument)
        todo = [float(x) for x in grid]
    else:
        todo = run_angles
    if not todo:
        raise SteeringError("no angles: the run has none; give --angles")
    emit(precompute_coverages(folder, todo, progress=not quiet), as_json)


def _mounted_folder(material: str, ei: float | None, u: str, v: str, tolerance: float) -> Folder:
    """The folder of a crystal of ``material`` mounted by ``u``, ``v`` (h,k,l) on the ARCS-like
    instrument at ``ei`` (meV; default: the material's), q-path ``tolerance`` in 1/A."""
    from consumers.reduction.folding import Folder
    from consumers.reduction.table import FoldTable
    from simulations.instrument.spectrometer import Instrument, Orientation
    from simulations.lattice.materials import setup

    ms = setup(material)
    energy = float(ei if ei is not None else ms.defaults.ei)
    orientation = Orientation.from_vectors(
        ms.crystal, parse_vector(u, "--u"), parse_vector(v, "--v")
    )
    if not np.all(np.isfinite(orientation.ub)):
        raise SteeringError(f"--u {u} and --v {v} give no UB matrix (parallel?)")
    table = FoldTable.cached(ms.crystal, ms.grid, tolerance=tolerance)
    return Folder(table, ms.grid, Instrument.arcs_like(), orientation, energy)


def replay_cmd(
    run: RunArg,
    bootstrap: BootstrapOpt,
    prefix: Annotated[
        str | None, typer.Option("--prefix", help="Rename the topics to this prefix.")
    ] = None,
    speed: Annotated[
        str, typer.Option("--speed", help="Time scaling of the original timing, or 'max'.")
    ] = "max",
    bluesky_zmq: Annotated[
        str | None,
        typer.Option(
            "--bluesky-zmq",
            metavar="HOST:PORT",
            help="Publish the bluesky documents with bluesky's Publisher to this 0MQ proxy "
            "in port (steer zmq-proxy) instead of Kafka.",
        ),
    ] = None,
    zmq_prefix: ZmqPrefixOpt = "",
    zmq_format: ZmqFormatOpt = "pickle",
    partitions: Annotated[
        int,
        typer.Option(
            "--partitions",
            min=1,
            help="Partitions of the topics when they have to be created (messages go to the "
            "partition of their key, the run id).",
        ),
    ] = 1,
    instrument_config: InstrumentConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish a recorded run onto Kafka (bluesky documents optionally over 0MQ), in order,
    at any speed."""
    from consumers.replay import replay

    try:
        factor = None if speed == "max" else float(speed)
    except ValueError:
        factor = math.nan
    if factor is not None and not (math.isfinite(factor) and factor > 0):
        raise typer.BadParameter(
            f"{speed!r} is not a speed: give a factor > 0 or 'max'", param_hint="--speed"
        )
    result = replay(
        run,
        bootstrap,
        prefix=prefix,
        speed=factor,
        bluesky_zmq=bluesky_zmq,
        zmq_prefix=zmq_prefix.encode(),
        zmq_format=zmq_format,
        partitions=partitions,
        topics=_config_topics(instrument_config, prefix),
    )
    emit(result, as_json)


def _config_topics(spec: str | None, prefix: str | None) -> list[str] | None:
    """The topics of ``--instrument-config`` (None without one)."""
    streams = instrument_streams(spec, prefix)
    return streams.topics() if streams is not None else None


def record_cmd(
    bootstrap: BootstrapOpt,
    prefix: PrefixOpt,
    out: RunOutOpt = Path("run.steer"),
    idle: Annotated[
        float, typer.Option("--idle-timeout", help="Stop after this many idle seconds.")
    ] = 10.0,
    instrument_config: InstrumentConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Record a run's topics from Kafka into a recorded-run file."""
    from consumers.replay import record

    topics = _config_topics(instrument_config, prefix)
    emit(record(bootstrap, prefix, out, idle_timeout_s=idle, topics=topics), as_json)


# consume's options with long help texts
ZmqSourceOpt = Annotated[
    str | None,
    typer.Option(
        "--bluesky-zmq",
        metavar="HOST:PORT",
        help="Take the bluesky documents from this 0MQ proxy out port (bluesky's "
        "RemoteDispatcher, journalled in the state dir) instead of <prefix>_bluesky.",
    ),
]
FollowOpt = Annotated[
    bool,
    typer.Option(
        "--follow",
        help="Go on with the runs that follow on the topics (each complete run is "
        "exported to STATE_DIR/runs/<run id>.h5); stop with SIGTERM or --idle-exit.",
    ),
]
GroupOpt = Annotated[
    bool,
    typer.Option(
        "--group",
        help="Scale out: join the consumer group steer-<prefix> and fold the partitions "
        "it gives this process, one lane per partition number in STATE_DIR/partition-<p>/ "
        "(a folder every member shares; a member that dies is taken over). Implies "
        "--follow; runs are exported to STATE_DIR/partition-<p>/runs/<run id>.h5.",
    ),
]
GroupPartitionsOpt = Annotated[
    int,
    typer.Option(
        "--partitions",
        min=1,
        help="With --group: partitions of the run topics when they have to be created.",
    ),
]


def consume_cmd(
    bootstrap: BootstrapOpt,
    prefix: PrefixOpt,
    state_dir: StateDirOpt,
    out: Annotated[
        Path | None, typer.Option("--out", help="HDF5 export when the run is complete.")
    ] = None,
    mode: SegmentationOpt = "auto",
    idle: IdleExitOpt = None,
    publish: Annotated[
        bool,
        typer.Option("--publish-snapshots", help="Publish snapshots to <prefix>_folded."),
    ] = False,
    bluesky_zmq: ZmqSourceOpt = None,
    zmq_prefix: ZmqPrefixOpt = "",
    zmq_format: ZmqFormatOpt = "pickle",
    follow: FollowOpt = False,
    group: GroupOpt = False,
    partitions: GroupPartitionsOpt = 1,
    instrument_config: InstrumentConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the live consumer: fold a run, checkpointing after every orientation.

    Without --follow it returns when the run is complete (a later start of the same
    state dir takes the next run on the topics).
    """
    from consumers.kafka import KafkaDeadLetter

    if group and (out is not None or bluesky_zmq):
        raise typer.BadParameter(
            "--group exports every run to STATE_DIR/partition-<p>/runs/ and reads the bluesky "
            "documents from Kafka: leave out --out and --bluesky-zmq"
        )
    streams = instrument_streams(instrument_config, prefix)  # a bad config: before Kafka
    if streams is not None:
        prefix = streams.prefix
    _make_state_dir(state_dir)  # first: a bad one is refused before Kafka is reached
    dead = KafkaDeadLetter(bootstrap, prefix)
    if group:
        summary = _consume_as_group(
            bootstrap,
            prefix,
            state_dir,
            dead,
            partitions=partitions,
            mode=mode,
            publish=publish,
            idle=idle,
            streams=streams,
        )
    else:
        source, zmq_source = _open_source(
            bootstrap, prefix, state_dir, dead, bluesky_zmq, zmq_prefix, zmq_format, streams
        )
        summary = _consume(
            bootstrap,
            prefix,
            state_dir,
            dead,
            source,
            zmq_source,
            out=out,
            mode=mode,
            publish=publish,
            follow=follow,
            idle=idle,
            streams=streams,
        )
    emit(summary, as_json)


def _make_state_dir(state_dir: Path) -> None:
    """Create the consumer's checkpoint folder, or refuse it with the reason."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConsumerError(
            f"state folder {state_dir} cannot be created: {exc.strerror or exc}"
        ) from exc


def _consume_as_group(
    bootstrap: str,
    prefix: str,
    state_dir: Path,
    dead: KafkaDeadLetter,
    *,
    partitions: int,
    mode: Segmentation,
    publish: bool,
    idle: float | None,
    streams: InstrumentConfig | None = None,
) -> dict[str, Any]:
    """``consume --group``: fold the partitions the consumer group gives this process until
    SIGTERM or ``idle`` seconds without messages; returns the members' summary. Closes
    ``dead``."""
    from consumers.kafka import KafkaSnapshotSink
    from consumers.kafka.group import GroupConsumer

    sink = KafkaSnapshotSink(bootstrap, prefix) if publish else None
    try:
        members = GroupConsumer(
            bootstrap,
            prefix,
            state_dir,
            partitions=partitions,
            mode=mode,
            dead_letter=dead,
            snapshots=sink,
            streams=streams,
        )
        members.run(idle_exit_s=idle)
    finally:
        dead.close()
        if sink is not None:
            sink.close()
    return members.summary()


def _open_source(
    bootstrap: str,
    prefix: str,
    state_dir: Path,
    dead: KafkaDeadLetter,
    bluesky_zmq: str | None,
    zmq_prefix: str,
    zmq_format: ZmqFormat,
    streams: InstrumentConfig | None = None,
) -> tuple[KafkaSource | MergedSource, ZmqBlueskySource | None]:
    """The consumer's message source: the run's Kafka topics, with the bluesky documents from
    the 0MQ proxy at ``bluesky_zmq`` (HOST:PORT) instead of Kafka when given; and that 0MQ
    source (None without it). Closes ``dead`` when the 0MQ source cannot be opened."""
    from consumers.kafka import KafkaSource, MergedSource

    if not bluesky_zmq:
        topics = streams.topics() if streams is not None else None
        return KafkaSource(bootstrap, prefix, topics=topics), None
    from consumers.zmq import ZmqBlueskySource

    topics = streams.topics(bluesky=False) if streams is not None else None
    kafka = KafkaSource(bootstrap, prefix, bluesky=False, topics=topics)
    try:
        zmq_source = ZmqBlueskySource(
            bluesky_zmq,
            state_dir,
            prefix=zmq_prefix.encode(),
            deserializer=zmq_format,
            dead_letter=dead,
        )
    except BaseException:
        kafka.close()
        dead.close()
        raise
    return MergedSource(kafka, zmq_source), zmq_source


def _consume(
    bootstrap: str,
    prefix: str,
    state_dir: Path,
    dead: KafkaDeadLetter,
    source: KafkaSource | MergedSource,
    zmq_source: ZmqBlueskySource | None,
    *,
    out: Path | None,
    mode: Segmentation,
    publish: bool,
    follow: bool,
    idle: float | None,
    streams: InstrumentConfig | None = None,
) -> dict[str, Any]:
    """Run one consumer on ``source`` until its run is complete (with ``follow``: until
    SIGTERM or ``idle`` seconds without messages); returns its summary, with the HDF5 export
    ``out`` written when given. Closes ``source`` and ``dead``."""
    from consumers.kafka import KafkaSnapshotSink
    from consumers.service import ConsumerService

    sink = KafkaSnapshotSink(bootstrap, prefix) if publish else None
    try:
        service = ConsumerService(
            source, state_dir, mode=mode, dead_letter=dead, follow=follow, streams=streams
        )
        if sink is not None:
            service.set_snapshot_sink(sink.bind(service.run_info))
            service.on_run_complete = sink.run_complete
        service.run(idle_exit_s=idle)
        summary = service.summary()
        if zmq_source is not None:
            summary["bluesky_zmq"] = zmq_source.stats()
        if out is not None and service.pipeline.acc is not None:
            service.pipeline.acc.write_hdf5(
                out, metadata={"bootstrap": bootstrap}, run_start=service.pipeline.meta
            )
            summary["path"] = str(out)
    finally:
        source.close()
        dead.close()
        if sink is not None:
            sink.close()
    return summary


def zmq_proxy_cmd(
    in_port: Annotated[
        int, typer.Option("--in-port", help="Port the run engine's Publisher sends to.")
    ],
    out_port: Annotated[
        int, typer.Option("--out-port", help="Port consumers (RemoteDispatcher) subscribe to.")
    ],
    host: Annotated[
        str, typer.Option("--host", help="Interface to bind (0.0.0.0 for every interface).")
    ] = "127.0.0.1",
) -> None:
    """Run bluesky's 0MQ Proxy (the same as bluesky's own `bluesky-0MQ-proxy IN OUT`) until
    interrupted: run engine -> --in-port, `steer consume --bluesky-zmq HOST:OUT`."""
    from bluesky.callbacks.zmq import Proxy

    proxy = Proxy(in_address=f"{host}:{in_port}", out_address=f"{host}:{out_port}")
    logger.info("0MQ proxy: in %s, out %s", proxy.in_port, proxy.out_port)
    proxy.start()
