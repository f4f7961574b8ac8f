"""Imported force constants (phonopy YAML, CASTEP .castep_bin): read back against their
source, against phonopy's own frequencies (with and without the non-analytic term),
aligned onto another cell, projected onto Ge's basis, and refused with a message (API 422,
CLI exit 2).

The files are made here: the project's own phonopy export of Ge, and a rocksalt CuAu
(a = 5 A) whose forces come from ASE's EMT calculator, with made-up Born charges (+-1.1 e)
and dielectric constant (2.5). Frequencies are compared to 1e-6 of the highest one (the
YAML holds the FCs to 10 decimals; near-zero acoustic modes amplify rounding).
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from scipy import constants as sc
from typer.testing import CliRunner

from model_server.exceptions import FCImportError
from model_server.prediction.crystal_fc import CrystalFC, project_onto_basis
from model_server.prediction.fc_import import FCFile, align_to_crystal, read_fc_file
from simulations.fcdb.reference import resolve_fc
from simulations.lattice.crystals import Crystal
from simulations.lattice.materials import MaterialSetup
from simulations.lattice.pair_phonons import frequencies_at
from simulations.lattice.phonopy_export import write_phonopy_params
from steering.api.app import LiveState
from steering.api.predict import predict_router
from steering.cli.app import app, main
from steering.db import History

REL = 1e-6  # of the highest frequency
BORN = np.array([np.eye(3) * 1.1, -np.eye(3) * 1.1])
EPSILON = np.eye(3) * 2.5


def _freqs(fcs: CrystalFC, q: np.ndarray, *, nac: bool = True) -> np.ndarray:
    return frequencies_at(
        fcs.numbers, fcs.frac, fcs.pairs, fcs.fc, q, masses=fcs.masses, nac=fcs.nac if nac else None
    )


def _qpoints(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.5, 0.5, (n, 3))


# -- fixtures: the files --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ge_export(tmp_path_factory: pytest.TempPathFactory, ge: MaterialSetup) -> tuple[Path, Any]:
    """Ge's mlff_mean set written by the project's own export (steer simulate fc's path)."""
    _, c = resolve_fc("Ge", "mlff_mean", ge)
    path = write_phonopy_params(ge.basis, c, tmp_path_factory.mktemp("ge-fc"))
    return path, c


@pytest.fixture(scope="module")
def rocksalt() -> Any:
    """A phonopy object of rocksalt CuAu with EMT forces and Born charges (Wang's NAC)."""
    from ase import Atoms
    from ase.calculators.emt import EMT
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    unit = PhonopyAtoms(
        symbols=["Cu"] * 4 + ["Au"] * 4,
        cell=np.eye(3) * 5.0,
        scaled_positions=[
            [0, 0, 0],
            [0, 0.5, 0.5],
            [0.5, 0, 0.5],
            [0.5, 0.5, 0],
            [0.5, 0.5, 0.5],
            [0.5, 0, 0],
            [0, 0.5, 0],
            [0, 0, 0.5],
        ],
    )
    ph = Phonopy(unit, supercell_matrix=np.eye(3, dtype=int) * 2, primitive_matrix="F")
    ph.generate_displacements(distance=0.01)
    forces = []
    for cell in ph.supercells_with_displacements:
        atoms = Atoms(
            cell.symbols, cell=cell.cell, scaled_positions=cell.scaled_positions, pbc=True
        )
        atoms.calc = EMT()
        forces.append(atoms.get_forces())
    ph.forces = np.array(forces)
    ph.produce_force_constants()
    return ph


def _nac_params(method: str = "wang") -> dict[str, Any]:
    from phonopy.physical_units import get_physical_units

    units = get_physical_units()
    return {
        "born": BORN,
        "dielectric": EPSILON,
        "factor": units.Hartree * units.Bohr,
        "method": method,
    }


def _phonopy_freqs(ph: Any, q: np.ndarray, nac: bool) -> np.ndarray:
    ph.nac_params = _nac_params() if nac else None
    ph.run_qpoints(q)
    out = np.asarray(ph.qpoints.frequencies)
    ph.nac_params = None
    return out


@pytest.fixture(scope="module")
def rocksalt_files(tmp_path_factory: pytest.TempPathFactory, rocksalt: Any) -> dict[str, Path]:
    """phonopy_params.yaml with FCs and Born charges; one with force sets only; one bare
    YAML with FORCE_CONSTANTS and BORN beside it."""
    from phonopy.file_IO import write_BORN, write_FORCE_CONSTANTS

    folder = tmp_path_factory.mktemp("rocksalt")
    rocksalt.nac_params = _nac_params()
    with_fc = folder / "with_fc.yaml"
    rocksalt.save(with_fc, settings={"force_constants": True})
    rocksalt.nac_params = None
    sets = folder / "force_sets.yaml"
    rocksalt.save(sets, settings={"force_constants": False, "born_effective_charge": False})
    beside = folder / "beside"
    beside.mkdir()
    rocksalt.save(
        beside / "phonopy.yaml",
        settings={"force_constants": False, "force_sets": False, "displacements": False},
    )
    write_FORCE_CONSTANTS(
        rocksalt.force_constants, beside / "FORCE_CONSTANTS", p2s_map=rocksalt.primitive.p2s_map
    )
    rocksalt.nac_params = _nac_params()
    write_BORN(rocksalt.primitive, BORN, EPSILON, filename=beside / "BORN")
    rocksalt.nac_params = None
    return {"with_fc": with_fc, "force_sets": sets, "beside": beside}


# -- a CASTEP binary, written as Euphonic's reader reads it ----------------------------------


def _record(payload: bytes) -> bytes:
    mark = struct.pack(">i", len(payload))
    return mark + payload + mark


def _ints(values: Any) -> bytes:
    return _record(np.asarray(values, dtype=">i4").tobytes())


def _floats(values: Any) -> bytes:
    return _record(np.asarray(values, dtype=">f8").tobytes())


def castep_bin(ph: Any, *, born: bool = True, force_constants: bool = True) -> bytes:
    """A .castep_bin of phonopy's primitive cell and FCs (atomic units, CASTEP's layout)."""
    bohr = sc.physical_constants["Bohr radius"][0] * 1e10
    hartree = sc.physical_constants["Hartree energy in eV"][0]
    me_amu = sc.m_e / sc.atomic_mass
    prim = ph.primitive
    lattice = np.asarray(prim.cell)
    frac = np.asarray(prim.scaled_positions)
    n = len(prim)
    symbols = list(dict.fromkeys(prim.symbols))
    per = [[k for k in range(n) if prim.symbols[k] == s] for s in symbols]
    top = max(len(p) for p in per)
    positions = np.zeros((len(symbols), top, 3))
    for k, atoms in enumerate(per):
        positions[k, : len(atoms)] = frac[atoms]
    masses = [prim.masses[p[0]] / me_amu for p in per]
    out = _record(b"CASTEP_BIN") + _record(b"BEGIN_PARAMETERS_DUMP") + _record(b"24.1")
    out += _record(b"BEGIN_UNIT_CELL")
    out += _record(b"CELL%NUM_IONS") + _ints(n)
    out += _record(b"CELL%REAL_LATTICE") + _floats((lattice / bohr).T.ravel())
    out += _record(b"CELL%NUM_SPECIES") + _ints(len(symbols))
    out += _record(b"CELL%NUM_IONS_IN_SPECIES") + _ints([len(p) for p in per])
    out += _record(b"CELL%IONIC_POSITIONS") + _floats(positions.ravel())
    out += _record(b"CELL%SPECIES_MASS") + _floats(masses)
    out += _record(b"CELL%SPECIES_SYMBOL") + _record(b"".join(s.ljust(8).encode() for s in symbols))
    out += _record(b"END_UNIT_CELL")
    if force_constants:
        p_mat = np.asarray(ph.primitive_matrix)
        sc_matrix = np.rint(np.asarray(ph.supercell_matrix) @ np.linalg.inv(p_mat.T)).astype(int)
        spos = np.asarray(ph.supercell.scaled_positions) @ np.asarray(ph.supercell.cell)
        prim_frac = spos @ np.linalg.inv(lattice)
        j_of = np.array([prim.p2p_map[s] for s in prim.s2p_map])
        cells = np.rint(prim_frac - frac[j_of]).astype(int)
        inv_sc = np.linalg.inv(sc_matrix)
        keys = [tuple(np.rint(((c @ inv_sc) % 1.0) * 1000).astype(int) % 1000) for c in cells]
        origins, index = [], {}
        for s in np.nonzero(j_of == 0)[0]:
            index[keys[s]] = len(origins)
            origins.append(cells[s])
        fc = np.asarray(ph.force_constants)
        compact = fc.shape[0] != fc.shape[1]
        block = np.zeros((len(origins), 3 * n, 3 * n))
        for i in range(n):
            row = fc[i] if compact else fc[prim.p2s_map[i]]
            for s in range(len(j_of)):
                j = j_of[s]
                block[index[keys[s]], 3 * i : 3 * i + 3, 3 * j : 3 * j + 3] = row[s]
        block *= bohr**2 / hartree
        out += _record(b"FORCE_CON") + _ints(sc_matrix.T.ravel())
        out += _floats(block.transpose(0, 2, 1).ravel()) + _ints(np.array(origins).ravel())
        out += _ints(0)
    if born:
        out += _record(b"BORN_CHGS") + _floats(BORN.ravel())
        out += _record(b"DIELECTRIC") + _floats(EPSILON.T.ravel())
    return out + _record(b"END")


# -- reading back ----------------------------------------------------------------------------


def test_own_export_reads_back_with_the_source_frequencies(
    ge_export: tuple[Path, Any], ge: MaterialSetup
) -> None:
    """(a) steer simulate fc's phonopy file of Ge read back: the source's frequencies on the
    q-path and 40 random q (measured: 1.9e-7 THz of 6.09 THz)."""
    path, c = ge_export
    imported = read_fc_file(FCFile(data=path.read_bytes(), filename=path.name))
    source = CrystalFC.from_basis(ge.basis, c)
    q = np.vstack([ge.grid.qpath.qpoints, _qpoints(40, seed=1)])
    ours, theirs = _freqs(imported.fcs, q), _freqs(source, q)
    assert imported.format == "phonopy"
    assert imported.fcs.nac is None
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=REL * np.abs(theirs).max())


