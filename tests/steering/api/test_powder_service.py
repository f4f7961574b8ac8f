"""A powder run through the whole service on the embedded broker: folded into S(|Q|, E),
shown by the API with its |Q| axis, exported, and never handed to the single-crystal
model or the angle advisor."""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import httpx
import numpy as np

from consumers.kafka import EmbeddedBroker
from consumers.offline import fold_recorded_run
from consumers.replay import replay
from simulations.runs.simulate import RunPlan, simulate_run
from steering.api.app import LiveState, create_app
from steering.db import History
from steering.service import SteeringService
from tests.paths import MODELS
from tests.servers import TOKEN, serve


def test_powder_run_through_the_service_and_the_api(tmp_path: Path) -> None:
    path = tmp_path / "al.steer"
    plan = RunPlan(
        material="Al", powder=True, omegas=(0.0,) * 3, ei=50.0, temperature=300.0,
        events_per_orientation=5e4, count_time=2.0, mesh=16, seed=4,
    )  # fmt: skip
    simulate_run(plan, path, progress=False)
    offline, acc = fold_recorded_run(path, progress=False)
    history = History(f"sqlite:///{tmp_path / 'steer.db'}")
    live = LiveState()
    broker = EmbeddedBroker()
    broker.start()
    service = None
    try:
        replay(path, broker.bootstrap, prefix="pow")
        service = SteeringService(
            broker.bootstrap,
            "pow",
            state_dir=tmp_path / "state",
            history=history,
            live=live,
            model_dir=MODELS,
        )
        service.start(idle_exit_s=15)
        app = create_app(history, token=TOKEN, live=live, state_dir=tmp_path / "state")
        with serve(app) as base, httpx.Client() as c:
            deadline = time.monotonic() + 180
            run: dict = {}  # type: ignore[type-arg]
            while time.monotonic() < deadline:
                runs = c.get(f"{base}/runs").json()
                if runs and runs[0]["state"] == "complete":
                    run = runs[0]
                    break
                time.sleep(0.5)
            assert run, f"run not complete in time (consumer error: {service.error})"
            run_id = run["run_id"]
            assert run["n_orientations"] == 3
            assert run["summary"]["events_folded"] == offline["events_folded"]
            # the running estimate of each step is the powder refinement of its counts;
            # no angle advice for a powder
            est = c.get(f"{base}/runs/{run_id}/estimates").json()["estimates"]
            assert [e["n_orientations"] for e in est] == [1, 2, 3]
            fc = est[-1]["fc"]
            assert set(fc) == {"1NN_xx", "1NN_zz", "1NN_xy", "2NN_xx", "2NN_yy"}
            assert est[-1]["source"] == "refined"
            # more counts, a smaller std
            assert fc["1NN_xx"]["std"] < est[0]["fc"]["1NN_xx"]["std"]
            assert c.get(f"{base}/runs/{run_id}/advice").json()["advice"] == []
            spec = c.get(f"{base}/runs/{run_id}/spectrum").json()
            assert spec["sample_kind"] == "powder"
            assert spec["q_edges_inv_angstrom"] == acc.grid.q_edges.tolist()
            assert np.shape(spec["intensity"]) == acc.grid.shape
            png = c.get(f"{base}/runs/{run_id}/spectrum", params={"format": "png"})
            assert png.status_code == 200
            assert png.content[:4] == b"\x89PNG"
            export = tmp_path / "state" / run["export_path"]
        with h5py.File(export, "r") as f:
            assert f["entry"].attrs["sample_kind"] == "powder"
            np.testing.assert_array_equal(f["entry/iqe/counts"][()], acc.counts)
            assert f["entry/iqe/q"].shape == (acc.grid.n_q + 1,)
            assert f["entry/sample/physical_form"][()].decode() == "powder"
    finally:
        if service is not None:
            service.stop()
        broker.stop()
