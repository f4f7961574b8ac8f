"""Following the scaled-out model-server replicas (``steer serve --follow-replicas``).

In the deployed mode the consumers publish every orientation's cumulative snapshot on
``<prefix>_folded`` (:class:`consumers.kafka.KafkaSnapshotSink`) and the stateless
replicas (:mod:`model_server.replica`) publish every estimate as JSON on
``<prefix>_estimates``; both topics are keyed by run id. :class:`ReplicaFollower` reads
the two with a Kafka consumer of its own group (``steer-<prefix>-follow``) and hands what
it reads to a :class:`FollowHandler` (:class:`steering.service.SteeringService` in follow
mode):

* every snapshot: :meth:`FollowHandler.follow_snapshot` (the page's spectrum and
  coverage, the run and its progress);
* every estimate: :meth:`FollowHandler.follow_estimate` (the run history and the page);
* every orientation whose snapshot and estimate have both come, matched by run id and
  orientation count: :meth:`FollowHandler.follow_pair` (the advisor).

Order. A run's snapshots stay in order on one partition of ``<prefix>_folded`` and its
estimates on one of ``<prefix>_estimates``; an orientation is paired when the later of
its two messages comes, so a run's pairs come in order too. What waits for its other half
is bounded (:data:`MAX_PENDING` of each kind; the oldest is dropped, logged and counted).

Offsets are committed after the handler has returned, so a follower that restarts starts
from the committed offsets and sees again at most what it handled but had not committed:
the handler drops the estimates it has already recorded (idempotence is its job, since it
is the one that knows the run history). A snapshot whose orientation was paired before
the restart but whose estimate came after it is not paired again: the next orientation's
advice covers it.

Malformed messages (an estimate that is not JSON or lacks a run id, orientation count or
FC means and standard deviations; a snapshot that names no run) are counted, logged with
their position and dead-lettered to ``<prefix>_deadletter`` with the reason
(:class:`consumers.kafka.KafkaDeadLetter`). A ``<prefix>_folded`` message that is no
snapshot at all is only counted and logged: the replicas dead-letter those already.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from consumers.kafka import KafkaDeadLetter, client_security, ensure_topics, to_source_message
from consumers.kafka.sink import is_run_complete
from consumers.messages import SourceMessage
from consumers.reduction.accumulate import OrientationRecord, Snapshot
from model_server.replica import MAX_SNAPSHOT_BYTES, SnapshotError, decode_snapshot
from steering.exceptions import FollowError

__all__ = ["MAX_PENDING", "FollowHandler", "ReplicaFollower", "check_estimate", "snapshot_of"]

logger = logging.getLogger(__name__)

#: Snapshots (and, apart, estimates) kept while they wait for their other half.
MAX_PENDING = 64


class FollowHandler(Protocol):
    """What the follower hands its messages to (the service in follow mode)."""

    def follow_snapshot(
        self, meta: dict[str, Any], snapshot: Snapshot, record: OrientationRecord
    ) -> None:
        """A run's cumulative snapshot after ``record`` (``meta``: the snapshot's metadata,
        :mod:`consumers.kafka.sink`)."""
        ...

    def follow_estimate(self, message: dict[str, Any]) -> bool:
        """A replica's estimate message (checked by :func:`check_estimate`); False when it
        was already recorded (then it is not paired)."""
        ...

    def follow_pair(
        self,
        meta: dict[str, Any],
        snapshot: Snapshot,
        record: OrientationRecord,
        message: dict[str, Any],
    ) -> None:
        """The snapshot and the estimate of the same orientation of a run."""
        ...

    def follow_run_complete(self, run_id: str, summary: dict[str, Any]) -> None:
        """A consumer says the run is complete (its summary: orientations, events...)."""
        ...


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_estimate(payload: bytes) -> dict[str, Any]:
    """The estimate message of a ``<prefix>_estimates`` payload (layout:
    :mod:`model_server.replica`), checked.

    Raises
    ------
    FollowError
        Not a JSON object; no run id; ``n_orientations`` not an integer >= 1; ``omega`` not
        a finite number (degrees); no ``estimate`` with FCs of finite ``mean`` and ``std``
        >= 0 (eV/A^2).
    """
    try:
        message = json.loads(payload.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FollowError(f"not JSON: {exc}") from exc
    if not isinstance(message, dict):
        raise FollowError(f"a JSON {type(message).__name__}, not an object")
    run_id = message.get("run_id")
    if not isinstance(run_id, str) or not run_id:
        raise FollowError("no run_id (a replica publishes the run id of the snapshot)")
    n = message.get("n_orientations")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise FollowError(f"n_orientations must be an integer >= 1, got {n!r}")
    if not _finite(message.get("omega")):
        raise FollowError(f"omega must be a finite angle in degrees, got {message.get('omega')!r}")
    estimate = message.get("estimate")
    fc = estimate.get("fc") if isinstance(estimate, dict) else None
    if not isinstance(fc, dict) or not fc:
        raise FollowError("no estimate with FCs ('estimate': {'fc': {name: {mean, std}}})")
    for name, value in fc.items():
        if not (
            isinstance(value, dict)
            and _finite(value.get("mean"))
            and _finite(value.get("std"))
            and value["std"] >= 0
        ):
            raise FollowError(f"FC {name!r} needs a finite mean and a finite std >= 0 (eV/A^2)")
    return message


def snapshot_of(arrays: dict[str, Any], meta: dict[str, Any]) -> tuple[Snapshot, OrientationRecord]:
    """The snapshot (without its moments: the follower refines nothing) and the orientation
    record of a decoded ``<prefix>_folded`` message.

    Raises
    ------
    FollowError
        No run id, no orientation index or count, no angle, or an array missing.
    """
    if not isinstance(meta.get("run_id"), str) or not meta["run_id"]:
        raise FollowError("a snapshot of no run (the consumer had no run start?)")
    index, n = meta.get("orientation"), meta.get("n_orientations")
    if not isinstance(index, int) or not isinstance(n, int) or index < 0 or n < 1:
        raise FollowError(f"orientation {index!r} / n_orientations {n!r} must be integers")
    if not _finite(meta.get("omega")):
        raise FollowError(f"omega must be a finite angle in degrees, got {meta.get('omega')!r}")
    missing = [k for k in ("variance", "counts", "exposure") if k not in arrays]
    if missing:
        raise FollowError(f"snapshot without {', '.join(missing)}")
    charge = meta.get("proton_charge")
    omega = float(meta["omega"])
    snapshot = Snapshot(
        intensity=arrays["intensity"],
        variance=arrays["variance"],
        counts=arrays["counts"],
        exposure=arrays["exposure"],
        mask=arrays["mask"].astype(bool),
        n_orientations=n,
    )
    record = OrientationRecord(
        index=index,
        omega=omega,
        proton_charge=float(charge) if isinstance(charge, int | float) and _finite(charge) else 0.0,
        events=0,
        folded=0,
        dropped={},
    )
    return snapshot, record


class ReplicaFollower:
    """Reads ``<prefix>_folded`` and ``<prefix>_estimates`` for a :class:`FollowHandler`
    (see the module docstring).

    Parameters
    ----------
    bootstrap, prefix
        Broker and instrument prefix.
    handler
        Where snapshots, estimates and pairs go.
    group_id
        The follower's consumer group (default ``steer-<prefix>-follow``; two services
        that both follow the replicas need a group each).
    dead_letter
        Where malformed messages go with the reason (default: a
        :class:`~consumers.kafka.KafkaDeadLetter` on ``<prefix>_deadletter``).
    """

    def __init__(
        self,
        bootstrap: str,
        prefix: str,
        handler: FollowHandler,
        *,
        group_id: str | None = None,
        session_timeout_ms: int = 6000,
        dead_letter: Callable[[SourceMessage, str], None] | None = None,
    ) -> None:
        from kafka import KafkaConsumer

        self.prefix = prefix
        self.handler = handler
        self.snapshot_topic = f"{prefix}_folded"
        self.estimate_topic = f"{prefix}_estimates"
        self.group_id = group_id or f"steer-{prefix}-follow"
        ensure_topics(bootstrap, [self.snapshot_topic, self.estimate_topic])
        self._consumer = KafkaConsumer(
            self.snapshot_topic,
            self.estimate_topic,
            bootstrap_servers=bootstrap,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(100, session_timeout_ms // 6),
            max_partition_fetch_bytes=MAX_SNAPSHOT_BYTES,
            fetch_max_bytes=MAX_SNAPSHOT_BYTES,
            **client_security(),
        )
        self._own_dead = dead_letter is None
        self._dead = dead_letter or KafkaDeadLetter(bootstrap, prefix)
        #: (run id, n_orientations) -> what waits for its other half
        self._snapshots: OrderedDict[
            tuple[str, int], tuple[dict[str, Any], Snapshot, OrientationRecord]
        ]
        self._snapshots = OrderedDict()
        self._estimates: OrderedDict[tuple[str, int], dict[str, Any]] = OrderedDict()
        self.counters: Counter[str] = Counter()
        self._stop = threading.Event()

    # -- one message ---------------------------------------------------------------------------

    def handle(self, msg: SourceMessage) -> None:
        """Hand one message of either topic to the handler; a malformed one is counted,
        logged and dead-lettered (never raised)."""
        where = f"{msg.topic}[{msg.partition}]@{msg.offset}"
        try:
            if msg.topic == self.estimate_topic:
                self._on_estimate(check_estimate(msg.payload))
            elif is_run_complete(msg.headers):
                self._on_run_complete(msg.payload)
            else:
                self._on_snapshot(msg.payload)
        except SnapshotError as exc:  # no snapshot at all: the replicas dead-letter those
            self.counters["snapshots_refused"] += 1
            logger.warning("%s: %s (left to the replicas' dead letters)", where, exc)
        except FollowError as exc:
            kind = "estimate" if msg.topic == self.estimate_topic else "snapshot"
            self.counters["dead_lettered"] += 1
            logger.warning(
                "%s: malformed %s: %s (dead-lettered)",
                where,
                kind,
                exc,
                extra={"topic": msg.topic, "partition": msg.partition, "offset": msg.offset},
            )
            self._dead(msg, f"follower: {kind}: {exc}")

    def _on_run_complete(self, payload: bytes) -> None:
        try:
            body = json.loads(payload)
            run_id = str(body["run_id"])
            summary = body.get("summary") or {}
            if not run_id or not isinstance(summary, dict):
                raise ValueError("no run id, or a summary that is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            raise FollowError(f"run-complete message: {exc}") from exc
        self.counters["runs_complete"] += 1
        self.handler.follow_run_complete(run_id, summary)

    def _on_snapshot(self, payload: bytes) -> None:
        arrays, meta = decode_snapshot(payload)
        snapshot, record = snapshot_of(arrays, meta)
        self.counters["snapshots"] += 1
        self.handler.follow_snapshot(meta, snapshot, record)
        key = (str(meta["run_id"]), snapshot.n_orientations)
        message = self._estimates.pop(key, None)
        if message is not None:
            self._pair(meta, snapshot, record, message)
        else:
            self._keep(self._snapshots, key, (meta, snapshot, record), "snapshot")

    def _on_estimate(self, message: dict[str, Any]) -> None:
        if not self.handler.follow_estimate(message):
            self.counters["duplicates"] += 1
            return
        self.counters["estimates"] += 1
        key = (message["run_id"], message["n_orientations"])
        waiting = self._snapshots.pop(key, None)
        if waiting is not None:
            self._pair(*waiting, message)
        else:
            self._keep(self._estimates, key, message, "estimate")

    def _pair(
        self,
        meta: dict[str, Any],
        snapshot: Snapshot,
        record: OrientationRecord,
        message: dict[str, Any],
    ) -> None:
        self.counters["paired"] += 1
        self.handler.follow_pair(meta, snapshot, record, message)

    def _keep(
        self,
        pending: OrderedDict[tuple[str, int], Any],
        key: tuple[str, int],
        value: Any,
        kind: str,
    ) -> None:
        pending[key] = value
        while len(pending) > MAX_PENDING:
            (run_id, n), _ = pending.popitem(last=False)
            self.counters["unpaired_dropped"] += 1
            logger.warning(
                "run %s: the %s after %d orientations waited too long for its other half "
                "(dropped: no advice for that orientation)",
                run_id,
                kind,
                n,
                extra={"run_id": run_id},
            )

    # -- the loop ------------------------------------------------------------------------------

    def step(self, timeout_s: float = 0.5) -> int:
        """Poll once, hand what came to the handler, commit; returns messages read."""
        from kafka.structs import OffsetAndMetadata

        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=64)
        n = 0
        offsets = {}
        for tp, records in batches.items():
            for r in records:
                n += 1
                self.handle(to_source_message(r))
                offsets[tp] = OffsetAndMetadata(r.offset + 1, "", -1)
        if offsets:
            # handled (and dead letters acknowledged) first, then the offsets
            flush = getattr(self._dead, "flush", None)
            if flush is not None:
                flush()
            self._consumer.commit(offsets)
        return n

    def run(self, *, idle_exit_s: float | None = None) -> None:
        """Step until :meth:`stop` (any thread), or ``idle_exit_s`` without a message."""
        last = time.monotonic()
        while not self._stop.is_set():
            if self.step():
                last = time.monotonic()
            elif idle_exit_s is not None and time.monotonic() - last > idle_exit_s:
                break

    def stop(self) -> None:
        """Ask :meth:`run` to return."""
        self._stop.set()

    def close(self) -> None:
        """Leave the group and close the connections."""
        self._consumer.close()
        if self._own_dead:
            close = getattr(self._dead, "close", None)
            if close is not None:
                close()

    def summary(self) -> dict[str, object]:
        """Counts so far (JSON-ready)."""
        return {"group": self.group_id, **self.counters}
