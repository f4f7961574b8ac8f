"""Figures of a run for the web page and ``steer demo``: PNG bytes from matplotlib (Agg).

* :func:`spectrum_figure`: the measured I(q, E) beside the model's reconstruction (the
  forward model at the current FC estimate, on the measured bins);
* :func:`dispersion_figure`: the current estimate's phonon branches over the measured data
  (like the seed paper's Fig. 4);
* :func:`coverage_figure`: which (q, E) bins are measured and with how much exposure, and the
  angles measured so far;
* :func:`fc_figure`: FC estimates with error bars (mean +- std) against orientations
  measured, with the truth when it is known.

Spectra are shown Bose-corrected (I x E (1 - exp(-E/kT)), a model-independent conversion
that only needs E and T) so that the branches are visible at every energy.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from simulations.plotting import path_axes, path_branches, path_mesh
from simulations.units import K_B_MEV

__all__ = [
    "FigureModel",
    "coverage_figure",
    "dispersion_figure",
    "fc_figure",
    "spectrum_figure",
]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    _plt().close(fig)
    return buf.getvalue()


class FigureModel:
    """The forward model of a material at the estimated FCs (cached per material).

    ``theta`` are all the material's coefficients (eV/A^2) in the basis's order: a refined
    estimate gives every one, the VAE's the reference set's ``kept`` ones (the others take
    the reference set's values).
    """

    def __init__(self, material: str) -> None:
        import torch

        from simulations.fcdb.reference import load_reference
        from simulations.lattice.materials import setup

        self.material = material
        self.ms = setup(material)
        ref = load_reference(material)
        self.fc_names = tuple(self.ms.basis.names)
        self.reference = dict(zip(self.fc_names, ref.mean.tolist(), strict=True))
        self.fm = self.ms.forward_model(dtype=torch.float64, method="exact")

    @classmethod
    @functools.cache
    def of(cls, material: str) -> FigureModel:
        """The cached model of ``material``."""
        return cls(material)

    def theta(self, fc: Mapping[str, Any]) -> NDArray[np.float64]:
        """(n_fc,) FCs from an estimate's ``fc`` block ({name: {"mean": ...}} or
        {name: value}); FCs it lacks take the reference ensemble's mean."""

        def value(n: str) -> float:
            v = fc.get(n)
            if v is None:
                return self.reference[n]
            return float(v["mean"] if isinstance(v, Mapping) else v)

        return np.array([value(n) for n in self.fc_names])

    def spectrum(self, theta: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray]:
        """(I (n_q, n_E) unit-area branches, frequencies (n_q, n_branches) THz)."""
        import torch

        with torch.no_grad():
            t = torch.as_tensor(theta[None], dtype=torch.float64)
            res = self.fm.spectra(t)
            freqs = self.fm.frequencies(t)[0].numpy()
        return res.intensity[0].numpy(), freqs


def bose_corrected(
    intensity: NDArray[np.float64], energy: NDArray[np.float64], temperature: float
) -> NDArray[np.float64]:
    """I x E (1 - exp(-E/kT)) for E > 0 (NaN elsewhere): proportional to the one-phonon
    weight of each branch, so that high-energy branches show as well as low ones."""
    e = np.asarray(energy, dtype=float)
    factor = np.where(e > 0, e * -np.expm1(-np.maximum(e, 1e-12) / (K_B_MEV * temperature)), np.nan)
    return np.asarray(intensity, dtype=float) * factor[None, :]


def _measured(snapshot: Any, grid: Any, temperature: float) -> NDArray[np.float64]:
    data = bose_corrected(snapshot.intensity, grid.energy_centres, temperature)
    return np.where(snapshot.mask, data, np.nan)