@pytest.mark.parametrize("nac", [False, True])
def test_phonopy_made_file_matches_phonopy(
    rocksalt: Any, rocksalt_files: dict[str, Path], nac: bool
) -> None:
    """(b) phonopy_params.yaml made by phonopy (EMT forces, Born charges): our frequencies
    against phonopy's run_qpoints, without NAC and with Wang's (q given at its shortest
    image, where phonopy takes the direction; near Gamma along three directions)."""
    spec = FCFile(data=rocksalt_files["with_fc"].read_bytes(), nac=nac)
    fcs = read_fc_file(spec).fcs
    assert (fcs.nac is not None) == nac
    q = np.vstack([_qpoints(30, seed=2), [[0.01, 0, 0], [0.01, 0.01, 0], [0.0, 0.004, 0.01]]])
    if fcs.nac is not None:
        q = fcs.nac.directions(q) @ fcs.lattice.T  # the shortest images, r.l.u.
    ours, theirs = _freqs(fcs, q), _phonopy_freqs(rocksalt, q, nac)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=REL * np.abs(theirs).max())
    if nac:  # the LO-TO splitting is there
        bare = _freqs(fcs, q[-3:], nac=False)
        assert np.abs(ours[-3:, -1] - bare[:, -1]).min() > 0.1


