"""Message sources over Kafka: the run topics of a prefix, and several sources as one.

:class:`KafkaSource` reads the run topics of an instrument prefix by manual assignment
(offsets come from the consumer's checkpoints); :class:`MergedSource` combines it with
other message sources (:class:`~consumers.messages.MessageSource`: bluesky documents over
0MQ) and routes offsets by topic. :func:`to_source_message` is the one conversion of a
Kafka record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from consumers.exceptions import ConsumerError
from consumers.kafka.broker import ensure_topics
from consumers.kafka.config import END_OFFSETS_MAX_AGE_S, client_security, topics_for
from consumers.messages import MessageSource, SourceMessage

__all__ = ["KafkaSource", "MergedSource", "to_source_message"]

logger = logging.getLogger(__name__)


def to_source_message(record: Any) -> SourceMessage:
    """A kafka-python ``ConsumerRecord`` as a :class:`SourceMessage`.

    The record's timestamp (ms) becomes ``timestamp_ns``; missing headers, header values
    and values become empty bytes.
    """
    value, headers = record.value, record.headers
    return SourceMessage(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        timestamp_ns=int(record.timestamp) * 1_000_000,
        headers=tuple((k, bytes(v or b"")) for k, v in headers) if headers else (),
        payload=value if type(value) is bytes else bytes(value or b""),
    )


class KafkaSource:
    """The run topics of a prefix, by manual assignment (offsets come from checkpoints).

    ``partitions`` limits it to those partition numbers of every topic (a lane of
    :class:`consumers.kafka.group.GroupConsumer`: a run's messages share a key, so they are on
    the same partition number of every topic); by default all partitions are read.

    ``bluesky=False`` leaves out ``<prefix>_bluesky`` (when the documents come over 0MQ,
    :class:`consumers.zmq.ZmqBlueskySource`, so that they are not taken twice).

    ``topics`` reads those topics instead of the prefix's four (an instrument config's,
    :meth:`consumers.streams.InstrumentConfig.topics`). Topics that do not exist are
    created (a config naming one that never gets data is reported by the consumer's
    stream tally, with the topics the broker has).
    """

    def __init__(
        self,
        bootstrap: str,
        prefix: str,
        *,
        group_id: str | None = None,
        bluesky: bool = True,
        partitions: Sequence[int] | None = None,
        topics: Sequence[str] | None = None,
    ) -> None:
        from kafka import KafkaConsumer, TopicPartition

        if topics is not None:
            self.topics = list(topics)
        else:
            self.topics = [t for t in topics_for(prefix) if bluesky or not t.endswith("_bluesky")]
        if partitions is None:
            ensure_topics(bootstrap, self.topics, warn=topics is not None)
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group_id or f"steer-{prefix}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=6000,
            heartbeat_interval_ms=2000,
            max_partition_fetch_bytes=16 << 20,
            fetch_max_bytes=64 << 20,
            **client_security(),
        )
        parts = []
        for t in self.topics:
            there = sorted(self._consumer.partitions_for_topic(t) or {0})
            if partitions is not None:
                missing = sorted(set(partitions) - set(there))
                if missing:
                    self._consumer.close()
                    raise ConsumerError(
                        f"topic {t} has no partition {missing[0]} (it has {len(there)}): the "
                        "run topics of a prefix must have the same number of partitions"
                    )
                there = sorted(partitions)
            for p in there:
                parts.append(TopicPartition(t, p))
        self._parts = parts
        self._ends: dict[tuple[str, int], int] | None = None  # see caught_up
        self._ends_at = 0.0
        self._consumer.assign(parts)
        self._consumer.seek_to_beginning(*parts)
        self._tp = TopicPartition

    def consume(self, max_records: int, timeout_s: float) -> list[SourceMessage]:
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        return [to_source_message(r) for records in batches.values() for r in records]

    def seek(self, offsets: dict[tuple[str, int], int]) -> None:
        for (topic, part), off in offsets.items():
            self._consumer.seek(self._tp(topic, part), off)

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        from kafka.structs import OffsetAndMetadata

        try:
            self._consumer.commit(
                {self._tp(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
            )
        except Exception as exc:  # the checkpoint is the source of truth; log and go on
            logger.warning("offset commit failed (checkpoint keeps them): %s", exc)

    def caught_up(self, offsets: dict[tuple[str, int], int]) -> bool:
        """Whether ``offsets`` reached every partition's end offset.

        The end offsets are a broker round trip (tens of ms); a partition's end only
        grows, so while ``offsets`` lie below the ends last fetched (within
        :data:`END_OFFSETS_MAX_AGE_S`, in case a topic was recreated) the answer is no
        without asking: a consumer catching up asks about once.
        """
        now = time.monotonic()
        if (
            self._ends is not None
            and now - self._ends_at < END_OFFSETS_MAX_AGE_S
            and any(offsets.get(key, 0) < end for key, end in self._ends.items())
        ):
            return False
        ends = self._consumer.end_offsets(self._parts)
        self._ends = {(tp.topic, tp.partition): int(end) for tp, end in ends.items()}
        self._ends_at = now
        return all(offsets.get(key, 0) >= end for key, end in self._ends.items())

    def close(self) -> None:
        self._consumer.close()


class MergedSource:
    """Several sources as one :class:`MessageSource` (Kafka topics plus bluesky over 0MQ).

    Each source names the topics it owns in its ``topics`` attribute; offsets are routed
    to their owner for :meth:`seek`, :meth:`commit` and :meth:`caught_up`. :meth:`consume`
    takes from every source, starting with a different one each call, so that none waits
    behind another's backlog.
    """

    def __init__(self, *sources: MessageSource, slice_s: float = 0.05) -> None:
        if not sources:
            raise ConsumerError("MergedSource needs at least one source")
        self.sources = sources
        self.slice_s = float(slice_s)
        self._owner: dict[str, int] = {}
        for i, src in enumerate(sources):
            topics: Sequence[str] | None = getattr(src, "topics", None)
            if topics is None:
                raise ConsumerError(f"{type(src).__name__} does not name its topics")
            for t in topics:
                if t in self._owner:
                    raise ConsumerError(f"topic {t} would be consumed by two sources")
                self._owner[t] = i
        self.topics = list(self._owner)
        self._first = 0
        self._unknown_warned: set[str] = set()

    def _split(self, offsets: dict[tuple[str, int], int]) -> list[dict[tuple[str, int], int]]:
        parts: list[dict[tuple[str, int], int]] = [{} for _ in self.sources]
        for (topic, part), off in offsets.items():
            i = self._owner.get(topic)
            if i is None:
                if topic not in self._unknown_warned:
                    self._unknown_warned.add(topic)
                    logger.warning("offsets of %s: no source consumes that topic", topic)
                continue
            parts[i][(topic, part)] = off
        return parts

    def consume(self, max_records: int, timeout_s: float) -> list[SourceMessage]:
        deadline = time.monotonic() + timeout_s
        n = len(self.sources)
        order = [self.sources[(self._first + k) % n] for k in range(n)]
        self._first = (self._first + 1) % n
        out: list[SourceMessage] = []
        wait = 0.0
        while True:
            for src in order:
                room = max_records - len(out)
                if room <= 0:
                    break
                out += src.consume(room, wait)
            remaining = deadline - time.monotonic()
            if out or remaining <= 0:
                return out
            wait = min(self.slice_s, remaining) / n

    def seek(self, offsets: dict[tuple[str, int], int]) -> None:
        for src, part in zip(self.sources, self._split(offsets), strict=True):
            if part:
                src.seek(part)

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        for src, part in zip(self.sources, self._split(offsets), strict=True):
            if part:
                src.commit(part)

    def caught_up(self, offsets: dict[tuple[str, int], int]) -> bool:
        parts = self._split(offsets)
        return all(src.caught_up(part) for src, part in zip(self.sources, parts, strict=True))

    def close(self) -> None:
        """Close every source that can be closed."""
        for src in self.sources:
            close = getattr(src, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    logger.exception("closing %s failed", type(src).__name__)
