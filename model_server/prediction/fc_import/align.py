"""Put imported FCs on a target crystal's cell (a shipped material's, a CIF's).

A file's primitive cell is rarely the target's: another choice of primitive vectors, another
Cartesian orientation, another origin and atom order, and (from DFT) a lattice constant a
few per cent off. :func:`align_to_crystal` finds

* an integer unimodular ``M`` and an orthogonal ``R`` with ``M L_file = s L_target R^T``
  (rows are lattice vectors, ``s`` the ratio of the cells' lengths: at most
  :data:`MAX_STRAIN` away from 1, and the same in every direction within 1 %),
* the origin shift and atom permutation that map the file's atoms onto the target's (each
  within :data:`POSITION_TOL` Angstrom),

and rewrites every pair ``(i, j, n)`` in the target's cell and every block as
``R^T Phi R`` (Born charges and the dielectric tensor too; the non-analytic term keeps the
file's cell volume, so its strength is the file's). The target's masses are used.
Anything that does not fit is an :class:`~model_server.exceptions.FCImportError` that says
what differs.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from model_server.exceptions import FCImportError
from model_server.prediction.crystal_fc import CrystalFC
from simulations.lattice.crystals import Crystal
from simulations.lattice.nac import NACTerm

__all__ = ["MAX_STRAIN", "POSITION_TOL", "Alignment", "align_to_crystal"]

#: Largest relative difference of the lattice constants accepted (uniform scale).
MAX_STRAIN = 0.05
#: Largest distance of an atom from its image on the target, Angstrom (after scaling).
POSITION_TOL = 0.05
_SHAPE_TOL = 0.01


@dataclass(frozen=True, slots=True, kw_only=True)
class Alignment:
    """The FCs on the target's cell and how they were mapped.

    Attributes
    ----------
    fcs
        On the target crystal's lattice, positions and masses.
    scale
        Length of the file's cell / the target's (1: the same lattice constants).
    rotation
        (3, 3) ``R^T``: Cartesian vectors of the file's frame -> the target's.
    max_displacement
        Largest distance of a file's atom from its target atom, Angstrom (after scaling).
    mass_ratio
        Largest |m_file / m_target - 1| over the atoms.
    """

    fcs: CrystalFC
    scale: float
    rotation: NDArray[np.float64]
    max_displacement: float
    mass_ratio: float

    def to_dict(self) -> dict[str, float]:
        """JSON-ready summary."""
        return {
            "lattice_scale": self.scale,
            "max_atom_displacement_A": self.max_displacement,
            "max_mass_difference": self.mass_ratio,
        }


def _lattice_map(
    source: NDArray[np.float64], target: NDArray[np.float64]
) -> tuple[NDArray[np.int64], NDArray[np.float64], float]:
    """(M, R, s) with ``M source = s target R^T`` (see the module docstring)."""
    v_s, v_t = abs(np.linalg.det(source)), abs(np.linalg.det(target))
    scale = float((v_s / v_t) ** (1.0 / 3.0))
    if abs(scale - 1.0) > MAX_STRAIN:
        raise FCImportError(
            f"the FC file's cell volume ({v_s:.3f} A^3) differs from the structure's "
            f"({v_t:.3f} A^3) by more than a {MAX_STRAIN:.0%} change of lattice constant: the "
            "file is for another structure"
        )
    coeffs = np.array(list(itertools.product(range(-2, 3), repeat=3)))
    coeffs = coeffs[np.any(coeffs != 0, axis=1)]
    vecs = coeffs @ source
    lengths = np.linalg.norm(vecs, axis=1)
    goal = target * scale
    goal_len = np.linalg.norm(goal, axis=1)
    gram = goal @ goal.T
    cand = [np.nonzero(np.abs(lengths - g) <= _SHAPE_TOL * g)[0] for g in goal_len]
    for a in cand[0]:
        for b in cand[1]:
            if abs(vecs[a] @ vecs[b] - gram[0, 1]) > _SHAPE_TOL * goal_len[0] * goal_len[1]:
                continue
            for c in cand[2]:
                m = np.array([coeffs[a], coeffs[b], coeffs[c]])
                if round(abs(np.linalg.det(m))) != 1:
                    continue
                rows = m @ source
                if np.abs(rows @ rows.T - gram).max() > _SHAPE_TOL * goal_len.max() ** 2:
                    continue
                rot_t = np.linalg.solve(goal, rows)  # R^T: goal R^T = rows
                u, _, vt = np.linalg.svd(rot_t)
                return m.astype(np.int64), (u @ vt).T, scale
    raise FCImportError(
        "the FC file's lattice does not match the structure's (lengths "
        f"{np.round(np.linalg.norm(source, axis=1), 4).tolist()} vs "
        f"{np.round(np.linalg.norm(target, axis=1), 4).tolist()} A): the file is for another "
        "structure"
    )


def _atom_map(
    frac: NDArray[np.float64],
    numbers: NDArray[np.int64],
    target: Crystal,
) -> tuple[NDArray[np.int64], NDArray[np.float64], float]:
    """(perm, shift, worst): file atom k sits at target atom perm[k], ``frac[k] + shift``
    (mod 1); worst distance, Angstrom."""
    t_frac = target.positions
    t_num = target.numbers
    lat = target.lattice
    best: tuple[NDArray[np.int64], NDArray[np.float64], float] | None = None
    for k in np.nonzero(numbers == t_num[0])[0]:
        shift = t_frac[0] - frac[k]
        moved = frac + shift
        diff = moved[:, None, :] - t_frac[None, :, :]
        diff -= np.round(diff)
        dist = np.linalg.norm(diff @ lat, axis=-1)  # (n_file, n_target)
        dist = np.where(numbers[:, None] == t_num[None, :], dist, np.inf)
        perm = np.argmin(dist, axis=1)
        worst = float(dist[np.arange(len(perm)), perm].max())
        unique = len(set(perm.tolist())) == len(perm)
        if unique and worst <= POSITION_TOL and (best is None or worst < best[2]):
            best = (perm.astype(np.int64), shift, worst)
    if best is None:
        raise FCImportError(
            "the FC file's atoms do not sit on the structure's sites (no origin shift maps "
            f"them within {POSITION_TOL} A): the file is for another structure"
        )
    return best


def align_to_crystal(fcs: CrystalFC, target: Crystal) -> Alignment:
    """The FCs ``fcs`` (of a file's cell) on ``target``'s cell.

    Raises
    ------
    FCImportError
        Another composition, number of atoms, lattice (beyond :data:`MAX_STRAIN`) or
        arrangement of atoms.
    """
    if fcs.n_atoms != target.n_atoms or Counter(fcs.species) != Counter(target.species):
        raise FCImportError(
            f"the FC file is for {fcs.name} ({fcs.n_atoms} atoms in its primitive cell), the "
            f"structure is {target.name} ({target.n_atoms} atoms: "
            f"{''.join(f'{s}{c}' for s, c in Counter(target.species).items())}); send the FCs "
            "of the structure's primitive cell (phonopy: primitive_matrix 'auto')"
        )
    m, rot, scale = _lattice_map(fcs.lattice, target.lattice)
    frac = fcs.frac @ np.linalg.inv(m)  # the file's atoms in the rows of M L_file
    perm, _, worst = _atom_map(frac, fcs.numbers, target)
    q = rot.T  # Cartesian, file frame -> target frame
    p = fcs.pairs
    bond = (p[:, 2:5] + fcs.frac[p[:, 1]] - fcs.frac[p[:, 0]]) @ np.linalg.inv(m)
    i_new, j_new = perm[p[:, 0]], perm[p[:, 1]]
    t_frac = target.positions
    cells = bond - (t_frac[j_new] - t_frac[i_new])
    n_new = np.rint(cells).astype(np.int64)
    if np.abs(cells - n_new).max(initial=0.0) > POSITION_TOL:
        raise FCImportError("the FC file's bonds do not map onto the structure's lattice")
    pairs = np.column_stack([i_new, j_new, n_new])
    blocks = np.einsum("ab,mbc,dc->mad", q, fcs.fc, q)
    nac = None
    if fcs.nac is not None:
        src = fcs.nac
        nbond = (src.pairs[:, 2:5] + src.frac[src.pairs[:, 1]] - src.frac[src.pairs[:, 0]]) @ (
            np.linalg.inv(m)
        )
        ni, nj = perm[src.pairs[:, 0]], perm[src.pairs[:, 1]]
        ncell = np.rint(nbond - (t_frac[nj] - t_frac[ni])).astype(np.int64)
        born = np.empty_like(src.born)
        born[perm] = np.einsum("ab,kbc,dc->kad", q, src.born, q)
        nac = NACTerm.from_arrays(
            lattice=target.lattice,
            frac=t_frac,
            masses=target.masses,
            born=born,
            dielectric=q @ src.dielectric @ q.T,
            pairs=np.column_stack([ni, nj, ncell]),
            weights=src.weights,
            volume=src.volume,  # the dipole-dipole strength of the file's cell
        )
    masses = np.empty_like(fcs.masses)
    masses[perm] = fcs.masses
    mass_ratio = float(np.abs(masses / target.masses - 1.0).max())
    aligned = CrystalFC.from_arrays(
        target.numbers,
        target.lattice,
        t_frac,
        pairs,
        blocks,
        masses=target.masses,
        name=target.name,
        nac=nac,
    )
    return Alignment(
        fcs=aligned, scale=scale, rotation=q, max_displacement=worst, mass_ratio=mass_ratio
    )
