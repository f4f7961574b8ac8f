"""The domain-shift study of a powder model: its bias on measured-like spectra, before and
after the powder-VAE paper's fine-tuning (``steer finetune --study``).

1. Measured-like spectra (:func:`~model_server.inversion.powder.domain.measured_like`) of
   ``n_finetune`` force-constant sets of the model's training split (unlabelled: only the
   spectra are used) at ``finetune_seed``: the fine-tuning set;
2. from a fresh test set (a seed the model was not trained on), ``n_test`` sets starting
   at ``test_offset`` (the sets used to choose the fine-tuning's settings are kept apart
   from those reported: pass another offset), each in three conditions:
   ``clean`` (the one-phonon spectrum), ``noise_only`` (the same counts and exposure, no
   multiphonon or background: the counting noise alone) and ``measured_like`` (with
   both), at ``test_seed``;
3. four models: the original (``sim_only``), the autoencoder fine-tuned on the measured
   set (``fine_tuned``, the paper's recipe), the same with the simulated, labelled loss
   kept beside (``fine_tuned_supervised``), and trained as long on the simulated set
   (``extended``, the paper's control); each estimates every condition; per coefficient
   bias, RMSE, R^2 and 1-sigma coverage
   (:func:`~model_server.inversion.powder.domain.shift_metrics`).

The JSON holds every figure with the commands and seeds; :func:`plot_domain_study` draws the
bias and R^2 per coefficient, model and condition.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from model_server.exceptions import TrainingError
from model_server.inversion.powder.domain import MeasuredLikeSpec, measured_like, shift_metrics
from model_server.inversion.powder.finetune import finetune_powder_model
from model_server.inversion.powder.inference import PowderEstimator
from model_server.inversion.powder.training import load_powder_training_set

__all__ = ["CONDITIONS", "MODELS", "domain_study", "plot_domain_study"]

logger = logging.getLogger(__name__)

#: The test conditions, in the order the results list them.
CONDITIONS = ("clean", "noise_only", "measured_like")
#: The models compared.
MODELS = ("sim_only", "fine_tuned", "fine_tuned_supervised", "extended")


def _estimate(model: str | Path, spectra: np.ndarray, mask: np.ndarray) -> tuple[Any, Any, float]:
    est = PowderEstimator(model, n_samples=64)
    m = np.isfinite(spectra) & mask[None]
    out = []
    for s in range(0, len(spectra), 250):
        out += est.estimate_batch(
            np.where(m[s : s + 250], spectra[s : s + 250], np.nan), m[s : s + 250]
        )
    ood = float(np.mean([e.out_of_domain for e in out]))
    return np.array([e.mean for e in out]), np.array([e.std for e in out]), ood


def domain_study(
    model: str | Path,
    training_set: str | Path,
    test_set: str | Path,
    out_dir: str | Path,
    *,
    n_finetune: int = 2000,
    n_test: int = 500,
    test_offset: int = 0,
    finetune_seed: int = 1,
    test_seed: int = 2,
    epochs: int = 10,
    lr_factor: float = 0.1,
    compare: dict[str, str | Path] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the study (module docstring); the trained models go to ``out_dir``
    (``fine_tuned/``, ``fine_tuned_supervised/``, ``extended/``); ``compare``: more
    models (name -> directory, e.g. one trained with ``measured_like``) estimated on the
    same spectra. JSON-ready result."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = PowderEstimator(model).model
    material = str(base.meta["material"])
    train = load_powder_training_set(training_set, material)
    test = load_powder_training_set(test_set, material)
    if int(test["seed"]) == int(train["seed"]):
        raise TrainingError(f"{test_set} has the training set's seed; make a fresh test set")
    n_train_split = len(train["spectra"]) - 2 * max(2, len(train["spectra"]) // 10)
    if n_finetune > n_train_split or test_offset + n_test > len(test["spectra"]):
        raise TrainingError(
            f"asked for {n_finetune} of {n_train_split} training-split sets and test sets "
            f"{test_offset}-{test_offset + n_test} of {len(test['spectra'])}"
        )
    ft_set = measured_like(
        train, np.arange(n_finetune), MeasuredLikeSpec(seed=finetune_seed), progress=progress
    )
    idx = np.arange(test_offset, test_offset + n_test)
    measured = measured_like(test, idx, MeasuredLikeSpec(seed=test_seed), progress=progress)
    noise = measured_like(
        test,
        idx,
        MeasuredLikeSpec(seed=test_seed, multiphonon=False, background_share=(0.0, 0.0)),
        progress=progress,
    )
    mask = measured["mask"]
    clean = np.where(mask[None], np.asarray(test["spectra"])[idx], np.nan)
    t_data = time.perf_counter()
    trained: dict[str, dict[str, Any]] = {"sim_only": {"path": str(model), "minutes": None}}
    for name, mode, supervised in (
        ("fine_tuned", "measured", False),
        ("fine_tuned_supervised", "measured", True),
        ("extended", "extended", False),
    ):
        summary = finetune_powder_model(
            model,
            training_set,
            out / name,
            measured=ft_set["spectra"] if mode == "measured" else None,
            mode=mode,
            epochs=epochs,
            lr_factor=lr_factor,
            supervised=supervised,
            steps_per_epoch=max(1, n_finetune // 64),
            source=f"{n_finetune} measured-like spectra of {training_set} (seed {finetune_seed})",
            progress=progress,
        )
        trained[name] = {"path": summary["out"], "minutes": summary["minutes"]}
    for name, path in (compare or {}).items():
        trained[name] = {"path": str(path), "minutes": None}
    results: dict[str, Any] = {}
    names = list(test["fc_names"])
    for name, info in trained.items():
        results[name] = {}
        for cond, spectra in (
            ("clean", clean),
            ("noise_only", noise["spectra"]),
            ("measured_like", measured["spectra"]),
        ):
            mean, std, ood = _estimate(info["path"], np.asarray(spectra, np.float32), mask)
            r = shift_metrics(mean, std, measured["fc"], names)
            r["out_of_domain_share"] = round(ood, 4)
            results[name][cond] = r
    domain = np.asarray(test["domain"], float)
    return {
        "model": str(model),
        "material": material,
        "fc_names": names,
        "units": "eV/A^2",
        "domain_width": {
            n: float(w) for n, w in zip(names, domain[:, 1] - domain[:, 0], strict=True)
        },
        "measured_like": {
            "definition": "counts ~ Poisson(k (S_1 + S_mp) X + b T) / X on the crop: "
            "model_server.inversion.powder.domain",
            "spec_finetune": ft_set["spec"],
            "spec_test": measured["spec"],
            "multiphonon_share_median": round(float(np.median(measured["multiphonon_share"])), 4),
            "multiphonon_share_p90": round(
                float(np.quantile(measured["multiphonon_share"], 0.9)), 4
            ),
        },
        "finetune": {"epochs": epochs, "lr_factor": lr_factor, "n_spectra": n_finetune},
        "training_set": {"path": str(training_set), "seed": int(train["seed"])},
        "test_set": {
            "path": str(test_set),
            "seed": int(test["seed"]),
            "indices": [int(idx[0]), int(idx[-1]) + 1],
        },
        "models": trained,
        "results": results,
        "minutes": {
            "data": round((t_data - t0) / 60.0, 2),
            "total": round((time.perf_counter() - t0) / 60.0, 2),
        },
    }


def plot_domain_study(result: dict[str, Any], out: str | Path) -> Path:
    """Bias (as a share of each coefficient's domain width, with 2 standard errors) and
    R^2 per coefficient for every model and condition (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["fc_names"]
    width = result["domain_width"]
    res = result["results"]
    models = [m for m in MODELS if m in res] + [m for m in res if m not in MODELS]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    x = np.arange(len(names))
    bw = 0.8 / (len(models) * 2)
    colours = {
        "sim_only": "tab:red",
        "fine_tuned": "tab:blue",
        "fine_tuned_supervised": "tab:green",
        "extended": "tab:grey",
    }
    extra = iter(["tab:purple", "tab:brown", "tab:olive", "tab:cyan"])
    for m in models:
        if m not in colours:
            colours[m] = next(extra, "k")
    for j, m in enumerate(models):
        for c_i, cond in enumerate(("noise_only", "measured_like")):
            r = res[m][cond]
            off = (2 * j + c_i - len(models) + 0.5) * bw
            bias = [100 * r["bias"][n] / width[n] for n in names]
            err = [200 * r["bias_se"][n] / width[n] for n in names]
            axes[0].bar(
                x + off,
                bias,
                bw,
                yerr=err,
                color=colours[m],
                alpha=1.0 if cond == "measured_like" else 0.35,
                label=f"{m}, {cond}",
            )
            axes[1].bar(
                x + off,
                [r["r2"][n] for n in names],
                bw,
                color=colours[m],
                alpha=1.0 if cond == "measured_like" else 0.35,
                label=f"{m}, {cond}",
            )
    axes[0].axhline(0, color="k", lw=0.6)
    axes[0].set_ylabel("bias, % of the domain width (+- 2 s.e.)")
    axes[1].set_ylabel("R^2")
    axes[1].set_ylim(min(-0.2, axes[1].get_ylim()[0]), 1.02)
    for ax in axes:
        ax.set_xticks(x, names)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(
        f"{result['material']} powder model on measured-like spectra "
        f"({result['results']['sim_only']['measured_like']['n']} test sets): before and after "
        "fine-tuning"
    )
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=7)
    out = Path(out)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
