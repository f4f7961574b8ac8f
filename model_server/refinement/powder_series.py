"""A temperature series of simulated Al powder runs, as the powder-VAE paper measured one
(ARCS, Ei = 50 meV, 50-640 K), with the force constants estimated at each temperature.

The truth softens with temperature by a trend chosen here and stated in every result
(:func:`softened`): each of the 5 coefficients to the 2nd neighbour scales as
``1 - SOFTENING (T - 50 K)`` from the reference set at 50 K (the 3rd and 4th neighbours
0, so that the truth is in the fitted family), 14.75 % softer at 640 K, which lowers the
phonon energies by ~7.7 %: the size of the softening measured in Al over that range
(Kresch et al., Phys. Rev. B 77, 024301 (2008), the paper's reference 11).

At each temperature a run is simulated (default background components and a flat
background), folded, and its force constants estimated: by a powder model when one is
given (``estimate``: a folded run's file -> the model's estimate dict with ``fc``, e.g.
:meth:`model_server.inversion.powder.inference.PowderEstimator.estimate_file` followed by
``to_dict``; passed in, since the refinement does not import the learned inversion), and
by the likelihood refinement (:class:`~model_server.refinement.powder.PowderRefiner`)
started from that estimate or, without a model, from the 50 K reference set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from model_server.refinement.powder import PowderRefiner, powder_run_from_file

__all__ = [
    "PAPER_TEMPERATURES",
    "SOFTENING",
    "plot_series",
    "series_plan",
    "softened",
    "temperature_series",
]

logger = logging.getLogger(__name__)

#: The temperatures of the powder-VAE paper's Al series, K.
PAPER_TEMPERATURES = (50.0, 150.0, 280.0, 350.0, 450.0, 540.0, 640.0)
#: Relative softening of every force constant per kelvin above 50 K (the stated truth).
SOFTENING = 2.5e-4
#: The 5 coefficients of the powder model.
NAMES = ("1NN_xx", "1NN_zz", "1NN_xy", "2NN_xx", "2NN_yy")


def softened(temperature: float) -> dict[str, float]:
    """The true coefficients (eV/A^2) at ``temperature`` (K), as a full mapping of the
    shipped Al basis (farther shells 0)."""
    from simulations.fcdb.reference import load_reference

    ref = load_reference("Al")
    factor = 1.0 - SOFTENING * (float(temperature) - 50.0)
    return {
        n: (float(v) * factor if n in NAMES else 0.0)
        for n, v in zip(ref.names, ref.mean, strict=True)
    }


def series_plan(
    temperature: float, index: int, steps: int, events_per_step: float, seed: int
) -> Any:
    """The :class:`~simulations.runs.simulate.RunPlan` of the series' run at
    ``temperature`` (K), the ``index``-th of the series: the softened truth, ``steps``
    counting steps of 60 s with ``events_per_step`` events, seed ``seed + index``, run id
    ``al-powder-<T>K``."""
    from simulations.runs.simulate import RunPlan

    return RunPlan(
        material="Al",
        fc=softened(temperature),
        powder=True,
        omegas=(0.0,) * steps,
        ei=50.0,
        temperature=float(temperature),
        events_per_orientation=events_per_step,
        count_time=60.0,
        mesh=16,
        seed=seed + index,
        run_id=f"al-powder-{round(temperature)}K",
    )


def temperature_series(
    out_dir: str | Path,
    *,
    temperatures: Sequence[float] = PAPER_TEMPERATURES,
    steps: int = 10,
    events_per_step: float = 2e5,
    seed: int = 500,
    estimate: Callable[[Path], dict[str, Any]] | None = None,
    model: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Simulate, fold and estimate the series; the runs (``.steer``) and folds (``.h5``)
    stay in ``out_dir``. JSON-ready result: per temperature the truth, the refined mean and
    std (and the model's, with ``estimate``; ``model`` names it in the result) of each
    coefficient, the Pearson chi^2 per dof and the seconds of each stage."""
    from consumers.offline import fold_recorded_run
    from simulations.runs.simulate import simulate_run

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    start_ref = np.array([softened(50.0)[n] for n in NAMES])
    for i, t in enumerate(tqdm(temperatures, desc="temperatures", disable=not progress)):
        truth = softened(t)
        run = out / f"al_powder_{round(t)}K.steer"
        h5 = run.with_suffix(".h5")
        t0 = time.perf_counter()
        simulate_run(series_plan(t, i, steps, events_per_step, seed), run, progress=False)
        t_sim = time.perf_counter() - t0
        fold_recorded_run(run, h5, progress=False)
        row: dict[str, Any] = {
            "temperature_K": float(t),
            "truth": {n: truth[n] for n in NAMES},
        }
        start = start_ref
        if estimate is not None:
            est = estimate(h5)
            row["model"] = {
                n: {"mean": est["fc"][n]["mean"], "std": est["fc"][n]["std"]} for n in NAMES
            }
            start = np.array([est["fc"][n]["mean"] for n in NAMES])
        refined = PowderRefiner(powder_run_from_file(h5)).refine(start)
        row["refined"] = {
            n: {"mean": float(m), "std": float(s)}
            for n, m, s in zip(refined.names, refined.mean, refined.std, strict=True)
        }
        row["pearson_chi2_per_dof"] = refined.pearson_chi2_per_dof
        row["seconds"] = {
            "simulate": round(t_sim, 1),
            "refine": round(refined.seconds, 1),
        }
        rows.append(row)
    return {
        "series": "al_powder_temperature",
        "softening_per_K": SOFTENING,
        "truth_rule": "each 2nd-neighbour coefficient x (1 - softening (T - 50 K)); "
        "3rd and 4th neighbours 0",
        "steps": steps,
        "events_per_step": events_per_step,
        "seed": seed,
        "model": None if model is None else str(model),
        "rows": rows,
    }


def plot_series(result: dict[str, Any], out: str | Path) -> Path:
    """FCs against temperature (one panel per coefficient): the truth's line, the refined
    estimate with 1-sigma error bars (and the model's, when the series has one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    temps = np.array([r["temperature_K"] for r in rows])
    fig, axes = plt.subplots(1, len(NAMES), figsize=(3.2 * len(NAMES), 3.4))
    for ax, name in zip(axes, NAMES, strict=True):
        truth = [r["truth"][name] for r in rows]
        ax.plot(temps, truth, "k-", lw=1, label="truth")
        if all("model" in r for r in rows):
            ax.errorbar(
                temps - 6,
                [r["model"][name]["mean"] for r in rows],
                yerr=[r["model"][name]["std"] for r in rows],
                fmt="s",
                ms=3,
                capsize=2,
                color="tab:orange",
                label="VAE",
            )
        ax.errorbar(
            temps + 6,
            [r["refined"][name]["mean"] for r in rows],
            yerr=[r["refined"][name]["std"] for r in rows],
            fmt="o",
            ms=3,
            capsize=2,
            color="tab:blue",
            label="refined",
        )
        ax.set_title(name)
        ax.set_xlabel("T (K)")
    axes[0].set_ylabel("force constant (eV/Å²)")
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"Al powder, Ei 50 meV: {result['steps']} steps of {result['events_per_step']:.0e} "
        "events at each temperature"
    )
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
