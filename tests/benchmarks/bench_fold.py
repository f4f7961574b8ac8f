"""Folding benchmarks (``make bench``): writes bench-results/fold.json.

* The lookup-table fold kernel on 2e6 events of random pixels and energies, as ev44
  delivers them (int32 pixel ids and times of flight), one core (numba, no threads), in
  events/s: the best of 20 repeats (this machine is shared and noisy; the median is
  reported too);
* the coverage of one orientation (instrument model, default sampling);
* the brute-force reference binning (k-d tree over the q-path's star) on the same events,
  in the same process, as a ratio;
* ``steer fold`` of a simulated 30-orientation Ge run end to end (decode, segmentation,
  fold, coverage, HDF5) with the dispersion check against the true FC set.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from consumers.offline import fold_recorded_run
from consumers.reduction.folding import Folder
from consumers.reduction.table import FoldTable
from simulations.instrument.binning import ReferenceBinning
from simulations.instrument.spectrometer import Instrument, Orientation, energy_to_speed
from simulations.lattice.materials import setup
from simulations.runs.simulate import RunPlan, simulate_run

RESULTS = Path(os.environ.get("BENCH_DIR", "bench-results"))


def bench_fold(tmp_path: Path) -> None:
    ms = setup("Ge")
    ins = Instrument.arcs_like()
    ei = 80.0
    orientation = Orientation.from_vectors(ms.crystal, (1, 0, 0), (0, 1, 0))
    t = time.perf_counter()
    table = FoldTable.build(ms.crystal, ms.grid, tolerance=0.05, voxels=96)
    t_build = time.perf_counter() - t
    folder = Folder(table, ms.grid, ins, orientation, ei)
    rng = np.random.default_rng(0)
    n = 2_000_000
    pix = rng.integers(0, ins.n_pixels, n).astype(np.int32)
    energy = rng.uniform(-5.0, 75.0, n)
    tof = np.rint((ins.l1 / energy_to_speed(ei) + ins.l2[pix] / energy_to_speed(ei - energy)) * 1e9)
    tof = tof.astype(np.int32)
    folder.fold(pix[:1000], tof[:1000], 30.0)  # compile
    times = []
    for _ in range(20):
        t = time.perf_counter()
        folder.fold(pix, tof, 30.0)
        times.append(time.perf_counter() - t)
    ours = n / min(times)
    ref = ReferenceBinning(ms.crystal, ms.grid, 0.05)
    m = 200_000
    t = time.perf_counter()
    q, e = ins.event_to_qe(pix[:m], tof[:m], ei)
    ref.histogram(orientation.lab_to_rlu(q, 30.0), e)
    brute = m / (time.perf_counter() - t)
    folder.coverage(29.0)  # compile (or load the compiled kernel)
    t = time.perf_counter()
    folder.coverage(30.0, cache=False)
    t_cov = time.perf_counter() - t

    run = tmp_path / "ge30.steer"
    simulate_run(
        RunPlan(material="Ge", fc="raman", omegas=tuple(np.arange(0.0, 120.0, 4.0)), seed=5),
        run,
        progress=False,
    )
    summary, _ = fold_recorded_run(run, tmp_path / "iqe.h5", progress=False, check=True)
    out = {
        "fold_kernel_events_per_second_one_core": ours,
        "fold_kernel_events_per_second_median": n / float(np.median(times)),
        "brute_force_events_per_second": brute,
        "speedup_vs_brute_force": ours / brute,
        "table_build_seconds": t_build,
        "table_candidates": table.n_candidates,
        "coverage_seconds_per_orientation": t_cov,
        "offline_fold_30_orientations": summary,
        "targets": {"fold_kernel_events_per_second": 5e7, "speedup_vs_brute_force": 20},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fold.json").write_text(json.dumps(out, indent=2, default=str))
    print(json.dumps(out, indent=2, default=str))
