"""Sinks over Kafka: dead letters and folded snapshots.

:class:`KafkaDeadLetter` copies malformed messages to ``<prefix>_deadletter``;
:class:`KafkaSnapshotSink` publishes every folded snapshot to ``<prefix>_folded`` for the
model-server replicas (bound to a run, it is a :class:`~consumers.messages.SnapshotSink`).
Both are thread-safe (kafka-python's producer is), so the lanes of a consumer group share
them.

A snapshot message (:func:`snapshot_payload`) is a compressed ``.npz`` without pickles::

    intensity, variance, counts, exposure   (n_q, n_E) float64
    mask                                    (n_q, n_E) bool
    meta                                    uint8: UTF-8 JSON (below)
    moments_index                           (n_m,) int64, flat bins q * n_E + E
    moments_tensor, moments_tensor_q2       (n_m, 3N, 3N) complex128
    moments_tensor_x                        (n_m, 3N, 3N) complex128
    moments_offset1, moments_offset2        (n_m, 3), (n_m, 3, 3) float64
    moments_weight, moments_background      (n_m,) float64
    moments_n                               () int64, orientations in the moments
    class_counts                            (n_q * n_c, n_E) float64, a run split by zone class

``meta``: ``orientation``, ``omega``, ``proton_charge`` (uC of that orientation),
``n_orientations``, ``grid_fingerprint``, and of the bound run ``run_id``, ``material``,
``temperature_K``, ``ei_meV`` and ``instrument`` (the run start's instrument block, a few
hundred bytes), which is what the replicas' likelihood refinement needs, and
``sample_orientation`` (the run start's ``orientation``: u, v) and ``planned_omegas_deg``,
which is what the advisor of ``steer serve --follow-replicas`` needs for its candidates.
The ``moments_*`` arrays (:class:`consumers.reduction.moments.BinMoments`, only the ``n_m``
bins of weight > 0) are there only when the consumer took moments for the run; for Ge
(200 x 100 bins, 3N = 6) they make the message about 20 MB from the first orientations on
(nearly every bin is reached at once), against about 0.3 MB without them. A message that
would exceed :data:`MAX_SNAPSHOT_PAYLOAD` is published without its moments (logged).

A run split by zone class (:attr:`~consumers.reduction.accumulate.Snapshot.class_counts`)
adds ``class_counts`` and ``n_classes`` (``meta``), and its moments are on the classes'
grid (flat bins ``(q * n_c + c) * n_E + E``): about n_c times the moments' bytes (Ge,
four classes: 50-65 MB from the first orientations on). When that exceeds the limit, the
run's messages carry the path's moments (the classes' sum) from then on, and the replicas
refine the path (warned once a run). ``steer consume`` folds on the path alone; the split
is ``steer serve``'s, whose refinement runs in-process.

After a run's last snapshot, :meth:`KafkaSnapshotSink.run_complete` publishes a
run-complete message on the same topic and key: JSON ``{"run_id", "summary"}`` with header
``schema: steer-run-complete`` (:func:`is_run_complete`); replicas skip it, a service that
follows them marks the run complete.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from consumers.kafka.broker import ensure_topics
from consumers.kafka.config import client_security
from consumers.messages import SnapshotSink, SourceMessage
from simulations.jsonutil import json_default

__all__ = [
    "MAX_SNAPSHOT_PAYLOAD",
    "RUN_COMPLETE_SCHEMA",
    "KafkaDeadLetter",
    "KafkaSnapshotSink",
    "is_run_complete",
    "snapshot_payload",
]

logger = logging.getLogger(__name__)

#: The producers' ``max_request_size``, bytes.
MAX_REQUEST_SIZE = 32 << 20
#: Largest snapshot message published with its moments, bytes (1 MB below the request size
#: for the record's framing and headers).
MAX_SNAPSHOT_PAYLOAD = MAX_REQUEST_SIZE - (1 << 20)


class KafkaDeadLetter:
    """Copies malformed messages to ``<prefix>_deadletter`` with the reason and origin."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        from kafka import KafkaProducer

        self.topic = f"{prefix}_deadletter"
        ensure_topics(bootstrap, [self.topic])
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap, max_request_size=MAX_REQUEST_SIZE, **client_security()
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

    Payload: :func:`snapshot_payload`, an ``.npz`` (no pickle) with header ``schema:
    steer-snapshot-npz``. Bound to a run, the message key is the run id, so a run's
    snapshots stay in order on one partition (model-server replicas,
    :mod:`model_server.replica`, share the partitions).
    """

    def __init__(self, bootstrap: str, prefix: str, *, grid_fingerprint: str = "") -> None:
        from kafka import KafkaProducer

        self.topic = f"{prefix}_folded"
        self.grid_fingerprint = grid_fingerprint
        #: runs whose zone classes did not fit a message: published with the path's
        #: moments from then on (warned once)
        self._path_only: set[str | None] = set()
        ensure_topics(bootstrap, [self.topic])
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap, max_request_size=MAX_REQUEST_SIZE, **client_security()
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
        split = getattr(snapshot, "class_counts", None) is not None
        classes = split and run_id not in self._path_only
        payload = snapshot_payload(
            snapshot, record, run, grid_fingerprint=self.grid_fingerprint, classes=classes
        )
        if len(payload) > MAX_SNAPSHOT_PAYLOAD and classes:
            logger.warning(
                "run %s: snapshot %d of %d bytes with its zone classes (limit %d); this run's "
                "snapshots are published with the path's moments (the model servers refine "
                "the path)",
                run_id,
                record.index,
                len(payload),
                MAX_SNAPSHOT_PAYLOAD,
                extra={"run_id": run_id, "topic": self.topic},
            )
            self._path_only.add(run_id)
            payload = snapshot_payload(
                snapshot, record, run, grid_fingerprint=self.grid_fingerprint, classes=False
            )
        if len(payload) > MAX_SNAPSHOT_PAYLOAD and getattr(snapshot, "moments", None) is not None:
            logger.warning(
                "run %s: snapshot %d of %d bytes with its moments (limit %d); published "
                "without them (the model servers fall back to the VAE's estimate)",
                run_id,
                record.index,
                len(payload),
                MAX_SNAPSHOT_PAYLOAD,
                extra={"run_id": run_id, "topic": self.topic},
            )
            payload = snapshot_payload(
                snapshot,
                record,
                run,
                grid_fingerprint=self.grid_fingerprint,
                moments=False,
                classes=False,
            )
        self._producer.send(
            self.topic,
            value=payload,
            key=None if run_id is None else run_id.encode(),
            headers=[("schema", b"steer-snapshot-npz")],
        )

    def run_complete(self, summary: dict[str, Any], _acc: Any = None) -> None:
        """Publish that a run is complete (the consumer's ``on_run_complete``): JSON
        ``{"run_id", "summary"}`` keyed by the run id, after its last snapshot on the same
        partition, with header ``schema: steer-run-complete`` (model servers skip it; a
        service following them marks the run complete)."""
        run_id = str(summary.get("run_id") or "")
        body = {"run_id": run_id, "summary": {k: v for k, v in summary.items() if k != "path"}}
        self._producer.send(
            self.topic,
            value=json.dumps(body, default=json_default).encode(),
            key=run_id.encode() or None,
            headers=[("schema", RUN_COMPLETE_SCHEMA)],
        )
        self._producer.flush()

    def close(self) -> None:
        """Flush what was sent and close the producer."""
        self._producer.flush()
        self._producer.close()


#: header ``schema`` of the run-complete message on ``<prefix>_folded``
RUN_COMPLETE_SCHEMA = b"steer-run-complete"


def is_run_complete(headers: Any) -> bool:
    """Whether a ``<prefix>_folded`` message (its headers) is a run-complete message."""
    return any(k == "schema" and bytes(v or b"") == RUN_COMPLETE_SCHEMA for k, v in headers or ())


def snapshot_payload(
    snapshot: Any,
    record: Any,
    run: dict[str, Any] | None = None,
    *,
    grid_fingerprint: str = "",
    moments: bool = True,
    classes: bool = True,
) -> bytes:
    """The ``.npz`` message of one snapshot (layout in the module docstring).

    Parameters
    ----------
    snapshot
        A :class:`consumers.reduction.accumulate.Snapshot` (its ``moments`` may be None).
    record
        The orientation just completed (``index``, ``omega``).
    run
        The run's metadata (pl72, with ``grid_fingerprint``), or None.
    grid_fingerprint
        Used when ``run`` carries none.
    moments
        Include the snapshot's moments (when it has them).
    classes
        Send a split run's zone classes (``class_counts``, moments on their grid); off,
        the path's moments (their sum over classes).
    """
    run = run or {}
    meta = {
        "orientation": record.index,
        "omega": record.omega,
        "proton_charge": getattr(record, "proton_charge", None),
        "n_orientations": snapshot.n_orientations,
        "grid_fingerprint": run.get("grid_fingerprint") or grid_fingerprint,
        "run_id": str(run.get("run_id", "")) or None,
        "material": run.get("material"),
        "temperature_K": run.get("temperature_K"),
        "ei_meV": run.get("ei_meV"),
        "instrument": run.get("instrument"),
        "sample_orientation": run.get("orientation"),
        "planned_omegas_deg": run.get("planned_omegas_deg"),
    }
    arrays: dict[str, Any] = {
        "intensity": snapshot.intensity,
        "variance": snapshot.variance,
        "counts": snapshot.counts,
        "exposure": snapshot.exposure,
        "mask": snapshot.mask,
        "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
    }
    bin_moments = getattr(snapshot, "moments", None)
    class_counts = getattr(snapshot, "class_counts", None)
    if class_counts is not None and classes:
        arrays["class_counts"] = class_counts
        meta["n_classes"] = int(snapshot.n_classes)
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    elif class_counts is not None and bin_moments is not None and moments:
        bin_moments = bin_moments.merge_classes(int(snapshot.n_classes), class_counts.shape[1])
    if moments and bin_moments is not None:
        arrays.update(_moment_arrays(bin_moments))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _moment_arrays(moments: Any) -> dict[str, np.ndarray]:
    """``moments_*`` arrays of the bins of weight > 0 (``moments_index``: their flat bins)."""
    full = moments.arrays(prefix="")
    index = np.flatnonzero(full["weight"] > 0).astype(np.int64)
    out = {"moments_index": index}
    for name, values in full.items():
        out[f"moments_{name}"] = values if values.ndim == 0 else values[index]
    return out
