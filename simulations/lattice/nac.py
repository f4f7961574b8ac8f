"""The non-analytic term of the dynamical matrix of a polar crystal (LO-TO splitting).

In an insulator with Born effective charges ``Z*`` and a high-frequency dielectric tensor
``eps_inf``, the long-range dipole-dipole interaction adds to the dynamical matrix near
Gamma a term that depends on the *direction* of ``q``::

    C_ia,jb(q) = (4 pi / Omega) e^2/(4 pi eps_0) (q.Z*_i)_a (q.Z*_j)_b / (q.eps_inf.q)

(``Omega`` the primitive cell volume). Short-range force constants computed in a supercell
miss it, so the LO modes at Gamma come out degenerate with the TO modes.

This module applies it as Wang et al. do (J. Phys.: Condens. Matter 22, 202201 (2010);
phonopy's ``nac_params["method"] = "wang"``): ``C(q)`` is spread evenly over the ``N``
primitive cells of the supercell the force constants were computed in, and Fourier
transformed with the same images as the force constants::

    D^NAC_ia,jb(q) = C_ia,jb(q) / (N sqrt(m_i m_j)) sum_(i, j, n) w exp(2 pi i q.(n + x_j - x_i))

with ``w = 1/multiplicity`` of each image pair (the weights of the supercell's shortest
images, as in the force constants). With the same supercell and images this is phonopy's
``DynamicalMatrixWang`` to rounding. Gonze and Lee's Ewald treatment (phonopy's default
method) is not implemented.

The direction is that of the reduced wave vector brought to its shortest image (so that a
wave vector ``G + q`` of S(Q, E) has the direction of ``q``); at ``q = 0`` exactly the
direction is undefined and the term is left out (the TO modes), as phonopy does without a
``q_direction``.

Born charges follow phonopy's convention: ``(q.Z*_i)_b = sum_a q_a Z*_i,ab`` (first index
the field, second the displacement), in units of e.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from simulations.exceptions import ForceConstantError
from simulations.units import COULOMB_EV_ANGSTROM

__all__ = ["NACTerm"]

#: |q| (1/Angstrom, without 2 pi) below which the direction is undefined: no term.
_Q_ZERO = 1e-10


@dataclass(frozen=True, slots=True, kw_only=True)
class NACTerm:
    """Born charges, dielectric tensor and the supercell images of a crystal's FCs.

    Attributes
    ----------
    lattice
        (3, 3) float, Angstrom, rows are the primitive lattice vectors.
    frac
        (n, 3) float, fractional coordinates of the atoms (those of the FCs' pairs).
    masses
        (n,) float, amu.
    born
        (n, 3, 3) float, e: Born effective charges (phonopy's convention).
    dielectric
        (3, 3) float: high-frequency dielectric tensor (eps_inf).
    pairs
        (m, 5) int, ``(i, j, n1, n2, n3)``: every image pair of the supercell.
    weights
        (m,) float: ``1 / (N multiplicity)`` of every image pair, so that the weights of one
        atom pair ``(i, j)`` sum to 1.
    volume
        Omega, Angstrom^3: the volume of the cell the charges were computed in (that of
        ``lattice`` unless FCs of a slightly different cell were put on this one).
    """

    lattice: NDArray[np.float64]
    frac: NDArray[np.float64]
    masses: NDArray[np.float64]
    born: NDArray[np.float64]
    dielectric: NDArray[np.float64]
    pairs: NDArray[np.int64]
    weights: NDArray[np.float64]
    volume: float

    @classmethod
    def from_arrays(
        cls,
        *,
        lattice: ArrayLike,
        frac: ArrayLike,
        masses: ArrayLike,
        born: ArrayLike,
        dielectric: ArrayLike,
        pairs: ArrayLike,
        weights: ArrayLike,
        volume: float | None = None,
    ) -> NACTerm:
        """Validate and copy (``volume``: default the lattice's).

        Raises
        ------
        ForceConstantError
            Wrong shapes, non-finite values, a dielectric tensor that is not positive
            definite.
        """
        lat = np.array(lattice, dtype=np.float64)
        x = np.array(frac, dtype=np.float64)
        n = len(x)
        m = np.array(masses, dtype=np.float64).ravel()
        z = np.array(born, dtype=np.float64)
        eps = np.array(dielectric, dtype=np.float64)
        p = np.array(pairs, dtype=np.int64)
        w = np.array(weights, dtype=np.float64).ravel()
        if lat.shape != (3, 3) or x.shape != (n, 3) or m.shape != (n,):
            raise ForceConstantError("NAC: lattice (3, 3), frac (n, 3) and masses (n,) expected")
        if z.shape != (n, 3, 3):
            raise ForceConstantError(
                f"Born charges must be {n} 3x3 tensors (one per atom of the primitive cell), "
                f"got shape {z.shape}"
            )
        if eps.shape != (3, 3):
            raise ForceConstantError(f"the dielectric tensor must be 3x3, got shape {eps.shape}")
        if p.ndim != 2 or p.shape[1] != 5 or w.shape != (len(p),):
            raise ForceConstantError("NAC: pairs (m, 5) and weights (m,) expected")
        if not all(np.all(np.isfinite(a)) for a in (lat, z, eps, w)):
            raise ForceConstantError("Born charges or dielectric tensor contain NaN or inf")
        if np.linalg.eigvalsh(0.5 * (eps + eps.T)).min() <= 0:
            raise ForceConstantError(
                "the dielectric tensor is not positive definite: give eps_inf (e.g. phonopy's "
                "BORN file's first line)"
            )
        omega = abs(float(np.linalg.det(lat))) if volume is None else float(volume)
        if not (math.isfinite(omega) and omega > 1e-3):
            raise ForceConstantError(f"NAC: the cell volume must be positive, got {omega}")
        return cls(
            lattice=lat,
            frac=x,
            masses=m,
            born=z,
            dielectric=eps,
            pairs=p,
            weights=w,
            volume=omega,
        )

    @property
    def n_atoms(self) -> int:
        """Atoms in the primitive cell."""
        return len(self.frac)

    def directions(self, qpoints: ArrayLike) -> NDArray[np.float64]:
        """(n_q, 3) Cartesian wave vectors (1/Angstrom, without 2 pi) of the shortest image
        of every reduced ``q``: the direction of the non-analytic term."""
        q = np.atleast_2d(np.asarray(qpoints, dtype=np.float64))
        reciprocal = np.linalg.inv(self.lattice).T  # rows: b_i / (2 pi)
        base = q - np.round(q)
        shifts = np.stack(np.meshgrid(*(np.arange(-1, 2),) * 3, indexing="ij"), axis=-1).reshape(
            -1, 3
        )
        cand = (base[:, None, :] + shifts[None]) @ reciprocal  # (n_q, 27, 3)
        lengths = np.einsum("qsx,qsx->qs", cand, cand)
        best = np.argmin(lengths + 1e-12 * np.arange(27), axis=1)
        return np.asarray(cand[np.arange(len(q)), best])

    def matrices(self, qpoints: ArrayLike) -> NDArray[np.complex128]:
        """The non-analytic term of the mass-weighted dynamical matrices.

        Parameters
        ----------
        qpoints
            (n_q, 3) float, r.l.u. of the primitive reciprocal lattice.

        Returns
        -------
        (n_q, 3 n, 3 n) complex, eV/Angstrom^2/amu, Hermitian; zero at ``q = 0`` exactly.
        """
        q = np.atleast_2d(np.asarray(qpoints, dtype=np.float64))
        n = self.n_atoms
        q_cart = self.directions(q)
        volume = self.volume
        denom = np.einsum("qa,ab,qb->q", q_cart, self.dielectric, q_cart)
        at_gamma = np.einsum("qa,qa->q", q_cart, q_cart) < _Q_ZERO**2
        factor = np.where(
            at_gamma,
            0.0,
            COULOMB_EV_ANGSTROM * 4.0 * math.pi / volume / np.where(at_gamma, 1, denom),
        )
        charge = np.einsum("qa,iab->qib", q_cart, self.born)  # (n_q, n, 3)
        p = self.pairs
        shift = p[:, 2:5] + self.frac[p[:, 1]] - self.frac[p[:, 0]]
        phase = np.exp(2j * np.pi * (q @ shift.T)) * self.weights  # (n_q, m)
        lattice_sum = np.zeros((len(q), n * n), dtype=np.complex128)
        np.add.at(lattice_sum.T, p[:, 0] * n + p[:, 1], phase.T)
        s = lattice_sum.reshape(len(q), n, n) / np.sqrt(np.outer(self.masses, self.masses))
        d = np.einsum("q,qia,qjb,qij->qiajb", factor, charge, charge, s)
        d = d.reshape(len(q), 3 * n, 3 * n)
        return np.asarray(0.5 * (d + d.conj().transpose(0, 2, 1)), dtype=np.complex128)
