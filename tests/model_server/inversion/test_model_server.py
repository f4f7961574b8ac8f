"""The learned models: preprocessing, augmentation, a tiny trained model end to end, inference
errors, the frozen artifact and the committed Ge / Nb models.

Nothing big is trained here: one tiny model (60 forward-model spectra, one epoch of each
network, ~10 s) checks the machinery; the committed models are checked on fresh spectra.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

import model_server
from model_server import (
    ArtifactError,
    AugmentConfig,
    Augmenter,
    CoverageBank,
    Estimator,
    GridMismatchError,
    InputSpectrumError,
    TrainConfig,
    load_model,
    prepare,
    r2_scores,
    train_model,
)
from simulations.fcdb.dataset import generate_dataset
from simulations.lattice.materials import setup
from tests.paths import REPO

ROOT = REPO
CONTRACT_KEYS = {
    "r2",
    "r2_noise_grid",
    "coverage_1sigma",
    "coverage_by_orientations",
    "baseline_r2",
    "seconds",
}


@pytest.fixture(scope="module")
def ge():
    return setup("Ge")


def _bank(shape: tuple[int, int], fingerprint: str, n: int = 6, seed: int = 0) -> CoverageBank:
    """Synthetic coverage bank: each orientation misses a random band of q columns."""
    rng = np.random.default_rng(seed)
    exp = rng.uniform(0.1, 2.0, (n, *shape)).astype(np.float32)
    for k in range(n):
        start = rng.integers(0, shape[0] - 20)
        exp[k, start : start + 20] = 0.0
    return CoverageBank(
        exposure=exp,
        omegas=np.arange(n, dtype=float),
        grid_fingerprint=fingerprint,
        description={"synthetic": True},
    )


# ------------------------------------------------------------------ preprocessing


def _sparse_spectrum(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    x = np.zeros(shape)
    for q in range(shape[0]):
        x[q, rng.integers(2, shape[1] - 2, 3)] = rng.uniform(0.5, 1.0, 3)
    return x


def test_prepare_shape_and_column_scaling():
    rng = np.random.default_rng(1)
    x = _sparse_spectrum(rng, (40, 30))
    out = prepare(torch.tensor(x[None]), torch.ones(1, 40, 30, dtype=torch.bool))
    assert out.shape == (1, 2, 20, 15)
    # every pooled q column sums to n_E' / 4 (unit sum x n_E'/4, nothing clipped here)
    assert_allclose(out[0, 0].sum(dim=1).numpy(), 15 / 4, rtol=1e-5)
    assert_allclose(out[0, 1].numpy(), 1.0)


def test_prepare_removes_column_weights_and_flat_background():
    """q-dependent weights and a constant background (the data's, not the model's) vanish."""
    rng = np.random.default_rng(2)
    x = _sparse_spectrum(rng, (40, 30))
    ones = torch.ones(1, 40, 30, dtype=torch.bool)
    ref = prepare(torch.tensor(x[None]), ones)
    # weights constant over each pooled pair of q rows, so pooling commutes with them
    weighted = np.repeat(rng.uniform(0.1, 10.0, (20, 1)), 2, axis=0)
    out = prepare(torch.tensor((x * weighted + 0.3)[None]), ones)
    assert_allclose(out.numpy(), ref.numpy(), rtol=1e-4, atol=1e-5)


def test_prepare_masked_bins_and_nan():
    rng = np.random.default_rng(3)
    x = _sparse_spectrum(rng, (40, 30))
    mask = np.ones((40, 30), dtype=bool)
    mask[:, :6] = False  # low energies unmeasured
    x_nan = np.where(mask, x, np.nan)
    out = prepare(torch.tensor(x_nan[None]), torch.tensor(mask[None]))
    assert torch.isfinite(out).all()
    assert_allclose(out[0, 1, :, :3].numpy(), 0.0)
    assert_allclose(out[0, 0, :, :3].numpy(), 0.0)


def test_r2_scores_reference():
    t = np.array([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0], [4.0, 8.0]])
    assert_allclose(r2_scores(t, t), [1.0, 1.0])
    p = t.copy()
    p[:, 0] = t[:, 0].mean()  # predicting the mean gives R^2 = 0
    p[:, 1] = t[:, 1] + 1.0  # ss_res = 4, ss_tot = 20 -> 0.8
    assert_allclose(r2_scores(t, p), [0.0, 0.8])


def test_fit_calibration_recovers_a_noise_power():
    """Errors whose spread grows as recon^0.8 while the raw std is flat: the fit finds the
    power and covers 68 % in every noise quintile (plain temperature scaling cannot)."""
    from model_server.inversion.training import fit_calibration

    rng = np.random.default_rng(6)
    n = 20000
    recon = np.exp(rng.uniform(-1.5, 1.5, n))
    std_raw = np.full(n, 0.1)
    err = np.abs(rng.normal(0.0, 0.05 * recon**0.8))
    scale, power = fit_calibration(err, std_raw, recon)
    assert power == pytest.approx(0.8, abs=0.15)
    std = std_raw * scale * recon**power
    for lo, hi in ((0.2, 0.4), (0.9, 1.1), (3.0, 4.5)):
        sel = (recon > lo) & (recon < hi)
        assert np.mean(err[sel] <= std[sel]) == pytest.approx(0.683, abs=0.04)
    flat_scale, _ = fit_calibration(err, std_raw, recon, powers=np.array([0.0]))
    low = recon < 0.4
    assert np.mean(err[low] <= std_raw[low] * flat_scale) > 0.9  # far too wide there


# ------------------------------------------------------------------ coverage and augmentation


def test_coverage_bank_roundtrip_and_selection(tmp_path):
    bank = _bank((50, 40), "abc", n=7)
    bank.save(tmp_path / "b.npz")
    back = CoverageBank.load(tmp_path / "b.npz")
    assert back.grid_fingerprint == "abc"
    assert_allclose(back.omegas, bank.omegas)
    # 8-bit square-root codes: zeros exact, others within 1 % of the maximum
    assert np.array_equal(back.masks, bank.masks)
    assert np.abs(back.exposure - bank.exposure).max() <= 0.01 * bank.exposure.max()
    sel = bank.selection(np.array([1, 3, 7, 50]), np.random.default_rng(0))
    assert sel.sum(axis=1).tolist() == [1, 3, 7, 7]
    with pytest.raises(ArtifactError, match="cannot read"):
        CoverageBank.load(tmp_path / "missing.npz")


def test_augmenter_deterministic_and_conditions(ge):
    shape = ge.grid.shape
    bank = _bank(shape, ge.grid.fingerprint)
    aug = Augmenter(bank, ge.grid.energy_centres, AugmentConfig(p_clean=0.3, p_paper=0.3))
    rng = np.random.default_rng(4)
    clean = torch.tensor(
        np.stack([_sparse_spectrum(rng, shape) for _ in range(24)]), dtype=torch.float32
    )
    a = aug(clean, torch.Generator().manual_seed(9))
    b = aug(clean, torch.Generator().manual_seed(9))
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    x, mask, cond = a
    assert set(cond.tolist()) == {0, 1, 2}
    # full masks except under the orientation condition, which uses the bank's zeros
    assert bool(mask[cond < 2].all())
    assert not bool(mask[cond == 2].all())
    assert bool((x[~mask] == 0).all())
    assert bool((x >= 0).all())
    assert bool(torch.isfinite(x).all())


# ------------------------------------------------------------------ a tiny trained model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, ge):
    """A model trained for one epoch of each network on 60 Ge spectra (~10 s)."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("tiny")
    generate_dataset("Ge", 60, tmp / "ge.h5", seed=11, progress=False, material_setup=ge)
    bank = _bank(ge.grid.shape, ge.grid.fingerprint)
    bank.save(tmp / "cov.npz")
    cfg = TrainConfig(
        vae_epochs=1,
        regressor_epochs=1,
        baseline_epochs=1,
        batch=16,
        n_holdout=12,
        calibration_samples=8,
        threads=1,
    )
    summary = train_model(
        "Ge",
        tmp / "ge.h5",
        tmp / "model",
        config=cfg,
        coverage=tmp / "cov.npz",
        progress=False,
        command="test",
    )
    return tmp, summary


