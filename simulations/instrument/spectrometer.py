"""Direct-geometry time-of-flight spectrometer: detector geometry, kinematics, UB, goniometer.

Frames and conventions (Mantid's, so that facility tools agree):

* **Lab frame**: the sample at the origin, the beam along +z, y vertically up, x horizontal
  (x = y cross z). The goniometer rotates the sample by ``omega`` about +y:
  ``Q_lab = R_y(omega) Q_sample``.
* **Q** is the momentum given to the sample, ``Q = k_i - k_f`` (1/Angstrom, with 2 pi);
  energy transfer ``E = E_i - E_f`` (meV), positive for neutron energy loss.
* **UB** (Busing & Levy 1967): ``Q_sample = 2 pi U B h`` with ``h`` in r.l.u. of the
  *conventional* cell; ``B`` from the conventional lattice parameters, ``U`` from two
  orientation vectors: ``u`` (hkl) along the beam and ``v`` (hkl) in the horizontal plane
  (on the +x side) at omega = 0. The physics core works in r.l.u. of the *primitive*
  reciprocal lattice; :meth:`Orientation.lab_to_rlu` returns those.
* **Time of flight** is measured from the pulse's time zero at the moderator:
  ``tof = L1 / v_i + L2 / v_f`` (ns).

Units: lengths in m (instrument) and Angstrom (crystal), energies meV, times ns, angles
degrees at interfaces.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from simulations.exceptions import GridError, InstrumentError
from simulations.lattice.crystals import Crystal
from simulations.lattice.resolution import EnergyResolution, instrument_resolution
from simulations.units import E_PER_K2, MEV, NEUTRON_MASS

if TYPE_CHECKING:
    from simulations.instrument.idf import IdfGeometry

__all__ = [
    "Instrument",
    "Orientation",
    "energy_to_k",
    "energy_to_speed",
    "rotation_y",
]

logger = logging.getLogger(__name__)


def energy_to_speed(energy: NDArray[np.float64] | float) -> NDArray[np.float64]:
    """Neutron speed (m/s) at kinetic energy ``energy`` (meV)."""
    return np.sqrt(2.0 * np.asarray(energy, dtype=float) * MEV / NEUTRON_MASS)


def energy_to_k(energy: NDArray[np.float64] | float) -> NDArray[np.float64]:
    """Neutron wave number (1/Angstrom) at kinetic energy ``energy`` (meV)."""
    return np.sqrt(np.asarray(energy, dtype=float) / E_PER_K2)


def rotation_y(omega_deg: float) -> NDArray[np.float64]:
    """(3, 3) rotation by ``omega_deg`` degrees about the vertical +y axis."""
    w = np.deg2rad(omega_deg)
    c, s = np.cos(w), np.sin(w)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


@dataclass(frozen=True, slots=True, kw_only=True)
class Instrument:
    """Geometry of a direct-geometry spectrometer.

    Attributes
    ----------
    name
        Instrument name; also the ``resins`` model for the energy resolution.
    l1
        Moderator-to-sample distance, m.
    pixel_ids
        (n_pix,) int32, detector ids as published in ev44 ``pixel_id``.
    positions
        (n_pix, 3) float, m, sample-to-pixel vectors in the lab frame.
    solid_angles
        (n_pix,) float, sr.
    chopper_frequency
        Fermi chopper frequency (Hz) for the resolution model.
    goniometer_limits
        (min, max) omega, degrees.
    layout
        ``{"n_columns", "n_rows", "radius", ...}`` for the regular cylindrical array (a fast
        inverse lookup and super-pixel grouping use it); ``{"n_columns", "n_rows"}`` alone
        for an instrument definition whose tubes all have ``n_rows`` pixels, consecutive
        in the pixel arrays (``n_columns`` tubes: super-pixel grouping along a tube uses
        it); empty for a loaded pixel table or irregular tubes.
    pixel_table, pixel_table_sha256
        Path and SHA-256 of a loaded pixel table (empty otherwise).
    idf, idf_sha256
        Path and SHA-256 of the Mantid instrument definition read (empty otherwise).
    """

    name: str
    l1: float
    pixel_ids: NDArray[np.int32]
    positions: NDArray[np.float64]
    solid_angles: NDArray[np.float64]
    chopper_frequency: float = 600.0
    goniometer_limits: tuple[float, float] = (-180.0, 180.0)
    layout: dict[str, float] = field(default_factory=dict)
    pixel_table: str = ""
    pixel_table_sha256: str = ""
    idf: str = ""
    idf_sha256: str = ""

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def arcs_like(
        cls,
        *,
        n_columns: int = 400,
        n_rows: int = 256,
        radius: float = 3.0,
        phi_min: float = -28.0,
        phi_max: float = 135.0,
        elevation: float = 28.0,
        l1: float = 13.6,
        chopper_frequency: float = 600.0,
        goniometer_limits: tuple[float, float] = (-180.0, 180.0),
        name: str = "ARCS",
    ) -> Instrument:
        """An ARCS-like cylindrical array: ``n_columns`` x ``n_rows`` pixels (102,400 default).

        Columns are vertical tubes at in-plane scattering angles ``phi_min``..``phi_max``
        (degrees, + towards +x); rows span ``+-elevation`` degrees out of plane at the tube
        radius ``radius`` (m). Pixel id = column * n_rows + row.
        """
        if n_columns < 1 or n_rows < 1 or radius <= 0 or l1 <= 0 or not phi_max > phi_min:
            raise InstrumentError(
                "an ARCS-like array needs n_columns, n_rows >= 1, radius, l1 > 0 and "
                f"phi_max > phi_min; got {n_columns=}, {n_rows=}, {radius=}, {l1=}, "
                f"{phi_min=}, {phi_max=}"
            )
        d_phi = np.deg2rad(phi_max - phi_min) / n_columns
        phi = np.deg2rad(phi_min) + (np.arange(n_columns) + 0.5) * d_phi
        height = radius * np.tan(np.deg2rad(elevation))
        d_y = 2 * height / n_rows
        y = -height + (np.arange(n_rows) + 0.5) * d_y
        pp, yy = np.meshgrid(phi, y, indexing="ij")
        pos = np.stack([radius * np.sin(pp), yy, radius * np.cos(pp)], -1).reshape(-1, 3)
        r = np.linalg.norm(pos, axis=1)
        solid = (radius * d_phi) * d_y * radius / r**3
        return cls(
            name=name,
            l1=float(l1),
            pixel_ids=np.arange(n_columns * n_rows, dtype=np.int32),
            positions=pos,
            solid_angles=solid,
            chopper_frequency=float(chopper_frequency),
            goniometer_limits=(float(goniometer_limits[0]), float(goniometer_limits[1])),
            layout={
                "n_columns": n_columns,
                "n_rows": n_rows,
                "radius": float(radius),
                "phi_min": float(phi_min),
                "phi_max": float(phi_max),
                "elevation": float(elevation),
            },
        )

    @classmethod
    def from_pixel_table(
        cls,
        path: str | Path,
        *,
        name: str = "ARCS",
        l1: float = 13.6,
        chopper_frequency: float = 600.0,
        goniometer_limits: tuple[float, float] = (-180.0, 180.0),
    ) -> Instrument:
        """Load a real pixel table: CSV with header ``id,x,y,z[,solid_angle]`` (m, sr).

        Without a solid-angle column each pixel gets ``d^2 / r^2`` with ``d`` its distance to
        the nearest other pixel (a square-pixel estimate).
        """
        import hashlib

        path = Path(path)
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            data = np.atleast_1d(np.genfromtxt(path, delimiter=",", names=True))
        except (OSError, ValueError) as e:
            raise InstrumentError(f"cannot read pixel table {path}: {e}") from e
        names = data.dtype.names or ()
        missing = {"id", "x", "y", "z"} - set(names)
        if missing:
            raise InstrumentError(
                f"pixel table {path} lacks columns {sorted(missing)}; expected a header "
                "'id,x,y,z[,solid_angle]'"
            )
        pos = np.stack([data["x"], data["y"], data["z"]], -1).astype(float)
        r = np.linalg.norm(pos, axis=1)
        if np.any(r <= 0) or not np.all(np.isfinite(pos)):
            raise InstrumentError(f"pixel table {path} has pixels at the sample or non-finite")
        ids = np.asarray(data["id"], dtype=np.int32)
        if len(np.unique(ids)) != len(ids):
            raise InstrumentError(f"pixel table {path} has duplicate pixel ids")
        if "solid_angle" in names:
            solid = np.asarray(data["solid_angle"], dtype=float)
        else:
            from scipy.spatial import cKDTree

            d, _ = cKDTree(pos).query(pos, k=2)
            solid = d[:, 1] ** 2 / r**2
        return cls(
            name=name,
            l1=float(l1),
            pixel_ids=ids,
            positions=pos,
            solid_angles=solid,
            chopper_frequency=float(chopper_frequency),
            goniometer_limits=goniometer_limits,
            pixel_table=str(path.resolve()),
            pixel_table_sha256=digest,
        )

    @classmethod
    def from_idf(
        cls,
        path: str | Path,
        *,
        name: str | None = None,
        chopper_frequency: float = 600.0,
        goniometer_limits: tuple[float, float] = (-180.0, 180.0),
    ) -> Instrument:
        """Read a Mantid instrument definition file (see :mod:`simulations.instrument.idf`).

        Pixel ids are the file's detector ids, positions relative to its sample position,
        ``l1 = |sample - source|``, solid angles from the pixels' cylinders; the monitors
        are left out (:func:`simulations.instrument.idf.read_idf` returns them). The derived
        geometry is cached by the file's SHA-256, so a second load is fast.

        Parameters
        ----------
        name
            Instrument name, also the ``resins`` model of the energy resolution (default:
            the file's ``<instrument name=...>``).
        """
        from simulations.instrument.idf import read_idf

        path = Path(path)
        geom = read_idf(path)
        return cls._from_geometry(
            geom,
            str(path.resolve()),
            name=name,
            chopper_frequency=chopper_frequency,
            goniometer_limits=goniometer_limits,
        )

    @classmethod
    def _from_geometry(
        cls,
        geom: IdfGeometry,
        path: str,
        *,
        name: str | None,
        chopper_frequency: float,
        goniometer_limits: tuple[float, float],
    ) -> Instrument:
        layout: dict[str, float] = {}
        if geom.pixels_per_tube:
            layout = {"n_columns": geom.n_tubes, "n_rows": geom.pixels_per_tube}
        else:
            logger.info(
                "%s: tubes of unequal length: no super-pixel grouping (every pixel evaluated)",
                path,
            )
        return cls(
            name=name or geom.name or "ARCS",
            l1=geom.l1,
            pixel_ids=geom.pixel_ids,
            positions=geom.positions,
            solid_angles=geom.solid_angles,
            chopper_frequency=float(chopper_frequency),
            goniometer_limits=(float(goniometer_limits[0]), float(goniometer_limits[1])),
            layout=layout,
            idf=path,
            idf_sha256=geom.sha256,
        )

    @property
    def regular(self) -> bool:
        """Whether this is the regular cylindrical array of :meth:`arcs_like`."""
        return "radius" in self.layout

    def write_pixel_table(self, path: str | Path) -> None:
        """Write ``id,x,y,z,solid_angle`` as CSV (readable by :meth:`from_pixel_table`)."""
        table = np.column_stack([self.pixel_ids, self.positions, self.solid_angles])
        np.savetxt(
            path,
            table,
            delimiter=",",
            header="id,x,y,z,solid_angle",
            comments="",
            fmt=["%d", "%.9g", "%.9g", "%.9g", "%.9g"],
        )

    def to_metadata(self) -> dict[str, object]:
        """JSON-ready description: the whole regular array, or the file a pixel table or an
        instrument definition came from (path, name and SHA-256)."""
        meta: dict[str, object] = {
            "name": self.name,
            "l1_m": self.l1,
            "n_pixels": self.n_pixels,
            "chopper_frequency_Hz": self.chopper_frequency,
            "goniometer_limits_deg": list(self.goniometer_limits),
        }
        if self.idf:
            meta |= {
                "layout": "idf",
                "idf": self.idf,
                "idf_name": Path(self.idf).name,
                "idf_sha256": self.idf_sha256,
            }
        elif self.regular:
            meta["layout"] = dict(self.layout)
        else:
            meta |= {
                "layout": "pixel_table",
                "pixel_table": self.pixel_table,
                "pixel_table_sha256": self.pixel_table_sha256,
            }
        return meta

    @classmethod
    def from_metadata(
        cls,
        meta: dict[str, object],
        file: str | Path | None = None,
    ) -> Instrument:
        """Rebuild the instrument from :meth:`to_metadata` output.

        Parameters
        ----------
        file
            The file the instrument came from, of the kind the metadata names: a pixel
            table (CSV) or a Mantid instrument definition (IDF). Without it a pixel table is
            reloaded from the recorded path; an instrument definition from the geometry
            cached under its SHA-256, else from the recorded path. The file's SHA-256 must
            match the recorded one.
        """
        layout = meta.get("layout")
        if layout == "idf":
            return cls._from_idf_metadata(meta, file)
        if not isinstance(layout, dict):
            path = Path(file or str(meta.get("pixel_table", "")))
            if not str(path) or not path.is_file():
                raise InstrumentError(
                    f"the run used the pixel table {meta.get('pixel_table')!r}, which is not "
                    "here; pass the table file"
                )
            lims = meta.get("goniometer_limits_deg", (-180.0, 180.0))
            ins = cls.from_pixel_table(
                path,
                name=str(meta.get("name", "ARCS")),
                l1=float(meta["l1_m"]),  # type: ignore[arg-type]
                chopper_frequency=float(meta.get("chopper_frequency_Hz", 600.0)),  # type: ignore[arg-type]
                goniometer_limits=(float(lims[0]), float(lims[1])),  # type: ignore[index]
            )
            want = meta.get("pixel_table_sha256")
            if want and ins.pixel_table_sha256 != want:
                raise InstrumentError(
                    f"pixel table {path} (sha256 {ins.pixel_table_sha256[:12]}...) is not the "
                    f"one the run used (sha256 {str(want)[:12]}...)"
                )
            return ins
        lims = meta.get("goniometer_limits_deg", (-180.0, 180.0))
        return cls.arcs_like(
            n_columns=int(layout["n_columns"]),
            n_rows=int(layout["n_rows"]),
            radius=float(layout["radius"]),
            phi_min=float(layout["phi_min"]),
            phi_max=float(layout["phi_max"]),
            elevation=float(layout["elevation"]),
            l1=float(meta["l1_m"]),  # type: ignore[arg-type]
            chopper_frequency=float(meta.get("chopper_frequency_Hz", 600.0)),  # type: ignore[arg-type]
            goniometer_limits=(float(lims[0]), float(lims[1])),  # type: ignore[index]
            name=str(meta.get("name", "ARCS")),
        )

    @classmethod
    def _from_idf_metadata(cls, meta: dict[str, object], idf: str | Path | None) -> Instrument:
        from simulations.instrument.idf import idf_cache_dir, load_cached, read_idf

        want = str(meta.get("idf_sha256", ""))
        recorded = str(meta.get("idf", ""))
        label = str(meta.get("idf_name") or Path(recorded).name or "?")
        geom = load_cached(want) if want and idf is None else None
        path = Path(idf) if idf is not None else Path(recorded)
        if geom is None:
            if not str(path) or not path.is_file():
                raise InstrumentError(
                    f"the run used the instrument definition {label} (sha256 {want[:12]}...), "
                    f"which is neither at {str(path)!r} nor in the cache {idf_cache_dir()}; "
                    "pass the definition file (--instrument FILE)"
                )
            geom = read_idf(path)
            if want and geom.sha256 != want:
                raise InstrumentError(
                    f"instrument definition {path} (sha256 {geom.sha256[:12]}...) is not the "
                    f"one the run used, {label} (sha256 {want[:12]}...); pass that file"
                )
        lims = meta.get("goniometer_limits_deg", (-180.0, 180.0))
        return cls._from_geometry(
            geom,
            str(path.resolve()) if idf is not None else recorded,
            name=str(meta.get("name", "")) or None,
            chopper_frequency=float(meta.get("chopper_frequency_Hz", 600.0)),  # type: ignore[arg-type]
            goniometer_limits=(float(lims[0]), float(lims[1])),  # type: ignore[index]
        )

    # -- properties -------------------------------------------------------------------------

    @property
    def n_pixels(self) -> int:
        """Number of pixels."""
        return len(self.pixel_ids)

    @property
    def l2(self) -> NDArray[np.float64]:
        """(n_pix,) float, sample-to-pixel distances, m."""
        return np.asarray(np.linalg.norm(self.positions, axis=1))

    @property
    def directions(self) -> NDArray[np.float64]:
        """(n_pix, 3) float, unit vectors from the sample to each pixel."""
        return np.asarray(self.positions / self.l2[:, None])

    def pixel_rows(self, pixel_id: NDArray[np.integer]) -> NDArray[np.int64]:
        """Row index in the pixel arrays of detector ids ``pixel_id``; -1 for unknown ids."""
        ids = np.asarray(pixel_id, dtype=np.int64)
        if self.ids_consecutive:
            idx = ids - int(self.pixel_ids[0])
            return np.where((idx >= 0) & (idx < self.n_pixels), idx, -1)
        order = np.argsort(self.pixel_ids)
        pos = np.clip(np.searchsorted(self.pixel_ids, ids, sorter=order), 0, self.n_pixels - 1)
        idx = order[pos]
        return np.where(self.pixel_ids[idx] == ids, idx, -1).astype(np.int64)

    @property
    def ids_consecutive(self) -> bool:
        """Whether the pixel ids are ``id_0, id_0 + 1, ...`` in array order (so that a row
        index is the id minus the first id)."""
        ids = self.pixel_ids
        n = len(ids)
        return n > 0 and int(ids[-1]) - int(ids[0]) == n - 1 and bool(np.all(np.diff(ids) == 1))

    def index_of(self, pixel_id: NDArray[np.integer]) -> NDArray[np.int64]:
        """Row index in the pixel arrays of detector ids ``pixel_id``; unknown ids raise."""
        idx = self.pixel_rows(pixel_id)
        if np.any(idx < 0):
            bad = np.asarray(pixel_id)[idx < 0][:5]
            raise InstrumentError(f"unknown pixel ids {bad.tolist()} for instrument {self.name}")
        return idx

    def resolution(self, ei: float, e_max: float | None = None) -> EnergyResolution:
        """Energy resolution sigma(E) of this instrument at incident energy ``ei`` (meV)."""
        return instrument_resolution(self.name, ei, self.chopper_frequency, e_max=e_max)

    def check_omegas(self, omegas: NDArray[np.float64]) -> NDArray[np.float64]:
        """Validate goniometer angles (degrees) against the limits; return them as floats."""
        w = np.atleast_1d(np.asarray(omegas, dtype=float))
        lo, hi = self.goniometer_limits
        if len(w) == 0:
            raise InstrumentError("no orientations given")
        if not np.all(np.isfinite(w)) or w.min() < lo or w.max() > hi:
            raise InstrumentError(
                f"omega {w.min():g}..{w.max():g} deg is outside the goniometer limits "
                f"{lo:g}..{hi:g} deg of {self.name}"
            )
        return w

    # -- kinematics -------------------------------------------------------------------------

    def event_to_qe(
        self, pixel_index: NDArray[np.integer], tof_ns: NDArray[np.number], ei: float
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(pixel index, time of flight) -> (Q_lab, E).

        Parameters
        ----------
        pixel_index
            (n,) int, row index into the pixel arrays (not the detector id).
        tof_ns
            (n,) float, ns from the pulse's time zero at the moderator.
        ei
            Incident energy, meV.

        Returns
        -------
        q_lab
            (n, 3) float, 1/Angstrom, ``k_i - k_f`` in the lab frame.
        energy
            (n,) float, meV. Events arriving before the elastic time of a neutron faster
            than ``v_i`` get E < 0 (energy gain); ``tof <= L1/v_i`` gives NaN.
        """
        idx = np.asarray(pixel_index, dtype=np.int64)
        t = np.asarray(tof_ns, dtype=float) * 1e-9
        t_i = self.l1 / energy_to_speed(ei)
        l2 = self.l2[idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            t_f = t - t_i
            v_f = np.where(t_f > 0, l2 / t_f, np.nan)
        e_f = 0.5 * NEUTRON_MASS * v_f**2 / MEV
        k_f = energy_to_k(e_f)
        q = -k_f[:, None] * self.directions[idx]
        q[:, 2] += energy_to_k(ei)
        return q, ei - e_f

    def qe_to_event(
        self, q_lab: NDArray[np.float64], energy: NDArray[np.float64], ei: float
    ) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        """(Q_lab, E) -> (pixel index, time of flight in ns): the inverse of :meth:`event_to_qe`.

        The pixel is the one whose direction is nearest to ``k_f = k_i z - Q_lab`` (exact
        for Q that a pixel centre sees); ``-1`` where k_f points at no pixel of a regular
        array. The time of flight follows from E and that pixel's L2.
        """
        q = np.atleast_2d(np.asarray(q_lab, dtype=float))
        kf = -q
        kf[:, 2] += energy_to_k(ei)
        if self.regular:
            idx = self._regular_lookup(kf)
        else:
            from scipy.spatial import cKDTree

            unit = kf / np.linalg.norm(kf, axis=1)[:, None]
            _, idx = cKDTree(self.directions).query(unit)
            idx = np.asarray(idx, dtype=np.int64)
        e_f = ei - np.asarray(energy, dtype=float)
        with np.errstate(invalid="ignore"):
            v_f = energy_to_speed(np.where(e_f > 0, e_f, np.nan))
        l2 = np.where(idx >= 0, self.l2[np.maximum(idx, 0)], np.nan)
        tof = (self.l1 / energy_to_speed(ei) + l2 / v_f) * 1e9
        return idx, tof

    def _regular_lookup(self, kf: NDArray[np.float64]) -> NDArray[np.int64]:
        lay = self.layout
        n_col, n_row = int(lay["n_columns"]), int(lay["n_rows"])
        phi = np.rad2deg(np.arctan2(kf[:, 0], kf[:, 2]))
        col = np.floor((phi - lay["phi_min"]) / (lay["phi_max"] - lay["phi_min"]) * n_col)
        horizontal = np.hypot(kf[:, 0], kf[:, 2])
        y = lay["radius"] * kf[:, 1] / horizontal
        height = lay["radius"] * np.tan(np.deg2rad(lay["elevation"]))
        row = np.floor((y + height) / (2 * height) * n_row)
        ok = (col >= 0) & (col < n_col) & (row >= 0) & (row < n_row)
        return np.where(ok, col * n_row + row, -1).astype(np.int64)


@dataclass(frozen=True, slots=True, kw_only=True)
class Orientation:
    """How the crystal sits on the goniometer: the UB matrix and the primitive-cell map.

    Attributes
    ----------
    crystal
        The crystal (its conventional cell defines h, its primitive cell the r.l.u. used by
        the physics core).
    u, v
        (3,) float, conventional hkl along the beam and in the horizontal plane at omega = 0.
    ub
        (3, 3) float, 1/Angstrom without 2 pi: ``Q_sample = 2 pi UB h``.
    """

    crystal: Crystal
    u: tuple[float, float, float]
    v: tuple[float, float, float]
    ub: NDArray[np.float64]

    @classmethod
    def from_vectors(
        cls,
        crystal: Crystal,
        u: tuple[float, float, float] = (1.0, 0.0, 0.0),
        v: tuple[float, float, float] = (0.0, 1.0, 0.0),
    ) -> Orientation:
        """Busing-Levy UB from the conventional lattice and orientation vectors ``u``, ``v``."""
        b = busing_levy_b(crystal.conventional_lattice)
        t1, t2 = b @ np.asarray(u, float), b @ np.asarray(v, float)
        if np.linalg.norm(np.cross(t1, t2)) < 1e-8 * np.linalg.norm(t1) * np.linalg.norm(t2):
            raise InstrumentError(f"orientation vectors u={u} and v={v} are parallel")
        e1 = t1 / np.linalg.norm(t1)
        e3 = np.cross(t1, t2)
        e3 /= np.linalg.norm(e3)
        e2 = np.cross(e3, e1)
        crystal_frame = np.column_stack([e1, e2, e3])
        lab_frame = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # z, x, y
        u_matrix = lab_frame @ crystal_frame.T
        return cls(
            crystal=crystal,
            u=tuple(float(x) for x in u),  # type: ignore[arg-type]
            v=tuple(float(x) for x in v),  # type: ignore[arg-type]
            ub=u_matrix @ b,
        )

    @property
    def conventional_to_primitive(self) -> NDArray[np.float64]:
        """(3, 3) P with q_primitive = P h_conventional (both r.l.u.)."""
        c = self.crystal
        return np.asarray(c.lattice @ np.linalg.inv(c.conventional_lattice))

    def lab_to_rlu_matrix(self, omega_deg: float) -> NDArray[np.float64]:
        """(3, 3) M with q_primitive = M Q_lab at goniometer angle ``omega_deg``."""
        inv_ub = np.linalg.inv(2 * np.pi * self.ub)
        return np.asarray(self.conventional_to_primitive @ inv_ub @ rotation_y(omega_deg).T)

    def lab_to_rlu(self, q_lab: NDArray[np.float64], omega_deg: float) -> NDArray[np.float64]:
        """(n, 3) Q_lab (1/Angstrom) -> (n, 3) primitive r.l.u. at ``omega_deg``."""
        return np.asarray(np.atleast_2d(q_lab) @ self.lab_to_rlu_matrix(omega_deg).T)

    def rlu_to_lab(self, q_rlu: NDArray[np.float64], omega_deg: float) -> NDArray[np.float64]:
        """(n, 3) primitive r.l.u. -> (n, 3) Q_lab (1/Angstrom) at ``omega_deg``."""
        m = np.linalg.inv(self.lab_to_rlu_matrix(omega_deg))
        return np.asarray(np.atleast_2d(q_rlu) @ m.T)

    def to_metadata(self) -> dict[str, object]:
        """JSON-ready: lattice parameters, u, v and UB."""
        lat = self.crystal.conventional_lattice
        a, b, c = np.linalg.norm(lat, axis=1)
        angles = [
            float(
                np.degrees(
                    np.arccos(lat[j] @ lat[k] / np.linalg.norm(lat[j]) / np.linalg.norm(lat[k]))
                )
            )
            for j, k in ((1, 2), (0, 2), (0, 1))
        ]
        return {
            "lattice_abc_A": [float(a), float(b), float(c)],
            "lattice_angles_deg": angles,
            "u": list(self.u),
            "v": list(self.v),
            "ub_matrix": self.ub.tolist(),
        }


def busing_levy_b(conventional_lattice: NDArray[np.float64]) -> NDArray[np.float64]:
    """Busing-Levy B matrix (1/Angstrom, no 2 pi) of a lattice given by its row vectors."""
    lat = np.asarray(conventional_lattice, dtype=float)
    if abs(np.linalg.det(lat)) < 1e-9:
        raise GridError("the conventional lattice is singular")
    rec = np.linalg.inv(lat).T  # rows a*, b*, c* (no 2 pi)
    ast, bst, cst = np.linalg.norm(rec, axis=1)
    cos_be = rec[0] @ rec[2] / (ast * cst)
    cos_ga = rec[0] @ rec[1] / (ast * bst)
    sin_be, sin_ga = np.sqrt(1 - cos_be**2), np.sqrt(1 - cos_ga**2)
    c = np.linalg.norm(lat[2])
    cos_alpha = lat[1] @ lat[2] / (np.linalg.norm(lat[1]) * c)
    return np.array(
        [
            [ast, bst * cos_ga, cst * cos_be],
            [0.0, bst * sin_ga, -cst * sin_be * cos_alpha],
            [0.0, 0.0, 1.0 / c],
        ]
    )
