"""What predictions keep between requests: material setups, fold tables, forward models (the
dispersion and stability check), phonon tables per FC set, S(Q, E) models per (FCs, T, Ei),
powder spectra, parsed CIFs, the e3nn model's FCs and mesh phonons.

Every cache is a small least-recently-used one; callers hold :data:`LOCK` (predictions run
one at a time: the kernels use every core already).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from consumers.reduction.table import FoldTable
from model_server.prediction.crystal_fc import CrystalFC
from model_server.prediction.spectra import debye_waller_mesh, mesh_modes
from simulations.instrument.events import PhononTable
from simulations.instrument.spectrometer import Instrument
from simulations.lattice.materials import MaterialSetup
from simulations.lattice.pair_phonons import MeshPhonons
from simulations.lattice.sqe import CoherentSQE

__all__ = [
    "FORWARD",
    "LOCK",
    "LRU",
    "PARSED",
    "POWDER",
    "PREDICTED",
    "SETUPS",
    "TABLE_MESH",
    "Material",
    "cached_mesh_modes",
    "clear_caches",
    "fold_table",
    "forward_model",
    "instrument",
    "phonon_table",
    "sqe_model",
]

#: Phonon-table mesh (points per axis), the one simulated runs use.
TABLE_MESH = 40

_V = TypeVar("_V")


class LRU:
    """A small least-recently-used cache (callers hold :data:`LOCK`)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any, make: Callable[[], _V]) -> _V:
        """The value under ``key``, made by ``make()`` (and kept) when absent."""
        if key in self._items:
            self._items.move_to_end(key)
            value: _V = self._items[key]
            return value
        value = make()
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        """Forget everything."""
        self._items.clear()


LOCK = threading.Lock()
SETUPS = LRU(8)
FORWARD = LRU(8)
_FOLD_TABLES = LRU(8)
_PHONON_TABLES = LRU(4)  # up to ~40 MB each (Ge, 40^3 mesh)
_MODELS = LRU(16)
POWDER = LRU(16)
CAN = LRU(4)  # the aluminium can's powder table by (T, Ei, energies, |Q| reach)
COMPONENT_SQE = LRU(4)  # background components on the super-pixels (~40 MB each for Ge)
FULL_SIMULATORS = LRU(2)  # event simulators over the whole energy window (tof background)
SAMPLE_TOTALS = LRU(4096)  # a sample's expected counts over that window, by angle
PARSED = LRU(16)  # CIF text -> ParsedCIF
PREDICTED = LRU(16)  # crystal + model version -> ModelFCs
_MODES = LRU(4)  # FC set -> mesh phonons with eigenvectors


def clear_caches() -> None:
    """Forget every cached setup, table and spectrum (tests, memory)."""
    with LOCK:
        for c in (
            SETUPS,
            FORWARD,
            _FOLD_TABLES,
            _PHONON_TABLES,
            _MODELS,
            POWDER,
            CAN,
            COMPONENT_SQE,
            FULL_SIMULATORS,
            SAMPLE_TOTALS,
            PARSED,
            PREDICTED,
            _MODES,
        ):
            c.clear()


@lru_cache(maxsize=1)
def instrument() -> Instrument:
    """The ARCS-like spectrometer of every prediction."""
    return Instrument.arcs_like()


@dataclass(frozen=True, slots=True)
class Material:
    """A crystal's setup and the key its cached products are stored under."""

    key: str  # cache key: the shipped name, "cif-<sha>", or either + "-e3nn-<version>..."
    name: str
    setup: MaterialSetup
    shipped: bool


def cached_mesh_modes(fcs: CrystalFC) -> tuple[MeshPhonons, tuple[int, int, int]]:
    """Mesh phonons with eigenvectors (default mesh) of an FC set, cached by its arrays."""
    h = hashlib.sha256()
    for a in (fcs.numbers, fcs.lattice, fcs.frac, fcs.pairs, fcs.fc, fcs.masses):
        h.update(np.ascontiguousarray(a).tobytes())
    if fcs.nac is not None:  # imported FCs with Born charges: the LO-TO term
        for a in (fcs.nac.born, fcs.nac.dielectric, fcs.nac.pairs, fcs.nac.weights):
            h.update(np.ascontiguousarray(a).tobytes())
    return _MODES.get(h.hexdigest(), lambda: mesh_modes(fcs))


def forward_model(mat: Material) -> Any:
    """The material's exact float64 forward model (dispersion, stability)."""
    import torch

    return FORWARD.get(
        mat.key, lambda: mat.setup.forward_model(dtype=torch.float64, method="exact")
    )


def fold_table(mat: Material) -> FoldTable:
    """The material's fold table (:meth:`FoldTable.cached`: built on first use)."""
    ms = mat.setup
    return _FOLD_TABLES.get(mat.key, lambda: FoldTable.cached(ms.crystal, ms.grid))


def sqe_model(mat: Material, c: NDArray[np.float64], temperature: float, ei: float) -> CoherentSQE:
    """The coherent S(Q, E) of FC coefficients ``c`` at ``temperature`` K and ``ei`` meV."""
    key = (mat.key, np.asarray(c, dtype=np.float64).tobytes(), float(temperature), float(ei))
    return _MODELS.get(
        key,
        lambda: CoherentSQE(
            mat.setup.basis,
            c,
            temperature=temperature,
            resolution=instrument().resolution(ei),
            dw_mesh=debye_waller_mesh(mat.setup.crystal.n_atoms),
        ),
    )


def phonon_table(mat: Material, model: CoherentSQE) -> PhononTable:
    """The phonon table of the model's FCs (it depends on nothing else)."""
    key = (mat.key, np.asarray(model.coefficients, dtype=np.float64).tobytes())
    return _PHONON_TABLES.get(key, lambda: PhononTable.cached(model, TABLE_MESH))
