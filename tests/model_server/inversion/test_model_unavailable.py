"""Model server unavailable during a run (its model folder missing): folding goes on, the run
is on record with its progress, and estimates resume once the model is back."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np

from consumers.kafka import EmbeddedBroker
from consumers.replay import replay
from steering.api.app import LiveState
from steering.db import History
from steering.service import SteeringService
from tests.paths import MODELS

MODELS = MODELS


def test_folding_goes_on_and_estimates_resume(tmp_path: Path, make_small_run) -> None:  # type: ignore[no-untyped-def]
    omegas = (0.0, 12.0, 24.0, 36.0, 48.0, 60.0)
    path, _, offline_acc = make_small_run(tmp_path / "ge.steer", omegas, seed=44)
    models = tmp_path / "models"
    models.mkdir()  # empty: no Ge model yet
    history = History(f"sqlite:///{tmp_path / 'steer.db'}")
    live = LiveState()
    broker = EmbeddedBroker()
    broker.start()
    service = SteeringService(
        broker.bootstrap, "mu", state_dir=tmp_path / "state", history=history, live=live,
        model_dir=models,
    )  # fmt: skip
    try:
        service.start()
        sender = threading.Thread(
            target=replay, args=(path, broker.bootstrap), kwargs={"prefix": "mu", "speed": 2.0}
        )
        sender.start()
        deadline = time.monotonic() + 180
        runs: list = []  # type: ignore[type-arg]
        while time.monotonic() < deadline:
            runs = history.runs()
            if runs and runs[0]["n_orientations"] >= 2:
                break
            time.sleep(0.2)
        assert runs, f"no run on record (consumer error: {service.error})"
        run_id = runs[0]["run_id"]
        assert runs[0]["n_orientations"] >= 2  # folding went on
        assert history.estimates(run_id) == []
        assert live.model_error is not None
        assert "ge" in live.model_error.lower() or "model" in live.model_error.lower()
        # the model comes back
        shutil.copytree(MODELS / "ge", models / "ge")
        while time.monotonic() < deadline:
            run = history.run(run_id) or {}
            if run.get("state") == "complete":
                break
            time.sleep(0.3)
        sender.join(60)
        assert run.get("state") == "complete"
        est = history.estimates(run_id)
        assert est, "estimates did not resume"
        assert est[-1]["n_orientations"] == len(omegas)
        assert est[0]["n_orientations"] > 1  # the first ones were skipped, not queued
        assert live.model_error is None
        acc = service.service.pipeline.acc
        assert np.array_equal(acc.counts, offline_acc.counts)  # nothing lost meanwhile
    finally:
        service.stop()
        broker.stop()
