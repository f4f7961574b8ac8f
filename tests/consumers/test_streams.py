"""The instrument config: (topic, source) -> role, its files and presets, and folds of a run
published with ESS topic and source names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from consumers.exceptions import ConsumerError
from consumers.streams import (
    InstrumentConfig,
    StreamTally,
    load_instrument_config,
    preset,
)

ESS_TOML = """
name = "bifrost"
prefix = "bifrost"

[[streams]]
topic = "{prefix}_filewriter"
role = "run_control"

[[streams]]
topic = "{prefix}_detector"
role = "detector"

[[streams]]
topic = "{prefix}_detector"
source = "bifrost_mon"
role = "monitor"

[[streams]]
topic = "{prefix}_motion"
source = "BIFROST-Gon:Rz.RBV"
role = "goniometer"
"""


def test_presets_map_the_simulators_and_ess_names() -> None:
    sim = preset("simulator", "arcs")
    assert sim.topics() == [
        "arcs_runInfo",
        "arcs_events",
        "arcs_motion",
        "arcs_monitor",
        "arcs_bluesky",
    ]
    assert sim.topics(bluesky=False)[-1] == "arcs_monitor"
    assert sim.role("arcs_motion", "omega") == "goniometer"
    assert sim.role("arcs_motion", "proton_charge") == "proton_charge"
    assert sim.role("arcs_events", "anything") == "detector"
    assert sim.role("arcs_motion", "temperature") is None
    assert sim.role("other_motion", "omega") is None  # the topic counts
    assert sim.role("", "omega") == "goniometer"  # without a topic: by source name
    assert sim.keyed_by_run
    ess = preset("ess", "bifrost")
    assert not ess.keyed_by_run
    assert ess.role("bifrost_detector", "bifrost_detector_0") == "detector"
    assert ess.role("bifrost_beam_monitor", "m1") == "monitor"
    assert ess.sources("goniometer") == []  # the run start names it
    assert ess.role("bifrost_motion", "SE:T") == "log"


def test_toml_and_yaml_files_load_with_the_prefix_filled_in(tmp_path: Path) -> None:
    path = tmp_path / "bifrost.toml"
    path.write_text(ESS_TOML)
    cfg = load_instrument_config(path)
    assert cfg.topics() == ["bifrost_filewriter", "bifrost_detector", "bifrost_motion"]
    # an exact source wins over the topic's wildcard
    assert cfg.role("bifrost_detector", "bifrost_mon") == "monitor"
    assert cfg.role("bifrost_detector", "bank1") == "detector"
    assert load_instrument_config(path, prefix="test").prefix == "bifrost"  # the file names its own
    # the TOML it writes reads back the same, and YAML works too
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml())
    assert load_instrument_config(again) == cfg
    yaml_path = tmp_path / "bifrost.yaml"
    yaml_path.write_text(
        "name: b\nprefix: b\nstreams:\n"
        "  - {topic: '{prefix}_filewriter', role: run_control}\n"
        "  - {topic: '{prefix}_detector', role: detector}\n"
    )
    assert load_instrument_config(yaml_path).topics() == ["b_filewriter", "b_detector"]
    assert load_instrument_config("ess", prefix="dream").topics()[0] == "dream_filewriter"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name = "x"\nprefix = "x"\nstreams = []', "no run_control and no detector"),
        (
            ESS_TOML + '\n[[streams]]\ntopic = "{prefix}_motion"\nrole = "goniometer"\n',
            "must name its f144 source",
        ),
        (
            ESS_TOML
            + '\n[[streams]]\ntopic = "{prefix}_motion"\nsource = "BIFROST-Gon:Rz.RBV"\n'
            + 'role = "proton_charge"\n',
            "mapped twice",
        ),
        (ESS_TOML.replace('role = "detector"', 'role = "detectr"'), "streams.1.role"),
        (ESS_TOML + "\nspeed = 3\n", "speed"),
        ("name = [", "is not valid"),
        (ESS_TOML.replace('prefix = "bifrost"', 'prefix = "a b"'), "prefix"),
    ],
)
def test_bad_configs_are_refused_naming_the_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConsumerError, match=message):
        load_instrument_config(path)


def test_a_missing_file_or_preset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConsumerError, match=r"No such file.*preset \(simulator, ess\)"):
        load_instrument_config(tmp_path / "nope.toml")


def test_the_run_start_fills_in_roles_the_config_leaves_out() -> None:
    ess = preset("ess", "bifrost")
    named = {
        "goniometer": [("bifrost_motion", "ROT.RBV")],
        "proton_charge": [("", "ACC:Q")],  # no topic: the config's f144 log topic
        "monitor": [("bifrost_beam_monitor", "mon0")],
    }
    no_logs = InstrumentConfig.model_validate(
        {
            "name": "b",
            "prefix": "b",
            "streams": [
                {"topic": "b_fw", "role": "run_control"},
                {"topic": "b_det", "role": "detector"},
            ],
        }
    )
    with pytest.raises(ConsumerError, match="no f144 log topic"):
        no_logs.with_run_start({"proton_charge": [("", "ACC:Q")]})
    full = ess.with_run_start({"goniometer": [("bifrost_motion", "ROT.RBV")]}).with_run_start(named)
    assert full.role("bifrost_motion", "ROT.RBV") == "goniometer"
    assert full.role("bifrost_motion", "ACC:Q") == "proton_charge"
    # the config's own monitor rule (a wildcard) stays; the run start adds none
    assert full.sources("monitor") == [("bifrost_beam_monitor", "*")]
    # a config that names its goniometer keeps it
    own = full.with_run_start({"goniometer": [("bifrost_motion", "OTHER")]})
    assert own.role("bifrost_motion", "OTHER") == "log"  # read, not used


def test_the_tally_counts_unmapped_sources_and_names_streams_never_seen() -> None:
    cfg = InstrumentConfig.model_validate(
        {
            "name": "b",
            "prefix": "b",
            "streams": [
                {"topic": "b_fw", "role": "run_control"},
                {"topic": "b_det", "role": "detector"},
                {"topic": "b_motion", "source": "omega_rbv", "role": "goniometer"},
            ],
        }
    )
    tally = StreamTally(cfg)
    for source in ("omgea_rbv", "omgea_rbv", "temperature"):
        tally.count("b_motion", source, cfg.role("b_motion", source))
    summary = tally.summary()
    assert summary["unmapped"] == {"b_motion/omgea_rbv": 2, "b_motion/temperature": 1}
    (line,) = summary["never_seen"]
    assert "'omega_rbv' on b_motion never appeared" in line
    assert "omgea_rbv, temperature" in line


def test_an_ess_layout_run_folds_with_only_the_instrument_config(tmp_path: Path) -> None:
    """The same run published in the simulator's layout and in an ESS layout (other topics
    and source names, no keys, only the nexus_structure to describe it) folds to the same
    counts and exposure, bit for bit, when the consumer is given the ESS config."""
    from consumers.offline import fold_recorded_run
    from simulations.runs.recording import RunReader
    from simulations.runs.simulate import RunPlan, simulate_run

    plan = RunPlan(
        material="Ge",
        fc="raman",
        omegas=(0.0, 10.0),
        events_per_orientation=3e4,
        count_time=5.0,
        mesh=16,
        seed=3,
    )
    sim, ess = tmp_path / "sim.steer", tmp_path / "ess.steer"
    simulate_run(plan, sim, progress=False)
    simulate_run(plan, ess, progress=False, stream_layout="ess")
    with RunReader(ess) as reader:
        messages = list(reader)
    assert {m.topic for m in messages} >= {"arcs_filewriter", "arcs_detector", "arcs_motion"}
    assert all(m.key is None for m in messages if m.topic != "arcs_bluesky")
    want, acc_sim = fold_recorded_run(sim, progress=False, mode="omega")
    got, acc_ess = fold_recorded_run(
        ess, progress=False, streams=load_instrument_config("ess", prefix="arcs")
    )
    assert got["orientations"] == want["orientations"] == 2
    assert np.array_equal(acc_ess.counts, acc_sim.counts)
    assert np.array_equal(acc_ess.exposure, acc_sim.exposure)
    assert got["streams"] == {"unmapped": {}, "never_seen": []}
    # a config with a misspelt goniometer: nothing folds, and the summary says why
    bad = preset("ess", "arcs").with_run_start(
        {"goniometer": [("arcs_motion", "ARCS-SpGon:MC-RotY-01:Mtr.RBW")]}
    )
    out, _ = fold_recorded_run(ess, progress=False, streams=bad)
    assert out["orientations"] == 0
    assert "ARCS-SpGon:MC-RotY-01:Mtr.RBV" in " ".join(out["streams"]["never_seen"])


def test_the_shipped_config_files_load() -> None:
    root = Path(__file__).resolve().parents[2] / "deploy" / "instruments"
    sim = load_instrument_config(root / "simulator.toml", prefix="arcs")
    assert sim == preset("simulator", "arcs").model_copy(update={"name": sim.name})
    ess = load_instrument_config(root / "ess_example.toml")
    assert ess.role("bifrost_motion", "BIFROST-SpGon:MC-RotY-01:Mtr.RBV") == "goniometer"
    assert ess.role("bifrost_motion", "BIFROST-SE:Temperature") == "log"
