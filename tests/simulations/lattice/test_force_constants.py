"""Symmetry-reduced force constants against phonopy (independent reference).

phonopy computes frequencies from the exported full FC array with its own dynamical matrix
(shortest-vector Fourier sum) and symmetrises FCs with its own space-group code; neither
shares code with ours.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from simulations.exceptions import ForceConstantError, InvalidCoefficientsError
from simulations.fcdb.reference import load_reference
from simulations.lattice.crystals import crystal_from_structure
from simulations.lattice.force_constants import build_fc_basis
from simulations.lattice.materials import MaterialSetup
from simulations.lattice.phonopy_export import (
    full_force_constants,
    to_phonopy,
    write_phonopy_params,
)
from simulations.units import VASP_TO_THZ


def _our_frequencies(ms_basis, coeffs, q):  # type: ignore[no-untyped-def]
    d = np.einsum("k,kqij->qij", coeffs, ms_basis.dynamical_basis(q))
    lam = np.linalg.eigvalsh(d)
    return np.sign(lam) * np.sqrt(np.abs(lam)) * VASP_TO_THZ


def _phonopy_frequencies(ph, q):  # type: ignore[no-untyped-def]
    ph.run_qpoints(q)
    return ph.qpoints.frequencies


def _stable_sets(ms: MaterialSetup, n: int, rng: np.random.Generator) -> np.ndarray:
    """n random stable coefficient vectors: kept ones uniform in the domain, rest at the mean."""
    ref = load_reference(ms.crystal.name)
    fm = ms.forward_model(free=ref.kept, reference=ref.mean)
    lo, hi = ref.domain[:, 0], ref.domain[:, 1]
    out = []
    while len(out) < n:
        c = lo + (hi - lo) * rng.random((64, len(lo)))
        _, stable, _ = fm.spectra_fast(c, workers=1)
        for row in c[stable]:
            full = ref.mean.copy()
            full[ref.kept_index] = row
            out.append(full)
    return np.array(out[:n])


@pytest.mark.parametrize("material", ["Ge", "Nb", "Al"])
def test_frequencies_equal_phonopys_for_20_random_stable_sets(
    material: str, request: pytest.FixtureRequest, rng: np.random.Generator
) -> None:
    ms: MaterialSetup = request.getfixturevalue(material.lower())
    sets = _stable_sets(ms, 20, rng)
    q = np.vstack([ms.grid.qpath.qpoints[::7], rng.random((10, 3))])
    worst = 0.0
    ph = to_phonopy(ms.basis, sets[0])
    for coeffs in sets:
        # phonopy gets our exported full FC array and computes with its own machinery
        ph.force_constants = full_force_constants(ms.basis, coeffs)[0]
        ours = _our_frequencies(ms.basis, coeffs, q)
        theirs = _phonopy_frequencies(ph, q)
        # Relative to each mode, ignoring acoustic modes at Gamma (both ~1e-7 THz noise).
        big = np.abs(theirs) > 0.05
        worst = max(worst, float(np.max(np.abs(ours - theirs)[big] / np.abs(theirs)[big])))
        assert np.max(np.abs(ours - theirs)) < 1e-6
    assert worst <= 1e-6, f"max relative frequency error {worst:.2e}"


@pytest.mark.parametrize("material", ["Ge", "Nb", "Al"])
def test_exported_fc_is_space_group_invariant_and_obeys_the_sum_rule(
    material: str, request: pytest.FixtureRequest, rng: np.random.Generator
) -> None:
    ms: MaterialSetup = request.getfixturevalue(material.lower())
    coeffs = _stable_sets(ms, 1, rng)[0]
    ph = to_phonopy(ms.basis, coeffs)
    fc = ph.force_constants.copy()
    np.testing.assert_allclose(fc.sum(axis=1), 0.0, atol=1e-10)  # acoustic sum rule
    np.testing.assert_allclose(fc, fc.transpose(1, 0, 3, 2), atol=1e-12)  # pair symmetry
    ph.symmetrize_force_constants_by_space_group()
    assert np.max(np.abs(ph.force_constants - fc)) < 1e-8


def test_phonopy_load_reads_the_export(ge: MaterialSetup, tmp_path, rng) -> None:  # type: ignore[no-untyped-def]
    import phonopy

    coeffs = _stable_sets(ge, 1, rng)[0]
    path = write_phonopy_params(ge.basis, coeffs, tmp_path)
    ph = phonopy.load(str(path), produce_fc=False, log_level=0)
    q = ge.grid.qpath.qpoints[::20]
    np.testing.assert_allclose(
        _phonopy_frequencies(ph, q), _our_frequencies(ge.basis, coeffs, q), atol=1e-6
    )


def test_ge_basis_names_and_bond_structure(ge: MaterialSetup) -> None:
    basis = ge.basis
    # Diamond: 1NN tensor [[a,b,b],[b,a,b],[b,b,a]] along (111): two coefficients.
    assert basis.names[:2] == ("1NN_xx", "1NN_xy")
    assert [o.label for o in basis.orbits] == ["1NN", "2NN", "3NN", "4NN", "5NN"]
    assert basis.orbits[0].distance == pytest.approx(5.658 * np.sqrt(3) / 4)
    assert basis.orbits[0].multiplicity == 8  # 4 bonds per atom, 2 atoms
    assert basis.n_coefficients == 16


def test_low_symmetry_crystals_keep_symmetric_self_terms(rng: np.random.Generator) -> None:
    """hcp Mg and a triclinic cell: the sum rule's symmetric self term is enforced."""
    structures = {
        "Mg": Structure.from_spacegroup(
            "P6_3/mmc", Lattice.hexagonal(3.21, 5.21), ["Mg"], [[1 / 3, 2 / 3, 0.25]]
        ),
        "triclinic": Structure(
            Lattice.from_parameters(3.1, 3.5, 4.2, 80, 95, 102),
            ["Si", "O", "O"],
            [[0, 0, 0], [0.3, 0.2, 0.1], [0.6, 0.7, 0.45]],
        ),
    }
    for name, structure in structures.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            crystal = crystal_from_structure(structure, name=name)
        basis = build_fc_basis(crystal, shells=3)
        coeffs = rng.normal(0.0, 0.5, basis.n_coefficients)
        ph = to_phonopy(basis, coeffs)
        fc = ph.force_constants
        np.testing.assert_allclose(fc, fc.transpose(1, 0, 3, 2), atol=1e-12)
        np.testing.assert_allclose(fc.sum(axis=1), 0.0, atol=1e-10)
        q = rng.random((5, 3))
        np.testing.assert_allclose(
            _our_frequencies(basis, coeffs, q), _phonopy_frequencies(ph, q), atol=1e-8
        )


def test_bad_basis_requests(ge: MaterialSetup) -> None:
    with pytest.raises(ForceConstantError, match="exactly one of"):
        build_fc_basis(ge.crystal)
    with pytest.raises(ForceConstantError, match="shells must be >= 1"):
        build_fc_basis(ge.crystal, shells=0)
    with pytest.raises(ForceConstantError, match="no bonds"):
        build_fc_basis(ge.crystal, cutoff=1.0)


def test_non_finite_coefficient_is_named(ge: MaterialSetup) -> None:
    coeffs = np.zeros(ge.basis.n_coefficients)
    coeffs[3] = np.nan
    with pytest.raises(InvalidCoefficientsError, match=r"non-finite .*2NN_zz"):
        ge.basis.block_values(coeffs)
    with pytest.raises(InvalidCoefficientsError, match="expected 16"):
        ge.basis.block_values(np.zeros(3))
