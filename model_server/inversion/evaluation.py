"""Evaluation of a frozen model on a fresh forward-model test set (``steer evaluate``).

With the seed given, a test set of ``n`` stable spectra is generated exactly as training
sets are (:func:`simulations.fcdb.dataset.generate_dataset`, FCs uniform in the domain), then:

* ``r2``: R^2 per FC of the VAE + regressor mean on the clean spectra (every bin measured);
* ``r2_noise_grid``: the same on each cell of the seed paper's 5 x 5 noise grid
  (:func:`simulations.instrument.noise.noise_grid`, applied to the min-max scaled spectra), keys
  ``"B,P"``; a PNG of the grid per FC (FC0-FC3) for the VAE and the baseline, like the
  paper's Fig. 2d;
* ``coverage_1sigma``: the share of (spectrum, FC) pairs whose true value lies within
  mean +- std on the clean test; also on the middle noise cell;
* ``coverage_by_orientations``: the same for spectra measured by 1, 5, 20 and all
  orientations of the instrument model (random subsets, per-bin exposure from the coverage
  bank; counts ``Poisson(P1 e (I + B))`` with ``P1`` = 20 counts per unit of the min-max
  scaled intensity per orientation, the level of one orientation of the simulated Ge run,
  and ``B`` = 0.01), with R^2 and the mean predicted std beside it;
* ``baseline_r2``: the direct CNN on the clean test, and on the noise grid;
* ``inference_ms_p50``: wall time of :meth:`Estimator.estimate` for one spectrum with
  ``n_samples`` latent samples (median of 50 calls after 5 warm-up calls);
* ``seconds``: the whole evaluation.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from model_server.exceptions import ModelServerError
from model_server.inversion.artifact import FrozenModel
from model_server.inversion.inference import Estimator, predictive
from model_server.inversion.preprocess import prepare

__all__ = [
    "ORIENTATION_BACKGROUND",
    "ORIENTATION_COUNTS",
    "ORIENTATION_P1",
    "evaluate_model",
    "r2_scores",
]

logger = logging.getLogger(__name__)

#: Orientation counts of the calibration-by-coverage test (0 stands for all of the bank).
ORIENTATION_COUNTS = (1, 5, 20, 0)
#: Counts per unit min-max intensity per orientation of unit relative exposure.
ORIENTATION_P1 = 20.0
#: Constant background of the orientation test, in units of the min-max scaled maximum.
ORIENTATION_BACKGROUND = 0.01
_CHUNK = 100


def r2_scores(true: NDArray[np.floating], pred: NDArray[np.floating]) -> NDArray[np.float64]:
    """(n_fc,) coefficient of determination per column of (n, n_fc) arrays."""
    t = np.asarray(true, dtype=np.float64)
    p = np.asarray(pred, dtype=np.float64)
    ss_res = ((t - p) ** 2).sum(axis=0)
    ss_tot = ((t - t.mean(axis=0)) ** 2).sum(axis=0)
    return np.asarray(1.0 - ss_res / np.where(ss_tot > 0, ss_tot, np.nan))


class _Runner:
    """Batched predictions of the VAE (mean, std) and the baseline on arrays of spectra."""

    def __init__(self, est: Estimator, seed: int) -> None:
        self.est = est
        self.model: FrozenModel = est.model
        self.seed = seed

    def run(
        self, spectra: NDArray[np.floating], masks: NDArray[np.bool_] | None = None
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """(n, n_fc) mean, std (eV/A^2) of the VAE and (n, n_fc) baseline prediction."""
        gen = torch.Generator().manual_seed(self.seed)
        means, stds, base = [], [], []
        with torch.inference_mode():
            for s in range(0, len(spectra), _CHUNK):
                x = torch.from_numpy(np.ascontiguousarray(spectra[s : s + _CHUNK], np.float32))
                m = (
                    torch.ones_like(x, dtype=torch.bool)
                    if masks is None
                    else torch.from_numpy(masks[s : s + _CHUNK])
                )
                inp = prepare(x, m).to(self.est.device)
                out = predictive(
                    self.est.vae,
                    self.est.regressor,
                    inp,
                    n_samples=self.est.n_samples,
                    gen=gen,
                    calibration=self.est.calibration,
                )
                means.append(out["mean"].cpu().numpy())
                stds.append(out["std"].cpu().numpy())
                base.append(self.model.baseline.to(self.est.device)(inp).cpu().numpy())
        half = 0.5 * (self.model.domain[:, 1] - self.model.domain[:, 0])
        return (
            self.model.to_fc(np.concatenate(means)),
            np.concatenate(stds).astype(np.float64) * half,
            self.model.to_fc(np.concatenate(base)),
        )


def _named(names: tuple[str, ...], values: NDArray[np.floating]) -> dict[str, float]:
    return {n: round(float(v), 4) for n, v in zip(names, values, strict=True)}


def _coverage(
    true: NDArray[np.floating], mean: NDArray[np.floating], std: NDArray[np.floating]
) -> NDArray[np.bool_]:
    return np.asarray(np.abs(np.asarray(true) - mean) <= std)


def _orientation_spectra(
    clean: NDArray[np.float32],
    model: FrozenModel,
    n_orient: int,
    rng: np.random.Generator,
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    from simulations.instrument.noise import minmax_scale

    bank = model.coverage
    sel = bank.selection(np.full(len(clean), n_orient), rng)
    flat = bank.exposure.reshape(bank.n_orientations, -1)
    exposure = (sel.astype(np.float32) @ flat).reshape(clean.shape)
    scaled = minmax_scale(clean).astype(np.float64)
    lam = ORIENTATION_P1 * exposure * (scaled + ORIENTATION_BACKGROUND)
    counts = rng.poisson(lam)
    measured = exposure > 0
    intensity = np.where(measured, counts / np.maximum(ORIENTATION_P1 * exposure, 1e-12), 0.0)
    return intensity.astype(np.float32), measured


def _heatmaps(
    grid_vae: dict[str, dict[str, float]],
    grid_base: dict[str, dict[str, float]],
    names: tuple[str, ...],
    out: Path,
    title: str,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simulations.instrument.noise import NOISE_GRID_BACKGROUNDS, NOISE_GRID_POISSON

    n_fc = min(4, len(names))
    fig, axes = plt.subplots(2, n_fc, figsize=(3.4 * n_fc + 1.5, 6.4), squeeze=False)
    for row, (label, grid) in enumerate((("VAE", grid_vae), ("baseline CNN", grid_base))):
        for k in range(n_fc):
            mat = np.array(
                [
                    [grid[f"{b:g},{p:g}"][names[k]] for p in NOISE_GRID_POISSON]
                    for b in NOISE_GRID_BACKGROUNDS
                ]
            )
            ax = axes[row, k]
            im = ax.imshow(np.clip(mat, 0, 1), vmin=0, vmax=1, cmap="viridis", origin="upper")
            for i in range(mat.shape[0]):
                for j in range(mat.shape[1]):
                    ax.text(
                        j,
                        i,
                        f"{mat[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="w" if mat[i, j] < 0.6 else "k",
                    )
            ax.set_xticks(range(len(NOISE_GRID_POISSON)), [f"{p:g}" for p in NOISE_GRID_POISSON])
            ax.set_yticks(
                range(len(NOISE_GRID_BACKGROUNDS)),
                [f"{b:g}" for b in NOISE_GRID_BACKGROUNDS] if k == 0 else [],
            )
            ax.set_xlabel("P (counts at max)")
            if k == 0:
                ax.set_ylabel(f"{label}\nB (fraction of max)")
            ax.set_title(f"FC{k} {names[k]}", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.6, label="R^2 (clipped to [0, 1])")
    fig.suptitle(title)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _latency(est: Estimator, spectrum: NDArray[np.float32]) -> dict[str, float]:
    """Wall time of one estimate, measured on one torch thread (a single spectrum gains
    nothing from more, and one thread is not stalled by a busy machine's other work)."""
    mask = np.ones(spectrum.shape, dtype=bool)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(5):
            est.estimate(spectrum, mask)
        times = []
        for _ in range(50):
            t = time.perf_counter()
            est.estimate(spectrum, mask)
            times.append((time.perf_counter() - t) * 1e3)
    finally:
        torch.set_num_threads(threads)
    return {
        "p50": round(float(np.median(times)), 3),
        "p90": round(float(np.quantile(times, 0.9)), 3),
        "threads": 1,
        "n_samples": est.n_samples,
    }


def evaluate_model(
    model_dir: str | Path,
    *,
    n: int = 1500,
    seed: int = 123,
    n_samples: int = 256,
    write: bool = True,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Evaluate a model directory; see the module docstring for the report's keys.

    ``write`` puts ``evaluation.json`` and ``noise_grid_r2.png`` into the model directory.
    """
    t0 = time.perf_counter()
    est = Estimator(model_dir, n_samples=n_samples, seed=seed)
    model = est.model
    names = model.fc_names
    spectra, true = _test_set(model, n, seed, progress)
    runner = _Runner(est, seed)
    report: dict[str, Any] = {"model_version": model.version, "material": model.material}
    report.update({"n": n, "seed": seed, "n_samples": n_samples})
    report.update(_clean_metrics(runner, spectra, true, names))
    grid_vae, grid_base, grid_report = _noise_grid_metrics(
        runner, spectra, true, names, seed, progress
    )
    report.update(grid_report)
    report.update(_orientation_metrics(runner, spectra, true, model, seed, progress))
    report["inference_ms"] = _latency(est, spectra[0])
    report["command"] = command
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if write:
        fig = _heatmaps(
            grid_vae,
            grid_base,
            names,
            model.path / "noise_grid_r2.png",
            f"{model.material}: R^2 on the 5 x 5 noise grid (n = {n}, seed {seed})",
        )
        report["figures"] = [str(fig)]
        (model.path / "evaluation.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _test_set(
    model: FrozenModel, n: int, seed: int, progress: bool
) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """A fresh test set generated as training sets are: (n, n_q, n_E) spectra and (n, n_fc)
    true FCs, eV/A^2.

    Raises
    ------
    ModelServerError
        The test set varies other FCs than the model estimates, or is on another grid.
    """
    import h5py

    from model_server.inversion.artifact import check_grid
    from simulations.fcdb.dataset import generate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "test.h5"
        generate_dataset(model.material, n, path, seed=seed, progress=progress)
        with h5py.File(path, "r") as f:
            spectra = np.asarray(f["spectra"][()], dtype=np.float32)
            true = np.asarray(f["fc"][()], dtype=np.float64)
            test_names = tuple(str(s) for s in f.attrs["fc_names"])
            fingerprint = str(f.attrs["grid_fingerprint"])
    if test_names != model.fc_names:
        raise ModelServerError(
            f"the test set varies {test_names}, the model estimates {model.fc_names}: the "
            "material's reference changed since training; retrain"
        )
    check_grid(model, fingerprint, None)
    return spectra, true


def _clean_metrics(
    runner: _Runner,
    spectra: NDArray[np.float32],
    true: NDArray[np.float64],
    names: tuple[str, ...],
) -> dict[str, Any]:
    """R^2 (VAE and baseline), 1-sigma coverage and mean std on the clean spectra."""
    mean, std, base = runner.run(spectra)
    inside = _coverage(true, mean, std)
    return {
        "r2": _named(names, r2_scores(true, mean)),
        "baseline_r2": _named(names, r2_scores(true, base)),
        "coverage_1sigma": round(float(inside.mean()), 4),
        "coverage_1sigma_per_fc": _named(names, inside.mean(axis=0)),
        "mean_std_clean": _named(names, std.mean(axis=0)),
    }


def _noise_grid_metrics(
    runner: _Runner,
    spectra: NDArray[np.float32],
    true: NDArray[np.float64],
    names: tuple[str, ...],
    seed: int,
    progress: bool,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, Any]]:
    """R^2 (VAE, baseline) and 1-sigma coverage on every cell of the noise grid.

    Returns
    -------
    The VAE's and the baseline's R^2 per cell (keys ``"B,P"``) and the report's entries.
    """
    from tqdm import tqdm

    from simulations.instrument.noise import add_noise, minmax_scale, noise_grid

    grid_vae: dict[str, dict[str, float]] = {}
    grid_base: dict[str, dict[str, float]] = {}
    coverage_grid: dict[str, float] = {}
    scaled = minmax_scale(spectra)
    cells = noise_grid()
    for i, (b, p) in enumerate(tqdm(cells, desc="noise grid", disable=not progress)):
        rng = np.random.default_rng([seed, 1, i])
        noisy = add_noise(scaled, background=b, poisson_scale=p, rng=rng)
        m, s, bl = runner.run(noisy)
        key = f"{b:g},{p:g}"
        grid_vae[key] = _named(names, r2_scores(true, m))
        grid_base[key] = _named(names, r2_scores(true, bl))
        coverage_grid[key] = round(float(_coverage(true, m, s).mean()), 4)
    mid = cells[len(cells) // 2]
    mid_key = f"{mid[0]:g},{mid[1]:g}"
    return (
        grid_vae,
        grid_base,
        {
            "r2_noise_grid": grid_vae,
            "baseline_r2_noise_grid": grid_base,
            "noise_mid_cell": mid_key,
            "coverage_1sigma_noise_mid": coverage_grid[mid_key],
            "coverage_1sigma_noise_grid": coverage_grid,
        },
    )


def _orientation_metrics(
    runner: _Runner,
    spectra: NDArray[np.float32],
    true: NDArray[np.float64],
    model: FrozenModel,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    """1-sigma coverage, R^2 and mean std of spectra measured by
    :data:`ORIENTATION_COUNTS` orientations."""
    from tqdm import tqdm

    names = model.fc_names
    by_orient: dict[str, float] = {}
    r2_orient: dict[str, dict[str, float]] = {}
    std_orient: dict[str, dict[str, float]] = {}
    for k in tqdm(ORIENTATION_COUNTS, desc="orientations", disable=not progress):
        n_o = model.coverage.n_orientations if k == 0 else k
        rng = np.random.default_rng([seed, 2, n_o])
        x, mk = _orientation_spectra(spectra, model, n_o, rng)
        m, s, _ = runner.run(x, mk)
        by_orient[str(n_o)] = round(float(_coverage(true, m, s).mean()), 4)
        r2_orient[str(n_o)] = _named(names, r2_scores(true, m))
        std_orient[str(n_o)] = _named(names, s.mean(axis=0))
    return {
        "coverage_by_orientations": by_orient,
        "r2_by_orientations": r2_orient,
        "mean_std_by_orientations": std_orient,
        "orientation_noise": {
            "P1_counts_per_unit_intensity_per_orientation": ORIENTATION_P1,
            "background": ORIENTATION_BACKGROUND,
            "orientations_in_bank": model.coverage.n_orientations,
        },
    }
