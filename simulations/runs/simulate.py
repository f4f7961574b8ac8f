"""A simulated rotation run, as the messages an instrument would publish, in time order.

One run is written as a recorded-run file (:mod:`simulations.runs.recording`) holding, per
topic of an instrument prefix (default ``arcs``):

* ``<prefix>_runInfo``: **pl72** run start (``metadata`` JSON below, and the
  ``nexus_structure`` of :mod:`simulations.runs.nexus_structure`) and **6s4t** run stop;
* ``<prefix>_motion``: **f144** ``omega`` readbacks (degrees; 10 Hz while moving, 1 Hz
  while counting, jitter 0.002 deg), ``omega_setpoint`` at every move, and
  ``proton_charge`` (uC per pulse, stamped with the pulse time);
* ``<prefix>_events``: **ev44**, ``pulses_per_message`` pulses each (60 Hz pulse times in
  ``reference_time``, ns);
* ``<prefix>_monitor`` (with :attr:`RunPlan.monitors`): **ev44** beam-monitor events
  (sources ``monitor1``, ``monitor2``, :data:`SIMULATED_MONITORS`), one message per monitor
  beside each detector message, over the same pulses;
* ``<prefix>_bluesky``: bluesky documents made with ``event-model`` (RunStart,
  EventDescriptor, one Event per orientation with omega and the count window, RunStop),
  JSON ``[name, doc]``, or with ``bluesky_format="msgpack"`` as bluesky-kafka's
  Publisher sends them (msgpack, no header, keyed by the RunStart uid).

Events are also produced while the goniometer moves (drawn from the target orientation's
spectrum: a consumer is expected to drop them). Every other message's key is the run id.

A **powder** run (:attr:`RunPlan.powder`) has no goniometer: the sample sees every
direction at once (:class:`~simulations.instrument.events.PowderSimulator`), each counting
step is a bluesky Event without omega (plan ``steer_powder_count``), no omega stream is
published, and the run start says ``sample_kind: "powder"`` (metadata) and
``physical_form: powder`` without a UB or goniometer (``nexus_structure``).

The pl72 ``metadata`` JSON carries everything a consumer needs to derive its own grid:
``material``, ``crystal`` (space group, conventional lattice), ``orientation`` (lattice
parameters, u, v, UB), ``ei_meV``, ``temperature_K``, ``instrument`` (geometry),
``goniometer``, ``planned_omegas_deg``, ``count_time_s``, ``topics``, ``monitors``, and under
``simulation`` the ground truth (FC set and coefficients, seed) for evaluation only.
It does not carry a grid fingerprint. The same set-up (less the simulation's truth) is in
the pl72 ``nexus_structure``, as an ESS instrument sends it; a consumer prefers that one
and falls back on ``metadata``.
"""

from __future__ import annotations

import copy
import json
import logging
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import event_model
import msgpack
import msgpack_numpy
import numpy as np
from numpy.typing import ArrayLike, NDArray
from streaming_data_types.eventdata_ev44 import serialise_ev44
from streaming_data_types.logdata_f144 import serialise_f144
from streaming_data_types.run_start_pl72 import serialise_pl72
from streaming_data_types.run_stop_6s4t import serialise_6s4t
from tqdm import tqdm

from simulations.exceptions import InstrumentError
from simulations.fcdb.reference import resolve_fc
from simulations.instrument.events import OrientationSimulator, PowderSimulator
from simulations.instrument.spectrometer import Instrument, Orientation, energy_to_speed
from simulations.jsonutil import json_default
from simulations.lattice.backgrounds import Backgrounds
from simulations.lattice.materials import MaterialSetup, setup
from simulations.lattice.sqe import CoherentSQE
from simulations.runs.can import aluminium_can
from simulations.runs.nexus_structure import MonitorStream, StreamNames, encode, nexus_structure
from simulations.runs.recording import RecordedMessage, RunWriter

__all__ = [
    "BLUESKY_FORMATS",
    "MAX_EVENTS_PER_ORIENTATION",
    "MAX_ORIENTATIONS",
    "SIMULATED_MONITORS",
    "RunPlan",
    "RunSummary",
    "SimulatedMonitor",
    "calibration_angles",
    "parse_omegas",
    "simulate_run",
]

logger = logging.getLogger(__name__)

#: 2026-01-01T00:00:00Z: default start of simulated runs (deterministic files).
DEFAULT_START_NS = 1_767_225_600 * 10**9


#: Most orientations of one simulated run (:func:`parse_omegas`): a run of 3,600 angles at
#: the default 2e5 events each is 7e8 events.
MAX_ORIENTATIONS = 3600
#: Most mean events per orientation (:class:`RunPlan`): 1e8 events are about 2 GB while drawn.
MAX_EVENTS_PER_ORIENTATION = 1e8
#: How the bluesky documents are written (:func:`simulate_run`).
BLUESKY_FORMATS = ("json", "msgpack")


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulatedMonitor:
    """A beam monitor of the simulated instrument.

    Attributes
    ----------
    name, source
        NXmonitor group name and ev44 source name.
    pixel_id
        The id in its events (an IDF's monitor id).
    distance
        Position along the beam from the sample, m (negative upstream).
    counts_per_uC
        Mean counts per uC of proton charge: the monitor's efficiency times the incident
        flux per uC (about 1e-4 of the flux at ARCS's upstream monitor is far more; these
        rates keep files small: ~1e3 counts per 10-pulse message at 23.3 uC per pulse).
    """

    name: str
    source: str
    pixel_id: int
    distance: float
    counts_per_uC: float


