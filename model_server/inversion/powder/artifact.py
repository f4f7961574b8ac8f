"""Frozen powder models: the directory layout of
:mod:`model_server.inversion.artifact` for powder spectra.

Layout::

    model.json        sample_kind "powder", variant ("fc" or "cnn"), material, FC names and
                      domain (eV/A^2), grid (the full powder grid with its fingerprint),
                      crop (|Q| and energy ranges, bin slices), spec (ei, temperature,
                      averaging), network sizes, calibration, out-of-domain thresholds,
                      internal-test R^2, training report, provenance (rebuild commands)
    weights.pt        state dicts of the VAE and the regressor stored as float16, and the
                      crop's kinematic mask (read with torch.load(weights_only=True))
    evaluation.json   the report of ``steer evaluate`` (when it has been run)
    loss_curves.png   losses per epoch
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from model_server.exceptions import ArtifactError
from model_server.inversion.powder.networks import PaperRegressor, PowderVAE, build_networks
from model_server.inversion.preprocess import prepare

__all__ = ["FORMAT_VERSION", "PowderModel", "load_powder_model", "save_powder_model"]

#: Version of the powder model directory's layout and keys.
FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class PowderModel:
    """A loaded powder model directory.

    Attributes
    ----------
    path, meta
        The directory and its model.json.
    vae
        :class:`~model_server.inversion.powder.networks.FCVAE` or the convolutional
        :class:`~model_server.inversion.networks.VAE`, eval mode, CPU.
    regressor
        The regressor.
    kinematic_mask
        (n_Q, n_E) bool on the crop: the bins the model was trained on.
    version
        ``<material>-powder-<variant>-<first 12 hex digits of the weights' SHA-256>``.
    """

    path: Path
    meta: dict[str, Any]
    vae: PowderVAE
    regressor: PaperRegressor
    kinematic_mask: NDArray[np.bool_]
    version: str

    @property
    def material(self) -> str:
        """Material the model was trained for."""
        return str(self.meta["material"])

    @property
    def fc_names(self) -> tuple[str, ...]:
        """Names of the estimated coefficients, in order."""
        return tuple(self.meta["fc_names"])

    @property
    def domain(self) -> NDArray[np.float64]:
        """(n_fc, 2) training domain, eV/A^2."""
        return np.asarray(self.meta["domain"], dtype=np.float64)

    @property
    def grid_fingerprint(self) -> str:
        """Fingerprint of the full powder grid of the folded runs the model takes."""
        return str(self.meta["grid"]["fingerprint"])

    @property
    def crop(self) -> tuple[slice, slice]:
        """(|Q| slice, energy slice) of the full grid's bins that the model reads."""
        c = self.meta["crop"]
        return slice(*c["q_bins"]), slice(*c["e_bins"])

    def to_fc(self, scaled: NDArray[np.floating]) -> NDArray[np.float64]:
        """Scaled coefficients in [-1, 1] -> eV/A^2 (any leading shape)."""
        lo, hi = self.domain[:, 0], self.domain[:, 1]
        return lo + (np.asarray(scaled, dtype=np.float64) + 1.0) * 0.5 * (hi - lo)


def save_powder_model(
    out: str | Path,
    meta: dict[str, Any],
    vae: PowderVAE,
    regressor: PaperRegressor,
    kinematic_mask: NDArray[np.bool_],
) -> Path:
    """Write a powder model directory (created if needed; existing files replaced)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def half(net: nn.Module) -> dict[str, torch.Tensor]:
        return {
            k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in net.state_dict().items()
        }

    state = {
        "vae": half(vae),
        "regressor": half(regressor),
        "kinematic_mask": torch.from_numpy(np.ascontiguousarray(kinematic_mask, dtype=bool)),
    }
    torch.save(state, out / "weights.pt")
    meta = {**meta, "format_version": FORMAT_VERSION, "weights_dtype": "float16"}
    (out / "model.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def load_powder_model(path: str | Path) -> PowderModel:
    """Load a powder model directory written by :func:`save_powder_model`.

    Raises
    ------
    ArtifactError
        Missing directory or file, not a powder model, unreadable JSON or weights, a format
        version this code does not read, weights that do not fit the described networks.
    """
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(
            f"no model directory at {path}; train one with `steer train --powder --variant fc "
            f"--material Al --data al_powder.h5 --out {path}`"
        )
    missing = [n for n in ("model.json", "weights.pt") if not (path / n).is_file()]
    if missing:
        raise ArtifactError(f"model directory {path} is incomplete: missing {', '.join(missing)}")
    try:
        meta = json.loads((path / "model.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {path / 'model.json'}: {exc}") from exc
    if meta.get("sample_kind") != "powder":
        raise ArtifactError(f"{path} is a single-crystal model, not a powder model")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has powder model format {meta.get('format_version')}, this code reads "
            f"{FORMAT_VERSION}; retrain with the rebuild command in its provenance"
        )
    try:
        state = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
        mask = state["kinematic_mask"].numpy().astype(bool)
    except Exception as exc:
        raise ArtifactError(f"cannot read the weights {path / 'weights.pt'}: {exc}") from exc
    m = torch.from_numpy(mask)
    pixels = prepare(m[None].float(), m[None])[0, 1] > 0
    vae, reg = build_networks(
        str(meta["variant"]),
        (int(meta["pooled_shape"][0]), int(meta["pooled_shape"][1])),
        pixels,
        int(meta["latent"]),
        len(meta["fc_names"]),
        int(meta["hidden"]),
        tuple(int(w) for w in meta["regressor_widths"]),
    )
    try:
        vae.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in state["vae"].items()}
        )
        reg.load_state_dict({k: v.float() for k, v in state["regressor"].items()})
    except (KeyError, RuntimeError) as exc:
        raise ArtifactError(
            f"weights in {path} do not fit the networks in model.json: {exc}"
        ) from exc
    for net in (vae, reg):
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
    digest = hashlib.sha256((path / "weights.pt").read_bytes()).hexdigest()[:12]
    return PowderModel(
        path=path,
        meta=meta,
        vae=vae,
        regressor=reg,
        kinematic_mask=mask,
        version=f"{meta['material']}-powder-{meta['variant']}-{digest}",
    )
