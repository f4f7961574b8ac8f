"""Building the force-constant database (``steer fcdb build``).

For every :class:`~simulations.fcdb.catalogue.Candidate`:

1. a coarse volume scan (11 single-point energies, lattice scaled 0.8-1.3) picks the start;
2. :func:`simulations.fcdb.mlff.relax` relaxes cell and positions, keeping the space group;
3. the smallest supercell (among diagonal, fcc-, bcc- and hexagonal-shaped multiples of the
   primitive or conventional cell) whose shortest lattice vector exceeds twice the longest bond
   up to :data:`~simulations.fcdb.database.CUTOFF_ANGSTROM` is chosen, so every stored bond is
   its own unique shortest image (no aliasing inside the cutoff);
4. :func:`simulations.fcdb.mlff.build_phonopy` gives finite-displacement FCs (0.01 A, symmetrised);
5. the FCs are cut into per-bond blocks up to the cutoff, averaged over the space group (so
   the blocks obey the crystal's symmetry exactly), made exactly
   ``Phi(i0, jR) == Phi(j0, i(-R)).T`` (mean of the two) and the self terms set by the acoustic
   sum rule;
6. ``stable`` needs both the stored blocks (on a :data:`~simulations.fcdb.database.STABILITY_MESH`
   mesh) and the force field's full supercell FCs (at the q-points commensurate with the
   supercell, where phonopy's frequencies are exact) to be free of imaginary modes; a crystal
   without any interaction (atoms beyond the force field's cutoff, as SevenNet gives for Rb
   and Cs) or with a collapsed cell fails.

Results are written one crystal at a time to ``<out>.parts/`` (atomic small files) and packed
into ``<out>`` every few crystals and at the end, so a crash or Ctrl-C loses at most the
crystals in flight; ``resume=True`` skips what is done. A crystal that fails (relaxation blows
up, phonopy error, supercell too large) is recorded with its stage and message and never stops
the build.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import logging
import math
import os
import signal
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from simulations.fcdb.catalogue import Candidate, assign_splits, catalogue
from simulations.fcdb.database import (
    CUTOFF_ANGSTROM,
    FULL_STABILITY_TOL_THZ,
    STABILITY_MESH,
    STABILITY_TOL_THZ,
    Failure,
    FCDatabaseError,
    FCEntry,
    read_database,
    write_database,
)
from simulations.lattice.pair_phonons import frequencies_at, mesh_qpoints
from simulations.provenance import git_commit, package_version, package_versions

if TYPE_CHECKING:
    from ase import Atoms
    from ase.calculators.calculator import Calculator

__all__ = [
    "MODEL_ALIASES",
    "BuildSettings",
    "BuildSummary",
    "build_database",
    "choose_supercell",
    "compute_entry",
    "pairs_from_supercell",
    "resolve_model",
]

logger = logging.getLogger(__name__)

#: Short names accepted for ``--model``.
MODEL_ALIASES = {"chgnet": "chgnet-0.3.0", "sevennet": "sevennet-0", "7net": "sevennet-0"}

_PACKAGE = {"chgnet": "chgnet", "sevennet": "sevenn"}

#: A crystal whose highest frequency is below this (THz) has no interaction in the force field.
NO_INTERACTION_THZ = 0.2
#: ... and one above this (THz) has collapsed (diamond, the stiffest solid, reaches 40 THz).
COLLAPSE_THZ = 80.0


def resolve_model(name: str) -> str:
    """Full :mod:`simulations.fcdb.mlff` model name for a name or alias (``chgnet``)."""
    from simulations.fcdb import mlff

    full = MODEL_ALIASES.get(name, name)
    if full not in mlff.known_models():
        raise FCDatabaseError(
            f"unknown force field {name!r}; use one of {', '.join(mlff.known_models())} "
            f"or an alias ({', '.join(MODEL_ALIASES)})"
        )
    return full


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildSettings:
    """How each crystal is computed.

    Attributes
    ----------
    model : str
        Force field (a :func:`simulations.fcdb.mlff.known_models` name).
    cutoff : float
        Longest stored bond, A.
    displacement : float
        Finite displacement, A.
    fmax : float
        Relaxation threshold on forces and cell forces, eV/A.
    relax_steps : int
        Maximum relaxation steps.
    max_supercell_atoms : int
        A crystal needing a larger supercell fails (stage ``supercell``).
    split_seed : int
        Seed of the train/val/test split over crystals.
    """

    model: str = "sevennet-0"
    cutoff: float = CUTOFF_ANGSTROM
    displacement: float = 0.01
    fmax: float = 1e-4
    relax_steps: int = 300
    max_supercell_atoms: int = 400
    split_seed: int = 0


class _StageError(Exception):
    """A crystal failed at a named stage."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


# --------------------------------------------------------------------------------------------
# Geometry


def _bond_lengths(
    lattice: NDArray[np.float64], frac: NDArray[np.float64], cutoff: float
) -> NDArray[np.float64]:
    """All interatomic distances (A) up to ``cutoff`` from the atoms of cell 0 (no self)."""
    recip = np.linalg.inv(lattice).T  # rows: reciprocal vectors / (2 pi)
    nmax = [math.ceil(cutoff * np.linalg.norm(b)) + 1 for b in recip]
    shifts = np.array(
        list(itertools.product(*[range(-k, k + 1) for k in nmax])), dtype=float
    )  # (n_R, 3)
    d = frac[None, :, None, :] + shifts[None, None, :, :] - frac[:, None, None, :]
    length = np.linalg.norm(d @ lattice, axis=-1).ravel()
    return np.asarray(length[(length > 1e-8) & (length <= cutoff + 1e-6)], dtype=float)


