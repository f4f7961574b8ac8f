"""Export symmetry-reduced force constants in phonopy's format.

The unit cell of the export is the crystal's standard primitive cell (so phonopy's reduced
q-points are the same r.l.u. as everywhere else in this project) and the supercell is a
diagonal multiple of it, chosen so that every bond inside the cutoff is the *unique*
shortest image of its atom pair: then phonopy's Fourier sum over shortest vectors gives
exactly our dynamical matrix.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from simulations.lattice.force_constants import FCBasis

__all__ = [
    "full_force_constants",
    "supercell_size",
    "to_phonopy",
    "write_phonopy_params",
]

logger = logging.getLogger(__name__)


def _shortest_lattice_vector(lattice: NDArray[np.float64]) -> float:
    """Length (Angstrom) of the shortest non-zero lattice vector, by brute force."""
    r = np.arange(-3, 4)
    grid = np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1).reshape(-1, 3)
    grid = grid[np.any(grid != 0, axis=1)]
    return float(np.min(np.linalg.norm(grid @ lattice, axis=1)))


def supercell_size(basis: FCBasis, margin: float = 0.1) -> int:
    """Smallest N such that the N x N x N supercell's shortest lattice vector > 2 cutoff + margin.

    That condition makes every bond within the cutoff the unique shortest image of its pair.
    """
    shortest = _shortest_lattice_vector(basis.crystal.lattice)
    return int(np.floor((2.0 * basis.cutoff + margin) / shortest)) + 1


def full_force_constants(
    basis: FCBasis, coefficients: NDArray[np.float64], supercell: int | None = None
) -> tuple[NDArray[np.float64], int]:
    """Full force-constant array of an N x N x N supercell of the primitive cell.

    Atoms are ordered as phonopy orders the supercell of the primitive unit cell (all images
    of primitive atom 0, then of atom 1, ...; within each, the lattice points in phonopy's
    order).

    Returns
    -------
    fc
        (n_satom, n_satom, 3, 3) float, eV/A^2.
    n
        The supercell multiple used.
    """
    n = supercell or supercell_size(basis)
    values = basis.block_values(coefficients)
    from phonopy.structure.atoms import PhonopyAtoms
    from phonopy.structure.cells import get_supercell

    cryst = basis.crystal
    unit = PhonopyAtoms(
        symbols=list(cryst.species),
        cell=cryst.lattice,
        scaled_positions=cryst.positions,
        masses=cryst.masses,
    )
    sc = get_supercell(unit, np.diag([n, n, n]))
    # Supercell positions in primitive fractional coordinates, and their primitive atom index.
    spos = sc.scaled_positions * n  # (n_satom, 3) primitive-fractional
    n_sat = len(spos)
    n_at = cryst.n_atoms
    prim_index = np.repeat(np.arange(n_at), n**3)
    cell_of = np.round(spos - cryst.positions[prim_index]).astype(int)
    # Lookup: (prim atom, cell mod n) -> supercell atom.
    lookup = {}
    for s in range(n_sat):
        key = (int(prim_index[s]), *[int(x) % n for x in cell_of[s]])
        lookup[key] = s
    fc = np.zeros((n_sat, n_sat, 3, 3))
    pairs = basis.pairs
    for s in range(n_sat):
        i = prim_index[s]
        rows = np.nonzero(pairs[:, 0] == i)[0]
        for r in rows:
            j = int(pairs[r, 1])
            target = cell_of[s] + pairs[r, 2:5]
            t = lookup[(j, *[int(x) % n for x in target])]
            fc[s, t] += values[r]
    return fc, n


def to_phonopy(
    basis: FCBasis, coefficients: NDArray[np.float64], supercell: int | None = None
) -> object:
    """A ``phonopy.Phonopy`` object holding the full force constants of ``coefficients``."""
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    fc, n = full_force_constants(basis, coefficients, supercell)
    cryst = basis.crystal
    unit = PhonopyAtoms(
        symbols=list(cryst.species),
        cell=cryst.lattice,
        scaled_positions=cryst.positions,
        masses=cryst.masses,
    )
    ph = Phonopy(unit, supercell_matrix=np.diag([n, n, n]), primitive_matrix=np.eye(3))
    ph.force_constants = fc
    return ph


def write_phonopy_params(
    basis: FCBasis,
    coefficients: NDArray[np.float64],
    directory: str | Path,
    supercell: int | None = None,
) -> Path:
    """Write ``phonopy_params.yaml`` (cell, supercell matrix, masses, full FCs) into a folder.

    The file is read back by ``phonopy.load(path)``.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    ph = to_phonopy(basis, coefficients, supercell)
    path = out / "phonopy_params.yaml"
    ph.save(filename=str(path), settings={"force_constants": True})  # type: ignore[attr-defined]
    logger.info("wrote %s", path)
    return path
