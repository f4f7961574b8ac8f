"""The transport-neutral seam of the consumers: messages in, snapshots out.

The core (:mod:`consumers.reduction.pipeline`, :mod:`consumers.service`) sees a transport
only through these small types, so it runs on a fake in unit tests and on a real broker
(:mod:`consumers.kafka`) or a 0MQ proxy (:mod:`consumers.zmq`) in integration tests and at
a facility:

* :class:`SourceMessage`: one consumed message with its position;
* :class:`MessageSource`: where messages come from (Kafka, 0MQ, their merge, a fake);
* :class:`SnapshotSink`: where the folded snapshots go (an in-process model server, or
  :class:`consumers.kafka.KafkaSnapshotSink` bound to a run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from consumers.reduction.accumulate import OrientationRecord, Snapshot

__all__ = ["MessageSource", "SnapshotSink", "SourceMessage"]


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceMessage:
    """A consumed message with its position."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    timestamp_ns: int
    headers: tuple[tuple[str, bytes], ...]
    payload: bytes


class MessageSource(Protocol):
    """Where messages come from (Kafka, or a fake in tests)."""

    def consume(self, max_records: int, timeout_s: float) -> list[SourceMessage]:
        """Up to ``max_records`` messages, waiting at most ``timeout_s``."""
        ...

    def seek(self, offsets: dict[tuple[str, int], int]) -> None:
        """Continue from these next offsets."""
        ...

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """Record progress (after the checkpoint that contains it)."""
        ...

    def caught_up(self, offsets: dict[tuple[str, int], int]) -> bool:
        """Whether ``offsets`` have reached the end of every partition."""
        ...


class SnapshotSink(Protocol):
    """Where folded snapshots go: an in-process model server (embedded mode) or a topic
    (:class:`consumers.kafka.KafkaSnapshotSink`, deployed mode)."""

    def __call__(self, snapshot: Snapshot, record: OrientationRecord) -> None:
        """Called after every completed orientation with the cumulative spectrum."""
        ...
