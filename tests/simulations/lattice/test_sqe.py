"""Full S(Q, E): cross-check against Euphonic (in a subprocess) and physical sanity checks."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simulations.fcdb.reference import resolve_fc
from simulations.lattice.phonopy_export import write_phonopy_params
from simulations.lattice.resolution import EnergyResolution
from simulations.lattice.sqe import CoherentSQE, bose_occupation, scattering_length
from simulations.units import K_B_MEV

SCRIPT = Path(__file__).parent / "euphonic_reference.py"
LENGTHS = {"Ge": 8.185, "Nb": 7.054, "Al": 3.449}


def _euphonic(tmp_path: Path, ms, coefficients, q, dw_q, temperature) -> dict:  # type: ignore[no-untyped-def]
    params = write_phonopy_params(ms.basis, coefficients, tmp_path / "ph")
    inp, out = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(
        inp,
        phonopy_params=np.array(str(params)),
        qpoints=q,
        dw_qpoints=dw_q,
        temperature=temperature,
        scattering_lengths=np.array(json.dumps(LENGTHS)),
    )
    # Euphonic's C extension and torch's OpenMP do not share a process: run it apart.
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(inp), str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


def _grouped(energies: np.ndarray, sf: np.ndarray, tol: float = 1e-3) -> list[np.ndarray]:
    """Sum structure factors over (near-)degenerate modes, per Q: list of per-Q arrays."""
    out = []
    for e, s in zip(energies, sf, strict=True):
        cuts = np.nonzero(np.diff(e) > tol)[0] + 1
        out.append(np.array([g.sum() for g in np.split(s, cuts)]))
    return out


@pytest.mark.skipif(importlib.util.find_spec("euphonic") is None, reason="needs euphonic")
@pytest.mark.parametrize(("material", "fc"), [("Ge", "raman"), ("Nb", "mlff_mean")])
def test_structure_factors_match_euphonic_for_1000_random_q(
    request: pytest.FixtureRequest, tmp_path: Path, material: str, fc: str
) -> None:
    """Reference: Euphonic 2.1.1 on the phonopy export of the same FCs, 300 K, same DW mesh."""
    ms = request.getfixturevalue(material.lower())
    _, c = resolve_fc(material, fc, ms)
    temperature = 300.0
    model = CoherentSQE(ms.basis, c, temperature=temperature, dw_mesh=8, scattering_lengths=LENGTHS)
    rng = np.random.default_rng(3)
    q = rng.uniform(-3.0, 3.0, size=(1000, 3))
    g = np.arange(8) / 8
    dw_q = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    ref = _euphonic(tmp_path, ms, c, q, dw_q, temperature)

    energies, sf = model.structure_factors(q)
    # Frequencies: phonopy's (older) unit constants vs Euphonic's CODATA 2018 differ by 1.2e-7.
    np.testing.assert_allclose(energies, ref["frequencies_meV"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        model.debye_waller_tensor, ref["debye_waller_A2"], rtol=1e-5, atol=1e-12
    )
    ours = _grouped(energies, sf)
    theirs = _grouped(ref["frequencies_meV"], ref["structure_factors_mbarn"])
    worst = 0.0
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        floor = 1e-9 * max(b.max(), 1e-30)
        big = b > floor
        worst = max(worst, float(np.max(np.abs(a[big] - b[big]) / b[big])))
        np.testing.assert_allclose(a[~big], b[~big], atol=1e-3 * max(b.max(), 1e-30))
    assert worst <= 1e-3, worst
    n = bose_occupation(energies, temperature)
    np.testing.assert_allclose(n, ref["bose_occupation"], rtol=1e-5, atol=1e-12)


def test_scattering_lengths_table() -> None:
    for el, b in LENGTHS.items():
        assert scattering_length(el) == pytest.approx(b)
    with pytest.raises(ValueError, match="no coherent scattering length"):
        scattering_length("Xx")


def test_sqe_integrates_to_structure_factors_and_detailed_balance(ge) -> None:  # type: ignore[no-untyped-def]
    """Integral over E of the broadened S equals sum sf (n+1) + sf n; S(-E) = exp(-E/kT) S(E)."""
    _, c = resolve_fc("Ge", "raman", ge)
    model = CoherentSQE(ge.basis, c, temperature=300.0)
    q = np.array([[0.3, 0.1, 1.7], [1.1, -0.4, 0.2]])
    e = np.linspace(-80, 80, 16001)
    s = model.sqe(q, e)
    energies, sf = model.structure_factors(q)
    n = bose_occupation(energies, 300.0)
    expect = (sf * (2 * n + 1)).sum(axis=1)
    np.testing.assert_allclose(np.trapezoid(s, e, axis=1), expect, rtol=1e-6)
    # detailed balance at a mode energy, where broadening does not mix loss and gain
    model0 = CoherentSQE(ge.basis, c, temperature=300.0, resolution=EnergyResolution.constant(0.02))
    kt = 300.0 * K_B_MEV
    e_mode = energies[0, -1]
    pos, neg = model0.sqe(q[:1], np.array([e_mode, -e_mode]))[0]
    assert neg / pos == pytest.approx(np.exp(-e_mode / kt), rel=1e-6)


def test_debye_waller_has_cubic_site_symmetry_and_grows_with_temperature(ge) -> None:  # type: ignore[no-untyped-def]
    _, c = resolve_fc("Ge", "raman", ge)
    cold = CoherentSQE(ge.basis, c, temperature=5.0).debye_waller_tensor
    hot = CoherentSQE(ge.basis, c, temperature=300.0).debye_waller_tensor
    for b in (cold, hot):
        np.testing.assert_allclose(b[0], np.eye(3) * b[0, 0, 0], atol=1e-12)
    assert hot[0, 0, 0] > 1.5 * cold[0, 0, 0]
    # Ge at 300 K: U_iso = 2 B_xx ~ 0.006-0.008 A^2 (measured B = 8 pi^2 U ~ 0.55 A^2)
    assert 0.004 < 2 * hot[0, 0, 0] < 0.01


def test_dynamical_matrices_are_the_pairs_sum(ge) -> None:  # type: ignore[no-untyped-def]
    """The compiled construction against the sum written out pair by pair (each pair's
    block times its mass weight and phase into its atoms' rows and columns), Hermitian;
    a wavevector that is not (n, 3) is refused."""
    _, c = resolve_fc("Ge", "raman", ge)
    model = CoherentSQE(ge.basis, c)
    q = np.random.default_rng(5).uniform(-1.5, 1.5, (7, 3))
    pos, masses = ge.crystal.positions, ge.crystal.masses
    blocks = ge.basis.block_values(c)
    expect = np.zeros((7, 6, 6), dtype=complex)
    for (i, j, *cell), phi in zip(ge.basis.pairs, blocks, strict=True):
        phase = np.exp(2j * np.pi * q @ (np.asarray(cell) + pos[j] - pos[i]))
        w = 1.0 / np.sqrt(masses[i] * masses[j])
        expect[:, 3 * i : 3 * i + 3, 3 * j : 3 * j + 3] += w * phase[:, None, None] * phi
    expect = 0.5 * (expect + expect.conj().transpose(0, 2, 1))
    d = model.dynamical_matrices(q)
    np.testing.assert_allclose(d, expect, rtol=0, atol=1e-12 * np.abs(expect).max())
    np.testing.assert_array_equal(d, d.conj().transpose(0, 2, 1))
    assert model.dynamical_matrices(np.zeros((0, 3))).shape == (0, 6, 6)
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        model.dynamical_matrices(np.zeros((4, 2)))
