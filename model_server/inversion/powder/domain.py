"""Domain shift of a powder model: measured-like spectra and the bias they cause.

A powder model is trained on the coherent one-phonon powder average alone; a folded run
(``steer simulate run --powder`` as much as a measurement) also holds the sample's
multiphonon scattering, a background flat in time of flight and counting noise over the
instrument's exposure. :func:`measured_like` makes such spectra for the force-constant
sets of a powder training set, directly on the model's crop of the powder grid::

    counts ~ Poisson(k [S_1 + S_mp] X + b T),    spectrum = counts / X  (NaN where X = 0)

* ``S_1``: the set's spectrum in the training set (the model's own forward model);
* ``S_mp``: its multiphonon scattering, orders 2-3 in the incoherent approximation with
  the phonons of the same set (:func:`~simulations.lattice.backgrounds.powder_multiphonon`,
  the simulator's multiphonon component);
* ``X``: the exposure of the instrument's powder fold per unit charge
  (:meth:`~consumers.reduction.powder.PowderFolder.coverage`, sr meV);
* ``T``: the share of a background flat in time of flight in each bin
  (:meth:`~consumers.reduction.powder.PowderFolder.flat_background`), as the simulator
  draws it;
* ``k`` and ``b`` such that the crop's measured bins hold ``counts`` expected events of
  which a share ``background_share`` is background; both drawn per spectrum
  (:class:`MeasuredLikeSpec`).

The incoherent elastic line is left out: at Ei = 50 meV its Gaussian width at E = 0 is
0.66 meV, so the crop's lower edge (10 meV) is 15 widths away.

:func:`shift_metrics` measures what the shift does to a model's estimates: per
coefficient the bias (mean of estimate - truth), the RMSE, R^2 and the 1-sigma coverage
of the calibrated std, all in eV/A^2.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from model_server.exceptions import TrainingError

__all__ = [
    "MeasuredLikeSpec",
    "crop_exposure",
    "measured_like",
    "measured_like_noise",
    "multiphonon_set",
    "read_measured_like",
    "shift_metrics",
    "write_measured_like",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class MeasuredLikeSpec:
    """How measured-like spectra are drawn (recorded with them).

    Attributes
    ----------
    counts_range
        Expected events over the crop's measured bins, drawn log-uniform in this range (a
        10-step simulated Al run at 2e5 events per step holds about 7e5 in the crop).
    background_share
        Share of those events that is flat-in-time-of-flight background, uniform in this
        range.
    multiphonon
        Add the multiphonon scattering (orders 2-3).
    multiphonon_mesh
        q mesh (points per axis) of the multiphonon's phonons.
    seed
        Seed of the draws and the counting noise.
    """

    counts_range: tuple[float, float] = (2e5, 5e6)
    background_share: tuple[float, float] = (0.02, 0.15)
    multiphonon: bool = True
    multiphonon_mesh: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.counts_range
        if not 0 < lo <= hi:
            raise TrainingError(f"counts_range must be 0 < lo <= hi, got {self.counts_range}")
        blo, bhi = self.background_share
        if not 0 <= blo <= bhi < 1:
            raise TrainingError(
                f"background_share must be 0 <= lo <= hi < 1, got {self.background_share}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["counts_range"] = list(self.counts_range)
        d["background_share"] = list(self.background_share)
        return d


def crop_exposure(data: dict[str, Any]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(exposure ``X`` per unit charge (sr meV), flat background share ``T``) (n_Q, n_E)
    on a powder training set's crop, for the ARCS-like detector at the set's Ei."""
    from consumers.reduction.powder import PowderFolder
    from simulations.fcdb.powder_dataset import PowderSpec
    from simulations.instrument.spectrometer import Instrument

    spec = PowderSpec.from_dict(data["spec"])
    ei = spec.ei
    grid = spec.material_setup().powder_grid(ei)
    if grid.fingerprint != data["grid"]["fingerprint"]:
        raise TrainingError(
            f"the data set's powder grid {data['grid']['fingerprint']} is not the "
            f"{data['material']} grid at Ei {ei} meV ({grid.fingerprint})"
        )
    folder = PowderFolder(grid, Instrument.arcs_like(), ei)
    qs = slice(*data["crop"]["q_bins"])
    es = slice(*data["crop"]["e_bins"])
    return folder.coverage()[qs, es], folder.flat_background()[qs, es]


