"""Force constants from phonopy's files: ``phonopy.yaml`` / ``phonopy_params.yaml`` (with
``force_constants`` or a displacement dataset inside), with ``FORCE_CONSTANTS``,
``FORCE_SETS`` and ``BORN`` beside it when given.

The YAML is parsed with ``yaml.safe_load`` (phonopy's own ``load_yaml`` uses the full loader,
which can build Python objects: not for files that came over a network) and handed to
phonopy's ``load_phonopy_yaml``; the other files are read by phonopy's parsers from a
private temporary folder (phonopy's ``load`` would also look for them in the working
directory). Force sets are turned into force constants by phonopy
(``produce_force_constants``).

The per-pair FCs are phonopy's own: for primitive atom ``i`` and supercell atom ``s`` (of
primitive atom ``j``), the block ``Phi(i, s)`` is shared equally by the ``k`` shortest images
of the pair (``Primitive.get_smallest_vectors``), each a pair ``(i, j, n)`` with
``Phi / k``. The dynamical matrix of :mod:`simulations.lattice.pair_phonons` is then
phonopy's. Lengths and FCs are converted to Angstrom and eV/Angstrom^2 from the
calculator's units.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from model_server.exceptions import FCImportError
from model_server.prediction.crystal_fc import CrystalFC
from model_server.prediction.fc_import.assemble import assemble
from simulations.units import BOHR_TO_ANGSTROM, HARTREE_TO_EV, RYDBERG_TO_EV

__all__ = ["MAX_SUPERCELL_ATOMS", "read_phonopy"]

#: Most atoms in the supercell of a phonopy file (its full FCs: 72 n^2 bytes).
MAX_SUPERCELL_ATOMS = 1500

#: phonopy's force-constant unit of a calculator -> eV/Angstrom^2.
_FC_UNITS = {
    "eV/angstrom^2": 1.0,
    "eV/Angstrom^2": 1.0,
    "Ry/au^2": RYDBERG_TO_EV / BOHR_TO_ANGSTROM**2,
    "mRy/au^2": 1e-3 * RYDBERG_TO_EV / BOHR_TO_ANGSTROM**2,
    "hartree/au^2": HARTREE_TO_EV / BOHR_TO_ANGSTROM**2,
    "eV/angstrom.au": 1.0 / BOHR_TO_ANGSTROM,
    "hartree/angstrom.au": HARTREE_TO_EV / BOHR_TO_ANGSTROM,
}

#: The files that may come beside the YAML: key -> phonopy's file name.
EXTRA_FILES = {"force_constants": "FORCE_CONSTANTS", "force_sets": "FORCE_SETS", "born": "BORN"}


def _yaml_data(text: str) -> dict[str, Any]:
    import yaml

    try:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        data = yaml.load(text, Loader=loader)  # a safe loader: no Python objects
    except yaml.YAMLError as exc:
        raise FCImportError(f"the phonopy file is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not ({"unit_cell", "primitive_cell", "supercell"} & set(data)):
        raise FCImportError(
            "the phonopy file has no unit_cell: send phonopy.yaml or phonopy_params.yaml as "
            "written by phonopy (phonopy.save() or phonopy --writefc with phonopy.yaml)"
        )
    return data


def read_phonopy(
    text: str, extras: Mapping[str, bytes], *, nac: bool = True
) -> tuple[CrystalFC, dict[str, Any]]:
    """Read a phonopy YAML (and the files beside it) into per-pair FCs.

    Parameters
    ----------
    text
        The YAML text.
    extras
        ``force_constants``, ``force_sets``, ``born``: contents of ``FORCE_CONSTANTS``,
        ``FORCE_SETS``, ``BORN`` (each optional).
    nac
        Read the Born charges and dielectric tensor (the YAML's ``born``/``dielectric``, else
        ``BORN``) into the non-analytic term.

    Returns
    -------
    fcs
        On phonopy's primitive cell (Angstrom, eV/Angstrom^2, amu), with ``nac``.
    meta
        ``calculator``, ``supercell_matrix``, ``primitive_matrix``, ``n_supercell_atoms``,
        ``fc_from`` (``yaml``, ``FORCE_CONSTANTS`` or ``force sets``).

    Raises
    ------
    FCImportError
        Not a phonopy file, no force constants or force sets, files that do not fit the
        YAML's cells, a supercell over :data:`MAX_SUPERCELL_ATOMS`, unknown units.
    """
    from phonopy.interface.phonopy_yaml import load_phonopy_yaml

    data = _yaml_data(text)
    try:
        yml = load_phonopy_yaml(data)
    except Exception as exc:  # phonopy raises anything from KeyError to TypeError
        raise FCImportError(f"phonopy cannot read the file's cells: {exc}") from exc
    if yml.unitcell is None:
        raise FCImportError(
            "the phonopy file has no usable unit cell (unit_cell with lattice and points)"
        )
    with tempfile.TemporaryDirectory(prefix="steer-fc-") as folder:
        ph, fc_from = _phonopy_object(yml, extras, Path(folder))
        nac_params = _nac_params(yml, extras, ph, Path(folder)) if nac else None
    return _to_crystal_fc(ph, nac_params), {
        "calculator": yml.calculator or "vasp",
        "supercell_matrix": np.asarray(ph.supercell_matrix).astype(int).tolist(),
        "primitive_matrix": np.asarray(ph.primitive_matrix).tolist(),
        "n_supercell_atoms": len(ph.supercell),
        "fc_from": fc_from,
    }


def _phonopy_object(yml: Any, extras: Mapping[str, bytes], folder: Path) -> tuple[Any, str]:
    """The Phonopy object of the YAML with its force constants; where they came from."""
    from phonopy import Phonopy
    from phonopy.file_IO import parse_FORCE_CONSTANTS, parse_FORCE_SETS

    smat = yml.supercell_matrix if yml.supercell_matrix is not None else np.eye(3, dtype=int)
    n_super = round(abs(float(np.linalg.det(smat)))) * len(yml.unitcell)
    if n_super > MAX_SUPERCELL_ATOMS:
        raise FCImportError(
            f"the phonopy file's supercell has {n_super} atoms; at most "
            f"{MAX_SUPERCELL_ATOMS} are read (the full FC array grows as the square)"
        )
    pmat: Any = yml.primitive_matrix if yml.primitive_matrix is not None else "auto"
    try:
        ph = Phonopy(
            yml.unitcell, smat, primitive_matrix=pmat, calculator=yml.calculator, log_level=0
        )
    except Exception as exc:
        raise FCImportError(f"phonopy cannot build the file's cells: {exc}") from exc
    try:
        if yml.force_constants is not None:
            ph.force_constants = yml.force_constants
            return ph, "yaml"
        if extras.get("force_constants"):
            path = folder / "FORCE_CONSTANTS"
            path.write_bytes(extras["force_constants"])
            ph.force_constants = parse_FORCE_CONSTANTS(filename=path, p2s_map=ph.primitive.p2s_map)
            return ph, "FORCE_CONSTANTS"
        dataset = yml.dataset
        if extras.get("force_sets"):
            path = folder / "FORCE_SETS"
            path.write_bytes(extras["force_sets"])
            dataset = parse_FORCE_SETS(filename=path, natom=len(ph.supercell))
        if dataset is None or not _has_forces(dataset):
            raise FCImportError(
                "the phonopy file has neither force constants nor forces: save it with "
                "phonopy.save(settings={'force_constants': True}) or send FORCE_CONSTANTS "
                "or FORCE_SETS beside it"
            )
        ph.dataset = dataset
        ph.produce_force_constants()
        return ph, "force sets"
    except FCImportError:
        raise
    except Exception as exc:
        raise FCImportError(
            f"phonopy cannot use the file's force constants or forces: {exc}"
        ) from exc


def _has_forces(dataset: Mapping[str, Any]) -> bool:
    if "forces" in dataset:
        return dataset["forces"] is not None
    first = dataset.get("first_atoms") or []
    return bool(first) and all("forces" in d for d in first)


def _nac_params(
    yml: Any, extras: Mapping[str, bytes], ph: Any, folder: Path
) -> dict[str, Any] | None:
    """Born charges and dielectric tensor: the YAML's, else ``BORN`` beside the file (the
    order of phonopy's ``load``)."""
    if yml.nac_params is not None:
        return dict(yml.nac_params)
    if extras.get("born"):
        from phonopy.file_IO import parse_BORN

        path = folder / "BORN"
        path.write_bytes(extras["born"])
        try:
            params: dict[str, Any] = dict(parse_BORN(ph.primitive, filename=path))
        except Exception as exc:
            raise FCImportError(f"cannot read BORN: {exc}") from exc
        return params
    return None


