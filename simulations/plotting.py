"""Pictures of the physics: I(q, E) with the dispersion drawn over it."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from .forward import THZ_TO_MEV
from .grid import Grid

__all__ = ["plot_dispersion"]


def plot_dispersion(
    grid: Grid,
    intensity: NDArray[np.float64],
    frequencies_thz: NDArray[np.float64],
    out: str | Path,
    *,
    title: str = "",
) -> Path:
    """Save I(q, E) as an image with the phonon branches drawn over it.

    Parameters
    ----------
    grid
        The (q, E) grid; the x axis is the distance along the path (1/A) with the
        high-symmetry points labelled.
    intensity
        (n_q, n_E) float.
    frequencies_thz
        (n_q, n_branches) float, THz; drawn in meV.
    out
        PNG (or any format matplotlib knows by the suffix).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = grid.qpath.distance
    # Cell edges along x: midpoints; jumps (zero-length steps) are kept as zero-width cells.
    xe = np.concatenate([[x[0]], 0.5 * (x[1:] + x[:-1]), [x[-1]]])
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    mesh = ax.pcolormesh(
        xe, grid.energy_edges, np.asarray(intensity).T, cmap="viridis", shading="flat"
    )
    energies = np.asarray(frequencies_thz) * THZ_TO_MEV
    breaks = [i for i, label in grid.qpath.ticks if "|" in label]
    starts = [0, *breaks, len(x)]
    for a, b in itertools.pairwise(starts):
        ax.plot(x[a:b], energies[a:b], color="white", lw=0.8, alpha=0.8)
    for i, _ in grid.qpath.ticks:
        ax.axvline(x[i], color="0.85", lw=0.6)
    ax.set_xticks([x[i] for i, _ in grid.qpath.ticks])
    ax.set_xticklabels([label.replace("G", "Γ") for _, label in grid.qpath.ticks])
    ax.set_xlim(x[0], x[-1])
    ax.set_ylim(grid.energy_edges[0], grid.energy_edges[-1])
    ax.set_ylabel("Energy transfer (meV)")
    ax.set_xlabel("Wave vector along the path")
    if title:
        ax.set_title(title)
    fig.colorbar(mesh, ax=ax, label="I(q, E) (arb. units)")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
