"""Frozen models: a directory that holds everything inference needs and where it came from.

Layout of a model directory::

    model.json        material, FC names and domain (eV/A^2), grid (with fingerprint),
                      scalers, network shapes, calibration (per-FC std scale), out-of-domain
                      thresholds, training-set provenance (command, seed, size), training
                      report (losses, minutes), augmentation settings, format version
    weights.pt        state dicts of encoder, decoder, regressor and baseline (float32;
                      read with torch.load(weights_only=True): no pickled code)
    coverage.npz      per-orientation exposure of the default mounting (CoverageBank)
    evaluation.json   the report of ``steer evaluate`` (when it has been run)
    *.png             loss curves, noise-grid heatmaps

Loading checks that every file is there and readable and that the shapes agree.
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

from model_server.exceptions import ArtifactError, GridMismatchError
from model_server.inversion.coverage import CoverageBank
from model_server.inversion.networks import VAE, BaselineCNN, Regressor
from model_server.inversion.preprocess import pooled_shape

__all__ = ["FORMAT_VERSION", "FrozenModel", "check_grid", "load_model", "save_model"]

#: Version of the directory layout and of model.json's keys.
FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class FrozenModel:
    """A loaded model directory.

    Attributes
    ----------
    path
        The directory.
    meta
        Contents of model.json.
    vae, regressor, baseline
        The networks, in eval mode, on the CPU.
    coverage
        Per-orientation exposure of the default mounting.
    version
        ``<material>-<first 12 hex digits of the weights' SHA-256>``.
    """

    path: Path
    meta: dict[str, Any]
    vae: VAE
    regressor: Regressor
    baseline: BaselineCNN
    coverage: CoverageBank
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
    def grid_shape(self) -> tuple[int, int]:
        """(n_q, n_E) of the spectra the model takes."""
        g = self.meta["grid"]
        return (int(g["n_q"]), int(g["n_e"]))

    @property
    def grid_fingerprint(self) -> str:
        """Fingerprint of the model's grid."""
        return str(self.meta["grid"]["fingerprint"])

    def to_fc(self, scaled: NDArray[np.floating]) -> NDArray[np.float64]:
        """Scaled coefficients in [-1, 1] -> eV/A^2 (any leading shape)."""
        lo, hi = self.domain[:, 0], self.domain[:, 1]
        return lo + (np.asarray(scaled, dtype=np.float64) + 1.0) * 0.5 * (hi - lo)

    def to_scaled(self, fc: NDArray[np.floating]) -> NDArray[np.float64]:
        """eV/A^2 -> scaled coefficients, [-1, 1] over the domain."""
        lo, hi = self.domain[:, 0], self.domain[:, 1]
        return 2.0 * (np.asarray(fc, dtype=np.float64) - lo) / (hi - lo) - 1.0


def _describe_grid(meta_grid: dict[str, Any]) -> str:
    return (
        f"{meta_grid.get('path')} with {meta_grid.get('n_q')} q-points, {meta_grid.get('n_e')} "
        f"energy bins {meta_grid.get('e_min_meV')}..{meta_grid.get('e_max_meV')} meV, "
        f"fingerprint {meta_grid.get('fingerprint')}"
    )


def check_grid(model: FrozenModel, fingerprint: str, data_grid: dict[str, Any] | None) -> None:
    """Raise :class:`GridMismatchError` if data on grid ``fingerprint`` cannot go to the model.

    ``data_grid`` describes the data's grid (``Grid.to_dict()`` keys) for the message.
    """
    if fingerprint == model.grid_fingerprint:
        return
    theirs = _describe_grid(data_grid) if data_grid else f"fingerprint {fingerprint}"
    raise GridMismatchError(
        f"the spectrum is on grid {theirs}, but model {model.version} ({model.material}) "
        f"was trained on grid {_describe_grid(model.meta['grid'])}; fold the data on the "
        "model's grid or use a model trained for this one (spectra are never resampled)"
    )


def _weights_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_networks(meta: dict[str, Any]) -> tuple[VAE, Regressor, BaselineCNN]:
    """Untrained networks of the shapes that ``meta`` describes."""
    shape = pooled_shape((int(meta["grid"]["n_q"]), int(meta["grid"]["n_e"])))
    latent = int(meta["latent"])
    n_fc = len(meta["fc_names"])
    return VAE(shape, latent, n_fc), Regressor(latent, n_fc), BaselineCNN(n_fc)


def save_model(
    out: str | Path,
    meta: dict[str, Any],
    vae: VAE,
    regressor: Regressor,
    baseline: BaselineCNN,
    coverage: CoverageBank,
) -> Path:
    """Write a model directory (created if needed; existing files replaced)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        "vae": {k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()},
        "regressor": {k: v.detach().cpu().contiguous() for k, v in regressor.state_dict().items()},
        "baseline": {k: v.detach().cpu().contiguous() for k, v in baseline.state_dict().items()},
    }
    torch.save(state, out / "weights.pt")
    coverage.save(out / "coverage.npz")
    meta = {**meta, "format_version": FORMAT_VERSION}
    (out / "model.json").write_text(json.dumps(meta, indent=1, default=_json) + "\n")
    return out


def _json(o: object) -> object:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_model(path: str | Path) -> FrozenModel:
    """Load a model directory written by :func:`save_model`.

    Raises
    ------
    ArtifactError
        Missing directory or file, unreadable JSON or weights, a format version this code
        does not read, weights that do not fit the described networks.
    """
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(
            f"no model directory at {path}; train one with `steer train --material Ge "
            f"--data ge.h5 --out {path}`"
        )
    from model_server.inversion.kinds import model_kind

    if model_kind(path) == "powder":
        raise ArtifactError(
            f"{path} is a powder model; load it with "
            "model_server.inversion.powder.artifact.load_powder_model (steer estimate and "
            "steer evaluate pick it by its model.json)"
        )
    missing = [n for n in ("model.json", "weights.pt", "coverage.npz") if not (path / n).is_file()]
    if missing:
        raise ArtifactError(f"model directory {path} is incomplete: missing {', '.join(missing)}")
    try:
        meta = json.loads((path / "model.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {path / 'model.json'}: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has model format {meta.get('format_version')}, this code reads "
            f"{FORMAT_VERSION}; retrain with the rebuild command in its provenance"
        )
    try:
        state = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ArtifactError(f"cannot read the weights {path / 'weights.pt'}: {exc}") from exc
    vae, regressor, baseline = build_networks(meta)
    try:
        vae.load_state_dict(state["vae"])
        regressor.load_state_dict(state["regressor"])
        baseline.load_state_dict(state["baseline"])
    except (KeyError, RuntimeError) as exc:
        raise ArtifactError(
            f"weights in {path} do not fit the networks in model.json: {exc}"
        ) from exc
    for net in (vae, regressor, baseline):
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
    coverage = CoverageBank.load(path / "coverage.npz")
    if coverage.grid_fingerprint != meta["grid"]["fingerprint"]:
        raise ArtifactError(
            f"{path}: coverage.npz is for grid {coverage.grid_fingerprint}, the model for "
            f"{meta['grid']['fingerprint']}"
        )
    version = f"{meta['material']}-{_weights_digest(path / 'weights.pt')[:12]}"
    return FrozenModel(
        path=path,
        meta=meta,
        vae=vae,
        regressor=regressor,
        baseline=baseline,
        coverage=coverage,
        version=version,
    )
