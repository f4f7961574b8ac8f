"""What a powder model's latent space says, measured (``steer evaluate --latent``).

1. **Active dimensions** (:func:`~model_server.inversion.powder.latent.active_dimensions`)
   over the clean spectra of a fresh test set, against the number of force constants;
2. **maps**: the encoder means of those spectra projected on two dimensions (PCA; UMAP
   when ``umap-learn`` is installed), coloured by each force constant;
3. **latent chi^2 against the counts' deviance**, on measured-like spectra (one-phonon +
   multiphonon + flat background + counting noise:
   :func:`~model_server.inversion.powder.domain.measured_like`) of ``n_truths`` test sets:
   each coefficient in turn is moved from the truth by ``offsets`` x its domain width, the
   others held at the truth, and at each point

   * the Poisson deviance of the counts against the full expected counts
     ``k (S_1 + S_mp) X + b T`` with ``k`` and ``b`` refitted (what the likelihood
     refinement minimises), and
   * the latent chi^2 between the data and the one-phonon spectrum at that point (the
     magnetic-inverse-scattering paper's cost, with the model the autoencoder was trained
     on)

   are computed. Per coefficient: the offset of each cost's minimum from the truth (a
   parabola through the lowest point and its neighbours), its mean (the cost's bias) and
   spread over the truths, in % of the domain width; the deviance's curvature gives its
   1-sigma width (Delta D = 1).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from model_server.exceptions import TrainingError
from model_server.inversion.powder.artifact import load_powder_model
from model_server.inversion.powder.domain import MeasuredLikeSpec, measured_like
from model_server.inversion.powder.latent import (
    active_dimensions,
    latent_chi2,
    latent_map,
    latent_means,
    plot_latent_map,
)
from model_server.inversion.powder.training import load_powder_training_set

__all__ = ["OFFSETS", "latent_study", "plot_chi2_scan"]

logger = logging.getLogger(__name__)

#: Offsets of the scanned coefficient from the truth, in units of its domain width.
OFFSETS = tuple(float(x) for x in np.round(np.linspace(-0.15, 0.15, 21), 4))


def _poisson_deviance(y: NDArray[np.float64], lam: NDArray[np.float64]) -> float:
    """2 sum(lam - y + y log(y / lam)) (0 log 0 = 0)."""
    lam = np.maximum(lam, 1e-300)
    pos = y > 0
    return float(2.0 * (np.sum(lam - y) + np.sum(y[pos] * np.log(y[pos] / lam[pos]))))


def _profile_deviance(
    y: NDArray[np.float64], signal: NDArray[np.float64], flat: NDArray[np.float64]
) -> float:
    """Deviance of counts ``y`` against ``k signal + b flat`` minimised over k, b >= 0
    (Poisson EM updates, which keep both non-negative and raise the likelihood)."""
    k = max(float(y.sum()), 1.0) / max(float(signal.sum()), 1e-300) * 0.9
    b = 0.1 * max(float(y.sum()), 1.0) / max(float(flat.sum()), 1e-300)
    for _ in range(300):
        lam = np.maximum(k * signal + b * flat, 1e-300)
        r = y / lam
        k_new = k * float((signal * r).sum()) / max(float(signal.sum()), 1e-300)
        b_new = b * float((flat * r).sum()) / max(float(flat.sum()), 1e-300)
        done = abs(k_new - k) <= 1e-10 * k and abs(b_new - b) <= 1e-10 * max(b, 1e-300)
        k, b = k_new, b_new
        if done:
            break
    return _poisson_deviance(y, k * signal + b * flat)


def _minimum(offsets: NDArray[np.float64], cost: NDArray[np.float64]) -> tuple[float, float]:
    """(offset of the minimum, curvature there) from a parabola through the lowest finite
    point and its neighbours (the lowest point and NaN curvature at an edge)."""
    ok = np.isfinite(cost)
    if ok.sum() < 3:
        return float("nan"), float("nan")
    i = int(np.nanargmin(np.where(ok, cost, np.nan)))
    if i == 0 or i == len(cost) - 1 or not (ok[i - 1] and ok[i + 1]):
        return float(offsets[i]), float("nan")
    x = offsets[i - 1 : i + 2]
    a, b, _ = np.polyfit(x, cost[i - 1 : i + 2], 2)
    if a <= 0:
        return float(offsets[i]), float("nan")
    return float(-b / (2 * a)), float(2 * a)


def latent_study(
    model: str | Path,
    test_set: str | Path,
    *,
    n_map: int = 1500,
    n_truths: int = 20,
    truth_offset: int = 0,
    seed: int = 3,
    offsets: tuple[float, ...] = OFFSETS,
    umap: bool = True,
    figures: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the study (module docstring) with ``model`` on the fresh ``test_set``;
    ``figures``: a folder for ``<material>_powder_latent_map.png`` and
    ``<material>_powder_latent_chi2.png``. JSON-ready result."""
    from tqdm import tqdm

    from simulations.fcdb.powder_dataset import PowderSpec, build_powder_forward
    from simulations.lattice.backgrounds import powder_multiphonon
    from simulations.lattice.sqe import CoherentSQE

    t0 = time.perf_counter()
    m = load_powder_model(model)
    material = str(m.meta["material"])
    test = load_powder_training_set(test_set, material)
    if int(test["seed"]) == int(m.meta["provenance"]["training_set"]["seed"]):
        raise TrainingError(f"{test_set} has the training set's seed; use a fresh test set")
    names = list(test["fc_names"])
    n_map = min(n_map, len(test["spectra"]))
    spectra = np.asarray(test["spectra"][:n_map], np.float32)
    kin = np.asarray(test["kinematic_mask"], bool)
    fc = np.asarray(test["fc"], float)
    active = active_dimensions(m, np.where(kin[None], spectra, np.nan))
    mu = latent_means(m, np.where(kin[None], spectra, np.nan))
    maps = [latent_map(mu, "pca")]
    if umap:
        try:
            maps.append(latent_map(mu, "umap", seed=seed))
        except ImportError:
            logger.info("umap-learn is not installed: the PCA map only")
    # latent chi^2 against the deviance
    spec = PowderSpec.from_dict(test["spec"])
    forward, info = build_powder_forward(spec)
    ms = info["setup"]
    res = info["resolution"]
    q = 0.5 * (info["q_edges"][1:] + info["q_edges"][:-1])
    e = 0.5 * (info["energy_edges"][1:] + info["energy_edges"][:-1])
    idx = np.arange(truth_offset, truth_offset + n_truths)
    data = measured_like(test, idx, MeasuredLikeSpec(seed=seed), progress=progress)
    mask = data["mask"]
    x_full, t_full = data["exposure"], data["flat_background"]
    counts_all = np.where(mask[None], data["spectra"], 0.0) * 1.0
    domain = np.asarray(test["domain"], float)
    width = domain[:, 1] - domain[:, 0]
    off = np.asarray(offsets, float)
    mu_data = latent_means(m, data["spectra"], np.isfinite(data["spectra"]) & mask[None])
    dev = np.full((n_truths, len(names), len(off)), np.nan)
    chi = np.full_like(dev, np.nan)
    for i in tqdm(range(n_truths), desc="latent chi^2 scans", disable=not progress):
        truth = fc[idx[i]]
        sets = np.repeat(truth[None, :], len(names) * len(off), axis=0)
        for j in range(len(names)):
            sets[j * len(off) : (j + 1) * len(off), j] += off * width[j]
        out = forward.spectra(sets)
        s1 = np.clip(out.intensity, 0.0, None)
        mu_model = latent_means(m, np.where(kin[None], s1, np.nan))
        c2 = latent_chi2(mu_data[i], mu_model)
        y = np.rint(counts_all[i][mask] * data["scale"][i] * x_full[mask])  # the counts
        for r, c in enumerate(sets):
            if not out.stable[r]:
                continue
            mod = CoherentSQE(ms.basis, c, temperature=spec.temperature, resolution=res)
            try:
                mp = powder_multiphonon(mod, q, e)[mask]
            except Exception:  # unstable on the multiphonon's mesh
                continue
            j, p = divmod(r, len(off))
            sig = (s1[r][mask] + mp) * x_full[mask]
            dev[i, j, p] = _profile_deviance(y, sig, t_full[mask])
            chi[i, j, p] = c2[r]
    rows: dict[str, Any] = {}
    for j, n in enumerate(names):
        dmin = np.array([_minimum(off, dev[i, j])[0] for i in range(n_truths)])
        curv = np.array([_minimum(off, dev[i, j])[1] for i in range(n_truths)])
        cmin = np.array([_minimum(off, chi[i, j])[0] for i in range(n_truths)])
        sigma = np.sqrt(2.0 / curv)  # Delta D = 1 at 1 sigma: D ~ (x - x0)^2 / sigma^2
        rows[n] = {
            "deviance_min_offset_pct": _summary(100 * dmin),
            "deviance_sigma_pct": _summary(100 * sigma),
            "latent_chi2_min_offset_pct": _summary(100 * cmin),
            "latent_chi2_min_at_edge": int(np.sum(np.isin(cmin, [off[0], off[-1]]))),
        }
    result = {
        "model": str(model),
        "model_version": m.version,
        "material": material,
        "fc_names": names,
        "test_set": {"path": str(test_set), "seed": int(test["seed"])},
        "active_dimensions": active,
        "maps": [{k: v for k, v in mp.items() if k != "xy"} | {"n": len(mu)} for mp in maps],
        "chi2_scan": {
            "truth_indices": [int(idx[0]), int(idx[-1]) + 1],
            "seed": seed,
            "offsets_domain_width": off.tolist(),
            "measured_like": data["spec"],
            "multiphonon_share_median": round(float(np.median(data["multiphonon_share"])), 4),
            "per_coefficient": rows,
            "example": {
                "truth_index": int(idx[0]),
                "deviance": np.round(dev[0] - np.nanmin(dev[0]), 3).tolist(),
                "latent_chi2": np.round(chi[0], 5).tolist(),
            },
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if figures is not None:
        fig_dir = Path(figures)
        fig_dir.mkdir(parents=True, exist_ok=True)
        title = (
            f"{material} powder model {m.meta['variant']}: latent means of {len(mu)} clean "
            f"test spectra ({active['active']} active dimensions of {active['latent']})"
        )
        result["figures"] = {
            "map": str(
                plot_latent_map(
                    maps,
                    fc[:n_map],
                    names,
                    fig_dir / f"{material.lower()}_powder_latent_map.png",
                    title,
                )
            ),
            "chi2": str(
                plot_chi2_scan(
                    result, dev, chi, fig_dir / f"{material.lower()}_powder_latent_chi2.png"
                )
            ),
        }
    return result


def _summary(v: NDArray[np.float64]) -> dict[str, float | int | None]:
    ok = v[np.isfinite(v)]
    if len(ok) == 0:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": round(float(ok.mean()), 3),
        "std": round(float(ok.std(ddof=1)) if len(ok) > 1 else 0.0, 3),
        "n": len(ok),
    }


def plot_chi2_scan(
    result: dict[str, Any], dev: NDArray[np.float64], chi: NDArray[np.float64], out: str | Path
) -> Path:
    """Per coefficient: Delta deviance and the latent chi^2 (scaled to the deviance's range)
    against the offset from the truth, every truth faint and the first bold. PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["fc_names"]
    off = 100 * np.asarray(result["chi2_scan"]["offsets_domain_width"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), sharey=True)
    for j, (ax, n) in enumerate(zip(np.atleast_1d(axes), names, strict=True)):
        for i in range(dev.shape[0]):
            d = dev[i, j] - np.nanmin(dev[i, j])
            c = chi[i, j] - np.nanmin(chi[i, j])
            top = max(float(np.nanmax(d)), 1e-12)
            c = c / max(float(np.nanmax(c)), 1e-12) * top
            d, c = d / top, c / top
            lw, a = (1.8, 1.0) if i == 0 else (0.6, 0.25)
            ax.plot(off, d, color="tab:blue", lw=lw, alpha=a, label="deviance" if i == 0 else None)
            ax.plot(
                off, c, color="tab:orange", lw=lw, alpha=a, label="latent chi^2" if i == 0 else None
            )
        ax.axvline(0, color="k", lw=0.6)
        r = result["chi2_scan"]["per_coefficient"][n]
        ax.set_title(
            f"{n}\nmin: dev {r['deviance_min_offset_pct']['mean']:+.1f} %, "
            f"latent {r['latent_chi2_min_offset_pct']['mean']:+.1f} %",
            fontsize=8,
        )
        ax.set_xlabel("offset from truth, % of domain")
    np.atleast_1d(axes)[0].set_ylabel("cost, scaled to 1 at the scan's maximum")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle(
        f"{result['material']} powder: Poisson deviance of the counts vs latent chi^2, "
        f"{dev.shape[0]} measured-like truths"
    )
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