def test_force_sets_and_files_beside(rocksalt: Any, rocksalt_files: dict[str, Path]) -> None:
    """A YAML with force sets only (phonopy makes the FCs) and a bare YAML with
    FORCE_CONSTANTS and BORN beside it give phonopy's frequencies."""
    q = _qpoints(20, seed=3)
    sets = read_fc_file(FCFile(data=rocksalt_files["force_sets"].read_bytes()))
    assert sets.meta["fc_from"] == "force sets"
    assert sets.fcs.nac is None
    theirs = _phonopy_freqs(rocksalt, q, nac=False)
    np.testing.assert_allclose(_freqs(sets.fcs, q), theirs, rtol=0, atol=REL * theirs.max())
    folder = rocksalt_files["beside"]
    beside = read_fc_file(
        FCFile(
            data=(folder / "phonopy.yaml").read_bytes(),
            extras={
                "force_constants": (folder / "FORCE_CONSTANTS").read_bytes(),
                "born": (folder / "BORN").read_bytes(),
            },
        )
    )
    assert beside.meta["fc_from"] == "FORCE_CONSTANTS"
    assert beside.fcs.nac is not None
    q = beside.fcs.nac.directions(q) @ beside.fcs.lattice.T
    theirs = _phonopy_freqs(rocksalt, q, nac=True)
    np.testing.assert_allclose(_freqs(beside.fcs, q), theirs, rtol=0, atol=REL * theirs.max())


