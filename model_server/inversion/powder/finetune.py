"""Fine-tuning a powder model's feature extractor on unlabelled measured spectra.

The powder-VAE paper's fix for the domain shift (Su & Li; their Table 1): the autoencoder,
trained on simulated spectra, is trained further on measured spectra (no labels) at a
reduced learning rate; then the regressor is trained again on the labelled simulated
spectra through the fine-tuned encoder, and (here) the stds are calibrated again on the
simulated calibration split. The paper's control, ``mode="extended"``, trains the
autoencoder as long at the same rate on the simulated training spectra instead, so that a
gain can be told from mere extra training.

* ``mode="measured"``: loss = squared error of the reconstruction of each measured input
  (prepared as every input: :func:`~model_server.inversion.preprocess.prepare`) on the
  pixels inside the kinematic limit + ``beta`` KL (the measured spectra have no labels);
* ``mode="extended"``: the same loss on the simulated training spectra with the training
  noise, the clean spectrum as the target (as in training);
* ``supervised=True`` adds to every step the training loss on a batch of simulated
  spectra (reconstruction, KL and the auxiliary FC head's squared error, weighted as in
  training), so that the latent keeps its alignment with the force constants (the
  paper's autoencoder had no such head; ``supervised=False`` is its recipe);
* both: AdamW at ``lr_factor`` x the model's learning rate, cosine schedule, ``epochs``
  passes over ``steps_per_epoch`` batches (default: the measured set's size), then the
  regressor (the model's settings) and the calibration as in
  :func:`~model_server.inversion.powder.training.train_powder_model`.

The result is a new model directory; its ``model.json`` keeps the original's keys and adds
``finetune`` (source model, mode, set, epochs, learning rate, minutes).
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from model_server.exceptions import TrainingError
from model_server.inversion.powder.artifact import load_powder_model, save_powder_model
from model_server.inversion.powder.training import (
    PowderTrainConfig,
    _batches,
    _cosine,
    _PowderTrainer,
    _round_fp16,
    load_powder_training_set,
    plot_powder_losses,
)
from model_server.inversion.preprocess import prepare

__all__ = ["MODES", "finetune_powder_model"]

logger = logging.getLogger(__name__)

#: What the autoencoder is trained further on.
MODES = ("measured", "extended")


def _config(meta: dict[str, Any]) -> PowderTrainConfig:
    c = dict(meta["training"]["config"])
    c["regressor_widths"] = tuple(c["regressor_widths"])
    c["counts_range"] = tuple(c["counts_range"])
    return PowderTrainConfig(**c)


def finetune_powder_model(
    model: str | Path,
    training_set: str | Path,
    out: str | Path,
    *,
    measured: NDArray[np.floating] | None = None,
    mode: str = "measured",
    epochs: int = 10,
    lr_factor: float = 0.1,
    steps_per_epoch: int | None = None,
    supervised: bool = False,
    source: str = "",
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Fine-tune (or, ``mode="extended"``, train further on simulated spectra) the
    autoencoder of the powder model ``model``; write the new model to ``out``.

    Parameters
    ----------
    model
        Directory of the powder model.
    training_set
        The powder training set the model was trained on (its regressor is trained again on
        it; the file's seed must be the model's).
    measured
        (n, n_Q, n_E) spectra on the model's crop, any units, NaN where unmeasured (with
        ``mode="measured"``).
    epochs, lr_factor, steps_per_epoch
        Passes, learning rate as a share of the model's, batches per pass.
    supervised
        Keep the simulated, labelled training loss beside (module docstring).
    source
        What ``measured`` is (recorded).

    Returns
    -------
    dict
        Summary: output folder, mode, minutes per stage, internal-test R^2.
    """
    if mode not in MODES:
        raise TrainingError(f"mode must be one of {MODES}, got {mode!r}")
    if epochs < 1 or not 0 < lr_factor <= 1:
        raise TrainingError(f"need epochs >= 1 and 0 < lr_factor <= 1, got {epochs}, {lr_factor}")
    t0 = time.perf_counter()
    base = load_powder_model(model)
    meta = base.meta
    cfg = _config(meta)
    torch.set_num_threads(max(1, cfg.threads))
    ds = load_powder_training_set(training_set, str(meta["material"]))
    trained = int(meta["provenance"]["training_set"]["seed"])
    if int(ds["seed"]) != trained or ds["grid"]["fingerprint"] != meta["grid"]["fingerprint"]:
        raise TrainingError(
            f"{training_set} is not the training set of {base.path} (seed {ds['seed']} vs "
            f"{trained}, or another grid)"
        )
    trainer = _PowderTrainer(ds, cfg, progress)
    mask = trainer.mask
    if mode == "measured":
        if measured is None or len(measured) < 2:
            raise TrainingError("fine-tuning needs at least 2 measured spectra")
        x = np.asarray(measured, dtype=np.float32)
        if x.shape[1:] != tuple(mask.shape):
            raise TrainingError(
                f"measured spectra have shape {x.shape[1:]}, the model's crop {tuple(mask.shape)}"
            )
        m = torch.from_numpy(np.isfinite(x)) & mask[None]
        if not bool(m.any(dim=(1, 2)).all()):
            raise TrainingError("a measured spectrum has no measured bin inside the crop")
        inputs = prepare(torch.from_numpy(np.nan_to_num(x, nan=0.0)), m)
        n_items = len(inputs)
    else:
        inputs = None
        n_items = len(trainer.train_x)
    vae = base.vae
    for p in vae.parameters():
        p.requires_grad_(True)
    batch = min(cfg.batch, n_items)
    steps = steps_per_epoch or max(1, n_items // batch)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr * lr_factor, weight_decay=1e-5)
    sched = _cosine(opt, epochs * steps)
    gen = torch.Generator().manual_seed(cfg.seed + 100)
    for _ in trainer._epochs(f"fine-tune ({mode})", epochs):
        vae.train()
        done, total = 0, 0.0
        while done < steps:
            for idx in _batches(n_items, batch, gen):
                if inputs is not None:
                    inp = inputs[idx]
                    target = inp[:, 0]
                else:
                    inp, target, _ = trainer.inputs(
                        trainer.train_x[idx], gen, trainer.split_mp("train", idx)
                    )
                rec, kl, _ = trainer.vae_terms(vae, inp, target, None, gen)
                loss = rec + cfg.beta * kl
                if supervised:
                    sim = torch.randint(0, len(trainer.train_x), (batch,), generator=gen)
                    s_in, s_clean, _ = trainer.inputs(
                        trainer.train_x[sim], gen, trainer.split_mp("train", sim)
                    )
                    s_rec, s_kl, s_sup = trainer.vae_terms(
                        vae, s_in, s_clean, trainer.train_y[sim], gen
                    )
                    loss = loss + s_rec + cfg.beta * s_kl + cfg.aux_weight * s_sup
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(vae.parameters(), 10.0)
                opt.step()
                sched.step()
                total += loss.item()
                done += 1
                if done >= steps:
                    break
        trainer._log("vae_finetune_loss", total / max(done, 1))
    _round_fp16(vae)
    t_ft = time.perf_counter()
    reg = trainer.train_regressor(vae)
    t_reg = time.perf_counter()
    calibration, ood = trainer.calibrate(vae, reg)
    test = trainer.internal_test(vae, reg)
    minutes = {
        "finetune": round((t_ft - t0) / 60.0, 3),
        "regressor": round((t_reg - t_ft) / 60.0, 3),
        "total": round((time.perf_counter() - t0) / 60.0, 3),
    }
    new = {
        **meta,
        "calibration": calibration,
        "ood": ood,
        "internal_test": test,
        "finetune": {
            "from_model": str(base.path),
            "from_version": base.version,
            "mode": mode,
            "supervised": supervised,
            "source": source if mode == "measured" else str(training_set),
            "n_spectra": n_items,
            "epochs": epochs,
            "steps_per_epoch": steps,
            "lr": cfg.lr * lr_factor,
            "minutes": minutes,
            "history": trainer.history,
            "command": command,
            "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        },
    }
    new.pop("evaluation", None)
    path = save_powder_model(out, new, vae, reg, base.kinematic_mask)
    plot_powder_losses(
        trainer.history,
        path / "loss_curves.png",
        f"{meta['material']} powder ({meta['variant']}), fine-tuned ({mode}): losses",
    )
    logger.info("fine-tuned powder model written to %s (%.1f min)", path, minutes["total"])
    return {
        "out": str(path),
        "mode": mode,
        "supervised": supervised,
        "epochs": epochs,
        "lr": cfg.lr * lr_factor,
        "minutes": minutes,
        "internal_test_r2": test["r2"],
    }
