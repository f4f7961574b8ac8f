"""Results on ``<prefix>_livedata`` as da00 data arrays (:mod:`consumers.livedata`) for the
facility's dashboards: every snapshot's I(q, E) and exposure, and every force-constant
estimate, under the stable source names :data:`~consumers.livedata.IQE_SOURCE`,
:data:`~consumers.livedata.IQE_COVERAGE_SOURCE` and
:data:`~consumers.livedata.FC_ESTIMATE_SOURCE`. Messages are keyed by the source name (a
source stays in order on one partition) and carry the header ``schema: da00``.

Publishing is best effort: a message that cannot be encoded or sent is logged and counted
in :attr:`KafkaLivedataSink.failures`, and never stops the consumer or the steering loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from consumers.kafka.broker import ensure_topics
from consumers.kafka.config import client_security
from consumers.livedata import FC_ESTIMATE_SOURCE, estimate_da00, snapshot_da00
from consumers.messages import SnapshotSink
from simulations.lattice.grid import Grid, PowderGrid

__all__ = ["KafkaLivedataSink"]

logger = logging.getLogger(__name__)

#: The producer's ``max_request_size``, bytes (an I(q, E) of 200 x 100 bins is 0.3 MB).
MAX_REQUEST_SIZE = 16 << 20


def _material_grid(meta: Mapping[str, Any]) -> Grid | PowderGrid:
    """The grid the consumer folds a run onto: the material's, or for a powder run its
    powder grid at the run's Ei."""
    from simulations.lattice.materials import setup

    ms = setup(str(meta["material"]))
    if meta.get("sample_kind") == "powder":
        return ms.powder_grid(float(meta["ei_meV"]))
    return ms.grid


class KafkaLivedataSink:
    """Publishes snapshots and estimates as da00 to ``<prefix>_livedata``.

    Parameters
    ----------
    bootstrap, prefix
        The broker and the topic prefix.
    grid_of
        The (q, E) grid of a run, from its run-start metadata (default: the material's
        grid, as the consumer folds it), cached per material.
    """

    def __init__(
        self,
        bootstrap: str,
        prefix: str,
        *,
        grid_of: Callable[[Mapping[str, Any]], Grid | PowderGrid] = _material_grid,
    ) -> None:
        from kafka import KafkaProducer

        self.topic = f"{prefix}_livedata"
        self._grid_of = grid_of
        self._grids: dict[tuple[str, str, float], Grid | PowderGrid] = {}
        self._lock = threading.Lock()
        #: messages that could not be encoded or sent
        self.failures = 0
        ensure_topics(bootstrap, [self.topic])
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap, max_request_size=MAX_REQUEST_SIZE, **client_security()
        )

    def bind(self, run: Callable[[], dict[str, Any] | None]) -> SnapshotSink:
        """A snapshot sink for one consumer: ``run()`` gives its current run's metadata."""

        def sink(snapshot: Any, record: Any) -> None:
            self.snapshot(snapshot, run() or {})

        return sink

    def snapshot(self, snapshot: Any, run: Mapping[str, Any]) -> None:
        """Publish the I(q, E) and exposure of one snapshot of run ``run`` (pl72 metadata)."""
        run_id = str(run.get("run_id", ""))
        try:
            key = (
                str(run["material"]),
                str(run.get("sample_kind", "single_crystal")),
                float(run.get("ei_meV", 0.0)) if run.get("sample_kind") == "powder" else 0.0,
            )
            with self._lock:
                grid = self._grids.get(key)
                if grid is None:
                    grid = self._grids[key] = self._grid_of(run)
            messages = snapshot_da00(snapshot, grid, run_id=run_id, timestamp_ns=time.time_ns())
        except Exception:
            self._failed("snapshot", run_id)
            return
        for source, payload in messages.items():
            self._send(source, payload, run_id)

    def estimate(self, message: Mapping[str, Any]) -> None:
        """Publish one estimate message (``run_id``, ``n_orientations``, ``estimate``)."""
        run_id = str(message.get("run_id", ""))
        try:
            payload = estimate_da00(message, timestamp_ns=time.time_ns())
        except Exception:
            self._failed("estimate", run_id)
            return
        self._send(FC_ESTIMATE_SOURCE, payload, run_id)

    def _send(self, source: str, payload: bytes, run_id: str) -> None:
        try:
            self._producer.send(
                self.topic, value=payload, key=source.encode(), headers=[("schema", b"da00")]
            )
        except Exception:
            self._failed(source, run_id)

    def _failed(self, what: str, run_id: str) -> None:
        self.failures += 1
        logger.exception(
            "run %s: %s not published on %s",
            run_id,
            what,
            self.topic,
            extra={"run_id": run_id, "topic": self.topic},
        )

    def flush(self) -> None:
        """Wait until every message sent so far is acknowledged."""
        self._producer.flush()

    def close(self) -> None:
        """Flush what was sent and close the producer."""
        self._producer.flush()
        self._producer.close()
