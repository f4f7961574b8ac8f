"""Evaluation of a powder model on a fresh test set (``steer evaluate`` of a powder model).

For the test set (a powder training set made at a seed the model was not trained on):

* R^2 of every FC, RMSE (eV/A^2), 1-sigma coverage (|mean - truth| <= std) per FC and
  overall, clean and at Poisson noise levels: counts ~ Poisson(S N / sum S) over the bins
  inside the kinematic limit, N the expected total counts of the crop (``noise_counts``,
  default 1e6, 1e5, 1e4: about 120, 12 and 1.2 counts per measured bin on average), no
  background;
* NMSE, the paper's metric, for the first ``n_nmse`` test spectra: the spectrum of the
  estimated FCs (the same forward model as the test set) against the input spectrum,
  both divided by their mean over the kinematic crop:
  ``NMSE = sum (s_est - s_in)^2 / sum s_in^2`` over the crop's measured bins; also against
  the clean truth spectrum, and the floor (the truth's spectrum against the noisy input).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from model_server.exceptions import TrainingError
from model_server.inversion.powder.artifact import load_powder_model
from model_server.inversion.powder.inference import PowderEstimator
from model_server.inversion.powder.training import noisy_spectra, r2_scores

__all__ = ["NOISE_COUNTS", "evaluate_powder_model", "nmse"]

logger = logging.getLogger(__name__)

#: Expected total counts over the crop's measured bins of the evaluation's noise levels.
NOISE_COUNTS = (1e6, 1e5, 1e4)


def nmse(
    estimate: NDArray[np.floating], target: NDArray[np.floating], mask: NDArray[np.bool_]
) -> NDArray[np.float64]:
    """(B,) normalised mean squared error of (B, n_Q, n_E) spectra against targets over
    ``mask`` (n_Q, n_E), each spectrum divided by its mean over the mask first."""
    a = np.asarray(estimate, dtype=np.float64)[:, mask]
    b = np.asarray(target, dtype=np.float64)[:, mask]
    a = a / np.maximum(a.mean(axis=1, keepdims=True), 1e-30)
    b = b / np.maximum(b.mean(axis=1, keepdims=True), 1e-30)
    out: NDArray[np.float64] = ((a - b) ** 2).sum(axis=1) / np.maximum((b**2).sum(axis=1), 1e-30)
    return out


def _check_test_set(model_meta: dict[str, Any], test: dict[str, Any], path: Path) -> None:
    if str(test["material"]) != model_meta["material"]:
        raise TrainingError(f"{path} is for {test['material']}, the model {model_meta['material']}")
    if test["grid"]["fingerprint"] != model_meta["grid"]["fingerprint"] or list(
        test["crop"]["q_bins"]
    ) + list(test["crop"]["e_bins"]) != list(model_meta["crop"]["q_bins"]) + list(
        model_meta["crop"]["e_bins"]
    ):
        raise TrainingError(f"{path} is on another powder grid or crop than the model")
    trained = int(model_meta["provenance"]["training_set"]["seed"])
    if int(test["seed"]) == trained:
        raise TrainingError(
            f"{path} was made with seed {trained}, the training set's; make a fresh test set "
            "with another --seed (steer simulate dataset --powder --seed 777 ...)"
        )


def evaluate_powder_model(
    model_dir: str | Path,
    data: str | Path,
    *,
    noise_counts: tuple[float, ...] = NOISE_COUNTS,
    n_nmse: int = 300,
    n_samples: int = 64,
    seed: int = 123,
    write: bool = True,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Evaluate the powder model ``model_dir`` on the powder test set ``data``.

    Returns the report (also written to ``<model_dir>/evaluation.json`` with ``write``):
    ``conditions`` {``clean``, ``counts_1e+06``, ...} each with ``r2``, ``rmse``,
    ``coverage_1sigma`` (per FC, by name), ``coverage_1sigma_all``, ``mean_std``, ``nmse``.
    """
    from tqdm import tqdm

    from simulations.fcdb.powder_dataset import (
        PowderSpec,
        build_powder_forward,
        read_powder_dataset,
    )

    t0 = time.perf_counter()
    model = load_powder_model(model_dir)
    path = Path(data)
    test = read_powder_dataset(path)
    _check_test_set(model.meta, test, path)
    estimator = PowderEstimator(model, n_samples=n_samples, seed=seed)
    spectra = torch.from_numpy(np.asarray(test["spectra"], dtype=np.float32))
    truth = np.asarray(test["fc"], dtype=np.float64)
    kin = torch.from_numpy(model.kinematic_mask)
    names = list(model.fc_names)
    half = 0.5 * (model.domain[:, 1] - model.domain[:, 0])
    n_nmse = min(n_nmse, len(spectra))
    fm, _ = build_powder_forward(PowderSpec.from_dict(test["spec"]))
    gen = torch.Generator().manual_seed(seed)
    conditions: dict[str, Any] = {}
    levels: list[tuple[str, float]] = [("clean", float("inf"))] + [
        (f"counts_{c:.0e}", float(c)) for c in noise_counts
    ]
    mask_np = model.kinematic_mask
    for name, counts in tqdm(levels, desc="conditions", unit="level", disable=not progress):
        inputs = []
        means, stds = [], []
        for s in range(0, len(spectra), 250):
            x = spectra[s : s + 250]
            c = torch.full((len(x),), counts)
            xin = noisy_spectra(x, kin, c, torch.zeros(len(x)), gen)
            inputs.append(xin[: max(0, n_nmse - s)].numpy())
            out = estimator.predict(xin, kin[None].expand(len(x), -1, -1))
            means.append(model.to_fc(out["mean"].numpy()))
            stds.append(out["std"].numpy() * half)
        mean, std = np.concatenate(means), np.concatenate(stds)
        err = np.abs(mean - truth)
        inside = err <= std
        est_spectra = fm.spectra(mean[:n_nmse])
        xin_all = np.concatenate(inputs)[:n_nmse]
        clean = spectra[:n_nmse].numpy()
        to_input = nmse(est_spectra.intensity, xin_all, mask_np)
        to_truth = nmse(est_spectra.intensity, clean, mask_np)
        floor = nmse(clean, xin_all, mask_np)
        conditions[name] = {
            "expected_counts": None if not np.isfinite(counts) else counts,
            "r2": dict(zip(names, r2_scores(mean, truth), strict=True)),
            "rmse": {
                n: round(float(v), 6)
                for n, v in zip(names, np.sqrt((err**2).mean(axis=0)), strict=True)
            },
            "coverage_1sigma": {
                n: round(float(v), 4) for n, v in zip(names, inside.mean(axis=0), strict=True)
            },
            "coverage_1sigma_all": round(float(inside.mean()), 4),
            "mean_std": {
                n: round(float(v), 6) for n, v in zip(names, std.mean(axis=0), strict=True)
            },
            "nmse": {
                "n": n_nmse,
                "to_input_mean": round(float(to_input.mean()), 5),
                "to_input_median": round(float(np.median(to_input)), 5),
                "to_clean_truth_mean": round(float(to_truth.mean()), 5),
                "floor_truth_to_input_mean": round(float(floor.mean()), 5),
                "unstable_estimates": int((~est_spectra.stable).sum()),
            },
        }
        logger.info("%s: R2 %s coverage %.3f", name, conditions[name]["r2"], inside.mean())
    report = {
        "model_version": model.version,
        "sample_kind": "powder",
        "variant": model.meta["variant"],
        "material": model.material,
        "test_set": {
            "path": str(path),
            "n": len(spectra),
            "seed": int(test["seed"]),
            "command": str(test["command"]),
            "averaging": test["averaging"],
        },
        "noise": "Poisson counts with the given expected total over the crop's bins inside "
        "the kinematic limit, no background; clean = the forward model's spectrum",
        "nmse_definition": "sum (s_est - s_in)^2 / sum s_in^2 over the kinematic crop, each "
        "spectrum divided by its mean there; s_est: forward model of the estimated FCs",
        "n_samples": n_samples,
        "seed": seed,
        "conditions": conditions,
        "minutes": round((time.perf_counter() - t0) / 60.0, 3),
        "torch_threads": torch.get_num_threads(),
        "command": command,
    }
    if write:
        (model.path / "evaluation.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