def _shortest_vector(cell: NDArray[np.float64]) -> float:
    from ase.geometry import minkowski_reduce

    reduced, _ = minkowski_reduce(cell)
    return float(np.linalg.norm(reduced, axis=1).min())


_BASES = (
    np.eye(3, dtype=int),
    np.array([[-1, 1, 1], [1, -1, 1], [1, 1, -1]]),  # fcc primitive -> conventional cube
    np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]]),  # bcc primitive -> conventional cube
    np.array([[2, 1, 0], [-1, 1, 0], [0, 0, 1]]),  # hexagonal sqrt(3) x sqrt(3)
)
_SHAPES = (
    np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]]),  # fcc-shaped multiples
    np.array([[-1, 1, 1], [1, -1, 1], [1, 1, -1]]),  # bcc-shaped multiples
)


def choose_supercell(
    lattice: NDArray[np.float64],
    frac: NDArray[np.float64],
    cutoff: float = CUTOFF_ANGSTROM,
    *,
    margin: float = 0.05,
) -> tuple[NDArray[np.int64], float, float]:
    """Smallest supercell in which every bond up to ``cutoff`` is its own unique shortest image.

    Parameters
    ----------
    lattice : numpy.ndarray
        (3, 3) A, rows are the primitive lattice vectors.
    frac : numpy.ndarray
        (n, 3) fractional coordinates.
    cutoff : float
        Longest bond to represent, A.
    margin : float
        The supercell's shortest lattice vector must exceed twice the longest bond by this, A.

    Returns
    -------
    (numpy.ndarray, float, float)
        ``P`` (3, 3) int with supercell rows ``P @ lattice`` (phonopy's ``supercell_matrix``
        is ``P.T``), the supercell's shortest lattice vector (A) and the longest bond up to the
        cutoff (A).
    """
    bonds = _bond_lengths(lattice, frac, cutoff)
    d_max = float(bonds.max()) if len(bonds) else 0.0
    need = 2.0 * d_max + margin
    cands: list[NDArray[np.int64]] = []
    for base in _BASES:
        for diag in itertools.product(range(1, 9), repeat=3):
            cands.append(np.diag(diag) @ base)
        for shape in _SHAPES:
            for n in range(1, 7):
                cands.append(n * shape @ base)
    dets = np.array([abs(round(np.linalg.det(p))) for p in cands])
    best: tuple[int, float, NDArray[np.int64]] | None = None
    for k in np.argsort(dets, kind="stable"):
        det = int(dets[k])
        if det == 0 or (best is not None and det > best[0]):
            if best is not None:
                break
            continue
        short = _shortest_vector(cands[k] @ lattice)
        if short > need and (best is None or short > best[1]):
            best = (det, short, cands[k])
    if best is None:
        raise _StageError("supercell", f"no supercell up to 8x8x8 reaches {need:.2f} A")
    return np.asarray(best[2], dtype=np.int64), best[1], d_max


def pairs_from_supercell(
    lattice: NDArray[np.float64],
    frac: NDArray[np.float64],
    sc_lattice: NDArray[np.float64],
    sc_frac: NDArray[np.float64],
    fc_full: NDArray[np.float64],
    cutoff: float = CUTOFF_ANGSTROM,
    numbers: NDArray[np.int64] | None = None,
) -> tuple[NDArray[np.int64], NDArray[np.float64], dict[str, float]]:
    """Cut full supercell FCs into per-bond blocks of the primitive cell.

    Each supercell pair is represented by its shortest image(s), equal-length images sharing
    the block equally (phonopy's convention); bonds up to ``cutoff`` are kept; with
    ``numbers`` the blocks are averaged over the space group; each block is replaced by the
    mean of itself and its partner's transpose, and the self terms are set by the acoustic
    sum rule.

    Parameters
    ----------
    lattice, frac : numpy.ndarray
        (3, 3) A and (n, 3): the primitive cell.
    sc_lattice, sc_frac : numpy.ndarray
        (3, 3) A and (N, 3): the supercell (fractional in the supercell's lattice).
    fc_full : numpy.ndarray
        (N, N, 3, 3) eV/A^2, full supercell FCs.
    cutoff : float
        Longest kept bond, A.
    numbers : numpy.ndarray, optional
        (n,) atomic numbers: average the blocks over the space group (spglib, 1e-3 A).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray, dict)
        ``pairs`` (m, 5) int, ``fc`` (m, 3, 3) eV/A^2 (self terms first for each atom, then bonds
        by length), and diagnostics: ``max_split_bond`` (longest kept bond shared between
        images, 0 when none), ``transpose_mismatch`` (max |Phi - partner.T| before averaging),
        ``self_asymmetry`` (max |S - S.T| of the self terms), ``dropped_max`` (largest |Phi| of
        a dropped bond), ``space_group_change`` (max change by the space-group average), eV/A^2.
    """
    rows, blocks, lengths, cut = _shortest_image_blocks(
        lattice, frac, sc_lattice, sc_frac, fc_full, cutoff
    )
    pairs = np.array(rows, dtype=np.int64)
    phi = np.array(blocks)
    index = {r: k for k, r in enumerate(rows)}
    group_change = 0.0
    if numbers is not None:
        averaged = _space_group_average(lattice, frac, numbers, pairs, phi, index)
        group_change = float(np.abs(averaged - phi).max())
        phi = averaged
    sym, mismatch, asym = _symmetrise_blocks(pairs, phi, index, len(frac))
    order = np.lexsort((np.array(lengths), pairs[:, 0]))
    return (
        pairs[order],
        sym[order],
        {
            "max_split_bond": cut["max_split_bond"],
            "transpose_mismatch": mismatch,
            "self_asymmetry": asym,
            "dropped_max": cut["dropped_max"],
            "space_group_change": group_change,
        },
    )


