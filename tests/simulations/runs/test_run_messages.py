"""A simulated run as the messages an instrument publishes (simulations.runs.simulate).

One small Ge run (3 orientations, ~5000 events each) is generated once per module and read
back with :class:`simulations.runs.recording.RunReader`; every payload is decoded with the
ESS ``streaming_data_types`` deserialisers and every bluesky document validated against the
``event_model`` JSON schemas.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import event_model
import numpy as np
import pytest
from numpy.testing import assert_allclose
from streaming_data_types import (
    deserialise_6s4t,
    deserialise_ev44,
    deserialise_f144,
    deserialise_pl72,
)

from simulations.exceptions import InstrumentError, SimulationError, StructureError
from simulations.instrument.spectrometer import Instrument, energy_to_speed
from simulations.runs.recording import RecordedMessage, RunReader
from simulations.runs.simulate import DEFAULT_START_NS, RunPlan, parse_omegas, simulate_run

PLAN = RunPlan(
    material="Ge",
    fc="raman",
    omegas=(0.0, 1.0, 2.0),
    events_per_orientation=5000,
    count_time=2.0,
    mesh=16,
    seed=1,
)
TINY = RunPlan(
    material="Ge",
    fc="raman",
    omegas=(0.0,),
    events_per_orientation=500,
    count_time=1.0,
    mesh=8,
    seed=1,
)
PERIOD_NS = 16_666_667  # 60 Hz pulses, rounded to ns as the simulator does
DECODERS = {
    "ev44": deserialise_ev44,
    "f144": deserialise_f144,
    "pl72": deserialise_pl72,
    "6s4t": deserialise_6s4t,
}


class Run:
    """The recorded messages of one run, decoded once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with RunReader(path) as reader:
            self.file_metadata = reader.metadata
            self.messages: list[RecordedMessage] = list(reader)
        self.decoded: list[Any] = []
        for m in self.messages:
            schema = dict(m.headers)["schema"].decode()
            if schema == "bluesky-json":
                self.decoded.append(json.loads(m.payload))
            else:
                self.decoded.append(DECODERS[schema](m.payload))

    def of_schema(self, schema: str) -> list[tuple[RecordedMessage, Any]]:
        return [
            (m, d)
            for m, d in zip(self.messages, self.decoded, strict=True)
            if dict(m.headers)["schema"] == schema.encode()
        ]

    def f144(self, source: str) -> list[tuple[RecordedMessage, Any]]:
        return [(m, d) for m, d in self.of_schema("f144") if d.source_name == source]

    @property
    def docs(self) -> list[tuple[str, dict[str, Any]]]:
        return [(name, doc) for _, (name, doc) in self.of_schema("bluesky-json")]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    path = tmp_path_factory.mktemp("run") / "ge.steer"
    summary = simulate_run(PLAN, path, progress=False)
    assert summary.orientations == 3
    assert summary.path == str(path)
    recorded = Run(path)
    assert summary.messages == len(recorded.messages)
    assert summary.events == sum(len(d.pixel_id) for _, d in recorded.of_schema("ev44"))
    return recorded


@pytest.fixture(scope="module")
def instrument() -> Instrument:
    return Instrument.arcs_like()  # the default of simulate_run


def _keys(obj: object) -> list[str]:
    """Every dict key in a JSON tree."""
    if isinstance(obj, dict):
        return [*map(str, obj), *(k for v in obj.values() for k in _keys(v))]
    if isinstance(obj, list):
        return [k for v in obj for k in _keys(v)]
    return []


# -- message framing ----------------------------------------------------------------------------


def test_every_message_decodes_by_its_schema_and_topic(run: Run) -> None:
    run_id = "sim-Ge-1"
    topic_of = {
        "pl72": "arcs_runInfo",
        "6s4t": "arcs_runInfo",
        "f144": "arcs_motion",
        "ev44": "arcs_events",
        "bluesky-json": "arcs_bluesky",
    }
    counts: Counter[str] = Counter()
    for m in run.messages:
        schema = dict(m.headers)["schema"].decode()
        counts[schema] += 1
        assert m.topic == topic_of[schema]
        assert m.key == run_id.encode()
    assert counts["pl72"] == 1
    assert counts["6s4t"] == 1
    assert counts["bluesky-json"] == 6  # start, descriptor, 3 events, stop
    assert counts["ev44"] > 0
    assert counts["f144"] > 0
    assert run.file_metadata["run_id"] == run_id
    assert run.file_metadata["topics"] == {
        "run_info": "arcs_runInfo",
        "motion": "arcs_motion",
        "events": "arcs_events",
        "bluesky": "arcs_bluesky",
    }


