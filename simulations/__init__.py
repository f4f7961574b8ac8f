"""The physics core and the synthetic instrument: no streaming or web code lives here.

Sub-packages, highest first (``runs`` imports ``instrument`` and ``fcdb``; those two, which
do not import each other, import only ``lattice``):

``simulations.runs``
    A simulated rotation run as the facility's wire messages and bluesky documents
    (``simulate``), the recorded-run file they are kept in (``recording``), the check that a
    run shows the dispersion it was made from (``check``) and what one orientation sees
    (``view``).
``simulations.instrument``
    The spectrometer: detector geometry, neutron kinematics and the goniometer orientation
    (``spectrometer``), events drawn from S(Q, E) (``events``), the reference binning and
    the counting-noise model.
``simulations.fcdb``
    Force constants from outside the fit: the MLFF reference ensembles and named FC sets
    (``reference``), the ML force fields (``mlff``), training sets (``dataset``) and the
    force-constant database of many crystals with its builder and catalogue.
``simulations.lattice``
    Crystals, symmetry-reduced force-constant bases, q-paths and (q, E) grids, the fast
    batched forward model I(q, E), the full coherent one-phonon S(Q, E), the energy
    resolution and phonons from per-pair FC blocks (``pair_phonons``).

Beside them: ``units`` (every physical constant and conversion factor), ``provenance``
(git commit, package versions, host), ``exceptions``, ``plotting``, ``jsonutil``, ``demo``.
The names below are the curated public API. See ``docs/architecture.md`` for the layout of
the whole project and the import rules between its parts.
"""

from simulations.exceptions import (
    DatasetError,
    ForceConstantError,
    GridError,
    InstrumentError,
    InvalidCoefficientsError,
    NoiseError,
    RecordingError,
    SimulationError,
    StructureError,
    UnknownFCSetError,
)
from simulations.fcdb.dataset import generate_dataset, read_dataset
from simulations.fcdb.reference import ReferenceEnsemble, load_reference, named_fc_set, resolve_fc
from simulations.instrument.binning import ReferenceBinning
from simulations.instrument.events import EventBatch, OrientationSimulator, PhononTable
from simulations.instrument.noise import add_noise, counting_noise, noise_grid
from simulations.instrument.spectrometer import Instrument, Orientation
from simulations.lattice.crystals import Crystal, load_crystal
from simulations.lattice.force_constants import FCBasis, build_fc_basis
from simulations.lattice.forward import ForwardModel, SpectraResult
from simulations.lattice.grid import Grid, QPath, make_grid, make_qpath
from simulations.lattice.materials import MaterialSetup, setup
from simulations.lattice.phonopy_export import (
    full_force_constants,
    to_phonopy,
    write_phonopy_params,
)
from simulations.lattice.resolution import EnergyResolution, instrument_resolution
from simulations.lattice.sqe import CoherentSQE, PhononModes
from simulations.runs.recording import RecordedMessage, RunReader, RunWriter, read_run, write_run
from simulations.runs.simulate import RunPlan, RunSummary, parse_omegas, simulate_run

__all__ = [
    "CoherentSQE",
    "Crystal",
    "DatasetError",
    "EnergyResolution",
    "EventBatch",
    "FCBasis",
    "ForceConstantError",
    "ForwardModel",
    "Grid",
    "GridError",
    "Instrument",
    "InstrumentError",
    "InvalidCoefficientsError",
    "MaterialSetup",
    "NoiseError",
    "Orientation",
    "OrientationSimulator",
    "PhononModes",
    "PhononTable",
    "QPath",
    "RecordedMessage",
    "RecordingError",
    "ReferenceBinning",
    "ReferenceEnsemble",
    "RunPlan",
    "RunReader",
    "RunSummary",
    "RunWriter",
    "SimulationError",
    "SpectraResult",
    "StructureError",
    "UnknownFCSetError",
    "add_noise",
    "build_fc_basis",
    "counting_noise",
    "full_force_constants",
    "generate_dataset",
    "instrument_resolution",
    "load_crystal",
    "load_reference",
    "make_grid",
    "make_qpath",
    "named_fc_set",
    "noise_grid",
    "parse_omegas",
    "read_dataset",
    "read_run",
    "resolve_fc",
    "setup",
    "simulate_run",
    "to_phonopy",
    "write_phonopy_params",
    "write_run",
]