def _shortest_image_blocks(
    lattice: NDArray[np.float64],
    frac: NDArray[np.float64],
    sc_lattice: NDArray[np.float64],
    sc_frac: NDArray[np.float64],
    fc_full: NDArray[np.float64],
    cutoff: float,
) -> tuple[
    list[tuple[int, int, int, int, int]], list[NDArray[np.float64]], list[float], dict[str, float]
]:
    """The bonds ``(i, j, n1, n2, n3)`` of :func:`pairs_from_supercell` before symmetrisation.

    Returns the rows, their (3, 3) blocks (eV/A^2, shared equally between equal-length
    images), their lengths (A) and ``{"max_split_bond": A, "dropped_max": eV/A^2}``.
    """
    from ase.geometry import minkowski_reduce

    a_inv = np.linalg.inv(lattice)
    x = frac @ lattice
    xs = sc_frac @ sc_lattice
    rel = (xs[:, None, :] - x[None, :, :]) @ a_inv  # (N, n, 3)
    err = np.abs(rel - np.round(rel)).max(axis=-1)
    j_of = np.argmin(err, axis=1)
    if err[np.arange(len(xs)), j_of].max() > 1e-5:
        raise _StageError("fc", "the supercell is not a supercell of the primitive cell")
    reduced, _ = minkowski_reduce(sc_lattice)
    t = np.array(list(itertools.product(range(-2, 3), repeat=3)), dtype=float) @ reduced
    rows: list[tuple[int, int, int, int, int]] = []
    blocks: list[NDArray[np.float64]] = []
    lengths: list[float] = []
    split_max = 0.0
    dropped = 0.0
    for i in range(len(frac)):
        s_i = int(np.flatnonzero(j_of == i)[0])
        d = xs - xs[s_i]
        img = d[:, None, :] + t[None, :, :]  # (N, 125, 3)
        length = np.linalg.norm(img, axis=-1)
        lmin = length.min(axis=1)
        for s in range(len(xs)):
            near = np.flatnonzero(length[s] <= lmin[s] + 1e-5)
            j = int(j_of[s])
            if lmin[s] > cutoff + 1e-6:
                dropped = max(dropped, float(np.abs(fc_full[s_i, s]).max()))
                continue
            for image in near:
                b = img[s, image]
                r = (b + x[i] - x[j]) @ a_inv
                shift = np.round(r).astype(int)
                if np.abs(r - shift).max() > 1e-5:
                    raise _StageError("fc", "a bond vector is not a lattice translation")
                rows.append((i, j, int(shift[0]), int(shift[1]), int(shift[2])))
                blocks.append(np.asarray(fc_full[s_i, s], dtype=float) / len(near))
                lengths.append(float(lmin[s]))
                if len(near) > 1:
                    split_max = max(split_max, float(lmin[s]))
    return rows, blocks, lengths, {"max_split_bond": split_max, "dropped_max": dropped}


def _symmetrise_blocks(
    pairs: NDArray[np.int64],
    phi: NDArray[np.float64],
    index: dict[tuple[int, int, int, int, int], int],
    n_atoms: int,
) -> tuple[NDArray[np.float64], float, float]:
    """Make ``Phi(i0, jR) == Phi(j0, i(-R)).T`` (mean of the two) and set the self terms by
    the acoustic sum rule.

    Returns the blocks (m, 3, 3) eV/A^2, the largest ``|Phi - partner.T|`` before averaging
    and the largest ``|S - S.T|`` of the self terms after, eV/A^2.
    """
    sym = phi.copy()
    mismatch = 0.0
    for k, (i, j, a, b, c) in enumerate(pairs.tolist()):
        p = index.get((j, i, -a, -b, -c))
        if p is None:
            raise _StageError("fc", f"bond {(i, j, a, b, c)} has no partner {(j, i, -a, -b, -c)}")
        mismatch = max(mismatch, float(np.abs(phi[k] - phi[p].T).max()))
        sym[k] = 0.5 * (phi[k] + phi[p].T)
    is_self = (pairs[:, 0] == pairs[:, 1]) & ~pairs[:, 2:].any(axis=1)
    others = ~is_self
    self_sum = np.zeros((n_atoms, 3, 3))
    np.add.at(self_sum, pairs[others, 0], sym[others])
    sym[is_self] = -self_sum[pairs[is_self, 0]]
    asym = float(np.abs(sym[is_self] - np.swapaxes(sym[is_self], 1, 2)).max())
    return sym, mismatch, asym


def _space_group_average(
    lattice: NDArray[np.float64],
    frac: NDArray[np.float64],
    numbers: NDArray[np.int64],
    pairs: NDArray[np.int64],
    phi: NDArray[np.float64],
    index: dict[tuple[int, int, int, int, int], int],
    symprec: float = 1e-3,
) -> NDArray[np.float64]:
    """Project per-bond blocks onto the crystal's space-group symmetry.

    ``Phi(g b) = C_g Phi(b) C_g^T`` for every operation ``g`` (Cartesian rotation ``C_g``);
    the average over the group (the Reynolds projection) restores it exactly where the
    finite-displacement FCs (float32 forces, phonopy's translational symmetrisation) broke it.
    The bond set must be closed under the group (all bonds up to a length are).
    """
    import spglib

    cell: Any = (lattice, frac, numbers)
    ops = spglib.get_symmetry(cell, symprec=symprec)
    if ops is None:
        raise _StageError("fc", "spglib found no symmetry operations")
    a_inv = np.linalg.inv(lattice)
    out = np.zeros_like(phi)
    for w, t in zip(ops["rotations"], ops["translations"], strict=True):
        moved = frac @ w.T + t  # (n, 3): W f_i + t
        diff = moved[:, None, :] - frac[None, :, :]
        perm = np.argmin(np.abs(diff - np.round(diff)).max(axis=-1), axis=1)
        shift = np.round(diff[np.arange(len(frac)), perm]).astype(np.int64)  # (n, 3)
        rot = lattice.T @ w @ a_inv.T  # Cartesian rotation (column vectors)
        new_r = shift[pairs[:, 1]] + pairs[:, 2:] @ w.T - shift[pairs[:, 0]]
        targets = [
            index.get((int(perm[i]), int(perm[j]), int(r[0]), int(r[1]), int(r[2])))
            for i, j, r in zip(pairs[:, 0], pairs[:, 1], new_r, strict=True)
        ]
        if any(k is None for k in targets):
            raise _StageError("fc", "the bond set is not closed under the space group")
        out[np.array(targets)] += rot @ phi @ rot.T
    return out / len(ops["rotations"])