def test_timestamps_order_and_run_start_stop(run: Run) -> None:
    ts = np.array([m.timestamp_ns for m in run.messages])
    assert np.all(np.diff(ts) >= 0)
    assert ts[0] == DEFAULT_START_NS
    first, last = run.messages[0], run.messages[-1]
    assert dict(first.headers)["schema"] == b"pl72"
    assert dict(last.headers)["schema"] == b"6s4t"
    start, stop = run.decoded[0], run.decoded[-1]
    assert start.job_id == stop.job_id == "sim-Ge-1"
    assert start.start_time == first.timestamp_ns // 10**6  # ms
    assert stop.stop_time == last.timestamp_ns // 10**6
    # f144 and ev44 payload times agree with the Kafka timestamps
    for m, d in run.of_schema("f144"):
        assert d.timestamp_unix_ns == m.timestamp_ns
    for m, d in run.of_schema("ev44"):
        assert d.reference_time[0] == m.timestamp_ns


def test_pl72_metadata(run: Run) -> None:
    meta = json.loads(run.decoded[0].metadata)
    for key in ("material", "ei_meV", "temperature_K", "orientation", "instrument"):
        assert key in meta
    assert meta["material"] == "Ge"
    assert meta["ei_meV"] > 70.0  # above Ge's energy window
    assert meta["temperature_K"] == PLAN.temperature
    ub = np.array(meta["orientation"]["ub_matrix"])
    assert ub.shape == (3, 3)
    assert np.all(np.isfinite(ub))
    assert meta["instrument"]["n_pixels"] == 400 * 256
    assert meta["planned_omegas_deg"] == [0.0, 1.0, 2.0]
    keys = _keys(meta)
    assert len(keys) > 30
    assert not [k for k in keys if "fingerprint" in k.lower()]


def test_motion_sources(run: Run) -> None:
    sources = Counter(d.source_name for _, d in run.of_schema("f144"))
    assert set(sources) == {"omega", "omega_setpoint", "proton_charge"}
    setpoints = [float(d.value) for _, d in run.f144("omega_setpoint")]
    assert setpoints == [0.0, 1.0, 2.0]


# -- bluesky ------------------------------------------------------------------------------------


def test_bluesky_documents_validate_in_order(run: Run) -> None:
    docs = run.docs
    assert [name for name, _ in docs] == [
        "start",
        "descriptor",
        "event",
        "event",
        "event",
        "stop",
    ]
    for name, doc in docs:
        event_model.schema_validators[event_model.DocumentNames[name]].validate(doc)
    start, desc, stop = docs[0][1], docs[1][1], docs[-1][1]
    events = [doc for name, doc in docs if name == "event"]
    assert desc["run_start"] == start["uid"]
    assert stop["run_start"] == start["uid"]
    assert all(e["descriptor"] == desc["uid"] for e in events)
    assert [e["seq_num"] for e in events] == [1, 2, 3]
    assert stop["exit_status"] == "success"
    assert stop["num_events"] == {"primary": 3}
    assert len({doc["uid"] for _, doc in docs}) == 6


def test_events_match_the_messages_in_their_window(run: Run) -> None:
    events = [doc for name, doc in run.docs if name == "event"]
    ev44 = run.of_schema("ev44")
    charges = run.f144("proton_charge")
    for e, setpoint in zip(events, PLAN.omegas, strict=True):
        data = e["data"]
        assert data["omega_setpoint"] == setpoint
        assert abs(data["omega"] - setpoint) < 0.01  # readback jitter is 0.002 deg
        assert data["count_start"] < data["count_stop"]
        assert_allclose(data["count_time"], PLAN.count_time, rtol=1e-6)
        # the window edges are pulse times; as float seconds they carry ~0.2 us rounding,
        # so compare pulse times against edges shifted by half a pulse period
        lo = data["count_start"] * 1e9 - PERIOD_NS / 2
        hi = data["count_stop"] * 1e9 - PERIOD_NS / 2
        n_events = 0
        n_pulses = 0
        for _, d in ev44:
            inside = (d.reference_time >= lo) & (d.reference_time < hi)
            assert inside.all() or not inside.any()  # a message never straddles an edge
            if inside.any():
                n_events += len(d.pixel_id)
                n_pulses += len(d.reference_time)
        assert n_pulses == round(PLAN.count_time * PLAN.pulse_rate)
        assert n_events == data["events"]
        assert data["events"] > 1000
        charge = sum(float(d.value) for m, d in charges if lo <= m.timestamp_ns < hi)
        assert_allclose(charge, data["proton_charge"], rtol=1e-9)
        assert_allclose(charge / n_pulses, PLAN.proton_charge, rtol=0.01)


# -- ev44 ---------------------------------------------------------------------------------------


