"""Sinks over Kafka: dead letters and folded snapshots.

:class:`KafkaDeadLetter` copies malformed messages to ``<prefix>_deadletter``;
:class:`KafkaSnapshotSink` publishes every folded snapshot to ``<prefix>_folded`` for the
model-server replicas (bound to a run, it is a :class:`~consumers.messages.SnapshotSink`).
Both are thread-safe (kafka-python's producer is), so the lanes of a consumer group share
them.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from consumers.kafka.broker import ensure_topics
from consumers.kafka.config import client_security
from consumers.messages import SnapshotSink, SourceMessage

__all__ = ["KafkaDeadLetter", "KafkaSnapshotSink"]


class KafkaDeadLetter:
    """Copies malformed messages to ``<prefix>_deadletter`` with the reason and origin."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        from kafka import KafkaProducer

        self.topic = f"{prefix}_deadletter"
        ensure_topics(bootstrap, [self.topic])
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap, max_request_size=32 << 20, **client_security()
        )

    def __call__(self, msg: SourceMessage, reason: str) -> None:
        headers = [
            ("reason", reason.encode()),
            ("source_topic", msg.topic.encode()),
            ("source_partition", str(msg.partition).encode()),
            ("source_offset", str(msg.offset).encode()),
            *msg.headers,
        ]
        self._producer.send(self.topic, value=msg.payload, key=msg.key, headers=headers)

    def flush(self) -> None:
        """Wait until every dead letter sent so far is acknowledged."""
        self._producer.flush()

    def close(self) -> None:
        """Flush what was sent and close the producer."""
        self._producer.flush()
        self._producer.close()


class KafkaSnapshotSink:
    """Publishes each folded snapshot to ``<prefix>_folded`` for model servers (deployed mode).

    Payload: an ``.npz`` (no pickle) with ``intensity``, ``variance``, ``counts``,
    ``exposure``, ``mask`` and a JSON ``meta`` (orientation index, omega, orientations so
    far, grid fingerprint, and with :meth:`bind` the run id, material and temperature),
    header ``schema: steer-snapshot-npz``. Bound to a run, the message key is the run id,
    so a run's snapshots stay in order on one partition (model-server replicas,
    :mod:`model_server.replica`, share the partitions).
    """

    def __init__(self, bootstrap: str, prefix: str, *, grid_fingerprint: str = "") -> None:
        from kafka import KafkaProducer

        self.topic = f"{prefix}_folded"
        self.grid_fingerprint = grid_fingerprint
        ensure_topics(bootstrap, [self.topic])
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap, max_request_size=32 << 20, **client_security()
        )

    def bind(self, run: Callable[[], dict[str, Any] | None]) -> SnapshotSink:
        """A sink for one consumer: ``run()`` gives its current run's metadata (pl72)."""

        def sink(snapshot: Any, record: Any) -> None:
            self(snapshot, record, run=run())

        return sink

    def __call__(self, snapshot: Any, record: Any, run: dict[str, Any] | None = None) -> None:
        """Publish one snapshot (with the run's metadata ``run``, when given)."""
        run = run or {}
        run_id = str(run.get("run_id", "")) or None
        meta = {
            "orientation": record.index,
            "omega": record.omega,
            "n_orientations": snapshot.n_orientations,
            "grid_fingerprint": run.get("grid_fingerprint") or self.grid_fingerprint,
            "run_id": run_id,
            "material": run.get("material"),
            "temperature_K": run.get("temperature_K"),
        }
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            intensity=snapshot.intensity,
            variance=snapshot.variance,
            counts=snapshot.counts,
            exposure=snapshot.exposure,
            mask=snapshot.mask,
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        )
        self._producer.send(
            self.topic,
            value=buf.getvalue(),
            key=None if run_id is None else run_id.encode(),
            headers=[("schema", b"steer-snapshot-npz")],
        )

    def close(self) -> None:
        """Flush what was sent and close the producer."""
        self._producer.flush()
        self._producer.close()