# --------------------------------------------------------------------------------------------
# One crystal


def _energy_per_atom(atoms: Atoms, calculator: Calculator) -> float:
    work = atoms.copy()
    work.calc = calculator
    return float(work.get_potential_energy()) / len(work)


def _spacegroup(atoms: Atoms, symprec: float = 1e-3) -> int:
    import spglib

    cell: Any = (np.array(atoms.cell[:]), atoms.get_scaled_positions(), atoms.numbers)
    ds = spglib.get_symmetry_dataset(cell, symprec=symprec)
    return int(ds.number) if ds is not None else 0


@dataclass(frozen=True, slots=True, kw_only=True)
class _Relaxed:
    """A crystal relaxed by the force field (stages ``structure``, ``scan``, ``relax``)."""

    atoms: Atoms
    spacegroup: int
    scale: float  # the volume scan's lattice scale, -
    energy_per_atom: float  # eV
    volume_per_atom: float  # A^3


@dataclass(frozen=True, slots=True, kw_only=True)
class _SupercellFC:
    """The relaxed crystal's finite-displacement FCs cut into per-bond blocks (stages
    ``supercell``, ``phonopy``, ``fc``)."""

    phonopy: Any  # phonopy.Phonopy with the supercell's force constants
    matrix: NDArray[np.int64]  # (3, 3) P, supercell rows P @ lattice
    shortest: float  # the supercell's shortest lattice vector, A
    longest_bond: float  # A
    n_atoms: int  # atoms in the supercell
    pairs: NDArray[np.int64]  # (m, 5)
    fc: NDArray[np.float64]  # (m, 3, 3) eV/A^2
    diagnostics: dict[str, float]  # from pairs_from_supercell


def _relax_candidate(
    candidate: Candidate, calculator: Calculator, settings: BuildSettings
) -> _Relaxed:
    """Volume scan (11 energies, lattice scaled 0.8-1.3), then relaxation of the best start;
    a relaxation that blows up or changes the space group fails."""
    from simulations.fcdb import mlff

    try:
        start = candidate.atoms()
        sg0 = _spacegroup(start)
    except Exception as exc:
        raise _StageError("structure", f"{type(exc).__name__}: {exc}") from exc
    scales = np.linspace(0.8, 1.3, 11)
    try:
        energies = np.array([_energy_per_atom(candidate.atoms(s), calculator) for s in scales])
    except Exception as exc:
        raise _StageError("scan", f"{type(exc).__name__}: {exc}") from exc
    if not np.isfinite(energies).any():
        raise _StageError("scan", "no finite energy in the volume scan")
    scale = float(scales[int(np.nanargmin(energies))])
    atoms = candidate.atoms(scale)
    v0 = atoms.get_volume() / len(atoms)
    try:
        relaxed = mlff.relax(atoms, calculator, fmax=settings.fmax, steps=settings.relax_steps)
        e_relaxed = _energy_per_atom(relaxed, calculator)
    except Exception as exc:
        raise _StageError("relax", f"{type(exc).__name__}: {exc}") from exc
    v1 = relaxed.get_volume() / len(relaxed)
    dist = relaxed.get_all_distances(mic=True) + 1e9 * np.eye(len(relaxed))
    if not (np.isfinite(e_relaxed) and 1 / 3 < v1 / v0 < 3.0 and dist.min() > 0.6):
        raise _StageError(
            "relax",
            f"relaxation blew up: volume/atom {v0:.2f} -> {v1:.2f} A^3, "
            f"shortest distance {dist.min():.2f} A, energy {e_relaxed:.3f} eV/atom",
        )
    sg1 = _spacegroup(relaxed)
    if sg1 != sg0:
        raise _StageError("relax", f"space group changed {sg0} -> {sg1}")
    return _Relaxed(
        atoms=relaxed,
        spacegroup=sg1,
        scale=scale,
        energy_per_atom=e_relaxed,
        volume_per_atom=float(v1),
    )


def _supercell_fc(relaxed: Atoms, calculator: Calculator, settings: BuildSettings) -> _SupercellFC:
    """Finite-displacement FCs in the smallest safe supercell, cut into per-bond blocks."""
    from simulations.fcdb import mlff

    lattice = np.array(relaxed.cell[:], dtype=float)
    frac = np.array(relaxed.get_scaled_positions(wrap=True), dtype=float)
    p, short, d_max = choose_supercell(lattice, frac, settings.cutoff)
    n_sc = round(abs(np.linalg.det(p))) * len(relaxed)
    if n_sc > settings.max_supercell_atoms:
        raise _StageError(
            "supercell",
            f"needs {n_sc} supercell atoms (> {settings.max_supercell_atoms}) for bonds up to "
            f"{d_max:.2f} A",
        )
    try:
        ph = mlff.build_phonopy(relaxed, calculator, p.T, settings.displacement)
    except Exception as exc:
        raise _StageError("phonopy", f"{type(exc).__name__}: {exc}") from exc
    sc_lattice = np.array(ph.supercell.cell, dtype=float)
    if not np.allclose(sc_lattice, p @ lattice, atol=1e-6):
        raise _StageError("phonopy", "phonopy's supercell is not P @ lattice")
    fc_full = np.asarray(ph.force_constants, dtype=float)
    if not np.isfinite(fc_full).all():
        raise _StageError("fc", "non-finite force constants")
    numbers = np.array(relaxed.numbers, dtype=np.int64)
    pairs, fc, diag = pairs_from_supercell(
        lattice, frac, sc_lattice, np.array(ph.supercell.scaled_positions), fc_full,
        settings.cutoff, numbers,
    )  # fmt: skip
    if diag["max_split_bond"] > 0:
        raise _StageError("fc", f"bond of {diag['max_split_bond']:.3f} A shared between images")
    return _SupercellFC(
        phonopy=ph,
        matrix=p,
        shortest=short,
        longest_bond=d_max,
        n_atoms=int(n_sc),
        pairs=pairs,
        fc=fc,
        diagnostics=diag,
    )


