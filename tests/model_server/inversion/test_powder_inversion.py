"""The powder inversion end to end on tiny inputs: a powder training set, both VAE variants
trained for an epoch, the frozen artifact, estimates from a folded powder run through
``steer estimate``, the wrong-kind errors, and the evaluation report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from model_server.exceptions import ArtifactError, SampleKindError
from model_server.inversion.artifact import load_model
from model_server.inversion.kinds import model_kind
from model_server.inversion.powder.artifact import load_powder_model
from model_server.inversion.powder.evaluation import evaluate_powder_model, nmse
from model_server.inversion.powder.inference import PowderEstimator
from model_server.inversion.powder.training import (
    PowderTrainConfig,
    noisy_spectra,
    train_powder_model,
)
from simulations.fcdb.powder_dataset import (
    ARCS_TWO_THETA_DEG,
    PowderSpec,
    generate_powder_dataset,
    kinematic_mask,
    read_powder_dataset,
)
from tests.commands import steer
from tests.paths import MODELS

#: Few directions: the tests check the plumbing, not the physics of the average.
SPEC = PowderSpec(material="Al", directions=16)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pdata") / "al_powder.h5"
    generate_powder_dataset(SPEC, 64, out, seed=1, progress=False)
    return out


@pytest.fixture(scope="module")
def models(tiny_set: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pmodels")
    out = {}
    for variant in ("fc", "cnn"):
        cfg = PowderTrainConfig(
            variant=variant, vae_epochs=1, regressor_epochs=1, calibration_samples=8, seed=2
        )
        train_powder_model("Al", tiny_set, root / variant, config=cfg, progress=False)
        out[variant] = root / variant
    return out


@pytest.fixture(scope="module")
def powder_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from consumers.offline import fold_recorded_run
    from simulations.runs.simulate import RunPlan, simulate_run

    root = tmp_path_factory.mktemp("prun")
    plan = RunPlan(
        material="Al", powder=True, omegas=(0.0,) * 2, ei=50.0, temperature=300.0,
        events_per_orientation=5e4, count_time=2.0, mesh=16, seed=3,
    )  # fmt: skip
    simulate_run(plan, root / "al.steer", progress=False)
    fold_recorded_run(root / "al.steer", out=root / "iqe.h5", progress=False)
    return root / "iqe.h5"


def test_powder_training_set_layout(tiny_set: Path) -> None:
    data = read_powder_dataset(tiny_set)
    assert data["sample_kind"] == "powder"
    # the powder grid at Ei 50 (200 |Q| x 90 E bins) cropped to 0-10 1/A x 10-45 meV
    assert data["spectra"].shape == (64, 200, 70)
    assert data["kinematic_mask"].shape == (200, 70)
    assert data["crop"]["e_bins"] == [20, 90]
    assert data["energy_edges"][0] == pytest.approx(10.0)
    assert list(data["fc_names"]) == ["1NN_xx", "1NN_zz", "1NN_xy", "2NN_xx", "2NN_yy"]
    lo, hi = data["domain"][:, 0], data["domain"][:, 1]
    assert np.all((data["fc"] >= lo) & (data["fc"] <= hi))
    # 0.5 .. 1.5 x reference: the domain's ends are a factor 3 apart
    np.testing.assert_allclose(np.maximum(hi / lo, lo / hi), 3.0, rtol=1e-9)
    assert data["averaging"]["method"] == "shells"
    assert data["averaging"]["q_sigma_inv_angstrom"] == pytest.approx(0.04)
    assert np.all(np.isfinite(data["spectra"]))
    assert data["spectra"][:, data["kinematic_mask"]].mean() > 0


def test_kinematic_mask_shape_of_the_limit() -> None:
    q = np.linspace(0, 10, 201)
    e = np.linspace(10, 45, 71)
    m = kinematic_mask(q, e, 50.0, (3.0, 135.0))
    # at 44.75 meV (k_f ~ 1.6 1/A, k_i ~ 4.9 1/A) only |Q| ~ 3.4..6.3 1/A is reached
    row = m[:, -1]
    assert not row[:50].any()
    assert row[80:110].any()
    assert not row[140:].any()
    assert m[:, 0].sum() > row.sum()


def test_two_theta_range_is_the_instruments() -> None:
    from simulations.instrument.spectrometer import Instrument

    pos = Instrument.arcs_like().positions
    tt = np.rad2deg(np.arccos(pos[:, 2] / np.linalg.norm(pos, axis=1)))
    np.testing.assert_allclose(ARCS_TWO_THETA_DEG, (tt.min(), tt.max()), atol=1e-3)


def test_noise_keeps_the_scale(tiny_set: Path) -> None:
    data = read_powder_dataset(tiny_set)
    x = torch.from_numpy(data["spectra"][:8])
    mask = torch.from_numpy(data["kinematic_mask"])
    g = torch.Generator().manual_seed(0)
    noisy = noisy_spectra(x, mask, torch.full((8,), 1e6), torch.zeros(8), g)
    # 1e6 counts over the crop: the totals agree within a few 1e-3 (Poisson: 1e-3)
    ratio = noisy.sum(dim=(1, 2)) / (x * mask).sum(dim=(1, 2))
    assert torch.all((ratio - 1).abs() < 5e-3)
    assert float(noisy[:, ~mask].abs().max()) == 0.0


def test_both_variants_train_and_load(models: dict[str, Path]) -> None:
    for variant, path in models.items():
        assert model_kind(path) == "powder"
        meta = json.loads((path / "model.json").read_text())
        assert meta["sample_kind"] == "powder"
        assert meta["variant"] == variant
        assert meta["crop"]["e_meV"] == [10.0, 45.0]
        assert meta["grid"]["n_q"] == 200
        assert meta["grid"]["n_e"] == 90
        assert (path / "loss_curves.png").stat().st_size > 0
        model = load_powder_model(path)
        assert model.fc_names[0] == "1NN_xx"
        assert (path / "weights.pt").stat().st_size < 8e6
    with pytest.raises(ArtifactError, match="powder model"):
        load_model(models["fc"])
    with pytest.raises(ArtifactError, match="single-crystal"):
        load_powder_model(MODELS / "ge")


def test_estimate_a_folded_powder_run(models: dict[str, Path], powder_run: Path) -> None:
    for path in models.values():
        est = PowderEstimator(path, n_samples=16).estimate_file(powder_run)
        assert len(est.mean) == 5
        assert np.all(np.isfinite(est.mean))
        assert np.all(np.isfinite(est.std))
        assert np.all(est.std > 0)
        assert est.extra["sample_kind"] == "powder"
        assert 0 < est.extra["measured_fraction_of_crop"] <= 1
    done = steer("estimate", str(powder_run), "--model", str(models["fc"]), "--json")
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    assert set(out["fc"]) == {"1NN_xx", "1NN_zz", "1NN_xy", "2NN_xx", "2NN_yy"}
    assert all(np.isfinite(v["std"]) for v in out["fc"].values())
    # --refine: the likelihood refinement of the counts, started from the model's estimate
    done = steer("estimate", str(powder_run), "--model", str(models["fc"]), "--refine", "--json")
    assert done.returncode == 0, done.stderr
    both: dict[str, Any] = json.loads(done.stdout)
    assert set(both) == {"vae", "refined"}
    assert both["refined"]["names"] == ["1NN_xx", "1NN_zz", "1NN_xy", "2NN_xx", "2NN_yy"]
    assert all(v > 0 for v in both["refined"]["std"].values())


def test_wrong_sample_kind_is_a_clear_error(
    models: dict[str, Path], powder_run: Path, tmp_path: Path
) -> None:
    # a single-crystal model given a powder run
    done = steer("estimate", str(powder_run), "--model", str(MODELS / "ge"), "--json")
    assert done.returncode == 2
    assert "powder run" in done.stderr
    assert "single-crystal model" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    # a powder model given a single-crystal folded file (entry without sample_kind)
    crystal = tmp_path / "ge_iqe.h5"
    with h5py.File(crystal, "w") as f:
        entry = f.create_group("entry")
        entry.attrs["grid_fingerprint"] = "0123456789abcdef"
        entry.create_dataset("iqe/intensity", data=np.ones((200, 100)))
    done = steer("estimate", str(crystal), "--model", str(models["fc"]), "--json")
    assert done.returncode == 2
    assert "single-crystal run" in done.stderr
    assert "powder model" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    with pytest.raises(SampleKindError):
        PowderEstimator(models["cnn"], n_samples=4).estimate_file(crystal)


def test_evaluation_report(models: dict[str, Path], tiny_set: Path, tmp_path: Path) -> None:
    test = tmp_path / "test.h5"
    generate_powder_dataset(SPEC, 24, test, seed=9, progress=False)
    report = evaluate_powder_model(
        models["fc"], test, noise_counts=(1e5,), n_nmse=4, n_samples=8, progress=False
    )
    assert set(report["conditions"]) == {"clean", "counts_1e+05"}
    clean = report["conditions"]["clean"]
    assert set(clean["r2"]) == {"1NN_xx", "1NN_zz", "1NN_xy", "2NN_xx", "2NN_yy"}
    assert 0 <= clean["coverage_1sigma_all"] <= 1
    assert clean["nmse"]["n"] == 4
    assert clean["nmse"]["to_input_mean"] >= 0
    assert clean["nmse"]["floor_truth_to_input_mean"] == pytest.approx(0.0, abs=1e-12)
    saved = json.loads((models["fc"] / "evaluation.json").read_text())
    assert saved["test_set"]["seed"] == 9
    # the training set's seed is refused
    from model_server.exceptions import TrainingError

    with pytest.raises(TrainingError, match="seed"):
        evaluate_powder_model(models["fc"], tiny_set, n_nmse=2, progress=False, write=False)


def test_nmse_is_zero_for_equal_shapes_and_scale_free() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((3, 10, 8))
    mask = np.ones((10, 8), dtype=bool)
    assert np.allclose(nmse(5.0 * a, a, mask), 0.0)
    assert np.all(nmse(a[::-1], a, mask)[[0, 2]] > 0)


def test_cli_powder_dataset_and_train(tmp_path: Path) -> None:
    data = tmp_path / "al_powder.h5"
    done = steer(
        "simulate", "dataset", "--powder", "--material", "Al", "--n", "24", "--ei", "50",
        "--temperature", "300", "--seed", "4", "--averaging", "directions", "--directions", "16",
        "--out", str(data),
        "--quiet", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["sample_kind"] == "powder"
    assert summary["spectra_shape"] == [24, 200, 70]
    assert summary["spec"]["averaging"] == "directions"
    done = steer(
        "train", "--powder", "--variant", "cnn", "--material", "Al", "--data", str(data),
        "--out", str(tmp_path / "m"), "--vae-epochs", "1", "--regressor-epochs", "1",
        "--threads", "1", "--quiet", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["variant"] == "cnn"
    assert out["minutes"]["total"] > 0
    assert json.loads((tmp_path / "m" / "model.json").read_text())["sample_kind"] == "powder"
    bad = steer("train", "--powder", "--variant", "mlp", "--data", str(data), "--out", "x")
    assert bad.returncode == 2
    assert "variant" in bad.stderr


def test_active_latent_dimensions(models: dict[str, Path], tiny_set: Path) -> None:
    """Per-dimension KL of the encoder over a data set: non-negative, sorted copy, and the
    active count is those above the threshold."""
    from model_server.inversion.powder.latent import active_dimensions

    data = read_powder_dataset(tiny_set)
    for path in models.values():
        r = active_dimensions(path, data["spectra"])
        kl = np.array(r["kl_per_dimension"])
        assert r["latent"] == len(kl) == 30
        assert r["n_fc"] == 5
        assert np.all(kl >= 0)
        assert r["kl_sorted"] == sorted(r["kl_per_dimension"], reverse=True)
        assert r["active"] == int(np.sum(kl > r["threshold_nats"]))
        everything = active_dimensions(path, data["spectra"], threshold=0.0)
        assert everything["active"] == int(np.sum(kl > 0))
