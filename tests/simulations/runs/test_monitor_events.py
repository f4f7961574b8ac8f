"""The simulator's beam-monitor events (simulations.runs.simulate, ``RunPlan.monitors``).

One tiny Ge run (2 orientations, 1 s each) is written with monitors and once without; the
monitor events are decoded with ``streaming_data_types`` and checked against the pulse
charges they were drawn from.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from streaming_data_types import deserialise_ev44, deserialise_f144, deserialise_pl72

from simulations.instrument.spectrometer import energy_to_speed
from simulations.runs.recording import RecordedMessage, RunReader
from simulations.runs.simulate import (
    MONITOR_TOF_SPREAD_NS,
    SIMULATED_MONITORS,
    RunPlan,
    simulate_run,
)

PLAN = RunPlan(
    material="Ge",
    fc="raman",
    omegas=(0.0, 1.0),
    events_per_orientation=500,
    count_time=1.0,
    mesh=8,
    seed=3,
    monitors=True,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[RecordedMessage]]:
    out = {}
    for name, plan, layout in (
        ("on", PLAN, "simulator"),
        ("off", replace(PLAN, monitors=False), "simulator"),
        ("ess", PLAN, "ess"),
    ):
        path = tmp_path_factory.mktemp("mon") / f"{name}.run"
        simulate_run(plan, path, progress=False, stream_layout=layout)
        out[name] = list(RunReader(path))
    return out


def test_monitor_events_follow_the_pulse_charge(runs: dict[str, list[RecordedMessage]]) -> None:
    msgs = runs["on"]
    mon = [m for m in msgs if m.topic == "arcs_monitor"]
    assert mon, "no message on arcs_monitor"
    charge = {
        d.timestamp_unix_ns: d.value
        for m in msgs
        if m.topic == "arcs_motion"
        and (d := deserialise_f144(m.payload)).source_name == "proton_charge"
    }
    pl72 = deserialise_pl72(next(m for m in msgs if m.topic == "arcs_runInfo").payload)
    meta = json.loads(pl72.metadata)
    assert meta["topics"]["monitor"] == "arcs_monitor"
    assert [m["source"] for m in meta["monitors"]] == ["monitor1", "monitor2"]
    structure = pl72.nexus_structure
    assert structure.count('"NXmonitor"') == 2
    assert '"arcs_monitor"' in structure
    speed = float(energy_to_speed(meta["ei_meV"]))
    l1 = float(meta["instrument"]["l1_m"])
    for spec in SIMULATED_MONITORS:
        evs = [d for m in mon if (d := deserialise_ev44(m.payload)).source_name == spec.source]
        assert evs
        n = sum(len(d.time_of_flight) for d in evs)
        q = sum(charge[int(t)] for d in evs for t in d.reference_time)
        # Poisson: mean counts_per_uC * charge, 5 standard deviations
        mean = spec.counts_per_uC * q
        assert abs(n - mean) < 5 * np.sqrt(mean), (spec.source, n, mean)
        ids = np.concatenate([d.pixel_id for d in evs])
        assert set(ids.tolist()) == {spec.pixel_id}
        tof = np.concatenate([d.time_of_flight for d in evs]).astype(float)
        t0 = (l1 + spec.distance) / speed * 1e9
        assert abs(tof.mean() - t0) < 5 * MONITOR_TOF_SPREAD_NS / np.sqrt(len(tof))
        assert tof.std() == pytest.approx(MONITOR_TOF_SPREAD_NS, rel=0.1)
        # every pulse of the detector's messages has its monitor entry
        assert all(len(d.reference_time) == len(d.reference_time_index) for d in evs)


def test_monitors_leave_the_other_messages_unchanged(
    runs: dict[str, list[RecordedMessage]],
) -> None:
    """The monitors draw from their own generator: the detector events, charges and
    readbacks are byte for byte the same (the run start names the monitors, and the
    bluesky uids derive from the plan, so those differ)."""
    kept = ("arcs_events", "arcs_motion")
    on = [m for m in runs["on"] if m.topic in kept]
    off = [m for m in runs["off"] if m.topic in kept]
    assert len(on) > 100
    assert [(m.topic, m.timestamp_ns, m.payload) for m in on] == [
        (m.topic, m.timestamp_ns, m.payload) for m in off
    ]
    assert not any(m.topic == "arcs_monitor" for m in runs["off"])


def test_ess_layout_monitors(runs: dict[str, list[RecordedMessage]]) -> None:
    mon = [m for m in runs["ess"] if m.topic == "arcs_beam_monitor"]
    on = [m for m in runs["on"] if m.topic == "arcs_monitor"]
    assert [m.payload for m in mon] == [m.payload for m in on]
    assert all(m.key is None for m in mon)