def _frequency_checks(relaxed: _Relaxed, sfc: _SupercellFC) -> dict[str, float]:
    """Frequencies of the stored blocks on the stability mesh against the force field's full
    supercell FCs; a crystal without interaction or with a collapsed cell fails.

    Returns ``min_freq_thz``, ``max_freq_thz`` (stored blocks), ``truncation_freq_err_thz``,
    ``min_freq_full_thz`` and ``min_freq_commensurate_thz``, THz (see :func:`compute_entry`).
    """
    from ase.data import atomic_masses
    from phonopy.harmonic.dynmat_to_fc import get_commensurate_points

    atoms = relaxed.atoms
    numbers = np.array(atoms.numbers, dtype=np.int64)
    frac = np.array(atoms.get_scaled_positions(wrap=True), dtype=float)
    masses = atomic_masses[numbers]
    mesh = mesh_qpoints(STABILITY_MESH)
    freqs = frequencies_at(numbers, frac, sfc.pairs, sfc.fc, mesh, masses=masses)
    if float(freqs.max()) < NO_INTERACTION_THZ:
        raise _StageError(
            "fc",
            f"no interaction: highest frequency {freqs.max():.3f} THz (the atoms sit beyond the "
            f"force field's cutoff at the relaxed volume {relaxed.volume_per_atom:.1f}"
            " A^3/atom)",
        )
    if float(freqs.max()) > COLLAPSE_THZ:
        raise _StageError(
            "relax",
            f"collapsed: highest frequency {freqs.max():.0f} THz at "
            f"{relaxed.volume_per_atom:.1f} A^3/atom",
        )
    ph = sfc.phonopy
    ph.masses = masses
    full = np.array(ph.run_qpoints(mesh).frequencies, dtype=float)
    commensurate = get_commensurate_points(sfc.matrix.T)  # exact for the supercell FCs
    exact = np.array(ph.run_qpoints(commensurate).frequencies, dtype=float)
    return {
        "min_freq_thz": float(freqs.min()),
        "max_freq_thz": float(freqs.max()),
        "truncation_freq_err_thz": float(
            np.abs(np.sort(freqs, axis=1) - np.sort(full, axis=1)).max()
        ),
        "min_freq_full_thz": float(full.min()),
        "min_freq_commensurate_thz": float(exact.min()),
    }


def compute_entry(
    candidate: Candidate,
    calculator: Calculator,
    settings: BuildSettings,
    split: str,
) -> tuple[FCEntry, dict[str, Any]]:
    """Relax one crystal and compute its FC entry.

    Parameters
    ----------
    candidate : Candidate
        The crystal.
    calculator : ase.calculators.calculator.Calculator
        The force field (from :func:`simulations.fcdb.mlff.make_calculator`).
    settings : BuildSettings
        Cutoff, displacement, relaxation options.
    split : str
        The crystal's split.

    Returns
    -------
    (FCEntry, dict)
        The entry (stable or not) and build facts: ``spacegroup``, ``a0_start`` and
        ``scale_start`` (A, -), ``relax_converged``, ``relax_steps``, ``energy_per_atom`` (eV),
        ``volume_per_atom`` (A^3), ``supercell_matrix`` (3, 3), ``n_supercell_atoms``,
        ``n_displacements``, ``longest_bond`` and ``supercell_shortest`` (A),
        ``transpose_mismatch``, ``self_asymmetry``, ``dropped_max``, ``space_group_change``
        (eV/A^2),
        ``truncation_freq_err_thz`` (max |f - f_phonopy| on the stability mesh: the effect of
        dropping the supercell's bonds beyond the cutoff, THz), ``max_freq_thz`` (stored FCs,
        THz), ``min_freq_full_thz`` (phonopy's full supercell FCs on the stability mesh,
        interpolated, THz), ``min_freq_commensurate_thz`` (the same at the supercell's
        commensurate q-points, exact, THz), ``seconds``.

    Raises
    ------
    _StageError
        With the stage (``structure``, ``scan``, ``relax``, ``supercell``, ``phonopy``, ``fc``)
        and a message.
    """
    t0 = time.perf_counter()
    relaxed = _relax_candidate(candidate, calculator, settings)
    atoms = relaxed.atoms
    sfc = _supercell_fc(atoms, calculator, settings)
    freq = _frequency_checks(relaxed, sfc)
    min_freq, min_exact = freq["min_freq_thz"], freq["min_freq_commensurate_thz"]
    entry = FCEntry(
        name=candidate.name(settings.model),
        prototype=candidate.prototype,
        numbers=np.array(atoms.numbers, dtype=np.int64),
        lattice=np.array(atoms.cell[:], dtype=float),
        frac=np.array(atoms.get_scaled_positions(wrap=True), dtype=float),
        model=settings.model,
        pairs=sfc.pairs,
        fc=sfc.fc,
        stable=bool(min_freq >= -STABILITY_TOL_THZ and min_exact >= -FULL_STABILITY_TOL_THZ),
        min_freq_thz=min_freq,
        split=split,
    )
    diag = sfc.diagnostics
    meta: dict[str, Any] = {
        "spacegroup": relaxed.spacegroup,
        "a0_start": float(candidate.a),
        "scale_start": relaxed.scale,
        "relax_converged": bool(atoms.info.get("relax_converged", False)),
        "relax_steps": int(atoms.info.get("relax_steps", -1)),
        "energy_per_atom": relaxed.energy_per_atom,
        "volume_per_atom": relaxed.volume_per_atom,
        "supercell_matrix": sfc.matrix,
        "n_supercell_atoms": sfc.n_atoms,
        "n_displacements": len(sfc.phonopy.displacements),
        "longest_bond": sfc.longest_bond,
        "supercell_shortest": sfc.shortest,
        "transpose_mismatch": diag["transpose_mismatch"],
        "self_asymmetry": diag["self_asymmetry"],
        "dropped_max": diag["dropped_max"],
        "space_group_change": diag["space_group_change"],
        "truncation_freq_err_thz": freq["truncation_freq_err_thz"],
        "max_freq_thz": freq["max_freq_thz"],
        "min_freq_full_thz": freq["min_freq_full_thz"],
        "min_freq_commensurate_thz": min_exact,
        "seconds": time.perf_counter() - t0,
    }
    return entry, meta


