"""The live consumer: a steppable service around :class:`~consumers.pipeline.RunPipeline`.

Each :meth:`ConsumerService.step` polls the source once. Every message is checked against
the offsets already consumed (a re-delivered topic/partition/offset is counted and
ignored), fed to the pipeline, and a malformed one is counted, logged with its position and
handed to the dead-letter sink; nothing stops the consumer. After every completed
orientation the whole state (accumulators, segmentation buffers, counters and the next
offsets) is written to one checkpoint file atomically (write, fsync, rename), and only then
are the offsets committed to the broker. A restarted service loads the checkpoint and seeks
to its offsets, so no event is lost or counted twice.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from simulations.jsonutil import json_default

from . import metrics
from .accumulate import OrientationRecord, Snapshot
from .kafka import MessageSource, SourceMessage
from .pipeline import MalformedMessage, RunPipeline, schema_of

__all__ = ["ConsumerService", "SnapshotSink"]

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.npz"


class SnapshotSink(Protocol):
    """Where folded snapshots go: an in-process model server (embedded mode) or a topic
    (:class:`consumers.kafka.KafkaSnapshotSink`, deployed mode)."""

    def __call__(self, snapshot: Snapshot, record: OrientationRecord) -> None:
        """Called after every completed orientation with the cumulative spectrum."""
        ...


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
    ) -> None:
        self.source = source
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.pipeline = RunPipeline(mode=mode, tolerance=tolerance)
        self.on_snapshot = on_snapshot
        self.dead_letter = dead_letter
        self.next_offsets: dict[tuple[str, int], int] = {}
        self.counters: Counter[str] = Counter()
        self.done = False
        self._stop_requested = False
        self._moving_seen = 0
        self._early: list[SourceMessage] = []
        #: messages held while waiting for the run start (pl72); beyond it they are refused
        self.early_limit = 200_000
        self._load()

    # -- loop --------------------------------------------------------------------------------

    def step(self, max_records: int = 5000, timeout_s: float = 0.5) -> int:
        """Poll once and process what came; returns the number of messages handled."""
        msgs = self.source.consume(max_records, timeout_s)
        completed: list[OrientationRecord] = []
        for m in msgs:
            key = (m.topic, m.partition)
            if m.offset < self.next_offsets.get(key, 0):
                self.counters["duplicates"] += 1
                metrics.MESSAGES_DUPLICATE.inc()
                continue
            self.next_offsets[key] = m.offset + 1
            self.counters["messages"] += 1
            metrics.MESSAGES.labels(m.topic).inc()
            schema = schema_of(m.headers, m.payload)
            # topics arrive in any order: hold what precedes the run start (bounded)
            if (
                self.pipeline.meta is None
                and schema != "pl72"
                and len(self._early) < self.early_limit
            ):
                self._early.append(m)
                continue
            completed += self._handle(m, schema)
            if self._early and self.pipeline.meta is not None:
                early, self._early = self._early, []
                for e in early:
                    completed += self._handle(e, schema_of(e.headers, e.payload))
        became_done = False
        if self.pipeline.stopped and not self.done and self.source.caught_up(self.next_offsets):
            completed += self.pipeline.finish()
            self.done = became_done = True
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
        if completed or became_done:
            self._checkpoint()
            self.source.commit(self.next_offsets)
            if self.on_snapshot is not None and self.pipeline.acc is not None:
                snap = self.pipeline.acc.snapshot()
                for rec in completed:
                    try:
                        self.on_snapshot(snap, rec)
                    except Exception:
                        logger.exception("snapshot hand-off failed (orientation %d)", rec.index)
        return len(msgs)

    def _handle(self, m: SourceMessage, schema: str) -> list[OrientationRecord]:
        """One message through the pipeline; bad ones are counted and dead-lettered."""
        where = f"{m.topic}[{m.partition}]@{m.offset}"
        try:
            t0 = time.perf_counter()
            n0 = self.pipeline.n_events
            done = self.pipeline.handle(schema, m.payload, m.timestamp_ns, m.key)
            metrics.EVENTS_CONSUMED.inc(self.pipeline.n_events - n0)
            if done:
                metrics.FOLD_SECONDS.observe(time.perf_counter() - t0)
            return done
        except MalformedMessage as exc:
            reason = exc.reason
            logger.warning(
                "%s: malformed message dead-lettered: %s",
                where,
                exc,
                extra={"topic": m.topic, "partition": m.partition, "offset": m.offset},
            )
        except Exception:  # never stop the consumer; say loudly what happened
            reason = "internal_error"
            logger.exception("%s: message could not be processed", where)
        self.counters[f"malformed_{reason}"] += 1
        metrics.MESSAGES_MALFORMED.labels(reason).inc()
        if self.dead_letter is not None:
            try:
                self.dead_letter(m, reason)
            except Exception:
                logger.exception("%s: dead-lettering failed", where)
        return []

    def run(self, *, idle_exit_s: float | None = None) -> None:
        """Step until the run is complete (or SIGTERM, or ``idle_exit_s`` without input)."""
        old = signal.signal(signal.SIGTERM, self._request_stop)
        last = time.monotonic()
        try:
            while not self.done and not self._stop_requested:
                if self.step():
                    last = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - last > idle_exit_s:
                    break
        finally:
            signal.signal(signal.SIGTERM, old)

    def _request_stop(self, *_: object) -> None:
        self._stop_requested = True

    # -- checkpoints -------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        """The checkpoint file."""
        return self.state_dir / CHECKPOINT

    def _checkpoint(self) -> None:
        js, arrays = self.pipeline.state()
        js["offsets"] = [[t, p, o] for (t, p), o in self.next_offsets.items()]
        js["counters"] = dict(self.counters)
        js["done"] = self.done
        blob = np.frombuffer(json.dumps(js, default=json_default).encode(), dtype=np.uint8)
        tmp = self.state_dir / (CHECKPOINT + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, __json__=blob, **arrays)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.checkpoint_path)

    def _load(self) -> None:
        if not self.checkpoint_path.exists():
            return
        with np.load(self.checkpoint_path) as f:
            js: dict[str, Any] = json.loads(bytes(f["__json__"]).decode())
            arrays = {k: f[k] for k in f.files if k != "__json__"}
        self.pipeline.restore(js, arrays)
        self.next_offsets = {(t, int(p)): int(o) for t, p, o in js.get("offsets", [])}
        self.counters = Counter(js.get("counters", {}))
        self.done = bool(js.get("done", False))
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
        return out
