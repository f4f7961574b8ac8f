"""Physical constants and unit conversions: the one home of every factor the project uses.

The project's units are meV (energies), THz (phonon frequencies), Angstrom (lengths),
1/Angstrom (wave vectors), amu (atomic masses), eV/Angstrom^2 (force constants), K
(temperatures), m/s (neutron speeds), fm (scattering lengths) and mbarn (cross-sections).
Every factor below converts between those and is defined once, from ``scipy.constants``
(CODATA 2022 with the pinned scipy 1.17) unless its comment says otherwise; import it from
here, never type the number.

Values that differ from CODATA, or from what a module typed before they were gathered here:

* :data:`VASP_TO_THZ` keeps phonopy's own (CODATA 1986) eV and amu, as it always did, so that
  frequencies agree with phonopy to 1e-15. The FC database typed the rounded ``15.633302``
  (1.9e-8 relative lower); its committed ``min_freq_thz`` values were made with that and
  agree with a recomputation to 3e-7 THz.
* :data:`THZ_TO_MEV` keeps the 10-digit ``4.135667696`` typed throughout (CODATA gives
  4.135667696923859, 2.2e-10 relative higher): with CODATA's value a seeded simulated run is
  no longer byte-identical.
* :data:`K_B_MEV` is CODATA's 0.08617333262 meV/K, which S(Q, E) always used; the figures and
  the offline check typed ``0.0861733`` and use :data:`K_B_MEV` now (their outputs move by
  4e-7 relative at most). The event simulator's energy-gain window and the advisor keep the
  6-digit value, :data:`K_B_MEV_ROUNDED`: there it decides which events a seed draws and how
  orientations rank.
"""

from __future__ import annotations

import math

from scipy import constants as _sc

__all__ = [
    "AMU",
    "BOHR_TO_ANGSTROM",
    "COULOMB_EV_ANGSTROM",
    "E_PER_K2",
    "E_PER_V2",
    "FM2_TO_MBARN",
    "HARTREE_TO_EV",
    "HBAR",
    "HBAR2_OVER_2AMU",
    "K_B_MEV",
    "K_B_MEV_ROUNDED",
    "K_PER_V",
    "MEV",
    "NEUTRON_MASS",
    "RYDBERG_TO_EV",
    "THZ_TO_MEV",
    "VASP_TO_THZ",
]

# --------------------------------------------------------------------------------------------
# SI values (CODATA 2022 via scipy.constants)

#: 1 meV in J (exact: 1.602176634e-22 J).
MEV: float = _sc.milli * _sc.electron_volt
#: Reduced Planck constant hbar, J s (exact: 1.054571817...e-34 J s).
HBAR: float = _sc.hbar
#: Neutron mass, kg (CODATA 2022: 1.67492750056e-27 kg).
NEUTRON_MASS: float = _sc.neutron_mass
#: Atomic mass constant (1 amu), kg (CODATA 2022: 1.66053906892e-27 kg).
AMU: float = _sc.atomic_mass

# --------------------------------------------------------------------------------------------
# Thermal and phonon energies

#: Boltzmann constant k_B, meV / K (exact: 0.08617333262 meV/K; ``k / meV``).
K_B_MEV: float = _sc.k / MEV
#: k_B rounded to 6 digits, meV / K (0.0861733, 3.8e-7 relative below :data:`K_B_MEV`). Kept
#: where that rounding decides something discrete: the energy-gain window of the event
#: simulator (its bin edges, so the events a seed draws: runs stay byte-identical) and the
#: advisor's Bose weights (its ranking of orientations).
K_B_MEV_ROUNDED: float = 0.0861733
#: h * 1 THz in meV: a phonon frequency in THz times this is its energy in meV. CODATA's
#: ``h * 1e12 Hz / meV`` is 4.135667696923859; this 10-digit value (2.2e-10 relative lower) is
#: kept because the mode energies of S(Q, E) set which events a seed draws, so simulated runs
#: stay byte-identical.
THZ_TO_MEV: float = 4.135667696
#: sqrt(eV / Angstrom^2 / amu) / (2 pi) in THz: the frequency (THz) of an eigenvalue (eV/A^2/amu)
#: of a dynamical matrix, ``nu = sqrt(lambda) * VASP_TO_THZ`` (15.633302300230195). Kept with
#: phonopy's own values of eV and amu (1.60217733e-19 J, 1.6605402e-27 kg; phonopy's
#: ``physical_units.DefaultToTHz``) so that frequencies agree with phonopy to 1e-15; with
#: CODATA 2022 it would be 1.2e-7 relative higher.
VASP_TO_THZ: float = math.sqrt(1.60217733e-19 / 1e-20 / 1.6605402e-27) / (2 * math.pi) / 1e12
#: hbar^2 / (2 amu) in meV Angstrom^2 (2.0901...): the recoil energy of 1 amu at 1/Angstrom, the
#: prefactor of one-phonon structure factors and Debye-Waller exponents.
HBAR2_OVER_2AMU: float = HBAR**2 / (2 * AMU) / MEV * 1e20

# --------------------------------------------------------------------------------------------
# Neutron kinematics

#: hbar^2 / (2 m_n) in meV Angstrom^2 (2.0721...): ``E (meV) = E_PER_K2 * k^2`` with ``k`` in
#: 1/Angstrom.
E_PER_K2: float = (HBAR * 1e10) ** 2 / (2 * NEUTRON_MASS) / MEV
#: m_n / 2 in meV / (m/s)^2 (5.227e-6): ``E (meV) = E_PER_V2 * v^2`` with ``v`` in m/s.
E_PER_V2: float = 0.5 * NEUTRON_MASS / MEV
#: m_n / hbar in (1/Angstrom) / (m/s) (1.588e-3): ``k (1/Angstrom) = K_PER_V * v`` (m/s).
K_PER_V: float = NEUTRON_MASS / HBAR * 1e-10

# --------------------------------------------------------------------------------------------
# Cross-sections

#: 1 fm^2 in mbarn (1 barn = 100 fm^2 = 1000 mbarn): a squared scattering length (fm^2) times
#: this is a cross-section in mbarn.
FM2_TO_MBARN: float = 10.0

# --------------------------------------------------------------------------------------------
# Electrostatics and the units of other codes' force constants

#: e^2 / (4 pi epsilon_0) in eV Angstrom (14.39965172592227): the prefactor of the
#: non-analytic (dipole-dipole) term of a dynamical matrix with Born charges in e, volumes in
#: Angstrom^3 and force constants in eV/Angstrom^2. Kept, like :data:`VASP_TO_THZ`, with
#: phonopy's own values (``e mu_0 c^2 / 4 pi`` with its e = 1.60217733e-19 C and mu_0 =
#: 4 pi 1e-7 H/m: its ``Hartree * Bohr``, the ``nac_factor`` of VASP-like units) so that LO-TO
#: splittings agree with phonopy; CODATA 2022 gives 14.399645468..., 4.3e-7 relative lower.
COULOMB_EV_ANGSTROM: float = 1.60217733e-19 * 1e-7 * _sc.c**2 * 1e10
#: 1 bohr in Angstrom (0.529177...).
BOHR_TO_ANGSTROM: float = _sc.physical_constants["Bohr radius"][0] * 1e10
#: 1 hartree in eV (27.2113...).
HARTREE_TO_EV: float = _sc.physical_constants["Hartree energy in eV"][0]
#: 1 rydberg in eV (13.6056...).
RYDBERG_TO_EV: float = HARTREE_TO_EV / 2
