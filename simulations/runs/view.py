"""What one orientation of the crystal shows on the detector: pictures for planners."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from simulations.exceptions import InstrumentError
from simulations.fcdb.reference import resolve_fc
from simulations.instrument.events import OrientationSimulator
from simulations.instrument.spectrometer import (
    Instrument,
    Orientation,
    busing_levy_b,
    rotation_y,
)
from simulations.lattice.materials import setup
from simulations.lattice.sqe import CoherentSQE

__all__ = ["orientation_view"]


def orientation_view(
    material: str,
    fc: str | dict[str, float] = "mlff_mean",
    *,
    ei: float | None = None,
    omega: float = 0.0,
    energy: float | None = None,
    temperature: float = 5.0,
    u: tuple[float, float, float] = (1.0, 0.0, 0.0),
    v: tuple[float, float, float] = (0.0, 1.0, 0.0),
    out: str | Path = "slice.png",
    instrument: Instrument | None = None,
) -> dict[str, object]:
    """Draw a constant-E slice and an in-plane Q-E cut of what ``omega`` measures.

    The intensity is S(Q, E) k_f/k_i (mbarn/meV/sr per atom) at the detector's super-pixels:
    the slice shows every pixel's Q at energy ``energy`` projected on the horizontal
    scattering plane (axes along ``u`` and ``v``, conventional r.l.u.); the cut shows the
    pixels within 2 degrees of that plane against |Q| and E.

    Returns a JSON-ready summary with the plot path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = setup(material)
    instrument = instrument or Instrument.arcs_like()
    instrument.check_omegas(np.array([omega]))
    ei = float(ei if ei is not None else ms.defaults.ei)
    e_top = float(ms.grid.energy_edges[-1])
    if 0.95 * ei < e_top:
        raise InstrumentError(
            f"Ei = {ei:g} meV is too small for {material}'s energy window up to {e_top:g} meV; "
            f"choose Ei >= {e_top / 0.95:.1f} meV"
        )
    label, c = resolve_fc(material, fc, ms)
    model = CoherentSQE(ms.basis, c, temperature=temperature, resolution=instrument.resolution(ei))
    orientation = Orientation.from_vectors(ms.crystal, u, v)
    sim = OrientationSimulator(model, instrument, orientation, ei, mesh=32, group_rows=2)
    lam = sim.expected(omega)
    inten = lam / (sim._group_solid[:, None] * sim.e_step)
    e = sim.e_centres
    if energy is None:
        energy = 0.5 * sim.table.max_energy
    ie = int(np.argmin(np.abs(e - energy)))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5), dpi=110)
    x, y = _slice_coordinates(sim, ms.crystal.conventional_lattice, omega, ie, u, v)
    _draw_slice(fig, ax1, x, y, inten[:, ie], u, v)
    ax1.set_title(f"E = {e[ie]:.1f} meV (log10 intensity)")
    qm, im = _in_plane_cut(sim, inten)
    _draw_cut(fig, ax2, qm, e, im)
    ax2.set_title(f"{ms.crystal.name}, FC {label}, Ei {ei:g} meV, ω = {omega:g}°")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return {
        "material": ms.crystal.name,
        "fc_set": label,
        "ei_meV": ei,
        "omega_deg": float(omega),
        "energy_meV": float(e[ie]),
        "temperature_K": float(temperature),
        "max_intensity": float(inten.max()),
        "plot": str(out),
    }


def _slice_coordinates(
    sim: OrientationSimulator,
    conventional_lattice: NDArray[np.float64],
    omega: float,
    ie: int,
    u: tuple[float, float, float],
    v: tuple[float, float, float],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Every super-pixel's Q at energy bin ``ie`` and goniometer angle ``omega`` (degrees)
    along ``u`` and along the horizontal normal to it, conventional r.l.u.: (n_groups,) each."""
    kf = sim._kf[ie]
    q_lab = -kf * sim._group_dir
    q_lab[:, 2] += sim._ki
    q_sample = q_lab @ rotation_y(omega)  # R^T Q_lab, rows
    # unit lengths of u and v in 1/Angstrom (conventional r.l.u. along the axes)
    b = busing_levy_b(conventional_lattice)
    len_u = 2 * np.pi * np.linalg.norm(b @ np.asarray(u))
    len_v = 2 * np.pi * np.linalg.norm(b @ np.asarray(v))
    return q_sample[:, 2] / len_u, q_sample[:, 0] / len_v


def _in_plane_cut(
    sim: OrientationSimulator, inten: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """|Q| (1/Angstrom) and intensity, (n_angles, n_E) each, of the super-pixels within 2
    degrees of the horizontal plane: one row per scattering angle (rows at the same angle
    averaged)."""
    d = sim._group_dir
    elev = np.degrees(np.arcsin(np.clip(d[:, 1], -1, 1)))
    in_plane = np.nonzero(np.abs(elev) < 2.0)[0]
    two_theta = np.degrees(np.arctan2(d[in_plane, 0], d[in_plane, 2]))
    order = in_plane[np.argsort(two_theta)]
    qmag = np.sqrt(
        sim._ki**2 + sim._kf[None, :] ** 2 - 2 * sim._ki * sim._kf[None, :] * d[order, 2][:, None]
    )
    # one row per detector angle (average the rows within +-2 degrees)
    tt = np.degrees(np.arctan2(d[order, 0], d[order, 2]))
    uniq, inv = np.unique(np.round(tt, 3), return_inverse=True)
    qm = np.zeros((len(uniq), inten.shape[1]))
    im = np.zeros((len(uniq), inten.shape[1]))
    np.add.at(qm, inv, qmag)
    np.add.at(im, inv, inten[order])
    cnt = np.bincount(inv, minlength=len(uniq))[:, None]
    return qm / cnt, im / cnt


def _draw_slice(
    fig: Any,
    ax: Any,
    x: NDArray[np.float64],
    y: NDArray[np.float64],
    inten: NDArray[np.float64],
    u: tuple[float, float, float],
    v: tuple[float, float, float],
) -> None:
    """Scatter the super-pixels at (x, y) coloured by log10 intensity (4 decades)."""
    val = np.log10(1e-6 + inten)
    order = np.argsort(val)
    sc1 = ax.scatter(
        x[order], y[order], c=val[order], s=2, cmap="viridis", lw=0, vmin=val.max() - 4
    )
    ax.set_xlabel(f"Q along u = {list(u)} (r.l.u.)")
    ax.set_ylabel(f"Q along v⊥ (v = {list(v)}, r.l.u.)")
    ax.set_aspect("equal")
    fig.colorbar(sc1, ax=ax)


def _draw_cut(
    fig: Any, ax: Any, qm: NDArray[np.float64], e: NDArray[np.float64], im: NDArray[np.float64]
) -> None:
    """Map the in-plane cut against |Q| and E, log10 intensity (4 decades)."""
    logi = np.log10(1e-6 + im)
    pm = ax.pcolormesh(
        qm,
        np.broadcast_to(e, qm.shape),
        logi,
        shading="gouraud",
        cmap="viridis",
        vmin=logi.max() - 4,
    )
    ax.set_xlabel("|Q| (1/Å), in-plane pixels")
    ax.set_ylabel("E (meV)")
    fig.colorbar(pm, ax=ax)
