"""Reading the advice, the steered bluesky plans in a RunEngine with ophyd.sim devices, and
the queue sink where no RE Manager answers."""

from __future__ import annotations

from typing import Any

import pytest

from steering.advisor.advice import NextOrientation, advice_state, next_orientation
from steering.advisor.plans import count_at_plan, http_advice, steer_orientations
from steering.advisor.queueserver import QueueSink
from steering.exceptions import AdvisorError


def test_next_orientation_reads_next_or_falls_back_to_the_best_candidate() -> None:
    forced = {"state": "measuring", "next": {"omega": 40, "count_time_s": 30, "source": "forced",
                                             "by": "ada"}}  # fmt: skip
    assert next_orientation(forced) == NextOrientation(
        omega=40.0, count_time_s=30.0, source="forced", by="ada"
    )
    ranking = {"candidates": [{"omega": 22.0}, {"omega": 7.0}]}
    assert next_orientation({"ranking": ranking}) == NextOrientation(omega=22.0)
    assert next_orientation(ranking) == NextOrientation(omega=22.0)  # GET /runs/{id}/advice
    assert advice_state({"ranking": ranking}) == "measuring"
    for none in (None, {}, {"ranking": None}, {"next": None}, {"next": {"omega": "nan"}},
                 {"ranking": {"candidates": []}}):  # fmt: skip
        assert next_orientation(none) is None
        assert advice_state(none) == "waiting"
    assert advice_state({"state": "done", "next": None}) == "done"


def _devices() -> tuple[Any, Any]:
    from ophyd.sim import SynAxis, SynGauss

    motor = SynAxis(name="omega")
    return motor, SynGauss("det", motor, "omega", center=0.0, Imax=1.0, sigma=30.0)


def test_count_at_plan_moves_the_goniometer_and_counts_once() -> None:
    import inspect

    from bluesky import RunEngine

    motor, det = _devices()
    plan = count_at_plan(motor, [det])
    assert plan.__name__ == "steer_count_at"
    assert inspect.isgeneratorfunction(plan)  # what the queueserver lists as a plan
    docs: list[tuple[str, dict[str, Any]]] = []
    engine = RunEngine({})
    engine(plan(omega=33.0, count_time=0.0), lambda name, doc: docs.append((name, doc)))
    events = [d for n, d in docs if n == "event"]
    assert len(events) == 1
    assert events[0]["data"]["omega"] == pytest.approx(33.0)
    assert docs[0][1]["plan_name"] == "steer_count_at"


class FakeService:
    """Advice as the service gives it: after every measured orientation (an Event of the
    RunEngine) a new advice whose next angle is the next of ``plan``; "paused" for the
    first ``paused`` readings; "done" once ``plan`` is used up."""

    def __init__(self, plan: list[float], paused: int = 0) -> None:
        self.plan = plan
        self.paused = paused
        self.measured: list[float] = []
        self.readings = 0

    def on_document(self, name: str, doc: dict[str, Any]) -> None:
        if name == "event":
            self.measured.append(float(doc["data"]["omega"]))

    def __call__(self) -> dict[str, Any]:
        self.readings += 1
        n = len(self.measured)
        if self.readings <= self.paused:
            return {"n_orientations": n, "state": "paused", "next": None}
        if n - 1 >= len(self.plan):
            return {"n_orientations": n, "state": "done", "next": None}
        nxt = {"omega": self.plan[n - 1], "count_time_s": 0.0, "source": "advisor", "by": None}
        return {"n_orientations": n, "state": "measuring", "next": nxt}


def test_steer_orientations_follows_the_advice_until_done() -> None:
    from bluesky import RunEngine

    motor, det = _devices()
    service = FakeService([30.0, 10.0, 50.0], paused=2)
    engine = RunEngine({})
    engine.subscribe(service.on_document)
    plan = steer_orientations(service, motor, [det], count_time=0.0, start_omegas=[0.0],
                              poll_s=0.001, wait_s=5.0)  # fmt: skip
    engine(plan)
    assert service.measured == [0.0, 30.0, 10.0, 50.0]
    assert motor.position == pytest.approx(50.0)


def test_steer_orientations_stops_when_no_new_advice_comes() -> None:
    from bluesky import RunEngine
    from bluesky.utils import FailedStatus

    motor, det = _devices()
    stale = {"n_orientations": 1, "state": "measuring", "next": {"omega": 20.0}}
    engine = RunEngine({})
    with pytest.raises((AdvisorError, FailedStatus), match="no new advice"):
        engine(steer_orientations(lambda: stale, motor, [det], count_time=0.0, poll_s=0.001,
                                  wait_s=0.05))  # fmt: skip
    assert motor.position == pytest.approx(20.0)  # measured once, then waited in vain


def test_http_advice_reads_the_latest_advice_of_the_service(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from steering.api.app import create_app
    from steering.db import History
    from tests.servers import serve

    history = History(f"sqlite:///{tmp_path / 'h.db'}")
    history.upsert_run("r1", material="Ge", state="running")
    with serve(create_app(history)) as base:
        latest = http_advice(base, "r1")
        assert latest() is None
        assert http_advice(base, "unknown")() is None
        history.add_advice("r1", n_orientations=3, ranking={"candidates": [{"omega": 12.0}]})
        advice = latest()
        assert advice is not None
        assert advice["n_orientations"] == 3
        assert next_orientation(advice) == NextOrientation(omega=12.0)


def test_queue_sink_counts_an_unreachable_manager_and_never_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    advice = {"run_id": "r", "n_orientations": 1, "state": "measuring", "next": {"omega": 1.0}}
    with QueueSink.connect(f"tcp://127.0.0.1:{port}", timeout_s=0.2) as sink:
        assert sink.submit({"state": "waiting", "next": None}) == "skipped"  # asks nothing
        assert sink.submit(advice) == "unreachable"
        sink.start()
        sink(advice)  # on the thread: the caller does not wait
    assert sink.counts["unreachable"] == 2
    assert "did not answer" in caplog.text


def test_serve_refuses_queue_options_it_cannot_use() -> None:
    import typer

    from steering.cli.serve import queue_sink

    ok: dict[str, Any] = {"plan": "steer_count_at", "count_time": None, "autostart": False}
    with pytest.raises(typer.BadParameter, match="--bootstrap"):
        queue_sink("tcp://127.0.0.1:1", bootstrap=None, plan_kwargs=None, **ok)
    for bad in ("{not json", "[1, 2]"):
        with pytest.raises(typer.BadParameter):
            queue_sink("tcp://127.0.0.1:1", bootstrap="kafka:9092", plan_kwargs=bad, **ok)
