"""``steer serve --follow-replicas`` against a real broker: a replayed run is folded by a
consumer that publishes its snapshots, estimated by a model-server replica, and a service
that follows both shows the replica's estimates (one per orientation, as published), the
run and the advice over a real uvicorn server; an estimate delivered twice is recorded
once (also by a follower restarted on the same history), and a malformed estimate is
dead-lettered with the reason."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from kafka import KafkaConsumer, KafkaProducer

from consumers.kafka import KafkaSnapshotSink, KafkaSource
from consumers.replay import replay
from consumers.service import ConsumerService
from model_server.replica import ModelReplica
from steering.api.app import LiveState, create_app
from steering.cli.serve import check_follow_options
from steering.db import History
from steering.follow import ReplicaFollower
from steering.service import SteeringService
from tests.paths import MODELS
from tests.servers import TOKEN, serve

pytestmark = pytest.mark.kafka


def _read_all(bootstrap: str, topic: str, at_least: int = 0) -> list[Any]:
    """Every message of ``topic`` (waiting up to 60 s for ``at_least`` of them)."""
    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                      consumer_timeout_ms=3000, group_id=None)  # fmt: skip
    out: list[Any] = []
    deadline = time.monotonic() + 60
    while True:
        out.extend(c)
        if len(out) >= at_least or time.monotonic() > deadline:
            break
    c.close()
    return out


def _wait(ok: Any, what: str, timeout_s: float = 240.0) -> Any:
    """Poll ``ok()`` until it returns something truthy (no fixed sleeps)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = ok()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_serve_follows_the_replicas(broker, make_small_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, _, _ = make_small_run(tmp_path / "run.steer", (0.0, 20.0, 40.0, 60.0), seed=31)
    replay(path, broker.bootstrap, prefix="fw")
    # the consumer of the deployed mode (steer consume --publish-snapshots)
    sink = KafkaSnapshotSink(broker.bootstrap, "fw")
    src = KafkaSource(broker.bootstrap, "fw")
    consumer = ConsumerService(src, tmp_path / "state")
    consumer.set_snapshot_sink(sink.bind(consumer.run_info))
    consumer.on_run_complete = sink.run_complete  # as steer consume wires it
    consumer.run(idle_exit_s=5)
    src.close()
    sink.close()
    run_id = str(consumer.finished_runs[-1]["run_id"])
    # a replica (steer model-serve), stepped until it has estimated the four snapshots
    replica = ModelReplica(broker.bootstrap, "fw", MODELS, refine=False)
    try:
        _wait(
            lambda: (
                replica.step() >= 0
                and replica.counters["estimates"] >= 4
                and replica.counters["runs_complete"] >= 1
            ),
            "estimates",
        )
        assert replica.counters["dead_lettered"] == 0  # the run-complete message is skipped
    finally:
        replica.close()
    published = [json.loads(r.value) for r in _read_all(broker.bootstrap, "fw_estimates", 4)]
    assert [p["n_orientations"] for p in published] == [1, 2, 3, 4]
    # the replica's estimates also went to the dashboards as da00
    da00 = [
        r for r in _read_all(broker.bootstrap, "fw_livedata", 4) if r.key == b"steer/fc_estimate"
    ]
    assert len(da00) == 4

    history = History(f"sqlite:///{tmp_path / 'steer.db'}")
    live = LiveState()
    service = SteeringService(
        broker.bootstrap,
        "fw",
        state_dir=tmp_path / "serve-state",
        history=history,
        live=live,
        model_dir=tmp_path / "no-models",  # follows: loads no model of its own
        follow_replicas=True,
    )
    service.start()
    app = create_app(history, token=TOKEN, live=live, state_dir=tmp_path / "serve-state")
    try:
        with serve(app) as base, httpx.Client() as c:
            url = f"{base}/runs/{run_id}/estimates"
            est = _wait(
                lambda: len(r := c.get(url).json().get("estimates", [])) >= 4 and r,
                f"the follower's estimates (error: {service.error})",
            )
            assert len(est) == 4  # one per orientation
            for got, want in zip(est, published, strict=True):
                assert got["n_orientations"] == want["n_orientations"]
                assert got["omega"] == want["omega"]
                assert got["model_version"] == want["model_version"]
                assert got["fc"] == want["estimate"]["fc"]
                assert got["source"] == want["estimate"]["source"] == "vae"
            # the snapshots (a few MB each, with their moments) may come after the estimates
            runs = _wait(
                lambda: (r := c.get(f"{base}/runs").json()) and r[0]["n_orientations"] == 4 and r,
                "the run's four orientations",
            )
            assert [r["run_id"] for r in runs] == [run_id]
            run = _wait(
                lambda: (r := c.get(f"{base}/runs/{run_id}").json())["state"] == "complete" and r,
                "the run complete (the consumer's run-complete message)",
            )
            assert run["material"] == "Ge"
            assert run["summary"]["orientations"] == 4
            spec = c.get(f"{base}/runs/{run_id}/spectrum").json()
            assert spec["n_orientations"] == 4
            advice = _wait(lambda: c.get(f"{base}/runs/{run_id}/advice").json()["advice"], "advice")
            assert advice[-1]["basis"] in ("spectrum-d-optimal", "coverage")
    finally:
        service.stop()
    assert service.error is None
    assert not _read_all(broker.bootstrap, "fw_deadletter")


def _estimate_message(run_id: str, n: int) -> dict[str, Any]:
    fc = {"1NN_xx": {"mean": -3.0 + 0.01 * n, "std": 0.1, "q05": -3.2, "q95": -2.8}}
    return {
        "run_id": run_id,
        "material": "Ge",
        "orientation": n - 1,
        "n_orientations": n,
        "omega": 10.0 * n,
        "model_version": "Ge-test",
        "estimate": {"model_version": "Ge-test", "source": "vae", "fc": fc, "units": "eV/A^2"},
        "replica": "test",
        "seconds": 0.01,
    }


def _follow(broker: Any, prefix: str, history: History, want: int) -> ReplicaFollower:
    service = SteeringService(
        broker.bootstrap,
        prefix,
        state_dir=".",
        history=history,
        live=LiveState(),
        follow_replicas=True,
        publish_livedata=False,
        publish_advice=False,
    )
    follower = ReplicaFollower(broker.bootstrap, prefix, service)
    read = 0
    deadline = time.monotonic() + 60
    while read < want and time.monotonic() < deadline:
        read += follower.step(0.5)
    assert read == want
    return follower


def test_an_estimate_delivered_twice_is_recorded_once(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    message = json.dumps(_estimate_message("run-a", 1)).encode()
    for _ in range(2):
        producer.send("fi_estimates", value=message, key=b"run-a")
    producer.flush()
    history = History(f"sqlite:///{tmp_path / 'steer.db'}")
    follower = _follow(broker, "fi", history, want=2)
    follower.close()
    assert (follower.counters["estimates"], follower.counters["duplicates"]) == (1, 1)
    (row,) = history.estimates("run-a")
    assert (row["n_orientations"], row["omega"]) == (1, 10.0)
    assert row["fc"] == _estimate_message("run-a", 1)["estimate"]["fc"]
    assert history.run("run-a")["state"] == "running"  # type: ignore[index]
    # redelivered after a restart (a new follower, the same history): still one record,
    # and it starts from the committed offsets (only the new message is read)
    producer.send("fi_estimates", value=message, key=b"run-a")
    producer.flush()
    producer.close()
    again = _follow(broker, "fi", History(history.url), want=1)
    again.close()
    assert again.counters["duplicates"] == 1
    assert len(history.estimates("run-a")) == 1


def test_a_malformed_estimate_is_dead_lettered(broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    no_fc = _estimate_message("run-b", 1)
    no_fc["estimate"].pop("fc")
    for value in (
        b"not json",
        json.dumps(no_fc).encode(),
        json.dumps(_estimate_message("run-b", 2)).encode(),
    ):
        producer.send("fm_estimates", value=value, key=b"run-b")
    producer.flush()
    producer.close()
    history = History(f"sqlite:///{tmp_path / 'steer.db'}")
    follower = _follow(broker, "fm", history, want=3)
    follower.close()
    assert follower.counters["dead_lettered"] == 2
    # the good message after the bad ones is recorded
    assert [e["n_orientations"] for e in history.estimates("run-b")] == [2]
    dead = _read_all(broker.bootstrap, "fm_deadletter", 2)
    reasons = [dict(r.headers)["reason"].decode() for r in dead]
    assert reasons[0].startswith("follower: estimate: not JSON"), reasons
    assert reasons[1].startswith("follower: estimate: no estimate with FCs"), reasons
    assert dead[0].value == b"not json"
    assert dict(dead[1].headers)["source_topic"] == b"fm_estimates"


def test_run_complete_messages_mark_the_run_and_bad_ones_are_dead_lettered(broker) -> None:  # type: ignore[no-untyped-def]
    from consumers.kafka.sink import RUN_COMPLETE_SCHEMA
    from consumers.messages import SourceMessage
    from steering.follow import ReplicaFollower

    complete: list[tuple[str, dict[str, Any]]] = []

    class Handler:
        def follow_run_complete(self, run_id: str, summary: dict[str, Any]) -> None:
            complete.append((run_id, summary))

    letters: list[tuple[SourceMessage, str]] = []
    follower = ReplicaFollower(
        broker.bootstrap,
        "fc",
        Handler(),  # type: ignore[arg-type]
        dead_letter=lambda m, reason: letters.append((m, reason)),
    )
    try:
        for i, payload in enumerate(
            (b'{"run_id": "run-c", "summary": {"orientations": 3}}', b"{", b'{"summary": {}}')
        ):
            follower.handle(
                SourceMessage(
                    topic="fc_folded",
                    partition=0,
                    offset=i,
                    key=b"run-c",
                    timestamp_ns=0,
                    headers=(("schema", RUN_COMPLETE_SCHEMA),),
                    payload=payload,
                )
            )
    finally:
        follower.close()
    assert complete == [("run-c", {"orientations": 3})]
    assert [r.split(":")[:2] for _, r in letters] == [["follower", " snapshot"]] * 2
    assert all("run-complete message" in r for _, r in letters)


def test_follow_replicas_refuses_in_process_options() -> None:
    with pytest.raises(typer.BadParameter, match="give --bootstrap"):
        check_follow_options(bootstrap=None, instrument_config=None)
    with pytest.raises(typer.BadParameter, match="give it to steer consume"):
        check_follow_options(bootstrap="localhost:9092", instrument_config="ess")
    check_follow_options(bootstrap="localhost:9092", instrument_config=None)
