"""Spectra from per-pair force constants (model_server.prediction.spectra,
model_server.prediction.indirect,
model_server.prediction.crystal_fc): DOS against phonopy, the indirect-geometry S(E) against the
closed form of an Einstein crystal, the direct path against the symmetry-reduced basis."""

from __future__ import annotations

import json
import math
from importlib import resources

import numpy as np
import pytest

from model_server.prediction.crystal_fc import CrystalFC, FCInputError, project_onto_basis
from model_server.prediction.indirect import (
    INDIRECT_INSTRUMENTS,
    IndirectInstrument,
    indirect_spectrum,
)
from model_server.prediction.predict import powder_spectrum
from model_server.prediction.spectra import (
    MAX_ATOMS_DOS,
    SpectraError,
    cosine_similarity,
    default_mesh,
    mesh_for,
    phonon_dos,
    powder_from_fc,
)
from simulations.fcdb.reference import resolve_fc
from simulations.lattice.cross_sections import (
    SEARS_1992,
    UnknownCrossSectionError,
    cross_sections,
)
from simulations.lattice.materials import setup
from simulations.lattice.phonopy_export import to_phonopy
from simulations.lattice.resolution import EnergyResolution
from simulations.lattice.sqe import CoherentSQE, bose_occupation
from simulations.units import E_PER_K2, HBAR2_OVER_2AMU, K_B_MEV, THZ_TO_MEV, VASP_TO_THZ


@pytest.fixture(scope="module")
def ge_fc(ge) -> CrystalFC:  # type: ignore[no-untyped-def]
    """Ge's raman set (5 shells) as per-pair blocks."""
    _, c = resolve_fc("Ge", "raman", ge)
    return CrystalFC.from_basis(ge.basis, c)


@pytest.fixture(scope="module")
def gesi_fc(ge_fc: CrystalFC) -> CrystalFC:
    """Ge's FCs with atom 1 made Si (a zinc-blende toy: same FCs, two masses)."""
    return CrystalFC.from_arrays([32, 14], ge_fc.lattice, ge_fc.frac, ge_fc.pairs, ge_fc.fc)


def _einstein(k: float = 3.0) -> CrystalFC:
    """fcc Al with only a self term k I (eV/A^2): every mode at hbar sqrt(k/M)."""
    lat = 4.05 / 2 * np.array([[0.0, 1, 1], [1, 0, 1], [1, 1, 0]])
    return CrystalFC.from_arrays([13], lat, [[0, 0, 0]], [[0, 0, 0, 0, 0]], [k * np.eye(3)])


def _phonopy_dos(fcs: CrystalFC, mesh: int, sigma_mev: float, thz: np.ndarray):  # type: ignore[no-untyped-def]
    ph = to_phonopy(fcs.basis(), np.ones(1))
    ph.run_mesh([mesh] * 3, is_gamma_center=True, with_eigenvectors=True, is_mesh_symmetry=False)
    pitch = float(thz[1] - thz[0])
    ph.run_total_dos(
        sigma=sigma_mev / THZ_TO_MEV, freq_min=thz[0], freq_max=thz[-1], freq_pitch=pitch
    )
    ph.run_projected_dos(
        sigma=sigma_mev / THZ_TO_MEV, freq_min=thz[0], freq_max=thz[-1], freq_pitch=pitch
    )
    return ph.total_dos, ph.projected_dos


