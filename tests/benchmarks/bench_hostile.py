"""The service under hostile and careless input (``make bench``): a real ``steer serve``
process on loopback, with its defaults but a 30-s prediction budget
(``STEER_PREDICT_TIMEOUT_S``, so that the run is bounded), while

* a heavy but valid prediction runs (Ge, 360 angles, ``iqe`` + ``detector``: minutes of
  work on this machine),
* 50 other requests arrive at once (``POST /predict`` of one angle each),
* ``/health``, ``/runs`` and ``/metrics`` are polled every 50 ms throughout;

then a 4e6-element ``omegas`` body (413) and the 50-site Fm-3m CIF (422) with ``/health``
timed right after each. Reported: the latency percentiles of the polled endpoints, what the
51 predictions got (200 / 429 / 503 ...) and how long each took against the budget, the peak
RSS of the server and its workers (sampled every 0.2 s from /proc). Writes
bench-results/hostile.json.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.steering.api.test_limits import fm3m_cif

RESULTS = Path(os.environ.get("BENCH_DIR", "bench-results"))
BUDGET_S = 30.0
HEAVY = {
    "material": "Ge",
    "fc": "raman",
    "omegas": [float(w) for w in range(-180, 180)],
    "outputs": ["iqe", "detector"],
}
LIGHT = {"material": "Ge", "fc": "raman", "omegas": [10.0], "outputs": ["iqe"]}


def _tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and its children, MB."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if int(entry.name) == pid or ppid == pid:
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
    return total


def _percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1000
    return {
        "n": len(a),
        "p50_ms": round(float(np.percentile(a, 50)), 1),
        "p99_ms": round(float(np.percentile(a, 99)), 1),
        "max_ms": round(float(a.max()), 1),
    }


def bench_hostile(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "STEER_PREDICT_TIMEOUT_S": str(BUDGET_S)}
    cmd = [
        sys.executable, "-m", "steering.cli", "serve", "--port", str(port),
        "--database", f"sqlite:///{tmp_path / 'steer.db'}", "--state-dir", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, stdout=(tmp_path / "serve.log").open("w"), stderr=subprocess.STDOUT
    )
    stop = threading.Event()
    polled: dict[str, list[float]] = {"/health": [], "/runs": [], "/metrics": []}
    rss: list[float] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        # warm the worker (first request of a material: its setup and fold table)
        httpx.post(f"{base}/predict", json=LIGHT, timeout=120).raise_for_status()

        def poll() -> None:
            with httpx.Client(timeout=20) as c:
                while not stop.is_set():
                    for path, times in polled.items():
                        t0 = time.perf_counter()
                        assert c.get(f"{base}{path}").status_code == 200
                        times.append(time.perf_counter() - t0)
                    time.sleep(0.05)

        def sample() -> None:
            while not stop.is_set():
                rss.append(_tree_rss_mb(proc.pid))
                time.sleep(0.2)

        def predict(body: dict[str, Any]) -> tuple[int, float]:
            t0 = time.perf_counter()
            r = httpx.post(f"{base}/predict", json=body, timeout=BUDGET_S + 30)
            return r.status_code, time.perf_counter() - t0

        threads = [threading.Thread(target=poll), threading.Thread(target=sample)]
        for t in threads:
            t.start()
        with ThreadPoolExecutor(max_workers=51) as ex:
            heavy = ex.submit(predict, HEAVY)
            time.sleep(1.0)  # the heavy one is running
            others = [ex.submit(predict, LIGHT) for _ in range(50)]
            results = [f.result() for f in others]
            heavy_result = heavy.result()
        stop.set()
        for t in threads:
            t.join()

        with httpx.Client(timeout=30) as c:
            big = b'{"material": "Ge", "omegas": [' + b"0.0," * 4_000_000 + b"0.0]}"
            t0 = time.perf_counter()
            r413 = c.post(
                f"{base}/predict", content=big, headers={"Content-Type": "application/json"}
            )
            t413 = time.perf_counter() - t0
            t0 = time.perf_counter()
            c.get(f"{base}/health")
            health_after_413 = time.perf_counter() - t0
            t0 = time.perf_counter()
            rcif = c.post(f"{base}/predict", json={"cif": fm3m_cif(50), "outputs": ["dos"]})
            tcif = time.perf_counter() - t0
    finally:
        stop.set()
        proc.terminate()
        proc.wait(10)
    durations = [d for _, d in results] + [heavy_result[1]]
    report = {
        "budget_s": BUDGET_S,
        "heavy": {"status": heavy_result[0], "seconds": round(heavy_result[1], 2)},
        "others": dict(Counter(str(s) for s, _ in results)),
        "others_seconds_max": round(max(d for _, d in results), 2),
        "longest_prediction_s": round(max(durations), 2),
        "polled": {path: _percentiles(times) for path, times in polled.items()},
        "peak_rss_mb": round(max(rss), 1),
        "omegas_4e6": {
            "status": r413.status_code,
            "bytes": len(big),
            "seconds": round(t413, 3),
            "health_after_ms": round(health_after_413 * 1000, 1),
        },
        "cif_50_sites": {"status": rcif.status_code, "seconds": round(tcif, 3)},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hostile.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    assert report["polled"]["/health"]["p99_ms"] < 100
    assert r413.status_code == 413
    assert rcif.status_code == 422
    assert max(durations) < BUDGET_S + 5
