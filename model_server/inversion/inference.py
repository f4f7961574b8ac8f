"""Inference: a folded spectrum (full, or from a few orientations) -> FCs with uncertainties.

For a spectrum I(q, E) and its mask the frozen encoder gives the latent distribution
N(mu, sigma^2) (20 dimensions); ``n_samples`` latent samples go through the regressor,
which gives for each a Gaussian over the scaled FCs (mean m_s, variance v_s). The estimate
is the mixture: mean = <m_s>, variance = <v_s> + Var(m_s), then scaled per FC by the
calibration fitted on held-out data (:class:`Calibration`: a factor times a power of the
input's reconstruction error, which tracks noise and missing coverage), so that mean +- std
holds the truth about 68 % of the time at every noise level. Quantiles come from the mixture
samples ``mean + scale (m_s - mean + sqrt(v_s) eps)``.

Out-of-domain score: the reconstruction error of the decoder on the measured bins and the
Mahalanobis distance of the latent mean from the held-out latent means, each compared with
its 99.5 % quantile over held-out training-like inputs; beyond either, the estimate is
flagged ``out_of_domain``.

:class:`Estimator` is thread-safe (no shared mutable state; every call draws from its own
generator, seeded so that the same input gives the same estimate), batched, on the CPU by
default or on a GPU when one is present and asked for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from model_server.exceptions import InputSpectrumError, SampleKindError
from model_server.inversion.artifact import FrozenModel, check_grid, load_model
from model_server.inversion.networks import VAE, Regressor
from model_server.inversion.preprocess import check_spectrum, prepare

__all__ = [
    "QUANTILES",
    "Calibration",
    "Estimate",
    "Estimator",
    "latent_distance",
    "predictive",
    "read_folded",
    "reconstruction_error",
]

#: Quantile levels reported per FC.
QUANTILES = (0.05, 0.16, 0.5, 0.84, 0.95)


@dataclass(frozen=True, slots=True, kw_only=True)
class Estimate:
    """FC estimate of one spectrum.

    Attributes
    ----------
    fc_names
        Names of the coefficients, in order.
    mean, std
        (n_fc,) float, eV/A^2.
    quantiles
        {level: (n_fc,) float eV/A^2} for the levels of :data:`QUANTILES`.
    out_of_domain
        True when the input is unlike anything the model was trained on (do not trust it).
    ood
        The scores and their thresholds: ``reconstruction``, ``latent_distance``,
        ``reconstruction_threshold``, ``latent_threshold``.
    model_version
        ``<material>-<weights digest>``.
    latency_ms
        Wall time of the call that produced it (for a batch: the batch's time / its size).
    n_samples
        Latent samples drawn.
    """

    fc_names: tuple[str, ...]
    mean: NDArray[np.float64]
    std: NDArray[np.float64]
    quantiles: dict[float, NDArray[np.float64]]
    out_of_domain: bool
    ood: dict[str, float]
    model_version: str
    latency_ms: float
    n_samples: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (FCs keyed by name)."""
        return {
            "model_version": self.model_version,
            "fc": {
                n: {
                    "mean": float(self.mean[k]),
                    "std": float(self.std[k]),
                    **{f"q{round(100 * q):02d}": float(v[k]) for q, v in self.quantiles.items()},
                }
                for k, n in enumerate(self.fc_names)
            },
            "units": "eV/A^2",
            "out_of_domain": self.out_of_domain,
            "ood": self.ood,
            "n_samples": self.n_samples,
            "latency_ms": round(self.latency_ms, 3),
            **self.extra,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Calibration:
    """Post-hoc calibration of the mixture std, fitted on held-out data.

    ``std = std_raw * scale * (r / r_ref) ** power`` per FC, with ``r`` the reconstruction
    error of the input (a measure of how noisy or incomplete it is: the encoder is trained to
    denoise, so its latent spread hardly grows with noise, but the reconstruction error
    does). ``power = 0`` is plain temperature scaling.

    Attributes
    ----------
    scale, power
        (n_fc,) float.
    reference
        r_ref, the median held-out reconstruction error.
    """

    scale: torch.Tensor
    power: torch.Tensor
    reference: float

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Calibration:
        """From ``model.json``'s ``calibration``."""
        scale = torch.tensor(meta["std_scale"], dtype=torch.float32)
        power = torch.tensor(meta.get("noise_power", [0.0] * len(scale)), dtype=torch.float32)
        return cls(scale=scale, power=power, reference=float(meta.get("reference_recon", 1.0)))

    def factor(self, recon: torch.Tensor) -> torch.Tensor:
        """(B, n_fc) std factor for (B,) reconstruction errors."""
        ratio = (recon.clamp(min=1e-12) / self.reference)[:, None]
        return self.scale.to(recon.device)[None, :] * ratio ** self.power.to(recon.device)


def reconstruction_error(vae: VAE, inputs: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared error of the decoded latent mean on the measured (pooled) bins."""
    recon = vae.decoder(mu)
    measured = inputs[:, 1] > 0
    sq = (recon - inputs[:, 0]) ** 2 * measured
    return sq.sum(dim=(1, 2)) / measured.sum(dim=(1, 2)).clamp(min=1)


def predictive(
    vae: VAE,
    regressor: Regressor,
    inputs: torch.Tensor,
    *,
    n_samples: int,
    gen: torch.Generator,
    calibration: Calibration | None = None,
    quantiles: tuple[float, ...] = (),
) -> dict[str, torch.Tensor]:
    """Mixture prediction in scaled FC units for prepared inputs (B, 2, H, W).

    Returns ``mean``, ``std`` (B, n_fc) (calibrated when ``calibration`` is given),
    ``std_raw`` (B, n_fc), ``mu`` (B, latent), ``recon`` (B,) and, when ``quantiles`` are
    asked for, ``quantiles`` (n_q, B, n_fc).
    """
    mu, logvar = vae.encoder(inputs)
    sd = torch.exp(0.5 * logvar)
    # the same draws for every spectrum of the batch: an estimate does not depend on what
    # else is in the batch
    eps = torch.randn((n_samples, 1, mu.shape[1]), generator=gen).to(mu.device)
    z = mu[None] + eps * sd[None]
    m, lv = regressor(z)
    v = torch.exp(lv)
    mean = m.mean(dim=0)
    std_raw = torch.sqrt(v.mean(dim=0) + m.var(dim=0, unbiased=False))
    recon = reconstruction_error(vae, inputs, mu)
    factor = calibration.factor(recon) if calibration is not None else torch.ones_like(mean)
    out = {"mean": mean, "std": std_raw * factor, "std_raw": std_raw, "mu": mu, "recon": recon}
    if quantiles:
        e2 = torch.randn((n_samples, 1, m.shape[2]), generator=gen).to(m.device)
        draws = mean[None] + factor[None] * (m - mean[None] + torch.sqrt(v) * e2)
        out["quantiles"] = torch.quantile(
            draws, torch.tensor(quantiles, dtype=draws.dtype, device=draws.device), dim=0
        )
    return out


def latent_distance(
    mu: torch.Tensor, latent_mean: torch.Tensor, latent_precision: torch.Tensor
) -> torch.Tensor:
    """(B,) squared Mahalanobis distance per latent dimension of latent means (B, L)."""
    d = mu - latent_mean
    return torch.einsum("bi,ij,bj->b", d, latent_precision, d) / mu.shape[1]


def read_folded(path: str | Path, *, first: int | None = None) -> dict[str, Any]:
    """Read a folded spectrum file (``RunAccumulator.write_hdf5``, ``steer fold --out``).

    Parameters
    ----------
    first
        Use only the first ``first`` orientations of the run (their per-orientation counts
        and exposure), as the spectrum stood after them; default: the whole run.

    Returns ``intensity`` (n_q, n_E) 1/(uC sr meV), NaN where unmeasured, ``mask`` (n_q, n_E)
    bool, ``grid_fingerprint``, ``grid`` (path, n_q, n_e, energies) and ``n_orientations``.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise InputSpectrumError(f"no folded spectrum file at {path} (write one with steer fold)")
    try:
        with h5py.File(path, "r") as f:
            entry = f["entry"]
            data = entry["iqe"]
            edges = entry["grid/energy_edges"][()]
            omegas = entry["orientations/omega"][()] if "orientations" in entry else []
            if first is None:
                intensity = np.asarray(data["intensity"][()], dtype=np.float64)
                mask = np.asarray(data["mask"][()], dtype=bool)
                n_used = len(omegas)
            else:
                if not 1 <= first <= len(omegas):
                    raise InputSpectrumError(
                        f"{path} has {len(omegas)} orientations; cannot take the first {first}"
                    )
                counts = np.asarray(entry["orientations/counts"][:first], dtype=np.float64)
                exposure = np.asarray(entry["orientations/exposure"][:first], dtype=np.float64)
                c, e = counts.sum(axis=0), exposure.sum(axis=0)
                mask = e > 0
                intensity = np.where(mask, c / np.where(mask, e, 1.0), np.nan)
                n_used = first
            fingerprint = str(entry.attrs["grid_fingerprint"])
            return {
                "intensity": intensity,
                "mask": mask,
                "grid_fingerprint": fingerprint,
                "grid": {
                    "path": str(entry["grid"].attrs.get("path", "?")),
                    "n_q": int(intensity.shape[0]),
                    "n_e": int(intensity.shape[1]),
                    "e_min_meV": float(edges[0]),
                    "e_max_meV": float(edges[-1]),
                    "fingerprint": fingerprint,
                },
                "n_orientations": n_used,
            }
    except (OSError, KeyError) as exc:
        raise InputSpectrumError(
            f"{path} is not a folded spectrum file (entry/iqe/intensity, mask and "
            f"entry/grid from steer fold --out): {exc}"
        ) from exc


class Estimator:
    """The inference API the service uses: ``estimate(spectrum, mask) -> Estimate``.

    Parameters
    ----------
    model
        A loaded model, or the path of a model directory.
    device
        ``"cpu"`` (default), ``"cuda"``, or ``"auto"`` (a GPU when present).
    n_samples
        Latent samples per spectrum (256 by default).
    seed
        Seed of the per-call generator (same input, same estimate).
    """

    def __init__(
        self,
        model: FrozenModel | str | Path,
        *,
        device: str = "cpu",
        n_samples: int = 256,
        seed: int = 0,
    ) -> None:
        self.model = model if isinstance(model, FrozenModel) else load_model(model)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if n_samples < 2:
            raise InputSpectrumError(f"n_samples must be >= 2 to give a spread, got {n_samples}")
        self.n_samples = int(n_samples)
        self.seed = int(seed)
        self.vae = self.model.vae.to(self.device)
        self.regressor = self.model.regressor.to(self.device)
        meta = self.model.meta
        self.calibration = Calibration.from_meta(meta["calibration"])
        ood = meta["ood"]
        self._lat_mean = torch.tensor(ood["latent_mean"], dtype=torch.float32, device=self.device)
        self._lat_prec = torch.tensor(
            ood["latent_precision"], dtype=torch.float32, device=self.device
        )
        self._thr_recon = float(ood["reconstruction_threshold"])
        self._thr_lat = float(ood["latent_threshold"])

    @property
    def fc_names(self) -> tuple[str, ...]:
        """Names of the estimated coefficients."""
        return self.model.fc_names

    def estimate(
        self,
        spectrum: NDArray[np.floating] | torch.Tensor,
        mask: NDArray[np.bool_] | torch.Tensor | None = None,
        *,
        grid_fingerprint: str | None = None,
        grid: dict[str, Any] | None = None,
    ) -> Estimate:
        """Estimate the FCs of one spectrum.

        Parameters
        ----------
        spectrum
            (n_q, n_E) float, I(q, E) on the model's grid (any units; NaN where unmeasured).
        mask
            (n_q, n_E) bool, True where measured (default: the finite bins).
        grid_fingerprint
            Fingerprint of the spectrum's grid; checked against the model's when given.
        grid
            Description of the spectrum's grid (for the error message).

        Raises
        ------
        GridMismatchError
            The fingerprint (or the shape) is not the model's grid.
        InputSpectrumError
            Empty mask, NaN in measured bins, no positive intensity.
        """
        return self.estimate_batch(spectrum, mask, grid_fingerprint=grid_fingerprint, grid=grid)[0]

    def estimate_batch(
        self,
        spectra: NDArray[np.floating] | torch.Tensor,
        masks: NDArray[np.bool_] | torch.Tensor | None = None,
        *,
        grid_fingerprint: str | None = None,
        grid: dict[str, Any] | None = None,
    ) -> list[Estimate]:
        """Estimates for (B, n_q, n_E) spectra and masks (or one (n_q, n_E) spectrum)."""
        t0 = time.perf_counter()
        if grid_fingerprint is not None:
            check_grid(self.model, grid_fingerprint, grid)
        shape = self.model.grid_shape
        arr_shape = tuple(np.shape(spectra))
        if len(arr_shape) >= 2 and arr_shape[-2:] != shape:
            from model_server.exceptions import GridMismatchError

            raise GridMismatchError(
                f"the spectrum has shape {arr_shape[-2:]} (n_q, n_E) but model "
                f"{self.model.version} takes {shape} on grid {self.model.grid_fingerprint} "
                f"({self.model.meta['grid']['path']}); spectra are never resampled"
            )
        x, m = check_spectrum(spectra, masks, shape)
        gen = torch.Generator().manual_seed(self.seed)
        with torch.inference_mode():
            inputs = prepare(torch.from_numpy(x), torch.from_numpy(m)).to(self.device)
            out = predictive(
                self.vae,
                self.regressor,
                inputs,
                n_samples=self.n_samples,
                gen=gen,
                calibration=self.calibration,
                quantiles=QUANTILES,
            )
            err = out["recon"]
            maha = latent_distance(out["mu"], self._lat_mean, self._lat_prec)
        mean = out["mean"].cpu().numpy()
        std = out["std"].cpu().numpy()
        qs = out["quantiles"].cpu().numpy()
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
            raise InputSpectrumError(
                "the model gave a non-finite estimate for this input; it is outside anything "
                "the model can handle"
            )
        latency = (time.perf_counter() - t0) * 1e3 / len(x)
        model = self.model
        half = 0.5 * (model.domain[:, 1] - model.domain[:, 0])
        results = []
        for i in range(len(x)):
            e, d = float(err[i]), float(maha[i])
            results.append(
                Estimate(
                    fc_names=model.fc_names,
                    mean=model.to_fc(mean[i]),
                    std=std[i].astype(np.float64) * half,
                    quantiles={q: model.to_fc(qs[j, i]) for j, q in enumerate(QUANTILES)},
                    out_of_domain=bool(e > self._thr_recon or d > self._thr_lat),
                    ood={
                        "reconstruction": e,
                        "reconstruction_threshold": self._thr_recon,
                        "latent_distance": d,
                        "latent_threshold": self._thr_lat,
                    },
                    model_version=model.version,
                    latency_ms=latency,
                    n_samples=self.n_samples,
                )
            )
        return results

    def estimate_file(self, path: str | Path, *, first: int | None = None) -> Estimate:
        """Estimate from a folded spectrum file (``steer fold --out``), grid checked;
        ``first``: from its first orientations only.

        Raises
        ------
        SampleKindError
            The file is a powder run (a single-crystal model cannot read it).
        """
        from model_server.inversion.kinds import file_sample_kind

        if Path(path).is_file() and file_sample_kind(path) == "powder":
            raise SampleKindError(
                f"{path} is a powder run but {self.model.path} is a single-crystal model; "
                "use a powder model (steer train --powder)"
            )
        data = read_folded(path, first=first)
        est = self.estimate(
            data["intensity"],
            data["mask"],
            grid_fingerprint=data["grid_fingerprint"],
            grid=data["grid"],
        )
        est.extra.update(
            {
                "file": str(path),
                "n_orientations": data["n_orientations"],
                "measured_fraction": float(np.mean(data["mask"])),
            }
        )
        return est
