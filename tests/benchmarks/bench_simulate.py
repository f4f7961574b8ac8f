"""Synthetic-instrument benchmarks (``make bench``): writes bench-results/simulate.json.

* Wall time of the issue's reference run: Ge, FC set ``raman``, 120 orientations x 2e5
  events, written as a recorded-run file (target <= 120 s on this machine);
* the phonon-table S(Q, E) kernel against the exact one (an eigenproblem per Q,
  :class:`CoherentSQE`) on the same detector cells, in the same process, as a ratio.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from simulations.fcdb.reference import resolve_fc
from simulations.instrument.events import OrientationSimulator
from simulations.instrument.spectrometer import Instrument, Orientation
from simulations.lattice.materials import setup
from simulations.lattice.sqe import CoherentSQE
from simulations.runs.simulate import RunPlan, simulate_run

RESULTS = Path(os.environ.get("BENCH_DIR", "bench-results"))


def bench_simulated_run_120_orientations(tmp_path: Path) -> None:
    plan = RunPlan(
        material="Ge",
        fc="raman",
        omegas=tuple(np.arange(0.0, 120.0)),
        events_per_orientation=2e5,
        seed=1,
    )
    summary = simulate_run(plan, tmp_path / "ge_run.steer", progress=False)
    size = (tmp_path / "ge_run.steer").stat().st_size

    # kernel vs exact S(Q, E) on the same cells (one orientation, 400 super-pixels)
    ms = setup("Ge")
    _, c = resolve_fc("Ge", "raman", ms)
    ins = Instrument.arcs_like()
    model = CoherentSQE(ms.basis, c, temperature=5.0, resolution=ins.resolution(80.0))
    sim = OrientationSimulator(
        model, ins, Orientation.from_vectors(ms.crystal, (1, 0, 0), (0, 1, 0)), 80.0
    )
    sim.expected(0.0)
    t = time.perf_counter()
    sim.expected(30.0)
    t_table = time.perf_counter() - t
    g = np.arange(0, sim.n_groups, sim.n_groups // 400)[:400]
    q_lab = -sim._kf[None, :, None] * sim._group_dir[g][:, None, :]
    q_lab[..., 2] += sim._ki
    q = sim.orientation.lab_to_rlu(q_lab.reshape(-1, 3), 30.0)
    t = time.perf_counter()
    model.sqe_from_modes(*model.structure_factors(q), sim.e_centres[:1])
    t_exact = (time.perf_counter() - t) * sim.n_groups / len(g)

    out = {
        "run": summary.to_dict(),
        "target_seconds": 120.0,
        "events_per_second": summary.events / summary.seconds,
        "file_bytes": size,
        "orientation_kernel_seconds": t_table,
        "orientation_exact_seconds_extrapolated": t_exact,
        "kernel_speedup_vs_exact": t_exact / t_table,
        "cells_per_orientation": int(sim.n_groups * len(sim.e_centres)),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "simulate.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