def spectrum_figure(
    snapshot: Any,
    material: str,
    estimate: Mapping[str, Any] | None,
    *,
    temperature: float = 5.0,
    title: str = "",
) -> bytes:
    """PNG: measured I(q, E) (Bose-corrected) beside the forward model at the estimate.

    The model is scaled to the data by least squares over the measured bins (the data are
    per unit exposure, the model has unit-area branches)."""
    plt = _plt()
    fm = FigureModel.of(material)
    grid = fm.ms.grid
    data = _measured(snapshot, grid, temperature)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    vmax = float(np.nanpercentile(data, 99)) if np.isfinite(data).any() else 1.0
    path_mesh(axes[0], grid, data, cmap="viridis", vmin=0, vmax=max(vmax, 1e-30))
    axes[0].set_title(f"measured, {snapshot.n_orientations} orientations")
    if estimate is not None and estimate.get("fc"):
        model, _ = fm.spectrum(fm.theta(estimate["fc"]))
        ok = np.isfinite(data) & snapshot.mask
        denom = float((model[ok] ** 2).sum())
        scale = float((model[ok] * data[ok]).sum()) / denom if denom > 0 else 1.0
        shown = np.where(snapshot.mask, model * scale, np.nan)
        path_mesh(axes[1], grid, shown, cmap="viridis", vmin=0, vmax=max(vmax, 1e-30))
        axes[1].set_title("model at the current estimate (measured bins)")
    else:
        axes[1].text(0.5, 0.5, "no estimate yet", ha="center", va="center")
        axes[1].set_title("model")
    for ax in axes:
        path_axes(ax, grid, ylabel="E (meV)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


def dispersion_figure(
    snapshot: Any,
    material: str,
    estimate: Mapping[str, Any] | None,
    *,
    truth: Mapping[str, float] | None = None,
    temperature: float = 5.0,
    title: str = "",
) -> bytes:
    """PNG: the estimate's phonon branches (white) over the measured, Bose-corrected data;
    the truth's branches dashed when given (a simulated run); ``title`` replaces the
    default one."""
    plt = _plt()
    fm = FigureModel.of(material)
    grid = fm.ms.grid
    data = _measured(snapshot, grid, temperature)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    vmax = float(np.nanpercentile(data, 99)) if np.isfinite(data).any() else 1.0
    m = path_mesh(ax, grid, data, cmap="magma", vmin=0, vmax=max(vmax, 1e-30))
    fig.colorbar(m, ax=ax, label="I E (1 - exp(-E/kT)) (arb.)")
    if estimate is not None and estimate.get("fc"):
        _, freqs = fm.spectrum(fm.theta(estimate["fc"]))
        path_branches(ax, grid, freqs, color="white", lw=1.0)
        ax.plot([], [], color="white", lw=1.0, label="estimate")
    if truth is not None:
        theta = fm.theta(truth)
        _, freqs = fm.spectrum(theta)
        path_branches(ax, grid, freqs, color="cyan", lw=0.8, ls="--")
        ax.plot([], [], color="cyan", lw=0.8, ls="--", label="truth")
    path_axes(ax, grid, ylabel="E (meV)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8, facecolor="0.3", labelcolor="white")
    ax.set_title(
        title or f"dispersion of the estimate over the data ({snapshot.n_orientations} orient.)"
    )
    fig.tight_layout()
    return _png(fig)


def coverage_figure(snapshot: Any, material: str, omegas: Sequence[float] = ()) -> bytes:
    """PNG: exposure per (q, E) bin (log scale; white: unmeasured) and the angles measured."""
    from matplotlib.colors import LogNorm

    plt = _plt()
    grid = FigureModel.of(material).ms.grid
    exposure = np.where(snapshot.exposure > 0, snapshot.exposure, np.nan)
    fig, (ax, axo) = plt.subplots(
        1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 1]}, layout="constrained"
    )
    if np.isfinite(exposure).any():
        m = path_mesh(ax, grid, exposure, cmap="cividis", norm=LogNorm())
        fig.colorbar(m, ax=ax, label="exposure (uC sr meV)")
    path_axes(ax, grid, ylabel="E (meV)")
    frac = float(np.mean(snapshot.mask))
    ax.set_title(f"coverage: {100 * frac:.1f} % of bins measured")
    w = np.asarray(list(omegas), dtype=float)
    axo.remove()
    axo = fig.add_subplot(1, 2, 2, projection="polar")
    if len(w):
        axo.scatter(np.deg2rad(w), np.arange(1, len(w) + 1), c=np.arange(len(w)), s=12)
    axo.set_title("angles measured (radius: order)", fontsize=9)
    axo.set_yticklabels([])
    return _png(fig)


def fc_figure(
    estimates: Sequence[Mapping[str, Any]], *, truth: Mapping[str, float] | None = None
) -> bytes:
    """PNG: each FC's mean +- std against orientations measured (truth dashed). Estimates
    that are not the refinement's (the VAE's, e.g. a snapshot superseded while the fits
    were behind) are drawn hollow and grey, where they have the coefficient at all."""
    plt = _plt()
    # the panels: the last estimate with the most coefficients (the last refined one,
    # while the newest may be a superseded snapshot's VAE estimate)
    fullest = max(reversed(estimates), key=lambda e: len(e.get("fc", {})), default=None)
    names = list(fullest["fc"]) if fullest is not None else []
    n = max(len(names), 1)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        have = [e for e in estimates if name in e.get("fc", {})]
        for refined in (True, False):
            sel = [e for e in have if (e.get("source", "refined") == "refined") == refined]
            if not sel:
                continue
            ax.errorbar(
                [e["n_orientations"] for e in sel],
                [e["fc"][name]["mean"] for e in sel],
                yerr=[e["fc"][name]["std"] for e in sel],
                fmt="o-" if refined else "o",
                ms=2 if refined else 3,
                lw=0.8,
                capsize=1.5,
                color=None if refined else "0.6",
                mfc=None if refined else "none",
            )
        if truth is not None and name in truth:
            ax.axhline(truth[name], color="k", ls="--", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("orientations")
        ax.set_ylabel("eV/Å²")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    if not names:
        axes.flat[0].text(0.5, 0.5, "no estimate yet", ha="center", va="center")
    fig.tight_layout()
    return _png(fig)
