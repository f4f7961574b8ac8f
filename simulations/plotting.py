"""Pictures of the physics: I(q, E) with the dispersion drawn over it."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from simulations.lattice.grid import Grid
from simulations.units import THZ_TO_MEV

__all__ = ["path_axes", "path_branches", "path_mesh", "plot_dispersion"]


def path_axes(ax: Any, grid: Grid, *, ylabel: str = "Energy transfer (meV)") -> NDArray[np.float64]:
    """Set up a matplotlib axes for a (q, E) picture along ``grid``'s path: the
    high-symmetry points as labelled ticks with faint lines, the path and energy ranges as
    limits. Returns the distance along the path of every q point, (n_q,) 1/A."""
    x = np.asarray(grid.qpath.distance)
    for i, _ in grid.qpath.ticks:
        ax.axvline(x[i], color="0.85", lw=0.6)
    ax.set_xticks([x[i] for i, _ in grid.qpath.ticks])
    ax.set_xticklabels([label.replace("G", "Γ") for _, label in grid.qpath.ticks])
    ax.set_xlim(x[0], x[-1])
    ax.set_ylim(grid.energy_edges[0], grid.energy_edges[-1])
    ax.set_ylabel(ylabel)
    return x


def path_mesh(ax: Any, grid: Grid, z: NDArray[np.float64], **kw: Any) -> Any:
    """``pcolormesh`` of ``z`` (n_q, n_E) on the path (NaN masked; cell edges along the path
    at the midpoints, so jumps between path segments stay zero-width cells)."""
    x = grid.qpath.distance
    xe = np.concatenate([[x[0]], 0.5 * (x[1:] + x[:-1]), [x[-1]]])
    return ax.pcolormesh(
        xe, grid.energy_edges, np.ma.masked_invalid(np.asarray(z).T), shading="flat", **kw
    )


def path_branches(ax: Any, grid: Grid, frequencies_thz: NDArray[np.float64], **kw: Any) -> None:
    """Draw phonon branches (n_q, n_branches) THz as lines in meV, broken at the path's
    jumps ('|' in a tick label)."""
    x = grid.qpath.distance
    energies = np.asarray(frequencies_thz) * THZ_TO_MEV
    breaks = [i for i, label in grid.qpath.ticks if "|" in label]
    for a, b in itertools.pairwise([0, *breaks, len(x)]):
        ax.plot(x[a:b], energies[a:b], **kw)


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

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    mesh = path_mesh(ax, grid, intensity, cmap="viridis")
    path_branches(ax, grid, frequencies_thz, color="white", lw=0.8, alpha=0.8)
    path_axes(ax, grid)
    ax.set_xlabel("Wave vector along the path")
    if title:
        ax.set_title(title)
    fig.colorbar(mesh, ax=ax, label="I(q, E) (arb. units)")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
