"""The live consumer: a steppable service around :class:`~consumers.reduction.pipeline.RunPipeline`.

Each :meth:`ConsumerService.step` polls the source once. Every message is checked against
the offsets already consumed (a re-delivered topic/partition/offset is counted and
ignored), fed to the pipeline, and a malformed one is counted, logged with its position and
handed to the dead-letter sink; nothing stops the consumer. After every completed
orientation the whole state (accumulators, segmentation buffers, counters and the next
offsets) is written to one checkpoint file atomically (write, fsync, rename), and only then
are the offsets committed to the broker. A restarted service loads the checkpoint and seeks
to its offsets, so no event is lost or counted twice.

Several runs may follow one another on the same topics. Messages keyed with another run id
are held (topics are read in any order, so the next run's events can come before this
run's stop); when this run's messages follow them on the same partition they were strays,
dead-lettered as ``other_run`` (a run start as ``second_run_start``). After the run stop,
a run start, a second bluesky RunStart and keyless messages on a partition that has moved
on are held too. Held messages are checkpointed with the state until the stopped run is
complete: every partition has either reached its end or delivered a message of the next
run (each topic is in time order). The complete run is exported to
``<state_dir>/runs/<run_id>.h5``, its summary is kept in
:attr:`ConsumerService.finished_runs`, and the held messages start the next run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np

from consumers import metrics
from consumers.exceptions import ConsumerError
from consumers.messages import MessageSource, SnapshotSink, SourceMessage
from consumers.reduction.accumulate import OrientationRecord, Snapshot
from consumers.reduction.moments import BinMoments
from consumers.reduction.pipeline import MalformedMessage, RunPipeline, run_key_of, schema_of
from consumers.streams import InstrumentConfig
from consumers.wire import msgpack_document_name
from simulations.jsonutil import json_default

__all__ = ["ConsumerService"]

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.npz"
#: the run's moments beside the checkpoint (they are ~135 MB for Ge's zone classes, and
#: depend on the orientations' angles alone): written off the snapshots' path after each
#: checkpoint, tagged with the run and the orientations they cover
MOMENTS = "moments.npz"
RUNS = "runs"
#: the poll's timeout (s) while a closed orientation is being folded on the background
#: thread: it is collected (checkpointed, handed over) as soon as its fold ends, not when
#: the next message comes (the stream is quiet while the goniometer moves)
IN_FLIGHT_POLL_S = 0.02


def _write_npz(path: Path, tmp: Path, arrays: dict[str, Any]) -> None:
    """``np.savez`` of ``arrays`` to ``tmp``, fsynced, then renamed to ``path`` (a reader
    sees the old file or the new one, whole). On ``OSError`` the temporary file is removed
    and the error raised; ``path`` is as it was."""
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with suppress(OSError):
            tmp.unlink()
        raise


def moments_tag(meta: Any, records: list[Any]) -> str:
    """Digest of a run's metadata and the JSON of the orientation records that a moments
    file covers (it is read back only for the run and orientations it was written for)."""
    text = json.dumps({"meta": meta, "records": records}, default=json_default, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _pack(msgs: list[SourceMessage]) -> tuple[list[list[Any]], np.ndarray]:
    """Held messages as JSON-ready positions and headers plus one byte array of payloads."""
    meta: list[list[Any]] = []
    for m in msgs:
        meta.append(
            [
                m.topic,
                m.partition,
                m.offset,
                None if m.key is None else m.key.hex(),
                m.timestamp_ns,
                [[k, v.hex()] for k, v in m.headers],
                len(m.payload),
            ]
        )
    blob = np.frombuffer(b"".join(m.payload for m in msgs), dtype=np.uint8)
    return meta, blob


def _is_bluesky_start(m: SourceMessage, schema: str) -> bool:
    """A bluesky RunStart: by its ``document`` header (JSON) or its name (msgpack)."""
    if schema == "bluesky-json":
        return dict(m.headers).get("document") == b"start"
    return schema == "bluesky-msgpack" and msgpack_document_name(m.payload) == "start"


def _unpack(meta: list[list[Any]], blob: np.ndarray) -> list[SourceMessage]:
    """Inverse of :func:`_pack`."""
    out: list[SourceMessage] = []
    data = blob.tobytes()
    pos = 0
    for topic, part, off, key, ts, headers, n in meta:
        out.append(
            SourceMessage(
                topic=topic,
                partition=int(part),
                offset=int(off),
                key=None if key is None else bytes.fromhex(key),
                timestamp_ns=int(ts),
                headers=tuple((k, bytes.fromhex(v)) for k, v in headers),
                payload=data[pos : pos + int(n)],
            )
        )
        pos += int(n)
    return out


class ConsumerService:
    """Consume one run from a :class:`MessageSource` into a :class:`RunPipeline`.

    Parameters
    ----------
    source
        Where messages come from.
    state_dir
        Folder of the checkpoint (created).
    mode, tolerance
        Passed to the pipeline.
    on_snapshot
        Called with the cumulative :class:`Snapshot` and the orientation record after every
        completed orientation (the model server's seam).
    dead_letter
        Called with ``(message, reason)`` for every malformed message.
    on_run_complete
        Called with the run's summary and accumulator when a run is complete (after its
        export to ``<state_dir>/runs/<run_id>.h5``).
    on_run_start
        Called with the run's metadata (pl72) as soon as a run starts (or is restored
        from the checkpoint), so that what follows can get ready before the first
        orientation completes. It runs on the consumer's thread: return quickly.
    follow
        Go on to the next run on the topics after one is complete (:meth:`run` returns
        only on SIGTERM or ``idle_exit_s``); otherwise :meth:`run` returns when the
        current run is complete and the next one starts at the next start.
    streams
        The instrument's streams (:class:`consumers.streams.InstrumentConfig`): which
        (topic, source) is the detector, the goniometer, the charge, the monitors; whether
        message keys are run ids. None: by source name, as the simulator names them.
    zone_classes
        Split a single crystal's bins by zone class for the refinement (the pipeline's
        ``zone_classes``): ``"auto"`` where the material has more than one (``steer
        serve``'s default, whose in-process refinement fits them), True (refuse runs that
        cannot be split) or False (default: the path alone; a consumer that only exports
        and publishes has no use for the split, whose moments do not fit a snapshot
        message, :mod:`consumers.kafka.sink`).
    """

    def __init__(
        self,
        source: MessageSource,
        state_dir: str | Path,
        *,
        mode: str = "auto",
        tolerance: float = 0.05,
        on_snapshot: SnapshotSink | Callable[[Snapshot, OrientationRecord], None] | None = None,
        dead_letter: Callable[[SourceMessage, str], None] | None = None,
        on_run_complete: Callable[[dict[str, object], Any], None] | None = None,
        follow: bool = False,
        on_run_start: Callable[[dict[str, Any]], None] | None = None,
        streams: InstrumentConfig | None = None,
        zone_classes: bool | str = False,
    ) -> None:
        self.source = source
        self._zone_classes = zone_classes
        #: which (topic, source) is which (None: by source name, the simulator's names)
        self.streams = streams
        self.state_dir = Path(state_dir)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConsumerError(
                f"state folder {self.state_dir} cannot be created: {exc.strerror or exc}"
            ) from exc
        self._mode = mode
        self._tolerance = float(tolerance)
        self.pipeline = RunPipeline(
            mode=mode, tolerance=tolerance, streams=streams, zone_classes=zone_classes
        )
        self.on_snapshot = on_snapshot
        #: wall time (s since the epoch) at which the orientation being handed to
        #: ``on_snapshot`` closed (None when unknown)
        self.closed_at: float | None = None
        self._keep_snapshots(on_snapshot is not None)
        self.on_run_complete = on_run_complete
        self.on_run_start = on_run_start
        self._started_meta: object = None
        self.follow = follow
        #: summaries of the runs completed by this state dir, oldest first
        self.finished_runs: list[dict[str, object]] = []
        # messages of the next run, held until the stopped one is complete, and the
        # partitions they came from (all of the stopped run's are in before them there)
        self._next: list[SourceMessage] = []
        self._next_seen: set[tuple[str, int]] = set()
        self._bluesky_started = False  # this run has had its bluesky RunStart
        self.dead_letter = dead_letter
        self.next_offsets: dict[tuple[str, int], int] = {}
        self.counters: Counter[str] = Counter()
        self._topic_counters: dict[str, Any] = {}
        self.done = False
        self._stop_requested = False
        self._moving_seen = 0
        self._early: list[SourceMessage] = []
        #: messages held while waiting for the run start (pl72); beyond it they are refused
        self.early_limit = 200_000
        #: completed orientations not checkpointed yet (their snapshots wait for it)
        self._unsaved: list[OrientationRecord] = []
        #: longest wait (s) for the background fold before a checkpoint is forced; the
        #: snapshots of completed orientations wait for their checkpoint, so this bounds
        #: how late they reach the model server when data come faster than they fold
        self.checkpoint_max_delay_s = 5.0
        self._fold_seconds: list[float] = []
        self._checkpoint_t = time.monotonic()
        #: writes :data:`MOMENTS` (one at a time; a newer one replaces one not started)
        self._moments_pool: ThreadPoolExecutor | None = None
        self._moments_write: Future[None] | None = None
        self._load()

    # -- loop --------------------------------------------------------------------------------

    def step(self, max_records: int = 5000, timeout_s: float = 0.5) -> int:
        """Poll once and process what came; returns the number of messages handled."""
        completed: list[OrientationRecord] = []
        if self.done and self._next:
            completed += self._start_next_run()
        if self.pipeline.in_flight:
            timeout_s = min(timeout_s, IN_FLIGHT_POLL_S)
        msgs = self.source.consume(max_records, timeout_s)
        completed += self._route(msgs)
        completed += self.pipeline.collect()  # orientations folded while we read
        became_done = False
        if self.pipeline.stopped and not self.done and self._run_is_complete():
            completed += self.pipeline.finish()
            self.done = became_done = True
        self._finish_step(completed, became_done)
        return len(msgs)

    def _route(self, msgs: list[SourceMessage], *, fresh: bool = True) -> list[OrientationRecord]:
        """Deduplicate (``fresh`` messages), hold or handle; returns completed orientations."""
        completed: list[OrientationRecord] = []
        per_topic: Counter[str] = Counter()  # the metric is added to once per poll
        try:
            for m in msgs:
                completed += self._route_one(m, fresh, per_topic)
        finally:
            for topic, n in per_topic.items():
                counter = self._topic_counters.get(topic)
                if counter is None:
                    counter = self._topic_counters[topic] = metrics.MESSAGES.labels(topic)
                counter.inc(n)
        return completed

    def _route_one(
        self, m: SourceMessage, fresh: bool, per_topic: Counter[str]
    ) -> list[OrientationRecord]:
        """One message of :meth:`_route` (counted in ``per_topic`` when fresh)."""
        if m.key is not None and self.streams is not None and not self.streams.keyed_by_run:
            m = dataclasses.replace(m, key=None)  # an ESS producer's keys say nothing of runs
        key = (m.topic, m.partition)
        completed: list[OrientationRecord] = []
        if fresh:
            if m.offset < self.next_offsets.get(key, 0):
                self.counters["duplicates"] += 1
                metrics.MESSAGES_DUPLICATE.inc()
                return completed
            self.next_offsets[key] = m.offset + 1
            self.counters["messages"] += 1
            per_topic[m.topic] += 1
        schema = schema_of(m.headers, m.payload)
        if self.pipeline.meta is not None:
            run_key = self.pipeline.run_key
            if m.key and run_key and m.key == run_key and key in self._next_seen:
                # this run goes on on that partition: what was held there was a stray
                self._release_strays(key)
            if self._is_next_run(m, schema, key):
                self._hold(m, key)
                return completed
        # topics arrive in any order: hold what precedes the run start (bounded)
        if self.pipeline.meta is None and schema != "pl72" and len(self._early) < self.early_limit:
            self._early.append(m)
            return completed
        if _is_bluesky_start(m, schema):
            self._bluesky_started = True
        completed += self._handle(m, schema)
        if self._early and self.pipeline.meta is not None:
            early, self._early = self._early, []
            completed += self._route(early, fresh=False)
        return completed

    def _finish_step(self, completed: list[OrientationRecord], became_done: bool) -> None:
        """Metrics, checkpoint, offset commit, snapshots and the export of a complete run."""
        # the checkpoint needs every closed orientation in; wait for the background fold
        # when the last checkpoint is getting old (never during a real count: an
        # orientation folds in a fraction of a second, counting one takes a minute)
        overdue = time.monotonic() - self._checkpoint_t > self.checkpoint_max_delay_s
        if self.pipeline.in_flight and (self._unsaved or completed) and overdue:
            completed += self.pipeline.collect(block=True)
        for seconds in self.pipeline.fold_seconds:
            metrics.FOLD_SECONDS.observe(seconds)
        self._fold_seconds += self.pipeline.fold_seconds
        self.pipeline.fold_seconds.clear()
        if self.pipeline.segmenter is not None:
            moving = self.pipeline.segmenter.moving
            if moving > self._moving_seen:
                metrics.EVENTS_DROPPED.labels("moving").inc(moving - self._moving_seen)
            self._moving_seen = moving
        for rec in completed:
            metrics.ORIENTATIONS.inc()
            metrics.EVENTS_FOLDED.inc(rec.folded)
            for reason, n in rec.dropped.items():
                metrics.EVENTS_DROPPED.labels(reason).inc(n)
        if became_done:
            self._archive_run()
        self._unsaved += completed
        if (self._unsaved or became_done) and not self.pipeline.in_flight:
            records = self._checkpoint()
            self.source.commit(self.next_offsets)
            saved, self._unsaved = self._unsaved, []
            # snapshots go out once what they show is checkpointed, each as the spectrum
            # stood after its orientation
            last: BinMoments | None = None
            if self.on_snapshot is not None and self.pipeline.acc is not None:
                for rec in saved:
                    snap = self.pipeline.snapshots.pop(rec.index, None)
                    self.closed_at = self.pipeline.closed_at.pop(rec.index, None)
                    snap = snap or self.pipeline.snapshot()
                    last = snap.moments
                    try:
                        self.on_snapshot(snap, rec)
                    except Exception:
                        logger.exception("snapshot hand-off failed (orientation %d)", rec.index)
                    finally:
                        self.pipeline.handed_over()
            if saved:
                self._save_moments(last, records)
        if became_done and self.on_run_complete is not None and self.pipeline.acc is not None:
            try:
                self.on_run_complete(self.finished_runs[-1], self.pipeline.acc)
            except Exception:
                logger.exception("run-complete hand-off failed")

    # -- runs --------------------------------------------------------------------------------

    def _is_next_run(self, m: SourceMessage, schema: str, part: tuple[str, int]) -> bool:
        """A message that may belong to the next run: keyed with another run id (events of
        the next run can arrive before this run's stop, topics being read in any order),
        or, after this run's stop, a run start, a second bluesky RunStart, or a keyless
        message on a partition that has moved on."""
        run_key = self.pipeline.run_key
        key = run_key_of(schema, m.key)
        if key and run_key and key != run_key:
            return True
        if not self.pipeline.stopped or (key and key == run_key):
            return False
        if schema == "pl72":
            return True
        if part in self._next_seen:
            return True
        # a second bluesky RunStart (0MQ documents carry no key); the first one may come
        # after the 6s4t, over another transport
        return self._bluesky_started and _is_bluesky_start(m, schema)

    def _hold(self, m: SourceMessage, part: tuple[str, int]) -> None:
        """Hold a next-run message (bounded; beyond the bound it is dead-lettered)."""
        if len(self._next) >= self.early_limit:
            self._dead(m, "next_run_overflow")
            return
        self._next.append(m)
        self._next_seen.add(part)

    def _release_strays(self, part: tuple[str, int]) -> None:
        """Messages held from ``part`` were followed there by this run's: another run's
        strays, refused as ``other_run`` (a run start as ``second_run_start``)."""
        strays = [m for m in self._next if (m.topic, m.partition) == part]
        self._next = [m for m in self._next if (m.topic, m.partition) != part]
        self._next_seen.discard(part)
        for m in strays:
            logger.warning(
                "%s[%d]@%d: message keyed %r of another run dead-lettered",
                m.topic,
                m.partition,
                m.offset,
                m.key,
            )
            pl72 = schema_of(m.headers, m.payload) == "pl72"
            self._dead(m, "second_run_start" if pl72 else "other_run")

    def _run_is_complete(self) -> bool:
        """Every partition is at its end or has moved on to the next run."""
        offsets = dict(self.next_offsets)
        for key in self._next_seen:
            offsets[key] = 2**62
        return self.source.caught_up(offsets)

    def _archive_run(self) -> None:
        """Export the complete run and record its summary (before the checkpoint)."""
        acc = self.pipeline.acc
        meta = self.pipeline.meta or {}
        summary = self.summary()
        summary.pop("finished_runs", None)
        summary["run_id"] = meta.get("run_id")
        if acc is not None:
            run_id = str(meta.get("run_id") or f"run{len(self.finished_runs)}")
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
            folder = self.state_dir / RUNS
            folder.mkdir(exist_ok=True)
            tmp = folder / f".{safe}.h5.tmp"
            acc.write_hdf5(tmp, metadata={"run": meta.get("run_id")}, run_start=meta)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, folder / f"{safe}.h5")
            summary["path"] = str(folder / f"{safe}.h5")
        self.finished_runs.append(summary)
        logger.info("run %s complete: %s", meta.get("run_id"), summary.get("path"))

    def _start_next_run(self) -> list[OrientationRecord]:
        """Open the next run with the messages held for it."""
        held, self._next = self._next, []
        self._next_seen = set()
        self._bluesky_started = False
        self.pipeline.close()
        self.pipeline = RunPipeline(
            mode=self._mode,
            tolerance=self._tolerance,
            streams=self.streams,
            zone_classes=self._zone_classes,
        )
        self._keep_snapshots(self.on_snapshot is not None)
        self.done = False
        self._moving_seen = 0
        completed = self._route(held, fresh=False)
        logger.info("next run started with %d held messages", len(held))
        return completed

    def _handle(self, m: SourceMessage, schema: str) -> list[OrientationRecord]:
        """One message through the pipeline; bad ones are counted and dead-lettered."""
        try:
            n0 = self.pipeline.n_events
            done = self.pipeline.handle(schema, m.payload, m.timestamp_ns, m.key, topic=m.topic)
            if self.pipeline.n_events != n0:
                metrics.EVENTS_CONSUMED.inc(self.pipeline.n_events - n0)
            self._announce_run()
            return done
        except MalformedMessage as exc:
            where = f"{m.topic}[{m.partition}]@{m.offset}"
            reason = exc.reason
            logger.warning(
                "%s: malformed message dead-lettered: %s",
                where,
                exc,
                extra={"topic": m.topic, "partition": m.partition, "offset": m.offset},
            )
        except Exception:  # never stop the consumer; say loudly what happened
            reason = "internal_error"
            logger.exception(
                "%s[%d]@%d: message could not be processed", m.topic, m.partition, m.offset
            )
        self._dead(m, reason)
        return []

    def _announce_run(self) -> None:
        """Call ``on_run_start`` once per run (the pipeline's metadata is new)."""
        meta = self.pipeline.meta
        if meta is None or meta is self._started_meta or self.on_run_start is None:
            return
        self._started_meta = meta
        try:
            self.on_run_start(meta)
        except Exception:
            logger.exception("run-start hand-off failed")

    def _dead(self, m: SourceMessage, reason: str) -> None:
        """Count a refused message and hand it to the dead-letter sink."""
        where = f"{m.topic}[{m.partition}]@{m.offset}"
        self.counters[f"malformed_{reason}"] += 1
        metrics.MESSAGES_MALFORMED.labels(reason).inc()
        if self.dead_letter is not None:
            try:
                self.dead_letter(m, reason)
            except Exception:
                logger.exception("%s: dead-lettering failed", where)

    def run(self, *, idle_exit_s: float | None = None) -> None:
        """Step until a run is complete (or SIGTERM, or ``idle_exit_s`` without input).

        With ``follow``, go on with the runs that follow. A state dir whose run is already
        complete returns at once unless messages of a next run were held.
        """
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGTERM, self._request_stop) if main else None
        last = time.monotonic()
        finished = len(self.finished_runs)
        try:
            while not self._stop_requested:
                if not self.follow and (
                    len(self.finished_runs) > finished or (self.done and not self._next)
                ):
                    break
                if self.step():
                    last = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - last > idle_exit_s:
                    break
            # leaving: the orientations still folding are checkpointed before we go
            self._finish_step(self.pipeline.collect(block=True), False)
            self.flush_moments()
        finally:
            if main:
                signal.signal(signal.SIGTERM, old)

    def _request_stop(self, *_: object) -> None:
        self._stop_requested = True

    def set_snapshot_sink(
        self, sink: SnapshotSink | Callable[[Snapshot, OrientationRecord], None] | None
    ) -> None:
        """Hand snapshots to ``sink`` from now on (see ``on_snapshot``)."""
        self.on_snapshot = sink
        self._keep_snapshots(sink is not None)

    def _keep_snapshots(self, keep: bool) -> None:
        """The pipeline keeps a snapshot of each orientation for ``on_snapshot`` (or not),
        and holds the next setpoint's preparation while a closed orientation has not been
        handed over: what ``on_snapshot`` starts with it (an estimate) has the cores."""
        pipeline = self.pipeline
        pipeline.keep_snapshots = keep
        pipeline.hold_preparation = (lambda: pipeline.awaiting_handover > 0) if keep else None

    def run_info(self) -> dict[str, Any] | None:
        """The current run's metadata (pl72) with its grid's fingerprint, or None."""
        if self.pipeline.meta is None:
            return None
        info = dict(self.pipeline.meta)
        if self.pipeline.acc is not None:
            info["grid_fingerprint"] = self.pipeline.acc.grid.fingerprint
        return info

    def request_stop(self) -> None:
        """Ask :meth:`run` (on any thread) to checkpoint what is folding and return."""
        self._stop_requested = True

    # -- checkpoints -------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        """The checkpoint file."""
        return self.state_dir / CHECKPOINT

    def _checkpoint(self) -> list[Any]:
        """Write the checkpoint (not the moments: :meth:`_save_moments`); returns its
        orientation records (JSON)."""
        js, arrays = self.pipeline.state()
        js["offsets"] = [[t, p, o] for (t, p), o in self.next_offsets.items()]
        js["counters"] = dict(self.counters)
        js["done"] = self.done
        js["finished_runs"] = self.finished_runs
        js["bluesky_started"] = self._bluesky_started
        js["held_next"], arrays["held_next"] = _pack(self._next)
        js["held_early"], arrays["held_early"] = _pack(self._early)
        blob = np.frombuffer(json.dumps(js, default=json_default).encode(), dtype=np.uint8)
        tmp = self.state_dir / (CHECKPOINT + ".tmp")
        try:
            _write_npz(self.checkpoint_path, tmp, {"__json__": blob, **arrays})
        except OSError as exc:
            # disk full, read-only or vanished state folder: stop (nothing is committed to
            # the broker beyond the last good checkpoint, which is left as it was)
            raise ConsumerError(
                f"cannot write the checkpoint in {self.state_dir}: {exc.strerror or exc}; "
                "the previous checkpoint is intact and the consumer stops (free space or "
                "fix the folder, then restart: it resumes from there)"
            ) from exc
        self._checkpoint_t = time.monotonic()
        return list(js.get("records", []))

    @property
    def moments_path(self) -> Path:
        """The run's moments beside the checkpoint (:data:`MOMENTS`)."""
        return self.state_dir / MOMENTS

    def _save_moments(self, moments: BinMoments | None, records: list[Any]) -> None:
        """Write the run's moments after ``records`` (the checkpoint's) on a background
        thread. ``moments`` is the last snapshot's copy (never changed again); without
        one, a copy of the run's is taken here. A write not started yet is replaced."""
        try:
            if moments is None:
                live = self.pipeline.saved_moments()
                if live is None:
                    return
                moments = live.copy()
            tag = moments_tag(self.pipeline.meta, records)
            if self._moments_pool is None:  # a clean stop waits for it: not lowered
                self._moments_pool = ThreadPoolExecutor(1, thread_name_prefix="moments-save")
            if self._moments_write is not None:
                self._moments_write.cancel()
            self._moments_write = self._moments_pool.submit(
                self._write_moments, moments, len(records), tag
            )
        except Exception:  # the checkpoint stays exact without the file: go on folding
            logger.exception("the moments after %d orientations are not saved", len(records))

    def _write_moments(self, moments: BinMoments, n: int, tag: str) -> None:
        """Write :data:`MOMENTS` atomically. A failure is logged, never raised: the
        checkpoint stays exact without it (a restart computes the moments again)."""
        tmp = self.state_dir / f"{MOMENTS}.{os.getpid()}.{threading.get_ident()}.tmp"
        t0 = time.perf_counter()
        arrays = {"tag": np.array(tag), "records": np.array(n), **moments.arrays(copy=False)}
        try:
            _write_npz(self.moments_path, tmp, arrays)
        except OSError as exc:  # disk full, folder gone: no traceback
            logger.warning(
                "cannot write the moments in %s: %s; the checkpoint stays exact (a restart "
                "computes them again from the angles)",
                self.state_dir,
                exc.strerror or exc,
            )
            return
        except Exception:  # anything else is a bug, logged with its traceback
            logger.exception("cannot write the moments in %s", self.state_dir)
            with suppress(OSError):
                tmp.unlink()
            return
        logger.debug("moments of %d orientations saved in %.2f s", n, time.perf_counter() - t0)

    def flush_moments(self) -> None:
        """Wait for the moments being written (a clean stop leaves them complete)."""
        write = self._moments_write
        if write is not None:
            with suppress(Exception):
                write.result()

    def _load_moments(self, js: dict[str, Any]) -> tuple[BinMoments, int] | None:
        """The saved moments with the number of the checkpoint's orientations they cover;
        None when there are none for this run (a restore then computes them again)."""
        if not self.moments_path.exists():
            return None
        records = list(js.get("records", []))
        try:
            with np.load(self.moments_path) as f:
                n = int(f["records"])
                if n > len(records) or str(f["tag"]) != moments_tag(js.get("meta"), records[:n]):
                    logger.info("%s is of another run or orientations: not used", MOMENTS)
                    return None
                moments = BinMoments.from_arrays({k: f[k] for k in f.files})
        except Exception as exc:  # empty, truncated, not an npz: the file is only a shortcut
            logger.warning("cannot read %s (%s): the moments are computed again", MOMENTS, exc)
            return None
        return None if moments is None else (moments, n)

    def _load(self) -> None:
        # moments being written when a process died (this folder is this service's)
        for stale in self.state_dir.glob(f"{MOMENTS}.*.tmp"):
            with suppress(OSError):
                stale.unlink()
        if not self.checkpoint_path.exists():
            return
        with np.load(self.checkpoint_path) as f:
            js: dict[str, Any] = json.loads(bytes(f["__json__"]).decode())
            arrays = {k: f[k] for k in f.files if k != "__json__"}
        moments = None if "moments_tensor" in arrays else self._load_moments(js)
        self.pipeline.restore(js, arrays, moments=moments)
        if self.pipeline.moments_recomputed:  # the file is made whole again at once
            self._save_moments(None, list(js.get("records", [])))
        self.next_offsets = {(t, int(p)): int(o) for t, p, o in js.get("offsets", [])}
        self.counters = Counter(js.get("counters", {}))
        self.done = bool(js.get("done", False))
        self.finished_runs = list(js.get("finished_runs", []))
        self._bluesky_started = bool(js.get("bluesky_started", False))
        empty = np.zeros(0, np.uint8)
        self._next = _unpack(js.get("held_next", []), arrays.get("held_next", empty))
        self._next_seen = {(m.topic, m.partition) for m in self._next}
        self._early = _unpack(js.get("held_early", []), arrays.get("held_early", empty))
        self.source.seek(self.next_offsets)
        logger.info(
            "resumed from %s: %d orientations, offsets %s",
            self.checkpoint_path,
            len(js.get("records", [])),
            self.next_offsets,
        )

    def summary(self) -> dict[str, object]:
        """Pipeline totals plus the consumer's counters."""
        out = self.pipeline.summary()
        out["counters"] = dict(self.counters)
        out["done"] = self.done
        out["finished_runs"] = list(self.finished_runs)
        if self._fold_seconds:  # this process's orientations: fold + coverage, median
            out["fold_seconds_per_orientation"] = float(np.median(self._fold_seconds))
        return out
