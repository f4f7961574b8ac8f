"""The 1D S(E) of an indirect-geometry spectrometer (VISION/TOSCA-like) from force constants.

A VISION- or TOSCA-like crystal-analyser spectrometer: fixed final energy E_f
(VISION 3.5 meV; TOSCA 3.32 / 3.35 meV back / forward), banks at scattering angles
45 deg (forward) and 135 deg (back), so that ``Q^2 = k_i^2 + k_f^2 - 2 k_i k_f cos
2theta`` is a function of E. The intensity follows AbINS (Dymkowski et al., Physica B
551, 443 (2018); Mantid's "Ab initio calculation of dynamical structure factor"
concept page), as INSPIRED/OCLIMAX do for VISION (Cheng et al., J. Chem. Theory
Comput. 15, 1974 (2019)): the DOS-like, almost-isotropic incoherent approximation.
Per atom ``i`` and mode ``nu`` (each q-point of the mesh weighted 1/N_q)::

    B_nu,i = Re(e e^+) hbar^2 / (2 M_i E_nu) (n_nu + 1)            (Angstrom^2)
    A_i    = sum_nu Re(e e^+) hbar^2 / (2 M_i E_nu) coth(E_nu / 2kT) / N_q
    S^1_i(Q, E) = sigma_i/(4 pi) sum_nu Q^2 Tr B_nu,i / 3 exp(-Q^2 alpha_nu,i) delta(E - E_nu)
    alpha_nu,i = (Tr A_i + 2 B_nu,i : A_i / Tr B_nu,i) / 5
    S^n_i(Q, E) = sigma_i/(4 pi) Q^2n / n! exp(-Q^2 Tr A_i / 3) [b_i * ... * b_i](E)   (n >= 2)
    b_i(E) = sum_nu Tr B_nu,i / 3 delta(E - E_nu)

(fundamentals in the almost-isotropic form, overtones and combinations of order n >= 2
in AbINS' isotropic form, by n-fold self-convolution of b on a fine grid). ``sigma_i``
is the total bound cross section (coherent + incoherent; ``cross_section="incoherent"``
for the incoherent one only) of Sears (1992), :mod:`simulations.lattice.cross_sections`. Energy
loss only (the 1 -> 0 transitions are left out, as AbINS does; negligible at VISION's
5-10 K). Each mode's Q is that of its energy on each bank. The result is Gaussian-
broadened with the instrument's width and averaged over each output bin: VISION
FWHM = 1.25 % of E (Seeger, Daemen and Larese, Nucl. Instrum. Methods A 604, 719
(2009)) with a numerical floor of :data:`MIN_FWHM` meV; TOSCA sigma(E) from ``resins``'
AbINS polynomial. Units: ``(1/N) sum_i sigma_i/(4 pi) S_i``, mbarn / (sr meV) per atom
(multiply by k_f/k_i for the double-differential cross section).

Phonons come from :func:`model_server.prediction.spectra.mesh_modes` (the model's mesh helper with
eigenvectors); cells up to :data:`model_server.prediction.spectra.MAX_ATOMS_DOS` atoms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy.special import ndtr

from model_server.prediction.crystal_fc import CrystalFC
from model_server.prediction.spectra import (
    MAX_ATOMS_DOS,
    SpectraError,
    check_atom_limit,
    mesh_modes,
    resolve_mesh,
)
from simulations.lattice.cross_sections import cross_sections
from simulations.lattice.pair_phonons import MeshPhonons
from simulations.lattice.sqe import FREQUENCY_MIN_MEV, bose_occupation
from simulations.units import E_PER_K2, HBAR2_OVER_2AMU, K_B_MEV, THZ_TO_MEV

__all__ = [
    "INDIRECT_INSTRUMENTS",
    "MIN_FWHM",
    "IndirectInstrument",
    "IndirectSpectrum",
    "indirect_spectrum",
]

#: Numerical floor of the instruments' FWHM, meV (not an instrument property).
MIN_FWHM = 0.05
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


@dataclass(frozen=True, slots=True, kw_only=True)
class IndirectInstrument:
    """A crystal-analyser (indirect-geometry) spectrometer.

    Attributes
    ----------
    name
        ``"VISION"`` or ``"TOSCA"``.
    banks
        Bank names, e.g. ``("forward", "back")``.
    angles
        Scattering angle 2theta of each bank, degrees.
    final_energies
        Final neutron energy of each bank, meV.
    resolution
        Human description of sigma(E) and its source.
    sigma
        sigma(E) in meV for energy transfers E in meV (vectorised).
    """

    name: str
    banks: tuple[str, ...]
    angles: tuple[float, ...]
    final_energies: tuple[float, ...]
    resolution: str
    sigma: Callable[[NDArray[np.float64]], NDArray[np.float64]] = field(repr=False)

    def q(self, energies: NDArray[np.float64]) -> NDArray[np.float64]:
        """(n_banks, n_E) |Q| (1/Angstrom) reached at energy transfer ``energies`` (meV)."""
        e = np.maximum(np.asarray(energies, dtype=float), 0.0)
        rows = []
        for angle, ef in zip(self.angles, self.final_energies, strict=True):
            kf = math.sqrt(ef / E_PER_K2)
            ki = np.sqrt((e + ef) / E_PER_K2)
            q2 = ki * ki + kf * kf - 2.0 * ki * kf * math.cos(math.radians(angle))
            rows.append(np.sqrt(np.maximum(q2, 0.0)))
        return np.stack(rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description."""
        return {
            "name": self.name,
            "banks": list(self.banks),
            "scattering_angles_deg": list(self.angles),
            "final_energies_meV": list(self.final_energies),
            "resolution": self.resolution,
        }


