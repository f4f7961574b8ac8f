"""A reader of Mantid instrument definition files (IDF XML), without Mantid.

Enough of the format for direct-geometry spectrometers built of tubes (SNS ARCS and
SEQUOIA): ``<component type=...>`` trees of ``<type>`` definitions placed by ``<location>``
(``x y z`` or spherical ``r t p``, a ``rot`` attribute about ``axis-x/y/z``, nested
``<rot>`` and ``<trans>`` elements), ``<locations n=...>`` ranges, ``<idlist>`` detector
ids (``<id start end step>`` and ``<id val>``), detector and monitor types with a
``<cylinder>`` shape, and the source and sample positions.

Conventions are Mantid's (``Geometry::Component``): a child is placed in its parent's
frame, ``world = t_parent + R_parent @ local``; rotations compose in the component's own
frame (``R = R_1 @ R_2 @ ...`` for a ``rot`` attribute followed by nested ``<rot>``
elements, as ``Component::rotate`` does ``m_rot = m_rot * r``); a ``<trans>`` moves along
the axes already rotated. Spherical ``r t p``: ``x = r sin t cos p``, ``y = r sin t sin p``,
``z = r cos t`` (degrees). Detector ids go to the detectors under a component with an
``idlist``, in the depth-first order of the file (Mantid's order).

What is not read: ``<facing>`` (logged and ignored), rectangular and structured detectors
(``idstart``, ``idfillbyfirst``), ``<parameter>`` and ``<component-link>`` (nothing
geometric on these instruments), shapes other than ``<cylinder>`` for detectors.

**Pixel solid angle** (an approximation, stated): a pixel is a cylinder of radius ``r``
and height ``h`` along the tube axis ``a``; seen from the sample along the unit direction
``d`` its silhouette is ``2 r h sin(alpha)`` (plus the end caps' ``pi r^2 |cos alpha|``,
left out: a tube pixel is seen side-on), with ``sin(alpha) = |d x a|`` the cosine of the
angle between ``d`` and the tube's normal in the plane of ``d`` and ``a``. So
``Omega = 2 r h |d x a| / L2^2`` (sr), good to a few per cent where ``L2 >> h, r``; the
shadowing of one tube by its neighbours is ignored.

Derived geometries (numbers only, never the definition's text) are kept in memory and in
``instruments/`` under :func:`simulations.cache.cache_root`, keyed by the file's SHA-256,
so a second load of the same file, or of a run that names it, is fast.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NoReturn

import numpy as np
from numpy.typing import NDArray

from simulations.cache import cache_root
from simulations.exceptions import InstrumentError

__all__ = ["IdfGeometry", "idf_cache_dir", "load_cached", "read_idf"]

logger = logging.getLogger(__name__)

#: Version of the derived geometry (bump when the reader's results change: old caches are
#: then ignored).
READER_VERSION = 1

_LOCK = threading.Lock()
_MEMORY: dict[str, IdfGeometry] = {}


@dataclass(frozen=True, slots=True, kw_only=True)
class IdfGeometry:
    """The numbers an instrument definition gives a spectrometer model.

    Attributes
    ----------
    name
        The instrument's name (the ``<instrument name=...>`` attribute).
    sha256
        SHA-256 of the definition file's bytes.
    source_position, sample_position
        (3,) float, m, moderator and sample in the file's frame.
    pixel_ids
        (n_pix,) int32, detector ids in the file's depth-first order.
    positions
        (n_pix, 3) float, m, sample-to-pixel vectors.
    tube_axes
        (n_pix, 3) float, unit vectors along each pixel's cylinder axis.
    solid_angles
        (n_pix,) float, sr (see the module docstring for the approximation).
    pixels_per_tube
        Pixels of every tube when all tubes have the same number and their pixels are
        consecutive (ARCS, SEQUOIA: 128); 0 otherwise.
    monitor_ids
        (n_mon,) int32.
    monitor_positions
        (n_mon, 3) float, m, sample-to-monitor vectors.
    """

    name: str
    sha256: str
    source_position: NDArray[np.float64]
    sample_position: NDArray[np.float64]
    pixel_ids: NDArray[np.int32]
    positions: NDArray[np.float64]
    tube_axes: NDArray[np.float64]
    solid_angles: NDArray[np.float64]
    pixels_per_tube: int
    monitor_ids: NDArray[np.int32]
    monitor_positions: NDArray[np.float64]

    @property
    def l1(self) -> float:
        """Moderator-to-sample distance, m."""
        return float(np.linalg.norm(self.sample_position - self.source_position))

    @property
    def n_tubes(self) -> int:
        """Number of tubes (0 when the tubes are not uniform)."""
        return len(self.pixel_ids) // self.pixels_per_tube if self.pixels_per_tube else 0


# -- the parsed tree ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Leaves:
    """Detectors and monitors of one type in its own frame (m rows)."""

    pos: NDArray[np.float64]  # (m, 3)
    axis: NDArray[np.float64]  # (m, 3)
    area: NDArray[np.float64]  # (m,) 2 r h, m^2
    monitor: NDArray[np.bool_]  # (m,)
    ids: NDArray[np.int64]  # (m,) detector id, or _NO_ID
    tube: NDArray[np.int64]  # (m,) index of the leaf's parent instance
    n_tubes: int

    @staticmethod
    def empty() -> _Leaves:
        return _Leaves(
            np.zeros((0, 3)),
            np.zeros((0, 3)),
            np.zeros(0),
            np.zeros(0, bool),
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            0,
        )


_NO_ID = np.iinfo(np.int64).min


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _axis_rotation(angle_deg: float, axis: NDArray[np.float64]) -> NDArray[np.float64]:
    """(3, 3) right-handed rotation by ``angle_deg`` about ``axis`` (Rodrigues)."""
    n = float(np.linalg.norm(axis))
    if n == 0:
        raise InstrumentError("a rotation about a zero axis; give axis-x/axis-y/axis-z")
    k = axis / n
    a = np.deg2rad(angle_deg)
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + np.sin(a) * kx + (1.0 - np.cos(a)) * (kx @ kx)


class _Parser:
    def __init__(self, root: ET.Element, source: str) -> None:
        self.source = source
        self.angle = 1.0
        for el in root.iter():
            el.tag = _local(el.tag)
        for el in root.iter("angle"):
            unit = el.get("unit", "degree").lower()
            if unit.startswith("rad"):
                self.angle = float(np.rad2deg(1.0))
            elif not unit.startswith("deg"):
                self._fail(f"unknown angle unit {unit!r}", "use degree or radian")
        for el in root.iter("length"):
            if el.get("unit", "metre").lower() not in ("metre", "meter", "m"):
                self._fail(f"length unit {el.get('unit')!r}", "only metres are read")
        self.types: dict[str, ET.Element] = {}
        for t in root.findall("type"):
            name = t.get("name")
            if not name:
                self._fail("a <type> without a name", "give every <type> a name attribute")
            self.types[name] = t
        self.idlists: dict[str, NDArray[np.int64]] = {
            str(el.get("idname")): self._ids(el) for el in root.findall("idlist")
        }
        self._memo: dict[str, _Leaves] = {}
        self._busy: set[str] = set()
        if any(True for _ in root.iter("facing")):
            logger.warning("%s: <facing> elements are ignored", source)

    def _fail(self, what: str, fix: str) -> NoReturn:
        raise InstrumentError(f"instrument definition {self.source}: {what}; {fix}")

    def _float(self, el: ET.Element, key: str, default: float = 0.0) -> float:
        raw = el.get(key)
        if raw is None:
            return default
        try:
            return float(raw)
        except ValueError:
            self._fail(f"<{el.tag} {key}={raw!r}> is not a number", "fix the attribute")

    def _ids(self, el: ET.Element) -> NDArray[np.int64]:
        out: list[NDArray[np.int64]] = []
        for i in el.findall("id"):
            if i.get("val") is not None:
                out.append(np.array([int(self._float(i, "val"))]))
                continue
            if i.get("start") is None or i.get("end") is None:
                self._fail(
                    f"an <id> of idlist {el.get('idname')!r} has neither val nor start/end",
                    "write <id start=... end=...> or <id val=...>",
                )
            start, end = int(self._float(i, "start")), int(self._float(i, "end"))
            step = int(self._float(i, "step", 1.0))
            if step == 0 or (end - start) * step < 0:
                self._fail(f"<id start={start} end={end} step={step}>", "fix the range")
            out.append(np.arange(start, end + np.sign(step), step, dtype=np.int64))
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    # -- placement ---------------------------------------------------------------------------

    def _position(self, el: ET.Element, values: dict[str, float]) -> NDArray[np.float64]:
        if any(k in values for k in ("r", "t", "p")):
            r = values.get("r", 0.0)
            t = np.deg2rad(values.get("t", 0.0) * self.angle)
            p = np.deg2rad(values.get("p", 0.0) * self.angle)
            return np.array([r * np.sin(t) * np.cos(p), r * np.sin(t) * np.sin(p), r * np.cos(t)])
        return np.array([values.get("x", 0.0), values.get("y", 0.0), values.get("z", 0.0)])

    def _values(self, el: ET.Element) -> dict[str, float]:
        keys = ("x", "y", "z", "r", "t", "p", "rot")
        return {k: self._float(el, k) for k in keys if el.get(k) is not None}

    def _axis(self, el: ET.Element) -> NDArray[np.float64]:
        return np.array(
            [self._float(el, "axis-x"), self._float(el, "axis-y"), self._float(el, "axis-z", 1.0)]
        )

    def _transform(
        self, el: ET.Element, values: dict[str, float]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(R, t) of a ``<location>`` (with ``values`` its numeric attributes)."""
        t = self._position(el, values)
        rot = np.eye(3)
        if "rot" in values:
            rot = rot @ _axis_rotation(values["rot"] * self.angle, self._axis(el))
        node = el
        while True:
            children = [c for c in node if c.tag in ("rot", "trans")]
            if not children:
                break
            if len(children) > 1:
                self._fail(
                    f"<{node.tag}> holds {len(children)} <rot>/<trans> elements",
                    "nest them, one inside the other",
                )
            node = children[0]
            if node.tag == "rot":
                if node.get("val") is None:
                    self._fail("a <rot> without val", "give the angle as val=...")
                rot = rot @ _axis_rotation(self._float(node, "val") * self.angle, self._axis(node))
            else:
                t = t + rot @ self._position(node, self._values(node))
        return rot, t

    def _placements(
        self, comp: ET.Element
    ) -> list[tuple[NDArray[np.float64], NDArray[np.float64]]]:
        out = []
        for loc in comp:
            if loc.tag == "location":
                out.append(self._transform(loc, self._values(loc)))
            elif loc.tag == "locations":
                n = int(self._float(loc, "n", 0.0))
                if n < 1:
                    self._fail("<locations> without n >= 1", "give the number of locations as n")
                start = self._values(loc)
                for i in range(n):
                    vals = dict(start)
                    for k, v in start.items():
                        end = loc.get(f"{k}-end")
                        if end is not None and n > 1:
                            vals[k] = v + i * (float(end) - v) / (n - 1)
                    out.append(self._transform(loc, vals))
        return out

    # -- expansion ---------------------------------------------------------------------------

    def leaves(self, type_name: str) -> _Leaves:
        """The detectors and monitors of ``type_name`` in its own frame (memoised)."""
        hit = self._memo.get(type_name)
        if hit is not None:
            return hit
        el = self.types.get(type_name)
        if el is None:
            self._fail(f"component type {type_name!r} is not defined", "add its <type>")
        if type_name in self._busy:
            self._fail(f"type {type_name!r} contains itself", "break the cycle")
        kind = (el.get("is") or "").lower()
        if kind in ("detector", "monitor"):
            out = self._single(el, type_name, monitor=kind == "monitor")
        else:
            self._busy.add(type_name)
            try:
                out = self._composite(el)
            finally:
                self._busy.discard(type_name)
        self._memo[type_name] = out
        return out

    def _single(self, el: ET.Element, name: str, *, monitor: bool) -> _Leaves:
        cyl = el.find("cylinder")
        if cyl is None:
            if not monitor:
                self._fail(
                    f"detector type {name!r} has no <cylinder> shape",
                    "only cylindrical (tube) pixels are read",
                )
            axis, area = np.array([0.0, 0.0, 1.0]), 0.0
        else:
            ax_el, r_el, h_el = cyl.find("axis"), cyl.find("radius"), cyl.find("height")
            if ax_el is None or r_el is None or h_el is None:
                self._fail(
                    f"the <cylinder> of type {name!r} lacks axis, radius or height",
                    "give all three",
                )
            axis = np.array([self._float(ax_el, k) for k in ("x", "y", "z")])
            if not np.linalg.norm(axis) > 0:
                self._fail(f"the <cylinder> of type {name!r} has a zero axis", "fix <axis>")
            axis = axis / np.linalg.norm(axis)
            area = 2.0 * self._float(r_el, "val") * self._float(h_el, "val")
        return _Leaves(
            np.zeros((1, 3)),
            axis[None, :],
            np.array([area]),
            np.array([monitor]),
            np.array([_NO_ID]),
            np.zeros(1, np.int64),
            1,
        )

    def _is_leaf(self, type_name: str) -> bool:
        el = self.types.get(type_name)
        return el is not None and (el.get("is") or "").lower() in ("detector", "monitor")

    def _composite(self, el: ET.Element) -> _Leaves:
        comps = el.findall("component")
        # detectors placed directly in this type form one tube: instance 0
        n_tubes = int(any(self._is_leaf(str(c.get("type"))) for c in comps))
        parts: list[_Leaves] = []
        for comp in comps:
            name = str(comp.get("type"))
            child = self.leaves(name)
            leaf = self._is_leaf(name)
            start = len(parts)
            for rot, t in self._placements(comp):
                if leaf:
                    tube = np.zeros(len(child.pos), np.int64)
                else:
                    tube = child.tube + n_tubes
                    n_tubes += child.n_tubes
                parts.append(
                    _Leaves(
                        child.pos @ rot.T + t,
                        child.axis @ rot.T,
                        child.area,
                        child.monitor,
                        child.ids,
                        tube,
                        0,
                    )
                )
            if comp.get("idlist") is not None:
                parts[start:] = [self._assign_ids(comp, parts[start:])]
        if not parts:
            return _Leaves.empty()
        return _Leaves(
            np.concatenate([p.pos for p in parts]),
            np.concatenate([p.axis for p in parts]),
            np.concatenate([p.area for p in parts]),
            np.concatenate([p.monitor for p in parts]),
            np.concatenate([p.ids for p in parts]),
            np.concatenate([p.tube for p in parts]),
            n_tubes,
        )

    def _assign_ids(self, comp: ET.Element, parts: list[_Leaves]) -> _Leaves:
        name = str(comp.get("idlist"))
        if name not in self.idlists:
            self._fail(f"idlist {name!r} is not defined", f'add <idlist idname="{name}">')
        joined = _Leaves(
            np.concatenate([p.pos for p in parts]) if parts else np.zeros((0, 3)),
            np.concatenate([p.axis for p in parts]) if parts else np.zeros((0, 3)),
            np.concatenate([p.area for p in parts]) if parts else np.zeros(0),
            np.concatenate([p.monitor for p in parts]) if parts else np.zeros(0, bool),
            np.concatenate([p.ids for p in parts]).copy() if parts else np.zeros(0, np.int64),
            np.concatenate([p.tube for p in parts]) if parts else np.zeros(0, np.int64),
            0,
        )
        free = joined.ids == _NO_ID
        ids = self.idlists[name]
        if int(free.sum()) != len(ids):
            self._fail(
                f"idlist {name!r} has {len(ids)} ids for {int(free.sum())} detectors of "
                f"component {comp.get('type')!r}",
                "make the idlist as long as the number of detectors it names",
            )
        joined.ids[free] = ids
        return joined

    def top(self, root: ET.Element) -> dict[str, object]:
        """Expand the instrument's top-level components."""
        source = sample = None
        parts: list[_Leaves] = []
        n_tubes = 0
        for comp in root.findall("component"):
            name = str(comp.get("type"))
            el = self.types.get(name)
            if el is None:
                self._fail(f"component type {name!r} is not defined", "add its <type>")
            kind = (el.get("is") or "").lower()
            places = self._placements(comp)
            if kind == "source":
                source = places[0][1] if places else np.zeros(3)
                continue
            if kind == "samplepos":
                sample = places[0][1] if places else np.zeros(3)
                continue
            wrapper = ET.Element("type")
            wrapper.append(comp)
            block = self._composite(wrapper)
            parts.append(_shift_tubes(block, n_tubes))
            n_tubes += block.n_tubes
        if source is None or sample is None:
            self._fail(
                "no source or no sample position",
                'define types with is="Source" and is="SamplePos" and place them',
            )
        return {"source": source, "sample": sample, "parts": parts}


