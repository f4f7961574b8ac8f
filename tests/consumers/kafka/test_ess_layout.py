"""A run published as an ESS instrument would (ESS topic and EPICS-style source names, no
message keys, the set-up in the run start's nexus_structure only), replayed through the
embedded broker and consumed by ``steer consume`` given only ``--instrument-config ess``:
the same counts and exposure, bit for bit, as ``steer fold`` of the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

from consumers.offline import fold_recorded_run
from consumers.replay import replay
from consumers.streams import load_instrument_config
from simulations.runs.simulate import RunPlan, simulate_run


def test_an_ess_layout_run_consumed_live_with_only_the_instrument_config(
    broker, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    plan = RunPlan(
        material="Ge",
        fc="raman",
        omegas=(0.0, 20.0, 40.0),
        events_per_orientation=3e4,
        count_time=5.0,
        mesh=16,
        seed=21,
        prefix="essx",
    )
    run = tmp_path / "ess.steer"
    simulate_run(plan, run, progress=False, stream_layout="ess")
    streams = load_instrument_config("ess", prefix="essx")
    offline, acc = fold_recorded_run(run, progress=False, streams=streams)
    assert offline["orientations"] == 3
    sent = replay(run, broker.bootstrap, topics=streams.topics())
    assert sent["messages"] > 0
    out = tmp_path / "live.h5"
    cmd = [
        sys.executable, "-m", "steering.cli", "consume", "--bootstrap", broker.bootstrap,
        "--prefix", "essx", "--instrument-config", "ess", "--state-dir", str(tmp_path / "st"),
        "--idle-exit", "20", "--out", str(out), "--json",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["orientations"] == 3
    assert summary["events_folded"] == offline["events_folded"]
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["entry/iqe/counts"][()], acc.counts)  # bitwise
        np.testing.assert_array_equal(f["entry/iqe/exposure"][()], acc.exposure)
    # without the config the consumer reads the simulator's topics of the prefix: nothing
    bad = subprocess.run(
        [*cmd[:8], "--state-dir", str(tmp_path / "st2"), "--idle-exit", "4", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert json.loads(bad.stdout)["orientations"] == 0


def test_a_bad_instrument_config_stops_the_consumer_before_kafka(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('name = "x"\nprefix = "x"\n[[streams]]\ntopic = "x_fw"\nrole = "run_control"\n')
    cmd = [
        sys.executable, "-m", "steering.cli", "consume", "--bootstrap", "127.0.0.1:1",
        "--prefix", "x", "--instrument-config", str(cfg), "--state-dir", str(tmp_path / "s"),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "no detector stream" in done.stderr
