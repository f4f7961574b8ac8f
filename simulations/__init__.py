"""The physics core: crystals, symmetry-reduced force constants, q-paths and grids, the fast
forward model I(q, E), reference force constants and training sets; the full S(Q, E), the
instrument model and the synthetic instrument (events, simulated runs in facility wire
formats, recorded-run files, the noise model).

No streaming or web code lives here (see DESIGN.md, Folders).
"""

from .binning import ReferenceBinning
from .crystals import Crystal, load_crystal
from .dataset import generate_dataset, read_dataset
from .events import EventBatch, OrientationSimulator, PhononTable
from .exceptions import (
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
from .force_constants import FCBasis, build_fc_basis
from .forward import ForwardModel, SpectraResult
from .grid import Grid, QPath, make_grid, make_qpath
from .instrument import Instrument, Orientation
from .materials import MaterialSetup, setup
from .noise import add_noise, counting_noise, noise_grid
from .phonopy_export import full_force_constants, to_phonopy, write_phonopy_params
from .recording import RecordedMessage, RunReader, RunWriter, read_run, write_run
from .reference import ReferenceEnsemble, load_reference, named_fc_set, resolve_fc
from .resolution import EnergyResolution, instrument_resolution
from .run import RunPlan, RunSummary, parse_omegas, simulate_run
from .sqe import CoherentSQE, PhononModes

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
