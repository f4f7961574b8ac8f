"""Background components benchmark (``make bench``): writes bench-results/backgrounds.json
and docs/figures/backgrounds_ge.png.

A simulated Ge run with every component (``steer simulate run --material Ge --fc raman
--omegas 0:40:2 --events-per-orientation 200000 --temperature 300 --backgrounds all
--seed 11 --super-pixel-rows 4 --phonon-mesh 40``, the library's defaults: incoherent
elastic line, multiphonon, an aluminium can, 10 % of the events flat in time of flight) is
folded like ``steer fold``; the prediction endpoint's expected fold of the same angles gives
the one-phonon signal and each component per bin (coverage x S).
One number is fitted, the counts per unit of expected signal (the flux; Poisson maximum
likelihood: total counts over total expectation). Reported: the share of each component
in the counts, Pearson chi^2 per bin over the bins with more than 20 and 100 expected
counts (1 if the components' sum is the whole story), and the same without the components
(what a one-phonon model alone would make of these data). The figure: one q column with
the data, each component and the sum.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from consumers.offline import fold_recorded_run
from model_server.prediction.predict import predict
from simulations.lattice.backgrounds import Backgrounds
from simulations.runs.simulate import RunPlan, simulate_run

RESULTS = Path(os.environ.get("BENCH_DIR", "bench-results"))
FIGURE = Path("docs/figures/backgrounds_ge.png")
OMEGAS = tuple(float(w) for w in np.arange(0.0, 40.0, 2.0))
TEMPERATURE = 300.0
SEED = 11


def _chi2(counts: np.ndarray, lam: np.ndarray, floor: float) -> dict[str, float]:
    sel = lam > floor
    r2 = (counts[sel] - lam[sel]) ** 2 / lam[sel]
    return {
        "bins": int(sel.sum()),
        "chi2_per_bin": float(r2.mean()),
        "chi2_per_bin_median": float(np.median(r2)),
    }


def bench_backgrounds() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "ge.steer"
        t = time.perf_counter()
        plan = RunPlan(
            material="Ge",
            fc="raman",
            omegas=OMEGAS,
            events_per_orientation=2e5,
            temperature=TEMPERATURE,
            backgrounds=Backgrounds(can=True),
            seed=SEED,
        )
        summary = simulate_run(plan, run, progress=False)
        t_sim = time.perf_counter() - t
        t = time.perf_counter()
        _, acc = fold_recorded_run(run, progress=False)
        t_fold = time.perf_counter() - t
    t = time.perf_counter()
    pred = predict(
        "Ge",
        fc="raman",
        ei=80.0,
        temperature=TEMPERATURE,
        omegas=OMEGAS,
        outputs=("iqe",),
        backgrounds=("elastic", "multiphonon", "tof_background", "can"),
    )
    t_pred = time.perf_counter() - t
    iqe = pred.iqe
    assert iqe is not None
    cov = iqe.coverage
    parts = {"one_phonon": iqe.signal}
    for name, inten in iqe.components.items():
        parts[name] = np.nan_to_num(inten) * cov
    counts = acc.counts
    measured = (acc.exposure > 0) & (cov > 0)
    total = sum(parts.values())
    flux = counts[measured].sum() / total[measured].sum()
    lam = flux * total
    share = {k: float(v[measured].sum() / total[measured].sum()) for k, v in parts.items()}
    flux_1ph = counts[measured].sum() / parts["one_phonon"][measured].sum()
    lam_1ph = flux_1ph * parts["one_phonon"]
    out = {
        "run": {
            "material": "Ge",
            "fc": "raman",
            "omegas_deg": [OMEGAS[0], OMEGAS[-1], len(OMEGAS)],
            "events": summary.events,
            "temperature_K": TEMPERATURE,
            "components": ["elastic", "multiphonon", "can", "tof_background 10 %"],
            "seed": SEED,
        },
        "counts_in_measured_bins": float(counts[measured].sum()),
        "share_of_expected_counts": share,
        "with_components": {
            "above_20": _chi2(counts[measured], lam[measured], 20.0),
            "above_100": _chi2(counts[measured], lam[measured], 100.0),
        },
        "one_phonon_only": {
            "above_20": _chi2(counts[measured], lam_1ph[measured], 20.0),
            "above_100": _chi2(counts[measured], lam_1ph[measured], 100.0),
        },
        "seconds": {"simulate": t_sim, "fold": t_fold, "predict": t_pred},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "backgrounds.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    _figure(pred, counts, parts, flux, measured)


def _figure(pred, counts, parts, flux, measured) -> None:  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = pred.energies
    # the q column with the most counts away from the zone centre's first bins
    col_counts = np.where(measured, counts, 0.0).sum(axis=1)
    qred = pred.qpoints - np.rint(pred.qpoints)
    away = np.linalg.norm(qred, axis=1) > 0.25
    iq = int(np.argmax(np.where(away, col_counts, -1.0)))
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7.5, 7), sharex=True, height_ratios=[3, 1])
    m = measured[iq]
    ax.errorbar(
        e[m], counts[iq, m], yerr=np.sqrt(np.maximum(counts[iq, m], 1)), fmt="k.", ms=3,
        lw=0.6, label="data (folded counts)",
    )  # fmt: skip
    total = np.zeros_like(e)
    colours = {
        "one_phonon": "C0",
        "elastic": "C1",
        "multiphonon": "C2",
        "tof_background": "C3",
        "can": "C4",
    }
    for name, arr in parts.items():
        y = flux * arr[iq]
        total = total + y
        ax.plot(e[m], y[m], color=colours.get(name, "C5"), lw=1.2, label=name.replace("_", " "))
    ax.plot(e[m], total[m], color="C7", lw=1.8, label="sum")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylabel("counts per bin")
    q = pred.qpoints[iq]
    ax.set_title(
        f"Ge (raman FCs), 300 K, {len(OMEGAS)} orientations: q = "
        f"({q[0]:.3f}, {q[1]:.3f}, {q[2]:.3f}) r.l.u."
    )
    ax.legend(fontsize=8, ncol=2)
    resid = (counts[iq] - total) / np.sqrt(np.maximum(total, 1e-9))
    ax2.plot(e[m], resid[m], "k.", ms=3)
    ax2.axhline(0.0, color="C7", lw=0.8)
    ax2.set_ylabel("(data - sum) / sqrt(sum)")
    ax2.set_xlabel("energy transfer (meV)")
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=90)
    plt.close(fig)
