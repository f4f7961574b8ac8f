"""What a measured S(Q, E) sits on besides the coherent one-phonon signal.

Every component is a function of (|Q|, E) in the units of
:class:`~simulations.lattice.sqe.CoherentSQE`: **mbarn / (sr meV) per atom** (multiply by
``k_f/k_i dOmega dE`` and the flux for counts). |Q| in 1/Angstrom, E in meV (energy
transfer, > 0 loss).

``elastic``
    The incoherent elastic line::

        S_el(Q, E) = (1/N) sum_i sigma_inc,i / (4 pi) exp(-Q^2 <u_i^2>) R(E)

    with ``R`` the instrument's resolution (a unit-area Gaussian of width sigma(0)),
    averaged over each energy bin, and ``<u_i^2>`` the mean-square displacement of atom
    ``i`` along one axis (``2 tr(B_i) / 3`` of the Debye-Waller tensor ``B_i``). The
    coherent elastic (Bragg) scattering of the sample falls on isolated points of a single
    crystal's reciprocal space and is left out; the sample can's powder rings are not
    (``can``).
``multiphonon``
    Incoherent multiphonon scattering of orders 2..``orders`` in the incoherent
    approximation (Sjolander 1958; the isotropic form abINS and OCLIMAX use)::

        S_n(Q, E) = (1/N) sum_i sigma_i / (4 pi) exp(-Q^2 <u_i^2>) Q^(2n) / n! T_i^{*n}(E)
        T_i(E)    = (1/N_q) sum_nu |e_nu,i|^2 / 3  hbar^2 / (2 M_i E_nu)
                    [(n_nu + 1) delta(E - E_nu) + n_nu delta(E + E_nu)]       (A^2 / meV)

    ``T^{*n}`` the n-fold self-convolution (energy gain and loss: detailed balance holds),
    ``sigma_i`` the total bound cross section (coherent + incoherent: the incoherent
    approximation of all multiphonon scattering, as abINS and OCLIMAX make it), each order
    broadened by the instrument's resolution at its energy. ``int T_i dE = <u_i^2>``, so
    the orders n >= 0 sum to ``sigma_i / (4 pi)`` (the test checks both).
``can``
    A sample can of aluminium: the coherent one-phonon *powder* S(|Q|, E) of Al (every
    direction of Q averaged: :func:`simulations.lattice.powder.powder_spectrum`)
    from the shipped Al force constants, plus its elastic scattering (the incoherent line
    and the Debye-Scherrer rings of its powder, Gaussian in |Q| of width ``ring_width``),
    per Al atom, times ``can_atoms``: Al atoms in the beam per sample atom.

The fourth component, a **background flat in time of flight** (a time-independent room
background, per pixel proportional to its solid angle), is an instrument matter:
:meth:`simulations.instrument.events.OrientationSimulator.flat_background`; per unit energy
and after normalisation by ``k_f/k_i dOmega dE`` its intensity goes as ``(E_i - E)^-2``
(``tof_shape``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.special import ndtr

from simulations.exceptions import SimulationError
from simulations.lattice.cross_sections import cross_sections
from simulations.lattice.powder import powder_spectrum
from simulations.lattice.resolution import EnergyResolution
from simulations.lattice.sqe import FREQUENCY_MIN_MEV, CoherentSQE, bose_occupation, mesh_points
from simulations.units import FM2_TO_MBARN, HBAR2_OVER_2AMU

__all__ = [
    "BARN_TO_MBARN",
    "COMPONENTS",
    "Backgrounds",
    "IncoherentScattering",
    "PowderCan",
    "elastic_line",
    "elastic_reach",
    "powder_multiphonon",
    "tof_shape",
]

#: The background components, in the order outputs list them.
COMPONENTS = ("elastic", "multiphonon", "tof_background", "can")
#: 1 barn in mbarn.
BARN_TO_MBARN = 1000.0
#: Resolution widths (at E = 0) the elastic line is taken to reach: the bins below are
#: left out of phonon checks and fits.
ELASTIC_SIGMAS = 4.0
#: Fine energy step of the multiphonon convolutions, meV.
FINE_STEP = 0.1


def elastic_line(
    energies: NDArray[np.float64], sigma: float, bin_width: float | None = None
) -> NDArray[np.float64]:
    """Unit-area Gaussian of width ``sigma`` (meV) at E = 0, 1/meV, averaged over bins of
    ``bin_width`` meV centred on ``energies`` (its value at the centres when None)."""
    e = np.asarray(energies, dtype=float)
    if sigma <= 0:
        raise SimulationError(f"elastic line width must be > 0 meV, got {sigma}")
    if bin_width is None or bin_width <= 0:
        return np.asarray(np.exp(-0.5 * (e / sigma) ** 2) / (math.sqrt(2 * math.pi) * sigma))
    h = 0.5 * bin_width
    return np.asarray((ndtr((e + h) / sigma) - ndtr((e - h) / sigma)) / bin_width)


def elastic_reach(resolution: EnergyResolution) -> float:
    """Energy transfer (meV) up to which the elastic line dominates: :data:`ELASTIC_SIGMAS`
    widths of ``resolution`` at E = 0 (5.2 meV for the ARCS-like instrument at 80 meV)."""
    return ELASTIC_SIGMAS * float(resolution.sigma(np.array(0.0)))


def tof_shape(energies: NDArray[np.float64], ei: float) -> NDArray[np.float64]:
    """Relative intensity of a background flat in time of flight after normalisation by
    ``k_f/k_i dOmega dE``: ``(E_i / (E_i - E))^2`` (1 at E = 0; x3.46 at 37 of 80 meV)."""
    e = np.asarray(energies, dtype=float)
    ef = np.maximum(ei - e, 1e-9)
    return np.asarray((ei / ef) ** 2)


@dataclass(frozen=True, slots=True)
class IncoherentScattering:
    """Incoherent elastic and multiphonon scattering of one crystal (see the module).

    Attributes
    ----------
    u2
        (n_atoms,) <u^2> along one axis, Angstrom^2.
    sigma_inc, sigma_total
        (n_atoms,) bound incoherent and total cross sections, mbarn.
    fine_energies
        (n_fine,) energies of the response functions, meV.
    orders
        (n_orders, n_atoms, n_fine) ``T_i^{*n}`` for n = 2..``max_order``, A^(2n) / meV.
    t1
        (n_atoms, n_fine) the one-phonon response ``T_i``, A^2 / meV.
    """

    u2: NDArray[np.float64]
    sigma_inc: NDArray[np.float64]
    sigma_total: NDArray[np.float64]
    fine_energies: NDArray[np.float64]
    t1: NDArray[np.float64]
    orders: NDArray[np.float64]

    @classmethod
    def from_modes(
        cls,
        model: CoherentSQE,
        energies: NDArray[np.float64],
        eigenvectors: NDArray[np.complex128],
        *,
        max_order: int = 3,
    ) -> IncoherentScattering:
        """From phonons on a full Gamma-centred mesh.

        Parameters
        ----------
        model
            The crystal's S(Q, E): species, masses, temperature and Debye-Waller tensors.
        energies
            (..., n_modes) mode energies, meV, every point of the mesh.
        eigenvectors
            (..., n_modes, n_atoms, 3) complex eigenvectors at the same points.
        max_order
            Highest multiphonon order (2..6).
        """
        if not 2 <= max_order <= 6:
            raise SimulationError(f"multiphonon orders go from 2 to 2..6, got {max_order}")
        crystal = model.crystal
        n_at = crystal.n_atoms
        e = np.asarray(energies, dtype=float).reshape(-1, energies.shape[-1])
        w = (np.abs(eigenvectors) ** 2).sum(axis=-1).reshape(e.shape[0], e.shape[1], n_at)
        keep = e > FREQUENCY_MIN_MEV
        safe = np.where(keep, e, 1.0)
        nb = bose_occupation(safe, model.temperature)
        # weight of each mode on atom i: |e|^2/3 hbar^2/(2 M E), A^2
        amp = (
            w
            / 3.0
            * HBAR2_OVER_2AMU
            / crystal.masses[None, None, :]
            / safe[:, :, None]
            * keep[:, :, None]
            / e.shape[0]
        )
        e_top = max(float(e.max()), 1.0)
        reach = max_order * e_top + 5.0
        n_half = math.ceil(reach / FINE_STEP)
        fine = np.asarray(FINE_STEP * np.arange(-n_half, n_half + 1), dtype=np.float64)
        t1 = np.zeros((n_at, len(fine)))
        for sign, occ in ((1.0, nb + 1.0), (-1.0, nb)):
            # unstable (imaginary) and zero modes carry no weight: put them at E = 0
            idx = np.rint(sign * safe * keep / FINE_STEP).astype(np.int64) + n_half
            for i in range(n_at):
                t1[i] += np.bincount(
                    idx.ravel(), weights=(amp[:, :, i] * occ).ravel(), minlength=len(fine)
                )
        t1 /= FINE_STEP
        orders = []
        cur = t1
        for _ in range(2, max_order + 1):
            nxt = np.empty_like(t1)
            for i in range(n_at):
                full = np.convolve(cur[i], t1[i]) * FINE_STEP
                nxt[i] = full[n_half : n_half + len(fine)]
            orders.append(nxt)
            cur = nxt
        sig = np.array([cross_sections(s) for s in crystal.species]) * BARN_TO_MBARN
        b = model.debye_waller_tensor
        return cls(
            u2=np.asarray(2.0 * np.trace(b, axis1=1, axis2=2) / 3.0),
            sigma_inc=np.asarray(sig[:, 1]),
            sigma_total=np.asarray(sig.sum(axis=1)),
            fine_energies=fine,
            t1=t1,
            orders=np.asarray(orders),
        )

    @property
    def max_order(self) -> int:
        """Highest multiphonon order."""
        return 1 + len(self.orders)

    def elastic(self, q: NDArray[np.float64], line: NDArray[np.float64]) -> NDArray[np.float64]:
        """Incoherent elastic S, mbarn/(sr meV) per atom, shape of ``q`` broadcast with
        ``line``: ``q`` |Q| (1/A), ``line`` the resolution's line shape (1/meV,
        :func:`elastic_line`) at the same energies."""
        q2 = np.asarray(q, dtype=float) ** 2
        total = np.zeros(np.broadcast(q2, line).shape)
        for i in range(len(self.u2)):
            total += self.sigma_inc[i] / (4 * math.pi) * np.exp(-q2 * self.u2[i])
        return np.asarray(total * line / len(self.u2))

    def broadened_orders(
        self, energies: NDArray[np.float64], resolution: EnergyResolution
    ) -> NDArray[np.float64]:
        """(n_orders, n_atoms, n_E) ``T^{*n}`` broadened by the resolution at each energy."""
        e = np.asarray(energies, dtype=float)
        sig = resolution.sigma(np.abs(e))
        z = (e[:, None] - self.fine_energies[None, :]) / sig[:, None]
        kernel = np.exp(-0.5 * z * z) / (math.sqrt(2 * math.pi) * sig[:, None]) * FINE_STEP
        return np.asarray(np.einsum("naf,ef->nae", self.orders, kernel))

    def multiphonon(
        self, q: NDArray[np.float64], broadened: NDArray[np.float64]
    ) -> NDArray[np.float64]:
        """Multiphonon S, mbarn/(sr meV) per atom, (..., n_E).

        ``q``: |Q| (1/A) of shape (..., n_E) (or broadcastable); ``broadened``: the output
        of :meth:`broadened_orders` on the same energies.
        """
        q2 = np.asarray(q, dtype=float) ** 2
        shape = np.broadcast_shapes(q2.shape, broadened.shape[-1:])
        total = np.zeros(shape)
        for i in range(len(self.u2)):
            atom = np.zeros(shape)
            power = q2 * q2 / 2.0  # Q^4 / 2!
            for k in range(len(broadened)):
                n = k + 2
                atom += power * broadened[k, i]
                power = power * q2 / (n + 1)
            total += self.sigma_total[i] / (4 * math.pi) * np.exp(-q2 * self.u2[i]) * atom
        return np.asarray(total / len(self.u2))


def powder_multiphonon(
    model: CoherentSQE,
    q: NDArray[np.float64],
    energies: NDArray[np.float64],
    *,
    mesh: int = 16,
    max_order: int = 3,
) -> NDArray[np.float64]:
    """Multiphonon S (orders 2..``max_order``, incoherent approximation) of a powder of
    ``model``'s crystal on a (|Q|, E) grid, mbarn/(sr meV) per atom, shape (n_Q, n_E).

    Parameters
    ----------
    model
        The crystal's S(Q, E) (force constants, temperature, energy resolution).
    q
        (n_Q,) |Q|, 1/A.
    energies
        (n_E,) energy transfers, meV.
    mesh
        Points per axis of the Gamma-centred q mesh of the phonons.

    Raises
    ------
    SimulationError
        The lattice is unstable (an imaginary mode on the mesh).
    """
    modes = model.modes(mesh_points(mesh))
    if not np.all(modes.energies[:, 3:] > 0):
        raise SimulationError("the multiphonon of a powder needs a stable lattice")
    inc = IncoherentScattering.from_modes(
        model, modes.energies, modes.eigenvectors, max_order=max_order
    )
    e = np.asarray(energies, dtype=float)
    qq = np.asarray(q, dtype=float)
    broad = inc.broadened_orders(e, model.resolution)
    return inc.multiphonon(np.broadcast_to(qq[:, None], (len(qq), len(e))), broad)


@dataclass(frozen=True, slots=True)
class PowderCan:
    """An aluminium can's powder S(|Q|, E) per Al atom on a (|Q|, E) table.

    Attributes
    ----------
    q
        (n_Q,) |Q| of the table, 1/A (uniform).
    energies
        (n_E,) energies of the table, meV.
    sqe
        (n_Q, n_E) coherent one-phonon powder S plus the incoherent multiphonon, mbarn/(sr
        meV) per Al atom.
    rings
        (n_rings, 2): |G| (1/A) and the integrated Debye-Scherrer intensity of each ring,
        mbarn/sr per Al atom x 1/A (Q-integrated).
    sigma_inc, u2
        Al's incoherent cross section (mbarn) and <u^2> (A^2).
    """

    q: NDArray[np.float64]
    energies: NDArray[np.float64]
    sqe: NDArray[np.float64]
    rings: NDArray[np.float64]
    sigma_inc: float
    u2: float

    @classmethod
    def build(
        cls,
        model: CoherentSQE,
        *,
        q_max: float,
        energies: NDArray[np.float64],
        q_step: float = 0.05,
        n_directions: int = 96,
        seed: int = 0,
        incoherent: IncoherentScattering | None = None,
    ) -> PowderCan:
        """Tabulate the powder average of ``model`` (Al) up to ``q_max`` (1/A)."""
        q = np.asarray(q_step * np.arange(1, math.ceil(q_max / q_step) + 1), dtype=np.float64)
        e = np.asarray(energies, dtype=float)
        table = powder_spectrum(model, q, e, directions=n_directions, seed=seed)
        if incoherent is not None:
            broad = incoherent.broadened_orders(e, model.resolution)
            table += incoherent.multiphonon(q[:, None], broad)
        crystal = model.crystal
        b = model.scattering_lengths  # fm
        rings = _debye_scherrer(crystal.lattice, crystal.positions, b, q_max + 0.5)
        u2 = float(2.0 * np.trace(model.debye_waller_tensor[0]) / 3.0)
        if len(rings):
            rings[:, 1] *= np.exp(-(rings[:, 0] ** 2) * u2) / crystal.n_atoms
        sig_inc = float(np.mean([cross_sections(s)[1] for s in crystal.species])) * BARN_TO_MBARN
        return cls(q=q, energies=e, sqe=table, rings=rings, sigma_inc=sig_inc, u2=u2)

    def inelastic(self, q: NDArray[np.float64], ie: NDArray[np.int64] | None = None) -> NDArray:
        """Table value at |Q| ``q`` (..., n_E) on the table's energies (linear in |Q|)."""
        qq = np.asarray(q, dtype=float)
        x = np.clip((qq - self.q[0]) / (self.q[1] - self.q[0]), 0.0, len(self.q) - 1.0)
        lo = np.minimum(x.astype(np.int64), len(self.q) - 2)
        t = x - lo
        cols = np.arange(qq.shape[-1]) if ie is None else ie
        return np.asarray((1 - t) * self.sqe[lo, cols] + t * self.sqe[lo + 1, cols])

    def elastic(
        self, q: NDArray[np.float64], line: NDArray[np.float64], ring_width: float
    ) -> NDArray[np.float64]:
        """Elastic S per Al atom (incoherent line + powder rings), mbarn/(sr meV)."""
        qq = np.asarray(q, dtype=float)
        total = self.sigma_inc / (4 * math.pi) * np.exp(-(qq**2) * self.u2)
        for g, integral in self.rings:
            z = (qq - g) / ring_width
            total = total + integral * np.exp(-0.5 * z * z) / (math.sqrt(2 * math.pi) * ring_width)
        return np.asarray(total * line)


