"""A stateless model-server replica: folded snapshots in, FC estimates out, over Kafka.

In the deployed, scaled-out mode the consumers (``steer consume --group
--publish-snapshots``) publish every orientation's cumulative snapshot to
``<prefix>_folded`` (keyed by run id, :class:`consumers.kafka.KafkaSnapshotSink`). Any
number of replicas (``steer model-serve``) share that topic's partitions in the consumer
group ``steer-<prefix>-model``; each snapshot is self-contained (the whole cumulative
I(q, E), its mask, the run's material and the grid fingerprint), so a replica keeps no
state beyond its cached frozen models and any replica can take any snapshot.

Every estimate is published to ``<prefix>_estimates`` as JSON, keyed by run id::

    {"run_id", "material", "orientation", "n_orientations", "omega", "model_version",
     "estimate": Estimate.to_dict(), "replica", "seconds"}

Offsets are committed after the estimate has been acknowledged by the broker, so a replica
that dies loses nothing: the next owner of its partitions estimates the snapshots that were
not committed (an estimate may then be published twice; it is the same estimate, since the
estimator is seeded, and ``(run_id, orientation)`` identifies it). A snapshot that cannot be
estimated (not a snapshot, wrong grid, unknown material, no usable bins) is counted, logged
with its position and dead-lettered to ``<prefix>_deadletter`` with the reason; the replica
goes on.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from consumers.kafka import KafkaDeadLetter, client_security, ensure_topics, to_source_message
from model_server.exceptions import ModelServerError

__all__ = ["ModelReplica", "decode_snapshot"]

logger = logging.getLogger(__name__)

#: The schema header of a snapshot message.
SNAPSHOT_SCHEMA = b"steer-snapshot-npz"
#: Largest snapshot payload accepted, bytes.
MAX_SNAPSHOT_BYTES = 64 << 20


class SnapshotError(ModelServerError, ValueError):
    """A ``<prefix>_folded`` message that is not a usable snapshot."""


def decode_snapshot(payload: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays (``intensity``, ``mask``, ...) and metadata of a snapshot message.

    Raises
    ------
    SnapshotError
        Not an ``.npz`` without pickles, an array missing or of the wrong shape, bad
        metadata.
    """
    if len(payload) > MAX_SNAPSHOT_BYTES:
        raise SnapshotError(f"snapshot of {len(payload)} bytes (limit {MAX_SNAPSHOT_BYTES})")
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as f:
            arrays = {k: np.asarray(f[k]) for k in f.files}
    except Exception as exc:
        raise SnapshotError(f"not an .npz snapshot: {exc}") from exc
    for key in ("intensity", "mask", "meta"):
        if key not in arrays:
            raise SnapshotError(f"snapshot without {key!r}")
    if arrays["intensity"].ndim != 2 or arrays["mask"].shape != arrays["intensity"].shape:
        raise SnapshotError(
            f"intensity {arrays['intensity'].shape} and mask {arrays['mask'].shape} must be "
            "one (n_q, n_E) shape"
        )
    try:
        meta = json.loads(arrays.pop("meta").astype(np.uint8).tobytes().decode())
    except Exception as exc:
        raise SnapshotError(f"snapshot metadata is not JSON: {exc}") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("material"), str):
        raise SnapshotError("snapshot metadata names no material (a consumer older than this?)")
    return arrays, meta


