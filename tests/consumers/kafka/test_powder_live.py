"""A powder run through the embedded broker: the live consumer equals the offline fold bit
for bit, and `steer consume` killed with -9 and restarted loses nothing."""

from __future__ import annotations

import json
import subprocess
import threading

import numpy as np
import pytest

from consumers.kafka import KafkaSource
from consumers.offline import fold_recorded_run
from consumers.replay import replay
from consumers.service import ConsumerService
from simulations.runs.simulate import RunPlan, simulate_run
from tests.conftest import consume_cmd, kill_restart_cycles

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def powder_run(tmp_path_factory):  # type: ignore[no-untyped-def]
    """An Al powder run (4 steps of 5 s, backgrounds on) and its offline fold."""
    path = tmp_path_factory.mktemp("powder") / "al.steer"
    plan = RunPlan(
        material="Al",
        powder=True,
        omegas=(0.0,) * 4,
        ei=50.0,
        temperature=300.0,
        events_per_orientation=1e5,
        count_time=5.0,
        mesh=16,
        seed=21,
    )
    simulate_run(plan, path, progress=False)
    summary, acc = fold_recorded_run(path, progress=False)
    return path, summary, acc


def test_live_powder_consumer_equals_offline_fold(broker, powder_run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path, offline, acc = powder_run
    replay(path, broker.bootstrap, prefix="powder")
    source = KafkaSource(broker.bootstrap, "powder")
    steps = []
    try:
        service = ConsumerService(
            source, tmp_path / "state", on_snapshot=lambda s, r: steps.append(s.counts.shape)
        )
        service.run(idle_exit_s=30)
    finally:
        source.close()
    assert service.done
    assert service.pipeline.acc is not None
    assert service.pipeline.acc.grid.kind == "powder"
    np.testing.assert_array_equal(service.pipeline.acc.counts, acc.counts)  # bitwise
    np.testing.assert_array_equal(service.pipeline.acc.exposure, acc.exposure)
    summary = service.summary()
    assert summary["events_folded"] == offline["events_folded"]
    assert summary["events_dropped"] == offline["events_dropped"]
    assert steps == [acc.grid.shape] * len(acc.records) == [acc.grid.shape] * 4


def test_kill_9_during_a_powder_replay_then_restart_loses_nothing(
    broker, powder_run, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    path, offline, acc = powder_run
    state = tmp_path / "state"
    sender = threading.Thread(
        target=replay, args=(path, broker.bootstrap), kwargs={"prefix": "pkill", "speed": 1.0}
    )
    sender.start()
    kills = kill_restart_cycles(
        broker.bootstrap, "pkill", state, 2, np.random.default_rng(3), max_delay_s=1.0,
        sender=sender,
    )  # fmt: skip
    sender.join()
    done = subprocess.run(
        consume_cmd(broker.bootstrap, "pkill", state),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["done"]
    assert len(kills) == 2
    assert summary["events_folded"] == offline["events_folded"]
    with np.load(state / "checkpoint.npz") as f:
        np.testing.assert_array_equal(f["counts"], acc.counts)
        np.testing.assert_array_equal(f["exposure"], acc.exposure)
