"""The force-constant database (simulations.fcdb.database): the committed file against its contract,
the builder's geometry on an analytic spring model, the catalogue and the split, clear errors;
one end-to-end build with a real force field (marked ``mlff``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from simulations.fcdb.build import choose_supercell, pairs_from_supercell
from simulations.fcdb.catalogue import PROTOTYPES, assign_splits, catalogue
from simulations.fcdb.database import (
    CUTOFF_ANGSTROM,
    FULL_STABILITY_TOL_THZ,
    SPLITS,
    STABILITY_MESH,
    STABILITY_TOL_THZ,
    FCDatabaseError,
    FCEntry,
    check_entry,
    database_info,
    database_path,
    load_database,
    read_database,
    write_database,
)
from simulations.lattice.pair_phonons import frequencies_at, mesh_qpoints
from simulations.units import VASP_TO_THZ
from tests.commands import steer
from tests.paths import REPO

#: Space group of every prototype (International Tables number).
SPACEGROUP = {
    "fcc": 225,
    "bcc": 229,
    "hcp": 194,
    "diamond": 227,
    "rocksalt": 225,
    "zincblende": 216,
    "wurtzite": 186,
    "cscl": 221,
    "fluorite": 225,
    "perovskite": 221,
    "l12": 221,
    "heusler": 225,
    "halfheusler": 216,
    "l10": 123,
    "wc": 187,
    "reo3": 221,
    "d03": 225,
    "rutile": 136,
    "a15": 223,
    "nias": 194,
}


@pytest.fixture(scope="module")
def everything() -> list[FCEntry]:
    """The committed database, unstable entries included (read once; tests do not mutate)."""
    return load_database(include_unstable=True)


# --------------------------------------------------------------------------------------------
# The committed database


def test_committed_database_loads(everything: list[FCEntry]) -> None:
    stable = load_database()
    assert len(stable) >= 100
    assert all(e.stable for e in stable)
    assert {e.name for e in stable} <= {e.name for e in everything}
    names = [e.name for e in everything]
    assert len(set(names)) == len(names)
    for e in everything:
        n = e.n_atoms
        assert e.numbers.shape == (n,)
        assert e.frac.shape == (n, 3)
        assert e.lattice.shape == (3, 3)
        assert e.pairs.shape[1] == 5
        assert e.fc.shape == (len(e.pairs), 3, 3)
        assert e.prototype in PROTOTYPES
        assert e.split in SPLITS
        assert e.name == f"{e.crystal_id}-{e.model}"
        assert np.isfinite(e.fc).all()
        assert abs(np.linalg.det(e.lattice)) > 1.0
    # several prototypes among the stable crystals
    assert len({e.prototype for e in stable}) >= 8


def test_every_entry_obeys_the_contract(everything: list[FCEntry]) -> None:
    for e in everything:
        c = check_entry(e)
        # acoustic sum rule and Phi(i0, jR) == Phi(j0, i(-R)).T, to rounding
        assert c["asr"] <= 1e-10 * c["scale"], e.name
        assert c["transpose"] <= 1e-12 * c["scale"], e.name
        assert c["max_bond"] <= CUTOFF_ANGSTROM + 1e-6, e.name
        # one self term per atom, pairs unique
        self_rows = e.pairs[(e.pairs[:, 0] == e.pairs[:, 1]) & ~e.pairs[:, 2:].any(axis=1)]
        assert sorted(self_rows[:, 0].tolist()) == list(range(e.n_atoms)), e.name
        assert len({tuple(r) for r in e.pairs.tolist()}) == len(e.pairs), e.name


def test_bonds_are_all_pairs_up_to_the_cutoff(everything: list[FCEntry]) -> None:
    """Every interatomic vector up to the cutoff is stored, and nothing beyond it."""
    for e in everything[::7]:
        reach = [
            int(np.ceil(CUTOFF_ANGSTROM * np.linalg.norm(b))) + 1
            for b in np.linalg.inv(e.lattice).T
        ]
        shifts = np.array(
            [
                (a, b, c)
                for a in range(-reach[0], reach[0] + 1)
                for b in range(-reach[1], reach[1] + 1)
                for c in range(-reach[2], reach[2] + 1)
            ]
        )
        expected = set()
        for i in range(e.n_atoms):
            for j in range(e.n_atoms):
                d = np.linalg.norm((e.frac[j] + shifts - e.frac[i]) @ e.lattice, axis=1)
                for s in shifts[d <= CUTOFF_ANGSTROM - 1e-6]:
                    expected.add((i, j, *map(int, s)))
        stored = {tuple(r) for r in e.pairs.tolist()}
        assert expected <= stored, e.name
        length = np.linalg.norm(e.bond_vectors(), axis=1)
        assert length.max() <= CUTOFF_ANGSTROM + 1e-6


def test_stability_verdict_holds_on_another_mesh(everything: list[FCEntry]) -> None:
    """Frequencies from the stored FCs: no imaginary mode on a shifted mesh plus random q where
    ``stable`` says so; the recorded minimum is reproduced on the build's mesh, and ``stable``
    follows from it and the full supercell FCs' minimum."""
    rng = np.random.default_rng(20261123)
    contents = read_database(database_path())
    meta_of = {e.name: m for e, m in zip(contents.entries, contents.meta, strict=True)}
    by_proto: dict[str, list[FCEntry]] = defaultdict(list)
    for e in everything:
        by_proto[e.prototype].append(e)
    picked = [group[int(rng.integers(len(group)))] for _, group in sorted(by_proto.items())]
    shifted = mesh_qpoints((7, 7, 7)) + 0.5 / 7
    for e in picked:
        q = np.concatenate([shifted, rng.uniform(-0.5, 0.5, (200, 3))])
        f = e.frequencies(q)
        if e.stable:
            assert f.min() >= -STABILITY_TOL_THZ, e.name
        on_mesh = e.frequencies(mesh_qpoints(STABILITY_MESH)).min()
        # A stable crystal's minimum is an acoustic mode at Gamma, a numerical zero (~1e-7 THz)
        # whose last digits depend on the BLAS build: compare the verdict it decides, and the
        # value to 1e-6 THz (the recorded one came from the build's machine).
        assert (on_mesh >= -STABILITY_TOL_THZ) == (e.min_freq_thz >= -STABILITY_TOL_THZ), e.name
        np.testing.assert_allclose(on_mesh, e.min_freq_thz, atol=1e-6, err_msg=e.name)
        full = meta_of[e.name]["min_freq_commensurate_thz"]
        assert e.stable == (
            e.min_freq_thz >= -STABILITY_TOL_THZ and full >= -FULL_STABILITY_TOL_THZ
        )
        # three acoustic modes at Gamma (the ASR); an unstable crystal's soft optical mode at
        # Gamma (a perovskite's ferroelectric one) sorts below them, so take the 3 smallest |f|
        gamma = np.sort(np.abs(e.frequencies([[0.0, 0.0, 0.0]])[0]))
        np.testing.assert_allclose(gamma[:3], 0.0, atol=1e-3, err_msg=e.name)


