"""The domain shift of a powder model: measured-like spectra (their expectation and
counting statistics), the shift metrics, fine-tuning (both modes, the artifact it writes,
its errors, ``steer finetune``) and the latent-space tools (maps, latent chi^2, the
profile deviance)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model_server.exceptions import TrainingError
from model_server.inversion.powder.artifact import load_powder_model
from model_server.inversion.powder.domain import (
    MeasuredLikeSpec,
    measured_like,
    read_measured_like,
    shift_metrics,
    write_measured_like,
)
from model_server.inversion.powder.finetune import finetune_powder_model
from model_server.inversion.powder.inference import PowderEstimator
from model_server.inversion.powder.latent import latent_chi2, latent_map, latent_means
from model_server.inversion.powder.latent_study import (
    _minimum,
    _poisson_deviance,
    _profile_deviance,
)
from model_server.inversion.powder.training import PowderTrainConfig, train_powder_model
from simulations.fcdb.powder_dataset import PowderSpec, generate_powder_dataset, read_powder_dataset
from simulations.instrument.spectrometer import Instrument
from simulations.lattice.backgrounds import powder_multiphonon
from simulations.lattice.materials import setup
from simulations.lattice.sqe import CoherentSQE
from tests.commands import steer

#: Few directions: the tests check the plumbing, not the physics of the average.
SPEC = PowderSpec(material="Al", directions=16, averaging="directions")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pdomain")
    generate_powder_dataset(SPEC, 64, root / "train.h5", seed=1, progress=False)
    generate_powder_dataset(SPEC, 24, root / "test.h5", seed=9, progress=False)
    cfg = PowderTrainConfig(variant="fc", vae_epochs=1, regressor_epochs=1, calibration_samples=8)
    train_powder_model("Al", root / "train.h5", root / "fc", config=cfg, progress=False)
    return {
        "train": root / "train.h5",
        "test": root / "test.h5",
        "model": root / "fc",
        "root": root,
    }


def test_measured_like_expectation_is_the_components(tiny: dict[str, Path]) -> None:
    """At 1e13 events the spectrum is close to its expectation: S_1 + S_mp + the flat background's
    events spread by its shape, divided by k X; the background holds its share."""
    data = read_powder_dataset(tiny["test"])
    spec = MeasuredLikeSpec(counts_range=(1e13, 1e13), background_share=(0.1, 0.1), seed=4)
    ml = measured_like(data, [0, 1], spec, progress=False)
    mask = ml["mask"]
    assert mask.sum() > 1000
    assert np.all(np.isnan(ml["spectra"][:, ~mask]))
    basis = setup("Al", shells=2).basis
    q = 0.5 * (data["q_edges"][1:] + data["q_edges"][:-1])
    e = 0.5 * (data["energy_edges"][1:] + data["energy_edges"][:-1])
    res = Instrument.arcs_like().resolution(50.0)
    for i in range(2):
        model = CoherentSQE(basis, data["fc"][i], temperature=300.0, resolution=res)
        mp = powder_multiphonon(model, q, e)[mask]
        s1 = np.clip(data["spectra"][i][mask], 0, None)
        x, t, k = ml["exposure"][mask], ml["flat_background"][mask], ml["scale"][i]
        bkg = np.zeros(mask.shape)  # background events per bin
        bkg[mask] = (ml["spectra"][i][mask] - s1 - mp) * k * x
        assert bkg.sum() == pytest.approx(1e12, rel=1e-4)
        expected = np.zeros(mask.shape)
        expected[mask] = 1e12 * t / t.sum()
        # per energy column (the counting noise of a bin is a few % of its background)
        np.testing.assert_allclose(bkg.sum(axis=0), expected.sum(axis=0), rtol=2e-3, atol=1e6)
        assert 0.05 < ml["multiphonon_share"][i] < 0.9


def test_measured_like_counts_are_poisson(tiny: dict[str, Path]) -> None:
    data = read_powder_dataset(tiny["test"])
    ml = measured_like(
        data, np.arange(8), MeasuredLikeSpec(counts_range=(1e4, 1e4)), progress=False
    )
    mask = ml["mask"]
    events = np.nan_to_num(ml["spectra"])[:, mask] * ml["scale"][:, None] * ml["exposure"][mask]
    np.testing.assert_allclose(events, np.rint(events), atol=1e-3)  # whole counts
    totals = events.sum(axis=1)
    assert np.all(np.abs(totals - 1e4) < 5 * np.sqrt(1e4))  # Poisson about the expectation
    again = measured_like(
        data, np.arange(8), MeasuredLikeSpec(counts_range=(1e4, 1e4)), progress=False
    )
    np.testing.assert_array_equal(again["spectra"], ml["spectra"])  # seeded


def test_measured_like_file_round_trip(tiny: dict[str, Path], tmp_path: Path) -> None:
    data = read_powder_dataset(tiny["test"])
    ml = measured_like(data, [3, 5], progress=False)
    path = write_measured_like(tmp_path / "ml.h5", ml, str(tiny["test"]))
    back = read_measured_like(path)
    np.testing.assert_array_equal(back["spectra"], ml["spectra"])
    assert back["fc_names"] == ml["fc_names"]
    assert back["spec"]["seed"] == 0
    with pytest.raises(TrainingError, match="not a measured-like"):
        read_measured_like(tiny["test"])


def test_measured_like_spec_errors() -> None:
    with pytest.raises(TrainingError, match="counts_range"):
        MeasuredLikeSpec(counts_range=(0, 1))
    with pytest.raises(TrainingError, match="background_share"):
        MeasuredLikeSpec(background_share=(0.5, 1.0))


def test_shift_metrics() -> None:
    truth = np.array([[0.0, 1.0], [1.0, 2.0], [2.0, 3.0], [3.0, 5.0]])
    mean = truth + np.array([0.1, -0.2])
    std = np.array([[0.05, 0.3]] * 4)
    r = shift_metrics(mean, std, truth, ["a", "b"])
    assert r["bias"] == {"a": pytest.approx(0.1), "b": pytest.approx(-0.2)}
    assert r["rmse"]["a"] == pytest.approx(0.1)
    assert r["coverage_1sigma"] == {"a": 0.0, "b": 1.0}
    assert r["r2"]["a"] == pytest.approx(1 - 4 * 0.01 / 5.0)


@pytest.mark.parametrize("mode", ["measured", "extended"])
def test_finetune_writes_a_model(tiny: dict[str, Path], tmp_path: Path, mode: str) -> None:
    data = read_powder_dataset(tiny["train"])
    ml = measured_like(data, np.arange(6), progress=False)
    out = tmp_path / mode
    summary = finetune_powder_model(
        tiny["model"],
        tiny["train"],
        out,
        measured=ml["spectra"] if mode == "measured" else None,
        mode=mode,
        epochs=1,
        steps_per_epoch=2,
        progress=False,
    )
    assert summary["mode"] == mode
    assert summary["lr"] == pytest.approx(1e-4)
    base, new = load_powder_model(tiny["model"]), load_powder_model(out)
    assert new.meta["finetune"]["mode"] == mode
    assert new.meta["finetune"]["from_version"] == base.version
    assert new.version != base.version
    w0 = base.vae.state_dict()
    changed = [k for k, v in new.vae.state_dict().items() if not torch.equal(v, w0[k])]
    assert any(k.startswith("encoder") for k in changed)  # the encoder was trained
    est = PowderEstimator(out, n_samples=8).estimate_batch(ml["spectra"][:2])
    assert len(est) == 2
    assert np.all(np.isfinite(est[0].mean))
    assert (out / "loss_curves.png").stat().st_size > 0


def test_finetune_errors(tiny: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="mode"):
        finetune_powder_model(tiny["model"], tiny["train"], tmp_path / "x", mode="other")
    with pytest.raises(TrainingError, match="at least 2"):
        finetune_powder_model(tiny["model"], tiny["train"], tmp_path / "x", measured=None)
    with pytest.raises(TrainingError, match="crop"):
        finetune_powder_model(
            tiny["model"], tiny["train"], tmp_path / "x", measured=np.ones((3, 10, 10))
        )
    with pytest.raises(TrainingError, match="not the training set"):
        finetune_powder_model(
            tiny["model"], tiny["test"], tmp_path / "x", measured=np.ones((3, 200, 70))
        )


def test_cli_finetune(tiny: dict[str, Path], tmp_path: Path) -> None:
    """On a measured-like set and a folded powder run (steer fold --out) together."""
    from consumers.offline import fold_recorded_run
    from simulations.runs.simulate import RunPlan, simulate_run

    data = read_powder_dataset(tiny["train"])
    path = write_measured_like(
        tmp_path / "ml.h5", measured_like(data, np.arange(4), progress=False), "train"
    )
    plan = RunPlan(
        material="Al", powder=True, omegas=(0.0,) * 2, ei=50.0, temperature=300.0,
        events_per_orientation=3e4, count_time=2.0, mesh=16, seed=3,
    )  # fmt: skip
    simulate_run(plan, tmp_path / "al.steer", progress=False)
    fold_recorded_run(tmp_path / "al.steer", out=tmp_path / "al.h5", progress=False)
    r = steer(
        "finetune", "--model", tiny["model"], "--data", tiny["train"], "--measured", path,
        "--measured", tmp_path / "al.h5", "--out", tmp_path / "ft", "--epochs", "1", "--json",
        "--quiet",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["mode"] == "measured"
    assert load_powder_model(tmp_path / "ft").meta["finetune"]["n_spectra"] == 5
    bad = steer("finetune", "--model", tiny["model"], "--data", tiny["train"], "--study")
    assert bad.returncode == 2
    assert "--test" in bad.stderr


def test_latent_tools(tiny: dict[str, Path]) -> None:
    data = read_powder_dataset(tiny["test"])
    x = np.where(data["kinematic_mask"][None], data["spectra"], np.nan)
    mu = latent_means(tiny["model"], x)
    assert mu.shape == (24, 30)
    np.testing.assert_allclose(latent_means(tiny["model"], x[:3]), mu[:3], rtol=1e-5, atol=1e-6)
    m = latent_map(mu, "pca")
    assert m["xy"].shape == (24, 2)
    assert 0 < sum(m["explained"]) <= 1 + 1e-9
    assert m["explained"][0] >= m["explained"][1]
    c2 = latent_chi2(mu[0], mu[:4])
    assert c2[0] == 0
    assert np.all(c2[1:] > 0)
    with pytest.raises(ValueError, match="pca"):
        latent_map(mu, "tsne")


def test_profile_deviance_and_minimum() -> None:
    rng = np.random.default_rng(0)
    signal = rng.uniform(0.5, 2.0, 400)
    flat = np.linspace(1.0, 3.0, 400)
    y = rng.poisson(50.0 * signal + 4.0 * flat).astype(float)
    best = _profile_deviance(y, signal, flat)
    assert best <= _poisson_deviance(y, 50.0 * signal + 4.0 * flat) + 1e-9
    assert best < 1.3 * len(y)  # ~ chi^2 with 398 degrees of freedom
    x = np.linspace(-1, 1, 11)
    at, curv = _minimum(x, 3.0 * (x - 0.13) ** 2 + 1.0)
    assert at == pytest.approx(0.13)
    assert curv == pytest.approx(6.0)
    assert np.isnan(_minimum(x, x)[1])  # at the edge: no curvature


def test_cli_latent_study(tiny: dict[str, Path], tmp_path: Path) -> None:
    r = steer(
        "evaluate", "--model", tiny["model"], "--data", tiny["test"], "--latent", "--n", "24",
        "--truths", "1", "--figures", tmp_path, "--no-write", "--json", "--quiet",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["active_dimensions"]["latent"] == 30
    assert out["maps"][0]["method"] == "pca"
    scan = out["chi2_scan"]["per_coefficient"]
    assert set(scan) == {"1NN_xx", "1NN_zz", "1NN_xy", "2NN_xx", "2NN_yy"}
    # the deviance of the counts has its minimum near the truth (1 truth, 21 offsets)
    assert abs(scan["1NN_xx"]["deviance_min_offset_pct"]["mean"]) < 5
    for name in ("al_powder_latent_map.png", "al_powder_latent_chi2.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    no_data = steer("evaluate", "--model", tiny["model"], "--latent")
    assert no_data.returncode == 2
    assert "--data" in no_data.stderr


def test_torch_measured_like_noise_matches_the_numpy_draws(tiny: dict[str, Path]) -> None:
    """The training inputs' measured-like noise has the expectation of measured_like's."""
    from model_server.inversion.powder.domain import measured_like_noise, multiphonon_set

    data = read_powder_dataset(tiny["test"])
    spec = MeasuredLikeSpec(counts_range=(1e14, 1e14), background_share=(0.1, 0.1))
    ml = measured_like(data, [0, 1], spec, progress=False)
    mp = multiphonon_set(data, [0, 1], progress=False)
    mask = torch.from_numpy(ml["mask"])
    out = measured_like_noise(
        torch.from_numpy(np.asarray(data["spectra"][:2], np.float32)),
        torch.from_numpy(mp),
        mask,
        torch.from_numpy(ml["exposure"]),
        torch.from_numpy(ml["flat_background"]),
        torch.tensor([1e14, 1e14]),
        torch.tensor([0.1, 0.1]),
        torch.Generator().manual_seed(0),
    ).numpy()
    assert np.all(out[:, ~ml["mask"]] == 0)
    a = np.nansum(np.where(ml["mask"][None], ml["spectra"], 0.0), axis=1)  # per energy column
    np.testing.assert_allclose(out.sum(axis=1), a, rtol=1e-3, atol=1e-6)


def test_measured_like_training(tiny: dict[str, Path], tmp_path: Path) -> None:
    cfg = PowderTrainConfig(
        variant="fc", vae_epochs=1, regressor_epochs=1, calibration_samples=8, measured_like=True
    )
    summary = train_powder_model("Al", tiny["train"], tmp_path / "ml", config=cfg, progress=False)
    meta = load_powder_model(tmp_path / "ml").meta
    assert meta["training"]["config"]["measured_like"] is True
    assert set(summary["internal_test_r2"]) == {"clean", "training_noise"}


def test_cli_domain_study(tiny: dict[str, Path], tmp_path: Path) -> None:
    r = steer(
        "finetune", "--study", "--model", tiny["model"], "--data", tiny["train"],
        "--test", tiny["test"], "--out", tmp_path, "--n-finetune", "8", "--n-test", "6",
        "--epochs", "1", "--compare", tiny["model"], "--json", "--quiet",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    models = {"sim_only", "fine_tuned", "fine_tuned_supervised", "extended", "fc"}
    assert set(out["results"]) == models
    for m in models:
        assert set(out["results"][m]) == {"clean", "noise_only", "measured_like"}
        assert out["results"][m]["measured_like"]["n"] == 6
    # the compared model is the original: the same estimates as sim_only
    assert out["results"]["fc"]["clean"]["bias"] == out["results"]["sim_only"]["clean"]["bias"]
    assert json.loads((tmp_path / "domain_study.json").read_text())["test_set"]["indices"] == [0, 6]
    assert (tmp_path / "domain_study.png").stat().st_size > 10_000
