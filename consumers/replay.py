"""Record a run from Kafka to a file, and replay a recorded run onto Kafka (and 0MQ).

:func:`replay` publishes a recorded run (:mod:`simulations.runs.recording`) in order, at
its original pace or faster, with the bluesky documents optionally over 0MQ as a run
engine sends them; :func:`record` writes a run's topics back to a file. Both are adapters
over :mod:`consumers.kafka` and :mod:`consumers.zmq`, which do not import each other.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from consumers.kafka.broker import ensure_topics
from consumers.kafka.config import client_security, topics_for
from consumers.kafka.source import KafkaSource
from consumers.messages import SourceMessage
from consumers.wire import decode_bluesky
from simulations.runs.recording import RecordedMessage, RunReader, RunWriter

__all__ = ["REPLAY_LINGER_MS", "record", "replay"]

#: How long the replay's producer lets messages gather into one batch, ms. A paced replay
#: sends the 60 Hz proton-charge samples 17 ms apart; at 5 ms each was a batch of its own,
#: and the embedded broker (Tansu, in memory) works in proportion to the batches its
#: partition holds on every fetch: 62 % of a core 15 minutes into a run replayed at real
#: time. At 100 ms about 6 samples share a batch; a message waits at most 0.1 s, and a
#: paced replay flushes after each bluesky document (an orientation's end goes out at
#: once, with what came before it).
REPLAY_LINGER_MS = 100


def replay(
    path: str | Path,
    bootstrap: str,
    *,
    prefix: str | None = None,
    speed: float | None = None,
    bluesky_zmq: str | None = None,
    zmq_prefix: bytes = b"",
    zmq_format: str = "pickle",
    zmq_connect_wait_s: float = 0.5,
    partitions: int = 1,
    topics: list[str] | None = None,
) -> dict[str, object]:
    """Publish a recorded run onto Kafka, in order.

    Topics that do not exist yet are created with ``partitions`` partitions; every message
    goes to the partition of its key (the run id), as Kafka's default partitioner places it,
    so a run's messages share one partition number on every topic (scale-out by consumer
    group, :class:`consumers.kafka.group.GroupConsumer`).

    ``topics``: the topics to create when missing (an instrument config's,
    :meth:`consumers.streams.InstrumentConfig.topics`); by default those the file's
    metadata names, else the prefix's four.

    ``prefix`` renames the topics (``<old prefix>_x`` -> ``<prefix>_x``); ``speed`` scales
    the original timing (60 = sixty times faster), ``None`` sends as fast as possible.

    ``bluesky_zmq="host:port"`` publishes the run's bluesky documents (the ``_bluesky``
    topic) with bluesky's own Publisher to the 0MQ proxy's in port there instead of Kafka,
    with ``zmq_prefix`` and the ``zmq_format`` serializer (``"pickle"``, bluesky's default,
    or ``"json"``), in their place in the run: the Kafka messages before each document
    are flushed first. It waits ``zmq_connect_wait_s`` after connecting (a PUB socket
    drops what is sent before its connection is up).
    """
    from kafka import KafkaProducer

    t0 = time.perf_counter()
    with RunReader(path) as reader:
        old = str(reader.metadata.get("prefix", ""))
        new = prefix or old
        ensure_topics(bootstrap, topics or _file_topics(reader.metadata, old, new), partitions)
        producer = KafkaProducer(
            **client_security(),
            bootstrap_servers=bootstrap,
            acks="all",
            linger_ms=REPLAY_LINGER_MS,
            batch_size=1 << 20,
            max_request_size=32 << 20,
        )
        publisher: Any = None
        try:
            if bluesky_zmq:
                from consumers.zmq import make_publisher

                publisher = make_publisher(bluesky_zmq, prefix=zmq_prefix, fmt=zmq_format)
                time.sleep(zmq_connect_wait_s)
            rename = (old, new) if old and prefix else None
            n, n_zmq = _publish(reader, producer, publisher, rename=rename, speed=speed, t0=t0)
            producer.flush()
        finally:
            producer.close()
            if publisher is not None:
                publisher.close()
    seconds = time.perf_counter() - t0
    out: dict[str, object] = {
        "messages": n,
        "seconds": round(seconds, 3),
        "messages_per_second": n / seconds,
    }
    if bluesky_zmq:
        out["bluesky_zmq"] = n_zmq
    return out


def _publish(
    reader: RunReader,
    producer: Any,
    publisher: Any,
    *,
    rename: tuple[str, str] | None,
    speed: float | None,
    t0: float,
) -> tuple[int, int]:
    """Send every message of ``reader`` (the bluesky documents to ``publisher`` when there
    is one), renaming the topics ``<old>_x`` -> ``<new>_x`` and pacing them by ``speed``
    from ``t0`` (s, :func:`time.perf_counter`). Returns (messages, documents over 0MQ)."""
    n = n_zmq = 0
    first_ts: int | None = None
    for msg in reader:
        topic = msg.topic
        if rename is not None and topic.startswith(rename[0] + "_"):
            topic = rename[1] + topic[len(rename[0]) :]
        if speed:
            first_ts = msg.timestamp_ns if first_ts is None else first_ts
            due = (msg.timestamp_ns - first_ts) / 1e9 / speed
            lag = due - (time.perf_counter() - t0)
            if lag > 0:
                time.sleep(lag)
        if publisher is not None and msg.topic.endswith("_bluesky"):
            header = dict(msg.headers).get("schema")
            schema = "bluesky-json" if header == b"bluesky-json" else "bluesky-msgpack"
            name, doc = decode_bluesky(schema, msg.payload)
            producer.flush()  # what came before it in the run goes out first
            publisher(str(name), doc)
            n_zmq += 1
            n += 1
            continue
        producer.send(
            topic,
            value=msg.payload,
            key=msg.key,
            headers=list(msg.headers),
            timestamp_ms=msg.timestamp_ns // 1_000_000,
        )
        if speed and msg.topic.endswith("_bluesky"):
            producer.flush()  # paced: a document (an orientation's end) does not linger
        n += 1
    return n, n_zmq


def _file_topics(meta: dict[str, Any], old: str, new: str) -> list[str]:
    """The topics a recorded file's metadata names (renamed from ``old`` to ``new``
    prefix), else the ``new`` prefix's four."""
    named = meta.get("topics")
    if not isinstance(named, dict) or not named:
        return topics_for(new)
    out = [str(t) for t in named.values()]
    if old and new != old:
        out = [new + t[len(old) :] if t.startswith(old + "_") else t for t in out]
    return out