def test_castep_bin_matches_phonopy(rocksalt: Any) -> None:
    """A .castep_bin of the same FCs and Born charges (read by Euphonic in a child process):
    phonopy's frequencies with Wang's NAC."""
    imported = read_fc_file(FCFile(data=castep_bin(rocksalt), filename="CuAu.castep_bin"))
    fcs = imported.fcs
    assert imported.format == "castep_bin"
    assert fcs.nac is not None
    q = fcs.nac.directions(_qpoints(20, seed=4)) @ fcs.lattice.T
    theirs = _phonopy_freqs(rocksalt, q, nac=True)
    np.testing.assert_allclose(_freqs(fcs, q), theirs, rtol=0, atol=REL * theirs.max())


def test_alignment_onto_another_cell(rocksalt_files: dict[str, Path]) -> None:
    """The file's FCs on a cell with other primitive vectors, orientation, origin, atom
    order and a 2 % longer lattice constant: the same frequencies at the same wave vectors
    (with the NAC term)."""
    fcs = read_fc_file(FCFile(data=rocksalt_files["with_fc"].read_bytes())).fcs
    m = np.array([[1, 1, 0], [0, 1, 0], [0, 1, 1]])
    angle = 0.3
    rot = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    lattice = 1.02 * (m @ fcs.lattice) @ rot.T
    frac = (fcs.frac @ np.linalg.inv(m) + [0.25, 0.25, 0.25]) % 1.0
    order = [1, 0]
    base = fcs.crystal()
    target = Crystal(
        name="CuAu",
        lattice=lattice,
        positions=frac[order],
        species=tuple(fcs.species[k] for k in order),
        masses=fcs.masses[order],
        conventional_lattice=base.conventional_lattice,
        spacegroup=base.spacegroup,
        spacegroup_number=base.spacegroup_number,
        lattice_type=base.lattice_type,
    )
    aligned = align_to_crystal(fcs, target)
    assert aligned.scale == pytest.approx(1 / 1.02, rel=1e-9)
    q = fcs.nac.directions(_qpoints(20, seed=5)) @ fcs.lattice.T if fcs.nac else None
    assert q is not None
    theirs = _freqs(fcs, q)
    ours = _freqs(aligned.fcs, q @ m.T)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=REL * theirs.max())


def test_projection_onto_ge_basis(ge_export: tuple[Path, Any], ge: MaterialSetup) -> None:
    """(d) Ge's exported set projects back onto its own coefficients (measured residual
    6e-16)."""
    path, c = ge_export
    fcs = read_fc_file(FCFile(data=path.read_bytes())).fcs
    proj = project_onto_basis(align_to_crystal(fcs, ge.crystal).fcs, ge.basis)
    assert proj.residual < 1e-9
    np.testing.assert_allclose(proj.coefficients, c, rtol=0, atol=1e-8)


