"""Prediction endpoint benchmark (``make bench``): writes bench-results/predict.json.

``POST /predict`` for Ge (``raman``, Ei 80 meV, all three outputs) through a FastAPI
TestClient, JSON answers: the first request (cold: material setup, fold table, phonon table,
compiled kernels), then warm requests for 1 and 10 orientations (new angles each time, so
nothing but the setup is reused), and a PNG; best and median of 5 (this machine is shared
and noisy). A new FC set adds the phonon table (about 1 s). Target: <= 1 s for one omega.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI
from fastapi.testclient import TestClient

from steering.api.app import LiveState
from steering.api.predict import predict_router
from steering.db import History

RESULTS = Path(os.environ.get("BENCH_DIR", "bench-results"))


def bench_predict_latency() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        app = FastAPI()
        app.include_router(predict_router(LiveState(), History(f"sqlite:///{tmp}/steer.db")))
        client = TestClient(app)
        body = {"material": "Ge", "fc": "raman", "ei": 80.0}

        def post(omegas: list[float], **headers: str) -> float:
            t = time.perf_counter()
            r = client.post("/predict", json={**body, "omegas": omegas}, headers=headers)
            assert r.status_code == 200, r.text
            return time.perf_counter() - t

        cold = post([0.0])
        one = [post([1.0 + k]) for k in range(5)]
        ten = [post(list(10.0 + k + 10.0 * np.arange(10))) for k in range(5)]
        png = [post([50.0 + k], Accept="image/png") for k in range(5)]
    out = {
        "material": "Ge",
        "outputs": ["iqe", "detector", "powder"],
        "cold_first_request_seconds": cold,
        "one_omega_seconds_best": min(one),
        "one_omega_seconds_median": float(np.median(one)),
        "ten_omegas_seconds_best": min(ten),
        "ten_omegas_seconds_median": float(np.median(ten)),
        "one_omega_png_seconds_median": float(np.median(png)),
        "target_one_omega_seconds": 1.0,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "predict.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
