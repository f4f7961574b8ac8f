"""``steer serve`` restarted in the middle of a run (a real process, SIGTERM, same database
and state folder): the run's estimate history is still served afterwards, and the run
completes with every orientation estimated once and the counts of the offline fold."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import h5py
import httpx
import numpy as np

from consumers.kafka import EmbeddedBroker
from consumers.replay import replay
from tests.paths import REPO

ROOT = REPO
TOKEN = "restart-token"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(bootstrap: str, tmp: Path, port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "STEER_API_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable, "-m", "steering.cli", "serve",
        "--bootstrap", bootstrap, "--prefix", "rs", "--port", str(port),
        "--database", f"sqlite:///{tmp / 'steer.db'}", "--state-dir", str(tmp / "state"),
        "--model-dir", str(ROOT / "models"),
    ]  # fmt: skip
    log = (tmp / f"serve-{time.monotonic_ns()}.log").open("w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _wait(url: str, check: Any, timeout: float, proc: subprocess.Popen[str]) -> Any:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=10) as c:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"steer serve exited with {proc.returncode}"
            try:
                value = check(c.get(url))
            except httpx.HTTPError:
                value = None
            if value:
                return value
            time.sleep(0.3)
    raise AssertionError(f"timed out waiting on {url}")


def test_serve_restarted_mid_run_keeps_the_history(tmp_path: Path, make_small_run) -> None:  # type: ignore[no-untyped-def]
    omegas = (0.0, 12.0, 24.0, 36.0, 48.0, 60.0)
    path, _, offline_acc = make_small_run(tmp_path / "ge.steer", omegas, seed=33)
    broker = EmbeddedBroker()
    broker.start()
    port = _port()
    base = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen[str]] = []
    try:
        procs.append(_serve(broker.bootstrap, tmp_path, port))
        _wait(f"{base}/health", lambda r: r.status_code == 200, 120, procs[-1])
        sender = threading.Thread(
            target=replay, args=(path, broker.bootstrap), kwargs={"prefix": "rs", "speed": 2.0}
        )
        sender.start()
        runs = _wait(f"{base}/runs", lambda r: r.json() or None, 120, procs[-1])
        run_id = runs[0]["run_id"]
        url = f"{base}/runs/{run_id}/estimates"
        before = _wait(
            url, lambda r: (e := r.json()["estimates"]) and len(e) >= 2 and e, 180, procs[-1]
        )
        assert len(before) < len(omegas), "the run ended before the restart"
        procs[-1].send_signal(signal.SIGTERM)
        assert procs[-1].wait(60) == 0  # a clean stop: the consumer checkpointed
        # the history is there as soon as the new process serves, before any new estimate
        procs.append(_serve(broker.bootstrap, tmp_path, port))
        again = _wait(url, lambda r: r.status_code == 200 and r.json()["estimates"], 120, procs[-1])
        assert again[: len(before)] == before
        done = _wait(
            f"{base}/runs/{run_id}",
            lambda r: r.json()["state"] == "complete" and r.json(),
            240,
            procs[-1],
        )
        sender.join(60)
        est = _wait(
            url, lambda r: (e := r.json()["estimates"]) and len(e) >= 6 and e, 60, procs[-1]
        )
        assert [e["n_orientations"] for e in est] == [1, 2, 3, 4, 5, 6]
        assert done["n_orientations"] == len(omegas)
        # the export is named relative to the state folder (no server paths in answers)
        assert not Path(done["export_path"]).is_absolute()
        with h5py.File(tmp_path / "state" / done["export_path"], "r") as f:
            counts = np.asarray(f["entry/iqe/counts"][()])
        assert np.array_equal(counts, offline_acc.counts)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        broker.stop()
