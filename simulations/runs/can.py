"""The aluminium sample can of simulated runs and predictions: its powder table from the
shipped Al force constants (``mlff_mean``), at the sample's temperature and the
instrument's resolution (:class:`simulations.lattice.backgrounds.PowderCan`)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from simulations.fcdb.reference import resolve_fc
from simulations.lattice.backgrounds import IncoherentScattering, PowderCan
from simulations.lattice.materials import setup
from simulations.lattice.resolution import EnergyResolution
from simulations.lattice.sqe import CoherentSQE, mesh_points

__all__ = ["CAN_FC_SET", "aluminium_can"]

#: The Al force constants of the can.
CAN_FC_SET = "mlff_mean"
#: Phonon mesh of the can's multiphonon response.
_CAN_MESH = 16


def aluminium_can(
    temperature: float,
    resolution: EnergyResolution,
    *,
    q_max: float,
    energies: NDArray[np.float64],
) -> PowderCan:
    """The can's powder S(|Q|, E) per Al atom up to ``q_max`` (1/A) on ``energies`` (meV):
    coherent one-phonon powder average, incoherent multiphonon (orders 2-3), elastic line
    and Debye-Scherrer rings."""
    al = setup("Al")
    _, coefficients = resolve_fc("Al", CAN_FC_SET, al)
    model = CoherentSQE(al.basis, coefficients, temperature=temperature, resolution=resolution)
    modes = model.modes(mesh_points(_CAN_MESH))
    incoherent = IncoherentScattering.from_modes(model, modes.energies, modes.eigenvectors)
    return PowderCan.build(model, q_max=q_max, energies=energies, incoherent=incoherent)
