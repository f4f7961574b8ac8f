"""Our symmetry-reduced FC space against symfc's (an independent implementation).

symfc builds the basis of force constants invariant under the supercell's space group,
with index permutation and the acoustic sum rule, up to a cutoff. Its dimension must equal
our number of coefficients, and every FC array we export must lie in its span.
"""

from __future__ import annotations

import numpy as np
import pytest
from phonopy.structure.atoms import PhonopyAtoms
from phonopy.structure.cells import get_supercell
from symfc.basis_sets import FCBasisSetO2
from symfc.utils.utils import SymfcAtoms

from simulations.lattice.materials import MaterialSetup
from simulations.lattice.phonopy_export import full_force_constants, supercell_size


@pytest.mark.parametrize("material", ["Ge", "Nb", "Al"])
def test_basis_equals_symfcs(
    material: str, request: pytest.FixtureRequest, rng: np.random.Generator
) -> None:
    ms: MaterialSetup = request.getfixturevalue(material.lower())
    cryst = ms.crystal
    n = supercell_size(ms.basis)
    unit = PhonopyAtoms(
        symbols=list(cryst.species), cell=cryst.lattice, scaled_positions=cryst.positions
    )
    sc = get_supercell(unit, np.diag([n, n, n]))
    atoms = SymfcAtoms(numbers=sc.numbers, cell=sc.cell, scaled_positions=sc.scaled_positions)
    symfc = FCBasisSetO2(atoms, cutoff=ms.basis.cutoff).run()
    span = symfc.compression_matrix @ symfc.basis_set  # (N*N*9, n_basis)
    assert span.shape[1] == ms.basis.n_coefficients
    for _ in range(3):
        fc = full_force_constants(ms.basis, rng.normal(size=ms.basis.n_coefficients), n)[0]
        v = fc.reshape(-1)
        coef, *_ = np.linalg.lstsq(span, v, rcond=None)
        assert np.linalg.norm(span @ coef - v) / np.linalg.norm(v) < 1e-10