def test_wrong_structure_is_refused(rocksalt_files: dict[str, Path], ge: MaterialSetup) -> None:
    fcs = read_fc_file(FCFile(data=rocksalt_files["with_fc"].read_bytes())).fcs
    with pytest.raises(FCImportError, match="the FC file is for CuAu"):
        align_to_crystal(fcs, ge.crystal)


# -- the endpoint and the CLI ----------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    path = tmp_path_factory.mktemp("predict-fc") / "steer.db"
    api = FastAPI()
    api.include_router(predict_router(LiveState(), History(f"sqlite:///{path}")))
    return TestClient(api)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_endpoint_imports_a_file(client: TestClient, rocksalt_files: dict[str, Path]) -> None:
    data = rocksalt_files["with_fc"].read_bytes()
    body = {"fc": {"file": _b64(data), "filename": "with_fc.yaml"}, "outputs": ["dos"]}
    r = client.post("/predict", json=body)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["fc_source"] == "imported"
    assert doc["formula"] == "CuAu"
    assert doc["fc"]["file"]["format"] == "phonopy"
    assert doc["fc"]["file"]["filename"] == "with_fc.yaml"
    assert len(doc["fc"]["file"]["sha256"]) == 64
    assert doc["fc"]["nac"]["method"] == "wang"
    assert doc["fc"]["coefficients"] == {}


@pytest.mark.parametrize(
    ("fc", "material", "message"),
    [
        ({"file": "not base64!"}, None, "fc.file is not base64"),
        ({"file": _b64(b"hello world")}, None, "cannot tell the FC file's format"),
        ({"file": _b64(b"unit_cell: [1, 2\n  - :")}, None, "not valid YAML"),
        ({"file": _b64(b"unit_cell:\n  lattice: 3\n")}, None, "no usable unit cell"),
        ({"file": _b64(b"CASTEP garbage"), "format": "castep_bin"}, None, "cannot read the CASTEP"),
    ],
)
def test_endpoint_bad_files_are_422(
    client: TestClient, fc: dict[str, Any], material: str | None, message: str
) -> None:
    body: dict[str, Any] = {"fc": fc, "outputs": ["dos"]}
    if material:
        body["material"] = material
    r = client.post("/predict", json=body)
    assert r.status_code == 422, r.text
    assert message in str(r.json()["detail"])


def test_endpoint_refuses_other_structure_no_fcs_and_large_files(
    client: TestClient,
    rocksalt: Any,
    rocksalt_files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = rocksalt_files["with_fc"].read_bytes()
    r = client.post("/predict", json={"material": "Ge", "fc": {"file": _b64(data)}})
    assert r.status_code == 422
    assert "the FC file is for CuAu" in r.json()["detail"]
    no_fc = castep_bin(rocksalt, force_constants=False)
    r = client.post("/predict", json={"fc": {"file": _b64(no_fc)}, "outputs": ["dos"]})
    assert r.status_code == 422
    assert "Force constants matrix could not be found" in r.json()["detail"]
    monkeypatch.setattr("steering.api.predict.MAX_FC_FILE_BYTES", 1000)
    r = client.post("/predict", json={"fc": {"file": _b64(data)}, "outputs": ["dos"]})
    assert r.status_code == 422
    assert "at most 1000 are read" in r.json()["detail"]


def test_cli_imports_and_refuses(
    ge_export: tuple[Path, Any],
    rocksalt: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, _ = ge_export
    runner = CliRunner()
    result = runner.invoke(app, ["predict", "Ge", "--fc", str(path), "--kind", "dos", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["fc_source"] == "imported"
    assert doc["material"] == "Ge"
    result = runner.invoke(app, ["predict", str(path), "--kind", "dos", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["material"] == "Ge"  # the file's structure is Ge's
    garbled = tmp_path / "x.castep_bin"
    garbled.write_bytes(castep_bin(rocksalt)[:300])
    for argv, message in (
        (["predict", "Al", "--fc", str(path), "--kind", "dos"], "the FC file is for Ge"),
        (["predict", "Ge", "--fc", str(garbled), "--kind", "dos"], "cannot read the CASTEP"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err
        assert "Traceback" not in err
