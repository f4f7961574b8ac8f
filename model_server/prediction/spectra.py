"""Spectra of any crystal from its force constants: phonon DOS and partial DOS, the coherent
powder S(|Q|, E), and the 1D S(E) of an indirect-geometry spectrometer (VISION/TOSCA-like).

Everything takes a :class:`~model_server.prediction.crystal_fc.CrystalFC` (structure + per-pair FCs
in
eV/A^2), so it does not matter whether the FCs come from the e3nn model, the FC database,
a force field or a symmetry-reduced coefficient set. Energies are in meV (1 THz =
:data:`~simulations.units.THZ_TO_MEV` = 4.1357 meV), Q in 1/Angstrom, masses in amu.

Phonons on a mesh
    :func:`simulations.lattice.pair_phonons.mesh_frequencies` (the model's evaluation helper): the
    dynamical matrix ``D_ia,jb(q) = sum Phi_ab(i0, jn) exp(2 pi i q.(n + x_j - x_i)) /
    sqrt(m_i m_j)`` diagonalised on a Gamma-centred regular mesh of the primitive
    reciprocal cell (the Monkhorst-Pack mesh for odd sizes), every point weight 1. The
    default mesh (:func:`default_mesh`) has ``ceil(|b_i| / spacing)`` points along
    reciprocal axis ``i`` (spacing :data:`Q_SPACING` 1/Angstrom), refined isotropically up
    to about ``min(60000 / n, 1.4e6 / n^2)`` points for n atoms (a few ten thousand modes
    for the sharp VISION resolution, eigenvectors under ~200 MB).

Phonon DOS (:func:`phonon_dos`)
    ``g(E) = 1/N_q sum_{q nu} G(E - E_q nu)`` with a unit-area Gaussian ``G`` of standard
    deviation ``sigma`` (meV): states / meV per primitive cell, integrating to 3 n. The
    partial DOS of atom ``i`` weighs each mode by ``sum_a |e_ia,nu(q)|^2`` (integrates to
    3); per element, the sum over its atoms. Checked against phonopy's total DOS of the
    same FCs (``tests/model_server/prediction/test_spectra.py``). Imaginary modes appear at
    negative energies.

Coherent powder S(|Q|, E) (:func:`powder_spectrum`, :func:`powder_from_fc`)
    The one-phonon coherent S(Q, E) of :class:`simulations.lattice.sqe.CoherentSQE` (eigenvectors,
    Debye-Waller, Bose factor, scattering lengths) averaged over a Fibonacci sphere of
    directions at every |Q|, each |Q| under its own seeded random rotation. Per-pair FCs
    enter by the *direct path*: :meth:`CrystalFC.basis` wraps them as a one-coefficient
    basis, so every bond is kept as given (no projection onto a symmetry-reduced basis,
    whose 4 default shells would cut bonds that a 6 Angstrom model predicts; how far the
    FCs are from the crystal's symmetry is :meth:`CrystalFC.symmetry_residual`, and
    :func:`model_server.prediction.crystal_fc.project_onto_basis` gives named coefficients where a
    basis exists). Cells up to :data:`MAX_ATOMS_POWDER` atoms (cost: one 3n x 3n
    eigenproblem per Q point and direction); the Debye-Waller mesh shrinks with the
    cell (:func:`debye_waller_mesh`).

Indirect-geometry S(E)
    :mod:`model_server.prediction.indirect` (VISION/TOSCA-like, incoherent approximation), on the
    same mesh modes (:func:`mesh_modes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from threadpoolctl import threadpool_limits

from model_server.exceptions import ModelServerError
from model_server.prediction.crystal_fc import CrystalFC
from simulations.lattice.pair_phonons import MeshPhonons, mesh_frequencies
from simulations.lattice.powder import powder_spectrum
from simulations.lattice.resolution import EnergyResolution
from simulations.lattice.sqe import (
    CoherentSQE,
)
from simulations.units import THZ_TO_MEV

__all__ = [
    "MAX_ATOMS_DOS",
    "MAX_ATOMS_POWDER",
    "Q_SPACING",
    "PhononDOS",
    "SpectraError",
    "check_atom_limit",
    "cosine_similarity",
    "debye_waller_mesh",
    "default_mesh",
    "mesh_for",
    "mesh_modes",
    "phonon_dos",
    "powder_from_fc",
    "powder_spectrum",
    "resolve_mesh",
    "single_threaded_blas",
]

#: Largest primitive cell (atoms) for the DOS and the indirect-geometry spectrum.
MAX_ATOMS_DOS = 64
#: Largest primitive cell (atoms) for the coherent powder spectrum.
MAX_ATOMS_POWDER = 32
#: Default mesh density: points along reciprocal axis i = ceil(|b_i| / Q_SPACING), 1/Angstrom.
Q_SPACING = 0.12
#: Memory bound of one batch of eigenvectors (complex numbers).
_CHUNK_ELEMENTS = 4_000_000


class SpectraError(ModelServerError, ValueError):
    """A spectrum that cannot be computed as asked (a cell above the atom limit, a bad
    mesh, energy axis, instrument or order)."""


def single_threaded_blas() -> Any:
    """Context: BLAS/LAPACK on one thread. Batches of small eigenproblems (3n x 3n) gain
    nothing from threads, and on a busy machine OpenBLAS' spinning threads made them ~50x
    slower (96 x 96: 108 ms with 2 threads, 2.3 ms with 1, measured here under load)."""
    return threadpool_limits(limits=1, user_api="blas")


def check_atom_limit(fcs: CrystalFC, limit: int, what: str) -> None:
    """Raise :class:`SpectraError` naming the limit and the cell's atom count when
    ``fcs`` has more than ``limit`` atoms (``what``: the spectrum, for the message)."""
    if fcs.n_atoms > limit:
        raise SpectraError(
            f"{fcs.name}: the primitive cell has {fcs.n_atoms} atoms; the {what} supports at "
            f"most {limit} atoms in the primitive cell"
        )


# -- phonons on a mesh ------------------------------------------------------------------------


def mesh_for(lattice: NDArray[np.float64], spacing: float = Q_SPACING) -> tuple[int, int, int]:
    """Mesh size ``ceil(|b_i| / spacing)`` per reciprocal axis (at least 1).

    Parameters
    ----------
    lattice
        (3, 3) float, Angstrom, rows the lattice vectors.
    spacing
        Largest distance between mesh points along each axis, 1/Angstrom.
    """
    if not math.isfinite(spacing) or spacing <= 0:
        raise SpectraError(f"mesh spacing must be a positive number of 1/A, got {spacing}")
    b = 2.0 * np.pi * np.linalg.inv(np.asarray(lattice, dtype=float)).T
    n = np.maximum(1, np.ceil(np.linalg.norm(b, axis=1) / spacing)).astype(int)
    return int(n[0]), int(n[1]), int(n[2])


def default_mesh(fcs: CrystalFC) -> tuple[int, int, int]:
    """The default mesh of a cell (see the module docstring)."""
    base = np.array(mesh_for(fcs.lattice))
    n = fcs.n_atoms
    target = min(60_000 // n, int(1.4e6 / n**2))
    total = int(np.prod(base))
    if total < target:
        base = np.maximum(base, np.round(base * (target / total) ** (1.0 / 3.0)).astype(int))
    return int(base[0]), int(base[1]), int(base[2])


def resolve_mesh(fcs: CrystalFC, mesh: int | tuple[int, int, int] | None) -> tuple[int, int, int]:
    """The mesh to use: ``mesh`` (one size or three, 1..200) or :func:`default_mesh`."""
    if mesh is None:
        return default_mesh(fcs)
    m = (mesh, mesh, mesh) if isinstance(mesh, int | np.integer) else tuple(mesh)
    if len(m) != 3 or any(int(k) < 1 or int(k) > 200 for k in m):
        raise SpectraError(f"mesh must be 1..200 points per axis (one or three), got {mesh!r}")
    return int(m[0]), int(m[1]), int(m[2])


def mesh_modes(
    fcs: CrystalFC, mesh: int | tuple[int, int, int] | None = None
) -> tuple[MeshPhonons, tuple[int, int, int]]:
    """Frequencies and eigenvectors on a Gamma-centred mesh (default :func:`default_mesh`).

    Returns
    -------
    modes
        :class:`~simulations.lattice.pair_phonons.MeshPhonons`: frequencies (n_q, 3n) THz,
        eigenvectors (n_q, 3n, 3n), column k = mode k, row 3 i + a.
    mesh
        The mesh used.
    """
    size = resolve_mesh(fcs, mesh)
    chunk = max(1, _CHUNK_ELEMENTS // (9 * fcs.n_atoms**2))
    with single_threaded_blas():
        modes = _mesh_frequencies(fcs, size, chunk)
    return modes, size


def _mesh_frequencies(fcs: CrystalFC, size: tuple[int, int, int], chunk: int) -> MeshPhonons:
    return mesh_frequencies(
        fcs.numbers,
        fcs.frac,
        fcs.pairs,
        fcs.fc,
        size,
        masses=fcs.masses,
        eigenvectors=True,
        chunk=chunk,
        nac=fcs.nac,
    )


def _atom_weights(modes: MeshPhonons, n_atoms: int) -> NDArray[np.float64]:
    """(n_q, n_atoms, 3n): sum_a |e_ia,k|^2 of every mode (each column sums to 1)."""
    v = modes.eigenvectors
    assert v is not None
    n_q, m, _ = v.shape
    w = (np.abs(v) ** 2).reshape(n_q, n_atoms, 3, m).sum(axis=2)
    return np.asarray(w)


def _gaussians(
    centres: NDArray[np.float64],
    weights: NDArray[np.float64],
    energies: NDArray[np.float64],
    sigma: float,
) -> NDArray[np.float64]:
    """(n_E, K): sum over modes of weights[mode, k] x unit-area Gaussian(E - centre)."""
    out = np.zeros((len(energies), weights.shape[1]))
    norm = 1.0 / (sigma * math.sqrt(2.0 * math.pi))
    step = max(1, 4_000_000 // max(1, len(energies)))
    for start in range(0, len(centres), step):
        c = centres[start : start + step]
        g = np.exp(-0.5 * ((energies[:, None] - c[None, :]) / sigma) ** 2)
        out += g @ weights[start : start + step]
    return out * norm


def cosine_similarity(a: NDArray[np.float64], b: NDArray[np.float64]) -> float:
    """``a.b / (|a| |b|)`` of two spectra on the same bins (0 if either is all zero)."""
    x, y = np.ravel(a).astype(float), np.ravel(b).astype(float)
    den = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y / den) if den > 0 else 0.0


# -- DOS ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PhononDOS:
    """Phonon density of states and its partial (projected) parts.

    Attributes
    ----------
    energies
        (n_E,) float, meV, where the DOS is evaluated.
    total
        (n_E,) float, states / meV per primitive cell (integrates to 3 n).
    partial
        (n_atoms, n_E) float, states / meV of every atom (each integrates to 3).
    species
        Element of every atom.
    sigma
        Gaussian broadening (standard deviation), meV.
    mesh
        q mesh (points per reciprocal axis, Gamma-centred).
    min_frequency_thz, max_frequency_thz
        Lowest (negative: imaginary) and highest mode on the mesh, THz.
    mean_energy
        Mean energy of the real modes on the mesh (unbroadened), meV.
    """

    energies: NDArray[np.float64]
    total: NDArray[np.float64]
    partial: NDArray[np.float64]
    species: tuple[str, ...]
    sigma: float
    mesh: tuple[int, int, int]
    min_frequency_thz: float
    max_frequency_thz: float
    mean_energy: float

    @property
    def thz(self) -> NDArray[np.float64]:
        """(n_E,) the energy axis in THz."""
        return np.asarray(self.energies / THZ_TO_MEV)

    @property
    def total_per_thz(self) -> NDArray[np.float64]:
        """(n_E,) states / THz per primitive cell."""
        return np.asarray(self.total * THZ_TO_MEV)

    @property
    def elements(self) -> tuple[str, ...]:
        """Distinct elements in order of first appearance."""
        return tuple(dict.fromkeys(self.species))

    @property
    def by_element(self) -> NDArray[np.float64]:
        """(n_elements, n_E) float, states / meV per primitive cell of each element's atoms."""
        sp = np.asarray(self.species)
        return np.stack([self.partial[sp == el].sum(axis=0) for el in self.elements])

    @property
    def stable(self) -> bool:
        """No imaginary mode beyond 0.05 THz (the forward model's tolerance)."""
        return self.min_frequency_thz >= -0.05

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "description": "phonon density of states on a Gamma-centred q mesh, Gaussian "
            f"broadening sigma {self.sigma:g} meV; partial DOS by element and by atom",
            "units": "states/meV per primitive cell",
            "energy_meV": self.energies.tolist(),
            "energy_THz": self.thz.tolist(),
            "total": self.total.tolist(),
            "by_element": {
                el: row.tolist() for el, row in zip(self.elements, self.by_element, strict=True)
            },
            "by_atom": self.partial.tolist(),
            "species": list(self.species),
            "sigma_meV": self.sigma,
            "mesh": list(self.mesh),
            "min_frequency_THz": self.min_frequency_thz,
            "max_frequency_THz": self.max_frequency_thz,
            "mean_energy_meV": self.mean_energy,
            "stable": self.stable,
        }


