"""Prometheus metrics of the consumers (scraped from the service's ``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "CONSUMER_LAG",
    "EVENTS_CONSUMED",
    "EVENTS_DROPPED",
    "EVENTS_FOLDED",
    "FOLD_SECONDS",
    "MESSAGES",
    "MESSAGES_DUPLICATE",
    "MESSAGES_MALFORMED",
    "ORIENTATIONS",
]

MESSAGES = Counter("steer_messages_total", "Messages consumed", ["topic"])
MESSAGES_MALFORMED = Counter(
    "steer_messages_malformed_total", "Malformed messages, dead-lettered", ["reason"]
)
MESSAGES_DUPLICATE = Counter("steer_messages_duplicate_total", "Re-delivered messages ignored")
EVENTS_CONSUMED = Counter("steer_events_consumed_total", "Neutron events consumed")
EVENTS_FOLDED = Counter("steer_events_folded_total", "Events folded into I(q,E)")
EVENTS_DROPPED = Counter("steer_events_dropped_total", "Events not folded", ["reason"])
ORIENTATIONS = Counter("steer_orientations_total", "Completed orientations")
FOLD_SECONDS = Histogram(
    "steer_orientation_fold_seconds", "Fold + coverage time of one orientation"
)
CONSUMER_LAG = Gauge("steer_consumer_lag_messages", "Messages behind the end of the topics")
