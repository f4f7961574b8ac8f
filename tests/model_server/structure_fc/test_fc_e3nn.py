"""The structure -> force-constant e3nn model (model_server.structure_fc.model): the committed model
loads and predicts; its output is equivariant, obeys pair symmetry and the acoustic sum rule,
carries the crystal's space-group symmetry; bad input gives clear errors; far-off structures
are flagged; a tiny training run lowers the loss. Phonon helper checked against the
symmetry-reduced FC basis' own dynamical matrix."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from model_server import ModelServerError
from model_server.exceptions import ArtifactError
from model_server.structure_fc.dataset import reference_samples
from model_server.structure_fc.evaluation import dos_metrics
from model_server.structure_fc.graph import build_graph
from model_server.structure_fc.model import (
    MAX_ATOMS,
    CellTooLargeError,
    FCModel,
    InvalidStructureError,
    UnknownElementError,
    build_net,
    load_fc_model,
)
from model_server.structure_fc.network import NetConfig, collate, constrain
from model_server.structure_fc.settings import TrainSettings
from model_server.structure_fc.train import prepare, train
from simulations.lattice.materials import setup
from simulations.lattice.pair_phonons import frequencies_at, mesh_frequencies
from simulations.units import VASP_TO_THZ
from tests.paths import REPO

REPO = REPO


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Small graphs: one torch thread is faster than several (and than fighting for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> FCModel:
    return load_fc_model()


@pytest.fixture(scope="module")
def ge() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ge (diamond) primitive cell from the shipped CIF."""
    c = setup("Ge").crystal
    return c.numbers, c.lattice, c.positions


