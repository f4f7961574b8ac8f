"""Powder forward-model benchmark (``make bench``): writes bench-results/powder_forward.json.

Al (2-shell basis, 5 coefficients), coherent one-phonon powder S(|Q|, E) on 100 |Q| x 70
energy bins, 64 directions per |Q|, 300 K, Debye-Waller mesh 8^3, ARCS Ei = 60 meV
resolution: spectra per second of :class:`PowderForwardModel` on batches of 64 sets (torch's
thread count of this process), against the reference :func:`powder_spectrum` of one
:class:`CoherentSQE` per set (built for each set, as a training-set loop would) in the same
process, as a ratio; best of several runs each (the machine's cores may be shared). Ge (16
coefficients, two atoms) is timed the same way. The agreement of the two at the bin centres
(``broadening="centre"``) is recorded too, and the speed on one thread (torch's and the
solver's; the reference is numpy, mostly on one thread) for a per-core ratio."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from simulations.fcdb.reference import load_reference
from simulations.lattice.materials import MaterialSetup, setup
from simulations.lattice.powder import powder_spectrum
from simulations.lattice.powder_forward import PowderForwardModel
from simulations.lattice.sqe import CoherentSQE
from tests.benchmarks.timing import best_of

RESULTS = Path(os.environ.get("BENCH_DIR", "bench-results"))
Q = np.linspace(0.5, 7.0, 100)  # 1/Angstrom
EDGES = np.linspace(0.0, 49.0, 71)  # 70 bins of 0.7 meV
DIRECTIONS = 64
BATCH = 64
TEMPERATURE = 300.0


def _measure(ms: MaterialSetup, centre: np.ndarray, n_reference: int) -> dict[str, object]:
    rng = np.random.default_rng(0)
    sets = centre * rng.uniform(0.9, 1.1, size=(BATCH, len(centre)))
    model = PowderForwardModel(
        ms.basis, Q, EDGES, ms.resolution, TEMPERATURE, directions=DIRECTIONS
    )
    model.spectra(sets[:4])  # warm-up (compiled kernels, allocations)
    t_fast = best_of(lambda: model.spectra(sets), repeats=6)
    threads = torch.get_num_threads()
    try:  # one thread (torch and the Jacobi solver), restored after
        torch.set_num_threads(1)
        with threadpool_limits(limits=1):
            t_one = best_of(lambda: model.spectra(sets), repeats=4)
    finally:
        torch.set_num_threads(threads)
    stable = model.spectra(sets).stable

    energies = 0.5 * (EDGES[1:] + EDGES[:-1])

    def reference_loop() -> None:
        for c in sets[:n_reference]:
            sqe = CoherentSQE(
                ms.basis, c, temperature=TEMPERATURE, resolution=ms.resolution, dw_mesh=8
            )
            powder_spectrum(sqe, Q, energies, directions=DIRECTIONS, seed=0)

    t_ref = best_of(reference_loop, repeats=3) / n_reference

    points = PowderForwardModel(
        ms.basis,
        Q,
        EDGES,
        ms.resolution,
        TEMPERATURE,
        directions=DIRECTIONS,
        broadening="centre",
    )
    ours = points.spectra(sets[:1]).intensity[0]
    sqe = CoherentSQE(
        ms.basis, sets[0], temperature=TEMPERATURE, resolution=ms.resolution, dw_mesh=8
    )
    ref = powder_spectrum(sqe, Q, energies, directions=DIRECTIONS, seed=0)
    mask = ref > 1e-3 * ref.max()
    per_s = BATCH / t_fast
    return {
        "n_coefficients": len(centre),
        "solver": model.solver,
        "stable_sets": int(stable.sum()),
        "spectra_per_s": round(per_s, 1),
        "ms_per_spectrum": round(1e3 * t_fast / BATCH, 3),
        "reference_ms_per_spectrum": round(1e3 * t_ref, 2),
        "speedup_vs_reference": round(per_s * t_ref, 1),
        "one_thread_spectra_per_s": round(BATCH / t_one, 1),
        "one_thread_speedup_vs_reference": round(BATCH / t_one * t_ref, 1),
        "max_rel_deviation_from_reference": float(np.max(np.abs(ours - ref)[mask] / ref[mask])),
    }


def _measure_shells(ms: MaterialSetup, centre: np.ndarray, mesh: int) -> dict[str, object]:
    """The shell average on the powder grid of a run (|Q| 0-10 1/A in 0.05, E 0-45 meV
    in 0.5) against the per-set reference powder_shells, in the same process."""
    from simulations.lattice.powder import powder_shells

    q = np.arange(0.025, 10.0, 0.05)
    edges = np.arange(0.0, 45.01, 0.5)
    rng = np.random.default_rng(0)
    sets = centre * rng.uniform(0.9, 1.1, size=(16, len(centre)))
    model = PowderForwardModel(
        ms.basis, q, edges, ms.resolution, TEMPERATURE, average="shells", mesh=mesh,
        dw_mesh=12, broadening="centre",
    )  # fmt: skip
    model.spectra(sets[:2])  # warm-up
    t_fast = best_of(lambda: model.spectra(sets), repeats=3) / len(sets)
    sqe = CoherentSQE(ms.basis, sets[0], temperature=TEMPERATURE, resolution=ms.resolution)
    centres = 0.5 * (edges[1:] + edges[:-1])
    t_ref = best_of(lambda: powder_shells(sqe, q, centres, mesh=mesh), repeats=2)
    ref = powder_shells(sqe, q, centres, mesh=mesh)
    ours = model.spectra(sets[:1]).intensity[0]
    mask = ref > 1e-3 * ref.max()
    return {
        "mesh": mesh,
        "grid": [len(q), len(edges) - 1],
        "ms_per_spectrum": round(1e3 * t_fast, 2),
        "reference_ms_per_spectrum": round(1e3 * t_ref, 1),
        "speedup_vs_reference": round(t_ref / t_fast, 1),
        "max_rel_deviation_from_reference": float(np.max(np.abs(ours - ref)[mask] / ref[mask])),
    }


def bench_powder_forward() -> None:
    al = setup("Al", shells=2)
    ge = setup("Ge")
    result = {
        "benchmark": "powder_forward",
        "grid": {
            "n_Q": len(Q),
            "n_E": len(EDGES) - 1,
            "q_A-1": [Q[0], Q[-1]],
            "e_meV": [EDGES[0], EDGES[-1]],
        },
        "directions": DIRECTIONS,
        "batch": BATCH,
        "temperature_K": TEMPERATURE,
        "torch_threads": torch.get_num_threads(),
        "Al": _measure(al, np.array(load_reference("Al").mean[:5]), n_reference=8),
        "Ge": _measure(ge, np.array(load_reference("Ge").mean), n_reference=4),
        "shells": {
            "Al": _measure_shells(al, np.array(load_reference("Al").mean[:5]), mesh=48),
            "Ge": _measure_shells(ge, np.array(load_reference("Ge").mean), mesh=24),
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "powder_forward.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    al_result = result["Al"]
    assert isinstance(al_result, dict)
    assert al_result["max_rel_deviation_from_reference"] < 1e-6
