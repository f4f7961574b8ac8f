"""Speed of the structure -> force-constant model against the force-field route (``make bench``):
writes bench-results/fc_e3nn.json.

The cell: a perovskite of the FC database (5 atoms; SrTiO3 when present) repeated 5 x 2 x 1
(50 atoms) with every atom displaced by a seeded random 0.03 A, so that no symmetry is left
(a generic 50-atom cell). Both routes run in this one process with the same torch thread
count (1: this machine is shared).

* **e3nn**: ``load_fc_model().predict(numbers, lattice, frac)`` (the committed ensemble,
  float64, every bond up to its cutoff); the model is loaded before timing; one warm-up call,
  then best and median of 5.
* **Force field, finite displacements**: phonopy displacements of the 50-atom cell itself
  (supercell = the cell, no symmetry: 2 x 3 x 50 displaced cells) and the force field's
  forces on each (``simulations.fcdb.mlff.build_phonopy`` with the database's force field), timed
  once. This is a lower bound on the real route, which also relaxes the structure and needs
  a supercell at least twice the 6 A cutoff across (more atoms per force call).

The ratio is ``fd_seconds / e3nn_median_seconds``; the target is >= 100. The force field is
the one the database entry was computed with (``FCEntry.model``, e.g. sevennet-0). Needs the
ML force fields (``make mlff``); without them the benchmark is skipped with that message.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

RESULTS = Path(os.environ.get("BENCH_DIR", "bench-results"))
SEED = 50


def _cell() -> tuple[str, str, np.ndarray, np.ndarray, np.ndarray]:
    """(source entry name, force field, numbers, lattice, frac) of the 50-atom cell."""
    from simulations.fcdb.database import load_database

    entries = [e for e in load_database() if e.prototype == "perovskite"]
    if not entries:
        pytest.skip("the FC database has no perovskite to build the 50-atom cell from")
    pick = next((e for e in entries if e.name.startswith("SrTiO3")), entries[0])
    reps = np.array([5, 2, 1])
    cells = np.array([(a, b, c) for a in range(5) for b in range(2) for c in range(1)], float)
    frac = ((pick.frac[None, :, :] + cells[:, None, :]) / reps).reshape(-1, 3)
    numbers = np.tile(pick.numbers, len(cells))
    lattice = pick.lattice * reps[:, None]
    rng = np.random.default_rng(SEED)
    cart = frac @ lattice + 0.03 * rng.standard_normal(frac.shape)
    frac = cart @ np.linalg.inv(lattice)
    return pick.name, pick.model, numbers, lattice, frac


def bench_fc_e3nn_speed() -> None:
    from simulations.fcdb.mlff import available_models

    torch.set_num_threads(1)
    name, ff, numbers, lattice, frac = _cell()
    assert len(numbers) == 50
    if ff not in available_models():
        pytest.skip(
            f"force field {ff!r} not installed (`make mlff`): the finite-displacement side of "
            "the e3nn speed benchmark cannot run"
        )
    from model_server.structure_fc.model import load_fc_model

    t = time.perf_counter()
    model = load_fc_model()
    load_s = time.perf_counter() - t
    pred = model.predict(numbers, lattice, frac)  # warm-up
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        pred = model.predict(numbers, lattice, frac)
        runs.append(time.perf_counter() - t)

    from ase import Atoms

    from simulations.fcdb.mlff import build_phonopy, make_calculator

    atoms = Atoms(numbers=numbers, cell=lattice, scaled_positions=frac, pbc=True)
    calc = make_calculator(ff, num_threads=1)
    t = time.perf_counter()
    ph = build_phonopy(atoms, calc, np.eye(3, dtype=int))
    fd_s = time.perf_counter() - t
    n_disp = len(ph.supercells_with_displacements or [])
    speedup = fd_s / float(np.median(runs))
    out: dict[str, object] = {
        "cell": f"{name} x (5, 2, 1), atoms displaced by 0.03 A (seed {SEED})",
        "n_atoms": len(numbers),
        "torch_threads": torch.get_num_threads(),
        "e3nn_model": model.version,
        "e3nn_members": len(model.nets),
        "e3nn_load_seconds": round(load_s, 3),
        "e3nn_predict_seconds_best": round(min(runs), 4),
        "e3nn_predict_seconds_median": round(float(np.median(runs)), 4),
        "e3nn_pairs": len(pred.pairs),
        "fd_force_field": ff,
        "fd_displacements": n_disp,
        "fd_supercell": "the 50-atom cell itself (lower bound: no relaxation, no larger supercell)",
        "fd_seconds": round(fd_s, 2),
        "speedup_vs_median": round(speedup, 1),
        "target_speedup": 100,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fc_e3nn.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    assert speedup >= 100, out