def test_germanium_optical_mode(everything: list[FCEntry]) -> None:
    """Ge-diamond's zone-centre optical frequency.

    The measured Raman line is 9.0 THz (300 cm^-1). The shipped force fields are softer: the
    repository's reference FCs (``simulations/data/reference_fc/Ge.json``, a 4x4x4 supercell
    projected on a 5-shell basis, computed independently of this database) give 6.0 THz for
    sevennet-0 and 4.6 THz for chgnet-0.3.0. The database must agree with that reference for
    the same force field within 10 %; its distance from 9 THz is reported, not hidden.
    """
    ge = [e for e in everything if e.crystal_id == "Ge-diamond"]
    if not ge:
        pytest.skip("no Ge-diamond entry in the committed database")
    ref = json.loads((REPO / "simulations/data/reference_fc/Ge.json").read_text())
    for e in ge:
        assert e.stable
        f = e.frequencies([[0.0, 0.0, 0.0]])[0]
        np.testing.assert_allclose(f[3:], f[3], rtol=1e-9)  # triply degenerate
        expected = ref["models"][e.model]["gamma_optical_thz"]
        assert abs(f[3] - expected) <= 0.10 * expected, (e.model, f[3], expected)
        assert f[3] < 9.0  # softer than the measured 9 THz Raman line (see docs/fcdb.md)