def phonon_dos(
    fcs: CrystalFC,
    *,
    mesh: int | tuple[int, int, int] | None = None,
    energies: NDArray[np.float64] | None = None,
    sigma: float = 0.5,
    n_energies: int = 400,
    modes: MeshPhonons | None = None,
) -> PhononDOS:
    """Total and partial phonon DOS (see the module docstring).

    Parameters
    ----------
    fcs
        Structure and FCs (at most :data:`MAX_ATOMS_DOS` atoms).
    mesh
        Points per reciprocal axis (one number or three); default :func:`default_mesh`.
    energies
        (n_E,) float, meV, where to evaluate; default ``n_energies`` points from
        min(0, lowest mode) - 3 sigma to the highest mode + 4 sigma.
    sigma
        Gaussian standard deviation, meV.
    modes
        Precomputed :func:`mesh_modes` result on ``mesh`` (reused by the endpoint).
    """
    check_atom_limit(fcs, MAX_ATOMS_DOS, "phonon DOS")
    if not math.isfinite(sigma) or sigma <= 0:
        raise SpectraError(f"DOS broadening sigma must be a positive number of meV, got {sigma}")
    if modes is None:
        modes, size = mesh_modes(fcs, mesh)
    else:
        size = resolve_mesh(fcs, mesh)
    e_mode = modes.frequencies * THZ_TO_MEV  # (n_q, 3n)
    if energies is None:
        lo = min(0.0, float(e_mode.min())) - 3.0 * sigma
        hi = float(e_mode.max()) + 4.0 * sigma
        energies = np.linspace(lo, hi, int(n_energies))
    e = np.asarray(energies, dtype=float).ravel()
    if e.size == 0 or not np.all(np.isfinite(e)):
        raise SpectraError("the DOS energy axis must be finite numbers of meV")
    w = _atom_weights(modes, fcs.n_atoms)  # (n_q, n, 3n)
    centres = e_mode.ravel()
    weights = w.transpose(0, 2, 1).reshape(-1, fcs.n_atoms)  # (n_q 3n, n)
    partial = _gaussians(centres, weights, e, sigma).T / len(e_mode)
    real = e_mode[e_mode > 0]
    return PhononDOS(
        energies=e,
        total=partial.sum(axis=0),
        partial=partial,
        species=fcs.species,
        sigma=float(sigma),
        mesh=size,
        min_frequency_thz=float(modes.frequencies.min()),
        max_frequency_thz=float(modes.frequencies.max()),
        mean_energy=float(real.mean()) if real.size else 0.0,
    )