# --------------------------------------------------------------------------------------------
# Workers

_WORKER: dict[str, Any] = {}


def _init_worker(model: str, threads: int) -> None:
    """Process initializer: build the calculator once per worker."""
    import warnings

    from simulations.fcdb import mlff

    warnings.filterwarnings("ignore")
    logging.getLogger("simulations.fcdb.mlff").setLevel(logging.ERROR)
    _WORKER["calc"] = mlff.make_calculator(model, num_threads=threads)


def _run_one(
    candidate: Candidate, settings: BuildSettings, split: str
) -> tuple[FCEntry, dict[str, Any]] | Failure:
    """Compute one crystal in a worker; every error becomes a :class:`Failure`."""
    name = candidate.name(settings.model)
    try:
        return compute_entry(candidate, _WORKER["calc"], settings, split)
    except _StageError as exc:
        return Failure(name=name, prototype=candidate.prototype, stage=exc.stage, message=str(exc))
    except Exception as exc:  # one crystal never stops the build
        logger.debug("%s failed:\n%s", name, traceback.format_exc())
        return Failure(
            name=name,
            prototype=candidate.prototype,
            stage="unexpected",
            message=f"{type(exc).__name__}: {exc}",
        )


# --------------------------------------------------------------------------------------------
# The build


@dataclass(slots=True, kw_only=True)
class BuildSummary:
    """What :func:`build_database` did (``steer fcdb build --json``)."""

    out: str
    model: str
    n_candidates: int
    n_already_done: int
    n_computed: int = 0
    n_stable: int = 0
    n_unstable: int = 0
    n_failed: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _pack(
    out: Path,
    session: dict[str, Any],
    *,
    seed: int,
    drop_failures: set[str] | None = None,
) -> tuple[int, int]:
    """Merge ``out`` and its parts folder into ``out`` (atomically); remove merged parts.

    Returns
    -------
    (int, int)
        Entries and failures in the packed file.
    """
    entries: dict[str, FCEntry] = {}
    meta: dict[str, dict[str, Any]] = {}
    failures: dict[str, Failure] = {}
    sessions: list[dict[str, Any]] = []
    if out.is_file():
        old = read_database(out)
        for e, m in zip(old.entries, old.meta, strict=True):
            entries[e.name] = e
            meta[e.name] = m
        failures = {f.name: f for f in old.failures}
        prov = old.attrs.get("provenance")
        if isinstance(prov, dict):
            sessions = [s for s in prov.get("sessions", []) if s.get("id") != session["id"]]
    parts = sorted(_parts_dir(out).glob("*.h5")) if _parts_dir(out).is_dir() else []
    for part in parts:
        c = read_database(part)
        for e, m in zip(c.entries, c.meta, strict=True):
            entries[e.name] = e
            meta[e.name] = m
            failures.pop(e.name, None)
        for f in c.failures:
            failures[f.name] = f
    for name in drop_failures or set():
        failures.pop(name, None)
    sessions.append(session)
    keys = sorted({k for m in meta.values() for k in m})
    rows = []
    for name in entries:
        m = meta[name]
        rows.append(
            {k: m.get(k, np.full((3, 3), -1) if k == "supercell_matrix" else np.nan) for k in keys}
        )
    models = sorted({e.model for e in entries.values()})
    write_database(
        out,
        list(entries.values()),
        meta=rows if keys else None,
        failures=list(failures.values()),
        attrs={
            "split_seed": seed,
            "provenance": {
                "models": models,
                "sessions": sessions,
                "note": "sessions: every build run that wrote to this file (resumes included)",
            },
        },
    )
    for part in parts:
        part.unlink(missing_ok=True)
    return len(entries), len(failures)


def _check_options(limit: int | None, jobs: int | None, *, resume: bool, overwrite: bool) -> int:
    """Refuse bad ``--limit``/``--jobs``/``--resume --overwrite``; return the worker count."""
    if limit is not None and limit < 1:
        raise FCDatabaseError(f"--limit must be at least 1, got {limit}")
    n_jobs = (os.cpu_count() or 1) if jobs is None else jobs
    if n_jobs < 1:
        raise FCDatabaseError(f"--jobs must be at least 1, got {jobs}")
    if resume and overwrite:
        raise FCDatabaseError("use either --resume or --overwrite, not both")
    return n_jobs


