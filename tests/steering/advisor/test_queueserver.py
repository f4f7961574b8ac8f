"""The queue sink against a real RE Manager: its own redis-server and start-re-manager on free
ports, a profile collection with ophyd.sim's goniometer ``omega``, a detector and
``steer_count_at``; advice in, plan items on the queue, the queue run moves the motor."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from steering.advisor.queueserver import QueueSink
from tests.paths import REPO

pytestmark = [pytest.mark.slow, pytest.mark.queueserver]

REDIS = shutil.which("redis-server")

#: the profile collection: the goniometer, a detector, the plan, a RunEngine whose events
#: go to a JSON-lines file (so that the test sees where the motor went)
STARTUP = """\
import json, os
from bluesky import RunEngine
from ophyd.sim import SynAxis, SynGauss
from steering.advisor.plans import count_at_plan

omega = SynAxis(name="omega")
det = SynGauss("det", omega, "omega", center=0.0, Imax=1.0, sigma=30.0)
steer_count_at = count_at_plan(omega, [det])

RE = RunEngine({})

def _record(name, doc, _path=os.environ["STEER_TEST_EVENTS"]):
    if name == "event":
        with open(_path, "a") as f:
            f.write(json.dumps(doc["data"]) + "\\n")

RE.subscribe(_record)
"""

PERMISSIONS = """\
user_groups:
  root:
    allowed_plans: [null]
    forbidden_plans: [":^_"]
    allowed_devices: [null]
    forbidden_devices: [":^_:?.*"]
    allowed_functions: [null]
    forbidden_functions: [":^_"]
  primary:
    allowed_plans: [":.*"]
    forbidden_plans: [null]
    allowed_devices: [":?.*:depth=5"]
    forbidden_devices: [null]
    allowed_functions: [null]
    forbidden_functions: [null]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group it leads (the RE Manager's worker too), then SIGKILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass(frozen=True, slots=True)
class Manager:
    """A running RE Manager: its control address, its API and the events file."""

    address: str
    api: Any
    events: Path

    def reset(self) -> None:
        """Empty queue and events, autostart off, nothing running."""
        self.api.queue_autostart(False)
        self.api.wait_for_idle(timeout=30)
        self.api.queue_clear()
        self.events.write_text("")

    def queue(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.api.queue_get(reload=True)["items"]
        return items

    def omegas(self) -> list[float]:
        lines = self.events.read_text().splitlines()
        return [float(json.loads(line)["omega"]) for line in lines if line]


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Manager]:
    if REDIS is None:
        pytest.skip("needs Debian's redis-server (apt-get install redis-server)")
    pytest.importorskip("bluesky_queueserver", reason="needs bluesky-queueserver (.[dev])")
    from bluesky_queueserver_api.zmq import REManagerAPI

    start = Path(sys.executable).with_name("start-re-manager")
    if not start.exists():
        pytest.skip(f"no start-re-manager beside {sys.executable}")
    folder = tmp_path_factory.mktemp("qserver")
    (folder / "startup").mkdir()
    (folder / "startup" / "00_steer.py").write_text(STARTUP)
    (folder / "permissions.yaml").write_text(PERMISSIONS)
    events = folder / "events.jsonl"
    events.write_text("")
    redis_port, control, info = _free_port(), _free_port(), _free_port()
    redis = subprocess.Popen(
        [REDIS, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", str(folder)],
        stdout=(folder / "redis.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "STEER_TEST_EVENTS": str(events),
    }
    log = folder / "re-manager.log"
    proc: subprocess.Popen[bytes] | None = None
    api = None
    try:
        deadline = time.monotonic() + 10
        while True:  # redis answers before the manager connects to it
            try:
                socket.create_connection(("127.0.0.1", redis_port), timeout=0.2).close()
                break
            except OSError:
                assert redis.poll() is None, (folder / "redis.log").read_text()
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)
        proc = subprocess.Popen(
            [str(start), "--startup-dir", str(folder / "startup"),
             "--existing-plans-devices", str(folder / "existing_plans_and_devices.yaml"),
             "--update-existing-plans-devices", "ENVIRONMENT_OPEN",
             "--user-group-permissions", str(folder / "permissions.yaml"),
             "--redis-addr", f"127.0.0.1:{redis_port}", "--redis-name-prefix", "steer_test",
             "--zmq-control-addr", f"tcp://127.0.0.1:{control}",
             "--zmq-info-addr", f"tcp://127.0.0.1:{info}", "--zmq-publish-console", "OFF"],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        address = f"tcp://127.0.0.1:{control}"
        api = REManagerAPI(
            zmq_control_addr=address,
            timeout_recv=1.0,
            status_expiration_period=0.05,
            status_polling_period=0.05,
        )
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                api.status(reload=True)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "no RE Manager within 30 s\n" + log.read_text()
        api.environment_open()
        api.wait_for_idle(timeout=60)
        assert api.status(reload=True)["worker_environment_exists"], log.read_text()
        yield Manager(address, api, events)
    finally:
        if api is not None:
            api.close()
        if proc is not None:
            _stop(proc)
        _stop(redis)


def _advice(n: int, omega: float | None, state: str = "measuring", **extra: Any) -> dict[str, Any]:
    nxt = None if omega is None else {"omega": omega, "source": "advisor", "by": None}
    return {"run_id": "run-1", "n_orientations": n, "state": state, "next": nxt, **extra}


def test_advice_becomes_one_queue_item_and_the_queue_moves_the_goniometer(
    manager: Manager,
) -> None:
    manager.reset()
    with QueueSink.connect(manager.address, count_time=0.01) as sink:
        assert sink.submit(_advice(1, 12.5)) == "added"
        items = manager.queue()
        assert [i["kwargs"] for i in items] == [{"omega": 12.5, "count_time": 0.01}]
        assert items[0]["name"] == "steer_count_at"
        assert items[0]["meta"]["steer"]["n_orientations"] == 1

        # the same advice again, or a newer one with the same suggestion: no second item
        assert sink.submit(_advice(1, 12.5)) == "duplicate"
        assert sink.submit(_advice(2, 12.5)) == "duplicate"
        assert len(manager.queue()) == 1

        # a new suggestion replaces the pending one in place
        forced = _advice(3, 40.0)
        forced["next"] = {"omega": 40.0, "count_time_s": 0.02, "source": "forced", "by": "ada"}
        assert sink.submit(forced) == "replaced"
        items = manager.queue()
        assert [i["kwargs"] for i in items] == [{"omega": 40.0, "count_time": 0.02}]
        assert items[0]["meta"]["steer"]["by"] == "ada"

        # paused / done: nothing added, the pending suggestion withdrawn
        assert sink.submit(_advice(4, 50.0, state="paused")) == "withdrawn"
        assert manager.queue() == []
        assert sink.submit(_advice(5, 60.0, state="done")) == "skipped"
        assert sink.submit(_advice(5, None, state="waiting")) == "skipped"
        assert manager.queue() == []

        # advice from a service without state / next: the ranking's best candidate
        ranking = {"candidates": [{"omega": 22.0, "score": 1.0}, {"omega": 7.0, "score": 0.5}]}
        legacy = {"run_id": "run-1", "n_orientations": 6, "ranking": ranking}
        assert sink.submit(legacy) == "added"
        assert [i["kwargs"]["omega"] for i in manager.queue()] == [22.0]

        # an item of someone else is left alone and not replaced
        from bluesky_queueserver_api import BPlan

        manager.api.item_add(BPlan("steer_count_at", omega=5.0, count_time=0.01))
        assert sink.submit(_advice(7, 30.0)) == "replaced"
        assert [i["kwargs"]["omega"] for i in manager.queue()] == [30.0, 5.0]

        manager.api.queue_start()
        manager.api.wait_for_idle(timeout=30)
        assert manager.queue() == []
        assert manager.omegas() == [30.0, 5.0]  # the sim goniometer went there and read
        history = manager.api.history_get()["items"]
        assert all(h["result"]["exit_status"] == "completed" for h in history)
        # ran: a newer advice suggesting the same angle again is a new suggestion
        assert sink.submit(_advice(8, 30.0)) == "added"
    assert sink.counts["added"] == 3
    assert sink.counts["duplicate"] == 2


def test_autostart_runs_the_item_without_anyone_pressing_start(manager: Manager) -> None:
    manager.reset()
    sink = QueueSink.connect(manager.address, count_time=0.01, autostart=True).start()
    try:
        sink(_advice(1, 17.0))
        deadline = time.monotonic() + 20
        while manager.omegas() != [17.0]:
            assert time.monotonic() < deadline, manager.api.status(reload=True)
            time.sleep(0.05)
        manager.api.wait_for_idle(timeout=30)
    finally:
        sink.close()
        manager.api.queue_autostart(False)
    assert sink.counts["added"] == 1
    assert manager.queue() == []


def test_a_rejected_item_is_counted_and_logged_not_raised(
    manager: Manager, caplog: pytest.LogCaptureFixture
) -> None:
    manager.reset()
    with QueueSink.connect(manager.address, plan="no_such_plan") as sink:
        assert sink.submit(_advice(1, 12.5)) == "rejected"
    assert sink.counts["rejected"] == 1
    assert "refused" in caplog.text
    assert manager.queue() == []


def test_steer_serve_queue_options_reach_the_queue(manager: Manager) -> None:
    """What ``steer serve --queueserver ... --queue-plan-kwargs ...`` makes, on the real queue:
    the extra keyword arguments ride along (here the run's metadata)."""
    from steering.cli.serve import queue_sink

    manager.reset()
    sink = queue_sink(
        manager.address,
        bootstrap="kafka:9092",
        plan="steer_count_at",
        plan_kwargs='{"md": {"proposal": "IPTS-1"}}',
        count_time=0.01,
        autostart=False,
    )
    try:
        sink(_advice(1, 8.0))
    finally:
        sink.close()  # submits what was handed over first
    assert [i["kwargs"] for i in manager.queue()] == [
        {"md": {"proposal": "IPTS-1"}, "omega": 8.0, "count_time": 0.01}
    ]
    manager.api.queue_start()
    manager.api.wait_for_idle(timeout=30)
    assert manager.omegas() == [8.0]