def _shift_tubes(p: _Leaves, k: int) -> _Leaves:
    return _Leaves(p.pos, p.axis, p.area, p.monitor, p.ids, p.tube + k, p.n_tubes)


# -- reading, caching --------------------------------------------------------------------------


def read_idf(path: str | Path, *, cache: bool = True) -> IdfGeometry:
    """Read a Mantid instrument definition file.

    Parameters
    ----------
    path
        The IDF ``.xml`` file.
    cache
        Use and fill the memory and disk caches (keyed by the file's SHA-256).

    Raises
    ------
    InstrumentError
        When the file cannot be read, is not XML, or describes something this reader does
        not know (the message names it).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InstrumentError(f"cannot read instrument definition {path}: {e}") from e
    digest = hashlib.sha256(data).hexdigest()
    if cache:
        hit = load_cached(digest)
        if hit is not None:
            return hit
    geom = _parse(data, digest, str(path))
    if cache:
        _remember(geom)
    return geom


def _parse(data: bytes, digest: str, source: str) -> IdfGeometry:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise InstrumentError(
            f"instrument definition {source} is not valid XML ({e}); give a Mantid IDF file"
        ) from e
    if _local(root.tag) != "instrument":
        raise InstrumentError(
            f"{source}: the root element is <{_local(root.tag)}>, not <instrument>; "
            "give a Mantid instrument definition file"
        )
    parser = _Parser(root, source)
    top = parser.top(root)
    parts: list[_Leaves] = top["parts"]  # type: ignore[assignment]
    sample: NDArray[np.float64] = np.asarray(top["sample"], dtype=float)
    source_pos: NDArray[np.float64] = np.asarray(top["source"], dtype=float)
    if not parts or sum(len(p.pos) for p in parts) == 0:
        raise InstrumentError(f"{source}: no detectors found; give an IDF with detectors")
    pos = np.concatenate([p.pos for p in parts]) - sample
    axis = np.concatenate([p.axis for p in parts])
    area = np.concatenate([p.area for p in parts])
    monitor = np.concatenate([p.monitor for p in parts])
    ids = np.concatenate([p.ids for p in parts])
    tube = np.concatenate([p.tube for p in parts])
    pix = ~monitor
    if np.any(ids[pix] == _NO_ID):
        raise InstrumentError(
            f"{source}: {int(np.sum(ids[pix] == _NO_ID))} detectors have no id; put the "
            "components that hold them under a component with an idlist"
        )
    pix_ids = ids[pix]
    if len(np.unique(pix_ids)) != len(pix_ids):
        raise InstrumentError(f"{source}: duplicate detector ids; fix the idlists")
    if np.any(np.abs(pix_ids) > np.iinfo(np.int32).max):
        raise InstrumentError(f"{source}: detector ids beyond int32")
    p, a = pos[pix], axis[pix]
    l2 = np.linalg.norm(p, axis=1)
    if np.any(l2 <= 0):
        raise InstrumentError(f"{source}: a detector sits at the sample position")
    sin_alpha = np.linalg.norm(np.cross(p / l2[:, None], a), axis=1)
    return IdfGeometry(
        name=str(root.get("name", "")),
        sha256=digest,
        source_position=source_pos,
        sample_position=sample,
        pixel_ids=pix_ids.astype(np.int32),
        positions=p,
        tube_axes=a,
        solid_angles=area[pix] * sin_alpha / l2**2,
        pixels_per_tube=_pixels_per_tube(tube[pix]),
        monitor_ids=ids[monitor].astype(np.int32),
        monitor_positions=pos[monitor],
    )


def _pixels_per_tube(tube: NDArray[np.int64]) -> int:
    """The common length of the tubes when each tube's pixels are consecutive, else 0."""
    if len(tube) == 0:
        return 0
    starts = np.flatnonzero(np.r_[True, tube[1:] != tube[:-1]])
    runs = np.diff(np.r_[starts, len(tube)])
    if len(np.unique(tube)) != len(starts) or np.any(runs != runs[0]):
        return 0
    return int(runs[0])


