"""What one orientation of the crystal shows on the detector: pictures for planners."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simulations.exceptions import InstrumentError
from simulations.fcdb.reference import resolve_fc
from simulations.instrument.events import OrientationSimulator
from simulations.instrument.spectrometer import Instrument, Orientation, rotation_y
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
    kf = sim._kf[ie]
    d = sim._group_dir
    q_lab = -kf * d
    q_lab[:, 2] += sim._ki
    q_sample = q_lab @ rotation_y(omega)  # R^T Q_lab, rows
    # unit lengths of u and v in 1/Angstrom (conventional r.l.u. along the axes)
    from simulations.instrument.spectrometer import busing_levy_b

    b = busing_levy_b(ms.crystal.conventional_lattice)
    len_u = 2 * np.pi * np.linalg.norm(b @ np.asarray(u))
    len_v = 2 * np.pi * np.linalg.norm(b @ np.asarray(v))
    x, y = q_sample[:, 2] / len_u, q_sample[:, 0] / len_v

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5), dpi=110)
    val = np.log10(1e-6 + inten[:, ie])
    order = np.argsort(val)
    sc1 = ax1.scatter(
        x[order], y[order], c=val[order], s=2, cmap="viridis", lw=0, vmin=val.max() - 4
    )
    ax1.set_xlabel(f"Q along u = {list(u)} (r.l.u.)")
    ax1.set_ylabel(f"Q along v⊥ (v = {list(v)}, r.l.u.)")
    ax1.set_aspect("equal")
    ax1.set_title(f"E = {e[ie]:.1f} meV (log10 intensity)")
    fig.colorbar(sc1, ax=ax1)

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
    qm = np.zeros((len(uniq), len(e)))
    im = np.zeros((len(uniq), len(e)))
    np.add.at(qm, inv, qmag)
    np.add.at(im, inv, inten[order])
    cnt = np.bincount(inv, minlength=len(uniq))[:, None]
    qm, im = qm / cnt, im / cnt
    logi = np.log10(1e-6 + im)
    pm = ax2.pcolormesh(
        qm,
        np.broadcast_to(e, qm.shape),
        logi,
        shading="gouraud",
        cmap="viridis",
        vmin=logi.max() - 4,
    )
    ax2.set_xlabel("|Q| (1/Å), in-plane pixels")
    ax2.set_ylabel("E (meV)")
    ax2.set_title(f"{ms.crystal.name}, FC {label}, Ei {ei:g} meV, ω = {omega:g}°")
    fig.colorbar(pm, ax=ax2)
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
