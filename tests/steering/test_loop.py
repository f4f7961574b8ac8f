"""Snapshot -> estimate -> advice after every orientation, published to Kafka as JSON and as
bluesky documents (embedded broker, the committed Ge model)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import event_model
import pytest

from consumers.kafka import KafkaSource
from consumers.replay import replay
from consumers.service import ConsumerService
from model_server.inversion.inference import Estimator
from steering.advisor.ranking import Advisor
from steering.loop import CandidateCoverage, KafkaAdviceSink, SteeringLoop
from tests.paths import MODELS

MODEL = MODELS / "ge"


def _read(bootstrap: str, topic: str, n: int) -> list[tuple[list[tuple[str, bytes]], bytes]]:
    from kafka import KafkaConsumer, TopicPartition

    reader = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    tp = TopicPartition(topic, 0)
    reader.assign([tp])
    reader.seek_to_beginning(tp)
    out: list[tuple[list[tuple[str, bytes]], bytes]] = []
    deadline = time.monotonic() + 20
    while len(out) < n and time.monotonic() < deadline:
        for recs in reader.poll(timeout_ms=500).values():
            out += [(list(r.headers or []), r.value) for r in recs]
    reader.close()
    return out


def test_live_run_gets_advice_after_every_orientation(  # type: ignore[no-untyped-def]
    broker, tmp_path, make_small_run, ge
) -> None:
    omegas = (0.0, 20.0, 40.0, 60.0)
    path, _, acc = make_small_run(tmp_path / "ge.steer", omegas, seed=11)
    replay(path, broker.bootstrap, prefix="adv")
    source = KafkaSource(broker.bootstrap, "adv")
    holder: dict[str, SteeringLoop] = {}
    sink: KafkaAdviceSink | None = None
    estimates: list[tuple[int, int, dict]] = []  # (orientations, advices made by then, estimate)

    def on_estimate(message) -> None:  # type: ignore[no-untyped-def]
        estimates.append((message["n_orientations"], len(holder["loop"].history), message))

    def on_snapshot(snap, rec) -> None:  # type: ignore[no-untyped-def]
        nonlocal sink
        if "loop" not in holder:  # the run's metadata is known once it started
            meta = service.pipeline.meta
            assert meta is not None
            candidates = CandidateCoverage(meta, omegas=[10.0, 30.0, 50.0, 70.0])
            candidates.wait(120)
            sink = KafkaAdviceSink(broker.bootstrap, "adv", run_id=meta["run_id"], material="Ge")
            holder["loop"] = SteeringLoop(
                Estimator(MODEL, n_samples=64),
                Advisor("Ge", material_setup=ge),
                candidates,
                sinks=[sink],
                estimate_sinks=[on_estimate],
                run_id=meta["run_id"],
            )
        holder["loop"](snap, rec)

    try:
        service = ConsumerService(source, tmp_path / "state", on_snapshot=on_snapshot)
        service.run(idle_exit_s=30)
    finally:
        source.close()
        if sink is not None:
            sink.close()
    loop = holder["loop"]
    assert len(loop.history) == len(acc.records) == 4
    for k, advice in enumerate(loop.history, start=1):
        assert advice["n_orientations"] == k
        ranking = advice["ranking"]
        assert ranking["basis"] == "spectrum-d-optimal"
        assert ranking["weighting"] == "scarcity"
        assert [c["omega"] for c in ranking["candidates"]] != []
        assert set(advice["estimate"]["fc"]) == set(ranking["fc_names"])
    # each estimate went out before its orientation's advice was made, the same estimate
    assert [(n, made) for n, made, _ in estimates] == [(1, 0), (2, 1), (3, 2), (4, 3)]
    for (_, _, message), advice in zip(estimates, loop.history, strict=True):
        assert message["estimate"] is advice["estimate"]
        assert message["omega"] == advice["omega"]
        assert message["run_id"] == advice["run_id"]
        assert 0 < message["seconds"] <= advice["seconds"]
    # the same advice on <prefix>_advice, and as a valid bluesky run on <prefix>_advice_docs
    published = _read(broker.bootstrap, "adv_advice", 4)
    assert [json.loads(v)["n_orientations"] for _, v in published] == [1, 2, 3, 4]
    docs = [json.loads(v) for _, v in _read(broker.bootstrap, "adv_advice_docs", 7)]
    names = [name for name, _ in docs]
    assert names == ["start", "descriptor", "event", "event", "event", "event", "stop"]
    for name, doc in docs:
        event_model.schema_validators[getattr(event_model.DocumentNames, name)].validate(doc)
    assert docs[2][1]["data"]["best_omega"] in (10.0, 30.0, 50.0, 70.0)


def test_loop_and_service_refuse_an_unknown_sort_or_weighting(tmp_path: Path, ge) -> None:  # type: ignore[no-untyped-def]
    """The sort and the bins' weights are checked when the loop or the service is made, not
    at the first orientation of a run."""
    from steering.api.app import LiveState
    from steering.db import History
    from steering.exceptions import AdvisorError
    from steering.service import SteeringService

    advisor = Advisor("Ge", material_setup=ge)
    estimator = Estimator(MODEL, n_samples=8)
    with pytest.raises(AdvisorError, match="score must be 'spectrum' or 'fc'"):
        SteeringLoop(estimator, advisor, None, score="bogus")  # type: ignore[arg-type]
    with pytest.raises(AdvisorError, match="weighting must be 'scarcity' or 'uniform'"):
        SteeringLoop(estimator, advisor, None, weighting="even")  # type: ignore[arg-type]
    with pytest.raises(AdvisorError, match="advisor weighting must be"):
        SteeringService(
            "127.0.0.1:9",
            "p",
            state_dir=tmp_path / "state",
            history=History(f"sqlite:///{tmp_path / 'h.db'}"),
            live=LiveState(),
            advisor_weighting="even",
        )


def test_serve_refuses_an_unknown_advisor_weighting(tmp_path: Path) -> None:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "steering.cli", "serve", "--advisor-weighting", "even"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2
    assert all(
        s in out.stderr for s in ("--advisor-weighting", "'even'", "'scarcity'", "'uniform'")
    )
