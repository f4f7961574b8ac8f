"""The run start's ``nexus_structure``: the JSON kafka-to-nexus writes the NeXus file from.

An ESS instrument announces a run with a pl72 whose ``nexus_structure`` describes the file
to write: a tree of groups (``children``, ``attributes`` with ``NX_class``) whose leaves
are static ``dataset`` modules (``config``: ``name``, ``values``, ``type``) and stream
modules (``ev44``, ``f144``...: ``config`` ``topic`` and ``source``). :func:`nexus_structure`
writes the simulated spectrometer's set-up in that form, so a consumer can take the whole
set-up from it as it would at a facility (:mod:`consumers.reduction.nexus_setup` reads
it back; the mapping is in ``docs/nexus_structure.md``):

* ``/entry/instrument/detector`` (NXdetector): ``detector_number``, ``x/y/z_pixel_offset``
  (m), ``solid_angle`` (sr), ``depends_on`` a translation of 0 m from the sample (the
  array's reference point is the centre of its cylinder, the sample position: the offsets
  are then the lab positions bit for bit; a non-zero translation would round each sum at
  about 1e-16 m, enough to move an event across a bin edge of the float32 pixel table);
  ``events`` (NXevent_data) holds the ev44 stream;
* ``/entry/instrument/moderator`` (NXmoderator): ``distance`` = -L1 (m, upstream) and a
  translation to it;
* ``/entry/instrument/fermi_chopper`` (NXfermi_chopper): ``energy`` = Ei (meV) and
  ``rotation_speed`` (Hz);
* ``/entry/instrument/source/proton_charge`` (NXsource > NXlog): the f144 proton charge;
* ``/entry/sample`` (NXsample): ``name``, ``chemical_formula``, ``unit_cell_abc`` (Angstrom),
  ``unit_cell_alphabetagamma`` (deg), ``space_group``, ``ub_matrix`` (Busing-Levy, 1/Angstrom
  without 2 pi), ``orientation_matrix`` (U), ``temperature`` (K), the project's
  ``steer_material`` (the shipped material whose set-up the fold uses), ``depends_on``
  the goniometer: ``transformations/omega``, an NXlog rotation about +y whose value is the
  f144 omega stream, and ``omega_setpoint`` (NXlog, f144) beside it; a **powder** sample
  has ``physical_form`` = ``powder`` and neither UB, orientation nor goniometer;
* ``/entry/instrument/<name>`` (NXmonitor) with an ev44 stream per monitor, when given.

Size. Numbers are written with Python's shortest round-trip ``repr`` (so they read back
exactly) and the JSON without spaces (:func:`encode`). The default 102,400-pixel array
encodes to about 8 MB (measured: ``tests/simulations/runs/test_nexus_structure.py``
bounds it below 10 MB); fewer digits would not reproduce the positions, and the fold of a
run must not depend on where its set-up came from. That fits the limits the project sets
on its clients and broker topics: the replay producer's ``max_request_size`` (32 MB), the
source's ``max_partition_fetch_bytes`` (16 MB) and the deployed topics'
``max.message.bytes`` (32 MB); the embedded broker takes it as it is. A facility broker at
Kafka's default (1 MB) needs its run-info topic's ``max.message.bytes`` raised, as ESS does
for its ``nexus_structure`` run starts.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from math import gcd
from typing import TYPE_CHECKING, Any

import numpy as np

from simulations.exceptions import InstrumentError
from simulations.instrument.spectrometer import Instrument, Orientation, busing_levy_b

if TYPE_CHECKING:
    from simulations.lattice.crystals import Crystal

__all__ = [
    "STREAM_LAYOUTS",
    "MonitorStream",
    "StreamNames",
    "encode",
    "nexus_structure",
    "reduced_formula",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class MonitorStream:
    """A beam monitor's ev44 stream.

    Attributes
    ----------
    name
        The NXmonitor group's name.
    topic, source
        Its ev44 topic and source name.
    distance
        Position along the beam from the sample, m (negative upstream).
    detector_number
        The monitor's pixel id in its ev44 events (an IDF's monitor id), or None.
    """

    name: str
    topic: str
    source: str
    distance: float
    detector_number: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamNames:
    """Topics and source names of a run's streams.

    Attributes
    ----------
    events_topic, events_source
        The detector's ev44 stream.
    motion_topic
        Topic of the f144 logs below.
    omega_source, omega_setpoint_source
        f144 sources of the goniometer angle's readback and set-point (degrees).
    proton_charge_source
        f144 source of the proton charge per pulse (uC).
    monitors
        Beam monitors' ev44 streams.
    monitor_topic
        Topic of the beam monitors' ev44 events (``""``: the layout has none).
    run_info_topic, bluesky_topic
        Topics of the run start/stop and of the bluesky documents.
    keyed_by_run
        Every message keyed with the run id (the simulator's layout) or none (ESS).
    private_metadata
        The run start also carries the project's own ``metadata`` JSON (the simulator's
        layout); without it only the ``nexus_structure`` describes the run (and the
        metadata holds the simulation's truth alone).
    """

    events_topic: str
    events_source: str
    motion_topic: str
    omega_source: str = "omega"
    omega_setpoint_source: str = "omega_setpoint"
    proton_charge_source: str = "proton_charge"
    monitors: tuple[MonitorStream, ...] = ()
    monitor_topic: str = ""
    run_info_topic: str = ""
    bluesky_topic: str = ""
    keyed_by_run: bool = True
    private_metadata: bool = True

    @classmethod
    def simulator(cls, prefix: str) -> StreamNames:
        """The simulator's layout: ``<prefix>_events`` (source ``<prefix>_detector``),
        ``<prefix>_motion`` (``omega``, ``omega_setpoint``, ``proton_charge``) and
        ``<prefix>_monitor`` (the beam monitors' events)."""
        return cls(
            events_topic=f"{prefix}_events",
            events_source=f"{prefix}_detector",
            motion_topic=f"{prefix}_motion",
            monitor_topic=f"{prefix}_monitor",
            run_info_topic=f"{prefix}_runInfo",
            bluesky_topic=f"{prefix}_bluesky",
        )

    @classmethod
    def ess(cls, prefix: str) -> StreamNames:
        """An ESS-style layout: ``<prefix>_filewriter`` (run start and stop),
        ``<prefix>_detector``, ``<prefix>_beam_monitor``, ``<prefix>_motion`` with
        EPICS-style source names (the goniometer's readback
        ``<PREFIX>-SpGon:MC-RotY-01:Mtr.RBV`` and set-point ``...VAL``, the charge
        ``<PREFIX>-Acc:ProtonCharge``), no message keys, and only the ``nexus_structure``
        to describe the run."""
        motor = f"{prefix.upper()}-SpGon:MC-RotY-01:Mtr"
        return cls(
            events_topic=f"{prefix}_detector",
            events_source=f"{prefix}_detector_0",
            motion_topic=f"{prefix}_motion",
            monitor_topic=f"{prefix}_beam_monitor",
            omega_source=f"{motor}.RBV",
            omega_setpoint_source=f"{motor}.VAL",
            proton_charge_source=f"{prefix.upper()}-Acc:ProtonCharge",
            run_info_topic=f"{prefix}_filewriter",
            bluesky_topic=f"{prefix}_bluesky",
            keyed_by_run=False,
            private_metadata=False,
        )

    @classmethod
    def layout(cls, name: str, prefix: str) -> StreamNames:
        """The layout called ``name`` (:data:`STREAM_LAYOUTS`)."""
        if name not in STREAM_LAYOUTS:
            raise ValueError(
                f"stream layout must be one of {', '.join(STREAM_LAYOUTS)}, got {name!r}"
            )
        return cls.simulator(prefix) if name == "simulator" else cls.ess(prefix)


#: the stream layouts the simulator can publish with
STREAM_LAYOUTS = ("simulator", "ess")


def _attr(name: str, values: object, dtype: str = "string") -> dict[str, object]:
    return {"name": name, "dtype": dtype, "values": values}


def _group(name: str, nx_class: str, children: Sequence[object], **attrs: object) -> dict:
    attributes = [_attr("NX_class", nx_class)]
    attributes += [_attr(k, v, _dtype(v)) for k, v in attrs.items()]
    return {"name": name, "type": "group", "attributes": attributes, "children": list(children)}


def _dtype(values: object) -> str:
    if isinstance(values, str):
        return "string"
    flat = np.ravel(np.asarray(values))
    return "int64" if flat.dtype.kind in "iu" else "double"


def _dataset(name: str, values: object, units: str | None = None, **attrs: object) -> dict:
    if isinstance(values, np.ndarray):
        values = values.tolist()
    node: dict[str, Any] = {
        "module": "dataset",
        "config": {"name": name, "values": values, "type": _dtype(values)},
    }
    extra = ({"units": units} if units else {}) | attrs
    if extra:
        node["attributes"] = [_attr(k, v, _dtype(v)) for k, v in extra.items()]
    return node


def _stream(module: str, topic: str, source: str, **config: object) -> dict:
    return {"module": module, "config": {"topic": topic, "source": source, **config}}


def _translation(name: str, value: float, vector: Sequence[float], depends_on: str) -> dict:
    return _dataset(
        name,
        float(value),
        "m",
        transformation_type="translation",
        vector=[float(x) for x in vector],
        depends_on=depends_on,
    )


def reduced_formula(species: Sequence[str]) -> str:
    """Reduced chemical formula in Hill order (C, H, then alphabetical): ``"Ge"``, ``"NbSe2"``."""
    counts = Counter(species)
    div = 0
    for n in counts.values():
        div = gcd(div, n)
    order = [e for e in ("C", "H") if e in counts and "C" in counts]
    order += sorted(e for e in counts if e not in order)
    return "".join(e + (str(counts[e] // div) if counts[e] // div > 1 else "") for e in order)


def nexus_structure(
    *,
    instrument: Instrument,
    orientation: Orientation | None,
    material: str,
    ei: float,
    temperature: float,
    streams: StreamNames,
    run_id: str = "",
    crystal: Crystal | None = None,
) -> dict[str, Any]:
    """The ``nexus_structure`` of a simulated run (the layout in the module docstring).

    Parameters
    ----------
    instrument
        The spectrometer: pixel ids, positions (n_pix, 3) m, solid angles (n_pix,) sr, L1 m.
    orientation
        The crystal and its UB (1/Angstrom without 2 pi) at omega = 0; None for a powder
        sample (then ``crystal`` names the crystal).
    material
        The project's material name (``"Ge"``...), written as ``/entry/sample/steer_material``.
    ei
        Incident energy, meV.
    temperature
        Sample temperature, K.
    streams
        Topics and source names (:meth:`StreamNames.simulator` for the simulator's).
    run_id
        Written as the entry's ``title`` and ``entry_identifier``.

    Raises
    ------
    InstrumentError
        For a non-finite Ei, L1 or pixel position.
    """
    pos = np.asarray(instrument.positions, dtype=np.float64)
    if not (np.isfinite(ei) and np.isfinite(instrument.l1) and np.all(np.isfinite(pos))):
        raise InstrumentError(
            f"cannot describe a run with Ei = {ei} meV, L1 = {instrument.l1} m or non-finite "
            "pixel positions: fix the instrument or the plan"
        )
    if orientation is not None:
        crystal = orientation.crystal
    elif crystal is None:
        raise InstrumentError("a powder sample's nexus_structure needs its crystal")
    lat = crystal.conventional_lattice
    meta = Orientation.from_vectors(crystal, (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)).to_metadata()
    det_t = "/entry/instrument/detector/transformations/position"
    mod_t = "/entry/instrument/moderator/transformations/position"
    omega_t = "/entry/sample/transformations/omega"
    detector = _group(
        "detector",
        "NXdetector",
        [
            _dataset("detector_number", np.asarray(instrument.pixel_ids, dtype=np.int64)),
            _dataset("x_pixel_offset", pos[:, 0], "m"),
            _dataset("y_pixel_offset", pos[:, 1], "m"),
            _dataset("z_pixel_offset", pos[:, 2], "m"),
            _dataset("solid_angle", np.asarray(instrument.solid_angles, float), "sr"),
            _dataset("depends_on", det_t),
            _group(
                "transformations",
                "NXtransformations",
                [_translation("position", 0.0, (0.0, 0.0, 1.0), ".")],
            ),
            _group(
                "events",
                "NXevent_data",
                [_stream("ev44", streams.events_topic, streams.events_source)],
            ),
        ],
    )
    monitors = [
        _group(
            m.name,
            "NXmonitor",
            [
                *(
                    [_dataset("detector_number", m.detector_number)]
                    if m.detector_number is not None
                    else []
                ),
                _dataset("depends_on", f"/entry/instrument/{m.name}/transformations/position"),
                _group(
                    "transformations",
                    "NXtransformations",
                    [_translation("position", m.distance, (0.0, 0.0, 1.0), ".")],
                ),
                _group("events", "NXevent_data", [_stream("ev44", m.topic, m.source)]),
            ],
        )
        for m in streams.monitors
    ]
    instrument_group = _group(
        "instrument",
        "NXinstrument",
        [
            _dataset("name", instrument.name),
            _group(
                "moderator",
                "NXmoderator",
                [
                    _dataset("distance", -float(instrument.l1), "m"),
                    _dataset("depends_on", mod_t),
                    _group(
                        "transformations",
                        "NXtransformations",
                        [_translation("position", -float(instrument.l1), (0.0, 0.0, 1.0), ".")],
                    ),
                ],
            ),
            _group(
                "source",
                "NXsource",
                [
                    _group(
                        "proton_charge",
                        "NXlog",
                        [
                            _stream(
                                "f144",
                                streams.motion_topic,
                                streams.proton_charge_source,
                                dtype="double",
                                value_units="uC",
                            )
                        ],
                        units="uC",
                    )
                ],
            ),
            _group(
                "fermi_chopper",
                "NXfermi_chopper",
                [
                    _dataset("energy", float(ei), "meV"),
                    _dataset("rotation_speed", float(instrument.chopper_frequency), "Hz"),
                ],
            ),
            detector,
            *monitors,
        ],
    )
    omega_log = _group(
        "omega",
        "NXlog",
        [
            _stream(
                "f144",
                streams.motion_topic,
                streams.omega_source,
                dtype="double",
                value_units="deg",
            )
        ],
        transformation_type="rotation",
        vector=[0.0, 1.0, 0.0],
        units="deg",
        depends_on=".",
    )
    sample = _group(
        "sample",
        "NXsample",
        [
            _dataset("name", crystal.name),
            _dataset("steer_material", material),
            _dataset("chemical_formula", reduced_formula(crystal.species)),
            _dataset("space_group", crystal.spacegroup),
            _dataset("unit_cell_abc", np.linalg.norm(lat, axis=1), "angstrom"),
            _dataset("unit_cell_alphabetagamma", meta["lattice_angles_deg"], "deg"),
            _dataset("temperature", float(temperature), "K"),
            *(
                [_dataset("physical_form", "powder")]
                if orientation is None
                else [
                    _dataset("physical_form", "single crystal"),
                    _dataset("ub_matrix", orientation.ub, "1/angstrom"),
                    _dataset(
                        "orientation_matrix", orientation.ub @ np.linalg.inv(busing_levy_b(lat))
                    ),
                    _dataset("depends_on", omega_t),
                    _group("transformations", "NXtransformations", [omega_log]),
                    _group(
                        "omega_setpoint",
                        "NXlog",
                        [
                            _stream(
                                "f144",
                                streams.motion_topic,
                                streams.omega_setpoint_source,
                                dtype="double",
                                value_units="deg",
                            )
                        ],
                        units="deg",
                    ),
                ]
            ),
        ],
    )
    entry = _group(
        "entry",
        "NXentry",
        [
            _dataset("title", run_id),
            _dataset("entry_identifier", run_id),
            instrument_group,
            sample,
        ],
    )
    return {"children": [entry]}


def encode(structure: dict[str, Any]) -> str:
    """The structure as JSON text without spaces (numbers in shortest round-trip form)."""
    return json.dumps(structure, separators=(",", ":"), allow_nan=False)
