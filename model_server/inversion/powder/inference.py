"""Estimates from powder spectra: a folded powder run (``steer fold --out``) -> FCs.

The same mixture prediction as the single-crystal :class:`~model_server.inversion.inference.
Estimator` (:func:`~model_server.inversion.inference.predictive`: latent samples through
the regressor, the calibrated std, quantiles, the out-of-domain flag) on the model's crop
of the powder grid. A folded file must be a powder run (``entry`` attribute ``sample_kind``
= ``"powder"``) on the model's powder grid (fingerprint); its bins outside the crop are
dropped, and its mask is combined with the model's kinematic mask (NaN or unmeasured bins
count as unmeasured, as in the single-crystal path).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from model_server.exceptions import GridMismatchError, InputSpectrumError, SampleKindError
from model_server.inversion.inference import (
    QUANTILES,
    Calibration,
    Estimate,
    latent_distance,
    read_folded,
)
from model_server.inversion.inference import predictive as _predictive
from model_server.inversion.kinds import file_sample_kind
from model_server.inversion.powder.artifact import PowderModel, load_powder_model
from model_server.inversion.preprocess import check_spectrum, prepare

__all__ = ["PowderEstimator", "file_sample_kind"]


class PowderEstimator:
    """``estimate(spectrum, mask) -> Estimate`` for a powder model.

    Parameters
    ----------
    model
        A loaded powder model or the path of its directory.
    n_samples
        Latent samples per spectrum.
    seed
        Seed of the per-call generator (same input, same estimate).
    """

    def __init__(self, model: PowderModel | str | Path, *, n_samples: int = 256, seed: int = 0):
        self.model = model if isinstance(model, PowderModel) else load_powder_model(model)
        if n_samples < 2:
            raise InputSpectrumError(f"n_samples must be >= 2 to give a spread, got {n_samples}")
        self.n_samples = int(n_samples)
        self.seed = int(seed)
        meta = self.model.meta
        self.calibration = Calibration.from_meta(meta["calibration"])
        ood = meta["ood"]
        self._lat_mean = torch.tensor(ood["latent_mean"], dtype=torch.float32)
        self._lat_prec = torch.tensor(ood["latent_precision"], dtype=torch.float32)
        self._thr_recon = float(ood["reconstruction_threshold"])
        self._thr_lat = float(ood["latent_threshold"])
        self._kin = torch.from_numpy(self.model.kinematic_mask)

    @property
    def shape(self) -> tuple[int, int]:
        """(n_Q, n_E) of the crop the model reads."""
        return (int(self._kin.shape[0]), int(self._kin.shape[1]))

    def predict(self, spectra: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Calibrated mixture prediction in scaled FC units for (B, n_Q, n_E) spectra on
        the crop and their masks (combined with the kinematic mask): ``mean``, ``std``,
        ``recon``, ``mu``, ``quantiles`` as :func:`predictive` gives them."""
        gen = torch.Generator().manual_seed(self.seed)
        with torch.inference_mode():
            inputs = prepare(spectra, (masks > 0) & self._kin[None])
            return _predictive(
                self.model.vae,  # type: ignore[arg-type]
                self.model.regressor,  # type: ignore[arg-type]
                inputs,
                n_samples=self.n_samples,
                gen=gen,
                calibration=self.calibration,
                quantiles=QUANTILES,
            )

    def estimate_batch(
        self,
        spectra: NDArray[np.floating] | torch.Tensor,
        masks: NDArray[np.bool_] | torch.Tensor | None = None,
    ) -> list[Estimate]:
        """Estimates for (B, n_Q, n_E) spectra on the model's crop (or one (n_Q, n_E)),
        any units, NaN where unmeasured; ``masks`` True where measured (default: finite).

        Raises
        ------
        GridMismatchError
            The spectra are not of the crop's shape.
        InputSpectrumError
            No measured bin, NaN in measured bins, no positive intensity.
        """
        t0 = time.perf_counter()
        arr_shape = tuple(np.shape(spectra))
        if len(arr_shape) >= 2 and arr_shape[-2:] != self.shape:
            raise GridMismatchError(
                f"the spectrum has shape {arr_shape[-2:]} (n_Q, n_E) but powder model "
                f"{self.model.version} takes its crop {self.shape}; pass the crop "
                f"{self.model.meta['crop']} of the powder grid (spectra are never resampled)"
            )
        x, m = check_spectrum(spectra, masks, self.shape)
        out = self.predict(torch.from_numpy(x), torch.from_numpy(m))
        mean, std = out["mean"].numpy(), out["std"].numpy()
        qs = out["quantiles"].numpy()
        maha = latent_distance(out["mu"], self._lat_mean, self._lat_prec).numpy()
        err = out["recon"].numpy()
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
            raise InputSpectrumError("the model gave a non-finite estimate for this input")
        model = self.model
        half = 0.5 * (model.domain[:, 1] - model.domain[:, 0])
        latency = (time.perf_counter() - t0) * 1e3 / len(x)
        return [
            Estimate(
                fc_names=model.fc_names,
                mean=model.to_fc(mean[i]),
                std=std[i].astype(np.float64) * half,
                quantiles={q: model.to_fc(qs[j, i]) for j, q in enumerate(QUANTILES)},
                out_of_domain=bool(err[i] > self._thr_recon or maha[i] > self._thr_lat),
                ood={
                    "reconstruction": float(err[i]),
                    "reconstruction_threshold": self._thr_recon,
                    "latent_distance": float(maha[i]),
                    "latent_threshold": self._thr_lat,
                },
                model_version=model.version,
                latency_ms=latency,
                n_samples=self.n_samples,
                extra={"sample_kind": "powder", "variant": str(model.meta["variant"])},
            )
            for i in range(len(x))
        ]

    def estimate(
        self,
        spectrum: NDArray[np.floating] | torch.Tensor,
        mask: NDArray[np.bool_] | torch.Tensor | None = None,
    ) -> Estimate:
        """Estimate of one (n_Q, n_E) spectrum on the crop (see :meth:`estimate_batch`)."""
        return self.estimate_batch(spectrum, mask)[0]

    def estimate_file(self, path: str | Path, *, first: int | None = None) -> Estimate:
        """Estimate from a folded powder run (``steer fold --out``); ``first``: from its
        first counting steps only.

        Raises
        ------
        SampleKindError
            The file is a single-crystal run.
        GridMismatchError
            The file's powder grid is not the model's (another Ei, another binning).
        """
        if file_sample_kind(path) != "powder":
            raise SampleKindError(
                f"{path} is a single-crystal run but {self.model.path} is a powder model; "
                "use a single-crystal model (steer train without --powder)"
            )
        data = read_folded(path, first=first)
        if data["grid_fingerprint"] != self.model.grid_fingerprint:
            g = self.model.meta["grid"]
            raise GridMismatchError(
                f"{path} is on powder grid {data['grid_fingerprint']} ({data['grid']['n_q']} "
                f"|Q| x {data['grid']['n_e']} E bins up to {data['grid']['e_max_meV']} meV) but "
                f"the model was trained on grid {g['fingerprint']} ({g['n_q']} x {g['n_e']} up "
                f"to {g['e_max_meV']} meV, Ei {self.model.meta['spec']['ei']} meV); fold a run "
                "at the model's Ei or train a model for this one"
            )
        qs, es = self.model.crop
        intensity = np.asarray(data["intensity"])[qs, es]
        mask = np.asarray(data["mask"])[qs, es] & np.isfinite(intensity)
        est = self.estimate(np.where(mask, intensity, np.nan), mask)
        extra: dict[str, Any] = {
            "file": str(path),
            "n_steps": data["n_orientations"],
            "measured_fraction_of_crop": round(float(mask.mean()), 4),
        }
        est.extra.update(extra)
        return est
