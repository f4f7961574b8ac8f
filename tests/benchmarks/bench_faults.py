"""Fault benchmark (``make bench``): kill -9 of ``steer consume`` at 20 random moments across
a 120-orientation replay through the embedded broker, each followed by a restart; the final
counts and exposure must equal the uninterrupted (offline) fold bit for bit.

Writes bench-results/faults.json. (tests/consumers/kafka/test_kafka.py does the same with 5
kills in the test suite; this is the long version.)
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from consumers.kafka import embedded_broker
from consumers.replay import replay
from tests.conftest import consume_cmd, kill_restart_cycles, small_ge_run

RESULTS = Path(os.environ.get("BENCH_DIR", "bench-results"))
KILLS = 20


def bench_kill_9_twenty_times(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    omegas = tuple(float(w) for w in np.arange(0.0, 120.0))
    path, offline, acc = small_ge_run(tmp_path / "ge120.steer", omegas, seed=120)
    state = tmp_path / "state"
    ckpt = state / "checkpoint.npz"
    rng = np.random.default_rng(2026)
    with embedded_broker() as broker:
        # 120 orientations of 5 s (plus moves) at 2.5x: about 6 minutes, room for 20 restarts
        # even when each start takes 15 s on a loaded machine
        sender = threading.Thread(
            target=replay, args=(path, broker.bootstrap), kwargs={"prefix": "faults", "speed": 2.5}
        )
        sender.start()
        kills = kill_restart_cycles(
            broker.bootstrap, "faults", state, KILLS, rng, max_delay_s=2.0, sender=sender
        )
        sender.join()
        done = subprocess.run(
            consume_cmd(broker.bootstrap, "faults", state),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    summary = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-2000:]}
    with np.load(ckpt) as f:
        counts_equal = bool(np.array_equal(f["counts"], acc.counts))
        exposure_equal = bool(np.array_equal(f["exposure"], acc.exposure))
    out = {
        "orientations": len(omegas),
        "kills": len(kills),
        "kills_during_replay": sum(bool(k["during_replay"]) for k in kills),
        "kill_moments_s": [k["at_s"] for k in kills],
        "final_done": bool(summary.get("done")),
        "events_folded": summary.get("events_folded"),
        "events_folded_offline": offline["events_folded"],
        "events_dropped_equal": summary.get("events_dropped") == offline["events_dropped"],
        "counts_identical": counts_equal,
        "exposure_identical": exposure_equal,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "faults.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    assert out["kills"] == KILLS
    assert out["final_done"]
    assert counts_equal
    assert exposure_equal
    assert out["events_folded"] == offline["events_folded"]