def _prepare_output(path: Path, model: str, *, resume: bool, overwrite: bool) -> bool:
    """Refuse an existing output without ``resume``/``overwrite`` and a force field that is not
    installed; with ``overwrite`` delete the old file and parts. Returns whether unpacked parts
    were there."""
    from simulations.fcdb import mlff

    parts = _parts_dir(path)
    has_parts = parts.is_dir() and any(parts.glob("*.h5"))
    if (path.exists() or has_parts) and not (resume or overwrite):
        raise FCDatabaseError(
            f"{path} already exists (or has unpacked parts in {parts}); pass --resume to "
            "continue it or --overwrite to start over"
        )
    if model not in mlff.available_models():
        raise mlff.MLFFUnavailableError(
            f"force field {model!r} is not installed here; {mlff.INSTALL_HINT} (make mlff)"
        )
    if overwrite:
        path.unlink(missing_ok=True)
        for p in parts.glob("*.h5") if parts.is_dir() else []:
            p.unlink()
    return has_parts


def _new_session(
    cfg: BuildSettings,
    *,
    command: str,
    n_jobs: int,
    limit: int | None,
    prototypes: Sequence[str] | None,
) -> dict[str, Any]:
    """The provenance record of this build run (updated as crystals finish)."""
    package = _PACKAGE[cfg.model.split("-")[0]]
    return {
        "id": f"{os.getpid()}-{time.time():.0f}",
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "git_commit": git_commit(),
        "model": cfg.model,
        "model_package": f"{package}=={package_version(package)}",
        "versions": package_versions(("phonopy", "ase", "torch", "spglib", "numpy")),
        "jobs": n_jobs,
        "limit": limit,
        "prototypes": list(prototypes) if prototypes else "all",
        "settings": {
            "cutoff_angstrom": cfg.cutoff,
            "displacement_angstrom": cfg.displacement,
            "fmax_ev_per_angstrom": cfg.fmax,
            "relax_steps": cfg.relax_steps,
            "max_supercell_atoms": cfg.max_supercell_atoms,
            "split_seed": cfg.split_seed,
        },
        "n_computed": 0,
        "n_failed": 0,
        "wall_s": 0.0,
    }


def _done_before(
    path: Path, session: dict[str, Any], *, seed: int, retry_failed: bool
) -> tuple[set[str], set[str]]:
    """Pack leftover parts of an interrupted build into ``path`` and read what it holds.

    Returns the names to skip (entries, and failures unless ``retry_failed``) and the names
    that failed before.
    """
    _pack(path, {**session, "note": "resume: packed leftover parts"}, seed=seed)
    old = read_database(path)
    done = {e.name for e in old.entries}
    failed_before = {f.name for f in old.failures}
    if not retry_failed:
        done |= failed_before
    return done, failed_before


class _Recorder:
    """Writes each finished crystal to the parts folder, counts it in the summary and packs
    the parts into the database every ``pack_every`` crystals."""

    def __init__(
        self,
        path: Path,
        session: dict[str, Any],
        summary: BuildSummary,
        *,
        seed: int,
        retried: set[str],
        pack_every: int,
        bar: Any,
        t_start: float,
    ) -> None:
        self.path = path
        self.parts = _parts_dir(path)
        self.session = session
        self.summary = summary
        self.seed = seed
        self.retried = retried
        self.pack_every = pack_every
        self.bar = bar
        self.t_start = t_start
        self.since_pack = 0

    def record(self, result: tuple[FCEntry, dict[str, Any]] | Failure) -> None:
        """Keep one crystal's result (an entry with its build facts, or a failure)."""
        summary = self.summary
        if isinstance(result, Failure):
            write_database(self.parts / f"{_safe(result.name)}.h5", [], failures=[result])
            summary.n_failed += 1
            summary.failures.append(f"{result.name} [{result.stage}] {result.message}")
            logger.warning("%s failed at %s: %s", result.name, result.stage, result.message)
        else:
            entry, meta = result
            write_database(self.parts / f"{_safe(entry.name)}.h5", [entry], meta=[meta])
            summary.n_computed += 1
            if entry.stable:
                summary.n_stable += 1
            else:
                summary.n_unstable += 1
        self.bar.update(1)
        self.bar.set_postfix(
            stable=summary.n_stable, unstable=summary.n_unstable, failed=summary.n_failed
        )
        self.since_pack += 1
        if self.since_pack >= self.pack_every:
            self.pack()

    def pack(self) -> None:
        """Merge the parts into the database, with the session's counts so far."""
        self.session.update(
            finished=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            wall_s=round(time.perf_counter() - self.t_start, 1),
            n_computed=self.summary.n_computed,
            n_failed=self.summary.n_failed,
        )
        _pack(self.path, self.session, seed=self.seed, drop_failures=self.retried)
        self.since_pack = 0


