"""Scale-out by consumer group (issue 8): two `steer consume --group` processes share a
prefix's partitions, each folding the runs on its own; one is killed (-9) mid-run and the
other takes over its partition from the shared checkpoint. Real broker, real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from consumers.exceptions import ConsumerError
from consumers.kafka import ensure_topics, topics_for
from consumers.kafka.group import GroupConsumer, lane_dir
from consumers.offline import fold_recorded_run
from consumers.replay import replay
from simulations.runs.simulate import RunPlan, simulate_run

pytestmark = pytest.mark.kafka


def _partition_of(key: str, n: int) -> int:
    """Where Kafka's default partitioner puts a key (murmur2, as the producer does)."""
    from kafka.partitioner.default import murmur2

    return (murmur2(key.encode()) & 0x7FFFFFFF) % n


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> list[tuple[Path, str, int, Any, Any]]:  # type: ignore[no-untyped-def]
    """Two short Ge runs whose ids go to partitions 0 and 1 of two: (path, run id,
    partition, offline summary, offline accumulator)."""
    folder = tmp_path_factory.mktemp("scale")
    ids: dict[int, str] = {}
    i = 0
    while len(ids) < 2:
        ids.setdefault(_partition_of(f"scale-{i}", 2), f"scale-{i}")
        i += 1
    out = []
    for p, rid in sorted(ids.items()):
        path = folder / f"{rid}.steer"
        plan = RunPlan(
            material="Ge",
            fc="raman",
            omegas=tuple(np.arange(0.0, 40.0, 5.0) + 2.0 * p),
            events_per_orientation=5e4,
            count_time=5.0,
            mesh=16,
            seed=30 + p,
            run_id=rid,
        )
        simulate_run(plan, path, progress=False)
        summary, acc = fold_recorded_run(path, progress=False)
        out.append((path, rid, p, summary, acc))
    return out


def _member(bootstrap: str, prefix: str, state: Path, log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "steering.cli", "consume", "--group", "--partitions", "2",
        "--bootstrap", bootstrap, "--prefix", prefix, "--state-dir", str(state), "--json",
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("wb"))


def _owner(state: Path, p: int) -> int | None:
    f = lane_dir(state, p) / "owner.json"
    try:
        return int(json.loads(f.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def _wait(cond: Any, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {x}\n{x.read_text()[-3000:]}" for x in logs if x.exists())
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.1)


def _h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import h5py

    with h5py.File(path) as f:
        return np.asarray(f["entry/iqe/counts"][()]), np.asarray(f["entry/iqe/exposure"][()])


def test_two_members_share_the_runs_and_one_takes_over_from_a_killed_one(
    broker, two_runs, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    state = tmp_path / "shared-state"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    ensure_topics(broker.bootstrap, topics_for("so"), 2)
    a = _member(broker.bootstrap, "so", state, logs[0])
    b = _member(broker.bootstrap, "so", state, logs[1])
    procs = {a.pid: a, b.pid: b}
    try:
        # the group gives each member one partition
        _wait(
            lambda: {_owner(state, 0), _owner(state, 1)} == set(procs),
            90,
            "each member to own one partition",
            logs,
        )
        senders = [
            threading.Thread(
                target=replay,
                args=(path, broker.bootstrap),
                kwargs={"prefix": "so", "speed": 3.0, "partitions": 2},
            )
            for path, *_ in two_runs
        ]
        for s in senders:
            s.start()
        # kill the owner of the first run's partition once it has checkpointed orientations
        victim_p = two_runs[0][2]
        victim = procs[_owner(state, victim_p)]  # type: ignore[index]
        survivor = next(p for pid, p in procs.items() if pid != victim.pid)
        ckpt = lane_dir(state, victim_p) / "checkpoint.npz"

        def orientations() -> int:
            try:
                with np.load(ckpt) as f:
                    return len(f["orient_counts"]) if "orient_counts" in f else 0
            except (OSError, ValueError, KeyError, EOFError):
                return 0

        _wait(lambda: orientations() >= 2, 90, "two checkpointed orientations", logs)
        time.sleep(float(np.random.default_rng(3).uniform(0.0, 1.0)))
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        killed_at = orientations()
        for s in senders:
            s.join()
        # the survivor is given the dead member's partition and completes both runs
        exports = [lane_dir(state, p) / "runs" / f"{rid}.h5" for _, rid, p, _, _ in two_runs]
        _wait(lambda: all(x.exists() for x in exports), 120, "both runs exported", logs)
        assert _owner(state, victim_p) == survivor.pid
        assert killed_at < len(two_runs[0][4].records)  # the kill came mid-run
        for (*_, acc), export in zip(two_runs, exports, strict=True):
            counts, exposure = _h5(export)
            assert counts.sum() > 0
            np.testing.assert_array_equal(counts, acc.counts)  # nothing lost, nothing twice
            np.testing.assert_array_equal(exposure, acc.exposure)
        survivor.send_signal(signal.SIGTERM)
        out, _ = survivor.communicate(timeout=60)
        assert survivor.returncode == 0, logs[0].read_text()[-2000:] + logs[1].read_text()[-2000:]
        result = json.loads(out)
        assert sorted(set(result["folded_partitions"])) == [0, 1]
        assert result["rebalances"] >= 2
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def test_topics_with_unequal_partitions_are_refused(broker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ensure_topics(broker.bootstrap, ["uneq_runInfo", "uneq_motion", "uneq_bluesky"], 1)
    ensure_topics(broker.bootstrap, ["uneq_events"], 3)
    with pytest.raises(ConsumerError, match="same number of partitions"):
        GroupConsumer(broker.bootstrap, "uneq", tmp_path / "state")


def test_group_mode_refuses_a_single_export(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from steering.cli.app import app

    args = [
        "consume", "--group", "--bootstrap", "127.0.0.1:1", "--prefix", "x",
        "--state-dir", str(tmp_path), "--out", str(tmp_path / "x.h5"),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert "--group exports every run" in result.output
