"""Load benchmark (``make bench``): a run at 10x the nominal event rate (2e6 events per
60-s orientation instead of 2e5: 33 k events/s) replayed in real time through the embedded
broker for ``STEER_LOAD_MINUTES`` (default 10) minutes. The consumer (``steer consume``, its
own process) starts late (30 % of the run, at least a minute), so that it begins behind a
burst of several orientations of data and has to catch up while the rest arrives.

Reported: events/s sustained, the consumer's peak RSS (sampled every second from /proc),
the consumer lag (messages between the topics' ends and the offsets of its last checkpoint),
its maximum and the time from that maximum until it is back under one orientation's worth
of messages (a checkpoint comes after each orientation, so that is its floor).
Writes bench-results/load.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from consumers.kafka import embedded_broker, topics_for
from consumers.replay import replay
from simulations.runs.simulate import RunPlan, simulate_run

RESULTS = Path(os.environ.get("BENCH_DIR", "bench-results"))
MINUTES = float(os.environ.get("STEER_LOAD_MINUTES", "10"))
PREFIX = "load"
DELAY_FRACTION = 0.3


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _checkpointed(path: Path) -> dict[tuple[str, int], int]:
    """Next offsets of the consumer's last checkpoint (what it has folded for good)."""
    try:
        with np.load(path) as f:
            js = json.loads(bytes(f["__json__"]).decode())
    except (OSError, ValueError, KeyError):  # none yet, or being replaced
        return {}
    return {(t, int(p)): int(o) for t, p, o in js.get("offsets", [])}


def bench_load_ten_times_nominal(tmp_path: Path) -> None:
    from kafka import KafkaConsumer, TopicPartition

    n_orient = max(2, round(MINUTES))  # one orientation a minute (60 s count + moves)
    delay = max(60.0, DELAY_FRACTION * 62.0 * n_orient)
    run = tmp_path / "load.steer"
    t0 = time.perf_counter()
    simulate_run(
        RunPlan(
            material="Ge",
            fc="raman",
            omegas=tuple(np.arange(n_orient) * 3.0),
            events_per_orientation=2e6,
            seed=77,
        ),
        run,
        progress=False,
    )
    t_sim = time.perf_counter() - t0
    samples: list[dict[str, float]] = []
    with embedded_broker() as broker:
        sent: dict[str, object] = {}
        sender = threading.Thread(
            target=lambda: sent.update(replay(run, broker.bootstrap, prefix=PREFIX, speed=1.0))
        )
        sender.start()
        t_start = time.monotonic()
        # the consumer starts late: a burst of DELAY_FRACTION of the run is waiting for it
        time.sleep(delay)
        state = tmp_path / "state"
        proc = subprocess.Popen(
            [sys.executable, "-m", "steering.cli", "consume", "--bootstrap", broker.bootstrap,
             "--prefix", PREFIX, "--state-dir", str(state), "--idle-exit", "30", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        ends = KafkaConsumer(bootstrap_servers=broker.bootstrap)
        parts = [TopicPartition(t, 0) for t in topics_for(PREFIX)]
        ckpt = state / "checkpoint.npz"
        while proc.poll() is None:
            end = ends.end_offsets(parts)
            done = _checkpointed(ckpt)
            lag = sum(end[p] - done.get((p.topic, p.partition), 0) for p in parts)
            samples.append(
                {
                    "t": time.monotonic() - t_start,
                    "lag": float(lag),
                    "rss_mb": _rss_mb(proc.pid) or 0.0,
                }
            )
            time.sleep(1.0)
        out_text = proc.stdout.read() if proc.stdout else ""
        sender.join()
        ends.close()
    summary = json.loads(out_text) if out_text.strip() else {}
    t_consumer = [s["t"] for s in samples]
    lag = np.array([s["lag"] for s in samples])
    rss = np.array([s["rss_mb"] for s in samples])
    per_orientation = float(sent.get("messages", 0)) / n_orient if sent else 0.0
    i_max = int(np.argmax(lag)) if len(lag) else 0
    recovered = next(
        (t_consumer[i] for i in range(i_max, len(lag)) if lag[i] < per_orientation), None
    )
    events = int(summary.get("events_folded", 0)) + int(summary.get("events_dropped", 0))
    span = (t_consumer[-1] - delay) if t_consumer else 0.0
    out = {
        "minutes_of_data": n_orient,
        "events_per_orientation": 2e6,
        "nominal_events_per_orientation": 2e5,
        "messages": sent.get("messages"),
        "events_consumed": events,
        "consumer_seconds": round(span, 1),
        "events_per_second_sustained": round(events / span, 1) if span > 0 else None,
        "peak_rss_mb": round(float(rss.max()), 1) if len(rss) else None,
        "consumer_start_delay_s": round(delay, 1),
        "max_lag_messages": int(lag.max()) if len(lag) else None,
        "lag_recovered_below_one_orientation_at_s": None
        if recovered is None
        else round(recovered - t_consumer[i_max], 1),
        "messages_per_orientation": round(per_orientation, 1),
        "run_done": summary.get("done"),
        "simulation_seconds": round(t_sim, 1),
        "lag_samples": [[round(s["t"], 1), int(s["lag"]), round(s["rss_mb"], 1)] for s in samples],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "load.json").write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "lag_samples"}, indent=2))
    assert out["run_done"]
    assert recovered is not None
