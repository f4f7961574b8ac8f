"""Neutron events for one orientation of a single crystal on a direct-geometry spectrometer.

Expected counts per (super-pixel, energy bin)::

    lambda = scale * S(Q, E) * (k_f / k_i) * dOmega * dE      (+ a flat background)

with S(Q, E) the coherent one-phonon cross-section of :class:`~simulations.lattice.sqe.CoherentSQE`
(eigenvectors, Debye-Waller and Bose factors, energy resolution). Poisson sampling turns
them into ``(pixel_id, time_of_flight)`` events.

Speed comes from two approximations, both measured against the exact S(Q, E) by the tests:

* **Phonon table.** Energies and eigenvectors are computed once on a Gamma-centred mesh of
  the primitive reciprocal cell (``mesh`` points per axis, exact by periodicity). Mode
  energies at any Q are trilinearly interpolated; eigenvectors come from the nearest mesh
  point, carried to Q = q + G by the phase ``exp(-2 pi i G.x_j)``.
* **Super-pixels.** S is evaluated at the centre direction of blocks of
  ``group_columns x group_rows`` neighbouring pixels (default 1 x 4: 0.41 x 0.95 degrees,
  comparable to the mosaic spread of a real crystal; measured against single pixels in
  the tests) on an energy grid of half the finest
  resolution width; each sampled event lands on a pixel of its block (chosen by solid angle)
  at an energy uniform within its bin.

A powder sample (:class:`PowderSimulator`) has the same counts with the spherical average
S(|Q|, E) (:func:`~simulations.lattice.powder.powder_shells`) at each super-pixel's |Q|,
the same at every step of the run.

The background is flat in time of flight and proportional to each pixel's solid angle
(a time-independent room background), over the energy window ``[-Ei/2, 0.95 Ei]``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass

import numba
import numpy as np
from numpy.typing import ArrayLike, NDArray

from simulations.cache import cache_root
from simulations.exceptions import InstrumentError
from simulations.instrument.spectrometer import (
    Instrument,
    Orientation,
    energy_to_k,
    energy_to_speed,
)
from simulations.lattice.backgrounds import (
    Backgrounds,
    IncoherentScattering,
    PowderCan,
    elastic_line,
)
from simulations.lattice.powder import POWDER_Q_SIGMA
from simulations.lattice.sqe import FREQUENCY_MIN_MEV, CoherentSQE, mesh_points
from simulations.units import FM2_TO_MBARN, HBAR2_OVER_2AMU, K_B_MEV, K_B_MEV_ROUNDED

__all__ = ["EventBatch", "OrientationSimulator", "PhononTable", "PowderSimulator"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class PhononTable:
    """Phonons on a Gamma-centred ``mesh^3`` grid of the primitive reciprocal cell.

    Attributes
    ----------
    mesh
        Points per axis.
    energies
        (mesh, mesh, mesh, n_modes) float, meV.
    eigenvectors
        (mesh, mesh, mesh, n_modes, n_atoms, 3) complex.
    """

    mesh: int
    energies: NDArray[np.float64]
    eigenvectors: NDArray[np.complex128]

    @classmethod
    def build(cls, model: CoherentSQE, mesh: int = 40) -> PhononTable:
        """Solve the dynamical matrix on the mesh (about 1 s for 64k points, two atoms)."""
        if mesh < 4:
            raise InstrumentError(f"phonon table mesh must be >= 4 points per axis, got {mesh}")
        m = model.modes(mesh_points(mesh))
        n_m = m.energies.shape[1]
        return cls(
            mesh=mesh,
            energies=m.energies.reshape(mesh, mesh, mesh, n_m),
            eigenvectors=m.eigenvectors.reshape(mesh, mesh, mesh, n_m, *m.eigenvectors.shape[2:]),
        )

    @property
    def max_energy(self) -> float:
        """Highest mode energy on the mesh, meV."""
        return float(self.energies.max())

    @classmethod
    def cached(cls, model: CoherentSQE, mesh: int = 40) -> PhononTable:
        """:meth:`build`, kept in the machine's cache directory
        (:func:`simulations.cache.cache_root`, ``phonon_tables/``) by a hash of everything
        the phonons depend on (the FC blocks and their bonds, positions, masses, the
        non-analytic term, the mesh): a restarted service reads the table (~40 MB for two
        atoms, ~0.05 s) instead of solving 64,000 dynamical matrices (~0.6 s)."""
        path = cache_root() / "phonon_tables" / f"{_table_key(model, mesh)}.npz"
        try:
            with np.load(path, allow_pickle=False) as f:
                table = cls(mesh=mesh, energies=f["energies"], eigenvectors=f["eigenvectors"])
            if table.energies.shape[:3] == (mesh, mesh, mesh):
                return table
        except (OSError, KeyError, ValueError):
            pass
        table = cls.build(model, mesh)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
            np.savez(tmp, energies=table.energies, eigenvectors=table.eigenvectors)
            os.replace(tmp, path)
        except OSError as exc:  # a read-only cache: built again next time
            logger.debug("phonon table not cached at %s: %s", path, exc)
        return table


def _table_key(model: CoherentSQE, mesh: int) -> str:
    """Hash of what a phonon table depends on."""
    h = hashlib.sha256(b"phonon-table-1")
    crystal = model.crystal
    parts = [
        np.asarray(model.basis.block_values(model.coefficients), dtype=np.float64),
        np.asarray(model.basis.pairs),
        np.asarray(crystal.positions, dtype=np.float64),
        np.asarray(crystal.lattice, dtype=np.float64),
        np.asarray(crystal.masses, dtype=np.float64),
        np.asarray([mesh]),
    ]
    nac = getattr(model.basis, "nac", None)
    if nac is not None:
        parts += [np.asarray(nac.born), np.asarray(nac.dielectric), np.asarray(nac.pairs)]
        parts += [np.asarray(nac.weights), np.asarray([nac.volume])]
    for a in parts:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:32]


@dataclass(frozen=True, slots=True, kw_only=True)
class EventBatch:
    """Events of one counting interval.

    Attributes
    ----------
    pixel_id
        (n,) int32, detector ids.
    tof_ns
        (n,) int32, time of flight from the pulse's time zero, ns.
    pulse_index
        (n,) int64, index of the pulse (within the interval) each event belongs to,
        non-decreasing.
    n_signal, n_background
        How many events came from S(Q, E) and from the flat background.
    """

    pixel_id: NDArray[np.int32]
    tof_ns: NDArray[np.int32]
    pulse_index: NDArray[np.int64]
    n_signal: int
    n_background: int

    @property
    def n_events(self) -> int:
        """Number of events."""
        return len(self.pixel_id)


@numba.njit(parallel=True, cache=True, fastmath=False)
def _expected_kernel(
    directions: np.ndarray,  # (n_g, 3) unit
    solid: np.ndarray,  # (n_g,)
    e_centres: np.ndarray,  # (n_e,)
    de: float,
    ki: float,
    kf: np.ndarray,  # (n_e,)
    lab_to_rlu: np.ndarray,  # (3, 3)
    rlu_to_cart: np.ndarray,  # (3, 3) rows b_i
    dw: np.ndarray,  # (n_at, 3, 3)
    amp0: np.ndarray,  # (n_at,) b / sqrt(M)
    xfrac: np.ndarray,  # (n_at, 3)
    table_e: np.ndarray,  # (m, m, m, n_m)
    table_v: np.ndarray,  # (m, m, m, n_m, n_at, 3) complex
    sigma_poly: np.ndarray,
    sigma_emax: float,
    temperature: float,
    sigma_cap: float,
    out: np.ndarray,  # (n_g, n_e)
) -> None:
    n_g = directions.shape[0]
    n_e = e_centres.shape[0]
    mesh = table_e.shape[0]
    n_m = table_e.shape[3]
    n_at = amp0.shape[0]
    pref = HBAR2_OVER_2AMU * FM2_TO_MBARN / n_at  # (hbar^2/amu)/(2 N E), in mbarn
    inv_sqrt_2pi = 1.0 / math.sqrt(2.0 * math.pi)
    kt = K_B_MEV * temperature
    for g in numba.prange(n_g):
        dx, dy, dz = directions[g, 0], directions[g, 1], directions[g, 2]
        amp = np.empty(n_at, dtype=np.complex128)
        emode = np.empty(n_m)
        for ie in range(n_e):
            e = e_centres[ie]
            qx = -kf[ie] * dx
            qy = -kf[ie] * dy
            qz = ki - kf[ie] * dz
            h0 = lab_to_rlu[0, 0] * qx + lab_to_rlu[0, 1] * qy + lab_to_rlu[0, 2] * qz
            h1 = lab_to_rlu[1, 0] * qx + lab_to_rlu[1, 1] * qy + lab_to_rlu[1, 2] * qz
            h2 = lab_to_rlu[2, 0] * qx + lab_to_rlu[2, 1] * qy + lab_to_rlu[2, 2] * qz
            c0 = h0 * rlu_to_cart[0, 0] + h1 * rlu_to_cart[1, 0] + h2 * rlu_to_cart[2, 0]
            c1 = h0 * rlu_to_cart[0, 1] + h1 * rlu_to_cart[1, 1] + h2 * rlu_to_cart[2, 1]
            c2 = h0 * rlu_to_cart[0, 2] + h1 * rlu_to_cart[1, 2] + h2 * rlu_to_cart[2, 2]
            # trilinear cell (periodic) for energies, nearest point for eigenvectors
            x0, x1, x2 = h0 * mesh, h1 * mesh, h2 * mesh
            f0, f1, f2 = math.floor(x0), math.floor(x1), math.floor(x2)
            t0, t1, t2 = x0 - f0, x1 - f1, x2 - f2
            b0, b1, b2 = int(f0) % mesh, int(f1) % mesh, int(f2) % mesh
            a0, a1, a2 = (b0 + 1) % mesh, (b1 + 1) % mesh, (b2 + 1) % mesh
            r0, r1, r2 = math.floor(x0 + 0.5), math.floor(x1 + 0.5), math.floor(x2 + 0.5)
            n0, n1, n2 = int(r0) % mesh, int(r1) % mesh, int(r2) % mesh
            # G = Q - q_mesh, integer: its phase on each atom
            # the table point n/mesh is r/mesh folded into [0, 1): G = (r - n) / mesh
            g0 = (int(r0) - n0) // mesh
            g1 = (int(r1) - n1) // mesh
            g2 = (int(r2) - n2) // mesh
            emax_here = -1.0
            for m in range(n_m):
                em = (
                    (1 - t0) * (1 - t1) * (1 - t2) * table_e[b0, b1, b2, m]
                    + t0 * (1 - t1) * (1 - t2) * table_e[a0, b1, b2, m]
                    + (1 - t0) * t1 * (1 - t2) * table_e[b0, a1, b2, m]
                    + t0 * t1 * (1 - t2) * table_e[a0, a1, b2, m]
                    + (1 - t0) * (1 - t1) * t2 * table_e[b0, b1, a2, m]
                    + t0 * (1 - t1) * t2 * table_e[a0, b1, a2, m]
                    + (1 - t0) * t1 * t2 * table_e[b0, a1, a2, m]
                    + t0 * t1 * t2 * table_e[a0, a1, a2, m]
                )
                emode[m] = em
                emax_here = max(emax_here, em)
            # nothing within 6 sigma of this energy transfer (loss or gain): skip
            if e > emax_here + 6.0 * sigma_cap or (e < -emax_here - 6.0 * sigma_cap):
                continue
            total = 0.0
            have_amp = False
            for m in range(n_m):
                em = emode[m]
                if em <= FREQUENCY_MIN_MEV:
                    continue
                ec = min(em, sigma_emax)
                sig = 0.0
                for p in range(sigma_poly.shape[0]):
                    sig = sig * ec + sigma_poly[p]
                sig = max(sig, 1e-3)
                z1 = (e - em) / sig
                nb = 0.0
                if kt > 0.0 and em < 40.0 * kt:
                    nb = 1.0 / math.expm1(em / kt)
                z2 = (e + em) / sig
                g_loss = math.exp(-0.5 * z1 * z1) if z1 * z1 < 72.0 else 0.0
                g_gain = nb * math.exp(-0.5 * z2 * z2) if (nb > 0.0 and z2 * z2 < 72.0) else 0.0
                if g_loss == 0.0 and g_gain == 0.0:
                    continue
                if not have_amp:
                    for j in range(n_at):
                        w = (
                            c0 * (dw[j, 0, 0] * c0 + dw[j, 0, 1] * c1 + dw[j, 0, 2] * c2)
                            + c1 * (dw[j, 1, 0] * c0 + dw[j, 1, 1] * c1 + dw[j, 1, 2] * c2)
                            + c2 * (dw[j, 2, 0] * c0 + dw[j, 2, 1] * c1 + dw[j, 2, 2] * c2)
                        )
                        # D(q+G) = U^+ D(q) U with U = diag(exp(2 pi i G.x_j)): e(Q) = U^+ e(q)
                        ph = (
                            -2.0
                            * math.pi
                            * (g0 * xfrac[j, 0] + g1 * xfrac[j, 1] + g2 * xfrac[j, 2])
                        )
                        amp[j] = amp0[j] * math.exp(-w) * complex(math.cos(ph), math.sin(ph))
                    have_amp = True
                term = 0.0 + 0.0j
                for j in range(n_at):
                    dot = (
                        table_v[n0, n1, n2, m, j, 0] * c0
                        + table_v[n0, n1, n2, m, j, 1] * c1
                        + table_v[n0, n1, n2, m, j, 2] * c2
                    )
                    term += dot * amp[j]
                sf = (term.real * term.real + term.imag * term.imag) * pref / em
                total += sf * inv_sqrt_2pi / sig * ((nb + 1.0) * g_loss + g_gain)
            out[g, ie] = total * kf[ie] / ki * solid[g] * de


class OrientationSimulator:
    """Expected counts and Poisson events for any goniometer angle.

    Parameters
    ----------
    model
        The crystal's S(Q, E) (force constants, temperature, resolution).
    instrument
        Detector geometry.
    orientation
        UB of the mounted crystal.
    ei
        Incident energy, meV.
    mesh
        Phonon table points per axis.
    group_columns, group_rows
        Super-pixel size: tubes x pixels along a tube, for a regular array or an instrument
        definition with tubes of equal length (``Instrument.layout``; loaded pixel tables
        use single pixels). On an instrument definition, neighbouring "columns" are the
        next tube in the file's order (the next pack's first tube at a pack's end).
    e_step
        Energy grid step, meV (default: half the smallest resolution sigma).
    e_top
        Highest energy transfer of the grid, meV (default: 5 sigma above the highest mode,
        at most 0.95 Ei; multiphonon scattering reaches further).
    """

    def __init__(
        self,
        model: CoherentSQE,
        instrument: Instrument,
        orientation: Orientation,
        ei: float,
        *,
        mesh: int = 40,
        group_columns: int = 1,
        group_rows: int = 4,
        e_step: float | None = None,
        table: PhononTable | None = None,
        e_top: float | None = None,
    ) -> None:
        if not np.isfinite(ei) or ei <= 0:
            raise InstrumentError(f"incident energy must be a positive number of meV, got {ei}")
        self.model = model
        self.instrument = instrument
        self.orientation = orientation
        self.ei = float(ei)
        self.table = table or PhononTable.build(model, mesh)
        res = model.resolution
        e_hi = min(
            self.table.max_energy + 5.0 * float(res.sigma(np.array(self.table.max_energy))),
            0.95 * ei,
        )
        sig0 = float(np.min(res.sigma(np.linspace(0, e_hi, 50))))
        self.e_step = float(e_step or 0.5 * sig0)
        if e_top is not None:
            e_hi = min(max(float(e_top), e_hi), 0.95 * ei)
        # energy gain: down to where the Bose factor of the modes is negligible
        kt = K_B_MEV_ROUNDED * model.temperature
        e_lo = -min(e_hi, 0.5 * ei, max(5.0 * sig0, 10.0 * kt))
        n_e = int(np.ceil((e_hi - e_lo) / self.e_step))
        self.e_edges = e_lo + self.e_step * np.arange(n_e + 1)
        self.e_centres = 0.5 * (self.e_edges[1:] + self.e_edges[:-1])
        self._group(group_columns, group_rows)
        self._ki = float(energy_to_k(ei))
        self._kf = np.asarray(energy_to_k(ei - self.e_centres))
        #: (n_groups, n_E) expected counts per unit scale added at every angle (the sample's
        #: background components, :meth:`components`), or None.
        self.extra: NDArray[np.float64] | None = None
        self._components_cache: tuple[object, dict[str, NDArray[np.float64]]] | None = None

    def _group(self, gc: int, gr: int) -> None:
        ins = self.instrument
        if ins.layout:
            n_col, n_row = int(ins.layout["n_columns"]), int(ins.layout["n_rows"])
            col, row = np.divmod(np.arange(ins.n_pixels), n_row)
            gr = max(1, min(gr, n_row))
            gc = max(1, min(gc, n_col))
            group = (col // gc) * (-(-n_row // gr)) + row // gr
        else:
            group = np.arange(ins.n_pixels)
        order = np.argsort(group, kind="stable")
        _, starts, counts = np.unique(group[order], return_index=True, return_counts=True)
        self._members = order  # pixel indices sorted by group
        self._starts = starts
        self._counts = counts
        sol = ins.solid_angles[order]
        self._group_solid = np.add.reduceat(sol, starts)
        # solid-angle-weighted mean direction of each group
        vec = ins.directions[order] * sol[:, None]
        d = np.add.reduceat(vec, starts, axis=0)
        self._group_dir = d / np.linalg.norm(d, axis=1)[:, None]
        cum = np.cumsum(sol)
        self._member_cum = cum  # global cumulative solid angle in member order

    @property
    def n_groups(self) -> int:
        """Number of super-pixels."""
        return len(self._starts)

    def expected(self, omega: float) -> NDArray[np.float64]:
        """(n_groups, n_E) float: S x kf/ki x dOmega x dE (mbarn sr per atom) at ``omega``."""
        m = self.model
        out = np.zeros((self.n_groups, len(self.e_centres)))
        res = m.resolution
        _expected_kernel(
            self._group_dir,
            self._group_solid,
            self.e_centres,
            self.e_step,
            self._ki,
            self._kf,
            self.orientation.lab_to_rlu_matrix(omega),
            np.ascontiguousarray(m._to_cartesian),
            m.debye_waller_tensor,
            m.scattering_lengths / np.sqrt(m.crystal.masses),
            m.crystal.positions,
            self.table.energies,
            self.table.eigenvectors,
            np.asarray(res.coefficients, dtype=float),
            float(res.e_max),
            m.temperature,
            float(np.max(res.sigma(np.linspace(0.0, res.e_max, 64)))),
            out,
        )
        return out

    def components(
        self,
        backgrounds: Backgrounds,
        *,
        can: PowderCan | None = None,
        edges: NDArray[np.float64] | None = None,
    ) -> dict[str, NDArray[np.float64]]:
        """Expected scattering of the sample besides the one-phonon signal, by component.

        Each is (n_groups, n_E), in the units of :meth:`expected` (S x kf/ki x dOmega x dE,
        mbarn sr per atom), the same at every omega (the components are functions of |Q|
        and E: :mod:`simulations.lattice.backgrounds`). ``can``: the can's table on the
        same energies (required when ``backgrounds.can``). ``edges``: uniform energy bin
        edges (meV) to use instead of the simulator's own.
        """
        cached = self._components_cache
        if edges is None and cached is not None and cached[0] == (backgrounds, id(can)):
            return cached[1]
        e_edges = self.e_edges if edges is None else np.asarray(edges, dtype=float)
        centres = 0.5 * (e_edges[1:] + e_edges[:-1])
        step = float(e_edges[1] - e_edges[0])
        out: dict[str, NDArray[np.float64]] = {}
        if backgrounds.any:
            q = self.q_magnitude(centres)
            weight = self.cell_weights(e_edges)
            res = self.model.resolution
            line = elastic_line(centres, float(res.sigma(np.array(0.0))), step)
            if backgrounds.elastic or backgrounds.multiphonon:
                inc = self.incoherent(backgrounds.orders)
                if backgrounds.elastic:
                    out["elastic"] = inc.elastic(q, line[None, :]) * weight
                if backgrounds.multiphonon:
                    broad = inc.broadened_orders(centres, res)
                    out["multiphonon"] = inc.multiphonon(q, broad) * weight
            if backgrounds.can:
                if can is None or len(can.energies) != len(centres):
                    raise InstrumentError(
                        "the can component needs the can's table on the same energies"
                    )
                s_can = can.inelastic(q) + can.elastic(q, line[None, :], backgrounds.ring_width)
                out["can"] = backgrounds.can_atoms * s_can * weight
        if edges is None:
            self._components_cache = ((backgrounds, id(can)), out)
        return out

    def cell_weights(self, edges: ArrayLike | None = None) -> NDArray[np.float64]:
        """(n_groups, n_E) ``k_f/k_i dOmega dE`` of every super-pixel and energy bin
        (uniform ``edges``, meV; default the simulator's): what turns S (mbarn/(sr meV)
        per atom) into the units of :meth:`expected`."""
        e_edges = self.e_edges if edges is None else np.asarray(edges, dtype=float)
        centres = 0.5 * (e_edges[1:] + e_edges[:-1])
        kf = np.asarray(energy_to_k(np.maximum(self.ei - centres, 0.0)))
        step = float(e_edges[1] - e_edges[0])
        return np.asarray((kf / self._ki)[None, :] * self._group_solid[:, None] * step)

    def incoherent(self, max_order: int = 3) -> IncoherentScattering:
        """The crystal's incoherent scattering from this simulator's phonon table."""
        return IncoherentScattering.from_modes(
            self.model, self.table.energies, self.table.eigenvectors, max_order=max_order
        )

    def q_magnitude(self, energies: NDArray[np.float64] | None = None) -> NDArray[np.float64]:
        """(n_groups, n_E) |Q| (1/Angstrom) of every super-pixel centre at every energy
        transfer (meV; default: the simulator's energy centres)."""
        e = self.e_centres if energies is None else np.asarray(energies, dtype=float)
        kf = np.asarray(energy_to_k(np.maximum(self.ei - e, 0.0)))[None, :]
        d_z = self._group_dir[:, 2][:, None]
        q2 = self._ki**2 + kf * kf - 2.0 * self._ki * kf * d_z
        return np.asarray(np.sqrt(np.maximum(q2, 0.0)))

    def flat_background(
        self, n_events: float, edges: NDArray[np.float64] | None = None
    ) -> NDArray[np.float64]:
        """(n_groups, n_E) expected events of :meth:`sample`'s flat background (``n_events``
        in all) in each super-pixel and energy bin (``edges``, meV; default the
        simulator's): per pixel by solid angle, uniform in time of flight between the
        flight times of 1.5 Ei and 0.05 Ei (the group's solid-angle-weighted mean flight
        path)."""
        ins = self.instrument
        e_edges = self.e_edges if edges is None else np.asarray(edges, dtype=float)
        sol = ins.solid_angles[self._members]
        l2 = np.add.reduceat(ins.l2[self._members] * sol, self._starts) / self._group_solid
        v = np.asarray(energy_to_speed(np.clip(self.ei - e_edges, 0.05 * self.ei, None)))
        t = l2[:, None] / v[None, :]  # (n_groups, n_edges)
        t_lo = l2 / energy_to_speed(1.5 * self.ei)
        t_hi = l2 / energy_to_speed(0.05 * self.ei)
        frac = np.diff(np.clip(t, t_lo[:, None], t_hi[:, None]), axis=1) / (t_hi - t_lo)[:, None]
        share = self._group_solid / self._group_solid.sum()
        return np.asarray(n_events * share[:, None] * frac)

    def sample(
        self,
        expected: NDArray[np.float64],
        scale: float,
        background: float,
        n_pulses: int,
        rng: np.random.Generator,
        pulse_weights: NDArray[np.float64] | None = None,
    ) -> EventBatch:
        """Poisson events from expected counts.

        Parameters
        ----------
        expected
            (n_groups, n_E) output of :meth:`expected`.
        scale
            Counts per unit of ``expected`` (flux x time x sample size).
        background
            Expected number of flat-background events.
        n_pulses
            Pulses in the interval; events are spread over them by ``pulse_weights``
            (proton charge per pulse; uniform by default).
        """
        if scale < 0 or background < 0 or not np.isfinite(scale + background):
            raise InstrumentError(
                f"expected counts must be finite and >= 0; got scale={scale}, "
                f"background={background}"
            )
        if n_pulses < 1:
            raise InstrumentError(f"need at least one pulse, got {n_pulses}")
        flat = expected.ravel()
        cum = np.cumsum(flat)
        total = float(cum[-1]) * scale if len(cum) else 0.0
        n_sig = int(rng.poisson(total)) if total > 0 else 0
        n_bg = int(rng.poisson(background)) if background > 0 else 0
        ins = self.instrument
        # signal: cell -> group, energy bin -> a member pixel (by solid angle), E in the bin
        u = np.sort(rng.random(n_sig)) * cum[-1] if n_sig else np.zeros(0)
        cells = np.searchsorted(cum, u, side="right")  # sorted keys: cache-friendly
        cells = np.minimum(cells, len(flat) - 1)
        grp, ie = np.divmod(cells, len(self.e_centres))
        pix_sig = self._pick_member(grp, rng)
        energy = self.e_edges[ie] + self.e_step * rng.random(n_sig)
        # background: pixel by solid angle, flat in tof over the energy window
        pix_bg = self._members[
            np.minimum(
                np.searchsorted(self._member_cum, np.sort(rng.random(n_bg)) * self._member_cum[-1]),
                ins.n_pixels - 1,
            )
        ]
        t_i = ins.l1 / float(energy_to_speed(self.ei))
        l2_bg = ins.l2[pix_bg]
        t_lo = t_i + l2_bg / energy_to_speed(1.5 * self.ei)
        t_hi = t_i + l2_bg / energy_to_speed(0.05 * self.ei)
        tof_bg = (t_lo + (t_hi - t_lo) * rng.random(n_bg)) * 1e9
        tof_sig = (t_i + ins.l2[pix_sig] / energy_to_speed(self.ei - energy)) * 1e9
        pix = np.concatenate([pix_sig, pix_bg])
        tof = np.concatenate([tof_sig, tof_bg])
        n = len(pix)
        if pulse_weights is None:
            pulse = rng.integers(0, n_pulses, n)
        else:
            pc = np.cumsum(pulse_weights)
            pulse = np.minimum(
                np.searchsorted(pc, rng.random(n) * pc[-1], side="right"), n_pulses - 1
            )
        order = np.lexsort((tof, pulse))  # by pulse, then time of flight
        return EventBatch(
            pixel_id=ins.pixel_ids[pix[order]].astype(np.int32),
            tof_ns=np.rint(tof[order]).astype(np.int32),
            pulse_index=pulse[order].astype(np.int64),
            n_signal=n_sig,
            n_background=n_bg,
        )

    def _pick_member(self, grp: NDArray[np.int64], rng: np.random.Generator) -> NDArray[np.int64]:
        start = self._starts[grp]
        lo = np.where(start > 0, self._member_cum[np.maximum(start - 1, 0)], 0.0)
        hi = self._member_cum[start + self._counts[grp] - 1]
        pos = np.searchsorted(self._member_cum, lo + (hi - lo) * rng.random(len(grp)), side="right")
        pos = np.clip(pos, start, start + self._counts[grp] - 1)
        return np.asarray(self._members[pos], dtype=np.int64)


#: |Q| step of the powder table a :class:`PowderSimulator` interpolates, 1/Angstrom.
POWDER_TABLE_Q_STEP = 0.01
#: q mesh of the powder average of a :class:`PowderSimulator`'s table (points per axis).
POWDER_MESH = 48


class PowderSimulator(OrientationSimulator):
    """Expected counts and Poisson events of a powder sample (no goniometer).

    Each super-pixel at each energy sees the spherical average S(|Q|, E) of the crystal's
    coherent one-phonon scattering (:func:`~simulations.lattice.powder.powder_shells` on
    a ``powder_mesh``^3 q mesh, with the model's energy resolution, Debye-Waller and Bose
    factors, and a Gaussian |Q| resolution ``q_sigma``, 1/A) at its own
    |Q| = |k_i - k_f| (from the super-pixel's centre direction): computed once on |Q|
    values ``q_step`` apart (1/Angstrom) and interpolated linearly.
    :meth:`expected` is the same at every ``omega``. Parameters as
    :class:`OrientationSimulator` (no orientation).
    """

    def __init__(
        self,
        model: CoherentSQE,
        instrument: Instrument,
        ei: float,
        *,
        powder_mesh: int = POWDER_MESH,
        q_step: float = POWDER_TABLE_Q_STEP,
        q_sigma: float = POWDER_Q_SIGMA,
        **kwargs: object,
    ) -> None:
        # the goniometer plays no part: any orientation serves the parent's set-up
        mounting = Orientation.from_vectors(model.crystal, (1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
        super().__init__(model, instrument, mounting, ei, **kwargs)  # type: ignore[arg-type]
        if powder_mesh < 4 or not q_step > 0:
            raise InstrumentError(
                f"a powder average needs a q mesh >= 4 and a |Q| step > 0, got "
                f"{powder_mesh} and {q_step}"
            )
        self.powder_mesh = int(powder_mesh)
        self.q_step = float(q_step)
        self.q_sigma = float(q_sigma)
        self._powder: NDArray[np.float64] | None = None

    def powder_table(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(|Q| points (n_t,) 1/Angstrom, S (n_t, n_E) mbarn/(sr meV) per atom) on the
        simulator's energy centres."""
        from simulations.lattice.powder import powder_shells

        q_top = float(self.q_magnitude().max()) + 2.0 * self.q_step
        q = np.asarray(self.q_step * np.arange(int(np.ceil(q_top / self.q_step)) + 1), float)
        return q, powder_shells(
            self.model, q, self.e_centres, mesh=self.powder_mesh, q_sigma=self.q_sigma
        )

    def expected(self, omega: float = 0.0) -> NDArray[np.float64]:
        """(n_groups, n_E) float: S(|Q|, E) x kf/ki x dOmega x dE (the units of
        :meth:`OrientationSimulator.expected`), the same at every ``omega``."""
        if self._powder is None:
            q_tab, s_tab = self.powder_table()
            q = self.q_magnitude()
            x = np.clip(q / self.q_step, 0.0, len(q_tab) - 1.000001)
            i = np.floor(x).astype(np.int64)
            f = x - i
            cols = np.arange(q.shape[1])[None, :]
            s = (1.0 - f) * s_tab[i, cols] + f * s_tab[i + 1, cols]
            self._powder = np.asarray(s * self.cell_weights())
        return self._powder.copy()
