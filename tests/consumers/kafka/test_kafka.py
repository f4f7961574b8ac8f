"""Integration with a real Kafka-protocol broker (the embedded Tansu broker): replay, the
live consumer against the offline fold, kill -9 and restart, record, bad messages."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from consumers.kafka import EmbeddedBroker, KafkaDeadLetter, KafkaSnapshotSink, KafkaSource
from consumers.messages import SourceMessage
from consumers.offline import fold_recorded_run
from consumers.replay import record, replay
from consumers.service import ConsumerService
from tests.conftest import consume_cmd, kill_restart_cycles
from tests.fakes import ListSource

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, make_small_run):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("kafka") / "ge.steer"
    return make_small_run(path, (0.0, 15.0, 30.0, 45.0, 60.0, 75.0), seed=8)


def test_live_consumer_equals_offline_fold(broker, small_run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path, offline, acc = small_run
    replay(path, broker.bootstrap, prefix="live")
    source = KafkaSource(broker.bootstrap, "live")
    topic_sink = KafkaSnapshotSink(broker.bootstrap, "live", grid_fingerprint="test")
    snapshots = []

    def sink(snap, rec) -> None:  # type: ignore[no-untyped-def]
        snapshots.append(rec.omega)  # the in-process seam (embedded mode)
        topic_sink(snap, rec)  # and the topic (deployed mode)

    try:
        service = ConsumerService(source, tmp_path / "state", on_snapshot=sink)
        service.run(idle_exit_s=30)
    finally:
        source.close()
        topic_sink.close()
    assert service.done
    np.testing.assert_array_equal(service.pipeline.acc.counts, acc.counts)  # bitwise
    np.testing.assert_array_equal(service.pipeline.acc.exposure, acc.exposure)
    summary = service.summary()
    assert summary["events_folded"] == offline["events_folded"]
    assert summary["events_dropped"] == offline["events_dropped"]
    assert snapshots == [r.omega for r in acc.records]
    # the snapshots on <prefix>_folded: one per orientation, the last one is the spectrum
    import io

    from kafka import KafkaConsumer, TopicPartition

    reader = KafkaConsumer(bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest")
    tp = TopicPartition("live_folded", 0)
    reader.assign([tp])
    reader.seek_to_beginning(tp)
    payloads: list[bytes] = []
    deadline = time.monotonic() + 20
    while len(payloads) < len(acc.records) and time.monotonic() < deadline:
        for recs in reader.poll(timeout_ms=500).values():
            payloads += [r.value for r in recs]
    reader.close()
    assert len(payloads) == len(acc.records)
    with np.load(io.BytesIO(payloads[-1])) as last:
        np.testing.assert_array_equal(last["counts"], acc.counts)
        meta = json.loads(bytes(last["meta"]).decode())
        moments = {k.removeprefix("moments_"): last[k] for k in last.files if "moments_" in k}
    assert meta["n_orientations"] == len(acc.records)
    # with the run's moments (those of the offline fold), in the bins of weight > 0
    assert acc.moments is not None
    index = np.flatnonzero(acc.moments.weight > 0)
    np.testing.assert_array_equal(moments["index"], index)
    assert int(moments["n"]) == len(acc.records)
    for name, full in acc.moments.arrays(prefix="").items():
        if name != "n":
            scale = float(np.abs(full).max())
            np.testing.assert_allclose(moments[name], full[index], rtol=1e-9, atol=1e-12 * scale)


def test_kill_9_at_five_moments_then_restart_loses_nothing(broker, small_run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of `steer consume` at 5 random moments *during* a replay, each followed by a
    restart; the final counts equal the uninterrupted (offline) fold bit for bit."""
    import threading

    path, offline, acc = small_run
    state = tmp_path / "state"
    # the run lasts ~2 minutes of instrument time, replayed in real time: five consumer
    # starts (each several seconds on a loaded 2-core machine) fit into it
    sender = threading.Thread(
        target=replay, args=(path, broker.bootstrap), kwargs={"prefix": "crash", "speed": 1.0}
    )
    sender.start()
    rng = np.random.default_rng(12)
    kills = kill_restart_cycles(
        broker.bootstrap, "crash", state, 5, rng, max_delay_s=1.5, sender=sender
    )
    sender.join()
    done = subprocess.run(
        consume_cmd(broker.bootstrap, "crash", state),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["done"]
    assert len(kills) == 5
    assert all(k["during_replay"] for k in kills)  # every kill came during the replay
    # restarts really resumed from checkpoints
    assert sum(k["checkpoint_existed"] for k in kills) >= 2
    assert summary["events_folded"] == offline["events_folded"]
    assert summary["events_dropped"] == offline["events_dropped"]
    with np.load(state / "checkpoint.npz") as f:
        np.testing.assert_array_equal(f["counts"], acc.counts)
        np.testing.assert_array_equal(f["exposure"], acc.exposure)


def test_record_then_fold_gives_the_same_spectrum(broker, small_run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path, offline, acc = small_run
    replay(path, broker.bootstrap, prefix="rec")
    out = tmp_path / "recorded.steer"
    result = record(broker.bootstrap, "rec", out, idle_timeout_s=5)
    assert result["stopped"]
    summary, acc2 = fold_recorded_run(out, progress=False)
    np.testing.assert_array_equal(acc2.counts, acc.counts)
    assert summary["events_folded"] == offline["events_folded"]


def test_bad_messages_are_dead_lettered_and_the_run_completes(broker, small_run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kafka import KafkaProducer

    path, _, acc = small_run
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    producer.send("bad_events", b"\x00\x00\x00\x00ev44-not-really", headers=[("schema", b"ev44")])
    producer.send("bad_motion", b"garbage without schema")
    producer.flush()
    producer.close()
    replay(path, broker.bootstrap, prefix="bad")
    from prometheus_client import REGISTRY

    def metric(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = (
        metric("steer_messages_malformed_total", reason="before_run_start")
        + metric("steer_messages_malformed_total", reason="malformed_ev44")
        + metric("steer_messages_malformed_total", reason="unknown_schema")
    )
    folded_before = metric("steer_events_folded_total")
    letters: list[tuple[SourceMessage, str]] = []
    source = KafkaSource(broker.bootstrap, "bad")
    dead = KafkaDeadLetter(broker.bootstrap, "bad")

    def dead_letter(m: SourceMessage, reason: str) -> None:
        letters.append((m, reason))
        dead(m, reason)

    try:
        service = ConsumerService(source, tmp_path / "state", dead_letter=dead_letter)
        service.run(idle_exit_s=30)
    finally:
        source.close()
        dead.close()
    after = (
        metric("steer_messages_malformed_total", reason="before_run_start")
        + metric("steer_messages_malformed_total", reason="malformed_ev44")
        + metric("steer_messages_malformed_total", reason="unknown_schema")
    )
    assert after - before == 2
    assert metric("steer_events_folded_total") - folded_before == service.summary()["events_folded"]
    # the dead-letter topic holds both, with the reason and where they came from
    from kafka import KafkaConsumer, TopicPartition

    reader = KafkaConsumer(bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest")
    tp = TopicPartition("bad_deadletter", 0)
    reader.assign([tp])
    reader.seek_to_beginning(tp)
    got = []
    deadline = time.monotonic() + 20
    while len(got) < 2 and time.monotonic() < deadline:
        for recs in reader.poll(timeout_ms=500).values():
            got += [dict(r.headers) for r in recs]
    reader.close()
    assert sorted(h["source_topic"] for h in got) == [b"bad_events", b"bad_motion"]
    assert all(h["reason"] for h in got)
    assert service.done
    # topics are consumed in any order: before or after the run start, each is refused
    assert len(letters) == 2
    assert {r for _, r in letters} <= {"before_run_start", "malformed_ev44", "unknown_schema"}
    assert {(m.topic, m.offset) for m, _ in letters} == {("bad_events", 0), ("bad_motion", 0)}
    np.testing.assert_array_equal(service.pipeline.acc.counts, acc.counts)


def test_duplicate_delivery_is_ignored(small_run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from simulations.runs.recording import RunReader

    path, _, acc = small_run
    msgs = []
    offsets: dict[str, int] = {}
    with RunReader(path) as reader:
        for m in reader:
            off = offsets.get(m.topic, 0)
            offsets[m.topic] = off + 1
            sm = SourceMessage(
                topic=m.topic, partition=0, offset=off, key=m.key,
                timestamp_ns=m.timestamp_ns, headers=m.headers, payload=m.payload,
            )  # fmt: skip
            msgs.append(sm)
            if off % 7 == 3:
                msgs.append(sm)  # delivered twice
    service = ConsumerService(ListSource(msgs), tmp_path / "state")
    while not service.done:
        assert service.step(max_records=500) or service.done
    assert service.counters["duplicates"] > 100
    np.testing.assert_array_equal(service.pipeline.acc.counts, acc.counts)


def test_broker_starts_quickly() -> None:
    t = time.perf_counter()
    b = EmbeddedBroker()
    b.start()
    b.stop()
    assert time.perf_counter() - t < 30


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's parent-death signal")
def test_the_broker_dies_with_the_process_that_started_it() -> None:
    """A ``kill -9`` of the process that started an embedded broker (``steer demo``)
    leaves no broker behind: it is terminated with its parent."""
    import os
    import signal

    code = (
        "import sys\n"
        "from consumers.kafka import EmbeddedBroker\n"
        "b = EmbeddedBroker(); b.start()\n"
        "print(b._proc.pid, flush=True)\n"
        "sys.stdin.read()\n"  # until killed
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        os.kill(pid, 0)  # the broker runs
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            if _is_zombie(pid):
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError("the broker outlived the process that started it")
    finally:
        parent.kill()


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_poison_messages_never_stop_the_consumer(small_run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """NaN omega in a bluesky Event, a negative proton charge, another run's message, an
    empty payload: each is counted and dead-lettered; the spectrum is unchanged."""
    from streaming_data_types.logdata_f144 import serialise_f144

    from simulations.runs.recording import RunReader

    path, _, acc = small_run
    msgs: list[SourceMessage] = []
    offsets: dict[str, int] = {}

    def add(topic: str, key: bytes | None, ts: int, headers, payload: bytes) -> None:  # type: ignore[no-untyped-def]
        off = offsets.get(topic, 0)
        offsets[topic] = off + 1
        msgs.append(
            SourceMessage(
                topic=topic,
                partition=0,
                offset=off,
                key=key,
                timestamp_ns=ts,
                headers=tuple(headers),
                payload=payload,
            )
        )

    with RunReader(path) as reader:
        for i, m in enumerate(reader):
            add(m.topic, m.key, m.timestamp_ns, m.headers, m.payload)
            if i == 200:
                nan_event = json.dumps(
                    [
                        "event",
                        {"data": {"omega": float("nan"), "count_start_ns": 1, "count_stop_ns": 2}},
                    ]
                ).encode()
                add("arcs_bluesky", m.key, m.timestamp_ns, [("schema", b"bluesky-json")], nan_event)
                add(
                    "arcs_motion",
                    m.key,
                    m.timestamp_ns,
                    [("schema", b"f144")],
                    serialise_f144("proton_charge", -1e6, m.timestamp_ns),
                )
                add(
                    "arcs_events",
                    b"another-run",
                    m.timestamp_ns,
                    [("schema", b"f144")],
                    serialise_f144("omega", 3.0, m.timestamp_ns),
                )
                add("arcs_events", m.key, m.timestamp_ns, [], b"")
    letters: list[str] = []
    service = ConsumerService(
        ListSource(msgs), tmp_path / "state", dead_letter=lambda m, r: letters.append(r)
    )
    while not service.done:
        service.step(max_records=500)
    assert sorted(letters) == [
        "malformed_bluesky-json",
        "negative_charge",
        "other_run",
        "unknown_schema",
    ]
    np.testing.assert_array_equal(service.pipeline.acc.counts, acc.counts)


@pytest.fixture(scope="module")
def second_run(tmp_path_factory, make_small_run):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("kafka2") / "ge_b.steer"
    return make_small_run(path, (10.0, 40.0, 70.0), seed=9)


def _h5_counts(path: str) -> np.ndarray:
    import h5py

    with h5py.File(path) as f:
        return np.asarray(f["entry/iqe/counts"][()])


def test_runs_that_follow_one_another_on_the_same_topics(
    broker, small_run, second_run, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """Two runs replayed one after the other onto one prefix: each is folded on its own and
    exported, the consumer survives a crash right after the first one completed, and the
    result equals the offline fold of each file."""
    path_a, _, acc_a = small_run
    path_b, _, acc_b = second_run
    replay(path_a, broker.bootstrap, prefix="multi")
    replay(path_b, broker.bootstrap, prefix="multi")
    state = tmp_path / "state"
    src = KafkaSource(broker.bootstrap, "multi", group_id="multi-1")
    service = ConsumerService(src, state, follow=True)
    deadline = time.monotonic() + 120
    while not service.finished_runs and time.monotonic() < deadline:
        service.step()
    src.close()  # a crash: whatever was not checkpointed is gone
    assert len(service.finished_runs) == 1

    src = KafkaSource(broker.bootstrap, "multi", group_id="multi-1")
    service = ConsumerService(src, state, follow=True)
    while len(service.finished_runs) < 2 and time.monotonic() < deadline:
        service.step()
    src.close()
    runs = service.finished_runs
    assert [r["run_id"] for r in runs] == ["sim-Ge-8", "sim-Ge-9"]
    assert [r["orientations"] for r in runs] == [6, 3]
    np.testing.assert_array_equal(_h5_counts(str(runs[0]["path"])), acc_a.counts)
    np.testing.assert_array_equal(_h5_counts(str(runs[1]["path"])), acc_b.counts)
    assert service.counters.get("malformed_second_run_start", 0) == 0


def test_a_run_start_inside_an_open_run_is_refused(small_run, second_run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from simulations.runs.recording import RunReader

    path_a, _, acc_a = small_run
    with RunReader(second_run[0]) as reader:
        intruder = next(m for m in reader if dict(m.headers).get("schema") == b"pl72")
    msgs: list[SourceMessage] = []
    offsets: dict[str, int] = {}
    with RunReader(path_a) as reader:
        for i, m in enumerate(reader):
            for mm in [m, intruder] if i == 300 else [m]:
                off = offsets.get(mm.topic, 0)
                offsets[mm.topic] = off + 1
                msgs.append(
                    SourceMessage(
                        topic=mm.topic, partition=0, offset=off, key=mm.key,
                        timestamp_ns=mm.timestamp_ns, headers=mm.headers, payload=mm.payload,
                    )
                )  # fmt: skip
    service = ConsumerService(ListSource(msgs), tmp_path / "state")
    service.run(idle_exit_s=5)
    assert service.done
    assert service.counters["malformed_second_run_start"] == 1
    np.testing.assert_array_equal(service.pipeline.acc.counts, acc_a.counts)


def test_next_run_messages_before_the_stop_are_held_not_refused(
    small_run, second_run, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """Topics read one after the other (as a consumer catching up a backlog may): the
    second run's events and logs arrive before the first run's start and stop. Each run
    still gets exactly its own messages."""
    from simulations.runs.recording import RunReader

    by_topic: dict[str, list[SourceMessage]] = {}
    for path in (small_run[0], second_run[0]):
        with RunReader(path) as reader:
            for m in reader:
                lst = by_topic.setdefault(m.topic, [])
                lst.append(
                    SourceMessage(
                        topic=m.topic, partition=0, offset=len(lst), key=m.key,
                        timestamp_ns=m.timestamp_ns, headers=m.headers, payload=m.payload,
                    )
                )  # fmt: skip
    order = ["arcs_events", "arcs_motion", "arcs_bluesky", "arcs_runInfo"]
    msgs = [m for t in order for m in by_topic[t]]
    service = ConsumerService(ListSource(msgs), tmp_path / "state", follow=True)
    service.early_limit = len(msgs)
    for _ in range(10_000):
        if len(service.finished_runs) == 2:
            break
        service.step(max_records=2000)
    runs = service.finished_runs
    assert [r["run_id"] for r in runs] == ["sim-Ge-8", "sim-Ge-9"]
    assert not any(k.startswith("malformed") for k in service.counters)
    np.testing.assert_array_equal(_h5_counts(str(runs[0]["path"])), small_run[2].counts)
    np.testing.assert_array_equal(_h5_counts(str(runs[1]["path"])), second_run[2].counts)