def idf_cache_dir() -> Path:
    """Where derived geometries are kept: ``instruments/`` under the machine's cache root."""
    return cache_root() / "instruments"


def _cache_path(digest: str) -> Path:
    return idf_cache_dir() / f"idf-{digest}-v{READER_VERSION}.npz"


def load_cached(digest: str) -> IdfGeometry | None:
    """The geometry of the definition file with SHA-256 ``digest`` from the memory or disk
    cache; None when neither holds it."""
    with _LOCK:
        hit = _MEMORY.get(digest)
    if hit is not None:
        return hit
    path = _cache_path(digest)
    try:
        with np.load(path, allow_pickle=False) as f:
            kw = {k.name: f[k.name] for k in fields(IdfGeometry)}
    except FileNotFoundError:
        return None
    except Exception as exc:  # a damaged file: read the definition again
        logger.warning("instrument cache %s unreadable (%s): ignored", path, exc)
        return None
    kw["name"], kw["sha256"] = str(kw["name"]), str(kw["sha256"])
    kw["pixels_per_tube"] = int(kw["pixels_per_tube"])
    geom = IdfGeometry(**kw)
    if geom.sha256 != digest:
        logger.warning("instrument cache %s holds another file's geometry: ignored", path)
        return None
    with _LOCK:
        _MEMORY[digest] = geom
    logger.info("instrument geometry loaded from %s", path)
    return geom


def _remember(geom: IdfGeometry) -> None:
    with _LOCK:
        _MEMORY[geom.sha256] = geom
    path = _cache_path(geom.sha256)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp.npz")
        np.savez(tmp, **{k.name: getattr(geom, k.name) for k in fields(IdfGeometry)})
        os.replace(tmp, path)
    except OSError as exc:
        logger.warning("instrument geometry not cached in %s: %s", path.parent, exc)
