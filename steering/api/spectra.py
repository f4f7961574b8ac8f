"""A run's spectrum as the API answers it: JSON arrays, a PNG, or read back from its export.

Helpers of ``GET /runs/{id}/spectrum`` and ``GET /runs/{id}/figures/{name}.png``
(:mod:`steering.api.runs`). Intensities are 1/(uC sr meV) on the run's (n_q, n_E) grid;
unmeasured bins are NaN in a :class:`consumers.reduction.accumulate.Snapshot` and ``null``
in JSON.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from consumers.reduction.accumulate import Snapshot

__all__ = ["finite_list", "snapshot_from_export", "spectrum_json", "spectrum_png"]


def finite_list(a: np.ndarray) -> list[Any]:
    """JSON-safe nested list: NaN/inf as None."""
    out: list[Any] = np.where(np.isfinite(a), a, np.nan).astype(object).tolist()

    def clean(x: Any) -> Any:
        if isinstance(x, list):
            return [clean(v) for v in x]
        return None if isinstance(x, float) and not math.isfinite(x) else x

    return [clean(v) for v in out]


def spectrum_json(
    run_id: str, snap: Snapshot, grid: dict[str, Any], *, orientation: int | None = None
) -> dict[str, Any]:
    """The JSON answer: (n_q, n_E) intensity (null where unmeasured), mask, energies (meV);
    a powder run's has ``sample_kind`` powder and its |Q| bin edges (1/Angstrom)."""
    out: dict[str, Any] = {
        "run_id": run_id,
        "n_orientations": int(snap.n_orientations),
        "units": "1/(uC sr meV)",
        "energy_meV": grid.get("energy"),
        "q_index": list(range(snap.intensity.shape[0])),
        "intensity": finite_list(snap.intensity),
        "mask": snap.mask.tolist(),
    }
    if grid.get("q_edges") is not None:
        out["sample_kind"] = "powder"
        out["q_edges_inv_angstrom"] = grid["q_edges"]
    if orientation is not None:
        out["orientation"] = orientation
    return out


def snapshot_from_export(path: Path) -> tuple[Snapshot, dict[str, Any]]:
    """(snapshot, grid with the energy bin centres in meV) of a run's HDF5 export."""
    import h5py

    with h5py.File(path, "r") as f:
        e = f["entry"]
        data = e["iqe"]
        counts = np.asarray(data["counts"][()], float)
        exposure = np.asarray(data["exposure"][()], float)
        edges = np.asarray(e["grid/energy_edges"][()], float)
        q_edges = e["grid/q_edges"][()].tolist() if "q_edges" in e["grid"] else None
        n = len(e["orientations/omega"][()]) if "orientations" in e else 0
    snap = Snapshot.of(counts, exposure, n)
    grid: dict[str, Any] = {"energy": (0.5 * (edges[1:] + edges[:-1])).tolist()}
    if q_edges is not None:
        grid["q_edges"] = q_edges
    return snap, grid


def spectrum_png(snap: Snapshot, grid: dict[str, Any], run_id: str) -> bytes:
    """I(q, E) as a PNG (q-path index against E, meV), titled with ``run_id``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    energy = grid.get("energy")
    q_edges = grid.get("q_edges")
    extent = None
    if energy:
        q_lo, q_hi = (q_edges[0], q_edges[-1]) if q_edges else (0, snap.intensity.shape[0])
        extent = (q_lo, q_hi, energy[0], energy[-1])
    img = np.ma.masked_invalid(snap.intensity.T)
    m = ax.imshow(img, origin="lower", aspect="auto", extent=extent, cmap="viridis")
    fig.colorbar(m, ax=ax, label="I (1/(uC sr meV))")
    ax.set_xlabel("|Q| (1/Å)" if q_edges else "q-path index")
    ax.set_ylabel("E (meV)")
    steps = "steps" if q_edges else "orientations"
    ax.set_title(f"{run_id}: {snap.n_orientations} {steps}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