def _known_structure(model: FCModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A rock-salt cell of two elements the model knows (a = 2 x 1.1 x sum of radii)."""
    from ase.data import covalent_radii

    z1, z2 = model.species[0], model.species[-1]
    a = 2.2 * (covalent_radii[z1] + covalent_radii[z2])
    lattice = 0.5 * a * np.array([[0.0, 1, 1], [1, 0, 1], [1, 1, 0]])
    return np.array([z1, z2]), lattice, np.array([[0.0, 0, 0], [0.5, 0.5, 0.5]])


def _low_symmetry(model: FCModel, seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A known-element cell with its atoms and lattice perturbed (no symmetry left)."""
    rng = np.random.default_rng(seed)
    z, lattice, frac = _known_structure(model)
    z = np.concatenate([z, z[::-1]])  # four atoms: the rock salt with a zinc-blende twin
    lattice = lattice @ (np.eye(3) + 0.03 * rng.standard_normal((3, 3)))
    frac = np.concatenate([frac, frac + 0.25]) + 0.02 * rng.standard_normal((4, 3))
    return z, lattice, frac


# -- the committed model -------------------------------------------------------------------


def test_committed_model_loads_small_and_versioned(model: FCModel) -> None:
    meta = json.loads((REPO / "models" / "fc_e3nn" / "model.json").read_text())
    assert model.version == meta["version"]
    assert model.version.startswith("fc_e3nn-")
    assert (REPO / "models" / "fc_e3nn" / "weights.pt").stat().st_size < 5e6
    assert len(model.nets) == meta["members"] >= 2
    assert model.elements
    assert model.cutoff > 4.0
    assert "training_set_fingerprint" in meta["provenance"]
    assert "command" in meta["provenance"]


def test_prediction_obeys_pair_symmetry_and_sum_rule(model: FCModel) -> None:
    z, lattice, frac = _low_symmetry(model)
    p = model.predict(z, lattice, frac)
    key = {tuple(row): k for k, row in enumerate(p.pairs.tolist())}
    assert len(key) == len(p.pairs)  # no pair twice
    rev = [key[(j, i, -a, -b, -c)] for i, j, a, b, c in p.pairs.tolist()]
    np.testing.assert_allclose(p.fc[rev], p.fc.transpose(0, 2, 1), atol=1e-12)
    total = np.zeros((len(z), 3, 3))
    np.add.at(total, p.pairs[:, 0], p.fc)
    np.testing.assert_allclose(total, 0.0, atol=1e-10)  # rows (i) sum to zero
    total = np.zeros((len(z), 3, 3))
    np.add.at(total, p.pairs[:, 1], p.fc)
    np.testing.assert_allclose(total, 0.0, atol=1e-10)  # and columns (j)
    # No free rigid-body mode: the three acoustic modes at Gamma are zero.
    w = frequencies_at(z, frac, p.pairs, p.fc, np.zeros((1, 3)))[0]
    assert np.sort(np.abs(w))[:3].max() < 1e-4
    assert p.spread is not None
    assert p.spread.shape == p.fc.shape
    assert np.all(p.spread >= 0)


def test_equivariance_rotating_the_structure_rotates_the_tensors(model: FCModel) -> None:
    z, lattice, frac = _low_symmetry(model)
    rot = Rotation.random(random_state=7).as_matrix()
    a = model.predict(z, lattice, frac)
    b = model.predict(z, lattice @ rot.T, frac)
    np.testing.assert_array_equal(a.pairs, b.pairs)
    expected = rot @ a.fc @ rot.T
    err = float(np.abs(b.fc - expected).max())
    assert err <= 1e-5, err
    assert err < 1e-9 * max(1.0, float(np.abs(a.fc).max()))  # float64: far below the bound
    assert b.distance == pytest.approx(a.distance, rel=1e-8, abs=1e-10)
    # Inversion of the structure (an improper rotation) too: Phi is a rank-2 polar tensor.
    c = model.predict(z, -lattice, frac)
    np.testing.assert_allclose(c.fc, a.fc, atol=1e-9)


def test_prediction_carries_the_space_group(model: FCModel) -> None:
    """The predicted FCs of a symmetric crystal lie in its symmetry-reduced FC space."""
    from simulations.lattice.crystals import Crystal
    from simulations.lattice.force_constants import build_fc_basis

    z, lattice, frac = _known_structure(model)
    from ase.data import atomic_masses, chemical_symbols

    crystal = Crystal(
        name="test",
        lattice=lattice,
        positions=frac,
        species=tuple(chemical_symbols[int(v)] for v in z),
        masses=atomic_masses[z],
        conventional_lattice=np.eye(3) * 2 * lattice[0, 1],
        spacegroup="Fm-3m",
        spacegroup_number=225,
        lattice_type="fcc",
    )
    basis = build_fc_basis(crystal, cutoff=model.cutoff - 1e-3)
    p = model.predict(z, lattice, frac)
    key = {tuple(row): k for k, row in enumerate(p.pairs.tolist())}
    rows = np.array([key[tuple(r)] for r in basis.pairs.tolist()])
    target = p.fc[rows].reshape(-1)
    design = basis.blocks.transpose(1, 2, 3, 0).reshape(-1, basis.n_coefficients)
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    resid = np.linalg.norm(design @ coef - target) / np.linalg.norm(target)
    assert resid < 1e-8, resid


# -- errors ------------------------------------------------------------------------------


def test_unknown_element_is_named_with_the_known_ones(model: FCModel) -> None:
    z, lattice, frac = _known_structure(model)
    unknown = next(v for v in range(1, 119) if v not in model.species)
    with pytest.raises(UnknownElementError) as info:
        model.predict(np.array([z[0], unknown]), lattice, frac)
    msg = str(info.value)
    from ase.data import chemical_symbols

    assert chemical_symbols[unknown] in msg
    assert all(s in msg for s in model.elements)
    assert isinstance(info.value, ModelServerError)


def test_too_large_cell_states_the_limit(model: FCModel) -> None:
    n = MAX_ATOMS + 1
    z = np.full(n, model.species[0])
    frac = np.random.default_rng(0).random((n, 3))
    with pytest.raises(CellTooLargeError, match=rf"{n} atoms.*at most {MAX_ATOMS}"):
        model.predict(z, np.eye(3) * 30.0, frac)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("nan_lattice", "NaN or inf"),
        ("nan_frac", "NaN or inf"),
        ("flat_lattice", "degenerate"),
        ("overlap", "closer than"),
        ("shape", "frac must be"),
        ("dilute", "no neighbour"),
    ],
)
def test_bad_structures_are_refused_clearly(model: FCModel, change: str, match: str) -> None:
    z, lattice, frac = _known_structure(model)
    lattice, frac = lattice.copy(), frac.copy()
    if change == "nan_lattice":
        lattice[0, 0] = np.nan
    elif change == "nan_frac":
        frac[1, 2] = np.nan
    elif change == "flat_lattice":
        lattice[2] = lattice[0] + lattice[1]
    elif change == "overlap":
        frac[1] = frac[0] + 0.01
    elif change == "shape":
        frac = frac[:1]
    elif change == "dilute":
        lattice = lattice * 10.0
    with pytest.raises(InvalidStructureError, match=match):
        model.predict(z, lattice, frac)