def _fc_factor(ph: Any) -> tuple[float, float]:
    """(length to Angstrom, FC unit to eV/Angstrom^2) of the calculator's units."""
    units = ph.calculator_physical_units if hasattr(ph, "calculator_physical_units") else None
    if units is None:
        from phonopy.interface.calculator import get_calculator_physical_units

        units = get_calculator_physical_units(ph.calculator)
    unit = str(units.force_constants_unit)
    if unit not in _FC_UNITS:
        raise FCImportError(
            f"force constants in {unit} (calculator {ph.calculator}) cannot be converted; "
            f"known units: {', '.join(sorted(_FC_UNITS))}"
        )
    return float(units.distance_to_A), _FC_UNITS[unit]


def _to_crystal_fc(ph: Any, nac_params: Mapping[str, Any] | None) -> CrystalFC:
    """Per-pair FCs of phonopy's primitive cell (shortest images, equal shares)."""
    prim = ph.primitive
    to_a, to_ev = _fc_factor(ph)
    fc = np.asarray(ph.force_constants, dtype=np.float64) * to_ev
    n_p, n_s = len(prim), len(ph.supercell)
    compact = fc.shape[0] != fc.shape[1]
    frac = np.asarray(prim.scaled_positions, dtype=np.float64)
    svecs, multi = prim.get_smallest_vectors()
    svecs = np.asarray(svecs, dtype=np.float64)
    multi = np.asarray(multi)
    if multi.ndim != 3:  # pragma: no cover - phonopy's dense format since v2.?
        raise FCImportError("this phonopy version gives shortest vectors in an unknown format")
    p2s = np.asarray(prim.p2s_map)
    p2p = prim.p2p_map
    j_of = np.array([p2p[s] for s in prim.s2p_map], dtype=np.int64)  # (n_s,)
    pairs: list[NDArray[np.int64]] = []
    blocks: list[NDArray[np.float64]] = []
    weights: list[NDArray[np.float64]] = []
    n_cells = n_s // n_p
    for i in range(n_p):
        row = fc[i] if compact else fc[p2s[i]]  # (n_s, 3, 3)
        count, start = multi[:, i, 0], multi[:, i, 1]
        s_of = np.repeat(np.arange(n_s), count)
        index = np.concatenate([np.arange(a, a + c) for a, c in zip(start, count, strict=True)])
        vec = svecs[index]
        j = j_of[s_of]
        n = vec - (frac[j] - frac[i])
        cell = np.rint(n).astype(np.int64)
        if np.abs(n - cell).max(initial=0.0) > 1e-5:  # pragma: no cover - phonopy's contract
            raise FCImportError("phonopy's shortest vectors are not lattice translations")
        pairs.append(np.column_stack([np.full(len(j), i), j, cell]))
        share = 1.0 / count[s_of]
        blocks.append(row[s_of] * share[:, None, None])
        weights.append(share / n_cells)
    p = np.concatenate(pairs)
    lattice = np.asarray(prim.cell, dtype=np.float64) * to_a
    masses = np.asarray(prim.masses, dtype=np.float64)
    born = dielectric = None
    if nac_params is not None:
        try:
            born, dielectric = nac_params["born"], nac_params["dielectric"]
        except KeyError as exc:
            raise FCImportError(
                f"the phonopy file's Born charges or dielectric tensor: {exc} missing"
            ) from exc
    return assemble(
        numbers=np.asarray(prim.numbers),
        lattice=lattice,
        frac=frac,
        pairs=p,
        blocks=np.concatenate(blocks),
        weights=np.concatenate(weights),
        masses=masses,
        born=born,
        dielectric=dielectric,
        what="the phonopy file",
    )
