"""bluesky documents over 0MQ: a real bluesky Proxy (``steer zmq-proxy``), bluesky's
Publisher (``replay --bluesky-zmq``), the journalled RemoteDispatcher source merged with
the Kafka topics of the embedded broker; kill and restart, malformed 0MQ messages, the
restricted unpickler, the journal and gap detection."""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from consumers.exceptions import ConsumerError
from consumers.kafka import KafkaSource, MergedSource
from consumers.kafka.broker import _free_port
from consumers.messages import SourceMessage
from consumers.replay import replay
from consumers.service import ConsumerService
from consumers.zmq import JOURNAL, ZmqBlueskySource, make_publisher, restricted_loads
from simulations.runs.recording import RunReader
from tests.fakes import TopicSource

kafka = pytest.mark.kafka


def _wait(cond: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@dataclass(frozen=True)
class ProxyAddr:
    in_address: str
    out_address: str


@pytest.fixture(scope="module")
def _proxy_proc() -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """bluesky's Proxy run by ``steer zmq-proxy`` on two free loopback ports (starting)."""
    a, b = _free_port(), _free_port()
    cmd = [sys.executable, "-m", "steering.cli", "zmq-proxy", "--in-port", str(a)]
    proc = subprocess.Popen(
        [*cmd, "--out-port", str(b)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        yield proc, a, b
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def proxy(_proxy_proc) -> ProxyAddr:  # type: ignore[no-untyped-def]
    """The started proxy's addresses, once it listens."""
    proc, a, b = _proxy_proc

    def listening() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", b)) == 0

    _wait(listening, 30, "the 0MQ proxy")
    return ProxyAddr(f"127.0.0.1:{a}", f"127.0.0.1:{b}")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, _proxy_proc, make_small_run):  # type: ignore[no-untyped-def]
    # (the proxy starts while the run is simulated)
    path, summary, acc = make_small_run(
        tmp_path_factory.mktemp("zmq") / "ge.steer", (0.0, 20.0, 40.0, 60.0), seed=8
    )
    with RunReader(path) as reader:
        docs = [json.loads(m.payload) for m in reader if m.topic.endswith("_bluesky")]
    return path, summary, acc, docs


def _checkpoint_offsets(state: Path) -> dict[str, int]:
    with np.load(state / "checkpoint.npz") as f:
        js = json.loads(bytes(f["__json__"]).decode())
    return {t: o for t, _, o in js["offsets"]}


@kafka
def test_bluesky_over_zmq_equals_offline_fold(broker, proxy, small_run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Replay (Kafka + bluesky's Publisher) while the merged consumer runs."""
    path, offline, acc, docs = small_run
    state = tmp_path / "state"
    zsrc = ZmqBlueskySource(proxy.out_address, state, prefix=b"t1")
    source = MergedSource(KafkaSource(broker.bootstrap, "zlive", bluesky=False), zsrc)
    result: list[dict[str, object]] = []
    sender = threading.Thread(
        target=lambda: result.append(
            replay(
                path,
                broker.bootstrap,
                prefix="zlive",
                bluesky_zmq=proxy.in_address,
                zmq_prefix=b"t1",
            )
        )
    )
    try:
        sender.start()
        service = ConsumerService(source, state)
        service.run(idle_exit_s=30)
        sender.join(60)
    finally:
        source.close()
    assert result[0]["bluesky_zmq"] == len(docs)
    assert service.done
    np.testing.assert_array_equal(service.pipeline.acc.counts, acc.counts)  # bitwise
    np.testing.assert_array_equal(service.pipeline.acc.exposure, acc.exposure)
    summary = service.summary()
    assert summary["orientations"] == offline["orientations"] == len(acc.records)
    assert summary["events_folded"] == offline["events_folded"]
    assert summary["segmentation"] == "bluesky"
    # the documents came over 0MQ only, journalled, nothing malformed or missing
    assert service.next_offsets[(zsrc.topic, 0)] == len(docs)
    assert not any(t.endswith("_bluesky") for t, _ in service.next_offsets)
    assert zsrc.stats()["counters"] == {}
    lines = (state / JOURNAL).read_text().splitlines()
    assert [json.loads(line)[1:] for line in lines] == docs


@kafka
def test_kill_and_restart_redelivers_from_the_journal(broker, proxy, small_run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The consumer dies after 2 orientations while later documents sit in the journal
    only; a new consumer on the same state dir gets them again and ends bit for bit equal."""
    path, offline, acc, docs = small_run
    replay(path, broker.bootstrap, prefix="zkill")  # Kafka; its _bluesky topic is not read
    state = tmp_path / "state"
    zsrc = ZmqBlueskySource(proxy.out_address, state, prefix=b"t2")
    source = MergedSource(KafkaSource(broker.bootstrap, "zkill", bluesky=False), zsrc)
    pub = make_publisher(proxy.in_address, prefix=b"t2")
    try:
        time.sleep(0.5)  # PUB drops messages until connected
        first = 2 + 2  # RunStart, descriptor, the Events of the first two orientations
        for name, doc in docs[:first]:
            pub(name, doc)
        service = ConsumerService(source, state)
        deadline = time.monotonic() + 60
        while service.pipeline.acc is None or len(service.pipeline.acc.records) < 2:
            service.step()
            assert time.monotonic() < deadline
        assert not service.done
        for name, doc in docs[first:]:  # received and journalled, never consumed
            pub(name, doc)
        _wait(lambda: zsrc.stats()["documents"] == len(docs), what="the journal")
    finally:
        pub.close()
        source.close()  # "kill": no final checkpoint
    assert _checkpoint_offsets(state)[zsrc.topic] == first
    zsrc2 = ZmqBlueskySource(proxy.out_address, state, prefix=b"t2", connect_timeout_s=0)
    source2 = MergedSource(KafkaSource(broker.bootstrap, "zkill", bluesky=False), zsrc2)
    try:
        service2 = ConsumerService(source2, state)
        service2.run(idle_exit_s=30)
    finally:
        source2.close()
    assert service2.done
    assert service2.next_offsets[(zsrc2.topic, 0)] == len(docs)
    assert service2.counters["duplicates"] == 0
    np.testing.assert_array_equal(service2.pipeline.acc.counts, acc.counts)
    np.testing.assert_array_equal(service2.pipeline.acc.exposure, acc.exposure)
    assert service2.summary()["orientations"] == offline["orientations"]
    assert service2.summary()["events_folded"] == offline["events_folded"]


@kafka
def test_malformed_zmq_messages_are_counted_and_the_run_completes(
    broker, proxy, small_run, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    import zmq
    from prometheus_client import REGISTRY

    def metric(reason: str) -> float:
        return REGISTRY.get_sample_value("steer_messages_malformed_total", {"reason": reason}) or 0

    reasons = ("unsplittable", "unknown_document", "undecodable", "not_a_document")
    before = {r: metric(r) for r in reasons}
    path, offline, acc, docs = small_run
    state = tmp_path / "state"
    letters: list[tuple[SourceMessage, str]] = []
    zsrc = ZmqBlueskySource(
        proxy.out_address, state, prefix=b"t3", dead_letter=lambda m, r: letters.append((m, r))
    )
    source = MergedSource(KafkaSource(broker.bootstrap, "zbad", bluesky=False), zsrc)
    ctx = zmq.Context()
    raw = ctx.socket(zmq.PUB)
    raw.setsockopt(zmq.LINGER, 2000)
    raw.connect(f"tcp://{proxy.in_address}")
    bad = [
        b"garbage",
        b"t3 bogusname {}",
        b"t3 event \x80\x04garbage",
        b"t3 start " + pickle.dumps(os.system),  # refused: no code from the network
        b"t3 start " + pickle.dumps([1, 2]),
    ]
    try:
        time.sleep(0.5)
        for m in [*bad, b"other start " + pickle.dumps({"uid": "x"})]:
            raw.send(m)
        replay(
            path, broker.bootstrap, prefix="zbad", bluesky_zmq=proxy.in_address, zmq_prefix=b"t3"
        )
        service = ConsumerService(source, state)
        service.run(idle_exit_s=30)
        _wait(lambda: len(letters) == len(bad), 5, "the malformed messages")
    finally:
        raw.close()
        ctx.term()
        source.close()
    assert dict(zsrc.counters) == {
        "unsplittable": 1,
        "unknown_document": 1,
        "undecodable": 2,
        "not_a_document": 1,
    }
    assert {r: metric(r) - before[r] for r in reasons} == dict(zsrc.counters)
    assert sorted(m.payload for m, _ in letters) == sorted(bad)
    assert all(m.topic == zsrc.topic and m.offset == -1 for m, _ in letters)
    assert zsrc.stats()["other_prefix"] == 1
    assert zsrc.stats()["documents"] == len(docs)
    assert service.done
    np.testing.assert_array_equal(service.pipeline.acc.counts, acc.counts)
    assert service.summary()["orientations"] == offline["orientations"]


# -- units: no broker, no proxy -----------------------------------------------------------


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(os.system),
        pickle.dumps(_Evil()),
        pickle.dumps(eval),
        pickle.dumps(getattr),
        pickle.dumps(_Evil),  # a class of another module
    ],
)
def test_restricted_unpickler_refuses_code(payload: bytes) -> None:
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        restricted_loads(payload)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_reads_documents_with_numpy(protocol: int) -> None:
    doc = {
        "uid": "u",
        "time": 1.5,
        "seq_num": 3,
        "data": {"omega": np.float64(2.5), "n": np.int64(7), "img": np.arange(6.0).reshape(2, 3)},
        "filled": {},
        "tags": ("a", "b"),
        "flags": {True, None},
        "raw": b"\x00\x01",
    }
    got = restricted_loads(pickle.dumps(doc, protocol=protocol))
    np.testing.assert_array_equal(got["data"]["img"], doc["data"]["img"])
    assert got["data"]["omega"] == 2.5
    assert isinstance(got["data"]["omega"], np.float64)
    assert {k: v for k, v in got.items() if k != "data"} == {
        k: v for k, v in doc.items() if k != "data"
    }


def _unit_source(state: Path, **kw) -> ZmqBlueskySource:  # type: ignore[no-untyped-def]
    # nothing listens there: 0MQ connects lazily and keeps trying
    return ZmqBlueskySource(f"127.0.0.1:{_free_port()}", state, connect_timeout_s=0, **kw)


def test_torn_journal_line_is_ignored_and_cut(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "state"
    state.mkdir()
    good = [[0, "start", {"uid": "r", "time": 1.0}], [1, "descriptor", {"uid": "d", "name": "p"}]]
    text = "".join(json.dumps(x) + "\n" for x in good)
    (state / JOURNAL).write_text(text + '[2, "event", {"descri')
    with caplog.at_level(logging.WARNING, logger="consumers.zmq"):
        src = _unit_source(state)
    try:
        assert "torn last line" in caplog.text
        assert (state / JOURNAL).read_text() == text
        msgs = src.consume(10, 0)
        assert [[m.offset, *json.loads(m.payload)] for m in msgs] == good
        assert dict(msgs[0].headers) == {"schema": b"bluesky-json", "document": b"start"}
        src._on_document("event", {"descriptor": "d", "seq_num": 1, "time": 2.0})
        assert [m.offset for m in src.consume(10, 0)] == [2]
        with pytest.raises(ConsumerError, match="in use"):
            _unit_source(state)  # one consumer per journal
    finally:
        src.close()
    again = _unit_source(state)
    try:
        again.seek({(again.topic, 0): 1})
        assert [m.offset for m in again.consume(10, 0.01)] == [1, 2]
    finally:
        again.close()


def test_lost_journal_continues_after_the_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = _unit_source(tmp_path / "state")
    try:
        src.seek({(src.topic, 0): 5})
        src._on_document("start", {"uid": "r"})
        assert [m.offset for m in src.consume(10, 0)] == [5]
    finally:
        src.close()


def test_gaps_and_open_runs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = _unit_source(tmp_path / "state", stop_timeout_s=0.2)
    try:
        src._on_document("start", {"uid": "r", "time": 1.0})
        src._on_document("descriptor", {"uid": "d", "name": "primary", "run_start": "r"})
        src._on_document("event", {"descriptor": "d", "seq_num": 1})
        src._on_document("event", {"descriptor": "d", "seq_num": 3})  # 2 was lost
        assert src.counters["bluesky_gap"] == 1
        n = len(src.consume(10, 0))
        offsets = {(src.topic, 0): n}
        assert not src.caught_up(offsets)  # the run is open: wait for its RunStop
        time.sleep(0.25)
        assert src.caught_up(offsets)  # ... at most stop_timeout_s
        src._on_document("stop", {"run_start": "r", "num_events": {"primary": 4}})  # 4 lost
        assert src.counters["bluesky_gap"] == 2
        assert not src.caught_up(offsets)
        assert src.caught_up({(src.topic, 0): n + 1}) is False  # not handed out yet
        src.consume(10, 0)
        assert src.caught_up({(src.topic, 0): n + 1})
    finally:
        src.close()


def test_merged_source_routes_offsets_by_topic() -> None:
    a, b = TopicSource("a", 5), TopicSource("b", 2)
    merged = MergedSource(a, b)
    got = merged.consume(3, 0.1) + merged.consume(3, 0.1) + merged.consume(3, 0.1)
    assert sorted((m.topic, m.offset) for m in got) == [("a", i) for i in range(5)] + [
        ("b", 0),
        ("b", 1),
    ]
    assert merged.consume(3, 0.05) == []
    offsets = {("a", 0): 5, ("b", 0): 1, ("gone", 0): 9}
    assert not merged.caught_up(offsets)
    assert merged.caught_up({("a", 0): 5, ("b", 0): 2})
    merged.seek(offsets)
    merged.commit({("a", 0): 5})
    assert a.calls == [("seek", {("a", 0): 5}), ("commit", {("a", 0): 5})]
    assert b.calls == [("seek", {("b", 0): 1})]
    assert [m.offset for m in merged.consume(5, 0)] == [1]
    with pytest.raises(ConsumerError, match="two sources"):
        MergedSource(a, TopicSource("a", 1))