#: The simulated instrument's monitors: ARCS's ids and positions (its IDF, monitors -1 and
#: -2 at z = -1.769 m and 4.9 m from the sample), and rates that keep files small (the
#: downstream monitor sees the beam the sample transmits, through a thinner converter).
SIMULATED_MONITORS = (
    SimulatedMonitor(
        name="monitor_1", source="monitor1", pixel_id=-1, distance=-1.769, counts_per_uC=3.0
    ),
    SimulatedMonitor(
        name="monitor_2", source="monitor2", pixel_id=-2, distance=4.9, counts_per_uC=1.0
    ),
)
#: Standard deviation of a monitor event's time of flight about (L1 + z) / v_i, ns (the
#: moderator's pulse width at thermal energies).
MONITOR_TOF_SPREAD_NS = 20_000.0
#: Salt of the monitors' random stream: they draw from their own generator, so the detector
#: events, charges and readbacks of a seed are the same with monitors on or off.
_MONITOR_SEED_SALT = 0x6D6F6E


def parse_omegas(spec: str, *, max_count: int = MAX_ORIENTATIONS) -> NDArray[np.float64]:
    """Goniometer angles from ``"start:stop:step"`` (stop exclusive) or ``"a,b,c"`` (degrees).

    The number of angles is counted before any is made: more than ``max_count`` is refused.

    >>> parse_omegas("0:4:1").tolist()
    [0.0, 1.0, 2.0, 3.0]

    Raises
    ------
    InstrumentError
        Text that is not a range or a list of finite numbers, an empty range, or more than
        ``max_count`` angles (the message names the limit).
    """
    try:
        if ":" in spec:
            parts = [float(x) for x in spec.split(":")]
            if len(parts) not in (2, 3) or not all(np.isfinite(parts)):
                raise ValueError
            start, stop = parts[0], parts[1]
            step = parts[2] if len(parts) == 3 else 1.0
            if step == 0 or (stop - start) / step <= 0:
                raise ValueError
            count = float(np.ceil((stop - start) / step - 1e-9))
            items: list[str] = []
        else:
            items = [x for x in spec.split(",") if x.strip()]
            count = float(len(items))
    except ValueError:
        raise _unreadable(spec) from None
    if count > max_count:
        raise InstrumentError(
            f"omegas {spec!r} gives {count:.4g} angles; at most {max_count} are accepted "
            "per run: use a larger step or fewer angles"
        )
    if ":" in spec:
        return np.asarray(start + step * np.arange(int(count)), dtype=np.float64)
    try:
        values = np.array([float(x) for x in items])
    except ValueError:
        raise _unreadable(spec) from None
    if not np.all(np.isfinite(values)):
        raise _unreadable(spec)
    return values


