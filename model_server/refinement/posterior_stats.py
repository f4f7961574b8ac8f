"""The statistics of the refinement's calibration study (:mod:`~model_server.refinement.study`):
per level, over the levels, the targets they are judged against, and the study's figure.

Every fit of the study is a :class:`FitRecord`. Per level (orientation count and count
scale) over the converged fits: the coverage of mean +- 1 and 2 std (over the first
:data:`TARGET_COEFFICIENTS` coefficients, FC0-FC3, and over all), RMSE / sqrt(mean CRB),
the mean z (bias / std), the mean std, the RMSE and sqrt(mean CRB) per coefficient; the
VAE's RMSE and mean std beside them. Over the levels: the least-squares slope of
log(mean std) against log(mean counts), the chi^2 of the histogram of Phi(z)
(:data:`SBC_BINS` bins) against a uniform one per coefficient (simulation-based
calibration; its 95 % point for 9 degrees of freedom is 16.9), and the mean std of the
whole run over that of one orientation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.special import ndtr

__all__ = [
    "SBC_BINS",
    "TARGETS",
    "TARGET_COEFFICIENTS",
    "FitRecord",
    "finite_or_none",
    "level_summary",
    "merge_results",
    "over_levels",
    "plot_study",
    "sbc_chi2",
    "std_count_slopes",
    "std_ratio",
    "targets",
]

#: Coefficients the targets are stated for (FC0-FC3: the first four of the basis).
TARGET_COEFFICIENTS = 4

#: Bins of the simulation-based-calibration histogram of Phi(z).
SBC_BINS = 10

#: The targets of the study (FC0-FC3): RMSE / CRB at most, |bias| / std below, the 1 and
#: 2 sigma coverage ranges, the std-counts slope range, std(whole run) / std(1 orientation)
#: of FC0 at most.
TARGETS: dict[str, Any] = {
    "rmse_over_crb_max": 1.5,
    "abs_bias_over_std_max": 0.3,
    "coverage_1sigma_range": (0.60, 0.76),
    "coverage_2sigma_range": (0.90, 0.98),
    "std_count_slope": (-0.6, -0.4),
    "std_ratio_whole_run_over_1": 0.15,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class FitRecord:
    """One fit of the study.

    Attributes
    ----------
    truth
        Name of the true FC set.
    orientations, count_scale
        The level.
    converged
        Whether the refinement converged (the statistics use only these).
    error, std, crb
        (n_coeff,) refined mean - truth, refined std (eV/A^2) and the Cramer-Rao bound
        ((eV/A^2)^2); NaN when the fit failed.
    counts
        Total counts in the fitted bins.
    vae_error, vae_std
        The VAE's mean - truth and std by name (its coefficients only).
    deviance_per_dof, iterations, seconds
        Of the refinement (``seconds``: the refinement's own time).
    wall_seconds
        The whole fit: replica, VAE, refinement and Cramer-Rao bound.
    start
        Which start the optimum came from (:attr:`Refined.start`); empty when it failed.
    reason
        Why it failed or did not converge; empty otherwise.
    """

    truth: str
    orientations: int
    count_scale: float
    converged: bool
    error: NDArray[np.float64]
    std: NDArray[np.float64]
    crb: NDArray[np.float64]
    counts: float
    vae_error: dict[str, float] = field(default_factory=dict)
    vae_std: dict[str, float] = field(default_factory=dict)
    deviance_per_dof: float = math.nan
    iterations: int = 0
    seconds: float = 0.0
    wall_seconds: float = 0.0
    start: str = ""
    reason: str = ""

    @property
    def z(self) -> NDArray[np.float64]:
        """(n_coeff,) (refined mean - truth) / std."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.asarray(self.error / np.where(self.std > 0, self.std, np.nan))

    def to_dict(self, names: Sequence[str]) -> dict[str, Any]:
        """This fit as JSON-ready values (``steer evaluate-posterior --records``): the
        level, the outcome, and ``z``, ``error``, ``std`` and ``crb_std`` by coefficient
        name (eV/A^2; None where the fit failed)."""

        def named(values: NDArray[np.float64]) -> dict[str, float | None]:
            return {
                n: (float(v) if math.isfinite(v) else None)
                for n, v in zip(names, np.asarray(values, dtype=float), strict=True)
            }

        dev = float(self.deviance_per_dof)
        return {
            "truth": self.truth,
            "orientations": int(self.orientations),
            "count_scale": float(self.count_scale),
            "converged": bool(self.converged),
            "reason": self.reason,
            "counts": float(self.counts),
            "deviance_per_dof": dev if math.isfinite(dev) else None,
            "iterations": int(self.iterations),
            "seconds": float(self.seconds),
            "start": self.start,
            "z": named(self.z),
            "error": named(self.error),
            "std": named(self.std),
            "crb_std": named(np.sqrt(np.maximum(self.crb, 0.0))),
        }


def _by_name(names: Sequence[str], values: NDArray[np.float64]) -> dict[str, float]:
    return {n: float(v) for n, v in zip(names, values, strict=True)}


def _vae_stat(fits: Sequence[FitRecord], names: Sequence[str]) -> dict[str, Any]:
    """The VAE's RMSE and mean std by name over every fit that had a start."""
    rmse, std = {}, {}
    for n in names:
        err = [f.vae_error[n] for f in fits if n in f.vae_error]
        if err:
            rmse[n] = float(np.sqrt(np.mean(np.square(err))))
        sd = [f.vae_std[n] for f in fits if n in f.vae_std]
        if sd:
            std[n] = float(np.mean(sd))
    return {"vae_rmse": rmse, "vae_mean_std": std}


def level_summary(
    fits: Sequence[FitRecord], names: Sequence[str], *, events: float
) -> dict[str, Any]:
    """The statistics of one level's fits (all of the same orientations and count scale;
    the converged ones, the others counted). ``events``: the nominal events of the level
    over the whole detector. NaN where no fit converged."""
    ok = [f for f in fits if f.converged]
    out: dict[str, Any] = {
        "orientations": fits[0].orientations if fits else 0,
        "count_scale": fits[0].count_scale if fits else math.nan,
        "n_fits": len(fits),
        "n_converged": len(ok),
        "converged_fraction": len(ok) / max(len(fits), 1),
        "events": float(events),
        "mean_total_counts": float(np.mean([f.counts for f in fits])) if fits else math.nan,
        "failures": sorted({f.reason for f in fits if f.reason})[:5],
    }
    n_coeff = len(names)
    err = np.array([f.error for f in ok]).reshape(-1, n_coeff)
    std = np.array([f.std for f in ok]).reshape(-1, n_coeff)
    crb = np.array([f.crb for f in ok]).reshape(-1, n_coeff)
    z = np.array([f.z for f in ok]).reshape(-1, n_coeff)
    t = TARGET_COEFFICIENTS
    with np.errstate(invalid="ignore", divide="ignore"):
        out |= {
            "coverage_1sigma": _share(np.abs(z[:, :t]) < 1.0),
            "coverage_2sigma": _share(np.abs(z[:, :t]) < 2.0),
            "coverage_1sigma_all": _share(np.abs(z) < 1.0),
            "coverage_2sigma_all": _share(np.abs(z) < 2.0),
            "rmse_over_crb": _by_name(names, np.sqrt(_col_mean(err**2) / _col_mean(crb))),
            "bias_over_std": _by_name(names, _col_mean(z)),
            "mean_std": _by_name(names, _col_mean(std)),
            "rmse": _by_name(names, np.sqrt(_col_mean(err**2))),
            "crb_std": _by_name(names, np.sqrt(_col_mean(crb))),
            "mean_deviance_per_dof": _mean([f.deviance_per_dof for f in ok]),
            "mean_iterations": _mean([f.iterations for f in ok]),
            "mean_seconds": _mean([f.seconds for f in ok]),
            "mean_wall_seconds": _mean([f.wall_seconds for f in fits]),
        }
    return out | _vae_stat(fits, names)


def _share(hits: NDArray[np.bool_]) -> float:
    """The share of True (NaN when empty)."""
    return float(np.mean(hits)) if hits.size else math.nan


def _col_mean(a: NDArray[np.float64]) -> NDArray[np.float64]:
    """(n,) the mean over the rows of (m, n) (NaN when m is 0)."""
    return np.asarray(a.mean(axis=0)) if len(a) else np.full(a.shape[1], np.nan)


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def std_count_slopes(levels: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, float]:
    """Per name: the least-squares slope of log(mean std) against log(mean total counts)
    over the levels (NaN with fewer than two distinct count levels)."""
    out = {}
    for n in names:
        pts = [
            (math.log(lv["mean_total_counts"]), math.log(lv["mean_std"][n]))
            for lv in levels
            if lv["mean_total_counts"] > 0
            and math.isfinite(lv["mean_std"][n])
            and lv["mean_std"][n] > 0
        ]
        if len({x for x, _ in pts}) < 2:
            out[n] = math.nan
            continue
        x, y = np.array(pts).T
        out[n] = float(np.polyfit(x, y, 1)[0])
    return out


def sbc_chi2(
    fits: Sequence[FitRecord], names: Sequence[str]
) -> tuple[dict[str, float], dict[str, float]]:
    """Per name: the chi^2 of the histogram of Phi(z) (:data:`SBC_BINS` bins) against a
    uniform one over every converged fit, and its p-value (chi^2 with SBC_BINS - 1
    degrees of freedom)."""
    from scipy.stats import chi2

    z = np.array([f.z for f in fits if f.converged]).reshape(-1, len(names))
    if len(z) == 0:
        return dict.fromkeys(names, math.nan), dict.fromkeys(names, math.nan)
    u = ndtr(z)
    expected = len(z) / SBC_BINS
    stat, pval = {}, {}
    for j, n in enumerate(names):
        hist, _ = np.histogram(u[:, j], bins=SBC_BINS, range=(0.0, 1.0))
        x2 = float(np.sum((hist - expected) ** 2 / expected))
        stat[n], pval[n] = x2, float(chi2.sf(x2, SBC_BINS - 1))
    return stat, pval


def std_ratio(levels: Sequence[dict[str, Any]], name: str, whole: int) -> dict[str, float]:
    """Per count scale (``"%g"`` keys): the mean std of ``name`` with ``whole``
    orientations over that with one; empty when the levels lack either."""
    by = {(lv["orientations"], lv["count_scale"]): lv for lv in levels}
    out = {}
    for (k, c), lv in by.items():
        if k == whole and (1, c) in by:
            out[f"{c:g}"] = lv["mean_std"][name] / by[(1, c)]["mean_std"][name]
    return out


def targets(result: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The study's :data:`TARGETS` over FC0-FC3, each with the value it was judged on, its
    limit and ``pass`` (False for a value that could not be computed), and ``all_pass``."""
    fc = list(names[:TARGET_COEFFICIENTS])
    levels = result["levels"]

    def worst(key: str, fn: Any) -> float:
        vals = [fn(lv[key][n]) for lv in levels for n in fc]
        return max(vals) if vals and all(math.isfinite(v) for v in vals) else math.nan

    def span(key: str) -> list[float]:
        vals = [lv[key] for lv in levels]
        if not vals or not all(math.isfinite(v) for v in vals):
            return [math.nan, math.nan]
        return [min(vals), max(vals)]

    def inside(values: Sequence[float], lo: float, hi: float) -> bool:
        return bool(values) and all(lo <= v <= hi for v in values)

    rmse = worst("rmse_over_crb", lambda x: x)
    bias = worst("bias_over_std", abs)
    cov1, cov2 = span("coverage_1sigma"), span("coverage_2sigma")
    slopes = [result["std_count_slope"][n] for n in fc]
    t = TARGETS
    out: dict[str, Any] = {
        "coefficients": fc,
        "rmse_over_crb_max": {
            "value": rmse,
            "limit": t["rmse_over_crb_max"],
            "pass": bool(rmse <= t["rmse_over_crb_max"]),
        },
        "abs_bias_over_std_max": {
            "value": bias,
            "limit": t["abs_bias_over_std_max"],
            "pass": bool(bias < t["abs_bias_over_std_max"]),
        },
        "coverage_1sigma_range": {
            "value": cov1,
            "limit": list(t["coverage_1sigma_range"]),
            "pass": inside(cov1, *t["coverage_1sigma_range"]),
        },
        "coverage_2sigma_range": {
            "value": cov2,
            "limit": list(t["coverage_2sigma_range"]),
            "pass": inside(cov2, *t["coverage_2sigma_range"]),
        },
        "std_count_slope": {
            "value": slopes,
            "limit": list(t["std_count_slope"]),
            "pass": inside(slopes, *t["std_count_slope"]),
        },
    }
    ratio = result.get("std_ratio_120_over_1")
    if ratio:
        limit = t["std_ratio_whole_run_over_1"]
        out["std_ratio_120_over_1"] = {
            "value": ratio,
            "limit": limit,
            "pass": all(v <= limit for v in ratio.values()),
        }
    out["all_pass"] = all(v["pass"] for v in out.values() if isinstance(v, dict))
    return out


def over_levels(
    levels: Sequence[dict[str, Any]], names: Sequence[str], whole: int
) -> dict[str, Any]:
    """The statistics over a study's levels: ``std_count_slope`` by name and, when the
    levels have one orientation and ``whole`` orientations at a count scale,
    ``std_ratio_120_over_1`` (FC0's, per count scale)."""
    out: dict[str, Any] = {"std_count_slope": std_count_slopes(levels, names)}
    ratio = std_ratio(levels, names[0], whole)
    if ratio:
        out["std_ratio_120_over_1"] = ratio
    return out


#: Settings that runs of one study share (the levels differ).
_SHARED = ("material", "n_truths", "seed", "angles_deg", "events_per_orientation")


def merge_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One study of several runs of the same study at other levels (``steer
    evaluate-posterior --merge``): the levels of all, sorted, and the statistics over
    the levels made again (``std_count_slope``, ``std_ratio_120_over_1``, ``targets``).
    The simulation-based calibration needs the fits, which the results do not keep: each
    run's is under ``parts``, with its levels and command.

    Raises
    ------
    ValueError
        Fewer than two results, runs of different studies (material, truths, seed,
        angles, counts), different coefficients or truths, or a level in two runs.
    """
    if len(results) < 2:
        raise ValueError("give two or more study results to merge")
    first = results[0]
    names = list(first["names"])
    for r in results[1:]:
        for key in _SHARED:
            if r["settings"].get(key) != first["settings"].get(key):
                raise ValueError(
                    f"not one study: {key} is {r['settings'].get(key)!r} in one run and "
                    f"{first['settings'].get(key)!r} in another"
                )
        binnings = [x["settings"].get("binning", "path") for x in (first, r)]
        if binnings[0] != binnings[1]:  # results older than the wedge binning are the path's
            raise ValueError(
                f"not one study: the binning is {binnings[1]!r} in one run and "
                f"{binnings[0]!r} in another"
            )
        if list(r["names"]) != names or list(r["truths"]) != list(first["truths"]):
            raise ValueError("not one study: the coefficients or the truths differ")
    levels: dict[tuple[int, float], dict[str, Any]] = {}
    for r in results:
        for lv in r["levels"]:
            at = (int(lv["orientations"]), float(lv["count_scale"]))
            if at in levels:
                raise ValueError(f"level {at[0]} orientations x {at[1]:g} is in two runs")
            levels[at] = lv
    merged = [levels[k] for k in sorted(levels)]
    n_fits = sum(int(r["n_fits"]) for r in results)
    angles = first["settings"]["angles_deg"]  # (first, last, count) of the whole run
    out: dict[str, Any] = {
        "levels": merged,
        **over_levels(merged, names, int(angles[2])),
        "n_fits": n_fits,
        "converged_fraction": sum(r["converged_fraction"] * r["n_fits"] for r in results)
        / max(n_fits, 1),
        "truths": list(first["truths"]),
        "names": names,
        "settings": {k: first["settings"].get(k) for k in _SHARED}
        | {
            "orientations": sorted({k for k, _ in levels}),
            "count_scales": sorted({c for _, c in levels}),
            "binning": first["settings"].get("binning", "path"),
        },
        "parts": [
            {
                "levels": [[lv["orientations"], lv["count_scale"]] for lv in r["levels"]],
                "sbc_p_value": r.get("sbc_p_value"),
                "n_fits": r["n_fits"],
                "seconds": r.get("seconds"),
                "model_version": r.get("model_version"),
                "command": r.get("command"),
            }
            for r in results
        ],
    }
    out["targets"] = targets(out, names)
    return dict(finite_or_none(out))


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN: nothing to compute) replaced by None, in
    nested dicts and lists, so that the JSON is strict."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, float | np.floating) and not math.isfinite(float(obj)):
        return None
    return obj


def plot_study(result: dict[str, Any], path: str | Path) -> Path:
    """A PNG of the std and the RMS error against the counts for FC0-FC3, the VAE's and
    the refinement's, with the Cramer-Rao bound (:func:`level_summary`'s keys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    names = result["names"][:TARGET_COEFFICIENTS]
    levels = sorted(result["levels"], key=lambda lv: lv["mean_total_counts"] or 0.0)
    x = np.array([lv["mean_total_counts"] or np.nan for lv in levels], dtype=float)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.6), squeeze=False)
    for ax, n in zip(axes[0], names, strict=True):

        def col(key: str, name: str = n) -> NDArray[np.float64]:
            vals = [(lv.get(key) or {}).get(name) for lv in levels]
            return np.array([np.nan if v is None else v for v in vals], dtype=float)

        ax.loglog(x, col("crb_std"), "k-", lw=1.5, label="Cramer-Rao")
        ax.loglog(x, col("mean_std"), "o-", color="C0", ms=4, label="refined std")
        ax.loglog(x, col("rmse"), "x", color="C0", ms=6, label="refined RMS error")
        if np.isfinite(col("vae_mean_std")).any():
            ax.loglog(x, col("vae_mean_std"), "s--", color="C1", ms=4, label="VAE std")
        if np.isfinite(col("vae_rmse")).any():
            ax.loglog(x, col("vae_rmse"), "+", color="C1", ms=7, label="VAE RMS error")
        ax.set_xlabel("counts in the fitted bins")
        ax.set_title(n, fontsize=10)
    axes[0, 0].set_ylabel("eV/A^2")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