def test_splits_are_disjoint_by_crystal(everything: list[FCEntry]) -> None:
    split_of: dict[str, set[str]] = defaultdict(set)
    for e in everything:
        split_of[e.crystal_id].add(e.split)
    assert all(len(s) == 1 for s in split_of.values())
    expected = assign_splits(catalogue(), seed=0)
    assert {cid: next(iter(s)) for cid, s in split_of.items()} == {
        cid: expected[cid] for cid in split_of
    }
    stable = [e for e in everything if e.stable]
    test_protos = {e.prototype for e in stable if e.split == "test"}
    assert len(test_protos) >= 4, test_protos
    counts = {s: sum(e.split == s for e in stable) for s in SPLITS}
    assert counts["train"] > 3 * (counts["val"] + counts["test"]) / 2, counts


def test_info_counts_and_provenance(everything: list[FCEntry]) -> None:
    info = database_info()
    assert info["n_entries"] == len(everything)
    assert info["n_stable"] == sum(e.stable for e in everything)
    assert sum(info["by_split"].values()) == info["n_stable"]
    assert sum(c["stable"] for c in info["by_prototype"].values()) == info["n_stable"]
    assert info["file_bytes"] <= 50e6
    sessions = info["provenance"]["sessions"]
    assert sessions
    assert all(s["command"].startswith("steer fcdb build") for s in sessions)
    assert all(len(s["git_commit"]) == 40 for s in sessions)