def _unreadable(spec: str) -> InstrumentError:
    return InstrumentError(
        f"cannot read omegas {spec!r}: use 'start:stop:step' (stop exclusive, degrees) "
        "or a comma-separated list of finite angles"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RunPlan:
    """What to simulate.

    Attributes
    ----------
    material
        Shipped material name or CIF path.
    fc
        FC set: a name (``mlff_mean``, ``raman``...), JSON path or mapping.
    omegas
        Goniometer angles, degrees, in measurement order.
    events_per_orientation
        Mean number of events per counting step (signal + background), over the run.
    background_fraction
        Share of those events from the flat background.
    backgrounds
        The sample's scattering besides the coherent one-phonon signal
        (:class:`~simulations.lattice.backgrounds.Backgrounds`: the incoherent elastic line
        and multiphonon scattering by default, an aluminium can on request); their counts
        come out of ``events_per_orientation`` like the signal's.
    temperature
        Sample temperature, K.
    ei
        Incident energy, meV (default: the material's).
    count_time
        Seconds of counting per orientation.
    pulse_rate
        Source frequency, Hz.
    pulses_per_message
        Pulses per ev44 message.
    proton_charge
        Mean proton charge per pulse, uC (23.3 uC: 1.4 MW at 1 GeV and 60 Hz), 1% jitter.
    motor_speed, settle_time
        Goniometer speed (deg/s) and settling time (s) after each move.
    u, v
        Orientation vectors (conventional hkl) along the beam / in the horizontal plane.
    mesh
        Phonon-table mesh (points per axis).
    group_rows
        Pixels per super-pixel along a tube of a regular detector or of an instrument
        definition whose tubes have equal lengths (S(Q, E) is evaluated at each
        super-pixel's centre; 1: every pixel; a pixel table is never grouped).
    powder
        A powder sample: no goniometer, every step counts at omega 0 (``omegas`` gives
        the number of steps and must hold one angle repeated), events drawn from the
        spherical average S(|Q|, E).
    monitors
        Publish the beam monitors' events (:data:`SIMULATED_MONITORS`: Poisson counts
        proportional to each pulse's proton charge, on the layout's monitor topic) and name
        them in the run start. They draw from a generator of their own, so the other
        messages of a seed do not change with this switch. Off by default: the monitors'
        events outnumber a small test run's detector events (2 s at 60 Hz: ~5.6e4 against
        2.5e4), and the runs and tests written before them expect every ev44 message to be
        a detector's.
    prefix
        Kafka topic prefix.
    run_id
        Run identifier (default ``sim-<material>-<seed>``).
    start_time_ns
        Start of the run, ns since the epoch.
    seed
        Random seed: the same plan gives byte-identical files.
    """

    material: str
    fc: str | dict[str, float] = "mlff_mean"
    omegas: tuple[float, ...] = field(default_factory=lambda: tuple(np.arange(0.0, 120.0)))
    events_per_orientation: float = 2e5
    background_fraction: float = 0.1
    backgrounds: Backgrounds = field(default_factory=Backgrounds)
    temperature: float = 5.0
    ei: float | None = None
    count_time: float = 60.0
    pulse_rate: float = 60.0
    pulses_per_message: int = 10
    proton_charge: float = 23.3
    motor_speed: float = 1.0
    settle_time: float = 1.0
    u: tuple[float, float, float] = (1.0, 0.0, 0.0)
    v: tuple[float, float, float] = (0.0, 1.0, 0.0)
    mesh: int = 40
    group_rows: int = 4
    max_orientations: int = MAX_ORIENTATIONS
    max_events_per_orientation: float = MAX_EVENTS_PER_ORIENTATION
    monitors: bool = False
    powder: bool = False
    prefix: str = "arcs"
    run_id: str | None = None
    start_time_ns: int = DEFAULT_START_NS
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`InstrumentError` for an impossible plan."""
        events = self.events_per_orientation
        if not np.isfinite(events) or not 0 < events <= self.max_events_per_orientation:
            raise InstrumentError(
                f"events per orientation must be > 0 and at most "
                f"{self.max_events_per_orientation:.0e} (the limit per orientation, "
                f"STEER_MAX_EVENTS_PER_ORIENTATION), got {events:g}"
            )
        if len(self.omegas) > self.max_orientations:
            raise InstrumentError(
                f"a run has at most {self.max_orientations} orientations "
                f"(STEER_MAX_ORIENTATIONS), got {len(self.omegas)}"
            )
        if not 0 <= self.background_fraction <= 1:
            raise InstrumentError(
                f"background fraction must be within 0..1, got {self.background_fraction}"
            )
        for name in ("count_time", "pulse_rate", "proton_charge", "motor_speed"):
            if not getattr(self, name) > 0:
                raise InstrumentError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.mesh < 4 or self.group_rows < 1:
            raise InstrumentError(
                f"phonon mesh must be >= 4 and super-pixel rows >= 1, got {self.mesh} and "
                f"{self.group_rows}"
            )
        if self.pulses_per_message < 1:
            raise InstrumentError("pulses_per_message must be >= 1")
        if len(self.omegas) == 0:
            raise InstrumentError("a run needs at least one orientation")
        if self.powder and len(set(self.omegas)) > 1:
            raise InstrumentError(
                "a powder run has no goniometer: its steps are counts at one position, "
                "not a list of angles (give the number of steps)"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSummary:
    """What :func:`simulate_run` wrote (the ``--json`` output of ``steer simulate run``)."""

    orientations: int
    events: int
    messages: int
    seconds: float
    fc_set: str
    path: str
    n_pixels: int
    super_pixels: int
    monitor_events: int = 0

    def to_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {
            "orientations": self.orientations,
            "events": self.events,
            "messages": self.messages,
            "seconds": round(self.seconds, 3),
            "fc_set": self.fc_set,
            "path": self.path,
            "n_pixels": self.n_pixels,
            "super_pixels": self.super_pixels,
            "monitor_events": self.monitor_events,
        }


class _F144Template:
    """f144 scalar-double payloads of one source, by patching a serialised template.

    ``serialise_f144`` builds each flatbuffer in Python (~80 us); a run has one proton-charge
    value per pulse (432,000 in a two-hour run). For a fixed source name the layout is
    fixed, so the value and timestamp are patched into a copy of a template made by
    ``serialise_f144`` itself; a second probe checks at construction that the patched
    bytes equal ``serialise_f144``'s, else every call falls back to it.
    """

    _PROBE_VALUE = 1234.5678901234567
    _PROBE_TIME = 0x0123456789ABCDEF

    def __init__(self, source: str) -> None:
        self.source = source
        buf = serialise_f144(source, self._PROBE_VALUE, self._PROBE_TIME)
        v_at = buf.find(struct.pack("<d", self._PROBE_VALUE))
        t_at = buf.find(struct.pack("<q", self._PROBE_TIME))
        self._template = bytearray(buf)
        self._value_at, self._time_at = v_at, t_at
        ok = v_at >= 0 and t_at >= 0
        if ok:
            probe = (-0.3125, 1_767_225_600_123_456_789)
            ok = self.payload(*probe) == serialise_f144(source, *probe)
        self._fast = ok

    def payload(self, value: float, t_ns: int) -> bytes:
        if not getattr(self, "_fast", True) or self._value_at < 0:
            return bytes(serialise_f144(self.source, value, t_ns))
        buf = self._template
        struct.pack_into("<d", buf, self._value_at, value)
        struct.pack_into("<q", buf, self._time_at, t_ns)
        return bytes(buf)


class _Clock:
    """Message factory for one run: keys, topics and ev44 message ids."""

    def __init__(
        self,
        plan: RunPlan,
        run_id: str,
        bluesky_format: str = "json",
        streams: StreamNames | None = None,
    ) -> None:
        self.streams = streams = streams or StreamNames.simulator(plan.prefix)
        self.key: bytes | None = run_id.encode() if streams.keyed_by_run else None
        self.bluesky_format = bluesky_format
        self._bluesky_key = self.key
        self.t_run_info = streams.run_info_topic
        self.t_motion = streams.motion_topic
        self.t_events = streams.events_topic
        self.t_bluesky = streams.bluesky_topic
        #: the simulator's names of its f144 logs -> the layout's source names
        self._sources = {
            "omega": streams.omega_source,
            "omega_setpoint": streams.omega_setpoint_source,
            "proton_charge": streams.proton_charge_source,
        }
        self.message_id = 0
        self.n_events = 0
        self.n_monitor_events = 0
        #: ev44 message ids of each monitor (their own counters: the detector's are unchanged)
        self.monitor_message_id: dict[str, int] = {}
        self._f144: dict[str, _F144Template] = {}

    def msg(self, topic: str, t_ns: int, payload: bytes, schema: str) -> RecordedMessage:
        return RecordedMessage(
            topic=topic,
            key=self.key,
            timestamp_ns=int(t_ns),
            headers=(("schema", schema.encode()),),
            payload=payload,
        )

    def f144(self, source: str, value: float, t_ns: int) -> RecordedMessage:
        template = self._f144.get(source)
        if template is None:
            template = self._f144[source] = _F144Template(self._sources.get(source, source))
        return self.msg(self.t_motion, t_ns, template.payload(float(value), int(t_ns)), "f144")

    def bluesky(self, name: str, doc: dict[str, object], t_ns: int) -> RecordedMessage:
        if self.bluesky_format == "msgpack":
            # as bluesky-kafka's Publisher sends them: msgpack (name, doc) with numpy by
            # msgpack_numpy, no headers, keyed by the RunStart uid
            if name == "start":
                self._bluesky_key = str(doc["uid"]).encode()
            return RecordedMessage(
                topic=self.t_bluesky,
                key=self._bluesky_key,
                timestamp_ns=int(t_ns),
                headers=(),
                payload=msgpack.packb((name, doc), default=msgpack_numpy.encode),
            )
        payload = json.dumps([name, doc], default=json_default).encode()
        return RecordedMessage(
            topic=self.t_bluesky,
            key=self.key,
            timestamp_ns=int(t_ns),
            headers=(("schema", b"bluesky-json"), ("document", name.encode())),
            payload=payload,
        )


def simulate_run(
    plan: RunPlan,
    out: str | Path,
    *,
    instrument: Instrument | None = None,
    progress: bool = True,
    bluesky_format: str = "json",
    stream_layout: str = "simulator",
) -> RunSummary:
    """Simulate a rotation run and write it as a recorded-run file.

    ``stream_layout``: ``"simulator"`` (the module docstring's topics and sources, every
    message keyed by run id, the private ``metadata`` beside the ``nexus_structure``) or
    ``"ess"`` (:meth:`StreamNames.ess`: ESS topic and EPICS-style source names, no keys,
    the run described by the ``nexus_structure`` alone; the pl72 ``metadata`` keeps only
    the simulation's truth, for evaluation).

    ``bluesky_format``: ``"json"`` (``[name, doc]`` with a ``schema: bluesky-json``
    header, keyed by run id) or ``"msgpack"`` (bluesky-kafka's Publisher form: msgpack
    ``(name, doc)``, no header, keyed by the RunStart uid).

    Raises
    ------
    InstrumentError
        For an impossible plan (omegas outside the goniometer limits, Ei below the
        material's energy window, negative counts...).
    SimulationError
        For an unknown material or FC set.
    """
    t_start = time.perf_counter()
    plan.validate()
    if bluesky_format not in BLUESKY_FORMATS:
        raise InstrumentError(
            f"bluesky format must be one of {', '.join(BLUESKY_FORMATS)}, got {bluesky_format!r}"
        )
    ms = setup(plan.material)
    instrument = instrument or Instrument.arcs_like()
    omegas = instrument.check_omegas(np.asarray(plan.omegas, dtype=float))
    ei = float(plan.ei if plan.ei is not None else ms.defaults.ei)
    e_top = float(ms.grid.energy_edges[-1])
    if not plan.powder and 0.95 * ei < e_top:  # events are simulated up to 0.95 Ei
        raise InstrumentError(
            f"Ei = {ei:g} meV is too small for {plan.material}'s energy window up to "
            f"{e_top:g} meV; choose Ei >= {e_top / 0.95:.1f} meV"
        )
    label, coefficients = resolve_fc(plan.material, plan.fc, ms)
    model = CoherentSQE(
        ms.basis,
        coefficients,
        temperature=plan.temperature,
        resolution=instrument.resolution(ei),
    )
    reach = plan.backgrounds.multiphonon or plan.backgrounds.can
    sim: OrientationSimulator
    if plan.powder:
        sim = PowderSimulator(
            model,
            instrument,
            ei,
            mesh=plan.mesh,
            group_rows=plan.group_rows,
            e_top=0.95 * ei if reach else None,
        )
    else:
        sim = OrientationSimulator(
            model,
            instrument,
            Orientation.from_vectors(ms.crystal, plan.u, plan.v),
            ei,
            mesh=plan.mesh,
            group_rows=plan.group_rows,
            e_top=0.95 * ei if reach else None,
        )
    rng = np.random.default_rng(plan.seed)
    run_id = plan.run_id or f"sim-{ms.crystal.name}-{plan.seed}"
    try:
        streams = StreamNames.layout(stream_layout, plan.prefix)
    except ValueError as exc:
        raise InstrumentError(str(exc)) from None
    if plan.monitors:
        streams = replace(
            streams,
            monitors=tuple(
                MonitorStream(
                    name=m.name,
                    topic=streams.monitor_topic,
                    source=m.source,
                    distance=m.distance,
                    detector_number=m.pixel_id,
                )
                for m in SIMULATED_MONITORS
            ),
        )
    clock = _Clock(plan, run_id, bluesky_format, streams)
    sim.extra = _sample_extra(plan, sim, instrument, ei)
    scale, background, cache = _calibrate(plan, sim, omegas)
    metadata = _run_metadata(plan, ms, sim, omegas, clock, run_id, label, coefficients)
    file_meta = {
        "run_id": run_id,
        "material": plan.material,
        "fc_set": label,
        "n_orientations": len(omegas),
        "prefix": plan.prefix,
        "topics": metadata["topics"],
        "created_by": "steer simulate run",
        "seed": plan.seed,
    }
    # gzip level 1: event payloads barely compress further, and level 6 costs 3x the time
    with RunWriter(out, metadata=file_meta, compresslevel=1) as writer:
        gen = _messages(plan, clock, sim, omegas, metadata, scale, background, rng, progress, cache)
        for batch in gen:
            writer.write_many(batch)
        n_messages = writer.n_messages
    return RunSummary(
        orientations=len(omegas),
        events=clock.n_events,
        messages=n_messages,
        seconds=time.perf_counter() - t_start,
        fc_set=label,
        path=str(out),
        n_pixels=instrument.n_pixels,
        super_pixels=sim.n_groups,
        monitor_events=clock.n_monitor_events,
    )


def _sample_extra(
    plan: RunPlan, sim: OrientationSimulator, instrument: Instrument, ei: float
) -> NDArray[np.float64] | None:
    """(n_groups, n_E) the expected counts of the background components (the same at
    every angle), in the units of :meth:`OrientationSimulator.expected`; None when off."""
    bg = plan.backgrounds
    if not bg.any:
        return None
    can = None
    if bg.can:
        q_max = float(sim.q_magnitude().max())
        can = aluminium_can(
            plan.temperature, instrument.resolution(ei), q_max=q_max, energies=sim.e_centres
        )
    parts = sim.components(bg, can=can)
    return np.asarray(sum(parts.values()))


def _expected(sim: OrientationSimulator, omega: float) -> NDArray[np.float64]:
    """Expected counts per unit scale at ``omega``: one-phonon plus the components."""
    lam = sim.expected(omega)
    return lam if sim.extra is None else lam + sim.extra


def calibration_angles(omegas: ArrayLike) -> NDArray[np.float64]:
    """The angles a run's scale is calibrated on: up to 8 evenly spaced ones of ``omegas``
    (degrees)."""
    w = np.asarray(omegas, dtype=float)
    return w[np.unique(np.linspace(0, len(w) - 1, min(8, len(w))).astype(int))]


def _calibrate(
    plan: RunPlan, sim: OrientationSimulator, omegas: NDArray[np.float64]
) -> tuple[float, float, dict[float, NDArray[np.float64]]]:
    """Flux x time of the run: the signal scale, the background events per orientation, and
    the expected counts computed on the way (by omega, reused when the run gets there).

    The mean signal over up to 8 evenly spaced orientations of the run gives
    (1 - background_fraction) * events_per_orientation; it then stays fixed, so counts vary
    between orientations as a real crystal's do.
    """
    cache = {float(w): _expected(sim, float(w)) for w in calibration_angles(omegas)}
    mean_signal = float(np.mean([lam.sum() for lam in cache.values()]))
    n_sig = (1.0 - plan.background_fraction) * plan.events_per_orientation
    scale = n_sig / mean_signal if mean_signal > 0 else 0.0
    background = plan.background_fraction * plan.events_per_orientation
    return scale, background, cache


def _run_metadata(
    plan: RunPlan,
    ms: MaterialSetup,
    sim: OrientationSimulator,
    omegas: NDArray[np.float64],
    clock: _Clock,
    run_id: str,
    label: str,
    coefficients: NDArray[np.float64],
) -> dict[str, object]:
    """The pl72 run-start metadata (see the module docstring)."""
    topics = {
        "run_info": clock.t_run_info,
        "motion": clock.t_motion,
        "events": clock.t_events,
        "bluesky": clock.t_bluesky,
    }
    if clock.streams.monitors:
        topics["monitor"] = clock.streams.monitor_topic
    mounting: dict[str, object]
    if plan.powder:
        mounting = {"sample_kind": "powder", "steps": len(omegas)}
    else:
        mounting = {
            "sample_kind": "single_crystal",
            "orientation": sim.orientation.to_metadata(),
            "goniometer": {
                "source_name": clock.streams.omega_source,
                "topic": clock.t_motion,
                "axis": [0.0, 1.0, 0.0],
                "units": "deg",
            },
            "planned_omegas_deg": [float(w) for w in omegas],
        }
    return {
        "run_id": run_id,
        "material": plan.material,
        "crystal": ms.crystal.summary(),
        "ei_meV": sim.ei,
        "temperature_K": plan.temperature,
        "instrument": sim.instrument.to_metadata(),
        **mounting,
        "count_time_s": plan.count_time,
        "pulse_rate_Hz": plan.pulse_rate,
        "proton_charge_units": "uC",
        "topics": topics,
        "monitors": [
            {
                "name": m.name,
                "topic": m.topic,
                "source": m.source,
                "pixel_id": m.detector_number,
                "distance_m": m.distance,
            }
            for m in clock.streams.monitors
        ],
        "simulation": {
            "fc_set": label,
            "coefficients": dict(zip(ms.basis.names, map(float, coefficients), strict=True)),
            "seed": plan.seed,
            "events_per_orientation": plan.events_per_orientation,
            "background_fraction": plan.background_fraction,
            "backgrounds": plan.backgrounds.to_dict(),
            **(
                {"powder_q_sigma_inv_angstrom": float(getattr(sim, "q_sigma", 0.0))}
                if plan.powder
                else {}
            ),
            "phonon_mesh": plan.mesh,
            "super_pixel_rows": plan.group_rows,
        },
    }


#: Data keys of the run's bluesky EventDescriptor: one Event per orientation.
_DATA_KEYS: dict[str, dict[str, object]] = {
    "omega": {"source": "PV:omega", "dtype": "number", "shape": [], "units": "deg"},
    "omega_setpoint": {
        "source": "PV:omega_sp",
        "dtype": "number",
        "shape": [],
        "units": "deg",
    },
    "count_start": {"source": "sim", "dtype": "number", "shape": [], "units": "s"},
    "count_stop": {"source": "sim", "dtype": "number", "shape": [], "units": "s"},
    "count_start_ns": {"source": "sim", "dtype": "integer", "shape": [], "units": "ns"},
    "count_stop_ns": {"source": "sim", "dtype": "integer", "shape": [], "units": "ns"},
    "count_time": {"source": "sim", "dtype": "number", "shape": [], "units": "s"},
    "proton_charge": {"source": "sim", "dtype": "number", "shape": [], "units": "uC"},
    "events": {"source": "sim", "dtype": "integer", "shape": []},
}


class _Documents:
    """The bluesky documents of one run (start, descriptor, events, stop).

    Their uids are derived from the plan (not uuid4): the same plan gives identical files.
    """

    def __init__(
        self, plan: RunPlan, metadata: dict[str, object], n_points: int, t_ns: int
    ) -> None:
        self._run_uid = uuid.uuid5(uuid.NAMESPACE_URL, f"steer-simulated-run:{plan!r}")
        data_keys = copy.deepcopy(_DATA_KEYS)
        if plan.powder:  # no goniometer
            del data_keys["omega"], data_keys["omega_setpoint"]
        self.bundle = event_model.compose_run(
            uid=self.uid("start"),
            time=t_ns / 1e9,
            metadata={
                "plan_name": "steer_powder_count" if plan.powder else "steer_rotation_scan",
                "sample_kind": "powder" if plan.powder else "single_crystal",
                "run_id": metadata["run_id"],
                "material": plan.material,
                "motors": [] if plan.powder else ["omega"],
                "num_points": n_points,
                "ei_meV": metadata["ei_meV"],
                "temperature_K": plan.temperature,
                "scan_id": plan.seed,
            },
        )
        self.desc = self.bundle.compose_descriptor(
            name="primary",
            data_keys=data_keys,
            hints={} if plan.powder else {"omega": {"fields": ["omega"]}},
            time=t_ns / 1e9,
            uid=self.uid("descriptor"),
        )

    def uid(self, what: str) -> str:
        """The uid of one document of the run."""
        return str(uuid.uuid5(self._run_uid, what))

    def event(self, seq_num: int, data: dict[str, object], t_ns: int) -> dict[str, object]:
        """The Event of orientation ``seq_num`` (from 1), stamped ``t_ns``."""
        doc = self.desc.compose_event(
            data=data,
            timestamps=dict.fromkeys(self.desc.descriptor_doc["data_keys"], t_ns / 1000000000.0),
            seq_num=seq_num,
            uid=self.uid(f"event-{seq_num}"),
            time=t_ns / 1e9,
        )
        return dict(doc)

    def stop(self, t_ns: int) -> dict[str, object]:
        """The RunStop (exit status ``success``) at ``t_ns``."""
        return dict(
            self.bundle.compose_stop(exit_status="success", uid=self.uid("stop"), time=t_ns / 1e9)
        )


def _messages(
    plan: RunPlan,
    clock: _Clock,
    sim: OrientationSimulator,
    omegas: NDArray[np.float64],
    metadata: dict[str, object],
    scale: float,
    background: float,
    rng: np.random.Generator,
    progress: bool,
    cache: dict[float, NDArray[np.float64]],
) -> Iterator[list[RecordedMessage]]:
    """Yield the run's messages in time order, one orientation at a time."""
    beam = _Beam(
        plan=plan,
        clock=clock,
        sim=sim,
        rng=rng,
        period_ns=round(1e9 / plan.pulse_rate),
        source=clock.streams.events_source,
        monitors=tuple(m for m in SIMULATED_MONITORS if plan.monitors),
        monitor_rng=np.random.default_rng([_MONITOR_SEED_SALT, plan.seed]),
    )
    t = plan.start_time_ns
    run_id = str(metadata["run_id"])
    docs = _Documents(plan, metadata, len(omegas), t)
    pl72 = serialise_pl72(
        job_id=run_id,
        filename=f"{run_id}.nxs",
        start_time=t // 10**6,
        run_name=run_id,
        instrument_name=sim.instrument.name,
        metadata=json.dumps(
            metadata
            if clock.streams.private_metadata
            else {"run_id": run_id, "simulation": metadata["simulation"]}
        ),
        nexus_structure=encode(
            nexus_structure(
                instrument=sim.instrument,
                orientation=None if plan.powder else sim.orientation,
                crystal=sim.model.crystal,
                material=plan.material,
                ei=sim.ei,
                temperature=plan.temperature,
                streams=clock.streams,
                run_id=run_id,
            )
        ),
    )
    yield [
        clock.msg(clock.t_run_info, t, pl72, "pl72"),
        clock.bluesky("start", dict(docs.bundle.start_doc), t),
        *(
            []
            if plan.powder
            else [clock.f144("omega_setpoint", omegas[0], t), clock.f144("omega", omegas[0], t)]
        ),
        clock.bluesky("descriptor", dict(docs.desc.descriptor_doc), t),
    ]
    t += beam.period_ns
    current = float(omegas[0])
    bar = tqdm(total=len(omegas), desc="orientations", unit="orient", disable=not progress)
    for k, target in enumerate(omegas):
        cached = cache.pop(float(target), None)
        expected = cached if cached is not None else _expected(sim, float(target))
        batch: list[RecordedMessage] = []
        if not plan.powder and (k > 0 or abs(target - current) > 0):
            t = beam.move(batch, expected, scale, background, current, float(target), t)
        current = float(target)
        t = beam.count(batch, docs, k + 1, expected, scale, background, current, t)
        bar.update(1)
        yield batch
    bar.close()
    yield [
        clock.bluesky("stop", docs.stop(t), t),
        clock.msg(
            clock.t_run_info,
            t,
            serialise_6s4t(job_id=run_id, run_name=run_id, stop_time=t // 10**6),
            "6s4t",
        ),
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Beam:
    """The pulses of one run: events and proton charges, goniometer readbacks, counting."""

    plan: RunPlan
    clock: _Clock
    sim: OrientationSimulator
    rng: np.random.Generator
    period_ns: int  # between pulses
    source: str  # ev44 source name
    monitors: tuple[SimulatedMonitor, ...] = ()
    monitor_rng: np.random.Generator | None = None  # the monitors' own random stream

    @property
    def n_pulses(self) -> int:
        """Pulses in one counting step."""
        return round(self.plan.count_time * self.plan.pulse_rate)

    def move(
        self,
        batch: list[RecordedMessage],
        expected: NDArray[np.float64],
        scale: float,
        background: float,
        current: float,
        target: float,
        t: int,
    ) -> int:
        """Move the goniometer from ``current`` to ``target`` (degrees) from ``t`` (ns):
        setpoint, 10 Hz readbacks, and events that keep arriving (dropped downstream), drawn
        from ``expected`` of the target. Appends to ``batch``; returns the time after."""
        plan, clock = self.plan, self.clock
        move_s = abs(target - current) / plan.motor_speed + plan.settle_time
        batch.append(clock.f144("omega_setpoint", target, t))
        n_read = max(1, int(move_s * 10))
        for i in range(1, n_read + 1):
            frac = min(1.0, i / n_read * move_s / max(move_s - plan.settle_time, 1e-9))
            value = current + (target - current) * frac
            batch.append(clock.f144("omega", value, t + int(i * 1e8)))
        n_move = max(1, round(move_s * plan.pulse_rate))
        frac_time = n_move / self.n_pulses
        batch += self.pulses(expected, scale * frac_time, background * frac_time, n_move, t)[0]
        return t + n_move * self.period_ns

    def count(
        self,
        batch: list[RecordedMessage],
        docs: _Documents,
        seq_num: int,
        expected: NDArray[np.float64],
        scale: float,
        background: float,
        omega: float,
        t: int,
    ) -> int:
        """Count at ``omega`` (degrees) from ``t`` (ns): events, 1 Hz readbacks with jitter,
        then the orientation's bluesky Event. Appends to ``batch`` (sorted by time, the Event
        last); returns the time after."""
        plan, clock = self.plan, self.clock
        n_pulses = self.n_pulses
        count_start = t
        msgs, n_ev, charge = self.pulses(expected, scale, background, n_pulses, t)
        batch += msgs
        position: dict[str, object] = {}
        if not plan.powder:  # a powder sample has no goniometer to read back
            readbacks = omega + 0.002 * self.rng.standard_normal(max(1, int(plan.count_time)))
            for i, value in enumerate(readbacks):
                batch.append(clock.f144("omega", value, t + i * 10**9))
            position = {"omega": float(np.mean(readbacks)), "omega_setpoint": omega}
        t += n_pulses * self.period_ns
        count_stop = t
        batch.sort(key=lambda m: m.timestamp_ns)
        data: dict[str, object] = {
            **position,
            "count_start": count_start / 1e9,
            "count_stop": count_stop / 1e9,
            # exact pulse-time edges: float seconds near 1.8e9 s resolve only ~240 ns
            "count_start_ns": int(count_start),
            "count_stop_ns": int(count_stop),
            "count_time": (count_stop - count_start) / 1e9,
            "proton_charge": charge,
            "events": n_ev,
        }
        batch.append(clock.bluesky("event", docs.event(seq_num, data, count_stop), count_stop))
        return t

    def pulses(
        self,
        expected: NDArray[np.float64],
        scale: float,
        background: float,
        n_pulses: int,
        t0: int,
    ) -> tuple[list[RecordedMessage], int, float]:
        """ev44 + proton-charge messages for ``n_pulses`` pulses from ``t0``; (msgs, events,
        uC)."""
        plan, clock, rng = self.plan, self.clock, self.rng
        charge = plan.proton_charge * (1.0 + 0.01 * rng.standard_normal(n_pulses))
        charge = np.maximum(charge, 0.0)
        mean_charge = plan.proton_charge
        # counts scale with the delivered charge relative to the nominal
        factor = float(charge.sum() / (mean_charge * n_pulses)) if n_pulses else 0.0
        batch = self.sim.sample(
            expected, scale * factor, background * factor, n_pulses, rng, charge
        )
        pulse_times = t0 + self.period_ns * np.arange(n_pulses, dtype=np.int64)
        starts = np.searchsorted(batch.pulse_index, np.arange(n_pulses + 1))
        out: list[RecordedMessage] = []
        ppm = plan.pulses_per_message
        for p0 in range(0, n_pulses, ppm):
            p1 = min(p0 + ppm, n_pulses)
            a, b = starts[p0], starts[p1]
            payload = serialise_ev44(
                self.source,
                clock.message_id,
                pulse_times[p0:p1],
                (starts[p0:p1] - a).astype(np.int32),
                batch.tof_ns[a:b],
                batch.pixel_id[a:b],
            )
            clock.message_id += 1
            clock.n_events += int(b - a)
            out.append(clock.msg(clock.t_events, int(pulse_times[p0]), payload, "ev44"))
            out += self.monitor_messages(pulse_times[p0:p1], charge[p0:p1])
            for p in range(p0, p1):  # one f144 per pulse, stamped with the pulse time
                out.append(clock.f144("proton_charge", float(charge[p]), int(pulse_times[p])))
        return out, batch.n_events, float(charge.sum())

    def monitor_messages(
        self, pulse_times: NDArray[np.int64], charge: NDArray[np.float64]
    ) -> list[RecordedMessage]:
        """One ev44 message per monitor over these pulses (ns; charges in uC): Poisson
        counts of ``counts_per_uC`` x charge per pulse, times of flight
        (L1 + distance) / v_i (ns) with a Gaussian spread of :data:`MONITOR_TOF_SPREAD_NS`,
        pixel ids the monitor's id."""
        if not self.monitors or self.monitor_rng is None:
            return []
        clock, rng = self.clock, self.monitor_rng
        speed = float(energy_to_speed(self.sim.ei))  # m/s
        out = []
        for m in self.monitors:
            counts = rng.poisson(m.counts_per_uC * charge)
            n = int(counts.sum())
            t0 = (self.sim.instrument.l1 + m.distance) / speed * 1e9
            tof = np.maximum(t0 + MONITOR_TOF_SPREAD_NS * rng.standard_normal(n), 0.0)
            index = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
            msg_id = clock.monitor_message_id.get(m.source, 0)
            clock.monitor_message_id[m.source] = msg_id + 1
            payload = serialise_ev44(
                m.source,
                msg_id,
                pulse_times,
                index,
                tof.astype(np.int32),
                np.full(n, m.pixel_id, dtype=np.int32),
            )
            clock.n_monitor_events += n
            out.append(clock.msg(clock.streams.monitor_topic, int(pulse_times[0]), payload, "ev44"))
        return out
