"""A run's set-up from its pl72 ``nexus_structure`` (the JSON kafka-to-nexus writes from).

Pure JSON -> numpy: no transport. :func:`read_nexus_setup` walks the tree (groups with
``children`` and an ``NX_class`` attribute; ``dataset`` modules with ``config`` ``name``,
``values`` and ``type`` or ``dtype``; stream modules ``ev44``/``f144``... with ``config``
``topic`` and ``source``) and returns what a spectrometer fold needs as a
:class:`NexusSetup`:

* pixels: every NXdetector's ``detector_number`` and ``x/y/z_pixel_offset`` (z may be
  absent: 0), placed in the lab by the detector's ``depends_on`` chain of
  NXtransformations (``translation``/``rotation``, ``vector``, ``offset``, ``units`` m, mm,
  cm, deg, rad; the chain ends at ``.``; a detector without ``depends_on`` sits at the
  origin); ``solid_angle`` (sr) when given;
* L1: the NXmoderator's (else NXsource's) ``distance`` (m, negative upstream), else the
  length of its ``depends_on`` position;
* Ei: NXfermi_chopper, NXmonochromator ``energy`` or NXbeam ``incident_energy`` (meV, eV);
  the Fermi chopper's ``rotation_speed`` (Hz) for the resolution;
* the sample (NXsample): the project's ``steer_material``, else a shipped material whose
  formula and space group match ``chemical_formula`` and ``space_group``; the lattice from
  ``unit_cell_abc`` + ``unit_cell_alphabetagamma`` (or ``unit_cell``, or
  ``lattice_a``...); ``ub_matrix`` (Busing-Levy, 1/Angstrom without 2 pi);
  ``temperature`` (K);
* the goniometer: the rotation in the sample's ``depends_on`` chain whose value is an f144
  stream (its topic and source are how the consumer learns which stream drives the
  angle); its set-point is an f144 NXlog named ``<rotation>_setpoint`` under NXsample;
* the sample's kind: a **powder** when ``physical_form`` says powder (or polycrystalline),
  else a single crystal; a powder needs neither UB nor goniometer (it is folded into
  S(|Q|, E));
* streams: every NXdetector's ev44, every NXmonitor's ev44, and the NXlog
  ``proton_charge`` (f144).

Everything missing for a fold is collected and refused at once with
:class:`~consumers.exceptions.NexusStructureError`; the mapping is documented in
``docs/nexus_structure.md``.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from consumers.exceptions import NexusStructureError
from consumers.wire import loads_json
from simulations.instrument.spectrometer import Instrument, Orientation, busing_levy_b
from simulations.lattice.crystals import SHIPPED_MATERIALS, Crystal
from simulations.runs.nexus_structure import reduced_formula

__all__ = ["GoniometerAxis", "NexusSetup", "StreamRef", "read_nexus_setup"]

logger = logging.getLogger(__name__)

_LENGTH = {"m": 1.0, "metre": 1.0, "meter": 1.0, "cm": 1e-2, "mm": 1e-3, "um": 1e-6}
_ANGLE = {
    "deg": 1.0,
    "degree": 1.0,
    "degrees": 1.0,
    "rad": float(np.degrees(1.0)),
    "radian": float(np.degrees(1.0)),
    "radians": float(np.degrees(1.0)),
}
_ENERGY = {"mev": 1.0, "ev": 1e3}


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamRef:
    """One stream the file writer would record.

    Attributes
    ----------
    module
        Schema: ``"ev44"``, ``"f144"``...
    topic, source
        Kafka topic and source name.
    path
        The NeXus group it is written into, e.g. ``/entry/instrument/detector/events``.
    """

    module: str
    topic: str
    source: str
    path: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GoniometerAxis:
    """The sample rotation driven by a stream.

    Attributes
    ----------
    vector
        (3,) float, unit axis in the lab frame (right-handed rotation by the value).
    units
        Units of the streamed angle (``deg`` or ``rad``).
    stream
        Its f144 stream.
    setpoint
        The set-point's f144 stream, when the structure has one.
    """

    vector: tuple[float, float, float]
    units: str
    stream: StreamRef
    setpoint: StreamRef | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class NexusSetup:
    """A spectrometer run's set-up as read from its ``nexus_structure``.

    Attributes
    ----------
    instrument_name
        NXinstrument ``name`` (``"ARCS"``...); also the resolution model's name.
    pixel_ids
        (n_pix,) int32, ``detector_number`` of every NXdetector, in document order.
    positions
        (n_pix, 3) float, m, sample-to-pixel vectors in the lab frame.
    solid_angles
        (n_pix,) float, sr, or None when no detector gives ``solid_angle``.
    l1
        Moderator-to-sample distance, m.
    chopper_frequency
        Fermi chopper ``rotation_speed``, Hz, or None.
    ei
        Incident energy, meV.
    material
        The shipped material whose set-up the fold uses (``steer_material`` or matched).
    sample_name, chemical_formula, space_group
        As given (empty when absent).
    lattice_abc, lattice_angles
        (3,) float, Angstrom, and (3,) float, degrees: the conventional cell.
    ub
        (3, 3) float, 1/Angstrom without 2 pi: ``Q_sample = 2 pi UB h`` at angle 0; None
        for a powder.
    temperature
        Sample temperature, K, or None.
    goniometer
        The rotation and its stream; None for a powder.
    sample_kind
        ``"single_crystal"`` or ``"powder"`` (the NXsample's ``physical_form`` says powder
        or polycrystalline).
    detectors, monitors
        ev44 streams of the NXdetector and NXmonitor groups.
    proton_charge
        The ``proton_charge`` f144 stream, or None.
    logs
        Every f144 stream, by its NXlog path.
    """

    instrument_name: str
    pixel_ids: NDArray[np.int32]
    positions: NDArray[np.float64]
    solid_angles: NDArray[np.float64] | None
    l1: float
    chopper_frequency: float | None
    ei: float
    material: str
    sample_name: str
    chemical_formula: str
    space_group: str
    lattice_abc: NDArray[np.float64]
    lattice_angles: NDArray[np.float64]
    ub: NDArray[np.float64] | None
    temperature: float | None
    goniometer: GoniometerAxis | None
    detectors: tuple[StreamRef, ...]
    monitors: tuple[StreamRef, ...] = ()
    proton_charge: StreamRef | None = None
    logs: dict[str, StreamRef] = field(default_factory=dict)
    sample_kind: str = "single_crystal"

    def instrument(self) -> Instrument:
        """The spectrometer of these pixels (no regular layout; solid angles estimated from
        the nearest neighbour when the structure has none, as for a pixel table)."""
        pos = self.positions
        solid = self.solid_angles
        if solid is None:
            from scipy.spatial import cKDTree

            d, _ = cKDTree(pos).query(pos, k=2)
            solid = d[:, 1] ** 2 / np.linalg.norm(pos, axis=1) ** 2
        kw = {} if self.chopper_frequency is None else {"chopper_frequency": self.chopper_frequency}
        return Instrument(
            name=self.instrument_name,
            l1=self.l1,
            pixel_ids=self.pixel_ids,
            positions=pos,
            solid_angles=np.asarray(solid, dtype=np.float64),
            **kw,  # type: ignore[arg-type]
        )

    def orientation(self, crystal: Crystal) -> Orientation:
        """The mounting of ``crystal`` with this UB; ``u``, ``v`` are the hkl along the beam
        and along +x at angle 0, scaled to a largest component of 1.

        Raises
        ------
        NexusStructureError
            When the UB is not a rotation of ``crystal``'s B matrix (1e-6 relative), or
            the sample is a powder (it has none).
        """
        if self.ub is None:
            raise NexusStructureError(f"the {self.sample_kind} sample has no UB matrix")
        b = busing_levy_b(crystal.conventional_lattice)
        u_matrix = self.ub @ np.linalg.inv(b)
        if not np.allclose(u_matrix @ u_matrix.T, np.eye(3), atol=1e-6):
            raise NexusStructureError(
                f"ub_matrix of the sample is not a rotation of {self.material}'s B matrix "
                "(Busing-Levy, 1/Angstrom without 2 pi): give the UB of the shipped "
                "material's conventional cell"
            )
        inv = np.linalg.inv(self.ub)
        u, v = inv @ np.array([0.0, 0.0, 1.0]), inv @ np.array([1.0, 0.0, 0.0])
        return Orientation(
            crystal=crystal,
            u=tuple(float(x) + 0.0 for x in np.round(u / np.abs(u).max(), 12)),  # type: ignore[arg-type]
            v=tuple(float(x) + 0.0 for x in np.round(v / np.abs(v).max(), 12)),  # type: ignore[arg-type]
            ub=np.array(self.ub, dtype=np.float64),
        )

    def summary(self) -> dict[str, object]:
        """JSON-ready run-start facts (the consumer's metadata when the pl72 has none)."""
        return {
            "material": self.material,
            "ei_meV": self.ei,
            **({"temperature_K": self.temperature} if self.temperature is not None else {}),
            "instrument_name": self.instrument_name,
            "n_pixels": len(self.pixel_ids),
            "sample_kind": self.sample_kind,
            **(
                {}
                if self.goniometer is None
                else {
                    "goniometer": {
                        "source_name": self.goniometer.stream.source,
                        "topic": self.goniometer.stream.topic,
                        "axis": list(self.goniometer.vector),
                        "units": self.goniometer.units,
                    }
                }
            ),
        }


# -- the tree -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Node:
    """A group, a dataset or a stream module at ``path``."""

    path: str
    kind: str  # "group", "dataset" or a module name
    nx_class: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)
    values: Any = None
    config: dict[str, Any] = field(default_factory=dict)
    children: list[_Node] = field(default_factory=list)

    def child(self, name: str) -> _Node | None:
        for c in self.children:
            if posixpath.basename(c.path) == name:
                return c
        return None

    def streams(self) -> Iterator[_Node]:
        return (c for c in self.children if c.kind not in ("group", "dataset", "link"))


