"""Phonons of any crystal from per-pair force-constant blocks (numpy, no phonopy object).

A force-constant set is given the way the FC database (``simulations.fcdb.database``) and the
e3nn model (:mod:`model_server.structure_fc.model`) give it: ``pairs`` (m, 5) int rows
``(i, j, n1, n2, n3)`` = atom ``i`` of the home cell to atom ``j`` of the cell at lattice
vector ``(n1, n2, n3)``, and ``fc`` (m, 3, 3) float, eV/A^2, ``Phi_ab(i0, jR)`` with the self
terms included.

Dynamical matrix (phonopy's convention, the same as
``simulations.lattice.force_constants.FCBasis.dynamical_basis``)::

    D_{ia,jb}(q) = sum_{(i, j, n)} Phi_ab(i0, jn) exp(2 pi i q.(n + x_j - x_i)) / sqrt(m_i m_j)

with ``q`` in reduced coordinates of the primitive reciprocal lattice (r.l.u.), ``x`` the
fractional coordinates and ``m`` the masses (amu, ASE's standard atomic weights). Its
eigenvalues ``lambda`` (eV/A^2/amu) give the frequencies ``nu = sign(lambda)
sqrt(|lambda|) * VASP_TO_THZ`` in THz; imaginary modes come out negative.

The helpers here are shared by the model's evaluation (DOS of predicted vs force-field FCs)
and by the spectra of the prediction endpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numba import njit
from numpy.typing import ArrayLike, NDArray

from simulations.exceptions import ForceConstantError
from simulations.units import VASP_TO_THZ

if TYPE_CHECKING:
    from simulations.lattice.nac import NACTerm

__all__ = [
    "MeshPhonons",
    "atomic_masses",
    "dos_histogram",
    "dynamical_matrices",
    "frequencies_at",
    "mesh_frequencies",
    "mesh_qpoints",
]


def atomic_masses(numbers: ArrayLike) -> NDArray[np.float64]:
    """Standard atomic weights (amu) of atomic numbers, shape (n,) (ASE's table, as the FC
    database uses)."""
    from ase.data import atomic_masses as table

    z = np.asarray(numbers, dtype=np.int64).ravel()
    return np.asarray(table[z], dtype=np.float64)


def _check_fc(
    numbers: ArrayLike, frac: ArrayLike, pairs: ArrayLike, fc: ArrayLike
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.int64], NDArray[np.float64]]:
    z = np.asarray(numbers, dtype=np.int64).ravel()
    x = np.asarray(frac, dtype=np.float64)
    p = np.asarray(pairs, dtype=np.int64)
    f = np.asarray(fc, dtype=np.float64)
    n = len(z)
    if x.shape != (n, 3):
        raise ForceConstantError(f"frac must have shape ({n}, 3) for {n} atoms, got {x.shape}")
    if p.ndim != 2 or p.shape[1] != 5 or f.shape != (len(p), 3, 3):
        raise ForceConstantError(
            f"pairs must be (m, 5) and fc (m, 3, 3); got pairs {p.shape}, fc {f.shape}"
        )
    if len(p) and (p[:, :2].min() < 0 or p[:, :2].max() >= n):
        raise ForceConstantError(f"pairs refer to atoms outside 0..{n - 1}")
    if not np.all(np.isfinite(f)):
        raise ForceConstantError("force constants contain NaN or inf")
    return z, x, p, f


def dynamical_matrices(
    numbers: ArrayLike,
    frac: ArrayLike,
    pairs: ArrayLike,
    fc: ArrayLike,
    qpoints: ArrayLike,
    *,
    masses: ArrayLike | None = None,
    nac: NACTerm | None = None,
) -> NDArray[np.complex128]:
    """Mass-weighted dynamical matrices at reduced wave vectors.

    Parameters
    ----------
    numbers
        (n,) int, atomic numbers of the primitive cell.
    frac
        (n, 3) float, fractional coordinates.
    pairs, fc
        (m, 5) int and (m, 3, 3) float eV/A^2, see the module docstring.
    qpoints
        (n_q, 3) float, r.l.u. of the primitive reciprocal lattice.
    masses
        (n,) float, amu; default: standard atomic weights of ``numbers``.
    nac
        The non-analytic term of a polar crystal (:class:`simulations.lattice.nac.NACTerm`),
        added when given.

    Returns
    -------
    (n_q, 3 n, 3 n) complex, eV/A^2/amu, Hermitian (made exactly so).
    """
    z, x, p, f = _check_fc(numbers, frac, pairs, fc)
    n = len(z)
    m = atomic_masses(z) if masses is None else np.asarray(masses, dtype=np.float64)
    q = np.atleast_2d(np.asarray(qpoints, dtype=np.float64))
    shift = p[:, 2:5] + x[p[:, 1]] - x[p[:, 0]]  # (m, 3) fractional
    weight = 1.0 / np.sqrt(m[p[:, 0]] * m[p[:, 1]])
    d = pair_sum(q, shift, weight, f, p[:, :2], n)
    if nac is not None:
        d = d + nac.matrices(q)
        d = 0.5 * (d + d.conj().transpose(0, 2, 1))
    return d


def pair_sum(
    qpoints: NDArray[np.float64],
    shift: NDArray[np.float64],
    weight: NDArray[np.float64],
    fc: NDArray[np.float64],
    atoms: NDArray[np.integer],
    n_atoms: int,
) -> NDArray[np.complex128]:
    """(n_q, 3 n, 3 n) complex, Hermitian (made exactly so): ``sum_p weight_p exp(2 pi i
    q . shift_p) fc_p`` into each pair's (i, j) block, in one compiled pass per q.

    ``qpoints`` (n_q, 3) r.l.u.; per pair ``shift`` (m, 3) ``n + x_j - x_i`` fractional,
    ``weight`` (m,) ``1 / sqrt(m_i m_j)`` (1/amu), ``fc`` (m, 3, 3) eV/A^2, ``atoms``
    (m, 2) ``i, j``. The dynamical matrices without a non-analytic term, eV/A^2/amu.
    """
    q = np.ascontiguousarray(qpoints, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != 3:
        raise ValueError(f"qpoints must be (n, 3) r.l.u., got shape {q.shape}")
    out = np.zeros((len(q), 3 * n_atoms, 3 * n_atoms), dtype=np.complex128)
    if len(q):
        _pair_sum_kernel(
            q,
            np.ascontiguousarray(shift, dtype=np.float64),
            np.ascontiguousarray(weight, dtype=np.float64),
            np.ascontiguousarray(fc, dtype=np.float64),
            np.ascontiguousarray(atoms, dtype=np.int64),
            out,
        )
    return out


def _to_thz(eigenvalues: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.asarray(np.sign(eigenvalues) * np.sqrt(np.abs(eigenvalues)) * VASP_TO_THZ)


def frequencies_at(
    numbers: ArrayLike,
    frac: ArrayLike,
    pairs: ArrayLike,
    fc: ArrayLike,
    qpoints: ArrayLike,
    *,
    masses: ArrayLike | None = None,
    nac: NACTerm | None = None,
) -> NDArray[np.float64]:
    """Phonon frequencies at reduced wave vectors (arguments: :func:`dynamical_matrices`).

    Returns
    -------
    (n_q, 3 n) float, THz, ascending per q; imaginary modes negative.
    """
    d = dynamical_matrices(numbers, frac, pairs, fc, qpoints, masses=masses, nac=nac)
    return _to_thz(np.asarray(np.linalg.eigvalsh(d), dtype=np.float64))


def mesh_qpoints(mesh: tuple[int, int, int] | ArrayLike) -> NDArray[np.float64]:
    """Gamma-centred regular mesh of the primitive reciprocal cell.

    Parameters
    ----------
    mesh
        (3,) int, number of points along each reciprocal axis.

    Returns
    -------
    (n1 n2 n3, 3) float, r.l.u. in [-0.5, 0.5); Gamma included; every point weight 1.
    """
    nk = np.asarray(mesh, dtype=np.int64).ravel()
    if nk.shape != (3,) or np.any(nk < 1):
        raise ForceConstantError(f"mesh must be three positive integers, got {mesh!r}")
    axes = [(np.arange(k) / k + 0.5) % 1.0 - 0.5 for k in nk]
    g = np.meshgrid(*axes, indexing="ij")
    return np.stack([a.ravel() for a in g], axis=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshPhonons:
    """Phonons on a regular q mesh.

    Attributes
    ----------
    qpoints
        (n_q, 3) float, r.l.u. of the primitive reciprocal lattice.
    frequencies
        (n_q, 3 n) float, THz, ascending per q; imaginary modes negative.
    eigenvectors
        (n_q, 3 n, 3 n) complex or ``None``: column ``k`` of ``eigenvectors[q]`` is mode
        ``k`` (mass-weighted, unit norm; row index ``3 i + a`` for atom ``i``, axis ``a``).
    """

    qpoints: NDArray[np.float64]
    frequencies: NDArray[np.float64]
    eigenvectors: NDArray[np.complex128] | None

    @property
    def min_frequency(self) -> float:
        """Lowest frequency on the mesh, THz (negative: imaginary)."""
        return float(self.frequencies.min())


def mesh_frequencies(
    numbers: ArrayLike,
    frac: ArrayLike,
    pairs: ArrayLike,
    fc: ArrayLike,
    mesh: tuple[int, int, int] | ArrayLike = (8, 8, 8),
    *,
    masses: ArrayLike | None = None,
    eigenvectors: bool = False,
    chunk: int = 256,
    nac: NACTerm | None = None,
) -> MeshPhonons:
    """Frequencies (and optionally eigenvectors) on a Gamma-centred regular mesh.

    Parameters
    ----------
    numbers, frac, pairs, fc, masses, nac
        See :func:`dynamical_matrices`.
    mesh
        (3,) int, points along each reciprocal axis (all points, no symmetry reduction).
    eigenvectors
        Also return the eigenvectors.
    chunk
        q-points diagonalised per batch (memory bound).
    """
    q = mesh_qpoints(mesh)
    freqs = []
    vecs = []
    for start in range(0, len(q), chunk):
        d = dynamical_matrices(
            numbers, frac, pairs, fc, q[start : start + chunk], masses=masses, nac=nac
        )
        if eigenvectors:
            w, v = np.linalg.eigh(d)
            vecs.append(v)
        else:
            w = np.linalg.eigvalsh(d)
        freqs.append(_to_thz(np.asarray(w, dtype=np.float64)))
    return MeshPhonons(
        qpoints=q,
        frequencies=np.concatenate(freqs),
        eigenvectors=np.concatenate(vecs) if eigenvectors else None,
    )


def dos_histogram(
    frequencies: ArrayLike,
    energies: ArrayLike,
    sigma: float,
    *,
    weights: ArrayLike | None = None,
) -> NDArray[np.float64]:
    """Gaussian-broadened density of states on given energy points.

    Parameters
    ----------
    frequencies
        (...) float, mode energies (any unit, the same as ``energies``).
    energies
        (n_e,) float, where the DOS is evaluated.
    sigma
        Gaussian standard deviation, the unit of ``energies``.
    weights
        (...) float, weight of every mode (default 1): e.g. partial DOS projections.

    Returns
    -------
    (n_e,) float, states per unit energy, normalised to the summed weights divided by the
    number of entries (so a total DOS integrates to 3 n per cell when ``frequencies`` is
    (n_q, 3 n) with unit weights).
    """
    f = np.asarray(frequencies, dtype=np.float64).ravel()
    e = np.asarray(energies, dtype=np.float64).ravel()
    if sigma <= 0:
        raise ForceConstantError(f"DOS broadening must be positive, got {sigma}")
    w = np.ones_like(f) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    n_rows = np.asarray(frequencies).shape[0] if np.ndim(frequencies) > 1 else 1
    out = np.zeros(len(e))
    norm = 1.0 / (sigma * np.sqrt(2 * np.pi))
    for start in range(0, len(f), 4096):  # chunks keep the (n_e, chunk) Gaussians small
        fs, ws = f[start : start + 4096], w[start : start + 4096]
        out += np.exp(-0.5 * ((e[:, None] - fs[None, :]) / sigma) ** 2) @ ws
    return np.asarray(out * norm / n_rows)


@njit(cache=True, nogil=True)
def _pair_sum_kernel(
    q: NDArray[np.float64],  # (n_q, 3) r.l.u.
    phase_vectors: NDArray[np.float64],  # (n_pairs, 3) R + x_j - x_i, lattice units
    weights: NDArray[np.float64],  # (n_pairs,) 1 / sqrt(M_i M_j), 1/amu
    blocks: NDArray[np.float64],  # (n_pairs, 3, 3) eV/Angstrom^2
    pair_atoms: NDArray[np.int64],  # (n_pairs, 2) i, j
    out: NDArray[np.complex128],  # (n_q, 3N, 3N) zeros on entry
) -> None:
    """``out[k]`` = the Hermitian part of ``sum_p w_p exp(2 pi i q_k . r_p) Phi_p``, each
    pair's block at its atoms' rows and columns (:func:`pair_sum`)."""
    n_q, n_pairs, n = q.shape[0], phase_vectors.shape[0], out.shape[1]
    two_pi = 2.0 * math.pi
    for k in range(n_q):
        d = out[k]
        for b in range(n_pairs):
            arg = two_pi * (
                q[k, 0] * phase_vectors[b, 0]
                + q[k, 1] * phase_vectors[b, 1]
                + q[k, 2] * phase_vectors[b, 2]
            )
            c, s = math.cos(arg) * weights[b], math.sin(arg) * weights[b]
            i0, j0 = 3 * pair_atoms[b, 0], 3 * pair_atoms[b, 1]
            for x in range(3):
                for y in range(3):
                    v = blocks[b, x, y]
                    d[i0 + x, j0 + y] += complex(c * v, s * v)
        for x in range(n):
            d[x, x] = d[x, x].real
            for y in range(x + 1, n):
                h = 0.5 * (d[x, y] + d[y, x].conjugate())
                d[x, y] = h
                d[y, x] = h.conjugate()
