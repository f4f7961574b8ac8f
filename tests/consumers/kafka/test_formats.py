"""Through the embedded broker: a run whose bluesky documents are bluesky-kafka's msgpack
(no header, keyed by the RunStart uid) is folded like the offline fold, and its snapshots
come out on ``<prefix>_livedata`` as da00."""

from __future__ import annotations

import time

import numpy as np
import pytest
from streaming_data_types.dataarray_da00 import deserialise_da00

from consumers.kafka import KafkaLivedataSink, KafkaSource
from consumers.livedata import IQE_COVERAGE_SOURCE, IQE_SOURCE
from consumers.offline import fold_recorded_run
from consumers.replay import replay
from consumers.service import ConsumerService

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def msgpack_run(tmp_path_factory):  # type: ignore[no-untyped-def]
    from simulations.runs.simulate import RunPlan, simulate_run

    plan = RunPlan(
        material="Ge",
        fc="raman",
        omegas=(0.0, 25.0, 50.0),
        events_per_orientation=5e4,
        count_time=5.0,
        mesh=16,
        seed=31,
    )
    path = tmp_path_factory.mktemp("formats") / "ge_msgpack.steer"
    simulate_run(plan, path, progress=False, bluesky_format="msgpack")
    summary, acc = fold_recorded_run(path, progress=False)
    return path, summary, acc


def _read_all(bootstrap: str, topic: str, n: int) -> list:  # type: ignore[type-arg]
    from kafka import KafkaConsumer, TopicPartition

    reader = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    tp = TopicPartition(topic, 0)
    reader.assign([tp])
    reader.seek_to_beginning(tp)
    out: list = []  # type: ignore[type-arg]
    deadline = time.monotonic() + 20
    while len(out) < n and time.monotonic() < deadline:
        for recs in reader.poll(timeout_ms=500).values():
            out += recs
    reader.close()
    return out


def test_msgpack_documents_over_kafka_and_da00_out(broker, msgpack_run, ge, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path, offline, acc = msgpack_run
    assert len(acc.records) == 3  # the offline fold took the windows from the msgpack Events
    replay(path, broker.bootstrap, prefix="fmt")
    source = KafkaSource(broker.bootstrap, "fmt")
    livedata = KafkaLivedataSink(broker.bootstrap, "fmt")
    letters: list[str] = []
    try:
        service = ConsumerService(
            source, tmp_path / "state", dead_letter=lambda m, r: letters.append(r)
        )
        service.set_snapshot_sink(livedata.bind(service.run_info))
        service.run(idle_exit_s=30)
        livedata.flush()
    finally:
        source.close()
        livedata.close()
    assert service.done
    assert letters == []
    live = service.pipeline.acc
    assert live is not None
    np.testing.assert_array_equal(live.counts, acc.counts)  # bitwise
    assert service.summary()["events_folded"] == offline["events_folded"]
    # two da00 messages per orientation, keyed by their source name
    records = _read_all(broker.bootstrap, "fmt_livedata", 2 * len(acc.records))
    assert len(records) == 2 * len(acc.records)
    assert all(dict(r.headers)["schema"] == b"da00" for r in records)
    by_source: dict[str, list] = {}  # type: ignore[type-arg]
    for r in records:
        msg = deserialise_da00(r.value)
        assert r.key == msg.source_name.encode()
        by_source.setdefault(msg.source_name, []).append(msg)
    assert set(by_source) == {IQE_SOURCE, IQE_COVERAGE_SOURCE}
    last = {v.name: v for v in by_source[IQE_SOURCE][-1].data}
    snap = acc.snapshot()
    np.testing.assert_array_equal(last["signal"].data, snap.intensity)
    np.testing.assert_array_equal(last["errors"].data, np.sqrt(snap.variance))
    assert last["signal"].unit == "1/(uC*sr*meV)"
    assert last["signal"].source == f"run:{(service.run_info() or {}).get('run_id')}"
    assert last["n_orientations"].data == 3
    np.testing.assert_array_equal(last["energy"].data, ge.grid.energy_edges)
    cover = {v.name: v for v in by_source[IQE_COVERAGE_SOURCE][-1].data}
    np.testing.assert_array_equal(cover["signal"].data, snap.exposure)
