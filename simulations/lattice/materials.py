"""Per-material defaults: neighbour shells, q-path, energy window, instrument setting.

Everything that turns a material name into a grid, a force-constant basis and a forward
model goes through :func:`setup`, so the training sets, the synthetic runs and the models
agree on what "Ge" means.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from simulations.lattice.crystals import Crystal, load_crystal
from simulations.lattice.force_constants import FCBasis, build_fc_basis
from simulations.lattice.forward import ForwardModel
from simulations.lattice.grid import Grid, PowderGrid, make_grid, make_powder_grid
from simulations.lattice.resolution import EnergyResolution, instrument_resolution

__all__ = ["MATERIAL_DEFAULTS", "MaterialDefaults", "MaterialSetup", "defaults_for", "setup"]


@dataclass(frozen=True, slots=True, kw_only=True)
class MaterialDefaults:
    """Choices that define a material's model and grid.

    Attributes
    ----------
    shells
        Neighbour shells in the force-constant model.
    path
        q-path (``None``: the Setyawan-Curtarolo path of the lattice).
    n_q, n_e
        Approximate q-points on the path; energy bins.
    e_min, e_max
        Energy window, meV.
    instrument, ei, chopper_frequency
        Spectrometer setting of the energy resolution (meV, Hz).
    n_keep
        Number of most influential coefficients varied in training sets.
    """

    shells: int = 4
    path: str | None = None
    n_q: int = 200
    n_e: int = 100
    e_min: float = 0.0
    e_max: float = 70.0
    instrument: str = "ARCS"
    ei: float = 80.0
    chopper_frequency: float = 600.0
    n_keep: int = 8


#: Shipped materials. Ge and Al phonons reach ~37 and ~40 meV; Nb ~28 meV.
MATERIAL_DEFAULTS: dict[str, MaterialDefaults] = {
    "Ge": MaterialDefaults(shells=5, path="G-X-U|K-G-L-W-X", e_max=70.0, ei=80.0),
    "Nb": MaterialDefaults(shells=5, path="G-H-N-G-P-H|P-N", e_max=40.0, ei=50.0),
    "Al": MaterialDefaults(shells=4, path="G-X-U|K-G-L-W-X", e_max=50.0, ei=60.0),
}


def defaults_for(material: str | Path) -> MaterialDefaults:
    """Defaults of a shipped material, or generic ones for any other crystal."""
    return MATERIAL_DEFAULTS.get(str(material), MaterialDefaults())


@dataclass(frozen=True, slots=True, kw_only=True)
class MaterialSetup:
    """A crystal with its FC basis, grid and resolution."""

    crystal: Crystal
    basis: FCBasis
    grid: Grid
    resolution: EnergyResolution
    defaults: MaterialDefaults

    def forward_model(self, **kwargs: object) -> ForwardModel:
        """A :class:`ForwardModel` on this setup; keyword arguments go to its constructor."""
        kwargs.setdefault("dtype", torch.float32)
        return ForwardModel(self.basis, self.grid, self.resolution, **kwargs)  # type: ignore[arg-type]

    def powder_grid(self, ei: float) -> PowderGrid:
        """The (|Q|, E) grid of a powder run of this material at ``ei`` (meV): the
        material's energy window up to 0.9 Ei (:func:`make_powder_grid`)."""
        return make_powder_grid(ei, e_min=self.defaults.e_min, e_max=self.defaults.e_max)


def setup(material: str | Path, **overrides: object) -> MaterialSetup:
    """Load a material and build its basis, grid and resolution.

    ``overrides`` replace fields of :class:`MaterialDefaults` (e.g. ``e_max=50``).
    """
    defaults = replace(defaults_for(material), **overrides)  # type: ignore[arg-type]
    crystal = load_crystal(material)
    return MaterialSetup(
        crystal=crystal,
        basis=build_fc_basis(crystal, shells=defaults.shells),
        grid=make_grid(
            crystal,
            path=defaults.path,
            n_q=defaults.n_q,
            e_min=defaults.e_min,
            e_max=defaults.e_max,
            n_e=defaults.n_e,
        ),
        resolution=instrument_resolution(
            defaults.instrument,
            defaults.ei,
            defaults.chopper_frequency,
            e_max=defaults.e_max,
        ),
        defaults=defaults,
    )
