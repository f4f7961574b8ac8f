"""Beam monitors through the pipeline: per-orientation monitor counts, checkpoints, a
monitor stream that stops, and the monitor normalisation (consumers.reduction).

One small simulated Ge run with its two monitors (4 orientations of 2 s, 5e3 events each,
monitor1 at 3 counts/uC: ~8e3 counts per orientation) is made once per module and folded
message by message with :class:`RunPipeline` (no background thread, no moments).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from streaming_data_types import deserialise_ev44

from consumers.exceptions import ConsumerError
from consumers.reduction.pipeline import MalformedMessage, RunPipeline, schema_of
from consumers.reduction.segment import Segmenter
from consumers.streams import InstrumentConfig, StreamRule, preset
from simulations.runs.recording import RecordedMessage, RunReader
from simulations.runs.simulate import SIMULATED_MONITORS, RunPlan, simulate_run

PLAN = RunPlan(
    material="Ge",
    fc="raman",
    omegas=(0.0, 1.0, 2.0, 3.0),
    events_per_orientation=5000,
    count_time=2.0,
    mesh=8,
    seed=11,
    monitors=True,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> list[RecordedMessage]:
    path = tmp_path_factory.mktemp("monitors") / "run.run"
    simulate_run(PLAN, path, progress=False)
    return list(RunReader(path))


def _pipe(**settings: str) -> RunPipeline:
    return RunPipeline(
        background=False, moments=False, streams=preset("simulator", "arcs", **settings)
    )


def _feed(pipe: RunPipeline, msgs: Iterable[RecordedMessage]) -> None:
    for m in msgs:
        pipe.handle(schema_of(m.headers, m.payload), m.payload, m.timestamp_ns, m.key, m.topic)


def _fold(msgs: list[RecordedMessage], **settings: str) -> RunPipeline:
    pipe = _pipe(**settings)
    _feed(pipe, msgs)
    pipe.finish()
    return pipe


def _monitor_pulses(msgs: list[RecordedMessage], source: str) -> tuple[np.ndarray, np.ndarray]:
    """Pulse times (ns) and counts per pulse of one monitor, decoded independently."""
    times, counts = [], []
    for m in msgs:
        if m.topic != "arcs_monitor":
            continue
        d = deserialise_ev44(m.payload)
        if d.source_name != source:
            continue
        times.append(np.asarray(d.reference_time, np.int64))
        idx = np.asarray(d.reference_time_index, np.int64)
        counts.append(np.diff(np.append(idx, len(d.time_of_flight))))
    return np.concatenate(times), np.concatenate(counts)


def _windows(msgs: list[RecordedMessage]) -> list[tuple[int, int]]:
    out = []
    for m in msgs:
        if m.topic == "arcs_bluesky":
            name, doc = json.loads(m.payload)
            if name == "event":
                out.append((doc["data"]["count_start_ns"], doc["data"]["count_stop_ns"]))
    return out


def test_monitor_events_land_in_their_windows(run: list[RecordedMessage]) -> None:
    pipe = _fold(run)
    assert pipe.acc is not None
    records = pipe.acc.records
    windows = _windows(run)
    assert len(records) == len(windows) == len(PLAN.omegas)
    summary: dict[str, Any] = pipe.summary()
    for spec in SIMULATED_MONITORS:
        t, n = _monitor_pulses(run, spec.source)
        expected = [int(n[(t >= lo) & (t < hi)].sum()) for lo, hi in windows]
        assert [r.monitor_counts[spec.source] for r in records] == expected
        assert min(expected) > 1000
        # nothing lost: in the windows, or outside them (the goniometer moving)
        outside = summary["monitor_outside_windows"][spec.source]
        assert outside > 0
        assert sum(expected) + outside == int(n.sum())
    assert all(not r.monitor_incomplete for r in records)
    assert summary["orientations_monitor_incomplete"] == 0
    assert summary["monitor_counts_total"] == sum(r.monitor_total for r in records)
    assert summary["proton_charge_uC"] == pytest.approx(sum(r.proton_charge for r in records))
    # charge normalisation (the default): the weight is the charge
    assert [r.weight for r in records] == [r.proton_charge for r in records]


def test_checkpoint_mid_run_gives_the_uninterrupted_fold(run: list[RecordedMessage]) -> None:
    whole = _fold(run, normalisation="monitor", monitor="monitor1")
    # cut inside the third orientation's counting, with monitor events buffered
    lo, hi = _windows(run)[2]
    cut = next(i for i, m in enumerate(run) if m.timestamp_ns >= (lo + hi) // 2)
    first = _pipe(normalisation="monitor", monitor="monitor1")
    _feed(first, run[:cut])
    js, arrays = first.state()
    assert len(arrays["seg_mon_t"]) > 0  # monitor pulses waiting for their window
    resumed = _pipe(normalisation="monitor", monitor="monitor1")
    resumed.restore(json.loads(json.dumps(js)), {k: np.array(v) for k, v in arrays.items()})
    _feed(resumed, run[cut:])
    resumed.finish()
    assert whole.acc is not None
    assert resumed.acc is not None
    assert [r.to_json() for r in resumed.acc.records] == [r.to_json() for r in whole.acc.records]
    np.testing.assert_array_equal(resumed.acc.counts, whole.acc.counts)
    np.testing.assert_array_equal(resumed.acc.exposure, whole.acc.exposure)
    assert resumed.summary() == whole.summary()


def test_a_checkpoint_of_another_normalisation_is_refused(run: list[RecordedMessage]) -> None:
    first = _pipe()
    _feed(first, run[:50])
    js, arrays = first.state()
    with pytest.raises(ConsumerError, match="normalised by proton_charge"):
        _pipe(normalisation="monitor").restore(js, arrays)


def test_a_monitor_stream_that_stops_is_flagged(
    run: list[RecordedMessage], caplog: pytest.LogCaptureFixture
) -> None:
    lo, hi = _windows(run)[1]
    stop = (lo + hi) // 2  # monitor1 stops in the middle of the second orientation
    cut = [
        m
        for m in run
        if not (
            m.topic == "arcs_monitor"
            and m.timestamp_ns >= stop
            and deserialise_ev44(m.payload).source_name == "monitor1"
        )
    ]
    with caplog.at_level("WARNING"):
        pipe = _fold(cut, normalisation="monitor", monitor="monitor1")
    assert pipe.acc is not None
    records = pipe.acc.records
    assert [r.monitor_incomplete for r in records] == [(), ("monitor1",), ("monitor1",)] + [
        ("monitor1",)
    ] * (len(records) - 3)
    assert pipe.summary()["orientations_monitor_incomplete"] == len(records) - 1
    assert "monitor stream monitor1 did not reach its end" in caplog.text
    # nothing lost: what monitor1 sent is in the windows or outside them
    _, n = _monitor_pulses(cut, "monitor1")
    summary: dict[str, Any] = pipe.summary()
    in_windows = summary["monitor_counts"]["monitor1"]
    assert in_windows + summary["monitor_outside_windows"]["monitor1"] == int(n.sum())
    # monitor2 goes on, complete
    whole = _fold(run)
    assert whole.acc is not None
    assert [r.monitor_counts["monitor2"] for r in records] == [
        r.monitor_counts["monitor2"] for r in whole.acc.records
    ]
    # the flagged orientations are weighted by charge x the first orientation's ratio
    ratio = records[0].monitor_counts["monitor1"] / records[0].proton_charge
    for r in records[1:]:
        assert r.normalised
        assert r.weight == pytest.approx(r.proton_charge * ratio, rel=1e-12)
    # the detector's counts are all there
    np.testing.assert_array_equal(pipe.acc.counts, whole.acc.counts)


def test_segmenter_stops_waiting_for_a_stopped_monitor() -> None:
    """A window waits for a monitor stream until the detector is ``monitor_lag_ns`` past."""
    seg = Segmenter("bluesky", monitors=("m1",), monitor_lag_ns=1000)
    one = np.array([0], np.int32)
    seg.on_monitor("m1", np.array([0, 10]), np.array([0, 2]), 5)  # 2 and 3 counts
    assert seg.on_bluesky("event", {"data": {"omega": 1.0, "count_start_ns": 0,
                                             "count_stop_ns": 100}}) == []  # fmt: skip
    seg.on_charge(0, 1.0)
    seg.on_charge(200, 1.0)
    assert seg.on_events(np.array([150]), one, np.array([7], np.int32), one) == []  # waits
    assert seg.on_events(np.array([1099]), one, np.array([7], np.int32), one) == []
    (chunk,) = seg.on_events(np.array([1100]), one, np.array([7], np.int32), one)
    assert chunk.monitor_counts == {"m1": 5}
    assert chunk.monitor_incomplete == ("m1",)
    # a stream that has reached the window's end closes it at once, complete
    seg = Segmenter("bluesky", monitors=("m1",), monitor_lag_ns=1000)
    seg.on_bluesky("event", {"data": {"omega": 1.0, "count_start_ns": 0, "count_stop_ns": 100}})
    seg.on_charge(200, 1.0)
    seg.on_events(np.array([150]), one, np.array([7], np.int32), one)
    (chunk,) = seg.on_monitor("m1", np.array([50, 100]), np.array([0, 4]), 6)
    assert chunk.monitor_counts == {"m1": 4}
    assert chunk.monitor_incomplete == ()


def test_monitor_normalisation_is_proportional_to_the_charge_one(
    run: list[RecordedMessage],
) -> None:
    by_charge = _fold(run)
    by_monitor = _fold(run, normalisation="monitor", monitor="monitor1")
    assert by_charge.acc is not None
    assert by_monitor.acc is not None
    np.testing.assert_array_equal(by_monitor.acc.counts, by_charge.acc.counts)
    records = by_monitor.acc.records
    assert [r.weight for r in records] == [float(r.monitor_counts["monitor1"]) for r in records]
    a, b = by_charge.acc.snapshot(), by_monitor.acc.snapshot()
    np.testing.assert_array_equal(a.mask, b.mask)
    # I_charge / I_monitor = sum_k M_k c_k / sum_k Q_k c_k per bin: a weighted mean of
    # M_k / Q_k, each Poisson about 3 counts/uC with relative sd 1 / sqrt(M_k); 5 sd of the
    # smallest orientation's count bound every bin (~8e3 counts: 5.6 %)
    measured = a.mask & (a.counts > 0)
    ratio = a.intensity[measured] / b.intensity[measured]
    m_min = min(r.monitor_counts["monitor1"] for r in records)
    rate = SIMULATED_MONITORS[0].counts_per_uC
    assert np.all(np.abs(ratio / rate - 1) < 5 / np.sqrt(m_min))
    # and the ratios differ between bins only by the scatter of the monitor counts
    assert np.ptp(ratio) > 0
    assert by_monitor.summary()["normalisation"] == "monitor"


def test_monitor_normalisation_needs_a_monitor(tmp_path: Path) -> None:
    plan = RunPlan(
        material="Ge",
        fc="raman",
        omegas=(0.0,),
        events_per_orientation=200,
        count_time=0.5,
        mesh=8,
        seed=2,
        monitors=False,
    )
    path = tmp_path / "nomon.run"
    simulate_run(plan, path, progress=False)
    config = InstrumentConfig(
        name="arcs",
        prefix="arcs",
        keyed_by_run=True,
        normalisation="monitor",
        streams=tuple(r for r in preset("simulator", "arcs").streams if r.role != "monitor"),
    )
    pipe = RunPipeline(background=False, moments=False, streams=config)
    start = next(iter(RunReader(path)))
    with pytest.raises(MalformedMessage, match="names a beam monitor") as err:
        pipe.handle("pl72", start.payload, start.timestamp_ns, start.key, start.topic)
    assert 'normalisation = "proton_charge"' in str(err.value)
    assert pipe.segmenter is None  # waits for a usable run start
    # a wildcard monitor stream alone does not say which monitor
    with pytest.raises(ConsumerError, match="names a beam monitor"):
        preset("ess", "x", normalisation="monitor").normalisation_monitor()
    # a named monitor that the config maps to another role
    with pytest.raises(ValueError, match="not monitor"):
        InstrumentConfig(
            name="x",
            prefix="x",
            normalisation="monitor",
            monitor="det",
            streams=(
                StreamRule(topic="x_run", role="run_control"),
                StreamRule(topic="x_det", source="det", role="detector"),
            ),
        )
    assert preset("ess", "x", normalisation="monitor", monitor="m1").normalisation_monitor() == (
        "m1"
    )


def test_the_nexus_export_records_monitors_and_charge(
    run: list[RecordedMessage], tmp_path: Path
) -> None:
    import h5py

    pipe = _fold(run, normalisation="monitor", monitor="monitor1")
    assert pipe.acc is not None
    records = pipe.acc.records
    path = pipe.acc.write_hdf5(tmp_path / "run.nxs")
    with h5py.File(path, "r") as f:
        entry = f["entry"]
        assert entry.attrs["normalisation"] == "monitor"
        assert entry["iqe/intensity"].attrs["units"] == "1/(sr*meV)"
        for spec in SIMULATED_MONITORS:
            g = entry[f"instrument/{spec.source}"]
            assert g.attrs["NX_class"] == "NXmonitor"
            counts = [r.monitor_counts[spec.source] for r in records]
            assert g["orientation_counts"][()].tolist() == counts
            assert int(g["integral"][()]) == sum(counts)
            assert not g["orientation_incomplete"][()].any()
        o = entry["orientations"]
        np.testing.assert_array_equal(o["proton_charge"][()], [r.proton_charge for r in records])
        assert json.loads(o["monitor_counts"].attrs["sources"]) == ["monitor1", "monitor2"]
        assert o["monitor_total"][()].tolist() == [r.monitor_total for r in records]
        assert o["weight"][()].tolist() == [r.monitor_counts["monitor1"] for r in records]