def test_missing_model_directory_says_how_to_rebuild(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"steer fcmodel train"):
        load_fc_model(tmp_path / "nowhere")


# -- domain ------------------------------------------------------------------------------


def test_far_off_structure_is_flagged(model: FCModel) -> None:
    """A crystal squeezed to 70 % of its lattice constant (bonds far shorter than any
    in training) is out of domain, with a message; the ordinary one is not flagged."""
    z, lattice, frac = _known_structure(model)
    near = model.predict(z, lattice, frac)
    far = model.predict(z, 0.7 * lattice, frac)
    assert far.distance > near.distance
    assert not far.in_domain
    assert "Out of the model's domain" in far.message


# -- the network's constraints ------------------------------------------------------------


def test_constrain_is_exact_on_random_tensors_and_keeps_consistent_ones() -> None:
    rng = np.random.default_rng(0)
    lattice = np.eye(3) * 3.1 + 0.2 * rng.standard_normal((3, 3))
    frac = rng.random((3, 3))
    g = build_graph(np.array([14, 14, 8]), lattice, frac, 5.0)
    batch = collate([g], {8: 0, 14: 1}, torch.float64)
    raw = torch.from_numpy(rng.standard_normal((len(g.pairs), 3, 3)))
    bond, self_fc = constrain(raw, batch)
    b = bond.numpy()
    np.testing.assert_allclose(b[g.reverse], b.transpose(0, 2, 1), atol=1e-13)
    total = self_fc.numpy().copy()
    np.add.at(total, g.pairs[:, 0], b)
    np.testing.assert_allclose(total, 0.0, atol=1e-12)
    np.testing.assert_allclose(self_fc.numpy(), self_fc.numpy().transpose(0, 2, 1), atol=1e-12)
    # Already consistent (symmetric tensors, pair-symmetric): left unchanged.
    sym = 0.5 * (b + b.transpose(0, 2, 1))
    sym = 0.5 * (sym + sym[g.reverse].transpose(0, 2, 1))
    again, _ = constrain(torch.from_numpy(sym), batch)
    np.testing.assert_allclose(again.numpy(), sym, atol=1e-12)


def test_graph_has_every_bond_once_with_its_reverse() -> None:
    rng = np.random.default_rng(1)
    lattice = np.diag([2.9, 3.3, 4.1]) + 0.1 * rng.standard_normal((3, 3))
    frac = rng.random((2, 3)) + np.array([[0.0, 1.0, -1.0], [0, 0, 0]])  # not wrapped
    g = build_graph(np.array([13, 13]), lattice, frac, 4.5)
    # Brute force over a generous box of cells.
    expected = set()
    for i in range(2):
        for j in range(2):
            for n in np.ndindex(11, 11, 11):
                cell = np.array(n) - 5
                d = np.linalg.norm((frac[j] + cell - frac[i]) @ lattice)
                if 1e-8 < d <= 4.5:
                    expected.add((i, j, *cell.tolist()))
    assert {tuple(r) for r in g.pairs.tolist()} == expected
    rev = g.pairs[g.reverse]
    np.testing.assert_array_equal(rev[:, :2], g.pairs[:, 1::-1])
    np.testing.assert_array_equal(rev[:, 2:], -g.pairs[:, 2:])
    np.testing.assert_allclose(g.vectors[g.reverse], -g.vectors, atol=1e-12)


# -- phonons -----------------------------------------------------------------------------


def test_frequencies_match_the_symmetry_reduced_model() -> None:
    """fc_phonons on the blocks of Ge's reference FCs == the FC basis' dynamical matrix."""
    from simulations.fcdb.reference import named_fc_set

    ms = setup("Ge")
    c = named_fc_set("Ge", "mlff_mean", ms)
    q = np.random.default_rng(2).random((6, 3)) - 0.5
    d = np.einsum("k,kqij->qij", c, ms.basis.dynamical_basis(q))
    lam = np.linalg.eigvalsh(d)
    ref = np.sign(lam) * np.sqrt(np.abs(lam)) * VASP_TO_THZ
    cr = ms.crystal
    got = frequencies_at(cr.numbers, cr.positions, ms.basis.pairs, ms.basis.block_values(c), q)
    np.testing.assert_allclose(got, ref, atol=2e-3)  # mass tables differ in the 4th digit
    mp = mesh_frequencies(cr.numbers, cr.positions, ms.basis.pairs, ms.basis.block_values(c))
    assert mp.frequencies.shape == (512, 6)
    assert mp.min_frequency > -1e-3


