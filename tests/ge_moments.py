"""A Ge set-up with the per-bin moments of a few orientations, shared by the refinement
tests (the moments of an orientation take about half a second)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from consumers.reduction.folding import Folder
from consumers.reduction.moments import BinMoments, orientation_moments
from consumers.reduction.table import FoldTable
from model_server.prediction.expected import FoldSampler, GridSimulator
from model_server.refinement.refiner import RunRefiner
from simulations.fcdb.reference import named_fc_set
from simulations.instrument.events import PhononTable
from simulations.instrument.spectrometer import Instrument, Orientation
from simulations.lattice.materials import setup
from simulations.lattice.sqe import CoherentSQE

#: Incident energy (meV) and temperature (K) of the README's Ge run.
EI, TEMPERATURE = 80.0, 5.0


@dataclass(frozen=True)
class GeRun:
    """The set-up, the refiner, the folder and the truth (``raman``) of a Ge run."""

    refiner: RunRefiner
    folder: Folder
    truth: np.ndarray


@lru_cache(maxsize=1)
def ge_run() -> GeRun:
    ms = setup("Ge")
    ins = Instrument.arcs_like()
    table = FoldTable.cached(ms.crystal, ms.grid)
    folder = Folder(
        table, ms.grid, ins, Orientation.from_vectors(ms.crystal, (1, 0, 0), (0, 1, 0)), EI
    )
    refiner = RunRefiner("Ge", ins, EI, TEMPERATURE, table=table, material_setup=ms)
    return GeRun(refiner=refiner, folder=folder, truth=named_fc_set("Ge", "raman", ms))


def ge_simulator(
    run: GeRun, sqe: CoherentSQE, *, mesh: int = 40, group_rows: int = 4
) -> tuple[GridSimulator, FoldSampler]:
    """The simulator's expected counts on the run's energy grid (its shortcuts: a
    ``mesh``^3 phonon table, super-pixels of ``group_rows``) and the sampler that folds them
    through the coverage's walk, one thread."""
    sim = GridSimulator(
        sqe,
        run.folder.instrument,
        run.folder.orientation,
        EI,
        energy_edges=run.folder.grid.energy_edges,
        table=PhononTable.build(sqe, mesh),
        group_rows=group_rows,
    )
    return sim, FoldSampler(run.folder, sim.group_of_pixel, threads=1)


@lru_cache(maxsize=4)
def ge_moments(omegas: tuple[float, ...]) -> BinMoments:
    """Moments of the orientations ``omegas`` (deg) at unit charge each."""
    run = ge_run()
    grid = run.folder.grid
    out = BinMoments.zeros(grid.n_q * grid.n_e, run.refiner.constants.n_branches)
    for w in omegas:
        out.add(orientation_moments(run.folder, run.refiner.constants, w), 1.0)
    return out


def replica_counts(
    model, theta: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """(expected, counts (n_q, n_E)): a Poisson replica of the model's expectation at
    ``theta`` in its fitted bins, zero elsewhere."""
    lam = model.evaluate(theta, jacobian=False).expected
    counts = np.zeros(model.grid.n_q * model.grid.n_e)
    counts[model.bins] = rng.poisson(lam)
    return lam, counts.reshape(model.grid.shape)