def _attributes(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return dict(raw)
    out: dict[str, Any] = {}
    for a in raw or ():
        if isinstance(a, dict) and "name" in a:
            out[str(a["name"])] = a.get("values")
    return out


def _build(raw: Any, parent: str, index: dict[str, _Node]) -> _Node | None:
    if not isinstance(raw, dict):
        return None  # a placeholder string such as "$USERS$"
    attrs = _attributes(raw.get("attributes"))
    if "module" in raw:
        config = raw.get("config") or {}
        if not isinstance(config, dict):
            return None
        module = str(raw["module"])
        if module == "dataset":
            name = str(config.get("name", ""))
            node = _Node(posixpath.join(parent, name), "dataset", attrs=attrs)
            node.values = config.get("values")
        else:
            node = _Node(parent, module, attrs=attrs, config=dict(config))
            return node
    elif raw.get("type") == "dataset":  # the older form: a dataset without a module
        node = _Node(posixpath.join(parent, str(raw.get("name", ""))), "dataset", attrs=attrs)
        node.values = raw.get("values")
    else:
        group_name = raw.get("name")
        path = posixpath.join(parent, str(group_name)) if group_name else parent
        node = _Node(path, "group", nx_class=str(attrs.get("NX_class", "")), attrs=attrs)
        for c in raw.get("children") or ():
            built = _build(c, path, index)
            if built is not None:
                node.children.append(built)
    index.setdefault(node.path, node)
    return node


def _walk(node: _Node) -> Iterator[_Node]:
    yield node
    for c in node.children:
        yield from _walk(c)


def _groups(root: _Node, nx_class: str) -> list[_Node]:
    return [n for n in _walk(root) if n.kind == "group" and n.nx_class == nx_class]


def _text(node: _Node | None) -> str:
    if node is None or node.values is None:
        return ""
    return str(node.values[0] if isinstance(node.values, list) and node.values else node.values)


def _numbers(node: _Node, what: str) -> NDArray[np.float64]:
    try:
        out = np.asarray(node.values, dtype=np.float64)
    except (TypeError, ValueError):
        raise NexusStructureError(
            f"{what} {node.path} is not numeric ({str(node.values)[:40]!r}): give numbers"
        ) from None
    if not np.all(np.isfinite(out)):
        raise NexusStructureError(f"{what} {node.path} has non-finite values: give finite ones")
    return out


def _scale(units: Any, table: dict[str, float], what: str, default: str) -> float:
    key = str(units if units is not None else default).strip()
    for k in (key, key.lower()):
        if k in table:
            return table[k]
    raise NexusStructureError(f"{what} has units {units!r}; use one of {sorted(set(table))}")


# -- depends_on chains ----------------------------------------------------------------------


def _resolve(base: str, ref: str) -> str:
    return posixpath.normpath(ref if ref.startswith("/") else posixpath.join(base, ref))


def _vector(value: Any, what: str) -> NDArray[np.float64]:
    try:
        v = np.asarray(value, dtype=np.float64).reshape(3)
    except (TypeError, ValueError):
        raise NexusStructureError(f"{what} must be three numbers, got {value!r}") from None
    if not np.all(np.isfinite(v)) or not np.linalg.norm(v) > 0:
        raise NexusStructureError(f"{what} must be a finite non-zero vector, got {value!r}")
    return v


def _rotation(axis: NDArray[np.float64], degrees: float) -> NDArray[np.float64]:
    """(3, 3) right-handed rotation by ``degrees`` about ``axis`` (Rodrigues)."""
    k = axis / np.linalg.norm(axis)
    w = np.deg2rad(degrees)
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + np.sin(w) * kx + (1 - np.cos(w)) * (kx @ kx)


def _chain(index: dict[str, _Node], start: str | None, base: str, *, of: str) -> list[_Node]:
    """The transformations of a ``depends_on`` chain, the object's own first.

    Raises
    ------
    NexusStructureError
        For a reference to nothing, a node that is no transformation, or a cycle.
    """
    out: list[_Node] = []
    seen: set[str] = set()
    ref = start
    while ref not in (None, "", "."):
        path = _resolve(base, str(ref))
        if path in seen:
            raise NexusStructureError(
                f"the depends_on chain of {of} loops back to {path}: end it at '.'"
            )
        seen.add(path)
        node = index.get(path)
        if node is None or "transformation_type" not in node.attrs:
            raise NexusStructureError(
                f"the depends_on chain of {of} names {path}, which is "
                + ("not in the structure" if node is None else "no transformation")
                + ": point it at an NXtransformations entry, or end it at '.'"
            )
        out.append(node)
        base = posixpath.dirname(path)
        ref = node.attrs.get("depends_on")
    return out


def _place(chain: list[_Node], points: NDArray[np.float64], *, of: str) -> NDArray[np.float64]:
    """Lab positions (n, 3) of ``points`` given in the frame of the chain's first item:
    each transformation (its own first) is applied in turn, ``p -> offset + T p``."""
    p = np.array(points, dtype=np.float64)
    for t in chain:
        kind = str(t.attrs["transformation_type"])
        if t.kind != "dataset":
            raise NexusStructureError(
                f"{t.path} in the depends_on chain of {of} is driven by a stream, so its "
                "value is unknown at run start: give a static value for a detector"
            )
        value = float(_numbers(t, "transformation").reshape(-1)[0])
        vector = _vector(t.attrs.get("vector"), f"vector of {t.path}")
        if kind == "translation":
            scale = _scale(t.attrs.get("units"), _LENGTH, f"translation {t.path}", "m")
            if value != 0.0:
                p = p + (value * scale) * (vector / np.linalg.norm(vector))
        elif kind == "rotation":
            scale = _scale(t.attrs.get("units"), _ANGLE, f"rotation {t.path}", "deg")
            if value != 0.0:
                p = p @ _rotation(vector, value * scale).T
        else:
            raise NexusStructureError(
                f"{t.path} has transformation_type {kind!r}: use 'translation' or 'rotation'"
            )
        if t.attrs.get("offset") is not None:
            off = np.asarray(t.attrs["offset"], dtype=np.float64).reshape(3)
            scale = _scale(t.attrs.get("offset_units", "m"), _LENGTH, f"offset of {t.path}", "m")
            p = p + off * scale
    return p


# -- the parts ------------------------------------------------------------------------------


def _stream_ref(node: _Node, module: str) -> StreamRef | None:
    for s in node.streams():
        if s.kind == module and "topic" in s.config and "source" in s.config:
            return StreamRef(
                module=module,
                topic=str(s.config["topic"]),
                source=str(s.config["source"]),
                path=node.path,
            )
    return None


def _pixels(
    root: _Node, index: dict[str, _Node], missing: list[str]
) -> tuple[NDArray[np.int32], NDArray[np.float64], NDArray[np.float64] | None, list[StreamRef]]:
    ids: list[NDArray[np.int64]] = []
    positions: list[NDArray[np.float64]] = []
    solids: list[NDArray[np.float64] | None] = []
    streams: list[StreamRef] = []
    detectors = _groups(root, "NXdetector")
    if not detectors:
        missing.append("no NXdetector")
    for det in detectors:
        for ev in [*_groups(det, "NXevent_data"), det]:
            ref = _stream_ref(ev, "ev44")
            if ref is not None:
                streams.append(ref)
        number = det.child("detector_number")
        offsets = [det.child(f"{a}_pixel_offset") for a in "xyz"]
        absent = [f"{a}_pixel_offset" for a, o in zip("xy", offsets[:2], strict=True) if o is None]
        if number is None or absent:
            lack = (["detector_number"] if number is None else []) + absent
            missing.append(f"NXdetector {det.path} has no {' and no '.join(lack)}")
            continue
        n = np.ravel(_numbers(number, "detector_number"))
        if not np.all(n == np.round(n)):
            raise NexusStructureError(f"detector_number {number.path} holds non-integers")
        xyz = []
        for a, o in zip("xyz", offsets, strict=True):
            if o is None:
                xyz.append(np.zeros(len(n)))
                continue
            values = np.ravel(_numbers(o, f"{a}_pixel_offset"))
            scale = _scale(o.attrs.get("units"), _LENGTH, f"{a}_pixel_offset {o.path}", "m")
            if len(values) != len(n):
                missing.append(
                    f"{o.path} has {len(values)} values for {len(n)} detector_number values "
                    "(one offset per pixel is needed)"
                )
                break
            xyz.append(values * scale if scale != 1.0 else values)
        else:
            local = np.stack(xyz, axis=-1)
            depends = det.child("depends_on")
            chain = _chain(index, _text(depends) or None, det.path, of=det.path)
            ids.append(n.astype(np.int64))
            positions.append(_place(chain, local, of=det.path))
            solid = det.child("solid_angle")
            solids.append(None if solid is None else np.ravel(_numbers(solid, "solid_angle")))
    if not ids:
        return np.zeros(0, np.int32), np.zeros((0, 3)), None, streams
    all_ids = np.concatenate(ids)
    if len(np.unique(all_ids)) != len(all_ids):
        raise NexusStructureError(
            "detector_number repeats ids across detectors: ids must be unique"
        )
    if np.abs(all_ids).max() >= 2**31:
        raise NexusStructureError("detector_number beyond int32: ev44 pixel ids are int32")
    pos = np.concatenate(positions)
    if np.any(np.linalg.norm(pos, axis=1) <= 0):
        raise NexusStructureError("a pixel sits at the sample position: check the offsets")
    solid_all = None
    if all(s is not None for s in solids):
        solid_all = np.concatenate([s for s in solids if s is not None])
        if len(solid_all) != len(all_ids):
            raise NexusStructureError("solid_angle needs one value per detector_number")
    return all_ids.astype(np.int32), pos, solid_all, streams


def _l1(root: _Node, index: dict[str, _Node]) -> float | None:
    for cls in ("NXmoderator", "NXsource"):
        for g in _groups(root, cls):
            d = g.child("distance")
            if d is not None:
                scale = _scale(d.attrs.get("units"), _LENGTH, f"distance {d.path}", "m")
                return abs(float(_numbers(d, "distance").reshape(-1)[0])) * scale
            dep = g.child("depends_on")
            if dep is not None:
                p = _place(
                    _chain(index, _text(dep), g.path, of=g.path), np.zeros((1, 3)), of=g.path
                )
                return float(np.linalg.norm(p))
    return None


def _ei(root: _Node) -> tuple[float | None, float | None]:
    """(Ei in meV, Fermi chopper frequency in Hz), either None when absent."""
    ei = freq = None
    for cls, name in (
        ("NXfermi_chopper", "energy"),
        ("NXmonochromator", "energy"),
        ("NXbeam", "incident_energy"),
    ):
        for g in _groups(root, cls):
            node = g.child(name)
            if node is not None and node.kind == "dataset" and ei is None:
                scale = _scale(node.attrs.get("units"), _ENERGY, f"{node.path}", "meV")
                ei = float(_numbers(node, "energy").reshape(-1)[0]) * scale
            speed = g.child("rotation_speed") if cls == "NXfermi_chopper" else None
            if speed is not None and speed.kind == "dataset" and freq is None:
                freq = float(_numbers(speed, "rotation_speed").reshape(-1)[0])
    return ei, freq


def _lattice(sample: _Node) -> tuple[NDArray[np.float64], NDArray[np.float64]] | None:
    abc, angles = sample.child("unit_cell_abc"), sample.child("unit_cell_alphabetagamma")
    if abc is not None and angles is not None:
        return _numbers(abc, "unit_cell_abc").reshape(3), _numbers(angles, "unit cell").reshape(3)
    cell = sample.child("unit_cell")
    if cell is not None:
        values = _numbers(cell, "unit_cell").reshape(-1)
        if len(values) == 6:
            return values[:3], values[3:]
    names = (
        "lattice_a",
        "lattice_b",
        "lattice_c",
        "lattice_alpha",
        "lattice_beta",
        "lattice_gamma",
    )
    nodes = [sample.child(n) for n in names]
    if all(n is not None for n in nodes):
        v = [float(_numbers(n, "lattice").reshape(-1)[0]) for n in nodes if n is not None]
        return np.array(v[:3]), np.array(v[3:])
    return None


def _match_material(formula: str, space_group: str) -> str | None:
    """The shipped material with this reduced formula and space group (symbol or number)."""
    from simulations.lattice.crystals import load_crystal

    if not formula or not space_group:
        return None
    for name in SHIPPED_MATERIALS:
        c = load_crystal(name)
        if reduced_formula(c.species) == formula.replace(" ", "") and space_group.replace(
            " ", ""
        ) in (
            c.spacegroup.replace(" ", ""),
            str(c.spacegroup_number),
        ):
            return name
    return None


def _sample_kind(sample: _Node) -> str:
    """``"powder"`` for an NXsample whose ``physical_form`` says powder or polycrystalline,
    else ``"single_crystal"`` (a sample that says nothing is taken as a single crystal, so
    that one whose UB was left out is refused rather than folded as a powder)."""
    form = _text(sample.child("physical_form")).lower()
    return "powder" if "powder" in form or "polycrystal" in form else "single_crystal"


def _goniometer(
    sample: _Node, index: dict[str, _Node], missing: list[str]
) -> GoniometerAxis | None:
    dep = sample.child("depends_on")
    chain = _chain(index, _text(dep) or None, sample.path, of=sample.path)
    driven = [t for t in chain if t.kind == "group" and _stream_ref(t, "f144") is not None]
    rotations = [t for t in driven if t.attrs.get("transformation_type") == "rotation"]
    if len(rotations) != 1:
        missing.append(
            "no rotation of the sample driven by an f144 stream (the sample's depends_on chain "
            "needs one NXlog rotation with an f144 module)"
            if not rotations
            else f"{len(rotations)} streamed rotations of the sample; the fold needs one"
        )
        return None
    rot = rotations[0]
    vector = _vector(rot.attrs.get("vector"), f"vector of {rot.path}")
    vector = vector / np.linalg.norm(vector)
    units = str(rot.attrs.get("units", "deg"))
    _scale(units, _ANGLE, f"rotation {rot.path}", "deg")
    if not np.allclose(vector, [0.0, 1.0, 0.0], atol=1e-9):
        raise NexusStructureError(
            f"the goniometer {rot.path} turns about {vector.tolist()}; the fold turns the "
            "sample about +y (vertical, up): describe the rotation about [0, 1, 0]"
        )
    if len(driven) > 1:
        logger.warning(
            "sample chain has %d streamed transformations; only %s is followed",
            len(driven),
            rot.path,
        )
    stream = _stream_ref(rot, "f144")
    assert stream is not None
    setpoint = None
    name = posixpath.basename(rot.path) + "_setpoint"
    for n in _walk(sample):
        if n.kind == "group" and posixpath.basename(n.path) == name:
            setpoint = _stream_ref(n, "f144")
    return GoniometerAxis(
        vector=(float(vector[0]), float(vector[1]), float(vector[2])),
        units=units,
        stream=stream,
        setpoint=setpoint,
    )


def read_nexus_setup(structure: str | bytes | dict[str, Any]) -> NexusSetup:
    """Read a spectrometer run's set-up from a pl72 ``nexus_structure``.

    Parameters
    ----------
    structure
        The JSON text, or its parsed form.

    Returns
    -------
    NexusSetup
        Pixels, L1, Ei, sample, goniometer and streams (see the module docstring).

    Raises
    ------
    NexusStructureError
        For text that is not JSON, for malformed pieces (a broken or looping
        ``depends_on`` chain, non-numeric values, unknown units), and for a structure that
        lacks anything a spectrometer fold needs: the message lists every missing piece.
    """
    if isinstance(structure, (str, bytes)):
        try:  # from the wire: nesting bounded before the C parser recurses
            structure = loads_json(structure)
        except ValueError as exc:
            raise NexusStructureError(f"nexus_structure is not JSON: {exc}") from exc
    if not isinstance(structure, dict):
        raise NexusStructureError("nexus_structure must be a JSON object with 'children'")
    index: dict[str, _Node] = {}
    root = _build(structure, "/", index)
    assert root is not None
    missing: list[str] = []
    ids, positions, solid, detectors = _pixels(root, index, missing)
    if not detectors:
        missing.append("no ev44 stream in any NXdetector")
    l1 = _l1(root, index)
    if l1 is None or not l1 > 0:
        missing.append("no L1 (NXmoderator or NXsource 'distance')")
    ei, freq = _ei(root)
    if ei is None or not ei > 0:
        missing.append("no Ei (NXfermi_chopper or NXmonochromator 'energy', meV)")
    samples = _groups(root, "NXsample")
    sample = samples[0] if samples else None
    material = lattice = ub = gonio = temperature = None
    kind = "single_crystal"
    if sample is None:
        missing.append("no NXsample")
    else:
        lattice = _lattice(sample)
        if lattice is None:
            missing.append(
                f"no lattice in {sample.path} (unit_cell_abc and unit_cell_alphabetagamma)"
            )
        ub_node = sample.child("ub_matrix")
        kind = _sample_kind(sample)
        if ub_node is None and kind == "single_crystal":
            missing.append(
                f"no ub_matrix in {sample.path} (for a powder sample, say so: "
                "physical_form = 'powder')"
            )
        elif ub_node is not None:
            ub = _numbers(ub_node, "ub_matrix")
            if ub.shape != (3, 3) or abs(np.linalg.det(ub)) < 1e-12:
                raise NexusStructureError(f"ub_matrix {ub_node.path} must be an invertible 3x3")
        formula = _text(sample.child("chemical_formula"))
        space_group = _text(sample.child("space_group"))
        material = _text(sample.child("steer_material")) or _match_material(formula, space_group)
        if not material:
            missing.append(
                f"no material: {sample.path} has no steer_material and its chemical_formula "
                f"{formula!r} / space_group {space_group!r} match no shipped material "
                f"({', '.join(SHIPPED_MATERIALS)})"
            )
        t = sample.child("temperature")
        if t is not None and t.kind == "dataset":
            temperature = float(_numbers(t, "temperature").reshape(-1)[0])
        if kind == "single_crystal":
            gonio = _goniometer(sample, index, missing)
    if missing:
        raise NexusStructureError(
            "nexus_structure gives no spectrometer set-up: "
            + "; ".join(missing)
            + " (see docs/nexus_structure.md for the fields the fold reads)"
        )
    assert sample is not None
    assert lattice is not None
    assert kind == "powder" or (ub is not None and gonio is not None)
    assert l1 is not None
    assert ei is not None
    assert material
    name = _text(next((g.child("name") for g in _groups(root, "NXinstrument")), None))
    logs = {
        n.path: ref
        for n in _walk(root)
        if n.kind == "group" and (ref := _stream_ref(n, "f144")) is not None
    }
    charge = next((r for p, r in logs.items() if posixpath.basename(p) == "proton_charge"), None)
    monitors = [
        ref
        for m in _groups(root, "NXmonitor")
        for g in [m, *_groups(m, "NXevent_data")]
        if (ref := _stream_ref(g, "ev44")) is not None
    ]
    return NexusSetup(
        instrument_name=name or "unknown",
        pixel_ids=ids,
        positions=positions,
        solid_angles=solid,
        l1=float(l1),
        chopper_frequency=freq,
        ei=float(ei),
        material=material,
        sample_name=_text(sample.child("name")),
        chemical_formula=_text(sample.child("chemical_formula")),
        space_group=_text(sample.child("space_group")),
        lattice_abc=lattice[0],
        lattice_angles=lattice[1],
        ub=ub,
        temperature=temperature,
        goniometer=gonio,
        detectors=tuple(detectors),
        monitors=tuple(monitors),
        proton_charge=charge,
        logs=logs,
        sample_kind=kind,
    )