def build_database(
    out: str | Path,
    *,
    model: str = "sevennet-0",
    limit: int | None = None,
    jobs: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    retry_failed: bool = False,
    prototypes: Sequence[str] | None = None,
    settings: BuildSettings | None = None,
    progress: bool = True,
    command: str = "",
    pack_every: int = 10,
) -> BuildSummary:
    """Compute the catalogue's crystals with a force field and write the database.

    Parameters
    ----------
    out : str or pathlib.Path
        Database file (HDF5); ``<out>.parts/`` holds per-crystal results until packed.
    model : str, default "sevennet-0"
        Force field name or alias (:data:`MODEL_ALIASES`).
    limit : int, optional
        Only the first ``limit`` crystals of the catalogue (interleaved over prototypes).
    jobs : int, optional
        Worker processes (default: the number of CPU cores); 1 computes in this process.
    resume : bool
        Continue a build into an existing ``out``: skip crystals done (or failed, unless
        ``retry_failed``).
    overwrite : bool
        Start over, deleting an existing ``out`` and its parts.
    retry_failed : bool
        With ``resume``: compute crystals that failed before again.
    prototypes : sequence of str, optional
        Only these prototypes.
    settings : BuildSettings, optional
        Computation settings (the model in it is replaced by ``model``).
    progress : bool
        Show a progress bar (tqdm, on stderr).
    command : str
        The command line, recorded in the provenance.
    pack_every : int
        Pack the parts into ``out`` after this many crystals.

    Returns
    -------
    BuildSummary

    Raises
    ------
    FCDatabaseError
        Bad options, an existing output without ``resume``/``overwrite``, an unreadable file.
    simulations.fcdb.mlff.MLFFUnavailableError
        When the force field is not installed.
    KeyboardInterrupt
        On Ctrl-C or SIGTERM, re-raised after the finished crystals have been packed.
    """
    from simulations.exceptions import StructureError

    full = resolve_model(model)
    n_jobs = _check_options(limit, jobs, resume=resume, overwrite=overwrite)
    try:
        everything = catalogue()
        cands = catalogue(prototypes)
    except StructureError as exc:
        raise FCDatabaseError(str(exc)) from exc
    cfg = replace(settings or BuildSettings(), model=full)
    path = Path(out)
    has_parts = _prepare_output(path, full, resume=resume, overwrite=overwrite)
    splits = assign_splits(everything, seed=cfg.split_seed)
    chosen = cands[:limit] if limit is not None else cands
    t_start = time.perf_counter()
    session = _new_session(cfg, command=command, n_jobs=n_jobs, limit=limit, prototypes=prototypes)
    done: set[str] = set()
    failed_before: set[str] = set()
    if resume and (path.exists() or has_parts):
        done, failed_before = _done_before(
            path, session, seed=cfg.split_seed, retry_failed=retry_failed
        )
    todo = [c for c in chosen if c.name(full) not in done]
    summary = BuildSummary(
        out=str(path),
        model=full,
        n_candidates=len(chosen),
        n_already_done=len(chosen) - len(todo),
    )
    logger.info(
        "fcdb build: %d crystals (%d done before), model %s, %d job(s), out %s",
        len(chosen),
        summary.n_already_done,
        full,
        n_jobs,
        path,
    )
    _parts_dir(path).mkdir(parents=True, exist_ok=True)
    _compute_all(
        todo,
        cfg,
        splits,
        n_jobs,
        path=path,
        session=session,
        summary=summary,
        retried={c.name(full) for c in todo} & failed_before,
        pack_every=pack_every,
        progress=progress,
        t_start=t_start,
    )
    return summary


def _compute_all(
    todo: Sequence[Candidate],
    cfg: BuildSettings,
    splits: dict[str, str],
    n_jobs: int,
    *,
    path: Path,
    session: dict[str, Any],
    summary: BuildSummary,
    retried: set[str],
    pack_every: int,
    progress: bool,
    t_start: float,
) -> None:
    """Compute ``todo`` (in this process or on ``n_jobs`` workers), recording and packing as
    crystals finish; on Ctrl-C or SIGTERM pack what is finished and re-raise. ``t_start``
    (``time.perf_counter()``) is when the build started."""
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc=f"fcdb {cfg.model}", unit="crystal", disable=not progress)
    recorder = _Recorder(
        path,
        session,
        summary,
        seed=cfg.split_seed,
        retried=retried,
        pack_every=pack_every,
        bar=bar,
        t_start=t_start,
    )
    previous = _interrupt_on_sigterm()
    try:
        if todo and n_jobs == 1:
            _init_worker(cfg.model, 1)
            for cand in todo:
                bar.set_description(f"fcdb {cand.crystal_id}")
                recorder.record(_run_one(cand, cfg, splits[cand.crystal_id]))
        elif todo:
            _run_pool(todo, cfg, splits, n_jobs, recorder.record)
    except KeyboardInterrupt:
        summary.interrupted = True
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        bar.close()
        recorder.pack()
        summary.seconds = round(time.perf_counter() - t_start, 1)
        with contextlib.suppress(OSError):
            _parts_dir(path).rmdir()  # only when empty


def _interrupt_on_sigterm() -> Any:
    """Make SIGTERM stop the build like Ctrl-C (finished crystals are packed); return the
    previous handler (None when not in the main thread, where handlers cannot be set)."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def _run_pool(
    todo: Sequence[Candidate],
    cfg: BuildSettings,
    splits: dict[str, str],
    n_jobs: int,
    record: Any,
) -> None:
    """Compute ``todo`` on ``n_jobs`` spawned worker processes, recording results as they come."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    queue = list(todo)
    while queue:
        pool = ProcessPoolExecutor(
            max_workers=n_jobs,
            mp_context=mp.get_context("spawn"),
            initializer=_init_worker,
            initargs=(cfg.model, 1),
        )
        running: dict[Future[Any], Candidate] = {}
        broken = False
        try:
            while (queue or running) and not broken:
                while queue and len(running) < 2 * n_jobs:
                    cand = queue.pop(0)
                    running[pool.submit(_run_one, cand, cfg, splits[cand.crystal_id])] = cand
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    cand = running.pop(fut)
                    try:
                        result = fut.result()
                    except BrokenProcessPool as exc:  # a worker died (memory, signal)
                        broken = True
                        result = Failure(
                            name=cand.name(cfg.model),
                            prototype=cand.prototype,
                            stage="worker",
                            message=f"worker process died while computing it: {exc}",
                        )
                    record(result)
        finally:
            pool.shutdown(wait=not broken, cancel_futures=True)
        # after a crash the crystals still in flight are computed again by a fresh pool
        queue = list(running.values()) + queue