def test_ev44_consistency(run: Run, instrument: Instrument) -> None:
    meta = json.loads(run.decoded[0].metadata)
    t_i_ns = instrument.l1 / float(energy_to_speed(meta["ei_meV"])) * 1e9
    message_ids = []
    for _, d in run.of_schema("ev44"):
        message_ids.append(d.message_id)
        assert d.source_name == "arcs_detector"
        n = len(d.pixel_id)
        assert len(d.time_of_flight) == n
        idx = d.reference_time_index
        assert len(idx) == len(d.reference_time) == PLAN.pulses_per_message
        assert idx[0] == 0
        assert np.all(np.diff(idx) >= 0)
        assert np.all((idx >= 0) & (idx <= n))
        assert np.all(np.diff(d.reference_time) == PERIOD_NS)
        assert np.all((d.pixel_id >= 0) & (d.pixel_id < instrument.n_pixels))
        assert np.all(d.time_of_flight > t_i_ns)
    assert message_ids == list(range(len(message_ids)))


# -- determinism --------------------------------------------------------------------------------


def test_same_plan_and_seed_give_identical_bytes(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.steer", tmp_path / "b.steer", tmp_path / "c.steer"
    simulate_run(TINY, a, progress=False)
    simulate_run(TINY, b, progress=False)
    other = RunPlan(**{**{f: getattr(TINY, f) for f in TINY.__dataclass_fields__}, "seed": 2})
    simulate_run(other, c, progress=False)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


# -- bad input ----------------------------------------------------------------------------------


def test_unknown_material(tmp_path: Path) -> None:
    plan = RunPlan(material="Unobtainium", omegas=(0.0,), events_per_orientation=10)
    with pytest.raises(StructureError, match="unknown material 'Unobtainium'") as err:
        simulate_run(plan, tmp_path / "x.steer", progress=False)
    assert isinstance(err.value, SimulationError)


def test_omegas_outside_goniometer_limits(tmp_path: Path) -> None:
    plan = RunPlan(material="Ge", omegas=(0.0, 400.0), events_per_orientation=10)
    with pytest.raises(InstrumentError, match=r"0\.\.400 deg is outside the goniometer limits"):
        simulate_run(plan, tmp_path / "x.steer", progress=False)


@pytest.mark.parametrize("events", [-1.0, 0.0, 1e12, float("nan")])
def test_events_out_of_range(tmp_path: Path, events: float) -> None:
    """Refused before anything is drawn or written (1e12 once ended in a traceback and a
    partial file; 0 in an empty run with exit 0)."""
    plan = RunPlan(material="Ge", omegas=(0.0,), events_per_orientation=events)
    with pytest.raises(InstrumentError, match=r"events per orientation must be > 0 and at most"):
        simulate_run(plan, tmp_path / "x.steer", progress=False)
    assert not (tmp_path / "x.steer").exists()


def test_omegas_are_counted_before_they_are_made() -> None:
    from simulations.runs.simulate import parse_omegas

    with pytest.raises(InstrumentError, match=r"gives 1e\+09 angles; at most 3600"):
        parse_omegas("0:1e9:1")
    with pytest.raises(InstrumentError, match=r"at most 3600"):
        parse_omegas("0:4:1e-12")
    assert parse_omegas("0:3:1").tolist() == [0.0, 1.0, 2.0]


def test_ei_below_energy_window(tmp_path: Path) -> None:
    plan = RunPlan(material="Ge", omegas=(0.0,), events_per_orientation=10, ei=30.0)
    with pytest.raises(InstrumentError, match=r"Ei = 30 meV is too small for Ge's energy window"):
        simulate_run(plan, tmp_path / "x.steer", progress=False)


@pytest.mark.parametrize("spec", ["1:2:0", "abc", "2:1", "0:1:2:3"])
def test_parse_omegas_errors(spec: str) -> None:
    with pytest.raises(InstrumentError, match=f"cannot read omegas '{spec}'"):
        parse_omegas(spec)


def test_parse_omegas() -> None:
    assert parse_omegas("0:4:1").tolist() == [0.0, 1.0, 2.0, 3.0]
    assert parse_omegas("0:1:0.25").tolist() == [0.0, 0.25, 0.5, 0.75]
    assert parse_omegas("10:0:-5").tolist() == [10.0, 5.0]
    assert parse_omegas("3, 1,2").tolist() == [3.0, 1.0, 2.0]


def test_f144_template_payloads_equal_serialise_f144() -> None:
    """The fast per-pulse f144 path must produce exactly the library's bytes."""
    from streaming_data_types.logdata_f144 import serialise_f144

    from simulations.runs.simulate import _F144Template

    rng = np.random.default_rng(11)
    for source in ("proton_charge", "omega", "omega_setpoint"):
        template = _F144Template(source)
        for _ in range(500):
            value = float(rng.normal() * 100)
            t_ns = int(rng.integers(0, 2**62))
            assert template.payload(value, t_ns) == serialise_f144(source, value, t_ns)
