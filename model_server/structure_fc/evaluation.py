"""Evaluation of the structure -> force-constant model against the FC database's force
constants.

**Evaluation** (:func:`evaluate`): for every entry of a split, the DOS from the predicted
force constants against the DOS from the database's, both from
:func:`simulations.lattice.pair_phonons.mesh_frequencies` on a 10x10x10 Gamma-centred mesh, the
same energy points (every 0.1 meV from -20 meV to 1.2 x the highest frequency of either plus
5 meV) and the same Gaussian broadening (sigma 1 meV): cosine similarity, the mean
frequency over all modes of the mesh (imaginary ones negative), and whether the predicted
set is dynamically stable (lowest frequency on the mesh >= -:data:`STABILITY_TOL_THZ`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from model_server.structure_fc.dataset import MIN_FC, FCSampleLike
from model_server.structure_fc.graph import FCModelError
from model_server.structure_fc.model import FCModel
from simulations.lattice.pair_phonons import dos_histogram, mesh_frequencies
from simulations.units import THZ_TO_MEV

__all__ = ["STABILITY_TOL_THZ", "dos_metrics", "evaluate", "store_evaluation"]

#: A predicted FC set is "dynamically stable" when no frequency on the evaluation mesh is
#: below -STABILITY_TOL_THZ (THz): numerical noise of the acoustic branches near Gamma.
STABILITY_TOL_THZ = 0.05
#: DOS comparison: Gaussian sigma (meV), energy step (meV), lowest energy (meV), mesh.
DOS_SIGMA_MEV = 1.0
DOS_STEP_MEV = 0.1
DOS_EMIN_MEV = -20.0
EVAL_MESH = (10, 10, 10)


def dos_metrics(
    numbers: NDArray[np.int64],
    frac: NDArray[np.float64],
    pairs_ref: NDArray[np.int64],
    fc_ref: NDArray[np.float64],
    pairs_pred: NDArray[np.int64],
    fc_pred: NDArray[np.float64],
    mesh: tuple[int, int, int] = EVAL_MESH,
) -> dict[str, float]:
    """DOS comparison of two force-constant sets of one crystal (see the module docstring).

    Returns
    -------
    ``cosine`` (DOS cosine similarity), ``mean_ref_meV``, ``mean_pred_meV`` (mean frequency
    over all modes of the mesh), ``min_pred_thz``, ``min_ref_thz`` (lowest frequency),
    ``stable_pred`` (1.0 or 0.0).
    """
    ref = mesh_frequencies(numbers, frac, pairs_ref, fc_ref, mesh).frequencies * THZ_TO_MEV
    pred = mesh_frequencies(numbers, frac, pairs_pred, fc_pred, mesh).frequencies * THZ_TO_MEV
    top = 1.2 * max(float(np.abs(ref).max()), float(np.abs(pred).max())) + 5.0
    energies = np.arange(DOS_EMIN_MEV, top, DOS_STEP_MEV)
    g_ref = dos_histogram(ref, energies, DOS_SIGMA_MEV)
    g_pred = dos_histogram(pred, energies, DOS_SIGMA_MEV)
    cosine = float(g_ref @ g_pred / (np.linalg.norm(g_ref) * np.linalg.norm(g_pred)))
    return {
        "cosine": cosine,
        "mean_ref_meV": float(ref.mean()),
        "mean_pred_meV": float(pred.mean()),
        "min_ref_thz": float(ref.min() / THZ_TO_MEV),
        "min_pred_thz": float(pred.min() / THZ_TO_MEV),
        "stable_pred": float(pred.min() / THZ_TO_MEV >= -STABILITY_TOL_THZ),
    }


def evaluate(
    model: FCModel, entries: Sequence[FCSampleLike], split: str = "test"
) -> dict[str, Any]:
    """DOS metrics of the model on one split of the database.

    Returns
    -------
    A JSON-ready report: per-crystal rows and the summary (mean cosine similarity, mean
    absolute and relative error of the mean frequency, fraction predicted stable, how many
    were in domain and the same figures for those, entries skipped for unknown elements).
    """
    rows = []
    skipped = []
    t0 = time.perf_counter()
    for e in entries:
        if e.split != split:
            continue
        if float(np.abs(e.fc).max()) < MIN_FC:
            skipped.append(
                {"name": e.name, "reason": "the database's force constants are all zero"}
            )
            continue
        try:
            pred = model.predict(e.numbers, e.lattice, e.frac)
        except FCModelError as err:
            skipped.append({"name": e.name, "reason": str(err).split(":")[0]})
            continue
        m = dos_metrics(e.numbers, e.frac, e.pairs, e.fc, pred.pairs, pred.fc)
        rows.append(
            {
                "name": e.name,
                "prototype": e.prototype,
                **{k: round(v, 5) for k, v in m.items()},
                "distance": round(pred.distance, 4),
                "relative_spread": round(pred.relative_spread, 5),
                "in_domain": pred.in_domain,
            }
        )
    return {
        "split": split,
        "dos": {
            "mesh": list(EVAL_MESH),
            "sigma_meV": DOS_SIGMA_MEV,
            "step_meV": DOS_STEP_MEV,
            "energies": f"{DOS_EMIN_MEV} meV to 1.2 x max |frequency| of both + 5 meV",
            "stability_tolerance_thz": STABILITY_TOL_THZ,
        },
        "summary": _summary(rows),
        "summary_in_domain": _summary([r for r in rows if r["in_domain"]]),
        "summary_out_of_domain": _summary([r for r in rows if not r["in_domain"]]),
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }


def _summary(sel: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary figures of some rows of :func:`evaluate` (``{"n": 0}`` for none)."""
    if not sel:
        return {"n": 0}
    ref = np.array([r["mean_ref_meV"] for r in sel])
    pred = np.array([r["mean_pred_meV"] for r in sel])
    return {
        "n": len(sel),
        "dos_cosine_mean": round(float(np.mean([r["cosine"] for r in sel])), 4),
        "dos_cosine_median": round(float(np.median([r["cosine"] for r in sel])), 4),
        "dos_cosine_min": round(float(np.min([r["cosine"] for r in sel])), 4),
        "mean_freq_abs_error_meV": round(float(np.mean(np.abs(pred - ref))), 3),
        "mean_freq_rel_error": round(float(np.mean(np.abs(pred - ref) / np.abs(ref))), 4),
        "fraction_stable": round(float(np.mean([r["stable_pred"] for r in sel])), 4),
    }


def store_evaluation(out: str | Path, report: dict[str, Any]) -> None:
    """Add the evaluation summary to model.json (the weights, hence the version, unchanged)
    and write the whole report, rows included, to evaluation.json beside it."""
    out = Path(out)
    meta_path = out / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["evaluation"] = {k: v for k, v in report.items() if k != "rows"}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    (out / "evaluation.json").write_text(json.dumps(report, indent=1) + "\n")
