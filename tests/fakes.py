"""Fakes behind the consumers' seam (:class:`consumers.messages.MessageSource`), for unit tests
that drive the real pipeline and service without a broker. Integration tests use the real
embedded broker (the ``broker`` fixture in ``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from consumers.messages import SourceMessage

__all__ = ["ListSource", "TopicSource"]


class ListSource:
    """A :class:`~consumers.messages.MessageSource` over a list, delivered in order.

    Seeks and commits are accepted and ignored; it is caught up once the list is read.
    """

    def __init__(self, msgs: list[SourceMessage]) -> None:
        self.msgs = msgs
        self.pos = 0

    @classmethod
    def of_recording(cls, messages: Iterable[Any]) -> ListSource:
        """A recorded run's messages (:class:`~simulations.runs.recording.RunReader`'s), on
        partition 0 of their topics, numbered from 0 per topic."""
        offsets: dict[str, int] = {}
        msgs = []
        for m in messages:
            off = offsets[m.topic] = offsets.get(m.topic, -1) + 1
            msgs.append(
                SourceMessage(
                    topic=m.topic,
                    partition=0,
                    offset=off,
                    key=m.key,
                    timestamp_ns=m.timestamp_ns,
                    headers=tuple(m.headers),
                    payload=m.payload,
                )
            )
        return cls(msgs)

    def consume(self, max_records: int, timeout_s: float) -> list[SourceMessage]:
        out = self.msgs[self.pos : self.pos + max_records]
        self.pos += len(out)
        return out

    def seek(self, offsets: dict[tuple[str, int], int]) -> None:
        pass

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        pass

    def caught_up(self, offsets: dict[tuple[str, int], int]) -> bool:
        return self.pos >= len(self.msgs)


class TopicSource:
    """``n`` empty messages on one topic (partition 0) that records its seeks and commits.

    ``calls`` lists ``("seek" | "commit", offsets)`` in order; a seek moves the read position,
    and it is caught up when the offsets given reach the end of the topic.
    """

    def __init__(self, topic: str, n: int) -> None:
        self.topics = [topic]
        fields = {"key": None, "timestamp_ns": 0, "headers": (), "payload": b""}
        self.msgs = [SourceMessage(topic=topic, partition=0, offset=i, **fields) for i in range(n)]
        self.pos = 0
        self.calls: list[tuple[str, dict[tuple[str, int], int]]] = []

    def consume(self, max_records: int, timeout_s: float) -> list[SourceMessage]:
        out = self.msgs[self.pos : self.pos + max_records]
        self.pos += len(out)
        return out

    def seek(self, offsets: dict[tuple[str, int], int]) -> None:
        self.calls.append(("seek", offsets))
        self.pos = offsets[(self.topics[0], 0)]

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        self.calls.append(("commit", offsets))

    def caught_up(self, offsets: dict[tuple[str, int], int]) -> bool:
        return offsets.get((self.topics[0], 0), 0) >= len(self.msgs)
