"""The estimates on their own thread: the consumer never waits for a fit, and when the fits
fall behind (a fast replay), the newest snapshot is refined while the older ones waiting
get the VAE's estimate, flagged (``steer serve --estimates latest``)."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from consumers.reduction.accumulate import OrientationRecord, Snapshot
from steering.api.state import LiveState
from steering.db import History
from steering.exceptions import SteeringError
from steering.service import SteeringService, _Job
from tests.paths import MODELS


def _snapshot(n: int) -> Snapshot:
    counts = np.full((3, 4), float(n))
    exposure = np.ones((3, 4))
    return Snapshot(
        intensity=counts / exposure,
        variance=counts,
        counts=counts,
        exposure=exposure,
        mask=exposure > 0,
        n_orientations=n,
        moments=object(),  # type: ignore[arg-type]  # stands for the ~90 MB of moments
    )


def _record(n: int) -> OrientationRecord:
    return OrientationRecord(
        index=n - 1,
        omega=float(n),
        proton_charge=1.0,
        events=10,
        folded=5,
        dropped={},
        weight=1.0,
    )


def _bare(tmp_path: Path, estimates: str = "latest") -> SteeringService:
    """A service that is not started (no broker behind its address)."""
    return SteeringService(
        "127.0.0.1:9",
        "p",
        state_dir=tmp_path / "state",
        history=History(f"sqlite:///{tmp_path / 'h.db'}"),
        live=LiveState(),
        estimates=estimates,
    )


def _service(
    tmp_path: Path, estimates: str, *, yield_s: float = 0.0
) -> tuple[SteeringService, list[Any], threading.Event]:
    """A service whose consumer is a stand-in and whose estimate records its calls, the
    first one held until the returned event is set (a fit in progress)."""
    svc = _bare(tmp_path, estimates)
    svc.estimate_yield_s = yield_s
    meta = {"run_id": "r1", "material": "Ge"}
    svc.service = SimpleNamespace(
        pipeline=SimpleNamespace(meta=meta, acc=None),
        closed_at=None,
        summary=lambda: {"events_folded": 1},
        _stop_requested=False,
    )
    calls: list[Any] = []
    release = threading.Event()
    consumer = threading.get_ident()

    def estimate(run_id, meta, snapshot, record, t0, *, superseded_by=None):  # type: ignore[no-untyped-def]
        assert threading.get_ident() != consumer  # never on the consumer's thread
        if not calls:
            assert release.wait(30)
        calls.append((snapshot.n_orientations, superseded_by, snapshot.moments is None))

    def finish_plan(run_id: str, wait_s: float) -> None:
        assert 0 <= wait_s <= svc.final_plan_wait_s
        calls.append(("end", run_id))

    svc._estimate_and_advise = estimate  # type: ignore[method-assign]
    svc._finish_plan = finish_plan  # type: ignore[method-assign]
    return svc, calls, release


def test_the_newest_snapshot_is_refined_and_the_ones_waiting_are_superseded(
    tmp_path: Path,
) -> None:
    svc, calls, release = _service(tmp_path, "latest")
    fitting = threading.Event()
    svc._worker.submit(_Job("r0", lambda job: fitting.wait(30)))  # a fit in progress
    for n in (1, 2, 3, 4):  # the consumer hands over 4 orientations meanwhile
        svc._on_snapshot(_snapshot(n), _record(n))
    svc._on_run_complete({"run_id": "r1"}, None)
    assert svc._worker.pending == 6  # nothing waited on the consumer's thread
    assert svc.history.run("r1")["state"] != "complete"  # type: ignore[index]
    release.set()
    fitting.set()
    assert svc.drain(30)
    # 1-3 had 4 behind them: the VAE alone, their moments dropped while they waited
    assert calls == [
        (1, 4, True),
        (2, 4, True),
        (3, 4, True),
        (4, None, False),
        ("end", "r1"),
    ]
    assert svc.history.run("r1")["state"] == "complete"  # type: ignore[index]


def test_every_snapshot_is_refined_in_order_on_request(tmp_path: Path) -> None:
    svc, calls, release = _service(tmp_path, "every")
    fitting = threading.Event()
    svc._worker.submit(_Job("r0", lambda job: fitting.wait(30)))  # a fit in progress
    fitting.set()
    for n in (1, 2, 3):
        svc._on_snapshot(_snapshot(n), _record(n))
    svc._on_run_complete({"run_id": "r1"}, None)
    release.set()
    assert svc.drain(30)
    assert calls == [(1, None, False), (2, None, False), (3, None, False), ("end", "r1")]


def test_the_consumer_yields_to_an_estimate_only_when_none_is_behind(tmp_path: Path) -> None:
    """An idle estimates thread: the consumer waits for the snapshot's estimate (up to
    ``estimate_yield_s``), so that at real time the fit has the cores to itself. A fit in
    progress: the consumer goes on at once (a fast replay is never held up)."""
    svc, calls, release = _service(tmp_path, "latest", yield_s=60.0)
    release.set()  # fits end at once
    svc._on_snapshot(_snapshot(1), _record(1))
    assert calls == [(1, None, False)]  # made before the hand-over returned
    release.clear()  # the next one is held ...
    calls.clear()
    t = threading.Thread(target=svc._on_snapshot, args=(_snapshot(2), _record(2)))
    t.start()
    t.join(1.0)
    assert t.is_alive()  # ... and the consumer waits for it (up to 60 s here)
    release.set()
    t.join(30)
    assert calls == [(2, None, False)]
    assert svc.drain(30)
    # behind a fit in progress: no wait
    (tmp_path / "2").mkdir()
    svc2, calls2, release2 = _service(tmp_path / "2", "latest", yield_s=60.0)
    svc2._worker.submit(_Job("r1", lambda job: release2.wait(30)))  # a fit in progress
    svc2._on_snapshot(_snapshot(1), _record(1))  # returns at once
    assert calls2 == []
    release2.set()
    assert svc2.drain(30)
    assert calls2 == [(1, None, False)]


def test_an_unknown_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SteeringError, match="estimates must be one of latest, every"):
        SteeringService(
            "127.0.0.1:9",
            "p",
            state_dir=tmp_path / "state",
            history=History(f"sqlite:///{tmp_path / 'h.db'}"),
            live=LiveState(),
            estimates="some",
        )


def test_a_superseded_snapshot_gets_the_vaes_estimate_flagged_and_no_advice(
    tmp_path: Path, make_small_run, ge
) -> None:  # type: ignore[no-untyped-def]
    """The loop's side, with the committed model: the estimate says why it is the VAE's,
    the history keeps the flag, the angle counts as measured, and no advice is made."""
    from model_server.inversion.inference import Estimator
    from steering.advisor.ranking import Advisor
    from steering.loop import SteeringLoop

    _, _, acc = make_small_run(tmp_path / "ge.steer", (0.0, 30.0), seed=5)
    history = History(f"sqlite:///{tmp_path / 'h.db'}")
    history.upsert_run("r1", material="Ge", n_orientations=2)
    got: list[dict[str, Any]] = []

    def sink(message: dict[str, Any]) -> None:
        got.append(message)
        history.add_estimate(
            "r1",
            n_orientations=message["n_orientations"],
            omega=message["omega"],
            estimate=message["estimate"],
        )

    loop = SteeringLoop(
        Estimator(MODELS / "ge", n_samples=8),
        Advisor("Ge", material_setup=ge),
        None,  # type: ignore[arg-type]  # a superseded snapshot ranks nothing
        estimate_sinks=[sink],
        run_id="r1",
    )
    loop.superseded(acc.snapshot(), _record(2), 3)
    (message,) = got
    est = message["estimate"]
    assert est["source"] == "vae"
    assert est["superseded_by"] == 3
    assert "superseded" in est["fallback"]
    assert "after 3 orientations" in est["fallback"]
    assert set(est["fc"]) == set(est["vae"]["fc"])
    assert loop.measured == [2.0]
    assert loop.history == []  # no advice
    (row,) = history.estimates("r1")
    assert row["superseded_by"] == 3


def test_a_complete_runs_loop_is_let_go_and_old_snapshots_are_dropped(tmp_path: Path) -> None:
    """At a run's end its loop is let go (a run's planner, refiner and candidates would
    otherwise stay for as long as the service runs): the scan summary is kept, the live
    snapshot loses its moments, and only the last few complete runs keep a snapshot in
    memory (the API reads older ones from their exports); a running run keeps its own."""
    from steering.service import LIVE_COMPLETE_SNAPSHOTS

    svc = _bare(tmp_path)
    closed: list[str] = []
    n = LIVE_COMPLETE_SNAPSHOTS + 3
    ids = [f"r{i}" for i in range(n)]
    for run_id in [*ids, "running"]:
        exact = SimpleNamespace(close=lambda r=run_id: closed.append(r))
        scan = SimpleNamespace(started=2, skipped=1, error=None)
        svc._loops[run_id] = SimpleNamespace(exact=exact, scan=scan)  # type: ignore[assignment]
        svc.live.snapshots[run_id] = _snapshot(3)
    for run_id in ids:
        svc._retire(run_id)
    assert svc.active_runs == ["running"]
    assert closed == ids
    assert svc.scan_summary("r0") == {"started": 2, "skipped": 1, "error": None}
    assert svc.scan_summary("never") is None
    kept = ids[-LIVE_COMPLETE_SNAPSHOTS:]
    assert sorted(svc.live.snapshots) == sorted([*kept, "running"])
    assert all(svc.live.snapshots[r].moments is None for r in kept)
    assert svc.live.snapshots["running"].moments is not None
    assert svc.live.snapshots[kept[-1]].counts.sum() == 36.0  # the spectrum stays
    svc._retire("r0")  # not running: nothing to let go
    assert closed == ids


def test_a_restored_runs_orientations_are_queued_for_the_correction(tmp_path: Path) -> None:
    """A run restored from its checkpoint (``steer serve`` restarted mid-run): the
    orientations its pipeline holds at the run's start are handed to the run's new loop for
    the exact-fold correction, once; a new run (nothing folded yet), a pipeline already on
    another run, or a loop without a correction get nothing."""
    svc = _bare(tmp_path)
    meta = {"run_id": "r1", "material": "Ge"}
    records = [_record(1), _record(2)]
    svc.service = SimpleNamespace(
        pipeline=SimpleNamespace(meta=meta, acc=SimpleNamespace(records=records))
    )
    handed: list[list[Any]] = []
    loop = SimpleNamespace(exact=object(), note_folded=lambda r: handed.append(list(r)) or len(r))
    svc._remember_restored(meta)
    svc._note_restored(loop, "r1")  # type: ignore[arg-type]
    assert handed == [records]
    svc._note_restored(loop, "r1")  # type: ignore[arg-type]
    assert handed == [records]  # once
    svc._remember_restored({"run_id": "r1", "material": "Ge"})  # not the pipeline's run
    svc._note_restored(loop, "r1")  # type: ignore[arg-type]
    assert handed == [records]
    svc._remember_restored(meta)
    svc._note_restored(SimpleNamespace(exact=None), "r1")  # type: ignore[arg-type]
    assert handed == [records]
    svc.service.pipeline.acc = SimpleNamespace(records=[])  # a new run
    svc._remember_restored(meta)
    svc._note_restored(loop, "r1")  # type: ignore[arg-type]
    assert handed == [records]
