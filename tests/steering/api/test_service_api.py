"""The whole service on the embedded broker: a replayed run is consumed, folded, estimated
and advised, and the API (real uvicorn) shows it as it goes and when it is complete."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np

from consumers.kafka import EmbeddedBroker
from consumers.replay import replay
from steering.api.app import LiveState, create_app
from steering.db import History
from steering.service import SteeringService
from tests.paths import MODELS
from tests.servers import TOKEN, serve

MODELS = MODELS


def test_replayed_run_through_the_service_and_the_api(tmp_path: Path, make_small_run) -> None:  # type: ignore[no-untyped-def]
    path, offline, offline_acc = make_small_run(
        tmp_path / "ge.steer", (0.0, 20.0, 40.0, 60.0), seed=12
    )
    history = History(f"sqlite:///{tmp_path / 'steer.db'}")
    live = LiveState()
    broker = EmbeddedBroker()
    broker.start()
    try:
        replay(path, broker.bootstrap, prefix="svc")
        service = SteeringService(
            broker.bootstrap,
            "svc",
            state_dir=tmp_path / "state",
            history=history,
            live=live,
            model_dir=MODELS,
            # 4 orientations replayed at full speed end before the planner's information is
            # ready (computed in the background from the run start): the run's end plans
            # the last advice (on a loaded machine the nodes can take a minute)
            final_plan_wait_s=180.0,
        )
        service.start(idle_exit_s=15)
        app = create_app(history, token=TOKEN, live=live, state_dir=tmp_path / "state")
        with serve(app) as base, httpx.Client() as c:
            deadline = time.monotonic() + 240
            run: dict = {}  # type: ignore[type-arg]
            while time.monotonic() < deadline:
                runs = c.get(f"{base}/runs").json()
                if runs and runs[0]["state"] == "complete":
                    run = runs[0]
                    break
                time.sleep(0.5)
            assert run, f"run not complete in time (consumer error: {service.error})"
            run_id = run["run_id"]
            assert run["n_orientations"] == 4
            assert not Path(run["export_path"]).is_absolute()  # relative to the state folder
            assert run["summary"]["events_folded"] == offline["events_folded"]
            est = c.get(f"{base}/runs/{run_id}/estimates").json()["estimates"]
            assert [e["n_orientations"] for e in est] == [1, 2, 3, 4]
            assert all(e["model_version"].startswith("Ge") for e in est)
            # the running estimate fits the path's counts split by zone class (Ge: 4)
            assert est[-1]["source"] == "refined", est[-1].get("fallback")
            assert est[-1]["refined"]["binning"] == "classes"
            advice = c.get(f"{base}/runs/{run_id}/advice").json()["advice"]
            assert advice
            assert advice[-1]["basis"] in ("spectrum-d-optimal", "coverage")
            # the information plan of the refined posterior, the stop state and the next angle
            last = advice[-1]
            assert last["state"] in ("measuring", "done")
            plan = last["plan"]
            assert plan["basis"] == "information-per-beam-time"
            gains = [c["gain_per_minute"] for c in plan["candidates"]]
            assert gains == sorted(gains, reverse=True)
            assert gains[0] > 0
            assert last["next"]["omega"] == plan["candidates"][0]["omega"]
            assert last["stop"]["state"] in ("no target", "measuring", "done", "unreachable")
            # what the people's controls made of it: none set, the advisor's best is next
            assert advice[-1]["state"] == "measuring"
            assert advice[-1]["next"]["source"] == "advisor"
            controls = c.get(f"{base}/runs/{run_id}/advisor").json()
            lo, hi = controls["omega_range"]  # the run's candidate angles
            assert lo < hi
            assert controls["controls"]["overrides"] == []
            spec = c.get(f"{base}/runs/{run_id}/spectrum").json()
            assert spec["n_orientations"] == 4
            # each orientation's spectrum alone; together they make the run's counts
            one = c.get(f"{base}/runs/{run_id}/spectrum", params={"orientation": 2}).json()
            assert one["orientation"] == 2
            assert c.get(f"{base}/runs/{run_id}/spectrum?orientation=4").status_code == 404
            per = live.orientations[run_id]
            assert sorted(per) == [0, 1, 2, 3]
            total = sum(np.asarray(per[k][0], dtype=float) for k in per)
            assert np.array_equal(total, offline_acc.counts)
            assert np.array_equal(np.asarray(one["mask"]), per[2][1] > 0)
            h5 = c.get(f"{base}/runs/{run_id}/spectrum?format=h5")
            assert h5.status_code == 200
            assert h5.content[:8] == b"\x89HDF\r\n\x1a\n"
            assert c.get(f"{base}/health").json()["model_version"].startswith("Ge")
            from prometheus_client.parser import text_string_to_metric_families

            text = c.get(f"{base}/metrics").text
            fams = {f.name: f for f in text_string_to_metric_families(text)}
            count = [
                s.value for s in fams["steer_estimate_seconds"].samples if s.name.endswith("_count")
            ]
            assert count[0] >= 4
            assert "steer_advisor_seconds" in fams
            assert "steer_model_info" in fams
            # the complete run's loop is let go (its planner, refiner and candidates); what
            # is asked of the run later stays, and its spectrum without the moments
            assert service.drain(60)
            assert run_id not in service.active_runs
            assert service.scan_summary(run_id) is not None
            assert live.snapshots[run_id].moments is None
            assert c.get(f"{base}/runs/{run_id}/spectrum").json()["n_orientations"] == 4
        assert len(service.latencies) == 4
    finally:
        service.stop()
        broker.stop()
