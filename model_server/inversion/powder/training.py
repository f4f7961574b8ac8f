"""Training a frozen powder model (``steer train --powder``).

Steps (progress bars; losses per epoch go into ``model.json`` and ``loss_curves.png``):

1. read the powder training set (:mod:`simulations.fcdb.powder_dataset`), split it 80 / 10
   / 10 in file order (train / calibration / internal test);
2. the VAE (``variant``: ``"fc"`` the paper's fully connected one, ``"cnn"`` the project's
   convolutional one) on noisy inputs (:func:`noisy_spectra`: Poisson counts at a random
   total, a flat background) with the loss: sum of squared errors of the reconstruction of
   the *clean* prepared spectrum on the pixels inside the kinematic limit + ``beta`` KL +
   ``aux_weight`` x squared error of an auxiliary linear FC head on a latent sample;
3. the encoder frozen, the regressor (:class:`PaperRegressor`) latent sample -> (FC mean,
   log-variance) with the beta-NLL loss (beta 0.5) on fresh noisy inputs;
4. calibration on the calibration split (twice, fresh noise): per FC, a factor and a power
   of the reconstruction error so that mean +- std covers 68.3 %
   (:func:`model_server.inversion.training.fit_calibration`, as the single-crystal model);
   out-of-domain thresholds (99.5 % quantiles of reconstruction error and latent distance);
5. R^2 on the internal test split; the weights are rounded to float16 after each stage (the
   artifact stores them so, a few MB), so calibration and figures are those of the saved
   model.

Input normalisation: :func:`model_server.inversion.preprocess.prepare` (2 x 2 pooling,
median background subtracted, each |Q| column to unit sum over its measured bins), so the
absolute scale of a folded run does not matter.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from model_server.exceptions import TrainingError
from model_server.inversion.inference import latent_distance, predictive
from model_server.inversion.powder.artifact import save_powder_model
from model_server.inversion.powder.networks import PaperRegressor, PowderVAE, build_networks
from model_server.inversion.preprocess import pooled_shape, prepare
from model_server.inversion.training import ONE_SIGMA, fit_calibration

__all__ = [
    "VARIANTS",
    "PowderTrainConfig",
    "load_powder_training_set",
    "noisy_spectra",
    "r2_scores",
    "train_powder_model",
]

logger = logging.getLogger(__name__)

#: The autoencoder variants.
VARIANTS = ("fc", "cnn")


@dataclass(frozen=True, slots=True, kw_only=True)
class PowderTrainConfig:
    """Settings of :func:`train_powder_model` (recorded in ``model.json``)."""

    variant: str = "fc"
    latent: int = 30
    hidden: int = 400
    regressor_widths: tuple[int, ...] = (100, 1000, 1000, 100)
    beta: float = 1.0
    aux_weight: float = 100.0
    vae_epochs: int = 30
    regressor_epochs: int = 20
    batch: int = 64
    lr: float = 1e-3
    calibration_samples: int = 64
    seed: int = 0
    threads: int = 1
    p_clean: float = 0.25
    counts_range: tuple[float, float] = (3e3, 3e6)
    background_max: float = 0.1
    measured_like: bool = False
    background_share_max: float = 0.15

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise TrainingError(f"--variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.vae_epochs < 1 or self.regressor_epochs < 1:
            raise TrainingError("epochs must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["regressor_widths"] = list(self.regressor_widths)
        d["counts_range"] = list(self.counts_range)
        return d


def load_powder_training_set(path: str | Path, material: str) -> dict[str, Any]:
    """Read a powder training set for ``material`` (``read_powder_dataset``'s dict), or
    raise :class:`TrainingError` with the command that makes one."""
    from simulations.exceptions import DatasetError
    from simulations.fcdb.powder_dataset import read_powder_dataset

    path = Path(path)
    if not path.is_file():
        raise TrainingError(
            f"no training set at {path}; make one with `steer simulate dataset --powder "
            f"--material {material} --n 10000 --ei 50 --seed 0 --out {path}`"
        )
    try:
        data = read_powder_dataset(path)
    except DatasetError as exc:
        raise TrainingError(str(exc)) from exc
    if str(data["material"]) != material:
        raise TrainingError(f"{path} is a training set for {data['material']}, not {material}")
    if len(data["spectra"]) < 20:
        raise TrainingError(f"{path} has {len(data['spectra'])} spectra; need at least 20")
    data["path"] = str(path)
    return data


def noisy_spectra(
    spectra: torch.Tensor,
    mask: torch.Tensor,
    counts: torch.Tensor,
    background: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """Poisson realisations of spectra, back in the spectra's units.

    Parameters
    ----------
    spectra
        (B, n_Q, n_E) float, S(|Q|, E) >= 0.
    mask
        (n_Q, n_E) bool, the measured bins.
    counts
        (B,) float: expected total counts over the measured bins (inf = no noise).
    background
        (B,) float: flat background added before the counting, as a fraction of the mean
        measured S.

    Returns
    -------
    torch.Tensor
        (B, n_Q, n_E) float32, zero outside ``mask``.
    """
    m = mask.to(spectra.dtype)
    s = spectra.clamp(min=0) * m
    mean = s.sum(dim=(1, 2)) / m.sum().clamp(min=1)
    s = s + (background * mean)[:, None, None] * m
    total = s.sum(dim=(1, 2)).clamp(min=1e-30)
    finite = torch.isfinite(counts)
    scale = torch.where(finite, counts / total, torch.ones_like(total))
    lam = s * scale[:, None, None]
    noisy = torch.where(finite[:, None, None], torch.poisson(lam, generator=gen), lam)
    return (noisy / scale[:, None, None]).to(torch.float32)


def r2_scores(pred: NDArray[np.floating], truth: NDArray[np.floating]) -> list[float]:
    """R^2 per column of (n, n_fc) predictions against the truth."""
    ss_res = ((pred - truth) ** 2).sum(axis=0)
    ss_tot = ((truth - truth.mean(axis=0)) ** 2).sum(axis=0)
    return [round(float(x), 4) for x in 1.0 - ss_res / ss_tot]


def _batches(n: int, batch: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=gen)
    for s in range(0, n - batch + 1, batch):
        yield order[s : s + batch]


def _cosine(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, total // 50)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _round_fp16(net: nn.Module) -> None:
    """Round the parameters to float16 and back (what the artifact stores), frozen."""
    net.eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(p.half().float())
            p.requires_grad_(False)


class _PowderTrainer:
    """Holds the split data, the noise generator and the training history."""

    def __init__(self, data: dict[str, Any], cfg: PowderTrainConfig, progress: bool) -> None:
        self.cfg = cfg
        self.progress = progress
        spectra = torch.from_numpy(np.asarray(data["spectra"], dtype=np.float32))
        dom = np.asarray(data["domain"], dtype=np.float64)
        self.domain = dom
        scaled = 2.0 * (np.asarray(data["fc"]) - dom[:, 0]) / (dom[:, 1] - dom[:, 0]) - 1.0
        y = torch.from_numpy(scaled.astype(np.float32))
        n = len(spectra)
        n_cal = max(2, n // 10)
        n_test = max(2, n // 10)
        n_train = n - n_cal - n_test
        self.train_x, self.train_y = spectra[:n_train], y[:n_train]
        self.cal_x, self.cal_y = spectra[n_train : n_train + n_cal], y[n_train : n_train + n_cal]
        self.test_x, self.test_y = spectra[n_train + n_cal :], y[n_train + n_cal :]
        self.mask = torch.from_numpy(np.asarray(data["kinematic_mask"], dtype=bool))
        self.shape = pooled_shape(tuple(self.mask.shape))  # type: ignore[arg-type]
        self.pixels = prepare(self.mask[None].float(), self.mask[None])[0, 1] > 0
        self.n_fc = y.shape[1]
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.history: dict[str, list[float]] = {}
        self.batch_size = min(cfg.batch, len(self.train_x))
        self.mp: dict[str, torch.Tensor | None] = {"train": None, "cal": None, "test": None}
        self.input_mask = self.mask
        if cfg.measured_like:
            from model_server.inversion.powder.domain import crop_exposure

            if "multiphonon" not in data:
                raise TrainingError("measured-like training needs the set's multiphonon spectra")
            mp = torch.from_numpy(np.asarray(data["multiphonon"], dtype=np.float32))
            self.mp = {
                "train": mp[:n_train],
                "cal": mp[n_train : n_train + n_cal],
                "test": mp[n_train + n_cal :],
            }
            x_np, t_np = crop_exposure(data)
            self.exposure = torch.from_numpy(x_np)
            self.flat = torch.from_numpy(t_np)
            self.input_mask = self.mask & (self.exposure > 0)

    def _log(self, key: str, value: float) -> None:
        self.history.setdefault(key, []).append(float(value))

    def _epochs(self, name: str, epochs: int) -> Iterator[int]:
        from tqdm import tqdm

        yield from tqdm(range(epochs), desc=name, unit="epoch", disable=not self.progress)

    def conditions(self, b: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts, background) (B,) each of the training noise: clean with ``p_clean``,
        else counts log-uniform in ``counts_range`` and background in [0, background_max]."""
        cfg = self.cfg
        lo, hi = math.log(cfg.counts_range[0]), math.log(cfg.counts_range[1])
        counts = torch.exp(lo + (hi - lo) * torch.rand(b, generator=gen))
        clean = torch.rand(b, generator=gen) < cfg.p_clean
        counts = torch.where(clean, torch.full_like(counts, float("inf")), counts)
        background = torch.where(
            clean, torch.zeros(b), cfg.background_max * torch.rand(b, generator=gen)
        )
        return counts, background

    def inputs(
        self, x: torch.Tensor, gen: torch.Generator, mp: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy prepared input (B, 2, H, W), clean target (B, H, W), counts (B,)).

        With ``measured_like`` (and ``mp``, the spectra's multiphonon S): the noisy inputs
        are measured-like (:func:`~model_server.inversion.powder.domain.
        measured_like_noise`: one-phonon + multiphonon + a flat-in-time-of-flight
        background of 0-``background_share_max`` of the events, counted over the fold's
        exposure); the clean ones and every target the one-phonon spectrum."""
        counts, bkg = self.conditions(len(x), gen)
        if self.cfg.measured_like and mp is not None:
            from model_server.inversion.powder.domain import measured_like_noise

            finite = torch.isfinite(counts)
            share = self.cfg.background_share_max * torch.rand(len(x), generator=gen)
            noisy = measured_like_noise(
                x,
                mp,
                self.input_mask,
                self.exposure,
                self.flat,
                torch.where(finite, counts, torch.ones_like(counts)),
                share,
                gen,
            )
            noisy = torch.where(finite[:, None, None], noisy, x * self.input_mask)
        else:
            noisy = noisy_spectra(x, self.mask, counts, bkg, gen)
        masks = self.input_mask[None].expand(len(x), -1, -1)
        clean = prepare(x, self.mask[None].expand(len(x), -1, -1))[:, 0]
        return prepare(noisy, masks), clean, counts

    def split_mp(self, split: str, idx: torch.Tensor | slice) -> torch.Tensor | None:
        """The multiphonon S of items ``idx`` of ``split`` (None without measured-like
        training)."""
        mp = self.mp[split]
        return None if mp is None else mp[idx]

    def _held(
        self, x: torch.Tensor, seed: int, split: str = "cal"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        parts = [
            self.inputs(x[s : s + 256], g, self.split_mp(split, slice(s, s + 256)))
            for s in range(0, len(x), 256)
        ]
        return tuple(torch.cat([p[k] for p in parts]) for k in range(3))  # type: ignore[return-value]

    # ------------------------------------------------------------------ VAE
    def vae_terms(
        self,
        vae: PowderVAE,
        inp: torch.Tensor,
        target: torch.Tensor,
        y: torch.Tensor | None,
        gen: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The VAE loss's terms for a batch: (sum of squared reconstruction errors of
        ``target`` on the pixels inside the kinematic limit, KL to the prior, squared error
        of the auxiliary FC head against scaled FCs ``y`` (0 without labels)), each the
        batch mean."""
        recon, mu, logvar, aux = vae(inp, gen)
        rec = (((recon - target) ** 2) * self.pixels.float()).sum(dim=(1, 2)).mean()
        kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(dim=1).mean()
        sup = torch.zeros(()) if y is None else ((aux - y) ** 2).sum(dim=1).mean()
        return rec, kl, sup

    def train_vae(self) -> PowderVAE:
        cfg = self.cfg
        vae, _ = build_networks(
            cfg.variant,
            self.shape,
            self.pixels,
            cfg.latent,
            self.n_fc,
            cfg.hidden,
            cfg.regressor_widths,
        )
        steps = cfg.vae_epochs * max(1, len(self.train_x) // self.batch_size)
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=1e-5)
        sched = _cosine(opt, steps)
        hold_in, hold_clean, _ = self._held(self.cal_x, cfg.seed + 1)
        px = self.pixels.float()
        for _ in self._epochs(f"VAE ({cfg.variant})", cfg.vae_epochs):
            vae.train()
            sums = np.zeros(4)
            n = 0
            for idx in _batches(len(self.train_x), self.batch_size, self.gen):
                inp, clean, _ = self.inputs(
                    self.train_x[idx], self.gen, self.split_mp("train", idx)
                )
                rec, kl, sup = self.vae_terms(vae, inp, clean, self.train_y[idx], self.gen)
                loss = rec + cfg.beta * kl + cfg.aux_weight * sup
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(vae.parameters(), 10.0)
                opt.step()
                sched.step()
                sums += [loss.item(), rec.item(), kl.item(), sup.item()]
                n += 1
            for k, v in zip(("loss", "recon", "kl", "aux"), sums / max(n, 1), strict=True):
                self._log(f"vae_train_{k}", v)
            vae.eval()
            with torch.no_grad():
                mu, _ = vae.encoder(hold_in)
                h_rec = float((((vae.decoder(mu) - hold_clean) ** 2) * px).sum(dim=(1, 2)).mean())
                h_sup = float(((vae.aux(mu) - self.cal_y) ** 2).sum(dim=1).mean())
            self._log("vae_holdout_recon", h_rec)
            self._log("vae_holdout_aux", h_sup)
            logger.info("VAE epoch: holdout recon %.3f aux %.4f", h_rec, h_sup)
        _round_fp16(vae)
        return vae

    # ------------------------------------------------------------------ regressor
    def train_regressor(self, vae: PowderVAE) -> PaperRegressor:
        cfg = self.cfg
        _, reg = build_networks(
            cfg.variant,
            self.shape,
            self.pixels,
            cfg.latent,
            self.n_fc,
            cfg.hidden,
            cfg.regressor_widths,
        )
        steps = cfg.regressor_epochs * max(1, len(self.train_x) // self.batch_size)
        opt = torch.optim.AdamW(reg.parameters(), lr=cfg.lr, weight_decay=1e-5)
        sched = _cosine(opt, steps)
        hold_in, _, _ = self._held(self.cal_x, cfg.seed + 2)
        with torch.no_grad():
            hold_mu, _ = vae.encoder(hold_in)
        for _ in self._epochs("regressor", cfg.regressor_epochs):
            reg.train()
            total, n = 0.0, 0
            for idx in _batches(len(self.train_x), self.batch_size, self.gen):
                inp, _, _ = self.inputs(self.train_x[idx], self.gen, self.split_mp("train", idx))
                with torch.no_grad():
                    mu, logvar = vae.encoder(inp)
                    z = mu + torch.randn(mu.shape, generator=self.gen) * torch.exp(0.5 * logvar)
                m, lv = reg(z)
                var = lv.exp()
                nll = 0.5 * (lv + (self.train_y[idx] - m) ** 2 / var)
                loss = (nll * var.detach() ** 0.5).sum(dim=1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item()
                n += 1
            self._log("regressor_train_loss", total / max(n, 1))
            reg.eval()
            with torch.no_grad():
                m, lv = reg(hold_mu)
                mse = float(((m - self.cal_y) ** 2).mean())
            self._log("regressor_holdout_mse", mse)
            logger.info("regressor epoch: holdout mse %.4f", mse)
        _round_fp16(reg)
        return reg

    # ------------------------------------------------------------------ calibration
    def components(
        self, vae: PowderVAE, reg: PaperRegressor, inputs: torch.Tensor, seed: int
    ) -> dict[str, torch.Tensor]:
        """:func:`predictive`'s uncalibrated outputs for prepared inputs, in chunks."""
        g = torch.Generator().manual_seed(seed)
        parts: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for s in range(0, len(inputs), 256):
                out = predictive(
                    vae,  # type: ignore[arg-type]
                    reg,  # type: ignore[arg-type]
                    inputs[s : s + 256],
                    n_samples=self.cfg.calibration_samples,
                    gen=g,
                )
                for k in ("mean", "std_raw", "mu", "recon"):
                    parts.setdefault(k, []).append(out[k])
        return {k: torch.cat(v) for k, v in parts.items()}

    def calibrate(
        self, vae: PowderVAE, reg: PaperRegressor
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        cfg = self.cfg
        a = self._held(self.cal_x, cfg.seed + 3)
        b = self._held(self.cal_x, cfg.seed + 4)
        inputs = torch.cat([a[0], b[0]])
        counts = torch.cat([a[2], b[2]]).numpy()
        truth = torch.cat([self.cal_y, self.cal_y]).numpy()
        comp = self.components(vae, reg, inputs, cfg.seed + 5)
        err = np.abs(comp["mean"].numpy() - truth)
        std_raw = comp["std_raw"].numpy()
        recon = comp["recon"].numpy()
        reference = float(np.median(recon))
        fits = [
            fit_calibration(err[:, k], std_raw[:, k], recon / reference) for k in range(self.n_fc)
        ]
        scale = np.array([f[0] for f in fits])
        power = np.array([f[1] for f in fits])
        std = std_raw * scale[None, :] * (recon / reference)[:, None] ** power[None, :]
        inside = err <= std
        clean = ~np.isfinite(counts)
        calibration = {
            "method": "std = std_raw * std_scale * (recon / reference_recon) ** noise_power per "
            "FC (model_server.inversion.training.fit_calibration) so that mean +- std covers "
            f"{ONE_SIGMA} on the calibration split (twice, training noise)",
            "std_scale": scale.tolist(),
            "noise_power": power.tolist(),
            "reference_recon": reference,
            "n_calibration": len(inputs),
            "samples": cfg.calibration_samples,
            "coverage_1sigma_calibration": {
                "clean": round(float(inside[clean].mean()), 4) if clean.any() else None,
                "noisy": round(float(inside[~clean].mean()), 4) if (~clean).any() else None,
            },
        }
        mu = comp["mu"]
        lat_mean = mu.mean(dim=0)
        cov = torch.cov((mu - lat_mean).T) + 1e-6 * torch.eye(mu.shape[1])
        prec = torch.linalg.inv(cov)
        maha = latent_distance(mu, lat_mean, prec).numpy()
        ood = {
            "method": "reconstruction error on measured bins and latent Mahalanobis distance "
            "(squared, per dimension) above their 99.5 % quantiles on calibration inputs under "
            "the training noise",
            "latent_mean": lat_mean.tolist(),
            "latent_precision": prec.tolist(),
            "reconstruction_threshold": float(np.quantile(recon, 0.995)),
            "latent_threshold": float(np.quantile(maha, 0.995)),
        }
        return calibration, ood

    def internal_test(self, vae: PowderVAE, reg: PaperRegressor) -> dict[str, Any]:
        """R^2 per FC (scaled units: the same as eV/A^2) on the internal test split."""
        g = torch.Generator().manual_seed(self.cfg.seed + 6)
        masks = self.mask[None].expand(len(self.test_x), -1, -1)
        clean_in = prepare(self.test_x, masks)
        noisy_in, _, _ = self._held(self.test_x, self.cfg.seed + 7, "test")
        out = {}
        for name, inp in (("clean", clean_in), ("training_noise", noisy_in)):
            comp = self.components(vae, reg, inp, int(torch.randint(0, 2**31, (1,), generator=g)))
            out[name] = r2_scores(comp["mean"].numpy(), self.test_y.numpy())
        return {"n": len(self.test_x), "r2": out}


def plot_powder_losses(history: dict[str, list[float]], out: Path, title: str) -> Path:
    """Loss curves per epoch (PNG): the VAE's and the regressor's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, prefix in zip(axes, ("vae_", "regressor_"), strict=True):
        for k, vals in history.items():
            if not k.startswith(prefix):
                continue
            v = np.asarray(vals)
            x = np.arange(1, len(v) + 1)
            if np.all(v > 0):
                ax.semilogy(x, v, label=k)
            else:  # a beta-NLL can be negative: its own linear axis
                twin = ax.twinx()
                twin.plot(x, v, "k:", label=k)
                twin.set_ylabel(f"{k} (k:)")
        ax.set_title(prefix.rstrip("_"))
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def train_powder_model(
    material: str,
    data: str | Path,
    out: str | Path,
    *,
    config: PowderTrainConfig | None = None,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Train a powder model of ``material`` on the powder training set ``data``; write the
    frozen model to ``out`` (:func:`model_server.inversion.powder.artifact.save_powder_model`).

    Returns
    -------
    dict
        Summary: output folder, variant, split sizes, minutes per stage, internal-test R^2,
        calibration coverage.
    """
    cfg = config or PowderTrainConfig()
    torch.set_num_threads(max(1, cfg.threads))
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    minutes: dict[str, float] = {}

    def stage(name: str, start: float) -> float:
        now = time.perf_counter()
        minutes[name] = round((now - start) / 60.0, 3)
        return now

    ds = load_powder_training_set(data, material)
    if cfg.measured_like:
        from model_server.inversion.powder.domain import multiphonon_set

        ds["multiphonon"] = multiphonon_set(ds, np.arange(len(ds["spectra"])), progress=progress)
    t = stage("read", t0)
    trainer = _PowderTrainer(ds, cfg, progress)
    vae = trainer.train_vae()
    t = stage("vae", t)
    reg = trainer.train_regressor(vae)
    t = stage("regressor", t)
    calibration, ood = trainer.calibrate(vae, reg)
    t = stage("calibration", t)
    test = trainer.internal_test(vae, reg)
    stage("internal_test", t)
    minutes["total"] = round((time.perf_counter() - t0) / 60.0, 3)
    spec = ds["spec"]
    meta = {
        "sample_kind": "powder",
        "variant": cfg.variant,
        "material": material,
        "fc_names": ds["fc_names"],
        "domain": np.asarray(ds["domain"]).tolist(),
        "units": "eV/A^2",
        "grid": ds["grid"],
        "crop": ds["crop"],
        "spec": spec,
        "averaging": ds["averaging"],
        "input_shape": list(np.asarray(ds["kinematic_mask"]).shape),
        "pooled_shape": list(trainer.shape),
        "latent": cfg.latent,
        "hidden": cfg.hidden,
        "regressor_widths": list(cfg.regressor_widths),
        "scalers": {
            "input": "model_server.inversion.preprocess.prepare on the crop with its mask: "
            "2x2 pooling, median background subtracted, |Q| columns to unit sum x n_E'/4, "
            "clipped at 8",
            "fc": "scaled = 2 (fc - domain_lo) / (domain_hi - domain_lo) - 1",
        },
        "calibration": calibration,
        "ood": ood,
        "internal_test": test,
        "training": {
            "config": cfg.to_dict(),
            "n_train": len(trainer.train_x),
            "n_calibration": len(trainer.cal_x),
            "n_internal_test": len(trainer.test_x),
            "minutes": minutes,
            "history": trainer.history,
            "torch_threads": torch.get_num_threads(),
            "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        },
        "provenance": {
            "train_command": command,
            "training_set": {
                "path": ds["path"],
                "n_spectra": len(ds["spectra"]),
                "seed": int(ds["seed"]),
                "n_discarded": int(ds["n_discarded"]),
                "command": str(ds["command"]),
                "created": str(ds["created"]),
                "resolution": ds["resolution"],
            },
        },
    }
    path = save_powder_model(out, meta, vae, reg, np.asarray(ds["kinematic_mask"], dtype=bool))
    plot_powder_losses(
        trainer.history, path / "loss_curves.png", f"{material} powder ({cfg.variant}): losses"
    )
    logger.info("powder model written to %s (%.1f min)", path, minutes["total"])
    return {
        "out": str(path),
        "sample_kind": "powder",
        "variant": cfg.variant,
        "material": material,
        "n_train": len(trainer.train_x),
        "n_calibration": len(trainer.cal_x),
        "n_internal_test": len(trainer.test_x),
        "minutes": minutes,
        "torch_threads": torch.get_num_threads(),
        "internal_test_r2": test["r2"],
        "coverage_1sigma_calibration": calibration["coverage_1sigma_calibration"],
        "loss_curves": str(path / "loss_curves.png"),
    }
