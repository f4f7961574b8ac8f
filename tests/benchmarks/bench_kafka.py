"""End-to-end through the embedded broker (``make bench``): writes bench-results/kafka.json.

A simulated Ge run is replayed onto the embedded broker, then consumed twice in the same
process: by a plain kafka-python consumer that only reads every message (the baseline), and
by the live consumer (decode, segment, fold, coverage, checkpoints). Reported as a ratio,
with the fold table already in the disk cache (its cold build is reported beside it). A
second live pass, with every angle's coverage already computed (the process-wide cache),
isolates the ingest path from the coverage (0.3 s of CPU per orientation).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from consumers.folding import FoldTable
from consumers.kafka import KafkaSource, embedded_broker, replay
from consumers.service import ConsumerService
from simulations.materials import setup
from simulations.run import RunPlan, simulate_run

RESULTS = Path(os.environ.get("BENCH_DIR", "bench-results"))


def bench_kafka_end_to_end(tmp_path: Path) -> None:
    run = tmp_path / "ge.steer"
    simulate_run(
        RunPlan(material="Ge", fc="raman", omegas=tuple(np.arange(0.0, 120.0, 8.0)), seed=6),
        run,
        progress=False,
    )
    # the fold table of Ge's grid is built once per machine and cached on disk (a service
    # sees the material before); the cold start is measured and reported on its own
    ms = setup("Ge")
    t = time.perf_counter()
    FoldTable.cached(ms.crystal, ms.grid, tolerance=0.05, voxels=96)
    t_table = time.perf_counter() - t
    with embedded_broker() as broker:
        rep = replay(run, broker.bootstrap, prefix="bench")
        # baseline: read every message, nothing else
        src = KafkaSource(broker.bootstrap, "bench", group_id="bench-plain")
        t = time.perf_counter()
        n = 0
        nxt: dict[tuple[str, int], int] = {}
        while True:
            batch = src.consume(10_000, 1.0)
            for m in batch:
                nxt[(m.topic, m.partition)] = m.offset + 1
            n += len(batch)
            if not batch and src.caught_up(nxt):
                break
        t_plain = time.perf_counter() - t
        src.close()
        # the live consumer
        src = KafkaSource(broker.bootstrap, "bench", group_id="bench-live")
        t = time.perf_counter()
        service = ConsumerService(src, tmp_path / "state")
        service.run(idle_exit_s=30)
        t_live = time.perf_counter() - t
        src.close()
        # again, with every angle's coverage in the process-wide cache (as in `steer serve`,
        # where the advisor computes the candidates' coverages at the run start): the
        # ingest path alone (decode, segment, fold, checkpoints)
        src = KafkaSource(broker.bootstrap, "bench", group_id="bench-live-cached")
        t = time.perf_counter()
        again = ConsumerService(src, tmp_path / "state-cached")
        again.run(idle_exit_s=30)
        t_cached = time.perf_counter() - t
        src.close()
    summary = service.summary()
    assert again.summary()["events_folded"] == summary["events_folded"]
    out = {
        "messages": n,
        "replay": rep,
        "plain_consume_seconds": t_plain,
        "live_consumer_seconds": t_live,
        "live_over_plain": t_live / t_plain,
        "live_coverage_cached_seconds": t_cached,
        "live_coverage_cached_over_plain": t_cached / t_plain,
        "fold_table_cold_build_seconds": t_table,
        "fold_seconds_per_orientation": summary.get("fold_seconds_per_orientation"),
        "target_live_over_plain": 1.25,
        "orientations": summary["orientations"],
        "events_folded": summary["events_folded"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kafka.json").write_text(json.dumps(out, indent=2, default=str))
    print(json.dumps(out, indent=2, default=str))