def test_dos_metrics_identity_and_difference() -> None:
    s = reference_samples()[0]
    same = dos_metrics(s.numbers, s.frac, s.pairs, s.fc, s.pairs, s.fc, mesh=(4, 4, 4))
    assert same["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert same["stable_pred"] == 1.0
    soft = dos_metrics(s.numbers, s.frac, s.pairs, s.fc, s.pairs, 0.5 * s.fc, mesh=(4, 4, 4))
    assert soft["cosine"] < 0.9
    assert soft["mean_pred_meV"] == pytest.approx(soft["mean_ref_meV"] / np.sqrt(2), rel=1e-6)


# -- training ----------------------------------------------------------------------------


def test_tiny_training_run_lowers_the_loss(tmp_path: Path) -> None:
    samples = reference_samples()
    three = [samples[0], samples[8], samples[-1]]  # Ge, Nb, Al: one force field each
    assert {s.name.split("-")[0] for s in three} == {"Ge", "Nb", "Al"}
    settings = TrainSettings(
        epochs=10,
        members=1,
        batch_size=3,
        lr=2e-2,
        n_layers=1,
        n_scalar=8,
        n_pseudo=2,
        n_vector=2,
        n_tensor=2,
        radial_hidden=8,
        cutoff=5.0,
    )
    meta = train(three, tmp_path / "m", settings, progress=False)
    for history in meta["training"]["history"]:
        assert len(history) == 10
        # One step per epoch: epoch 0's loss is the untrained network's.
        assert history[-1]["train"] < 0.7 * history[0]["train"], history
    loaded = load_fc_model(tmp_path / "m")
    assert loaded.elements == ["Al", "Ge", "Nb"]
    # A run stopped after 6 of its 10 epochs and resumed gives the same weights as the
    # uninterrupted one.
    assert train(three, tmp_path / "r", settings, progress=False, stop_after=6) == {}
    assert (tmp_path / "r" / "checkpoint.pt").exists()
    assert not (tmp_path / "r" / "model.json").exists()
    again = train(three, tmp_path / "r", settings, progress=False, resume=True)
    assert again["version"] == meta["version"]
    assert again["training"]["history"] == meta["training"]["history"]
    s = three[0]
    p = loaded.predict(s.numbers, s.lattice, s.frac)
    assert p.distance == pytest.approx(0.0, abs=1e-6)  # a training crystal
    assert not (tmp_path / "m" / "checkpoint.pt").exists()


def test_prepare_aligns_database_blocks_with_the_graph() -> None:
    s = reference_samples()[0]  # Ge, 5 shells: the 5th (6.17 A) is beyond a 6 A cutoff
    p = prepare(s, 6.0)
    assert p.weight_bond.sum() == len(p.graph.pairs)
    # Every listed bond within the cutoff lands on its graph bond.
    vec = (s.frac[s.pairs[:, 1]] + s.pairs[:, 2:] - s.frac[s.pairs[:, 0]]) @ s.lattice
    inside = (np.linalg.norm(vec, axis=1) <= 6.0) & (np.linalg.norm(vec, axis=1) > 0)
    assert np.abs(p.target_bond).sum() == pytest.approx(np.abs(s.fc[inside]).sum())


def test_float64_network_builds_with_float64_constants() -> None:
    net = build_net(NetConfig(species=(13,), n_layers=1, n_scalar=8), torch.float64)
    assert all(b.dtype == torch.float64 for b in net.buffers() if b.is_floating_point())


def test_train_command_has_an_option_per_setting() -> None:
    """``steer fcmodel train`` offers every TrainSettings field, under its own name."""
    import dataclasses

    import typer

    from steering.cli.app import app

    group = typer.main.get_command(app).commands["fcmodel"]  # type: ignore[attr-defined]
    assert set(group.commands) == {"train", "evaluate"}
    params = {p.name: p for p in group.commands["train"].params}
    for f in dataclasses.fields(TrainSettings):
        assert f.name in params, f.name
        assert params[f.name].default == f.default, f.name
        assert f"--{f.name.replace('_', '-')}" in params[f.name].opts, f.name


def test_entry_point_reports_errors_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from steering.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(["fcmodel", "evaluate", "--db", str(tmp_path / "x.h5")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "fcdb build" in err  # the database's own message: how to build it
    assert "Traceback" not in err
