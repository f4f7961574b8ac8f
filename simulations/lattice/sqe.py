"""Full coherent one-phonon S(Q, E) at arbitrary Q: eigenvectors, Debye-Waller, Bose factor.

This is the physics of the synthetic instrument and of the prediction endpoint, as opposed
to the training forward model (:mod:`simulations.lattice.forward`), which has dispersion only.

Conventions (the same as Euphonic's, against which it is tested):

* ``Q`` is given in r.l.u. of the *primitive* reciprocal lattice (:attr:`Crystal.lattice`);
  Cartesian ``Q = 2 pi q @ inv(lattice).T`` in 1/Angstrom; energy transfer ``E > 0`` is
  neutron energy loss (phonon creation).
* The dynamical matrix is built directly at ``Q`` with the phase convention of
  :meth:`FCBasis.dynamical_basis` (atom positions in the phase). Its eigenvectors ``e(Q)``
  then already carry the factor ``exp(2 pi i G.x_j)`` that Euphonic writes as
  ``exp(i Q.r_j)``, so the one-phonon structure factor per atom is

  ``sf_nu(Q) = (hbar^2 / amu) |sum_j b_j / sqrt(M_j) exp(-W_j(Q)) (Q . e_j,nu(Q))|^2
  / (2 N_atom E_nu)``

  in mbarn (b in fm, M in amu, Q in 1/Angstrom, E in meV; 1 fm^2 = 10 mbarn).
* Debye-Waller exponent ``W_j(Q) = Q . B_j . Q`` with
  ``B_j = hbar^2/(4 M_j N_q) sum_{q,nu} Re(e_j e_j^*) coth(E/2kT) / E`` over a full
  Gamma-centred mesh of the primitive reciprocal cell (symmetric under the point group, so
  B_j has the site symmetry), modes at or below 0.01 meV left out as Euphonic does.
* ``S(Q, E) = sum_nu sf_nu(Q) [(n_nu + 1) g(E - E_nu) + n_nu g(E + E_nu)]`` with the Bose
  occupation ``n = 1 / (exp(E_nu / kT) - 1)`` and ``g`` a unit-area Gaussian of the energy
  resolution width sigma(E_nu). Units: mbarn / meV per atom (per steradian omitted, as
  for a structure factor).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np
from numpy.typing import NDArray

from simulations.exceptions import InvalidCoefficientsError, StructureError
from simulations.lattice.force_constants import FCBasis
from simulations.lattice.pair_phonons import pair_sum
from simulations.lattice.resolution import EnergyResolution
from simulations.units import FM2_TO_MBARN, HBAR2_OVER_2AMU, K_B_MEV, THZ_TO_MEV, VASP_TO_THZ

__all__ = [
    "CoherentSQE",
    "PhononModes",
    "bose_occupation",
    "mesh_points",
    "scattering_length",
]

logger = logging.getLogger(__name__)

#: Modes below this energy (meV) are left out of the Debye-Waller sum and of S(Q, E).
FREQUENCY_MIN_MEV = 0.01


@lru_cache(maxsize=1)
def _scattering_table() -> dict[str, float]:
    path = resources.files("simulations") / "data" / "scattering_lengths.json"
    data = json.loads(path.read_text())
    return {str(k): float(v) for k, v in data["values"].items()}


def scattering_length(element: str) -> float:
    """Coherent scattering length b_c (fm) of a natural element (Sears 1992).

    Raises
    ------
    StructureError
        For an element missing from the table.
    """
    table = _scattering_table()
    if element not in table:
        raise StructureError(
            f"no coherent scattering length for element {element!r}; pass "
            "scattering_lengths={'El': b_fm} explicitly"
        )
    return table[element]


def mesh_points(n: int) -> NDArray[np.float64]:
    """(n^3, 3) the points of a Gamma-centred ``n x n x n`` mesh of the primitive
    reciprocal cell, r.l.u. in [0, 1)."""
    g = np.arange(n) / n
    return np.asarray(np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3))


def bose_occupation(energy: NDArray[np.float64], temperature: float) -> NDArray[np.float64]:
    """Bose-Einstein occupation n(E, T) of modes of energy ``energy`` (meV) at ``temperature`` K.

    Zero at T = 0; energies at or below zero give zero (no occupation of unstable modes).
    """
    e = np.asarray(energy, dtype=float)
    if temperature <= 0:
        return np.zeros_like(e)
    x = np.where(e > 0, e, np.inf) / (K_B_MEV * temperature)
    return 1.0 / np.expm1(x)


@dataclass(frozen=True, slots=True, kw_only=True)
class PhononModes:
    """Phonon modes at a set of wave vectors.

    Attributes
    ----------
    qpoints
        (n_q, 3) float, primitive r.l.u.
    energies
        (n_q, 3 n_atoms) float, meV, ascending; imaginary modes negative.
    eigenvectors
        (n_q, 3 n_atoms, n_atoms, 3) complex, unit-normalised per mode, Cartesian, in the
        position-phase convention of :meth:`FCBasis.dynamical_basis`.
    """

    qpoints: NDArray[np.float64]
    energies: NDArray[np.float64]
    eigenvectors: NDArray[np.complex128]


class CoherentSQE:
    """Coherent one-phonon S(Q, E) of a crystal for one set of force constants.

    Parameters
    ----------
    basis
        Symmetry-reduced FC basis of the crystal.
    coefficients
        (n_coeff,) float, eV/Angstrom^2.
    temperature
        Sample temperature, K (Bose factor and Debye-Waller factor).
    resolution
        Energy resolution for :meth:`sqe`; ``None`` means 0.5 meV constant.
    scattering_lengths
        Element -> b_c in fm; default from the shipped Sears (1992) table.
    dw_mesh
        Points per axis of the Gamma-centred mesh for the Debye-Waller sum; 0 switches the
        Debye-Waller factor off.
    """

    def __init__(
        self,
        basis: FCBasis,
        coefficients: NDArray[np.float64],
        *,
        temperature: float = 5.0,
        resolution: EnergyResolution | None = None,
        scattering_lengths: dict[str, float] | None = None,
        dw_mesh: int = 12,
    ) -> None:
        if not np.isfinite(temperature) or temperature < 0:
            raise InvalidCoefficientsError(f"temperature must be >= 0 K, got {temperature}")
        self.basis = basis
        self.crystal = basis.crystal
        self.coefficients = basis.check_coefficients(np.asarray(coefficients, dtype=float))
        self.temperature = float(temperature)
        self.resolution = resolution or EnergyResolution.constant(0.5)
        lengths = scattering_lengths or {}
        self.scattering_lengths = np.array(
            [lengths[s] if s in lengths else scattering_length(s) for s in self.crystal.species]
        )
        self._blocks = basis.block_values(self.coefficients)  # (n_blocks, 3, 3)
        pos = self.crystal.positions
        p = basis.pairs
        self._phase_vectors = p[:, 2:5] + pos[p[:, 1]] - pos[p[:, 0]]
        inv_sqrt_m = 1.0 / np.sqrt(self.crystal.masses)
        self._weights = inv_sqrt_m[p[:, 0]] * inv_sqrt_m[p[:, 1]]
        self._to_cartesian = 2.0 * np.pi * np.linalg.inv(self.crystal.lattice).T  # rows b_i
        self.dw_mesh = int(dw_mesh)
        self.debye_waller_tensor = (
            self._debye_waller(self.dw_mesh)
            if self.dw_mesh > 0
            else np.zeros((self.crystal.n_atoms, 3, 3))
        )

    # -- phonons ---------------------------------------------------------------------------

    def dynamical_matrices(self, qpoints: NDArray[np.float64]) -> NDArray[np.complex128]:
        """(n_q, 3N, 3N) complex dynamical matrices (eV/Angstrom^2/amu) at ``qpoints`` (r.l.u.),
        Hermitian: ``sum_pairs w_p exp(2 pi i q . r_p) Phi_p`` into each pair's (i, j) block
        (:func:`simulations.lattice.pair_phonons.pair_sum`), plus the LO-TO
        term of a polar crystal."""
        q = np.atleast_2d(np.asarray(qpoints, dtype=float))
        d = pair_sum(
            q,
            self._phase_vectors,
            self._weights,
            self._blocks,
            self.basis.pairs[:, :2],
            self.crystal.n_atoms,
        )
        if self.basis.nac is not None:  # LO-TO splitting of a polar crystal
            d = d + self.basis.nac.matrices(q)
            d = 0.5 * (d + d.conj().transpose(0, 2, 1))
        return d

    def modes(self, qpoints: NDArray[np.float64], chunk: int = 8192) -> PhononModes:
        """Energies (meV) and eigenvectors at ``qpoints`` ((n_q, 3) r.l.u.), in chunks."""
        q = np.atleast_2d(np.asarray(qpoints, dtype=float))
        n_at = self.crystal.n_atoms
        energies = np.empty((len(q), 3 * n_at))
        vectors = np.empty((len(q), 3 * n_at, n_at, 3), dtype=complex)
        for start in range(0, len(q), chunk):
            sl = slice(start, start + chunk)
            w, v = np.linalg.eigh(self.dynamical_matrices(q[sl]))
            energies[sl] = np.sign(w) * np.sqrt(np.abs(w)) * VASP_TO_THZ * THZ_TO_MEV
            vectors[sl] = v.transpose(0, 2, 1).reshape(-1, 3 * n_at, n_at, 3)
        return PhononModes(qpoints=q, energies=energies, eigenvectors=vectors)

    def _debye_waller(self, mesh: int) -> NDArray[np.float64]:
        """(n_atoms, 3, 3) float, Angstrom^2: the Debye-Waller exponent tensor B_j."""
        m = self.modes(mesh_points(mesh))
        return self.debye_waller_from_modes(m)

    def debye_waller_from_modes(self, m: PhononModes) -> NDArray[np.float64]:
        """Debye-Waller tensors (n_atoms, 3, 3), Angstrom^2, from modes on a full mesh."""
        e = m.energies
        keep = e > FREQUENCY_MIN_MEV
        safe = np.where(keep, e, 1.0)
        if self.temperature > 0:
            x = safe / (2 * K_B_MEV * self.temperature)
            factor = np.where(keep, 1.0 / (safe * np.tanh(x)), 0.0)
        else:
            factor = np.where(keep, 1.0 / safe, 0.0)
        outer = np.einsum(
            "qnja,qnjb->jab", m.eigenvectors * factor[:, :, None, None], m.eigenvectors.conj()
        )
        # hbar^2/(4 M) = HBAR2_OVER_2AMU / (2 M_amu)
        pref = HBAR2_OVER_2AMU / (2.0 * self.crystal.masses * len(e))
        return np.asarray(outer.real * pref[:, None, None])

    # -- structure factors and S(Q, E) ------------------------------------------------------

    def cartesian(self, qpoints: NDArray[np.float64]) -> NDArray[np.float64]:
        """(n, 3) Cartesian Q (1/Angstrom) from primitive r.l.u."""
        return np.atleast_2d(np.asarray(qpoints, dtype=float)) @ self._to_cartesian

    def amplitude_weights(self, q_cart: NDArray[np.float64]) -> NDArray[np.float64]:
        """(n, n_atoms) float: b_j / sqrt(M_j) exp(-W_j(Q)), fm / sqrt(amu)."""
        w = np.einsum("nx,jxy,ny->nj", q_cart, self.debye_waller_tensor, q_cart)
        return np.asarray(
            self.scattering_lengths / np.sqrt(self.crystal.masses) * np.exp(-w), dtype=float
        )

    def structure_factors(
        self, qpoints: NDArray[np.float64]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Mode energies and one-phonon structure factors at ``qpoints`` (r.l.u.).

        Returns
        -------
        energies
            (n_q, 3 n_atoms) float, meV.
        sf
            (n_q, 3 n_atoms) float, mbarn per atom (Euphonic's normalisation); modes at or
            below 0.01 meV (acoustic modes at Gamma, unstable modes) get 0.
        """
        m = self.modes(qpoints)
        q_cart = self.cartesian(m.qpoints)
        return m.energies, self._sf_from(q_cart, m.energies, m.eigenvectors, 0)

    def _sf_from(
        self,
        q_cart: NDArray[np.float64],
        energies: NDArray[np.float64],
        vectors: NDArray[np.complex128],
        phase_g: NDArray[np.float64] | int,
    ) -> NDArray[np.float64]:
        amp = self.amplitude_weights(q_cart)  # (n, N)
        if not isinstance(phase_g, int):
            amp = amp * phase_g
        dot = np.einsum("nvjx,nx->nvj", vectors, q_cart)
        term = np.einsum("nvj,nj->nv", dot, amp)
        keep = energies > FREQUENCY_MIN_MEV
        safe = np.where(keep, energies, 1.0)
        # (hbar^2 / amu) / (2 N E) = HBAR2_OVER_2AMU / (N E)
        sf = np.abs(term) ** 2 * HBAR2_OVER_2AMU / (self.crystal.n_atoms * safe)
        return np.where(keep, sf * FM2_TO_MBARN, 0.0)

    def sqe(
        self, qpoints: NDArray[np.float64], energies: NDArray[np.float64]
    ) -> NDArray[np.float64]:
        """S(Q, E) at ``qpoints`` ((n_q, 3) r.l.u.) and ``energies`` ((n_E,) meV).

        Returns (n_q, n_E) float, mbarn/meV per atom, resolution-broadened, with the Bose
        factor for both energy loss (E > 0) and gain (E < 0).
        """
        e_mode, sf = self.structure_factors(qpoints)
        return self.sqe_from_modes(e_mode, sf, energies)

    def sqe_from_modes(
        self,
        e_mode: NDArray[np.float64],
        sf: NDArray[np.float64],
        energies: NDArray[np.float64],
    ) -> NDArray[np.float64]:
        """Broadened S(Q, E) (n_q, n_E) from mode energies and structure factors (n_q, n_m)."""
        energies = np.asarray(energies, dtype=float)
        return self._line_shapes(e_mode[:, :, None], sf[:, :, None], energies[None, None, :])

    def sqe_at(
        self,
        e_mode: NDArray[np.float64],
        sf: NDArray[np.float64],
        energies: NDArray[np.float64],
    ) -> NDArray[np.float64]:
        """Broadened S(Q, E) (n_q,) at one energy per Q (``energies``, (n_q,) meV), from
        mode energies and structure factors (n_q, n_m): :meth:`sqe_from_modes` point by
        point."""
        energies = np.asarray(energies, dtype=float)
        return self._line_shapes(e_mode, sf, energies[:, None])

    def _line_shapes(
        self,
        e_mode: NDArray[np.float64],
        sf: NDArray[np.float64],
        energies: NDArray[np.float64],
    ) -> NDArray[np.float64]:
        """The modes' (axis 1 of ``e_mode`` and ``sf``) Bose-weighted, resolution-broadened
        lines for energy loss and gain at ``energies`` (broadcast against them), summed
        over the modes."""
        n = bose_occupation(e_mode, self.temperature)
        sigma = self.resolution.sigma(np.abs(e_mode))
        out = 0.0
        for sign, weight in ((1.0, n + 1.0), (-1.0, n)):
            z = (energies - sign * e_mode) / sigma
            g = np.exp(-0.5 * z * z) / (math.sqrt(2 * math.pi) * sigma)
            out = out + np.sum(sf * weight * g, axis=1)
        return np.asarray(out, dtype=np.float64)