def test_dos_matches_phonopy(gesi_fc: CrystalFC) -> None:
    """Total and per-atom DOS against phonopy's for the same FCs, mesh and Gaussian
    (phonopy: states/THz; ours states/meV)."""
    dos = phonon_dos(gesi_fc, mesh=11, sigma=0.4, n_energies=300)
    total, projected = _phonopy_dos(gesi_fc, 11, 0.4, dos.thz)
    n = min(len(total.frequency_points), len(dos.thz))
    np.testing.assert_allclose(total.frequency_points[:n], dos.thz[:n], atol=1e-9)
    assert cosine_similarity(total.dos[:n], dos.total_per_thz[:n]) > 0.99
    # Both are the same Gaussian sum: agreement to round-off, not just in shape.
    np.testing.assert_allclose(dos.total_per_thz[:n], total.dos[:n], atol=1e-6 * total.dos.max())
    for atom in range(2):
        pdos = dos.partial[atom] * THZ_TO_MEV
        assert cosine_similarity(projected.projected_dos[atom][:n], pdos[:n]) > 0.99
    # normalisation: 3 n states per cell, 3 per atom; elements add up to the total
    de = float(dos.energies[1] - dos.energies[0])
    assert float(dos.total.sum() * de) == pytest.approx(6.0, rel=1e-3)
    np.testing.assert_allclose(dos.partial.sum(axis=1) * de, [3.0, 3.0], rtol=1e-3)
    assert dos.elements == ("Ge", "Si")
    np.testing.assert_allclose(dos.by_element.sum(axis=0), dos.total, rtol=1e-12)
    # the lighter Si carries more of the high-energy (optical) weight
    top = dos.energies > 0.8 * dos.energies.max()
    assert dos.partial[1][top].sum() > dos.partial[0][top].sum()
    doc = dos.to_dict()
    assert set(doc["by_element"]) == {"Ge", "Si"}
    assert doc["units"] == "states/meV per primitive cell"
    assert doc["stable"] is True


def test_dos_mean_energy_and_mesh(ge_fc: CrystalFC) -> None:
    dos = phonon_dos(ge_fc, mesh=(6, 7, 8), sigma=0.5)
    assert dos.mesh == (6, 7, 8)
    assert 20.0 < dos.mean_energy < 30.0  # Ge: acoustic ~10 meV, optical ~37 meV
    assert dos.max_frequency_thz == pytest.approx(9.0, abs=0.1)  # the raman set's 9 THz
    # the default mesh: ceil(|b| / 0.12 1/A) (|b| = 2 pi sqrt(3) / a = 1.92 1/A) refined
    # to ~30000 points for 2 atoms
    assert mesh_for(ge_fc.lattice) == (17, 17, 17)
    assert default_mesh(ge_fc) == (31, 31, 31)
    with pytest.raises(SpectraError, match="positive"):
        phonon_dos(ge_fc, mesh=4, sigma=0.0)
    with pytest.raises(SpectraError, match=r"1\.\.200"):
        phonon_dos(ge_fc, mesh=(4, 4))


def test_atom_limit_is_stated() -> None:
    n = MAX_ATOMS_DOS + 1
    lat = np.diag([4.0 * n, 4.0, 4.0])
    frac = np.column_stack([np.arange(n) / n, np.zeros(n), np.zeros(n)])
    fcs = CrystalFC.from_arrays([13] * n, lat, frac, np.zeros((0, 5)), np.zeros((0, 3, 3)))
    with pytest.raises(SpectraError, match=rf"has {n} atoms.*at most {MAX_ATOMS_DOS}"):
        phonon_dos(fcs)
    with pytest.raises(SpectraError, match=rf"has {n} atoms"):
        indirect_spectrum(fcs)


def test_einstein_crystal_indirect_spectrum_closed_form() -> None:
    """Every mode at E0: S^n integrates to sigma/(4 pi) Q^2n / n! (u (n+1))^n exp(-Q^2 a),
    u = hbar^2 / (2 M E0), a = u coth(E0 / 2kT), Q of n E0 on each bank (module docstring)."""
    fcs = _einstein(3.0)
    m = float(fcs.masses[0])
    e0 = math.sqrt(3.0 / m) * VASP_TO_THZ * THZ_TO_MEV
    sigma = 1000.0 * sum(cross_sections("Al")) / (4 * math.pi)  # mbarn/sr
    ins = INDIRECT_INSTRUMENTS["vision"]
    for temperature in (5.0, 300.0):
        spec = indirect_spectrum(fcs, mesh=2, temperature=temperature, orders=3)
        width = np.diff(spec.energy_edges)
        n_occ = float(bose_occupation(np.array([e0]), temperature)[0])
        u = HBAR2_OVER_2AMU / (m * e0)
        a = u / math.tanh(e0 / (2 * K_B_MEV * temperature))
        for order in (1, 2, 3):
            q = ins.q(np.array([order * e0]))[:, 0]  # (n_banks,)
            expected = sigma * q ** (2 * order) / math.factorial(order) * (u * (n_occ + 1)) ** order
            expected = float(np.mean(expected * np.exp(-(q**2) * a)))
            got = float((spec.by_order[order - 1] * width).sum())
            assert got == pytest.approx(expected, rel=1e-5), (temperature, order)
        # the fundamental: one Gaussian at E0 with FWHM 1.25 % of E0 (bin-averaged)
        fund = spec.by_order[0]
        centre = float((fund * width * spec.energies).sum() / (fund * width).sum())
        assert centre == pytest.approx(e0, abs=1e-3)
        var = float((fund * width * (spec.energies - centre) ** 2).sum() / (fund * width).sum())
        fwhm = math.sqrt(var) * 2 * math.sqrt(2 * math.log(2))
        assert fwhm == pytest.approx(0.0125 * e0, rel=0.05)  # + the bin width's share
    # hotter sample: more phonons created (n + 1) but a larger Debye-Waller exponent
    cold = indirect_spectrum(fcs, mesh=2, temperature=5.0, orders=1)
    hot = indirect_spectrum(fcs, mesh=2, temperature=300.0, orders=1)
    assert hot.total.sum() > cold.total.sum()


