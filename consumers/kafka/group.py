"""Scale-out: consumer processes in one Kafka consumer group share a prefix's partitions.

A facility that outgrows one consumer runs several ``steer consume --group`` processes (on
one machine or many) with one shared state folder. Every message of a run carries the run
id as its key, so Kafka's default partitioner puts the whole run (events, motion, run info,
bluesky documents) on the same partition number of every topic, provided the topics have
the same number of partitions. The group's members divide those partition numbers between
them with Kafka's own group protocol (range assignment, which gives a member the same
numbers on every topic), and each member folds its partitions as *lanes*: one
:class:`~consumers.service.ConsumerService` per partition number, reading only that
partition of each topic, with its own checkpoint in ``<state root>/partition-<p>/``.

When a member leaves (stopped, or killed: the broker notices when its session times out)
the group rebalances and another member is given its partitions. It loads the lane's
checkpoint from the shared folder and goes on from the checkpointed offsets, so nothing is
lost or counted twice: this is the same resume path as a restart of a single consumer.

Correctness rests on two things. With Kafka's eager rebalancing, a member stops and
checkpoints the lanes of its revoked partitions inside the revocation callback, before it
rejoins, and no member is given partitions before all have rejoined; and a lane holds an
exclusive lock on its folder (``fcntl.flock``, which is released by the kernel when its
process dies), so two processes never write one checkpoint even if the group were wrong.
The shared folder must support ``flock`` across the members (a local disk, or a network
file system that does, e.g. CephFS or NFSv4 with locking).

The group membership consumer reads nothing itself: its partitions stay paused, and it
only polls to take part in the group (heartbeats, rebalances). Each lane reads with its
own consumer by manual assignment and commits its offsets (after every checkpoint) under
the group id ``<group>-lanes``, so that the usual tools show each partition's lag.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kafka import ConsumerRebalanceListener

from consumers.exceptions import ConsumerError
from consumers.kafka.broker import ensure_topics
from consumers.kafka.config import client_security, topics_for
from consumers.kafka.sink import KafkaSnapshotSink
from consumers.kafka.source import KafkaSource
from consumers.messages import SourceMessage
from consumers.service import ConsumerService
from consumers.streams import InstrumentConfig

__all__ = ["LANE_PREFIX", "GroupConsumer", "lane_dir"]

logger = logging.getLogger(__name__)

#: A lane's folder under the state root: ``partition-<p>``.
LANE_PREFIX = "partition-"
#: Longest wait (s) for another process to release a lane's folder after a rebalance.
LOCK_WAIT_S = 60.0


def lane_dir(state_root: str | Path, partition: int) -> Path:
    """The state folder of partition number ``partition`` under ``state_root``."""
    return Path(state_root) / f"{LANE_PREFIX}{int(partition)}"


@dataclass
class _Lane:
    """One partition number being folded by this process."""

    partition: int
    folder: Path
    lock: IO[str]
    service: ConsumerService
    thread: threading.Thread
    error: list[BaseException] = field(default_factory=list)


class GroupConsumer:
    """Fold the partitions a consumer group gives this process, one lane per partition.

    Parameters
    ----------
    bootstrap, prefix
        Broker and instrument prefix (topics ``<prefix>_runInfo`` ... of
        :func:`~consumers.kafka.config.topics_for`).
    state_root
        Folder shared by all members; lane ``p`` keeps its checkpoint and its completed
        runs (``runs/<run id>.h5``) in ``partition-<p>/``.
    group_id
        The consumer group (default ``steer-<prefix>``).
    partitions
        Partitions of the topics when this process has to create them (existing topics
        are used as they are).
    mode, tolerance
        Passed to every lane's :class:`~consumers.service.ConsumerService`.
    dead_letter
        Shared by the lanes (called from their threads: must be thread-safe, as the
        Kafka sinks of :mod:`consumers.kafka.sink` are).
    snapshots
        Where the lanes publish their snapshots (bound to each lane's run), or None.
    session_timeout_ms
        How long the broker waits for a silent member before it gives its partitions to
        the others (a killed member is noticed after this).
    """

    def __init__(
        self,
        bootstrap: str,
        prefix: str,
        state_root: str | Path,
        *,
        group_id: str | None = None,
        partitions: int = 1,
        mode: str = "auto",
        tolerance: float = 0.05,
        dead_letter: Callable[[SourceMessage, str], None] | None = None,
        snapshots: KafkaSnapshotSink | None = None,
        session_timeout_ms: int = 6000,
        streams: InstrumentConfig | None = None,
    ) -> None:
        from kafka import KafkaConsumer
        from kafka.coordinator.assignors.range import RangePartitionAssignor

        self.bootstrap = bootstrap
        self.prefix = prefix
        self.state_root = Path(state_root)
        try:
            self.state_root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConsumerError(
                f"state folder {self.state_root} cannot be created: {exc.strerror or exc}"
            ) from exc
        self.group_id = group_id or f"steer-{prefix}"
        self.mode = mode
        self.tolerance = float(tolerance)
        self.dead_letter = dead_letter
        self.snapshots = snapshots
        #: which (topic, source) is which; its topics replace the prefix's four
        self.streams = streams
        self.topics = streams.topics() if streams is not None else topics_for(prefix)
        ensure_topics(bootstrap, self.topics, partitions)
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(100, session_timeout_ms // 6),
            partition_assignment_strategy=(RangePartitionAssignor,),
            # a run start with the nexus_structure of a 102,400-pixel array is ~9 MB: the
            # same limits as KafkaSource's (kafka-python's default is 1 MB a partition)
            max_partition_fetch_bytes=16 << 20,
            fetch_max_bytes=64 << 20,
            **client_security(),
        )
        counts = {t: len(self._consumer.partitions_for_topic(t) or ()) for t in self.topics}
        if len(set(counts.values())) != 1:
            self._consumer.close()
            raise ConsumerError(
                "the run topics of a prefix must have the same number of partitions (a run's "
                f"messages share a partition number on every topic); they have {counts}"
            )
        self.n_partitions = next(iter(counts.values()))
        self.lanes: dict[int, _Lane] = {}
        #: partition numbers given to this member by the last rebalance
        self.assigned: set[int] = set()
        #: every partition number this process has folded, in the order it took them
        self.history: list[int] = []
        self.rebalances = 0
        self._stop = threading.Event()
        # the rebalance callbacks run on kafka-python's IO thread: lanes change under a lock
        self._lanes_lock = threading.RLock()
        self._consumer.subscribe(self.topics, listener=_Listener(self))

    # -- rebalance callbacks (on the polling thread, inside poll) ----------------------------

    def _revoked(self, revoked: list[Any]) -> None:
        numbers = sorted({tp.partition for tp in revoked})
        logger.info("group %s: partitions %s revoked", self.group_id, numbers)
        with self._lanes_lock:
            self.assigned = set()
            for p in list(self.lanes):
                self._stop_lane(p)

    def _assigned(self, assigned: list[Any]) -> None:
        self.rebalances += 1
        if assigned:
            self._consumer.pause(*assigned)  # the lanes read; this consumer only takes part
        by_number: dict[int, set[str]] = {}
        for tp in assigned:
            by_number.setdefault(tp.partition, set()).add(tp.topic)
        whole = {p for p, topics in by_number.items() if topics == set(self.topics)}
        for p in sorted(set(by_number) - whole):
            logger.error(
                "group %s: partition %d is assigned on %s only, not on every run topic; it is "
                "not folded here (check that every member uses range assignment)",
                self.group_id,
                p,
                sorted(by_number[p]),
            )
        with self._lanes_lock:
            self.assigned = whole
        logger.info("group %s: partitions %s assigned", self.group_id, sorted(whole))

    # -- lanes -------------------------------------------------------------------------------

    def _lock(self, folder: Path) -> IO[str] | None:
        """The folder's lock, or None while another process holds it."""
        fh = open(folder / ".lock", "a+")  # noqa: SIM115 (held for the lane's life)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return None
        return fh

    def _start_lane(self, p: int, deadline: float) -> bool:
        folder = lane_dir(self.state_root, p)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = self._lock(folder)
        except OSError as exc:
            raise ConsumerError(
                f"lane folder {folder} cannot be used: {exc.strerror or exc}"
            ) from exc
        if lock is None:
            if time.monotonic() > deadline:
                raise ConsumerError(
                    f"{folder} is still locked by another process {LOCK_WAIT_S:.0f} s after "
                    f"partition {p} was assigned here (two members folding one partition?)"
                )
            return False
        try:
            source = KafkaSource(
                self.bootstrap,
                self.prefix,
                group_id=f"{self.group_id}-lanes",
                partitions=[p],
                topics=self.topics,
            )
            try:
                service = ConsumerService(
                    source,
                    folder,
                    mode=self.mode,
                    tolerance=self.tolerance,
                    streams=self.streams,
                    dead_letter=self.dead_letter,
                    follow=True,
                )
                if self.snapshots is not None:
                    service.set_snapshot_sink(self.snapshots.bind(service.run_info))
                    service.on_run_complete = self.snapshots.run_complete
            except BaseException:
                source.close()
                raise
        except BaseException:
            lock.close()
            raise
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        (folder / "owner.json").write_text(json.dumps(owner))
        lane = _Lane(p, folder, lock, service, threading.Thread(), [])
        lane.thread = threading.Thread(target=self._lane_main, args=(lane,), name=f"lane-{p}")
        lane.thread.daemon = True
        self.lanes[p] = lane
        self.history.append(p)
        lane.thread.start()
        logger.info("group %s: folding partition %d in %s", self.group_id, p, folder)
        return True

    @staticmethod
    def _lane_main(lane: _Lane) -> None:
        try:
            lane.service.run()
        except BaseException as exc:  # reported by the polling loop, which stops the process
            lane.error.append(exc)

    def _stop_lane(self, p: int) -> None:
        """Stop lane ``p``: what it folds is checkpointed, its folder unlocked."""
        lane = self.lanes.pop(p)
        lane.service.request_stop()
        lane.thread.join()
        try:
            lane.service.source.close()  # type: ignore[attr-defined]
        except Exception:
            logger.exception("closing the consumer of partition %d", p)
        lane.lock.close()
        logger.info("group %s: partition %d stopped and checkpointed", self.group_id, p)

    # -- loop --------------------------------------------------------------------------------

    def run(self, *, idle_exit_s: float | None = None, poll_s: float = 0.2) -> None:
        """Take part in the group until SIGTERM (or :meth:`stop`, or ``idle_exit_s`` without
        a lane handling a message); lanes that fail stop the process with their error."""
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGTERM, lambda *_: self._stop.set()) if main else None
        pending: dict[int, float] = {}
        last = time.monotonic()
        seen = 0
        try:
            while not self._stop.is_set():
                self._consumer.poll(timeout_ms=int(poll_s * 1000))
                with self._lanes_lock:
                    for p in sorted(self.assigned - set(self.lanes)):
                        deadline = pending.setdefault(p, time.monotonic() + LOCK_WAIT_S)
                        if self._start_lane(p, deadline):
                            pending.pop(p, None)
                    for p in list(pending):
                        if p not in self.assigned:
                            pending.pop(p)
                for lane in list(self.lanes.values()):
                    if lane.error:
                        raise ConsumerError(
                            f"partition {lane.partition} stopped: {lane.error[0]}"
                        ) from lane.error[0]
                handled = sum(sum(x.service.next_offsets.values()) for x in self.lanes.values())
                if handled != seen:
                    seen, last = handled, time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - last > idle_exit_s:
                    break
        finally:
            with self._lanes_lock:
                for p in list(self.lanes):
                    try:
                        self._stop_lane(p)
                    except Exception:
                        logger.exception("stopping partition %d", p)
            self._consumer.close()  # leaves the group: the others rebalance at once
            if main:
                signal.signal(signal.SIGTERM, old)

    def stop(self) -> None:
        """Ask :meth:`run` to return (any thread)."""
        self._stop.set()

    def summary(self) -> dict[str, object]:
        """What this process folded, per partition number (JSON-ready)."""
        runs: dict[str, list[str]] = {}
        for p in sorted(set(self.history)):
            folder = lane_dir(self.state_root, p)
            runs[str(p)] = sorted(x.stem for x in (folder / "runs").glob("*.h5"))
        return {
            "group": self.group_id,
            "partitions": self.n_partitions,
            "assigned": sorted(self.assigned),
            "folded_partitions": self.history,
            "rebalances": self.rebalances,
            "runs": runs,
        }


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """kafka-python's rebalance listener, forwarding to the :class:`GroupConsumer`."""

    def __init__(self, owner: GroupConsumer) -> None:
        self.owner = owner

    def on_partitions_revoked(self, revoked: list[Any]) -> None:
        self.owner._revoked(revoked)

    def on_partitions_assigned(self, assigned: list[Any]) -> None:
        self.owner._assigned(assigned)