def run_steer(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``steer ARGS`` in this process: (exit code, stdout, stderr)."""
    from steering.cli.app import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_info_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_steer(capsys, "fcdb", "info", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["n_stable"] >= 150
    assert info == json.loads(json.dumps(database_info()))


# --------------------------------------------------------------------------------------------
# Storage and errors


def test_write_read_roundtrip(tmp_path: Path, everything: list[FCEntry]) -> None:
    some = everything[:3]
    meta = [{"seconds": 1.5 * k, "supercell_matrix": np.eye(3, dtype=int) * k} for k in range(3)]
    path = write_database(tmp_path / "x.h5", some, meta=meta, attrs={"provenance": {"a": [1]}})
    back = read_database(path)
    assert back.attrs["provenance"] == {"a": [1]}
    assert [m["seconds"] for m in back.meta] == [0.0, 1.5, 3.0]
    for a, b in zip(some, back.entries, strict=True):
        assert a.name == b.name
        assert a.split == b.split
        assert a.stable == b.stable
        np.testing.assert_array_equal(a.pairs, b.pairs)
        np.testing.assert_array_equal(a.fc, b.fc)  # float64, bit for bit
        np.testing.assert_array_equal(a.frac, b.frac)


def test_missing_or_foreign_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(FCDatabaseError, match="steer fcdb build"):
        load_database(tmp_path / "none.h5")
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(FCDatabaseError, match="not a force-constant database"):
        load_database(tmp_path / "other.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(FCDatabaseError, match="cannot read"):
        load_database(tmp_path / "text.h5")
    code, _, err = run_steer(capsys, "fcdb", "info", str(tmp_path / "none.h5"))
    assert code == 2
    assert err.startswith("error: no force-constant database")
    assert "Traceback" not in err


def test_build_refuses_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "db.h5"
    out.write_bytes(b"")
    for args, message in (
        (("--model", "no-such-ff"), "unknown force field"),
        (("--resume", "--overwrite"), "either --resume or --overwrite"),
        (("--limit", "0"), "--limit must be at least 1"),
        (("--prototype", "spinel", "--overwrite"), "unknown prototype(s) spinel"),
        ((), "already exists"),
    ):
        code, _, err = run_steer(capsys, "fcdb", "build", "--out", str(out), *args)
        assert code == 2, (args, err)
        assert message in err
        assert "Traceback" not in err
    assert out.read_bytes() == b""  # untouched


# --------------------------------------------------------------------------------------------
# The builder's geometry on an analytic model


def _fcc_springs(a: float, n: int, k: float) -> tuple[np.ndarray, ...]:
    """Primitive fcc cell and the full FCs of nearest-neighbour central springs ``k`` (eV/A^2)
    in its n x n x n supercell."""
    lattice = a / 2 * np.array([[0.0, 1, 1], [1, 0, 1], [1, 1, 0]])
    frac = np.zeros((1, 3))
    grid = np.array([(x, y, z) for x in range(n) for y in range(n) for z in range(n)], float)
    sc_lattice = n * lattice
    sc_frac = grid / n
    xs = sc_frac @ sc_lattice
    nn = a / np.sqrt(2)
    fc = np.zeros((len(xs), len(xs), 3, 3))
    images = np.array([(x, y, z) for x in (-1, 0, 1) for y in (-1, 0, 1) for z in (-1, 0, 1)])
    for s in range(len(xs)):
        for t in range(len(xs)):
            for img in images @ sc_lattice:
                d = xs[t] + img - xs[s]
                if abs(np.linalg.norm(d) - nn) < 1e-6:
                    u = d / nn
                    fc[s, t] -= k * np.outer(u, u)
    for s in range(len(xs)):
        fc[s, s] = -fc[s].sum(axis=0)
    return lattice, frac, sc_lattice, sc_frac, fc


def test_pairs_from_supercell_reproduces_the_spring_model() -> None:
    a, k, mass = 4.0, 2.5, 27.0
    lattice, frac, sc_lattice, sc_frac, fc = _fcc_springs(a, 3, k)
    pairs, blocks, diag = pairs_from_supercell(lattice, frac, sc_lattice, sc_frac, fc, 3.0)
    assert len(pairs) == 13
    assert diag["max_split_bond"] == 0.0
    entry = FCEntry(
        name="X-fcc-test",
        prototype="fcc",
        numbers=np.array([13]),
        lattice=lattice,
        frac=frac,
        model="test",
        pairs=pairs,
        fc=blocks,
        stable=True,
        min_freq_thz=0.0,
        split="train",
    )
    c = check_entry(entry)
    assert c["asr"] < 1e-12
    assert c["transpose"] == 0.0
    bonds = entry.bond_vectors()
    for b, phi, p in zip(bonds, blocks, pairs, strict=True):
        if p[2:].any():
            u = b / np.linalg.norm(b)
            np.testing.assert_allclose(phi, -k * np.outer(u, u), atol=1e-12)
    np.testing.assert_allclose(blocks[0], 4 * k * np.eye(3), atol=1e-12)  # 12 u u^T = 4 I
    # dispersion against the closed form D(q) = k/m sum_nn (1 - cos q.r) u u^T
    rng = np.random.default_rng(7)
    q = rng.uniform(-0.5, 0.5, (20, 3))
    got = frequencies_at([13], frac, pairs, blocks, q, masses=[mass])
    nn = bonds[pairs[:, 2:].any(axis=1)]
    u = nn / np.linalg.norm(nn, axis=1)[:, None]
    phase = 2 * np.pi * (q @ (nn @ np.linalg.inv(lattice)).T)  # q in r.l.u., R in cells
    dyn = np.einsum("qn,nab->qab", 1 - np.cos(phase), k * u[:, :, None] * u[:, None, :]) / mass
    want = np.sqrt(np.clip(np.linalg.eigvalsh(dyn), 0, None)) * VASP_TO_THZ
    np.testing.assert_allclose(np.sort(got, axis=1), want, atol=1e-9)


def test_split_images_are_reported() -> None:
    """In a 2x2x2 supercell the nearest neighbours sit at half a supercell vector: their blocks
    are shared between the two images (phonopy's convention) and that is flagged."""
    lattice, frac, sc_lattice, sc_frac, fc = _fcc_springs(4.0, 2, 1.0)
    pairs, blocks, diag = pairs_from_supercell(lattice, frac, sc_lattice, sc_frac, fc, 3.0)
    np.testing.assert_allclose(diag["max_split_bond"], 4.0 / np.sqrt(2))
    np.testing.assert_allclose(blocks.sum(axis=0), 0.0, atol=1e-12)
    lattice_vectors = (frac[pairs[:, 1]] + pairs[:, 2:] - frac[pairs[:, 0]]) @ lattice
    for b, phi, p in zip(lattice_vectors, blocks, pairs, strict=True):
        if p[2:].any():  # each of the two images carries half of the doubled supercell spring
            u = b / np.linalg.norm(b)
            np.testing.assert_allclose(phi, -np.outer(u, u), atol=1e-12)


def test_choose_supercell_holds_every_bond_once() -> None:
    # fcc a = 4.04 A: the 4th shell (a sqrt 2 = 5.71 A) is the last one within 6 A, so the
    # supercell's shortest vector must exceed 11.43 A: the 3x3x3 conventional cube (108 atoms)
    lattice = 4.04 / 2 * np.array([[0.0, 1, 1], [1, 0, 1], [1, 1, 0]])
    p, short, d_max = choose_supercell(lattice, np.zeros((1, 3)), 6.0)
    np.testing.assert_allclose(d_max, 4.04 * np.sqrt(2))
    assert round(abs(np.linalg.det(p))) == 108
    assert short > 2 * d_max
    np.testing.assert_allclose(short, 3 * 4.04)
    # a 5-atom perovskite cell
    cube = 3.9 * np.eye(3)
    frac = np.array([[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    p, short, d_max = choose_supercell(cube, frac, 6.0)
    assert short > 2 * d_max
    assert d_max <= 6.0


# --------------------------------------------------------------------------------------------
# Catalogue and split


def test_catalogue_structures_have_their_space_groups() -> None:
    import spglib

    cands = catalogue()
    assert len(cands) >= 300
    assert len({c.crystal_id for c in cands}) == len(cands)
    assert {c.prototype for c in cands} == set(PROTOTYPES)
    for c in cands:
        at = c.atoms()
        cell = (np.array(at.cell[:]), at.get_scaled_positions(), at.numbers)
        ds = spglib.get_symmetry_dataset(cell, symprec=1e-3)
        assert ds is not None, c.crystal_id
        assert ds.number == SPACEGROUP[c.prototype], c.crystal_id
        dist = at.get_all_distances(mic=True) + 99 * np.eye(len(at))
        assert dist.min() > 1.0, c.crystal_id


def test_catalogue_limits_are_diverse() -> None:
    first = catalogue()[: len(PROTOTYPES)]
    assert [c.prototype for c in first] == list(PROTOTYPES)


def test_split_is_seeded_stratified_and_order_free() -> None:
    cands = catalogue()
    a = assign_splits(cands, seed=0)
    assert a == assign_splits(list(reversed(cands)), seed=0)
    assert a != assign_splits(cands, seed=1)
    frac_test = np.mean([v == "test" for v in a.values()])
    frac_val = np.mean([v == "val" for v in a.values()])
    assert 0.07 < frac_test < 0.13
    assert 0.07 < frac_val < 0.13
    test_protos = {c.prototype for c in cands if a[c.crystal_id] == "test"}
    assert len(test_protos) >= 10


# --------------------------------------------------------------------------------------------
# End to end with a real force field


@pytest.mark.mlff
def test_build_two_crystals_crash_and_resume(tmp_path: Path) -> None:
    """A real build of two CsCl-type crystals: killed (SIGKILL) after the first one, resumed."""
    from simulations.fcdb import mlff

    if "sevennet-0" not in mlff.available_models():
        pytest.skip("sevennet-0 is not installed (make mlff)")
    out = tmp_path / "db.h5"
    args = ["fcdb", "build", "--out", str(out), "--prototype", "cscl", "--limit", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "steering.cli", *args, "--jobs", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    parts = tmp_path / "db.h5.parts"
    deadline = time.monotonic() + 600
    while not (parts.is_dir() and any(parts.glob("*.h5"))):
        assert proc.poll() is None, "the build ended before its first crystal"
        assert time.monotonic() < deadline, "no crystal finished in 10 minutes"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = steer(*args, "--jobs", "1", "--resume", "--json", timeout=900)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["n_candidates"] == 2
    assert summary["n_failed"] == 0
    # the crystal finished before the kill was kept (packed from its part), the other computed
    assert summary["n_already_done"] + summary["n_computed"] == 2
    assert summary["n_already_done"] >= 1
    entries = load_database(out, include_unstable=True)
    assert sorted(e.crystal_id for e in entries) == ["CsBr-cscl", "CsCl-cscl"]
    for e in entries:
        c = check_entry(e)
        assert c["asr"] <= 1e-10 * c["scale"]
        assert c["transpose"] <= 1e-12 * c["scale"]
    again = steer(*args, "--jobs", "1", "--resume", "--json", timeout=300)
    assert json.loads(again.stdout)["n_computed"] == 0
    assert not parts.exists()
    info = json.loads(steer("fcdb", "info", str(out), "--json").stdout)
    assert len(info["provenance"]["sessions"]) >= 2