def test_tiny_model_artifact(tiny, ge):
    tmp, summary = tiny
    model_dir = tmp / "model"
    for name in ("model.json", "weights.pt", "coverage.npz", "loss_curves.png"):
        assert (model_dir / name).is_file(), name
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["grid"]["fingerprint"] == ge.grid.fingerprint
    assert meta["provenance"]["training_set"]["seed"] == 11
    assert meta["provenance"]["training_set"]["n_spectra"] == 60
    assert meta["provenance"]["train_command"] == "test"
    assert len(meta["calibration"]["std_scale"]) == len(meta["fc_names"])
    assert summary["n_train"] == 48
    assert summary["n_holdout"] == 12
    model = load_model(model_dir)
    assert model.version.startswith("Ge-")
    assert_allclose(model.to_fc(model.to_scaled(model.domain.T)), model.domain.T)


def test_tiny_model_estimates(tiny, ge):
    tmp, _ = tiny
    est = Estimator(tmp / "model", n_samples=64)
    import h5py

    with h5py.File(tmp / "ge.h5") as f:
        x = f["spectra"][:3]
    one = est.estimate(x[0], grid_fingerprint=ge.grid.fingerprint)
    assert one.mean.shape == one.std.shape == (8,)
    assert np.all(np.isfinite(one.mean))
    assert np.all(one.std > 0)
    q = np.stack([one.quantiles[k] for k in sorted(one.quantiles)])
    assert np.all(np.diff(q, axis=0) >= 0)
    assert one.model_version == est.model.version
    assert one.latency_ms > 0
    # same input, same estimate; a batch gives what single calls give
    assert_allclose(est.estimate(x[0]).mean, one.mean)
    batch = est.estimate_batch(x)
    assert_allclose(batch[0].mean, one.mean, rtol=1e-5)
    d = one.to_dict()
    assert set(d["fc"]) == set(est.fc_names)
    assert {"mean", "std", "q05", "q95"} <= set(d["fc"]["1NN_xx"])
    # thread-safe: concurrent calls give the serial results
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = est.estimate(x[i % 3]).mean

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(6):
        assert_allclose(results[i], batch[i % 3].mean, rtol=1e-5)


