"""Self-check of ``tests/simulations/lattice/euphonic_reference.py`` against phonopy, without our
own code.

A toy zincblende (GaAs-like) crystal with nearest- and next-nearest-neighbour central springs
is written with phonopy, the reference script is run in a subprocess, and its output is
compared with phonopy's frequencies/eigenvectors and with the formulas documented in the
script's docstring (structure factor, Debye-Waller exponent, Bose occupation, eigenvector
phase convention).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("phonopy") is None or importlib.util.find_spec("euphonic") is None:
    pytest.skip("phonopy and euphonic are needed", allow_module_level=True)

SCRIPT = Path(__file__).parent / "euphonic_reference.py"

A = 5.65  # Angstrom, conventional cubic cell
MASSES = {"Ga": 69.723, "As": 74.9216}  # amu
LENGTHS = {"Ga": 7.288, "As": 6.58}  # fm
K_NN = 8.0  # eV/A^2
K_NNN = {("Ga", "Ga"): 0.9, ("As", "As"): 0.6}
N_SC = 3
TEMPERATURE = 300.0

# CODATA 2018 (what Euphonic's pint registry uses).
KB_MEV = 8.617333262e-2  # meV/K
HBAR = 1.054571817e-34  # J s
AMU = 1.66053906660e-27  # kg
MEV = 1.602176634e-22  # J
# hbar * sqrt(eV / (amu Angstrom^2)) in meV.
MEV_PER_SQRT_EV_A2_AMU = HBAR * np.sqrt(1e3 * MEV / AMU) / 1e-10 / MEV
# hbar^2 / (amu * meV * Angstrom^2): the dimensionless factor of hbar^2 Q^2 / (M hbar omega).
C_HB2 = HBAR**2 / (AMU * MEV * 1e-20)


def _toy_phonopy():
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    lattice = 0.5 * A * np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    unit = PhonopyAtoms(
        symbols=["Ga", "As"],
        cell=lattice,
        scaled_positions=[[0.0, 0.0, 0.0], [0.25, 0.25, 0.25]],
        masses=[MASSES["Ga"], MASSES["As"]],
    )
    ph = Phonopy(unit, supercell_matrix=np.diag([N_SC] * 3), primitive_matrix=np.eye(3))
    sc = ph.supercell
    cell = sc.cell
    pos = sc.scaled_positions @ cell
    sym = sc.symbols
    n = len(sym)
    shifts = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    images = shifts @ cell
    d_nn, d_nnn = A * np.sqrt(3) / 4, A / np.sqrt(2)
    fc = np.zeros((n, n, 3, 3))
    for i in range(n):
        for j in range(n):
            for t in images:
                d = pos[j] + t - pos[i]
                r = np.linalg.norm(d)
                if abs(r - d_nn) < 1e-3:
                    k = K_NN
                elif abs(r - d_nnn) < 1e-3:
                    k = K_NNN[(sym[i], sym[j])]
                else:
                    continue
                block = k * np.outer(d, d) / r**2
                fc[i, j] -= block
                fc[i, i] += block
    ph.force_constants = fc
    return ph


def _phonopy_modes(ph, q):
    from phonopy.physical_units import get_physical_units

    ph.run_qpoints(q, with_eigenvectors=True)
    # phonopy's THz use its own (older, CODATA-1986-like) eV and amu, which differ from
    # CODATA 2018 by ~1.2e-7 relative: undo its factor and apply the CODATA 2018 one, so
    # the comparison with Euphonic can be 1e-8 tight.
    to_thz = get_physical_units().DefaultToTHz  # THz per sqrt(eV/(Angstrom^2 amu))
    freqs = ph.qpoints.frequencies / to_thz * MEV_PER_SQRT_EV_A2_AMU  # (n_q, n_modes) meV
    ev = ph.qpoints.eigenvectors  # (n_q, 3 n_atoms, n_modes), columns are modes
    n_q, n_modes = freqs.shape
    ev = np.transpose(ev, (0, 2, 1)).reshape(n_q, n_modes, n_modes // 3, 3)
    return freqs, ev


def _degenerate_groups(freqs, tol=1e-6):
    groups, start = [], 0
    for m in range(1, len(freqs) + 1):
        if m == len(freqs) or abs(freqs[m] - freqs[m - 1]) > tol:
            groups.append(list(range(start, m)))
            start = m
    return groups


def test_euphonic_reference_matches_phonopy(tmp_path):
    ph = _toy_phonopy()
    yaml_path = tmp_path / "phonopy_params.yaml"
    ph.save(filename=str(yaml_path), settings={"force_constants": True})

    qpoints = np.array(
        [
            [0.1, 0.2, 0.3],
            [1.13, -0.27, 0.41],
            [2.3, 1.7, -0.6],
            [0.5, 0.5, 0.5],
            [-1.0, 0.5, 0.0],
            [0.37, 1.91, 2.44],
        ]
    )
    m = 4
    g = np.arange(m) / m
    dw_qpoints = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)

    in_path, out_path = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(
        in_path,
        phonopy_params=np.array(str(yaml_path)),
        qpoints=qpoints,
        dw_qpoints=dw_qpoints,
        temperature=np.array(TEMPERATURE),
        scattering_lengths=np.array(json.dumps(LENGTHS)),
    )
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(in_path), str(out_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = np.load(out_path)

    # Frequencies: Euphonic == phonopy.
    freqs, ev_ph = _phonopy_modes(ph, qpoints)
    np.testing.assert_allclose(out["frequencies_meV"], freqs, rtol=1e-8, atol=1e-9)

    atom_r = out["atom_r"]
    recip = out["reciprocal_cell_invA"]
    np.testing.assert_allclose(recip, 2 * np.pi * np.linalg.inv(ph.primitive.cell).T, rtol=1e-10)
    np.testing.assert_allclose(out["atom_mass_amu"], [MASSES["Ga"], MASSES["As"]], rtol=1e-10)

    # Eigenvector phase convention: e_eu_k = exp(+2 pi i q.r_k) e_ph_k up to a global phase.
    ev_eu = out["eigenvectors"]
    phase = np.exp(2j * np.pi * qpoints @ atom_r.T)  # (n_q, n_atoms)
    for iq in range(len(qpoints)):
        for grp in _degenerate_groups(freqs[iq]):
            if len(grp) != 1:
                continue
            e_conv = phase[iq][:, None] * ev_ph[iq, grp[0]]
            overlap = np.vdot(ev_eu[iq, grp[0]].ravel(), e_conv.ravel())
            assert abs(abs(overlap) - 1.0) < 1e-8

    # Debye-Waller exponent W^{ab}_k (Angstrom^2) from phonopy's mesh, frequency_min = 0.01 meV.
    assert float(out["frequency_min_meV"]) == pytest.approx(0.01)
    f_dw, ev_dw = _phonopy_modes(ph, dw_qpoints)
    mask = f_dw >= 0.01
    w_mode = np.where(mask, 1.0 / (np.where(mask, f_dw, 1.0)), 0.0)
    w_mode *= 1.0 / np.tanh(np.where(mask, f_dw, 1.0) / (2 * KB_MEV * TEMPERATURE))
    masses = out["atom_mass_amu"]
    dw = np.einsum("qm,qmka,qmkb->kab", w_mode, ev_dw, ev_dw.conj()).real
    dw *= C_HB2 / (4 * masses[:, None, None] * len(dw_qpoints))
    np.testing.assert_allclose(out["debye_waller_A2"], dw, rtol=1e-6, atol=1e-12)

    # Structure factor per atom (mbarn), documented formula, with phonopy eigenvectors.
    b = np.array([LENGTHS["Ga"], LENGTHS["As"]])  # fm
    q_cart = qpoints @ recip
    e_eu_like = phase[:, None, :, None] * ev_ph  # Euphonic phase convention
    w_exp = np.einsum("kab,qa,qb->qk", dw, q_cart, q_cart)
    amp = np.einsum(
        "k,qmk,qk->qm",
        b / np.sqrt(masses),
        np.einsum("qa,qmka->qmk", q_cart, e_eu_like.conj()),
        np.exp(2j * np.pi * qpoints @ atom_r.T) * np.exp(-w_exp),
    )
    n_atoms = len(masses)
    sf = np.abs(amp) ** 2 * C_HB2 / (2 * n_atoms * np.abs(freqs))  # fm^2
    sf *= 10.0  # 1 fm^2 = 10 mbarn
    sf_eu = out["structure_factors_mbarn"]
    for iq in range(len(qpoints)):
        for grp in _degenerate_groups(freqs[iq]):
            np.testing.assert_allclose(
                sf_eu[iq, grp].sum(), sf[iq, grp].sum(), rtol=1e-6, atol=1e-10 * sf.max()
            )

    # Bose occupation.
    bose = 1.0 / np.expm1(np.abs(freqs) / (KB_MEV * TEMPERATURE))
    np.testing.assert_allclose(out["bose_occupation"], bose, rtol=1e-6)

    assert str(out["euphonic_version"]).lstrip("v").startswith("2.")
    assert out["used_c"].dtype == bool
