"""The physics core: crystals, symmetry-reduced force constants, q-paths and grids, the fast
forward model I(q, E), reference force constants and training sets.

No streaming or web code lives here (see DESIGN.md, Folders).
"""

from .crystals import Crystal, load_crystal
from .dataset import generate_dataset, read_dataset
from .exceptions import (
    DatasetError,
    ForceConstantError,
    GridError,
    InvalidCoefficientsError,
    SimulationError,
    StructureError,
    UnknownFCSetError,
)
from .force_constants import FCBasis, build_fc_basis
from .forward import ForwardModel, SpectraResult
from .grid import Grid, QPath, make_grid, make_qpath
from .materials import MaterialSetup, setup
from .phonopy_export import full_force_constants, to_phonopy, write_phonopy_params
from .reference import ReferenceEnsemble, load_reference, named_fc_set, resolve_fc
from .resolution import EnergyResolution, instrument_resolution

__all__ = [
    "Crystal",
    "DatasetError",
    "EnergyResolution",
    "FCBasis",
    "ForceConstantError",
    "ForwardModel",
    "Grid",
    "GridError",
    "InvalidCoefficientsError",
    "MaterialSetup",
    "QPath",
    "ReferenceEnsemble",
    "SimulationError",
    "SpectraResult",
    "StructureError",
    "UnknownFCSetError",
    "build_fc_basis",
    "full_force_constants",
    "generate_dataset",
    "instrument_resolution",
    "load_crystal",
    "load_reference",
    "make_grid",
    "make_qpath",
    "named_fc_set",
    "read_dataset",
    "resolve_fc",
    "setup",
    "to_phonopy",
    "write_phonopy_params",
]
