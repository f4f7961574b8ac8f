"""The dynamical matrices' compiled construction (``make bench``): writes
bench-results/dynamical.json.

:meth:`simulations.lattice.sqe.CoherentSQE.dynamical_matrices` builds every Q's matrix in
one compiled pass (:func:`simulations.lattice.pair_phonons.pair_sum`, shared with
:func:`simulations.lattice.pair_phonons.dynamical_matrices`). The exact expected
fold (:func:`model_server.refinement.exact.exact_one_phonon_fold`, 1.5 million samples an
orientation of the README's Ge run) spent about half its time there, half in the
eigensolver. Measured on one core, in one process, on the same 65,536 random Ge
wavevectors: the numpy construction it replaced (phases as a complex exponential, one
einsum per atom pair, then the Hermitian part; kept here as the baseline), the kernel, and
numpy's batched eigensolver on the result for scale; the ratio is baseline / kernel.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from simulations.fcdb.reference import named_fc_set
from simulations.lattice.materials import setup
from simulations.lattice.sqe import CoherentSQE
from tests.benchmarks.timing import best_of

RESULTS = Path(os.environ.get("BENCH_DIR", "bench-results"))


def _numpy_matrices(sqe: CoherentSQE, q: np.ndarray) -> np.ndarray:
    """(n_q, 3N, 3N): the construction before the kernel (no LO-TO term: Ge has none)."""
    n_at = sqe.crystal.n_atoms
    phase = np.exp(2j * np.pi * q @ sqe._phase_vectors.T) * sqe._weights
    out = np.zeros((len(q), n_at, 3, n_at, 3), dtype=complex)
    p = sqe.basis.pairs
    for i in range(n_at):
        for j in range(n_at):
            sel = np.nonzero((p[:, 0] == i) & (p[:, 1] == j))[0]
            if len(sel):
                out[:, i, :, j, :] = np.einsum("qb,bxy->qxy", phase[:, sel], sqe._blocks[sel])
    d = out.reshape(len(q), 3 * n_at, 3 * n_at)
    return np.asarray(0.5 * (d + d.conj().transpose(0, 2, 1)))


def bench_dynamical_matrices() -> None:
    ms = setup("Ge")
    sqe = CoherentSQE(ms.basis, named_fc_set("Ge", "raman", ms), temperature=5.0)
    q = np.random.default_rng(20261128).random((65536, 3))
    with threadpool_limits(1):
        kernel = sqe.dynamical_matrices(q)  # compiles (cached on disk)
        baseline = _numpy_matrices(sqe, q)
        t_numpy = best_of(lambda: _numpy_matrices(sqe, q))
        t_kernel = best_of(lambda: sqe.dynamical_matrices(q))
        t_eigh = best_of(lambda: np.linalg.eigh(kernel))
    scale = float(np.abs(baseline).max())
    result = {
        "material": "Ge",
        "n_q": len(q),
        "n_pairs": len(sqe.basis.pairs),
        "numpy_seconds": round(t_numpy, 4),
        "kernel_seconds": round(t_kernel, 4),
        "speedup": round(t_numpy / t_kernel, 2),
        "eigh_seconds": round(t_eigh, 4),
        "max_abs_difference_over_max": float(np.abs(kernel - baseline).max() / scale),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "dynamical.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(previous | result, indent=2) + "\n")
    print(json.dumps(result))
    assert result["max_abs_difference_over_max"] < 1e-12


def bench_exact_fold_threads() -> None:
    """The exact fold of 4 orientations of the README's Ge run (every 2nd pixel, as the
    moments), serial and on one thread per usable core: seconds an orientation and the
    ratio (the same sum either way; ``steer estimate --exact --jobs``)."""
    from model_server.refinement.exact import exact_run_fold
    from simulations.lattice.forward import usable_cores
    from tests.ge_moments import TEMPERATURE, ge_run

    run = ge_run()
    sqe = CoherentSQE(run.refiner.setup.basis, run.truth, temperature=TEMPERATURE)
    omegas, charges = [0.0, 30.0, 60.0, 90.0], [1.0] * 4
    cores = usable_cores()
    with threadpool_limits(1):
        exact_run_fold(run.folder, sqe, omegas[:1], charges[:1], pixel_stride=16)  # compile
        folds: dict[int, np.ndarray] = {}

        def fold(workers: int) -> None:
            folds[workers] = exact_run_fold(run.folder, sqe, omegas, charges, workers=workers)

        t_serial = best_of(lambda: fold(1), repeats=1)
        t_threads = best_of(lambda: fold(cores), repeats=1)
    np.testing.assert_array_equal(folds[cores], folds[1])  # the same sum
    result = {
        "orientations": len(omegas),
        "cores": cores,
        "serial_seconds_per_orientation": round(t_serial / len(omegas), 2),
        "threaded_seconds_per_orientation": round(t_threads / len(omegas), 2),
        "speedup": round(t_serial / t_threads, 2),
    }
    path = RESULTS / "dynamical.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(previous | {"exact_fold": result}, indent=2) + "\n")
    print(json.dumps(result))