def record(
    bootstrap: str,
    prefix: str,
    out: str | Path,
    *,
    idle_timeout_s: float = 10.0,
    topics: list[str] | None = None,
) -> dict[str, object]:
    """Record a run's topics (``topics``, e.g. an instrument config's; by default the
    prefix's four) from the beginning until its run stop (6s4t) and the end of every
    partition, or until nothing arrives for ``idle_timeout_s``."""
    from consumers.reduction.pipeline import schema_of

    src = KafkaSource(bootstrap, prefix, group_id=f"steer-record-{prefix}", topics=topics)
    nxt: dict[tuple[str, int], int] = {}
    msgs: list[SourceMessage] = []
    stopped = False
    last = time.monotonic()
    try:
        while True:
            batch = src.consume(10_000, 0.5)
            if batch:
                last = time.monotonic()
            for m in batch:
                msgs.append(m)
                nxt[(m.topic, m.partition)] = m.offset + 1
                stopped |= schema_of(m.headers, m.payload) == "6s4t"
            if (stopped and src.caught_up(nxt)) or time.monotonic() - last > idle_timeout_s:
                break
    finally:
        src.close()
    msgs.sort(key=lambda m: (m.timestamp_ns, m.topic, m.offset))
    meta: dict[str, Any] = {"prefix": prefix, "recorded_from": bootstrap}
    if topics:
        meta["topics"] = {t: t for t in topics}
    with RunWriter(out, metadata=meta) as writer:
        writer.write_many(
            RecordedMessage(
                topic=m.topic,
                key=m.key,
                timestamp_ns=m.timestamp_ns,
                headers=m.headers,
                payload=m.payload,
            )
            for m in msgs
        )
    return {"messages": len(msgs), "stopped": stopped, "path": str(out)}