@dataclass(frozen=True, slots=True)
class Backgrounds:
    """Which components a simulation or a prediction includes, and their sizes.

    Attributes
    ----------
    elastic, multiphonon
        Include the incoherent elastic line and the multiphonon orders 2..``orders``.
    can
        Include an aluminium can with ``can_atoms`` Al atoms in the beam per sample atom.
    orders
        Highest multiphonon order.
    can_atoms
        Al atoms per sample atom in the beam (a 0.5 mm wall around a 5 mm crystal: ~0.2).
    ring_width
        Gaussian |Q| width of the can's powder rings, 1/A.
    """

    elastic: bool = True
    multiphonon: bool = True
    can: bool = False
    orders: int = 3
    can_atoms: float = 0.2
    ring_width: float = 0.03

    @classmethod
    def none(cls) -> Backgrounds:
        """One-phonon scattering only."""
        return cls(elastic=False, multiphonon=False, can=False)

    @classmethod
    def parse(cls, spec: str) -> Backgrounds:
        """From a comma-separated list: ``elastic,multiphonon,can``, ``none`` or ``all``."""
        words = {w.strip().lower() for w in spec.split(",") if w.strip()}
        if words in ({"none"}, set()):
            return cls.none()
        if words == {"all"}:
            return cls(can=True)
        unknown = words - {"elastic", "multiphonon", "can"}
        if unknown:
            raise SimulationError(
                f"unknown background component(s) {', '.join(sorted(unknown))}: choose from "
                "elastic, multiphonon, can (or none, all)"
            )
        return cls(
            elastic="elastic" in words, multiphonon="multiphonon" in words, can="can" in words
        )

    @property
    def any(self) -> bool:
        """Whether any sample component besides the one-phonon signal is on."""
        return self.elastic or self.multiphonon or self.can

    @property
    def names(self) -> tuple[str, ...]:
        """The components that are on."""
        on = {"elastic": self.elastic, "multiphonon": self.multiphonon, "can": self.can}
        return tuple(k for k, v in on.items() if v)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready description."""
        return {
            "components": list(self.names),
            "multiphonon_orders": self.orders,
            "can_al_atoms_per_sample_atom": self.can_atoms if self.can else 0.0,
            "can_ring_width_inv_angstrom": self.ring_width,
        }


def _debye_scherrer(
    lattice: NDArray[np.float64],
    positions: NDArray[np.float64],
    b_fm: NDArray[np.float64],
    q_max: float,
) -> NDArray[np.float64]:
    """(n_rings, 2): |G| and the Q-integrated powder elastic S of each ring, mbarn/sr x 1/A
    per cell (divide by the atoms per cell): ``(2 pi)^3 / V sum_G |F_G|^2 / (4 pi G^2)``."""
    recip = 2 * math.pi * np.linalg.inv(lattice).T  # rows b_i
    volume = abs(float(np.linalg.det(lattice)))
    n = math.ceil(q_max / min(np.linalg.norm(recip, axis=1))) + 1
    r = np.arange(-n, n + 1)
    hkl = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    g = hkl @ recip
    gn = np.linalg.norm(g, axis=1)
    keep = (gn > 1e-9) & (gn <= q_max)
    hkl, gn = hkl[keep], gn[keep]
    f = (b_fm[None, :] * np.exp(2j * math.pi * hkl @ positions.T)).sum(axis=1)
    f2 = np.abs(f) ** 2 * FM2_TO_MBARN  # mbarn
    key = np.round(gn, 6)
    _, inv = np.unique(key, return_inverse=True)
    weight = np.bincount(inv, weights=f2)
    shells = np.bincount(inv, weights=gn) / np.bincount(inv)
    integral = (2 * math.pi) ** 3 / volume * weight / (4 * math.pi * shells**2)
    out = np.stack([shells, integral], axis=1)
    return np.asarray(out[integral > 1e-12 * max(float(integral.max(initial=0.0)), 1e-300)])