def test_indirect_spectrum_of_ge(ge_fc: CrystalFC, gesi_fc: CrystalFC) -> None:
    spec = indirect_spectrum(gesi_fc, mesh=9, orders=2)
    width = np.diff(spec.energy_edges)
    assert spec.instrument.name == "VISION"
    assert spec.left_out_modes == 3  # the acoustic modes at Gamma
    # elements and orders add up to the banks' average
    np.testing.assert_allclose(spec.by_element.sum(axis=0), spec.total, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(spec.by_order.sum(axis=0), spec.total, rtol=1e-10, atol=1e-14)
    # kinematics: Q^2 = ki^2 + kf^2 - 2 ki kf cos(2 theta), E_f 3.5 meV
    e = spec.energies[100]
    ki, kf = math.sqrt((e + 3.5) / E_PER_K2), math.sqrt(3.5 / E_PER_K2)
    for bank, angle in enumerate((45.0, 135.0)):
        q2 = ki * ki + kf * kf - 2 * ki * kf * math.cos(math.radians(angle))
        assert spec.q[bank, 100] == pytest.approx(math.sqrt(q2), rel=1e-12)
    # the back bank sees larger Q: more intensity at low E, stronger Debye-Waller at high E
    assert (spec.by_bank[1] * width).sum() > (spec.by_bank[0] * width).sum()
    # two-phonon weight lies between the lowest and twice the highest mode
    e_max = phonon_dos(gesi_fc, mesh=9).max_frequency_thz * THZ_TO_MEV
    second = spec.by_order[1]
    assert second[spec.energies > 2.05 * e_max].max(initial=0.0) < 1e-6 * second.max()
    assert second.max() < spec.by_order[0].max()
    # incoherent only: Ge's and Si's incoherent cross sections are tiny
    inc = indirect_spectrum(gesi_fc, mesh=9, orders=1, cross_section="incoherent")
    assert inc.total.sum() < 0.05 * spec.by_order[0].sum()
    tosca = indirect_spectrum(ge_fc, mesh=9, orders=1, instrument="tosca")
    assert tosca.instrument.final_energies == (3.35, 3.32)
    doc = spec.to_dict()
    assert set(doc["by_bank"]) == {"forward", "back"}
    assert doc["units"] == "mbarn/(sr meV) per atom"
    json.dumps(doc)


def test_indirect_settings_are_checked(ge_fc: CrystalFC) -> None:
    with pytest.raises(SpectraError, match="vision, tosca"):
        indirect_spectrum(ge_fc, mesh=3, instrument="iris")
    with pytest.raises(SpectraError, match=r"1\.\.4"):
        indirect_spectrum(ge_fc, mesh=3, orders=5)
    with pytest.raises(SpectraError, match="increasing"):
        indirect_spectrum(ge_fc, mesh=3, energy_edges=np.array([5.0, 1.0]))
    fake = IndirectInstrument(
        name="flat",
        banks=("b",),
        angles=(90.0,),
        final_energies=(4.0,),
        resolution="1 meV",
        sigma=lambda e: np.full(np.shape(e), 1.0),
    )
    spec = indirect_spectrum(ge_fc, mesh=5, orders=1, instrument=fake)
    assert spec.by_bank.shape[0] == 1
    tc = CrystalFC.from_arrays([43], np.eye(3) * 3, [[0, 0, 0]], [[0, 0, 0, 0, 0]], [np.eye(3)])
    with pytest.raises(UnknownCrossSectionError, match="'Tc'"):
        indirect_spectrum(tc, mesh=2)


def test_cross_sections_agree_with_the_coherent_lengths() -> None:
    """sigma_coh = 4 pi b_c^2 (1 barn = 100 fm^2) between the two Sears transcriptions."""
    path = resources.files("simulations") / "data" / "scattering_lengths.json"
    lengths = json.loads(path.read_text())["values"]
    checked = 0
    for el, (coh, inc) in SEARS_1992.items():
        assert inc >= 0
        b = lengths[el]
        # Gd: b_c = 6.5 - 13.82i fm, the table keeps Re b (Eu is within 5 %)
        if abs(b) > 1.0 and el != "Gd":
            assert coh == pytest.approx(4 * math.pi * b * b / 100.0, rel=0.05), el
            checked += 1
    assert checked > 70
    assert SEARS_1992["H"][1] == pytest.approx(80.26)  # the incoherent giant
    assert SEARS_1992["V"][1] == pytest.approx(5.08)


def test_direct_path_powder_equals_the_basis(ge, ge_fc: CrystalFC) -> None:  # type: ignore[no-untyped-def]
    """The per-pair blocks as a one-coefficient basis give the same S(Q, E) as the
    symmetry-reduced basis they came from."""
    _, c = resolve_fc("Ge", "raman", ge)
    res = EnergyResolution.constant(0.8, e_max=60.0)
    q = np.array([1.5, 3.0, 4.5])
    e = np.linspace(1.0, 40.0, 40)
    ref = powder_spectrum(
        CoherentSQE(ge.basis, c, temperature=50.0, resolution=res), q, e, directions=16
    )
    direct = powder_from_fc(ge_fc, q, e, temperature=50.0, resolution=res, directions=16)
    np.testing.assert_allclose(direct, ref, rtol=1e-9, atol=1e-12 * ref.max())
    assert ref.max() > 0


def test_crystal_fc_checks_and_symmetry(ge, ge_fc: CrystalFC) -> None:  # type: ignore[no-untyped-def]
    assert ge_fc.asr_residual() < 1e-12
    assert ge_fc.symmetry_residual() < 1e-12
    rng = np.random.default_rng(0)
    noisy = CrystalFC.from_arrays(
        ge_fc.numbers,
        ge_fc.lattice,
        ge_fc.frac,
        ge_fc.pairs,
        ge_fc.fc + 1e-3 * rng.normal(size=ge_fc.fc.shape),
    )
    assert noisy.symmetry_residual() > 1e-4
    # projection: the coefficients come back; fewer shells cut bonds (truncated > 0)
    _, c = resolve_fc("Ge", "raman", ge)
    proj = project_onto_basis(ge_fc, ge.basis)
    np.testing.assert_allclose(proj.coefficients, c, atol=1e-12)
    assert proj.residual < 1e-12
    assert proj.truncated == 0.0
    assert project_onto_basis(noisy, ge.basis).residual > 1e-4
    three = setup("Ge", shells=3)
    assert project_onto_basis(ge_fc, three.basis).truncated > 1e-3
    assert ge_fc.crystal().spacegroup == "Fd-3m"
    bad = [
        ([32], ge_fc.lattice, ge_fc.frac, ge_fc.pairs, ge_fc.fc, "frac"),
        ([32, 32], ge_fc.lattice, ge_fc.frac, ge_fc.pairs[:, :4], ge_fc.fc, "pairs must be"),
        ([32, 32], ge_fc.lattice, ge_fc.frac, ge_fc.pairs + 5, ge_fc.fc, "outside"),
        ([32, 32], ge_fc.lattice, ge_fc.frac, ge_fc.pairs, ge_fc.fc * np.nan, "NaN"),
        ([32, 32], np.zeros((3, 3)), ge_fc.frac, ge_fc.pairs, ge_fc.fc, "degenerate"),
        ([32, 999], ge_fc.lattice, ge_fc.frac, ge_fc.pairs, ge_fc.fc, "not an element"),
    ]
    for numbers, lat, frac, pairs, fc, message in bad:
        with pytest.raises(FCInputError, match=message):
            CrystalFC.from_arrays(numbers, lat, frac, pairs, fc)