# -- coherent powder ------------------------------------------------------------------------


def debye_waller_mesh(n_atoms: int) -> int:
    """Points per axis of the Debye-Waller mesh for a cell of ``n_atoms``: 12 (what
    :class:`CoherentSQE` uses) up to 8 atoms, then shrinking with the Brillouin zone's
    volume, ``round(12 (8 / n)^(1/3))``, at least 4."""
    if n_atoms <= 8:
        return 12
    return max(4, round(12.0 * (8.0 / n_atoms) ** (1.0 / 3.0)))


def powder_from_fc(
    fcs: CrystalFC,
    q: NDArray[np.float64],
    energies: NDArray[np.float64],
    *,
    temperature: float,
    resolution: EnergyResolution,
    directions: int = 128,
    seed: int = 0,
) -> NDArray[np.float64]:
    """(n_Q, n_E) coherent powder S(|Q|, E), mbarn/meV per atom, of per-pair FCs (the
    direct path; at most :data:`MAX_ATOMS_POWDER` atoms). See :func:`powder_spectrum`."""
    check_atom_limit(fcs, MAX_ATOMS_POWDER, "coherent powder spectrum")
    with single_threaded_blas():
        model = CoherentSQE(
            fcs.basis(),
            np.ones(1),
            temperature=temperature,
            resolution=resolution,
            dw_mesh=debye_waller_mesh(fcs.n_atoms),
        )
        return powder_spectrum(model, q, energies, directions=directions, seed=seed)