def test_bad_inputs_are_clear_errors(tiny, ge):
    tmp, _ = tiny
    est = Estimator(tmp / "model", n_samples=16)
    shape = ge.grid.shape
    good = np.random.default_rng(0).random(shape)
    with pytest.raises(InputSpectrumError, match="zero"):
        est.estimate(np.zeros(shape))
    nan = good.copy()
    nan[3, 4] = np.nan
    with pytest.raises(InputSpectrumError, match="NaN"):
        est.estimate(nan, np.ones(shape, dtype=bool))
    with pytest.raises(InputSpectrumError, match="NaN"):
        est.estimate(np.full(shape, np.nan), np.ones(shape, dtype=bool))
    with pytest.raises(InputSpectrumError, match="no measured bin"):
        est.estimate(good, np.zeros(shape, dtype=bool))
    with pytest.raises(InputSpectrumError, match="no measured bin"):
        est.estimate(np.full(shape, np.nan))  # default mask: finite bins, none here
    with pytest.raises(InputSpectrumError, match="mask shape"):
        est.estimate(good, np.ones((3, 3), dtype=bool))
    # NaN outside the mask is fine (unmeasured bins of folded data)
    partial = good.copy()
    partial[:, :10] = np.nan
    assert np.all(np.isfinite(est.estimate(partial).mean))


def test_wrong_grid_says_which_grids(tiny, ge):
    tmp, _ = tiny
    est = Estimator(tmp / "model", n_samples=16)
    nb = setup("Nb")
    with pytest.raises(GridMismatchError) as info:
        est.estimate(
            np.ones(ge.grid.shape), grid_fingerprint=nb.grid.fingerprint, grid=nb.grid.to_dict()
        )
    msg = str(info.value)
    assert nb.grid.fingerprint in msg
    assert ge.grid.fingerprint in msg
    assert "G-H-N-G-P-H|P-N" in msg
    assert "G-X-U|K-G-L-W-X" in msg
    with pytest.raises(GridMismatchError, match=r"shape \(10, 20\)"):
        est.estimate(np.ones((10, 20)))


