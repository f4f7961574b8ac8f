"""bluesky documents as bluesky-kafka publishes them (msgpack, no header, keyed by the
RunStart uid) drive the live consumer exactly as the JSON documents do; a malformed one
is counted and dead-lettered; the simulator writes that form with ``bluesky_format``."""

from __future__ import annotations

import json

import msgpack
import msgpack_numpy
import numpy as np
import pytest

from consumers.service import ConsumerService
from simulations.runs.recording import RecordedMessage, RunReader
from tests.fakes import ListSource

OMEGAS = (0.0, 20.0, 40.0)
SEED = 21


@pytest.fixture(scope="module")
def json_run(tmp_path_factory, make_small_run):  # type: ignore[no-untyped-def]
    """A small simulated run (JSON bluesky documents) and its offline fold."""
    return make_small_run(tmp_path_factory.mktemp("msgpack") / "ge.steer", OMEGAS, seed=SEED)


def as_bluesky_kafka(messages: list[RecordedMessage]) -> list[RecordedMessage]:
    """The run's messages with every JSON bluesky document re-sent as bluesky-kafka's
    Publisher sends it: ``msgpack.dumps((name, doc), default=msgpack_numpy.encode)``, no
    headers, keyed by the RunStart uid."""
    out: list[RecordedMessage] = []
    key = b""
    for m in messages:
        if dict(m.headers).get("schema") == b"bluesky-json":
            name, doc = json.loads(m.payload)
            key = doc["uid"].encode() if name == "start" else key
            payload = msgpack.dumps((name, doc), default=msgpack_numpy.encode)
            m = RecordedMessage(
                topic=m.topic, key=key, timestamp_ns=m.timestamp_ns, headers=(), payload=payload
            )
        out.append(m)
    return out


def _source(messages: list[RecordedMessage]) -> ListSource:
    return ListSource.of_recording(messages)


def test_msgpack_documents_fold_like_json_ones_and_bad_ones_are_dead_lettered(
    json_run, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    path, offline, acc = json_run
    with RunReader(path) as reader:
        messages = as_bluesky_kafka(list(reader))
    events = [i for i, m in enumerate(messages) if m.payload.startswith(b"\x92\xa5event")]
    assert len(events) == len(OMEGAS)
    # a truncated Event and an Event whose image would be unpickled, before the first Event
    bad = messages[events[0]]
    poison = [
        RecordedMessage(
            topic=bad.topic,
            key=bad.key,
            timestamp_ns=bad.timestamp_ns,
            headers=(),
            payload=payload,
        )
        for payload in (
            bad.payload[:-5],
            msgpack.dumps(
                ("event", {"data": np.array([None], dtype=object)}),
                default=msgpack_numpy.encode,
            ),
        )
    ]
    messages[events[0] : events[0]] = poison
    letters: list[str] = []
    service = ConsumerService(
        _source(messages), tmp_path / "state", dead_letter=lambda m, r: letters.append(r)
    )
    while not service.done:
        service.step(max_records=500)
    assert letters == ["malformed_bluesky", "malformed_bluesky"]
    assert service.counters["malformed_malformed_bluesky"] == 2  # counted by reason
    assert service.pipeline.segmenter is not None
    assert service.pipeline.segmenter.mode == "bluesky"  # windows from the Events
    live = service.pipeline.acc
    assert live is not None
    np.testing.assert_array_equal(live.counts, acc.counts)  # bitwise
    np.testing.assert_array_equal(live.exposure, acc.exposure)
    assert service.summary()["events_folded"] == offline["events_folded"]


def test_the_simulator_writes_bluesky_kafkas_form(json_run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from simulations.runs.simulate import RunPlan, simulate_run

    path, _, _ = json_run
    plan = RunPlan(
        material="Ge",
        fc="raman",
        omegas=OMEGAS,
        events_per_orientation=5e4,
        count_time=5.0,
        mesh=16,
        seed=SEED,
    )
    out = simulate_run(plan, tmp_path / "m.steer", progress=False, bluesky_format="msgpack")
    with RunReader(path) as a, RunReader(out.path) as b:
        expected, got = as_bluesky_kafka(list(a)), list(b)
    assert got == expected  # same events, same documents, byte for byte
    assert sum(m.topic.endswith("_bluesky") for m in got) == len(OMEGAS) + 3
