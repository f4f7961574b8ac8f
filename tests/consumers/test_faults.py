"""Storage faults of the consumer (real broker, real ``steer consume`` processes): a full disk
at a checkpoint stops it with a clear error and a non-zero exit, leaving the last checkpoint
intact; restarted with space again it completes with the offline fold's counts. A state
folder that cannot be made is refused at the start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from consumers.kafka import embedded_broker
from consumers.replay import replay

DEV_FULL = Path("/dev/full")  # every write fails with ENOSPC


def _consume(bootstrap: str, state: Path, idle: int = 10) -> list[str]:
    return [
        sys.executable, "-m", "steering.cli", "consume", "--bootstrap", bootstrap,
        "--prefix", "disk", "--state-dir", str(state), "--idle-exit", str(idle), "--json",
    ]  # fmt: skip


@pytest.mark.skipif(not DEV_FULL.exists(), reason="needs /dev/full to stand for a full disk")
def test_disk_full_at_a_checkpoint(tmp_path: Path, make_small_run) -> None:  # type: ignore[no-untyped-def]
    omegas = (0.0, 15.0, 30.0, 45.0)
    path, offline, acc = make_small_run(tmp_path / "ge.steer", omegas, seed=55)
    state = tmp_path / "state"
    ckpt = state / "checkpoint.npz"
    tmp = state / "checkpoint.npz.tmp"
    with embedded_broker() as broker:
        # replayed in (twice) real time, so that several checkpoints come after the first
        sender = threading.Thread(
            target=replay, args=(path, broker.bootstrap), kwargs={"prefix": "disk", "speed": 2}
        )
        sender.start()
        proc = subprocess.Popen(
            _consume(broker.bootstrap, state),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        assert ckpt.exists(), "no first checkpoint"
        # the disk fills up: the next checkpoint's temporary file cannot be written
        while proc.poll() is None:
            try:
                os.symlink(DEV_FULL, tmp)
                break
            except FileExistsError:  # a checkpoint is being written right now
                time.sleep(0.001)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err[-2000:]
        assert "cannot write the checkpoint" in err
        assert "No space left on device" in err
        assert "Traceback" not in err
        # the last good checkpoint is whole, and the failed one left nothing behind
        assert not tmp.is_symlink()
        with np.load(ckpt) as f:
            js = json.loads(bytes(f["__json__"]).decode())
            assert f["counts"].shape == acc.counts.shape
        assert js["offsets"]
        # space again: the restarted consumer resumes from it and completes exactly
        sender.join(120)
        done = subprocess.run(
            _consume(broker.bootstrap, state), capture_output=True, text=True, timeout=300
        )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["done"]
    assert summary["events_folded"] == offline["events_folded"]
    with np.load(ckpt) as f:
        np.testing.assert_array_equal(f["counts"], acc.counts)
        np.testing.assert_array_equal(f["exposure"], acc.exposure)


def test_state_folder_that_cannot_be_made(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the state folder should be")
    proc = subprocess.run(
        _consume("127.0.0.1:9", blocker / "state"), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "state folder" in proc.stderr
    assert "cannot be created" in proc.stderr
    assert "Traceback" not in proc.stderr