def test_estimate_folded_file_and_cli(tiny, ge, capsys):
    """A folded file in the consumers' format; on the wrong grid, a clear CLI error."""
    from consumers.reduction.accumulate import RunAccumulator
    from steering.cli.app import main

    tmp, _ = tiny
    rng = np.random.default_rng(5)
    acc = RunAccumulator(ge.grid)
    cov = rng.uniform(0.5, 1.0, ge.grid.shape)
    cov[:, :5] = 0.0
    counts = rng.poisson(30 * _sparse_spectrum(rng, ge.grid.shape) + 1).astype(float)
    acc.add(counts * (cov > 0), cov, omega=0.0, proton_charge=10.0, events=100, dropped={})
    acc.write_hdf5(tmp / "iqe.h5")
    args = ["estimate", str(tmp / "iqe.h5"), "--model", str(tmp / "model"), "--samples", "32"]
    main([*args, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert set(out["fc"]) == set(load_model(tmp / "model").fc_names)
    assert out["n_orientations"] == 1
    assert 0.9 < out["measured_fraction"] < 1.0
    assert all(np.isfinite(v["mean"]) for v in out["fc"].values())
    assert all(v["std"] > 0 for v in out["fc"].values())

    # the first orientation alone is the whole of this one-orientation run
    main([*args, "--orientations", "1", "--json"])
    first = json.loads(capsys.readouterr().out)
    for name, v in out["fc"].items():  # per-orientation arrays are stored as float32
        assert first["fc"][name]["mean"] == pytest.approx(v["mean"], rel=1e-3, abs=1e-4)
    with pytest.raises(SystemExit) as info:
        main([*args, "--orientations", "2"])
    assert info.value.code == 2
    assert "has 1 orientations" in capsys.readouterr().err

    nb = setup("Nb")
    acc_nb = RunAccumulator(nb.grid)
    acc_nb.add(
        np.ones(nb.grid.shape),
        np.ones(nb.grid.shape),
        omega=0.0,
        proton_charge=1.0,
        events=1,
        dropped={},
    )
    acc_nb.write_hdf5(tmp / "nb.h5")
    with pytest.raises(SystemExit) as info:
        main(["estimate", str(tmp / "nb.h5"), "--model", str(tmp / "model")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert nb.grid.fingerprint in err
    assert ge.grid.fingerprint in err


def test_recalibrate_in_place(tiny, tmp_path, capsys):
    import shutil

    from steering.cli.app import main

    tmp, _ = tiny
    copy = tmp_path / "m"
    shutil.copytree(tmp / "model", copy)
    before = json.loads((copy / "model.json").read_text())
    args = ["train", "--material", "Ge", "--data", str(tmp / "ge.h5"), "--out", str(copy)]
    main([*args, "--calibrate-only", "--quiet", "--json"])
    out = json.loads(capsys.readouterr().out)
    after = json.loads((copy / "model.json").read_text())
    assert after["provenance"]["calibration_command"].startswith("steer ")  # argv of the process
    assert after["calibration"]["std_scale"] == out["calibration_std_scale"]
    assert after["calibration"]["reference_recon"] > 0
    assert (copy / "weights.pt").read_bytes() == (tmp / "model" / "weights.pt").read_bytes()
    assert after["fc_names"] == before["fc_names"]


def test_artifact_errors(tiny, tmp_path):
    tmp, _ = tiny
    with pytest.raises(ArtifactError, match="no model directory"):
        load_model(tmp_path / "nothing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"missing weights\.pt, coverage\.npz"):
        load_model(broken)
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tmp / "model", old)
    meta = json.loads((old / "model.json").read_text())
    meta["format_version"] = 0
    (old / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="format 0"):
        load_model(old)


def test_public_api():
    for name in model_server.__all__:
        assert hasattr(model_server, name), name


# ------------------------------------------------------------------ the committed models


@pytest.mark.parametrize("material", ["Ge", "Nb"])
def test_committed_model(material):
    """The committed frozen model loads, fits its material's grid, is small, carries its
    provenance and evaluation, and recovers the leading FCs of fresh spectra."""
    model_dir = ROOT / "models" / material.lower()
    if not (model_dir / "model.json").is_file():
        pytest.fail(f"no committed model in {model_dir}")
    size = sum(p.stat().st_size for p in model_dir.iterdir())
    assert size <= 10 * 1024 * 1024, f"{model_dir} is {size / 1e6:.1f} MB"
    ms = setup(material)
    model = load_model(model_dir)
    assert model.grid_fingerprint == ms.grid.fingerprint
    prov = model.meta["provenance"]
    assert prov["train_command"].startswith(f"steer train --material {material}")
    assert prov["training_set"]["command"].startswith(
        f"steer simulate dataset --material {material}"
    )
    report = json.loads((model_dir / "evaluation.json").read_text())
    assert set(report) >= CONTRACT_KEYS
    assert set(report["r2"]) == set(model.fc_names)
    # fresh spectra with a seed used neither in training nor in the evaluation
    import tempfile

    import h5py

    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(
            material, 64, Path(tmp) / "t.h5", seed=2024, progress=False, material_setup=ms
        )
        with h5py.File(Path(tmp) / "t.h5") as f:
            x, y = f["spectra"][()], f["fc"][()]
    est = Estimator(model, n_samples=64)
    mean = np.stack([e.mean for e in est.estimate_batch(x)])
    r2 = r2_scores(y, mean)
    # the two leading coefficients (R^2 >= 0.97 on 1,500 spectra in evaluation.json)
    assert r2[0] > 0.9, r2
    assert r2[1] > 0.9, r2
