"""End-to-end through the embedded broker (``make bench``): writes bench-results/kafka.json.

A simulated Ge run is replayed onto the embedded broker, then consumed in the same process
by a plain kafka-python consumer that only reads every message (the baseline) and by the
live consumer (decode, segment, fold, coverage, checkpoints), each from its own consumer
group, interleaved and repeated (medians; this machine is shared and noisy). Everything
that depends only on the set-up is precomputed as a deployment does it: the fold table of
the material's grid (its cold build is reported beside) and the coverage of every angle
(``steer coverage``, or any earlier run of the set-up, on disk; a fresh process's memory is
empty). Beside that: the live consumer on a set-up seen for the first time (every coverage
computed on the fly, 0.3 s of CPU per orientation) and with the coverages in memory.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import h5py
import numpy as np

import consumers.reduction.coverage_cache as coverage_cache
from consumers.kafka import KafkaSource, embedded_broker
from consumers.offline import precompute_coverages, run_setup
from consumers.reduction.table import FoldTable
from consumers.replay import replay
from consumers.service import ConsumerService
from simulations.lattice.materials import setup
from simulations.runs.simulate import RunPlan, simulate_run

RESULTS = Path(os.environ.get("BENCH_DIR", "bench-results"))
REPEATS = 3


def bench_kafka_end_to_end(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("STEER_CACHE_DIR", str(tmp_path / "cache"))  # a machine's first sight
    run = tmp_path / "ge.steer"
    simulate_run(
        RunPlan(material="Ge", fc="raman", omegas=tuple(np.arange(0.0, 120.0, 8.0)), seed=6),
        run,
        progress=False,
    )
    ms = setup("Ge")
    t = time.perf_counter()
    FoldTable.cached(ms.crystal, ms.grid, tolerance=0.05, voxels=96)
    t_table = time.perf_counter() - t
    groups = iter(range(1000))

    def plain(bootstrap: str) -> tuple[float, int]:
        src = KafkaSource(bootstrap, "bench", group_id=f"bench-plain-{next(groups)}")
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
        seconds = time.perf_counter() - t
        src.close()
        return seconds, n

    def live(bootstrap: str, *, memory: bool = False) -> tuple[float, ConsumerService]:
        if not memory:  # a fresh consumer process: nothing in memory
            with coverage_cache._COVERAGE_LOCK:
                coverage_cache._COVERAGE_CACHE.clear()
        g = next(groups)
        src = KafkaSource(bootstrap, "bench", group_id=f"bench-live-{g}")
        t = time.perf_counter()
        service = ConsumerService(src, tmp_path / f"state-{g}")
        service.run(idle_exit_s=30)
        seconds = time.perf_counter() - t
        src.close()
        return seconds, service

    with embedded_broker() as broker:
        rep = replay(run, broker.bootstrap, prefix="bench")
        t_plain_first, n = plain(broker.bootstrap)
        # a set-up seen for the first time: every coverage computed on the fly
        t_cold, cold = live(broker.bootstrap)
        # the deployment: the set-up's coverages precomputed on disk before the run
        # (here by the cold run; `steer coverage --run` fills the same files)
        folder, angles = run_setup(run)
        pre = precompute_coverages(folder, angles, progress=False)
        assert pre["computed"] == 0, pre  # the cold run wrote every angle
        coverage_cache._COVERAGE_CACHE.clear()
        t = time.perf_counter()
        fresh = precompute_coverages(folder, angles, progress=False)
        t_setup_check = time.perf_counter() - t
        assert fresh["computed"] == 0
        t_plains, t_lives = [t_plain_first], []
        for _ in range(REPEATS):
            seconds, service = live(broker.bootstrap)
            t_lives.append(seconds)
            t_plains.append(plain(broker.bootstrap)[0])
        t_memory, _ = live(broker.bootstrap, memory=True)
    summary = service.summary()
    assert cold.summary()["events_folded"] == summary["events_folded"]
    # the coverages read from disk are the ones computed: bitwise the same exposure
    with (
        h5py.File(cold.finished_runs[0]["path"]) as a,
        h5py.File(service.finished_runs[0]["path"]) as b,
    ):
        for name in ("counts", "exposure"):
            np.testing.assert_array_equal(a[f"entry/iqe/{name}"][()], b[f"entry/iqe/{name}"][()])
    t_plain = statistics.median(t_plains)
    t_live = statistics.median(t_lives)
    out = {
        "messages": n,
        "replay": rep,
        "repeats": REPEATS,
        "plain_consume_seconds": t_plain,
        "plain_consume_seconds_all": t_plains,
        "live_consumer_seconds": t_live,
        "live_consumer_seconds_all": t_lives,
        "live_over_plain": t_live / t_plain,
        "target_live_over_plain": 1.25,
        "live_cold_coverage_seconds": t_cold,
        "live_cold_coverage_over_plain": t_cold / t_plain,
        "live_coverage_in_memory_seconds": t_memory,
        "live_coverage_in_memory_over_plain": t_memory / t_plain,
        "coverage_disk_check_seconds": t_setup_check,
        "fold_table_cold_build_seconds": t_table,
        "fold_seconds_per_orientation_cold": cold.summary().get("fold_seconds_per_orientation"),
        "fold_seconds_per_orientation": summary.get("fold_seconds_per_orientation"),
        "orientations": summary["orientations"],
        "events_folded": summary["events_folded"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kafka.json").write_text(json.dumps(out, indent=2, default=str))
    print(json.dumps(out, indent=2, default=str))
