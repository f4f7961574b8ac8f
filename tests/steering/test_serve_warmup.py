"""``steer serve`` warms its prediction workers in the background: ``/health`` answers at
once and says how far the warm-up is; a prediction asked for during the warm-up is answered
(it waits for the step in progress, never fails for it); with ``--no-predict-warmup`` the
warm-up is off. Real processes, no timed assertions (the timings are in
``tests/benchmarks/bench_predict.py``)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from model_server.prediction.pool import PredictionPool
from model_server.prediction.worker import WARMUP_STEPS
from tests.servers import steer_serve

GE = {"material": "Ge", "fc": "raman", "ei": 80.0, "omegas": [12.5], "outputs": ["iqe"]}


def test_pool_state_without_warmup_and_before_start() -> None:
    assert PredictionPool().state() == {"workers": 0, "running": 0, "pending": 0, "warmup": "off"}
    assert PredictionPool(warmup=True).state()["warmup"] == "not started"


@pytest.mark.slow
def test_health_reports_the_warmup_and_a_request_during_it_is_answered(tmp_path: Path) -> None:
    names = [step.name for step in WARMUP_STEPS]
    with steer_serve(tmp_path) as server:
        first = httpx.get(f"{server.base}/health", timeout=10).json()["predictions"]
        assert first["workers"] == 1
        assert first["warmup"] in ("warming", "ready")
        assert list(first["warmup_s"]) == names
        warming_when_asked = first["warmup"] == "warming"

        r = httpx.post(f"{server.base}/predict", json=GE, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["iqe"]["intensity"]

        deadline = time.monotonic() + 300
        while True:
            state = httpx.get(f"{server.base}/health", timeout=10).json()["predictions"]
            if state["warmup"] != "warming" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert state["warmup"] == "ready", state
        ended = list(state["warmup_s"].values())
        # every step done (the e3nn model is shipped in models/fc_e3nn), in order
        assert all(isinstance(t, float) and t > 0 for t in ended), state
        assert ended == sorted(ended)
        assert state["workers"] == 1
        print(f"warming when first asked: {warming_when_asked}; warm-up: {state['warmup_s']}")


@pytest.mark.slow
def test_no_predict_warmup(tmp_path: Path) -> None:
    with steer_serve(tmp_path, "--no-predict-warmup") as server:
        state = httpx.get(f"{server.base}/health", timeout=10).json()["predictions"]
        assert state["warmup"] == "off"
        assert "warmup_s" not in state
        r = httpx.post(f"{server.base}/predict", json=GE, timeout=120)
        assert r.status_code == 200, r.text