def measured_like(
    data: dict[str, Any],
    indices: NDArray[np.integer] | list[int],
    spec: MeasuredLikeSpec | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Measured-like spectra (the module docstring) of the sets ``indices`` of a powder
    training set (:func:`~simulations.fcdb.powder_dataset.read_powder_dataset`'s dict).

    Returns
    -------
    dict
        ``spectra`` (n, n_Q, n_E) float32 on the crop, NaN where unmeasured; ``mask``
        (n_Q, n_E) bool, the measured bins (inside the kinematic limit with exposure);
        ``fc`` (n, n_fc) the truths (eV/A^2); ``counts`` (n,) the expected events;
        ``background_share`` (n,); ``multiphonon_share`` (n,) the multiphonon's share of
        the signal; ``scale`` (n,) each draw's ``k`` (the counts are ``spectrum x k X``);
        ``exposure`` (``X``) and ``flat_background`` (``T``) (n_Q, n_E); ``spec`` (dict);
        ``indices``.
    """
    from tqdm import tqdm

    spec = spec or MeasuredLikeSpec()
    idx = np.asarray(indices, dtype=np.int64)
    rng = np.random.default_rng(spec.seed)
    exposure, flat = crop_exposure(data)
    mask = np.asarray(data["kinematic_mask"], bool) & (exposure > 0)
    lo, hi = (math.log(x) for x in spec.counts_range)
    n = len(idx)
    out = np.full((n, *mask.shape), np.nan, dtype=np.float32)
    counts = np.exp(rng.uniform(lo, hi, n))
    share = rng.uniform(*spec.background_share, n)
    mp_share = np.zeros(n)
    scale = np.zeros(n)
    x, t = exposure[mask], flat[mask]
    mps = (
        multiphonon_set(data, idx, mesh=spec.multiphonon_mesh, progress=progress)
        if spec.multiphonon
        else None
    )
    for i in tqdm(range(n), desc="measured-like spectra", unit="sp", disable=not progress):
        s1 = np.asarray(data["spectra"][idx[i]], float)[mask]
        signal = np.clip(s1, 0.0, None)
        if mps is not None:
            mp = np.asarray(mps[i], float)[mask]
            mp_share[i] = float((mp * x).sum() / max(((signal + mp) * x).sum(), 1e-300))
            signal = signal + mp
        sig_events = (signal * x).sum()
        k = counts[i] * (1.0 - share[i]) / max(sig_events, 1e-300)
        b = counts[i] * share[i] / max(t.sum(), 1e-300)
        scale[i] = k
        lam = k * signal * x + b * t
        observed = rng.poisson(lam)
        row = np.full(mask.shape, np.nan)
        row[mask] = observed / (k * x)
        out[i] = row
    return {
        "spectra": out,
        "mask": mask,
        "fc": np.asarray(data["fc"])[idx].astype(float),
        "counts": counts,
        "background_share": share,
        "multiphonon_share": mp_share,
        "scale": scale,
        "exposure": exposure,
        "flat_background": flat,
        "spec": spec.to_dict(),
        "indices": idx,
        "fc_names": list(data["fc_names"]),
    }


def multiphonon_set(
    data: dict[str, Any],
    indices: NDArray[np.integer] | list[int],
    *,
    mesh: int = 16,
    progress: bool = True,
) -> NDArray[np.float32]:
    """(n, n_Q, n_E) multiphonon S (orders 2-3, mbarn/(sr meV) per atom) on a powder
    training set's crop for its sets ``indices``, each with its own phonons
    (:func:`~simulations.lattice.backgrounds.powder_multiphonon`, ``mesh``^3 q mesh)."""
    from tqdm import tqdm

    from simulations.exceptions import SimulationError
    from simulations.fcdb.powder_dataset import PowderSpec
    from simulations.lattice.backgrounds import powder_multiphonon
    from simulations.lattice.sqe import CoherentSQE

    idx = np.asarray(indices, dtype=np.int64)
    q = 0.5 * (np.asarray(data["q_edges"])[1:] + np.asarray(data["q_edges"])[:-1])
    e = 0.5 * (np.asarray(data["energy_edges"])[1:] + np.asarray(data["energy_edges"])[:-1])
    spec = PowderSpec.from_dict(data["spec"])
    ms = spec.material_setup()
    names = list(data["fc_names"])
    if list(ms.basis.names) != names:
        raise TrainingError(f"the data set's coefficients {names} are not {ms.basis.names}")
    res = spec.resolution(ms)  # the resolution the set was made with (its file records it)
    out = np.zeros((len(idx), len(q), len(e)), dtype=np.float32)
    for i in tqdm(range(len(idx)), desc="multiphonon", unit="sp", disable=not progress):
        model = CoherentSQE(
            ms.basis,
            np.asarray(data["fc"][idx[i]], float),
            temperature=spec.temperature,
            resolution=res,
        )
        try:
            out[i] = powder_multiphonon(model, q, e, mesh=mesh)
        except SimulationError as exc:  # stable on the training mesh, not on this one
            raise TrainingError(f"set {idx[i]}: {exc}") from exc
    return out


def write_measured_like(path: str | Path, ml: dict[str, Any], source: str) -> Path:
    """Write :func:`measured_like`'s output to HDF5 (``source``: the training set's path)."""
    import h5py

    path = Path(path)
    with h5py.File(path, "w") as f:
        f.create_dataset("spectra", data=ml["spectra"], compression="lzf", chunks=True)
        for k in (
            "mask",
            "fc",
            "counts",
            "background_share",
            "multiphonon_share",
            "scale",
            "exposure",
            "flat_background",
            "indices",
        ):
            f.create_dataset(k, data=np.asarray(ml[k]))
        f.attrs["kind"] = "measured_like_powder"
        f.attrs["spec"] = json.dumps(ml["spec"])
        f.attrs["fc_names"] = json.dumps(ml["fc_names"])
        f.attrs["source"] = source
    return path


def read_measured_like(path: str | Path) -> dict[str, Any]:
    """Read :func:`write_measured_like`'s file (:class:`TrainingError` if it is not one)."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("kind") != "measured_like_powder":
                raise TrainingError(f"{path} is not a measured-like powder set")
            out: dict[str, Any] = {k: f[k][()] for k in f}
            out["spec"] = json.loads(str(f.attrs["spec"]))
            out["fc_names"] = json.loads(str(f.attrs["fc_names"]))
            out["source"] = str(f.attrs["source"])
    except TrainingError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise TrainingError(f"cannot read the measured-like set {path}: {exc}") from exc
    return out


def measured_like_noise(
    spectra: torch.Tensor,
    multiphonon: torch.Tensor,
    mask: torch.Tensor,
    exposure: torch.Tensor,
    flat: torch.Tensor,
    counts: torch.Tensor,
    share: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """The torch counterpart of :func:`measured_like` for a batch (training inputs).

    Parameters
    ----------
    spectra, multiphonon
        (B, n_Q, n_E) one-phonon and multiphonon S on the crop.
    mask
        (n_Q, n_E) bool, the measured bins (exposure > 0 there).
    exposure, flat
        (n_Q, n_E) ``X`` and ``T`` (:func:`crop_exposure`).
    counts, share
        (B,) expected events over the mask and the background's share of them.

    Returns
    -------
    torch.Tensor
        (B, n_Q, n_E) float32: counts / (k X) on the mask, 0 elsewhere.
    """
    m = mask.to(torch.float64)
    sx = (spectra.double().clamp(min=0) + multiphonon.double()) * exposure.double() * m
    k = counts.double() * (1.0 - share.double()) / sx.sum(dim=(1, 2)).clamp(min=1e-300)
    tm = flat.double() * m
    b = counts.double() * share.double() / tm.sum().clamp(min=1e-300)
    lam = k[:, None, None] * sx + b[:, None, None] * tm[None]
    observed = torch.poisson(lam, generator=gen)
    denom = (k[:, None, None] * exposure.double()[None]).clamp(min=1e-300)
    return torch.where(mask[None], observed / denom, torch.zeros_like(observed)).to(torch.float32)


def shift_metrics(
    mean: NDArray[np.floating],
    std: NDArray[np.floating],
    truth: NDArray[np.floating],
    names: list[str] | tuple[str, ...],
) -> dict[str, Any]:
    """Per coefficient: ``bias`` (mean of estimate - truth), ``bias_se`` (its standard
    error), ``rmse``, ``r2``, ``coverage_1sigma`` (|estimate - truth| <= std), all eV/A^2
    from (n, n_fc) estimates, stds and truths."""
    m, s, t = (np.asarray(a, float) for a in (mean, std, truth))
    d = m - t
    ss_tot = ((t - t.mean(axis=0)) ** 2).sum(axis=0)
    out: dict[str, Any] = {"n": len(m)}
    for key, vals in (
        ("bias", d.mean(axis=0)),
        ("bias_se", d.std(axis=0, ddof=1) / math.sqrt(max(len(d), 1))),
        ("rmse", np.sqrt((d**2).mean(axis=0))),
        ("r2", 1.0 - (d**2).sum(axis=0) / np.maximum(ss_tot, 1e-300)),
        ("coverage_1sigma", (np.abs(d) <= s).mean(axis=0)),
    ):
        out[key] = {n: round(float(v), 6) for n, v in zip(names, vals, strict=True)}
    return out
