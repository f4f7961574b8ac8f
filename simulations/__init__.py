"""The physics core: crystals, symmetry-reduced force constants, q-paths and grids, the fast
forward model I(q, E), reference force constants and training sets; the full S(Q, E), the
instrument model and the synthetic instrument (events, simulated runs in facility wire
formats, recorded-run files, the noise model).

No streaming or web code lives here (see DESIGN.md, Folders).
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
