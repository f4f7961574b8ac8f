"""The Kafka adapters: the embedded broker, the message source, the snapshot, livedata (da00)
and dead-letter sinks, and consumer groups (:mod:`consumers.kafka.group`). Record and replay,
which also speak 0MQ, are :mod:`consumers.replay`.
"""

from consumers.kafka.broker import EmbeddedBroker, embedded_broker, ensure_topics
from consumers.kafka.config import (
    END_OFFSETS_MAX_AGE_S,
    SECURITY_ENV,
    SUFFIXES,
    client_security,
    topics_for,
)
from consumers.kafka.livedata import KafkaLivedataSink
from consumers.kafka.sink import KafkaDeadLetter, KafkaSnapshotSink
from consumers.kafka.source import KafkaSource, MergedSource, to_source_message

__all__ = [
    "END_OFFSETS_MAX_AGE_S",
    "SECURITY_ENV",
    "SUFFIXES",
    "EmbeddedBroker",
    "KafkaDeadLetter",
    "KafkaLivedataSink",
    "KafkaSnapshotSink",
    "KafkaSource",
    "MergedSource",
    "client_security",
    "embedded_broker",
    "ensure_topics",
    "to_source_message",
    "topics_for",
]
