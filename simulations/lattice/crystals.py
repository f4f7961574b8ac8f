"""Crystal structures: loading, validation and the primitive cell used everywhere.

Every crystal is reduced to the *Setyawan-Curtarolo standard primitive cell* (as pymatgen
builds it), because the q-paths, the symmetry-reduced force constants and the phonopy export
all refer to that cell: reduced wave vectors ``q`` are in reciprocal-lattice units (r.l.u.) of
its reciprocal lattice.

Units: lengths in Angstrom, masses in amu.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import spglib
from numpy.typing import NDArray

from simulations.exceptions import StructureError

__all__ = ["SHIPPED_MATERIALS", "Crystal", "crystal_from_structure", "load_crystal"]

logger = logging.getLogger(__name__)

#: Crystals shipped as package data: name -> CIF file in ``simulations/data/structures``.
SHIPPED_MATERIALS: dict[str, str] = {"Ge": "Ge.cif", "Nb": "Nb.cif", "Al": "Al.cif"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Crystal:
    """An ordered crystal in its standard primitive cell.

    Attributes
    ----------
    name
        Material name (e.g. ``"Ge"``) or the CIF file stem.
    lattice
        (3, 3) float, Angstrom. Rows are the primitive lattice vectors a1, a2, a3.
    positions
        (n_atoms, 3) float, fractional coordinates in the primitive cell.
    species
        Element symbol of every atom.
    masses
        (n_atoms,) float, amu.
    conventional_lattice
        (3, 3) float, Angstrom: the conventional standard cell (used for q-paths and
        the instrument's UB matrix).
    spacegroup
        International symbol, e.g. ``"Fd-3m"``.
    spacegroup_number
        International Tables number.
    lattice_type
        Setyawan-Curtarolo lattice type (``"fcc"``, ``"bcc"``, ``"cubic"``, ``"hex"``...).
    kpoints
        Labelled high-symmetry points in r.l.u. of the primitive reciprocal lattice;
        ``"G"`` is Gamma.
    default_path
        Setyawan-Curtarolo path as a string, e.g. ``"G-X-W-K-G-L-U-W-L-K|U-X"``.
    """

    name: str
    lattice: NDArray[np.float64]
    positions: NDArray[np.float64]
    species: tuple[str, ...]
    masses: NDArray[np.float64]
    conventional_lattice: NDArray[np.float64]
    spacegroup: str
    spacegroup_number: int
    lattice_type: str
    kpoints: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    default_path: str = ""

    @property
    def n_atoms(self) -> int:
        """Number of atoms in the primitive cell."""
        return len(self.species)

    @property
    def reciprocal_lattice(self) -> NDArray[np.float64]:
        """(3, 3) float, 1/Angstrom, rows b1, b2, b3 with a_i . b_j = 2 pi delta_ij."""
        return np.asarray(2.0 * np.pi * np.linalg.inv(self.lattice).T, dtype=np.float64)

    @property
    def numbers(self) -> NDArray[np.int64]:
        """(n_atoms,) int, atomic numbers (for spglib)."""
        from pymatgen.core import Element

        return np.array([Element(s).Z for s in self.species], dtype=np.int64)

    @property
    def cartesian_positions(self) -> NDArray[np.float64]:
        """(n_atoms, 3) float, Angstrom."""
        return self.positions @ self.lattice

    def spglib_cell(self) -> Any:
        """The cell as spglib wants it: (lattice, fractional positions, atomic numbers)."""
        return (self.lattice, self.positions, self.numbers)

    def symmetry_operations(
        self, symprec: float = 1e-5
    ) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        """Space-group operations of the primitive cell.

        Returns
        -------
        rotations
            (n_ops, 3, 3) int, acting on fractional coordinates: x' = W x + w.
        translations
            (n_ops, 3) float, fractional.
        """
        sym = spglib.get_symmetry(self.spglib_cell(), symprec=symprec)
        if sym is None:  # pragma: no cover - spglib only fails on broken cells
            raise StructureError(f"spglib could not find the symmetry of {self.name}")
        return np.asarray(sym["rotations"]), np.asarray(sym["translations"])

    def summary(self) -> dict[str, object]:
        """JSON-ready description of the crystal."""
        return {
            "name": self.name,
            "spacegroup": self.spacegroup,
            "spacegroup_number": self.spacegroup_number,
            "lattice_type": self.lattice_type,
            "n_atoms_primitive": self.n_atoms,
            "species": list(self.species),
            "lattice_primitive_A": self.lattice.round(8).tolist(),
            "conventional_abc_A": np.linalg.norm(self.conventional_lattice, axis=1)
            .round(6)
            .tolist(),
        }


def _shipped_path(name: str) -> Path:
    ref = resources.files("simulations") / "data" / "structures" / SHIPPED_MATERIALS[name]
    return Path(str(ref))


def load_crystal(material: str | Path) -> Crystal:
    """Load a shipped material by name (``"Ge"``, ``"Nb"``, ``"Al"``) or any CIF file.

    Raises
    ------
    StructureError
        Unknown name, unreadable CIF, partial occupancy or a disordered site.
    """
    key = str(material)
    if key in SHIPPED_MATERIALS:
        return _load_cached(str(_shipped_path(key)), key)
    path = Path(key)
    if not path.exists():
        raise StructureError(
            f"unknown material {key!r}: it is neither a shipped material "
            f"({', '.join(sorted(SHIPPED_MATERIALS))}) nor an existing CIF file"
        )
    return _load_cached(str(path.resolve()), path.stem)


@lru_cache(maxsize=32)
def _load_cached(path: str, name: str) -> Crystal:
    from pymatgen.core import Structure

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = Structure.from_file(path)
    except Exception as exc:  # pymatgen raises many kinds of errors on bad CIFs
        raise StructureError(f"could not read a crystal structure from {path}: {exc}") from exc
    return crystal_from_structure(structure, name=name)


def crystal_from_structure(structure: object, *, name: str, symprec: float = 1e-3) -> Crystal:
    """Build a :class:`Crystal` from a pymatgen ``Structure``.

    Raises
    ------
    StructureError
        If any site is partially occupied or holds more than one species.
    """
    from pymatgen.core import Structure
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer
    from pymatgen.symmetry.kpath import KPathSetyawanCurtarolo

    if not isinstance(structure, Structure):
        raise StructureError(f"expected a pymatgen Structure, got {type(structure).__name__}")
    bad = [
        f"site {i} ({site.species})"
        for i, site in enumerate(structure)
        if not site.is_ordered or abs(sum(site.species.values()) - 1.0) > 1e-6
    ]
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise StructureError(
            f"{name}: the structure has fractional (partial or mixed) occupancies at {shown}; "
            "only ordered crystals are supported. Order the structure (e.g. a supercell "
            "with one species per site) or use a virtual-crystal model."
        )
    analyzer = SpacegroupAnalyzer(structure, symprec=symprec)
    conventional = analyzer.get_conventional_standard_structure()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kpath = KPathSetyawanCurtarolo(conventional, symprec=symprec)
    prim = kpath.prim
    kpoints: dict[str, tuple[float, float, float]] = {
        ("G" if label in ("\\Gamma", "Γ") else label.replace("\\", "").replace("_", "")): (
            float(coords[0]),
            float(coords[1]),
            float(coords[2]),
        )
        for label, coords in kpath.kpath["kpoints"].items()
    }
    segments = [
        "-".join(
            "G" if p in ("\\Gamma", "Γ") else p.replace("\\", "").replace("_", "") for p in seg
        )
        for seg in kpath.kpath["path"]
    ]
    frac = np.mod(prim.frac_coords, 1.0)
    frac[np.isclose(frac, 1.0, atol=1e-10)] = 0.0
    crystal = Crystal(
        name=name,
        lattice=np.array(prim.lattice.matrix, dtype=float),
        positions=frac,
        species=tuple(str(site.specie) for site in prim),
        masses=np.array([float(site.specie.atomic_mass) for site in prim]),
        conventional_lattice=np.array(conventional.lattice.matrix, dtype=float),
        spacegroup=analyzer.get_space_group_symbol(),
        spacegroup_number=int(analyzer.get_space_group_number()),
        lattice_type=_lattice_type(analyzer.get_lattice_type(), analyzer.get_space_group_symbol()),
        kpoints=kpoints,
        default_path="|".join(segments),
    )
    logger.debug(
        "loaded %s: %s, %d atoms in the primitive cell", name, crystal.spacegroup, crystal.n_atoms
    )
    return crystal


def _lattice_type(system: str, symbol: str) -> str:
    """Bravais lattice name: ``fcc``, ``bcc``, ``sc`` for cubic, else ``<system>-<centering>``."""
    centering = symbol[0]
    if system == "cubic":
        return {"F": "fcc", "I": "bcc", "P": "sc"}[centering]
    return f"{system}-{centering}"
