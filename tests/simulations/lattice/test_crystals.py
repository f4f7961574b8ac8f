"""Crystal loading: shipped materials, CIF files, rejection of disordered structures."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from simulations.exceptions import StructureError
from simulations.lattice.crystals import SHIPPED_MATERIALS, load_crystal
from tests.paths import DATA

DATA = DATA


@pytest.mark.parametrize(
    ("name", "spacegroup", "a", "n_atoms"),
    [("Ge", "Fd-3m", 5.658, 2), ("Nb", "Im-3m", 3.300, 1), ("Al", "Fm-3m", 4.050, 1)],
)
def test_shipped_materials(name: str, spacegroup: str, a: float, n_atoms: int) -> None:
    crystal = load_crystal(name)
    assert crystal.spacegroup == spacegroup
    assert crystal.n_atoms == n_atoms
    np.testing.assert_allclose(np.linalg.norm(crystal.conventional_lattice, axis=1), a, atol=1e-6)
    assert set(crystal.species) == {name}
    # Primitive cell volume = conventional / (4 fcc, 2 bcc).
    centring = {"Fd-3m": 4, "Fm-3m": 4, "Im-3m": 2}[spacegroup]
    assert abs(np.linalg.det(crystal.lattice)) == pytest.approx(a**3 / centring, rel=1e-9)


def test_cif_path_is_loaded_like_a_shipped_name(tmp_path: Path) -> None:
    source = Path(str(resources.files("simulations"))) / "data" / "structures"
    cif = tmp_path / "my_ge.cif"
    cif.write_text((source / SHIPPED_MATERIALS["Ge"]).read_text())
    crystal = load_crystal(cif)
    assert crystal.name == "my_ge"
    np.testing.assert_allclose(crystal.lattice, load_crystal("Ge").lattice)


def test_partial_occupancy_is_rejected_with_a_clear_message() -> None:
    with pytest.raises(StructureError, match=r"fractional .*occupanc"):
        load_crystal(DATA / "partial_occupancy.cif")


def test_unknown_material_names_the_shipped_ones() -> None:
    with pytest.raises(StructureError, match=r"unknown material 'Xx'.*Al, Ge, Nb"):
        load_crystal("Xx")


def test_garbage_file_is_a_structure_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.cif"
    bad.write_text("this is not a CIF\n")
    with pytest.raises(StructureError, match="could not read"):
        load_crystal(bad)