class ModelReplica:
    """One replica of the model server (see the module docstring).

    Parameters
    ----------
    bootstrap, prefix
        Broker and instrument prefix.
    model_dir
        Folder of frozen models, one per material (``<model_dir>/<material lower>``).
    group_id
        Consumer group of the replicas (default ``steer-<prefix>-model``).
    partitions
        Partitions of ``<prefix>_folded`` and ``<prefix>_estimates`` when this replica
        creates them.
    """

    def __init__(
        self,
        bootstrap: str,
        prefix: str,
        model_dir: str | Path = "models",
        *,
        group_id: str | None = None,
        partitions: int = 1,
        session_timeout_ms: int = 6000,
    ) -> None:
        from kafka import KafkaConsumer, KafkaProducer

        self.prefix = prefix
        self.model_dir = Path(model_dir)
        self.in_topic = f"{prefix}_folded"
        self.out_topic = f"{prefix}_estimates"
        ensure_topics(bootstrap, [self.in_topic, self.out_topic], partitions)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._consumer = KafkaConsumer(
            self.in_topic,
            bootstrap_servers=bootstrap,
            group_id=group_id or f"steer-{prefix}-model",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(100, session_timeout_ms // 6),
            max_partition_fetch_bytes=MAX_SNAPSHOT_BYTES,
            fetch_max_bytes=MAX_SNAPSHOT_BYTES,
            **client_security(),
        )
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", **client_security())
        self._dead = KafkaDeadLetter(bootstrap, prefix)
        self._estimators: dict[str, Any] = {}
        self.counters: Counter[str] = Counter()
        self._stop = threading.Event()

    def estimator(self, material: str) -> Any:
        """The cached estimator of a material's frozen model."""
        from model_server.inversion.inference import Estimator

        key = material.lower()
        if key not in self._estimators:
            path = self.model_dir / key
            if not (path / "model.json").exists():
                raise SnapshotError(f"no frozen model for material {material!r} in {path}")
            self._estimators[key] = Estimator(path)
        return self._estimators[key]

    def handle(self, payload: bytes) -> dict[str, Any]:
        """The estimate message of one snapshot payload (raises :class:`SnapshotError`)."""
        t0 = time.perf_counter()
        arrays, meta = decode_snapshot(payload)
        est = self.estimator(str(meta["material"]))
        try:
            estimate = est.estimate(
                arrays["intensity"],
                arrays["mask"].astype(bool),
                grid_fingerprint=meta.get("grid_fingerprint") or None,
            )
        except ModelServerError as exc:
            raise SnapshotError(str(exc)) from exc
        return {
            "run_id": meta.get("run_id"),
            "material": meta["material"],
            "orientation": meta.get("orientation"),
            "n_orientations": meta.get("n_orientations"),
            "omega": meta.get("omega"),
            "model_version": estimate.model_version,
            "estimate": estimate.to_dict(),
            "replica": self.name,
            "seconds": time.perf_counter() - t0,
        }

    def step(self, timeout_s: float = 0.5) -> int:
        """Poll once, estimate and publish what came, commit; returns messages handled."""
        from kafka.structs import OffsetAndMetadata

        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=16)
        n = 0
        offsets = {}
        for tp, records in batches.items():
            for r in records:
                n += 1
                offsets[tp] = OffsetAndMetadata(r.offset + 1, "", -1)
                try:
                    out = self.handle(bytes(r.value or b""))
                except SnapshotError as exc:
                    self.counters["dead_lettered"] += 1
                    logger.warning(
                        "%s[%d]@%d: %s (dead-lettered)", tp.topic, tp.partition, r.offset, exc
                    )
                    self._dead(to_source_message(r), f"snapshot: {exc}")
                    continue
                self.counters["estimates"] += 1
                self._producer.send(self.out_topic, value=json.dumps(out).encode(), key=r.key)
        if offsets:
            # acknowledged estimates first, then the offsets: nothing is lost on a crash
            self._producer.flush()
            self._dead.flush()
            self._consumer.commit(offsets)
        return n

    def run(self, *, idle_exit_s: float | None = None) -> None:
        """Step until SIGTERM (or :meth:`stop`, or ``idle_exit_s`` without a snapshot)."""
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGTERM, lambda *_: self._stop.set()) if main else None
        last = time.monotonic()
        try:
            while not self._stop.is_set():
                if self.step():
                    last = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - last > idle_exit_s:
                    break
        finally:
            if main:
                signal.signal(signal.SIGTERM, old)

    def stop(self) -> None:
        """Ask :meth:`run` to return (any thread)."""
        self._stop.set()

    def close(self) -> None:
        """Leave the group and close the connections."""
        self._consumer.close()
        self._producer.close()
        self._dead.close()

    def summary(self) -> dict[str, object]:
        """Counts so far (JSON-ready)."""
        return {"replica": self.name, **self.counters}