def _vision_sigma(e: NDArray[np.float64]) -> NDArray[np.float64]:
    fwhm = np.maximum(0.0125 * np.abs(np.asarray(e, dtype=float)), MIN_FWHM)
    return np.asarray(fwhm / _FWHM_PER_SIGMA)


def _tosca_sigma(e: NDArray[np.float64]) -> NDArray[np.float64]:
    from resins import Instrument

    model = Instrument.from_default("TOSCA").get_resolution_function("AbINS")
    x = np.abs(np.asarray(e, dtype=float)).ravel()
    s = np.asarray(model.get_characteristics(x[:, None])["sigma"], dtype=float).ravel()
    return np.maximum(s, MIN_FWHM / _FWHM_PER_SIGMA).reshape(np.shape(e))


#: The indirect-geometry instruments by (lower-case) name.
INDIRECT_INSTRUMENTS: dict[str, IndirectInstrument] = {
    "vision": IndirectInstrument(
        name="VISION",
        banks=("forward", "back"),
        angles=(45.0, 135.0),
        final_energies=(3.5, 3.5),
        resolution=f"Gaussian, FWHM = 1.25 % of E (floor {MIN_FWHM} meV); Seeger, Daemen and "
        "Larese, Nucl. Instrum. Methods A 604, 719 (2009)",
        sigma=_vision_sigma,
    ),
    "tosca": IndirectInstrument(
        name="TOSCA",
        banks=("forward", "back"),
        angles=(45.0, 134.98885653282196),
        final_energies=(3.35, 3.32),
        resolution="Gaussian, sigma(E) = 0.31 + 0.005 E + 8.1e-7 E^2 meV (resins 'AbINS' model "
        "of TOSCA: Dymkowski et al., Physica B 551, 443 (2018))",
        sigma=_tosca_sigma,
    ),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class IndirectSpectrum:
    """1D S(E) of an indirect-geometry spectrometer (see the module docstring).

    Attributes
    ----------
    energy_edges
        (n_E + 1,) float, meV, output bins (each value is the bin average).
    by_bank
        (n_banks, n_E) float, mbarn/(sr meV) per atom, all orders.
    by_order
        (n_orders, n_E) float, the same averaged over the banks, order 1 (fundamentals),
        2, ...
    by_element
        (n_elements, n_E) float, the banks' average of each element's atoms (per atom of
        the cell: the elements add up to the total).
    elements
        Element of every row of ``by_element``.
    q
        (n_banks, n_E) |Q| at the bin centres, 1/Angstrom.
    instrument
        The instrument.
    temperature
        K.
    orders
        Highest order computed.
    cross_section
        ``"total"`` (coherent + incoherent) or ``"incoherent"``.
    mesh
        q mesh of the modes.
    left_out_modes
        Mesh modes at or below 0.01 meV, left out (the acoustic ones at Gamma, imaginary
        ones).
    """

    energy_edges: NDArray[np.float64]
    by_bank: NDArray[np.float64]
    by_order: NDArray[np.float64]
    by_element: NDArray[np.float64]
    elements: tuple[str, ...]
    q: NDArray[np.float64]
    instrument: IndirectInstrument
    temperature: float
    orders: int
    cross_section: str
    mesh: tuple[int, int, int]
    left_out_modes: int

    @property
    def energies(self) -> NDArray[np.float64]:
        """(n_E,) bin centres, meV."""
        return np.asarray(0.5 * (self.energy_edges[1:] + self.energy_edges[:-1]))

    @property
    def total(self) -> NDArray[np.float64]:
        """(n_E,) the banks' average, mbarn/(sr meV) per atom."""
        return np.asarray(self.by_bank.mean(axis=0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        ins = self.instrument
        return {
            "description": f"{ins.name}-like indirect-geometry S(E): incoherent approximation "
            f"(AbINS's almost-isotropic fundamentals, isotropic orders up to {self.orders}), "
            f"{self.cross_section} cross sections (Sears 1992), Debye-Waller factors, "
            "average of the banks",
            "units": "mbarn/(sr meV) per atom",
            "instrument": ins.to_dict(),
            "temperature_K": self.temperature,
            "orders": self.orders,
            "cross_section": self.cross_section,
            "mesh": list(self.mesh),
            "left_out_modes": self.left_out_modes,
            "energy_meV": self.energies.tolist(),
            "energy_edges_meV": self.energy_edges.tolist(),
            "total": self.total.tolist(),
            "by_bank": {b: row.tolist() for b, row in zip(ins.banks, self.by_bank, strict=True)},
            "q_inv_angstrom": {b: row.tolist() for b, row in zip(ins.banks, self.q, strict=True)},
            "by_order": {str(k + 1): row.tolist() for k, row in enumerate(self.by_order)},
            "by_element": {
                el: row.tolist() for el, row in zip(self.elements, self.by_element, strict=True)
            },
        }


def _bin_kernel(
    fine: NDArray[np.float64], sigma: NDArray[np.float64], edges: NDArray[np.float64]
) -> NDArray[np.float64]:
    """(n_fine, n_bins): bin average (1/meV) of a unit-area Gaussian at each fine energy."""
    cdf = ndtr((edges[None, :] - fine[:, None]) / sigma[:, None])
    return np.asarray(np.diff(cdf, axis=1) / np.diff(edges)[None, :])


def _split(
    energies: NDArray[np.float64], weights: NDArray[np.float64], step: float, n_fine: int
) -> NDArray[np.float64]:
    """Histogram weights (..., n_modes) onto a fine grid k * step, k = 0..n_fine-1, each
    mode split linearly between its two nearest points; returns (..., n_fine)."""
    x = energies / step
    lo = np.clip(np.floor(x).astype(np.int64), 0, n_fine - 2)
    frac = np.clip(x - lo, 0.0, 1.0)
    lead = weights.shape[:-1]
    flat = weights.reshape(-1, weights.shape[-1])
    out = np.zeros((flat.shape[0], n_fine))
    for r in range(flat.shape[0]):
        out[r] = np.bincount(lo, flat[r] * (1 - frac), minlength=n_fine)[:n_fine]
        out[r] += np.bincount(lo + 1, flat[r] * frac, minlength=n_fine)[:n_fine]
    return out.reshape(*lead, n_fine)


def indirect_spectrum(
    fcs: CrystalFC,
    *,
    temperature: float = 5.0,
    instrument: str | IndirectInstrument = "vision",
    orders: int = 2,
    cross_section: Literal["total", "incoherent"] = "total",
    energy_edges: NDArray[np.float64] | None = None,
    n_energies: int = 800,
    mesh: int | tuple[int, int, int] | None = None,
    modes: MeshPhonons | None = None,
) -> IndirectSpectrum:
    """S(E) of a VISION/TOSCA-like spectrometer in the incoherent approximation.

    Parameters
    ----------
    fcs
        Structure and FCs (at most :data:`MAX_ATOMS_DOS` atoms).
    temperature
        Sample temperature, K (Bose and Debye-Waller factors).
    instrument
        ``"vision"``, ``"tosca"`` or an :class:`IndirectInstrument`.
    orders
        1 (fundamentals only) to 4 (overtones and combinations up to 4 phonons).
    cross_section
        ``"total"`` (coherent + incoherent bound cross sections: the incoherent
        approximation of all scattering) or ``"incoherent"``.
    energy_edges
        (n_E + 1,) output bin edges, meV, increasing; default ``n_energies`` bins from 0 to
        1.05 x ``orders`` x the highest mode (the reach of the highest order).
    mesh, modes
        As for :func:`phonon_dos`.

    Raises
    ------
    SpectraError
        Bad settings or a cell above the atom limit.
    simulations.lattice.cross_sections.UnknownCrossSectionError
        An element without a tabulated cross section.
    """
    check_atom_limit(fcs, MAX_ATOMS_DOS, "indirect-geometry spectrum")
    ins = _resolve_instrument(instrument)
    _check_settings(orders, cross_section, temperature)
    xs = np.array([cross_sections(s) for s in fcs.species])  # (n, 2) barn
    sigma_atom = xs.sum(axis=1) if cross_section == "total" else xs[:, 1]
    if modes is None:
        modes, size = mesh_modes(fcs, mesh)
    else:
        size = resolve_mesh(fcs, mesh)
    terms = _mode_terms(fcs, modes, temperature)
    e_max = float(terms.energies[terms.keep].max(initial=0.0))
    edges = _output_edges(energy_edges, n_energies, orders, e_max)
    top = float(edges[-1])
    sig_top = float(np.max(ins.sigma(np.array([top]))))
    fine_top = top + 6.0 * sig_top
    step = min(0.01, fine_top / 8192)
    n_fine = math.ceil(fine_top / step) + 2
    fine = np.asarray(step * np.arange(n_fine), dtype=np.float64)
    elements = tuple(dict.fromkeys(fcs.species))
    member = np.array([[s == el for s in fcs.species] for el in elements], dtype=float)  # (n_el, n)
    pref = sigma_atom * 1000.0 / (4.0 * math.pi) / fcs.n_atoms  # mbarn/sr per atom of the cell
    fine_w = _fine_weights(terms, ins, int(orders), member, pref, fine, step)
    out = _binned(fine_w, fine, ins.sigma(fine), edges)
    centres = 0.5 * (edges[1:] + edges[:-1])
    return IndirectSpectrum(
        energy_edges=edges,
        by_bank=out.sum(axis=(1, 2)),
        by_order=out.sum(axis=2).mean(axis=0),
        by_element=out.sum(axis=1).mean(axis=0),
        elements=elements,
        q=ins.q(centres),
        instrument=ins,
        temperature=float(temperature),
        orders=int(orders),
        cross_section=cross_section,
        mesh=size,
        left_out_modes=int((~terms.keep).sum()),
    )


def _resolve_instrument(instrument: str | IndirectInstrument) -> IndirectInstrument:
    """The instrument of a name (:data:`INDIRECT_INSTRUMENTS`) or the one given."""
    if not isinstance(instrument, str):
        return instrument
    if instrument.lower() not in INDIRECT_INSTRUMENTS:
        raise SpectraError(
            f"unknown indirect-geometry instrument {instrument!r}; choose from "
            f"{', '.join(INDIRECT_INSTRUMENTS)}"
        )
    return INDIRECT_INSTRUMENTS[instrument.lower()]


def _check_settings(orders: int, cross_section: str, temperature: float) -> None:
    """Raise :class:`SpectraError` for an order, cross section or temperature out of range."""
    if not 1 <= int(orders) <= 4:
        raise SpectraError(f"orders must be 1..4, got {orders}")
    if cross_section not in ("total", "incoherent"):
        raise SpectraError(f"cross_section must be 'total' or 'incoherent', got {cross_section!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise SpectraError(f"temperature must be >= 0 K, got {temperature}")


@dataclass(frozen=True, slots=True, kw_only=True)
class _ModeTerms:
    """The per-atom, per-mode quantities of the module docstring's formulas."""

    energies: NDArray[np.float64]  # (n_q, 3n) mode energies E_nu, meV
    keep: NDArray[np.bool_]  # (n_q, 3n) modes above FREQUENCY_MIN_MEV
    tr_a: NDArray[np.float64]  # (n,) Tr A_i, Angstrom^2
    tr_b: NDArray[np.float64]  # (n_q, n, 3n) Tr B_nu,i, Angstrom^2
    alpha: NDArray[np.float64]  # (n_q, n, 3n) alpha_nu,i, Angstrom^2
    n_q: int  # q-points of the mesh


def _mode_terms(fcs: CrystalFC, modes: MeshPhonons, temperature: float) -> _ModeTerms:
    """A_i, Tr B_nu,i and alpha_nu,i of every atom and mode of the mesh (modes at or below
    :data:`FREQUENCY_MIN_MEV` get zero weight)."""
    n_at = fcs.n_atoms
    n_q = modes.frequencies.shape[0]
    e_all = modes.frequencies * THZ_TO_MEV  # (n_q, 3n)
    keep = e_all > FREQUENCY_MIN_MEV
    v = modes.eigenvectors
    assert v is not None
    c = v.reshape(n_q, n_at, 3, 3 * n_at)  # c[q, i, a, k]
    e_safe = np.where(keep, e_all, 1.0)
    scale = HBAR2_OVER_2AMU / (fcs.masses[None, :, None] * e_safe[:, None, :])  # (n_q, n, 3n)
    scale = np.where(keep[:, None, :], scale, 0.0)
    if temperature > 0:
        coth = 1.0 / np.tanh(e_safe / (2.0 * K_B_MEV * temperature))
    else:
        coth = np.ones_like(e_safe)
    n_occ = bose_occupation(e_safe, temperature)
    # A_i (n, 3, 3): sum over modes of Re(c c^+) hbar^2/(2 M E) coth, per q-point 1/N_q.
    a_tensor = np.einsum("qiak,qibk,qik->iab", c, c.conj(), scale * coth[:, None, :]).real / n_q
    tr_a = np.trace(a_tensor, axis1=1, axis2=2)  # (n,)
    norm2 = (np.abs(c) ** 2).sum(axis=2)  # (n_q, n, 3n) |c_i|^2
    cac = np.einsum("qiak,iab,qibk->qik", c.conj(), a_tensor, c).real
    tr_b = norm2 * scale * (n_occ + 1.0)[:, None, :]  # (n_q, n, 3n), Angstrom^2
    with np.errstate(invalid="ignore", divide="ignore"):
        alpha = (tr_a[None, :, None] + 2.0 * np.where(norm2 > 0, cac / norm2, 0.0)) / 5.0
    return _ModeTerms(energies=e_all, keep=keep, tr_a=tr_a, tr_b=tr_b, alpha=alpha, n_q=n_q)


def _output_edges(
    energy_edges: NDArray[np.float64] | None, n_energies: int, orders: int, e_max: float
) -> NDArray[np.float64]:
    """The output bin edges (meV): those given (checked), or ``n_energies`` bins from 0 to
    1.05 x ``orders`` x ``e_max``."""
    if energy_edges is None:
        top = max(1.0, 1.05 * int(orders) * e_max)
        return np.linspace(0.0, top, int(n_energies) + 1)
    edges = np.asarray(energy_edges, dtype=float).ravel()
    if edges.size < 2 or not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
        raise SpectraError("energy_edges must be at least two increasing numbers of meV")
    if edges[0] < 0:
        raise SpectraError("energy_edges must not be negative (energy loss only)")
    return edges


def _fine_weights(
    terms: _ModeTerms,
    ins: IndirectInstrument,
    orders: int,
    member: NDArray[np.float64],
    pref: NDArray[np.float64],
    fine: NDArray[np.float64],
    step: float,
) -> NDArray[np.float64]:
    """(n_banks, orders, n_elements, n_fine) S on the fine grid, before broadening: the
    fundamentals mode by mode, the orders n >= 2 by n-fold self-convolution of b_i(E).

    ``member`` (n_elements, n) is 1 where an atom is of an element; ``pref`` (n,) is
    sigma_i / (4 pi) per atom of the cell, mbarn/sr."""
    n_fine = len(fine)
    n_banks = len(ins.banks)
    n_elements = member.shape[0]
    fine_w = np.zeros((n_banks, orders, n_elements, n_fine))
    keep, n_q = terms.keep, terms.n_q
    e_modes = np.asarray(terms.energies[keep], dtype=np.float64)  # (n_keep,)
    q_modes = ins.q(e_modes)  # (n_banks, n_keep)
    tr_b_k = terms.tr_b.transpose(1, 0, 2)[:, keep]  # (n, n_keep)
    alpha_k = terms.alpha.transpose(1, 0, 2)[:, keep]  # (n, n_keep)
    for b in range(n_banks):
        q2 = q_modes[b] ** 2  # (n_keep,)
        w1 = pref[:, None] * q2[None, :] * tr_b_k / 3.0 * np.exp(-q2[None, :] * alpha_k) / n_q
        fine_w[b, 0] = member @ _split(e_modes, w1, step, n_fine)
    if orders >= 2:
        from scipy.signal import fftconvolve

        q_fine = ins.q(fine)  # (n_banks, n_fine)
        base = _split(e_modes, tr_b_k / 3.0 / n_q, step, n_fine)  # (n, n_fine) Angstrom^2
        power = base.copy()
        for order in range(2, orders + 1):
            power = np.maximum(fftconvolve(power, base, axes=1)[:, :n_fine], 0.0)
            for b in range(n_banks):
                q2 = q_fine[b] ** 2
                dw = np.exp(-q2[None, :] * terms.tr_a[:, None] / 3.0)
                w = pref[:, None] * q2[None, :] ** order / math.factorial(order) * dw * power
                fine_w[b, order - 1] = member @ w
    return fine_w


def _binned(
    fine_w: NDArray[np.float64],
    fine: NDArray[np.float64],
    sigma_fine: NDArray[np.float64],
    edges: NDArray[np.float64],
) -> NDArray[np.float64]:
    """(..., n_E) the fine-grid weights (..., n_fine) Gaussian-broadened with ``sigma_fine``
    (meV at each fine energy) and averaged over each output bin (only fine points with
    weight are visited, 2048 at a time)."""
    n_fine = fine_w.shape[-1]
    used = np.nonzero(fine_w.reshape(-1, n_fine).any(axis=0))[0]
    out = np.zeros((*fine_w.shape[:-1], len(edges) - 1))
    for start in range(0, len(used), 2048):
        idx = used[start : start + 2048]
        kernel = _bin_kernel(fine[idx], sigma_fine[idx], edges)  # (chunk, n_E)
        out += fine_w[..., idx] @ kernel
    return out
