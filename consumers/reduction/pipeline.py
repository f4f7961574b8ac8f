"""One run's data path, message by message: decode -> segment -> fold -> accumulate.

The same object serves the offline fold of a recorded file and the live Kafka consumer,
so both give identical results. It holds no I/O: callers feed it messages and save its
:meth:`RunPipeline.state` in checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from streaming_data_types.run_start_pl72 import deserialise_pl72
from streaming_data_types.run_stop_6s4t import deserialise_6s4t

from consumers.exceptions import ConsumerError
from consumers.reduction.accumulate import OrientationRecord, RunAccumulator, Snapshot
from consumers.reduction.folding import DROP_REASONS, Folder
from consumers.reduction.moments import (
    BinMoments,
    MomentsRing,
    StructureConstants,
    orientation_moments,
    star_operations,
    structure_constants,
)
from consumers.reduction.nexus_setup import NexusSetup, read_nexus_setup
from consumers.reduction.powder import PowderFolder
from consumers.reduction.segment import Chunk, Segmenter
from consumers.reduction.table import FoldTable
from consumers.streams import InstrumentConfig, StreamTally, preset
from consumers.wire import (
    decode_bluesky,
    decode_ev44,
    decode_f144,
    ev44_source,
    loads_json,
    msgpack_document_name,
)
from simulations.instrument.spectrometer import Instrument, Orientation
from simulations.lattice.grid import ZoneClasses, make_class_grid, make_wedge_grid, zone_classes
from simulations.lattice.materials import MaterialSetup, setup

__all__ = [
    "ANGLE_DECIMALS",
    "BLUESKY_SCHEMAS",
    "MAX_IN_FLIGHT",
    "MAX_PULSE_CHARGE",
    "MalformedMessage",
    "RunPipeline",
    "coverage_angle",
    "run_folder",
    "run_key_of",
    "sample_kind_of",
    "schema_of",
]

logger = logging.getLogger(__name__)

#: Closed orientations waiting for the background fold, at most.
MAX_IN_FLIGHT = 4

#: An orientation's coverage and moments (they depend on its angle alone) are computed at
#: its angle rounded to this many decimals of a degree, so that they can be prepared while
#: it counts, for the goniometer's setpoint (:meth:`RunPipeline.handle`), and are the same
#: whether they were or not. The angle (the readbacks' mean in bluesky mode, the setpoint
#: in omega mode) moves by at most 0.005 deg, below a goniometer's accuracy and far below
#: a crystal's mosaic; the events are folded at the angle itself. A Ge coverage moved by
#: 0.005 deg changes by 1.4e-4 in total and by 1.1 % per bin (median): its sampling of the
#: detector's trajectories redrawn, whose own error is 1.8 % per bin. The readbacks' mean
#: of a simulated count is 3e-4 deg (60 s) to 1e-3 deg (5 s) from its setpoint.
ANGLE_DECIMALS = 2


def coverage_angle(omega: float) -> float:
    """An angle (degrees) as its coverage and moments are computed (:data:`ANGLE_DECIMALS`;
    -0.0 as 0.0, so that both are one cache key)."""
    return round(float(omega), ANGLE_DECIMALS) + 0.0


#: Setpoints whose preparation is kept (the next one can arrive before the current
#: orientation closes).
RECENT_SETPOINTS = 3

#: The longest a setpoint's preparation waits while :attr:`RunPipeline.hold_preparation`
#: holds it (s): the last orientation's estimate then has the cores.
PREPARE_HOLD_S = 10.0
#: How long a preparation first waits for the close that comes with its setpoint (s), and
#: how often it then asks whether it may start.
_HOLD_POLL_S = 0.05

#: Largest proton charge of one pulse (uC) taken as real: far above any source's (ESS
#: ~4 uC, SNS ~23 uC), and low enough that an orientation's sum cannot overflow.
MAX_PULSE_CHARGE = 1e6

# counts (n_q, n_E), coverage (n_q, n_E), dropped (4,), seconds, moments (unit charge), and
# for a run split by zone class, the path's coverage (counts, coverage and moments are the
# classes', on n_q * n_classes rows)
_Folded = tuple[
    NDArray[np.float64],
    NDArray[np.float64],
    NDArray[np.int64],
    float,
    BinMoments | None,
    NDArray[np.float64] | None,
]

# what an orientation's fold needs of its angle alone: the moments (by zone class when the
# run is split, else the path's; None without constants) and the path's coverage
_AngleParts = tuple[BinMoments | None, NDArray[np.float64]]

_FLATBUFFER_IDS = {"ev44", "f144", "pl72", "6s4t"}

#: The schemas of bluesky documents: JSON with a header, bluesky-kafka's msgpack without.
BLUESKY_SCHEMAS = ("bluesky-json", "bluesky-msgpack")


#: The kinds of sample a run start can announce (:func:`sample_kind_of`).
SAMPLE_KINDS = ("single_crystal", "powder")


def sample_kind_of(meta: dict[str, Any], nexus: NexusSetup | None = None) -> str:
    """``"single_crystal"`` or ``"powder"``: from the ``nexus_structure`` when it was read
    (:attr:`NexusSetup.sample_kind`), else the metadata's ``sample_kind`` (a run start
    from before it was written is a single crystal's).

    Raises
    ------
    ValueError
        For a ``sample_kind`` that is neither.
    """
    kind = nexus.sample_kind if nexus is not None else str(meta.get("sample_kind", SAMPLE_KINDS[0]))
    if kind not in SAMPLE_KINDS:
        raise ValueError(f"sample_kind {kind!r} is not one of {', '.join(SAMPLE_KINDS)}")
    return kind


def run_folder(
    meta: dict[str, Any],
    *,
    tolerance: float = 0.05,
    voxels: int = 96,
    nexus: NexusSetup | None = None,
    instrument_file: str | Path | None = None,
    wedge_mesh: int | None = None,
) -> tuple[MaterialSetup, Folder | PowderFolder]:
    """The material set-up and the folder of a run start: from ``nexus`` (read from its
    ``nexus_structure`` by :func:`~consumers.reduction.nexus_setup.read_nexus_setup`) when
    given, else from its metadata (``material``, ``instrument``, ``orientation`` u and v,
    ``ei_meV``). ``instrument_file``: the pixel table or instrument definition the run's
    instrument came from, when it is not where the metadata say
    (:meth:`Instrument.from_metadata`). ``wedge_mesh``: bin a single crystal on the whole
    irreducible wedge instead of the q-path, the irreducible points of a Gamma-centred
    ``wedge_mesh^3`` mesh (:func:`~simulations.lattice.grid.make_wedge_grid`; every event
    of the zone in the energy window is folded, ``tolerance`` is then the mesh's radius).

    A powder sample (:func:`sample_kind_of`) gets a
    :class:`~consumers.reduction.powder.PowderFolder` on the material's powder grid at the
    run's Ei (:meth:`MaterialSetup.powder_grid`): no orientation, no fold table.

    Raises
    ------
    ValueError, KeyError
        For metadata that give no usable set-up.
    NexusStructureError
        For a ``nexus`` whose UB does not fit its material.
    SimulationError
        For a material that is not shipped.
    """
    powder = sample_kind_of(meta, nexus) == "powder"
    if nexus is not None:
        ms = setup(nexus.material)
        ins = nexus.instrument()
        ei = nexus.ei
        if powder:
            return ms, PowderFolder(ms.powder_grid(ei), ins, ei)
        orientation = nexus.orientation(ms.crystal)
    else:
        ms = setup(str(meta["material"]))
        ins = Instrument.from_metadata(meta["instrument"], instrument_file)
        if powder:
            if "ei_meV" not in meta:
                raise ValueError("a powder run start without Ei (ei_meV): its |Q| is unknown")
            ei = float(meta["ei_meV"])
            if not (np.isfinite(ei) and ei > 0):
                raise ValueError(f"Ei = {ei} meV")
            return ms, PowderFolder(ms.powder_grid(ei), ins, ei)
        o = meta["orientation"]
        orientation = Orientation.from_vectors(ms.crystal, tuple(o["u"]), tuple(o["v"]))
        if not np.all(np.isfinite(orientation.ub)):
            raise ValueError(f"orientation vectors u={o['u']}, v={o['v']} give no UB matrix")
        ei = float(meta["ei_meV"])
    if not np.isfinite(ei):
        raise ValueError(f"Ei = {ei} meV")
    grid = ms.grid
    if wedge_mesh is not None:
        grid, tolerance = make_wedge_grid(ms.crystal, ms.grid.energy_edges, wedge_mesh)
    table = FoldTable.cached(ms.crystal, grid, tolerance=tolerance, voxels=voxels)
    return ms, Folder(table, grid, ins, orientation, ei)


def run_key_of(schema: str, key: bytes | None) -> bytes | None:
    """The message key as a run id: None for bluesky-kafka's msgpack documents, which are
    keyed by their publisher (a fixed key or the RunStart uid, never the pl72 run id)."""
    return None if schema == "bluesky-msgpack" else key


class MalformedMessage(ConsumerError):
    """A message that cannot be used; ``reason`` is the counter label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def schema_of(headers: Any, payload: bytes) -> str:
    """The message's schema: its ``schema`` header, else the flatbuffer file identifier
    (ev44, f144, pl72, 6s4t at bytes 4:8), else ``bluesky-msgpack`` for bluesky-kafka's
    msgpack ``(name, doc)`` (:func:`consumers.wire.msgpack_document_name`), else
    ``unknown``."""
    for k, v in headers or ():
        if k == "schema":
            return bytes(v).decode(errors="replace")
    ident = payload[4:8].decode("ascii", errors="replace")
    if ident in _FLATBUFFER_IDS:
        return ident
    return "bluesky-msgpack" if msgpack_document_name(payload) else "unknown"


class RunPipeline:
    """Decode, segment, fold and accumulate the messages of one run.

    Parameters
    ----------
    mode
        Segmentation: ``"bluesky"``, ``"omega"`` or ``"auto"`` (bluesky when the run
        start names a bluesky topic).
    tolerance
        Distance to the q-path, 1/Angstrom.
    voxels
        Fold-table voxels per axis.
    instrument_file
        The pixel table or instrument definition (IDF) the run's instrument came from,
        when it is not where the run start says (and, for an IDF, not in the cache).
    wedge_mesh
        Fold a single crystal's events on the whole irreducible wedge (the irreducible
        points of a Gamma-centred mesh of this many points per axis) instead of the
        q-path (:func:`run_folder`); its moments follow.
    zone_classes
        Split the q-path's bins of a single crystal by the structure-factor class of each
        event's zone (:func:`~simulations.lattice.grid.zone_classes`,
        :meth:`Folder.fold_classes`) for the refinement: counts, exposure and moments on
        the grid of :func:`~simulations.lattice.grid.make_class_grid` in :attr:`split`,
        their sum over classes (the path's I(q, E)) in :attr:`acc` as without the split;
        snapshots carry both (:attr:`Snapshot.class_counts`). ``True`` refuses a run that
        cannot be split (a powder, a material without reference force constants);
        ``"auto"`` (the live service's default) splits the runs that can be and that have
        more than one class, and folds the others on the path alone.
    background
        Fold closed orientations (fold kernel and coverage, both without the GIL) on a
        worker thread while the caller goes on decoding messages; results are added in the
        order the orientations closed, so they are the same either way. A pipeline with
        orientations in flight has no consistent :meth:`state`: callers checkpoint when
        :attr:`in_flight` is 0 (or :meth:`collect` with ``block``). With it, the coverage
        and moments of the goniometer's setpoint are also computed on a second thread as
        soon as the setpoint is announced, while the orientation counts, so that closing it
        leaves only its events to fold (without it they are computed at the close: the
        same values either way, :data:`ANGLE_DECIMALS`).
    streams
        Which (topic, source) is which (:class:`consumers.streams.InstrumentConfig`); the
        caller passes each message's topic to :meth:`handle`. Without it, streams are told
        apart by source name alone, as the project's simulator names them (``omega``,
        ``omega_setpoint``, ``proton_charge``; every ev44 source is a detector, but the
        monitors the run start names). Its ``normalisation`` (and ``monitor``) chooses the
        exposure weight of each orientation: proton charge or beam-monitor counts
        (:class:`~consumers.reduction.accumulate.RunAccumulator`).
    """

    def __init__(
        self,
        *,
        mode: str = "auto",
        tolerance: float = 0.05,
        voxels: int = 96,
        background: bool = True,
        moments: bool = True,
        streams: InstrumentConfig | None = None,
        instrument_file: str | Path | None = None,
        wedge_mesh: int | None = None,
        zone_classes: bool | str = False,
    ) -> None:
        self.mode = mode
        #: the streams' roles; ``_by_topic`` False matches by source name only
        self.streams = streams if streams is not None else preset("simulator", "any")
        self._by_topic = streams is not None
        self.tally = StreamTally(self.streams, warn_missing=streams is not None)
        #: monitor events of the run, by (topic, source)
        self.monitor_events: Counter[str] = Counter()
        #: the file the run's instrument came from, when not where the run start says
        self.instrument_file = instrument_file
        #: take the per-bin moments of the refinement (:mod:`consumers.reduction.moments`)
        self.take_moments = bool(moments)
        self._constants: StructureConstants | None = None
        self._inverse_ops: NDArray[np.float64] | None = None
        self.background = bool(background)
        self._pool: ThreadPoolExecutor | None = None
        self._jobs: deque[tuple[Chunk, Future[_Folded]]] = deque()
        #: coverage and moments being prepared for the last goniometer setpoints, by angle
        #: (:data:`ANGLE_DECIMALS`), oldest first
        self._prepared: dict[float, Future[_AngleParts]] = {}
        self._prep_pool: ThreadPoolExecutor | None = None
        #: set when the orientation at that angle closed: its preparation waits no more
        self._needed: dict[float, threading.Event] = {}
        #: while this returns True, a setpoint's preparation waits (at most
        #: :data:`PREPARE_HOLD_S`, and not once its own orientation has closed); the
        #: service holds it while a closed orientation is on its way to its estimate, which
        #: then has the cores (~1 s of one core that it shared at the close). None: never.
        self.hold_preparation: Callable[[], bool] | None = None
        #: closed orientations not yet handed over (:meth:`handed_over`) with
        #: ``keep_snapshots``; folded and collected without it
        self.awaiting_handover = 0
        #: seconds of each collected orientation's fold at its close: its events, and its
        #: coverage and moments where they were not prepared during its count (the caller
        #: drains it)
        self.fold_seconds: list[float] = []
        #: with ``keep_snapshots``: the cumulative spectrum as it stood after each collected
        #: orientation, by index (the caller pops them)
        self.keep_snapshots = False
        #: orientations whose fold failed (lost; see :meth:`collect`)
        self.failed: list[dict[str, Any]] = []
        #: orientations whose moments :meth:`restore` computed again (not in the saved ones)
        self.moments_recomputed = 0
        self.snapshots: dict[int, Snapshot] = {}
        #: with ``keep_snapshots``: wall time (s since the epoch) at which each collected
        #: orientation closed, by index (the caller pops them; latency measurements)
        self.closed_at: dict[int, float] = {}
        self._closed: deque[float] = deque()
        self.tolerance = float(tolerance)
        self.voxels = int(voxels)
        self.wedge_mesh = wedge_mesh
        if zone_classes not in (True, False, "auto"):
            raise ValueError(f"zone_classes must be True, False or 'auto', got {zone_classes!r}")
        #: split the path's bins by zone class (:meth:`Folder.fold_classes`): True, False or
        #: "auto" (where the run can be split)
        self.zone_classes: bool | str = zone_classes
        if zone_classes is True and (wedge_mesh is not None or not self.take_moments):
            raise ValueError("zone classes split the q-path's bins, with their moments")
        #: the zone classes of a run split by them (set at its run start), else None
        self.classes: ZoneClasses | None = None
        #: with :attr:`classes`: the run's counts, exposure and moments split by zone class
        #: (:func:`~simulations.lattice.grid.make_class_grid`'s grid); :attr:`acc` holds
        #: their sum over classes
        self.split: RunAccumulator | None = None
        #: a restored run's split (its checkpoint's, whatever ``zone_classes`` says)
        self._restored_split: bool | None = None
        #: keep each orientation's split counts (a recorded run's file writes them)
        self.split_orientations = False
        self.meta: dict[str, Any] | None = None
        #: the set-up read from the run start's ``nexus_structure`` (its stream names
        #: included), or None when it came from the private metadata
        self.nexus: NexusSetup | None = None
        self._nexus_text: str | None = None
        self.segmenter: Segmenter | None = None
        self.folder: Folder | PowderFolder | None = None
        self.acc: RunAccumulator | None = None
        self.stopped = False
        self.n_events = 0
        self._run_key = b""

    @property
    def run_key(self) -> bytes:
        """The message key of this run (its run id), empty before the run start."""
        return self._run_key

    # -- messages ----------------------------------------------------------------------------

    def handle(
        self,
        schema: str,
        payload: bytes,
        timestamp_ns: int,
        key: bytes | None = None,
        topic: str = "",
    ) -> list[OrientationRecord]:
        """Feed one message (from ``topic``); returns the orientations it completed.

        Messages keyed with another run's id (the simulated instrument keys every message
        with its run id) are refused as ``other_run`` when the streams are keyed by run;
        bluesky-kafka's msgpack documents are keyed by their publisher (a fixed key or the
        RunStart uid, never the pl72 run id), so their key is not compared, as for 0MQ
        documents, which have none. An f144 or ev44 source that the streams do not map is
        counted (:attr:`tally`) and skipped.

        Raises
        ------
        MalformedMessage
            For a message that cannot be decoded or used (the caller counts it, logs it
            and dead-letters it; the pipeline's state is unchanged).
        """
        try:
            if schema == "pl72":
                return self._run_start(payload)
            if schema == "unknown":
                raise MalformedMessage("unknown_schema", "not ev44, f144, pl72, 6s4t or bluesky")
            if self.segmenter is None:
                raise MalformedMessage("before_run_start", f"{schema} message before pl72")
            key = run_key_of(schema, key) if self.streams.keyed_by_run else None
            if key and self._run_key and key != self._run_key:
                raise MalformedMessage("other_run", f"key {key!r} is not this run's")
            where = topic if self._by_topic else ""
            if schema == "ev44":
                role, source = self._ev44_role(where, payload)
                if role not in ("detector", "monitor"):
                    self.tally.count(where, source, role)  # skipped, not refused
                    return self.collect()
                ref_time, ref_index, tof_raw, pixel_id = decode_ev44(payload)
                tof = np.asarray(tof_raw)
                index = np.asarray(ref_index, dtype=np.int64)
                pulses = np.asarray(ref_time)
                if (
                    len(pixel_id) != len(tof)
                    or len(pulses) != len(index)
                    or (len(tof) and (len(index) == 0 or index[0] != 0))
                    or (len(index) and (index.max() > len(tof) or np.any(np.diff(index) < 0)))
                ):
                    raise MalformedMessage(
                        "malformed_ev44",
                        "inconsistent arrays (pixel ids, times of flight, pulse times and "
                        "their start indices)",
                    )
                self.tally.count(where, source, role)  # valid: counted as it is used
                if role == "monitor":
                    self.monitor_events[f"{where}/{source}" if where else source] += len(tof)
                    chunks = self.segmenter.on_monitor(source, pulses, index, len(tof))
                else:
                    self.n_events += len(tof)
                    chunks = self.segmenter.on_events(ref_time, ref_index, tof, pixel_id)
            elif schema == "f144":
                source, raw, t_ns = decode_f144(payload)
                role = self.streams.role(where, source)
                if role not in ("proton_charge", "goniometer", "goniometer_setpoint"):
                    self.tally.count(where, source, role)  # skipped, not refused
                    return self.collect()
                value = float(raw)  # type: ignore[arg-type]
                if not np.isfinite(value):
                    raise MalformedMessage("non_finite", f"f144 {source} = {value}")
                if role == "proton_charge":
                    if value < 0:
                        raise MalformedMessage("negative_charge", f"proton_charge {value}")
                    if value > MAX_PULSE_CHARGE:
                        raise MalformedMessage("huge_charge", f"proton_charge {value} uC")
                self.tally.count(where, source, role)  # refused messages leave no trace
                if role == "proton_charge":
                    chunks = self.segmenter.on_charge(t_ns, value)
                else:
                    name = "omega" if role == "goniometer" else "omega_setpoint"
                    chunks = self.segmenter.on_omega(name, value, t_ns)
                    if role == "goniometer_setpoint":
                        self._prepare(value)  # best effort: never refuses the message
            elif schema == "6s4t":
                deserialise_6s4t(payload)  # a run stop must at least be one
                self.segmenter.on_stop(timestamp_ns)
                self.stopped = True
                for line in self.tally.warnings():  # a misnamed stream shows at the run's end
                    logger.warning("run %s: %s", (self.meta or {}).get("run_id"), line)
                chunks = []
            elif schema in BLUESKY_SCHEMAS:
                name, doc = decode_bluesky(schema, payload)
                chunks = self.segmenter.on_bluesky(name, doc)
            else:
                raise MalformedMessage("unknown_schema", f"schema {schema!r}")
        except MalformedMessage:
            raise
        except Exception as exc:
            reason = "malformed_bluesky" if schema == "bluesky-msgpack" else f"malformed_{schema}"
            raise MalformedMessage(reason, str(exc)) from exc
        for c in chunks:
            self._submit(c)
        return self.collect()

    def role(self, topic: str, source: str) -> str | None:
        """The role of ``source`` on ``topic`` in this run's streams (by source name alone
        when the pipeline was given no instrument config)."""
        return self.streams.role(topic if self._by_topic else "", source)

    def _ev44_role(self, where: str, payload: bytes) -> tuple[str | None, str]:
        """The role and source name of an ev44 message (the caller counts it once it is
        known to be usable: a refused message leaves no trace)."""
        try:
            source = ev44_source(payload)
        except Exception as exc:
            raise MalformedMessage("malformed_ev44", str(exc)) from exc
        # without topics, every ev44 source the streams do not name is a detector's
        return self.streams.role(where, source) or (None if where else "detector"), source

    def finish(self) -> list[OrientationRecord]:
        """The run is over and every message is in: close the remaining windows and wait
        for every orientation."""
        if self.segmenter is None:
            return []
        for c in self.segmenter.flush():
            self._submit(c)
        return self.collect(block=True)

    @property
    def in_flight(self) -> int:
        """Closed orientations still being folded in the background."""
        return len(self._jobs)

    def collect(self, *, block: bool = False) -> list[OrientationRecord]:
        """Add the orientations whose fold is done, in the order they closed; with
        ``block``, wait for all of them. Returns the completed orientations.

        An orientation whose fold raised (a bug, never bad input: that is refused before)
        is lost: it is logged with its angle and window and listed in :attr:`failed`, and
        the others go on.
        """
        out: list[OrientationRecord] = []
        assert self.acc is not None or not self._jobs
        while self._jobs and (block or self._jobs[0][1].done()):
            chunk, job = self._jobs.popleft()
            t_closed = self._closed.popleft()
            try:
                counts, coverage, dropped, seconds, moments, path_coverage = job.result()
            except Exception as exc:
                logger.exception(
                    "orientation at omega %s [%d, %d) could not be folded; it is lost",
                    chunk.omega,
                    chunk.start_ns,
                    chunk.stop_ns,
                )
                self.failed.append(
                    {
                        "omega": chunk.omega,
                        "start_ns": chunk.start_ns,
                        "stop_ns": chunk.stop_ns,
                        "events": len(chunk.pixel_id),
                        "error": f"{type(exc).__name__}: {exc}",
                    }
                )
                self.handed_over()  # nothing of it is handed over
                continue
            assert self.acc is not None
            common: dict[str, Any] = {
                "omega": chunk.omega,
                "proton_charge": chunk.proton_charge,
                "events": len(chunk.pixel_id),
                "dropped": dict(zip(DROP_REASONS, map(int, dropped), strict=True)),
                "monitor_counts": chunk.monitor_counts,
                "monitor_incomplete": chunk.monitor_incomplete,
            }
            if self.keep_snapshots:  # each snapshot keeps its set: new sets, recycled
                for holder in (self.acc, self.split):
                    if holder is not None and holder.moments is not None:
                        holder.moments_ring = holder.moments_ring or MomentsRing()
            if self.split is not None:  # the classes' counts; the path's are their sum
                assert self.classes is not None
                self.split.add(counts, coverage, moments=moments, **common)
                assert path_coverage is not None
                counts = self.classes.merge(counts)
                coverage = path_coverage  # as unsplit (the classes' sum to rounding)
                moments = None
            out.append(self.acc.add(counts, coverage, moments=moments, **common))
            self.fold_seconds.append(seconds)
            if self.keep_snapshots:
                self.snapshots[out[-1].index] = self.snapshot()
                self.closed_at[out[-1].index] = t_closed
            else:  # no snapshot to hand over
                self.handed_over()
        return out

    def snapshot(self) -> Snapshot:
        """The run's cumulative spectrum (the path's), with the zone classes' counts and
        moments when the run is split by them (:attr:`Snapshot.class_counts`).

        Raises
        ------
        ConsumerError
            Before the run start.
        """
        if self.acc is None:
            raise ConsumerError("no run has started: there is no spectrum yet")
        snap = self.acc.snapshot()
        if self.split is None:
            return snap
        assert self.classes is not None
        moments = self.split.moments
        if moments is not None and self.split.moments_ring is None:  # else never changed
            moments = moments.copy()
        return dataclasses.replace(
            snap,
            moments=moments,
            class_counts=self.split.counts.copy(),
            n_classes=self.classes.n_classes,
        )

    def close(self) -> None:
        """Stop the background worker (waiting for the fold in progress; orientations
        not collected are dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._prep_pool is not None:  # no fold waits for it any more
            self._prep_pool.shutdown(wait=False, cancel_futures=True)
            self._prep_pool = None
        self._prepared.clear()
        self._needed.clear()
        self._jobs.clear()
        self._closed.clear()
        self.awaiting_handover = 0

    def handed_over(self, n: int = 1) -> None:
        """``n`` collected orientations' snapshots were handed over (the caller's
        estimate of them is done or under way): held preparations may start."""
        self.awaiting_handover = max(0, self.awaiting_handover - int(n))

    # -- internals ---------------------------------------------------------------------------

    def _run_start(self, payload: bytes) -> list[OrientationRecord]:
        try:
            pl72 = deserialise_pl72(payload)
            meta = loads_json(pl72.metadata) if pl72.metadata else {}
            if not isinstance(meta, dict):
                raise ValueError("the metadata is not a JSON object")
        except Exception as exc:
            raise MalformedMessage("malformed_pl72", str(exc)) from exc
        if self.meta is not None:
            raise MalformedMessage(
                "second_run_start", f"run {meta.get('run_id')} while {self.meta.get('run_id')}"
            )
        self._setup(meta, pl72.nexus_structure or None, job_id=pl72.job_id or "")
        assert self.segmenter is not None
        return []

    def _set_up_folder(
        self, meta: dict[str, Any], nexus_structure: str | None
    ) -> tuple[NexusSetup | None, MaterialSetup, Folder | PowderFolder]:
        """The set-up from the ``nexus_structure`` when it gives a complete one, else from
        the private metadata (logged when the structure was refused)."""
        if nexus_structure:
            try:
                nexus = read_nexus_setup(nexus_structure)
                return nexus, *run_folder(
                    meta,
                    tolerance=self.tolerance,
                    voxels=self.voxels,
                    nexus=nexus,
                    wedge_mesh=self.wedge_mesh,
                )
            except Exception as exc:
                if "material" not in meta:
                    raise
                logger.warning(
                    "run %s: set-up from the run start's metadata; its nexus_structure is "
                    "not used: %s",
                    meta.get("run_id"),
                    exc,
                )
        return None, *run_folder(
            meta,
            tolerance=self.tolerance,
            voxels=self.voxels,
            instrument_file=self.instrument_file,
            wedge_mesh=self.wedge_mesh,
        )

    def _setup(
        self, meta: dict[str, Any], nexus_structure: str | None = None, *, job_id: str = ""
    ) -> None:
        # everything is built before anything is kept: a run start that fails here leaves
        # the pipeline waiting for a usable one
        nexus, ms, folder = self._set_up_folder(meta, nexus_structure)
        if nexus is not None and "material" not in meta:  # no private metadata (a facility)
            meta = {"run_id": job_id, **nexus.summary(), **meta}
        mode = self.mode
        powder = isinstance(folder, PowderFolder)
        if mode == "auto":
            mode = "bluesky" if powder or "bluesky" in meta.get("topics", {}) else "omega"
        if powder and mode != "bluesky":
            raise ValueError(
                "a powder run has no goniometer: it is cut into steps by its bluesky Events; "
                "consume its bluesky documents (segmentation bluesky or auto)"
            )
        named = self._run_start_streams(meta, nexus)
        streams = self._streams_of(named)
        monitors = tuple(
            dict.fromkeys(
                [
                    *(s for _, s in streams.sources("monitor") if s != "*"),
                    *(s for _, s in named.get("monitor", [])),
                ]
            )
        )
        try:
            norm_monitor = streams.normalisation_monitor(monitors)
        except ConsumerError as exc:
            raise ValueError(str(exc)) from exc
        segmenter = Segmenter(mode, monitors=monitors, powder=powder)
        # the refinement's moments are a single crystal's (per path point and branch)
        constants = self._moment_constants(meta, ms) if self.take_moments and not powder else None
        classes = self._classes_of(meta, ms, folder, constants)
        self.meta = meta
        self.nexus = nexus
        self._nexus_text = nexus_structure if nexus is not None else None
        if streams is not self.streams:
            self.streams = self.tally.config = streams
        self._run_key = str(meta.get("run_id", "")).encode()
        self.folder = folder
        self.classes = classes
        self.acc = RunAccumulator(
            folder.grid, normalisation=streams.normalisation, monitor=norm_monitor
        )
        self.split = None
        self.segmenter = segmenter
        self._constants = constants
        if constants is not None:
            assert isinstance(folder, Folder)
            self._inverse_ops = star_operations(folder, constants.operations)
            target = self.acc
            if classes is not None:  # the moments are the split's; the path keeps none
                target = self.split = RunAccumulator(
                    make_class_grid(folder.grid, classes),
                    normalisation=streams.normalisation,
                    monitor=norm_monitor,
                    keep_orientations=self.split_orientations,
                )
            n_bins = target.grid.n_q * target.grid.n_e
            target.moments = BinMoments.zeros(n_bins, constants.n_branches)

    def _classes_of(
        self,
        meta: dict[str, Any],
        ms: MaterialSetup,
        folder: Folder | PowderFolder,
        constants: StructureConstants | None,
    ) -> ZoneClasses | None:
        """The zone classes a run is split by (see ``zone_classes``), or None."""
        wanted = self.zone_classes if self._restored_split is None else self._restored_split
        if not wanted or (wanted == "auto" and self.wedge_mesh is not None):
            return None
        if constants is None or not isinstance(folder, Folder):
            if wanted is True:
                raise ValueError(
                    "zone classes need a single crystal with the refinement's moments "
                    "(a shipped material's reference force constants)"
                )
            return None
        classes = zone_classes(ms.crystal)
        if wanted == "auto" and classes.n_classes < 2:
            return None  # one class: the split is the path
        logger.info(
            "run %s: the path's bins split by %d zone classes for the refinement",
            meta.get("run_id"),
            classes.n_classes,
        )
        return classes

    @staticmethod
    def _run_start_streams(
        meta: dict[str, Any], nexus: NexusSetup | None
    ) -> dict[str, list[tuple[str, str]]]:
        """The (topic, source) pairs the run start names, by role: the rotation's readback
        and set-point, the charge and the monitors from the ``nexus_structure``, else the
        metadata's ``goniometer`` and ``monitors`` (a monitor's topic may be "")."""
        named: dict[str, list[tuple[str, str]]] = {}
        if nexus is not None:
            g = nexus.goniometer
            if g is not None:  # a powder has none
                named["goniometer"] = [(g.stream.topic, g.stream.source)]
                if g.setpoint is not None:
                    named["goniometer_setpoint"] = [(g.setpoint.topic, g.setpoint.source)]
            if nexus.proton_charge is not None:
                named["proton_charge"] = [(nexus.proton_charge.topic, nexus.proton_charge.source)]
            named["monitor"] = [(m.topic, m.source) for m in nexus.monitors if m.source]
            return named
        gonio = meta.get("goniometer")
        if isinstance(gonio, dict) and gonio.get("source_name"):
            named["goniometer"] = [(str(gonio.get("topic", "")), str(gonio["source_name"]))]
        monitors = meta.get("monitors")
        if isinstance(monitors, list):
            named["monitor"] = [
                (str(m.get("topic", "")), str(m["source"]))
                for m in monitors
                if isinstance(m, dict) and m.get("source")
            ]
        return named

    def _streams_of(self, named: dict[str, list[tuple[str, str]]]) -> InstrumentConfig:
        """The streams, with those the run start names (:meth:`_run_start_streams`) added
        for the roles they leave out; a monitor named without its topic is not mapped (it
        is not on the f144 log topic a source without one goes to)."""
        named = {**named, "monitor": [(t, s) for t, s in named.get("monitor", []) if t]}
        if not self._by_topic:  # matched by source name: topics play no part
            named = {r: [("", s) for _, s in pairs] for r, pairs in named.items()}
        try:
            return self.streams.with_run_start(named, beside=not self._by_topic)
        except ConsumerError as exc:
            raise ValueError(str(exc)) from exc

    @staticmethod
    def _moment_constants(meta: dict[str, Any], ms: Any) -> StructureConstants | None:
        """The structure constants of the run's moments, or None (logged) for a material
        without reference force constants: the run is folded, only not refined."""
        from simulations.fcdb.reference import load_reference

        try:
            ref = load_reference(str(meta["material"]))
            temperature = float(meta.get("temperature_K", 5.0))
            return structure_constants(ms.basis, ref.mean, temperature)
        except Exception as exc:
            logger.warning(
                "run %s: no moments for the refinement (%s); folding goes on",
                meta.get("run_id"),
                exc,
            )
            return None

    def _submit(self, chunk: Chunk) -> None:
        """Fold a closed orientation: on the background worker, or here (``background``
        off). At most :data:`MAX_IN_FLIGHT` wait; then the reader waits for the oldest."""
        self._closed.append(time.time())
        self.awaiting_handover += 1
        angle = coverage_angle(chunk.omega)
        prepared = self._prepared.get(angle)
        needed = self._needed.get(angle)
        if needed is not None:  # its fold takes it now: held no longer
            needed.set()
        if not self.background:
            job: Future[_Folded] = Future()
            job.set_result(self._fold(chunk, angle))
            self._jobs.append((chunk, job))
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fold")
        while len(self._jobs) >= MAX_IN_FLIGHT and not self._jobs[0][1].done():
            wait([self._jobs[0][1]])
        self._jobs.append((chunk, self._pool.submit(self._fold, chunk, angle, prepared)))

    def _prepare(self, setpoint: float) -> None:
        """A goniometer setpoint (degrees): with ``background``, compute the coverage and
        moments of its angle (:data:`ANGLE_DECIMALS`) on the preparing thread while the
        orientation counts. Those of the setpoints before the last
        :data:`RECENT_SETPOINTS` are dropped (cancelled if not started). Best effort: a
        failure is logged, and the fold computes them at the close."""
        if not self.background or not isinstance(self.folder, Folder):  # a powder: none
            return
        angle = coverage_angle(setpoint)
        job = self._prepared.pop(angle, None)
        if job is not None and not (job.done() and (job.cancelled() or job.exception())):
            self._prepared[angle] = job  # a revisit: kept, now the newest
            return
        try:
            if self._prep_pool is None:
                # at the process's priority: an orientation's close may wait for it
                self._prep_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
            needed = threading.Event()
            self._prepared[angle] = self._prep_pool.submit(
                self._prepare_when_free, angle, self._setup_of(), needed
            )
            self._needed[angle] = needed
        except Exception:
            logger.exception("could not prepare omega %s: it is computed at its close", angle)
            return
        while len(self._prepared) > RECENT_SETPOINTS:
            old = next(iter(self._prepared))
            self._prepared.pop(old).cancel()
            stale = self._needed.pop(old, None)
            if stale is not None:  # a held one ends its wait (and is not used)
                stale.set()

    def _prepare_when_free(
        self, omega: float, run: tuple[Any, ...], needed: threading.Event
    ) -> _AngleParts:
        """:meth:`_angle_parts` once :attr:`hold_preparation` lets it start (the
        preparing thread): after the close that came with the setpoint has been handed
        over, when the orientation at ``omega`` closes (``needed``), or after
        :data:`PREPARE_HOLD_S`."""
        hold = self.hold_preparation
        if hold is not None:
            deadline = time.monotonic() + PREPARE_HOLD_S
            needed.wait(_HOLD_POLL_S)  # the close that comes with the setpoint
            while not needed.is_set() and time.monotonic() < deadline:
                try:
                    if not hold():
                        break
                except Exception:  # best effort: a broken hold never stops a preparation
                    logger.exception("the preparation's hold failed: preparing now")
                    break
                needed.wait(_HOLD_POLL_S)
        return self._angle_parts(omega, run)

    def _add_moments_again(self, moments: BinMoments, records: list[OrientationRecord]) -> None:
        """Add the moments of ``records``' angles to ``moments`` in order, each at the
        weight it was added with (:meth:`RunAccumulator.add`; none when it had none)."""
        todo = [r for r in records if r.weight is not None]
        self.moments_recomputed = len(todo) if self._constants is not None else 0
        if not self.moments_recomputed:
            return
        t0 = time.perf_counter()
        logger.info("computing the moments of %d orientations again", len(todo))
        folder, constants, inverse_ops, classes = self._setup_of()
        assert isinstance(folder, Folder)
        for rec in todo:
            assert rec.weight is not None
            one = orientation_moments(
                folder,
                constants,
                coverage_angle(rec.omega),
                inverse_ops=inverse_ops,
                classes=classes,
            )
            moments.add(one, rec.weight)
        logger.info(
            "moments of %d orientations computed again in %.1f s",
            len(todo),
            time.perf_counter() - t0,
        )

    def saved_moments(self) -> BinMoments | None:
        """The run's moments as :meth:`state` leaves them out (the live object: copy it
        before the next orientation is added), None when the run takes none."""
        if self.acc is None:
            return None
        return self.acc.moments if self.split is None else self.split.moments

    def _setup_of(self) -> tuple[Any, ...]:
        """What :meth:`_angle_parts` reads of the run (bound when a preparation is
        submitted, so that it never mixes two runs)."""
        return self.folder, self._constants, self._inverse_ops, self.classes

    def _angle_parts(self, omega: float, run: tuple[Any, ...] | None = None) -> _AngleParts:
        """What an orientation's fold needs of its angle alone, not of its events: the
        refinement's moments at unit charge (by zone class when the run is split; None
        without structure constants) and the path's coverage (sr meV), for ``run``
        (:meth:`_setup_of`, default the current one). Pure: the same angle gives bitwise
        the same on any thread; the moments' walk takes ~1 s of one core for Ge, the
        coverage ~0.3 s (or a cache read)."""
        folder, constants, inverse_ops, classes = self._setup_of() if run is None else run
        assert isinstance(folder, Folder)
        moments = None
        if constants is not None:
            moments = orientation_moments(
                folder, constants, omega, inverse_ops=inverse_ops, classes=classes
            )
        return moments, folder.coverage(omega)

    def _fold(
        self, chunk: Chunk, angle: float, prepared: Future[_AngleParts] | None = None
    ) -> _Folded:
        """Counts, coverage, drops and seconds of one orientation (pure: the same chunk
        gives bitwise the same result on any thread). Its events are folded at its own
        angle; its coverage and moments are ``angle``'s (the angle rounded,
        :data:`ANGLE_DECIMALS`), from ``prepared`` when that was computed during the
        count. Both kernels release the GIL."""
        assert self.folder is not None
        t0 = time.perf_counter()
        if not isinstance(self.folder, Folder):  # a powder: no goniometer, no moments
            counts, dropped = self.folder.fold(chunk.pixel_id, chunk.tof_ns, chunk.omega)
            coverage = self.folder.coverage(chunk.omega)
            return counts, coverage, dropped, time.perf_counter() - t0, None, None
        if self.classes is not None:  # counts, exposure and moments by zone class
            assert self._inverse_ops is not None
            counts, dropped = self.folder.fold_classes(
                chunk.pixel_id, chunk.tof_ns, chunk.omega, self.classes, self._inverse_ops
            )
        else:
            counts, dropped = self.folder.fold(chunk.pixel_id, chunk.tof_ns, chunk.omega)
        parts = None
        # a preparation not started yet (queued behind others) is done here instead
        if prepared is not None and not prepared.cancel():
            try:
                parts = prepared.result()
            except CancelledError:  # cancelled unstarted when setpoints ran ahead
                pass
            except Exception:
                logger.exception("preparing omega %s failed: computed again", angle)
        moments, path_coverage = parts if parts is not None else self._angle_parts(angle)
        seconds = time.perf_counter() - t0
        if self.classes is not None:
            assert moments is not None
            alias = self.classes.expand(self.folder.table.alias)
            coverage = moments.weight.reshape(counts.shape)[alias]
            return counts, coverage, dropped, seconds, moments, path_coverage
        return counts, path_coverage, dropped, seconds, moments, None

    # -- summary and state -------------------------------------------------------------------

    def summary(self) -> dict[str, object]:
        """Totals so far (JSON-ready)."""
        dropped: Counter[str] = Counter()
        folded = 0
        if self.acc is not None:
            for rec in self.acc.records:
                dropped.update(rec.dropped)
                folded += rec.folded
        if self.segmenter is not None:
            dropped["moving"] += self.segmenter.moving
        for f in self.failed:
            dropped["fold_failed"] += int(f["events"])
        records = self.acc.records if self.acc is not None else []
        per_monitor: Counter[str] = Counter()
        for rec in records:
            per_monitor.update(rec.monitor_counts)
        return {
            "orientations": len(self.acc.records) if self.acc else 0,
            "events_folded": folded,
            "events_dropped": int(sum(dropped.values())),
            "dropped_by_reason": dict(dropped),
            "segmentation": self.segmenter.mode if self.segmenter else None,
            "grid_fingerprint": self.acc.grid.fingerprint if self.acc else None,
            "monitor_events": dict(self.monitor_events),
            "normalisation": self.acc.normalisation if self.acc else None,
            "normalisation_monitor": self.acc.monitor if self.acc else None,
            "proton_charge_uC": float(sum(r.proton_charge for r in records)),
            "monitor_counts": dict(per_monitor),
            "monitor_counts_total": int(sum(per_monitor.values())),
            "monitor_outside_windows": (
                dict(self.segmenter.monitor_outside) if self.segmenter else {}
            ),
            # orientations whose monitor stream stopped before their end (warned each)
            "orientations_monitor_incomplete": sum(bool(r.monitor_incomplete) for r in records),
            "orientations_not_normalised": sum(not r.normalised for r in records),
            "streams": self.tally.summary(),
        }

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON part, arrays part) of everything needed to resume this run.

        Raises
        ------
        ConsumerError
            With orientations in flight (collect them first).
        """
        if self._jobs:
            raise ConsumerError(f"{len(self._jobs)} orientations still folding: collect first")
        if self.meta is None or self.segmenter is None or self.acc is None:
            return {"started": False, "n_events": self.n_events}, {}
        seg = self.segmenter.state()
        arrays = {f"seg_{k}": v for k, v in seg.items() if isinstance(v, np.ndarray)}
        seg_json = {k: v for k, v in seg.items() if not isinstance(v, np.ndarray)}
        arrays["counts"] = self.acc.counts
        arrays["exposure"] = self.acc.exposure
        if self.split is not None:
            arrays["class_counts"] = self.split.counts
            arrays["class_exposure"] = self.split.exposure
        # the moments (~135 MB for Ge's zone classes) are not in it: they depend on the
        # orientations' angles alone, so the consumer writes them beside the checkpoint off
        # the snapshots' path, and :meth:`restore` adds again what that file lacks
        if self._nexus_text is not None:  # the set-up's source, to be read again on restore
            arrays["nexus_structure"] = np.frombuffer(self._nexus_text.encode(), dtype=np.uint8)
        if self.acc.records:
            arrays["orient_counts"] = np.stack(self.acc.per_orientation_counts)
            arrays["orient_exposure"] = np.stack(self.acc.per_orientation_exposure)
        return {
            "started": True,
            "meta": self.meta,
            "segmenter": seg_json,
            "normalisation": [self.acc.normalisation, self.acc.monitor],
            "monitor_events": dict(self.monitor_events),
            "records": [r.to_json() for r in self.acc.records],
            "stopped": self.stopped,
            "n_events": self.n_events,
            "failed": self.failed,
            "zone_classes": 0 if self.classes is None else self.classes.n_classes,
        }, arrays

    def restore(
        self,
        js: dict[str, Any],
        arrays: dict[str, np.ndarray],
        *,
        moments: tuple[BinMoments, int] | None = None,
    ) -> None:
        """Resume from :meth:`state` output (the fold table is rebuilt).

        ``moments`` are the run's moments after its first ``n`` orientations (the
        consumer's side file, :mod:`consumers.service`); the moments of the orientations
        after them are computed again from their angles and added in the order they were
        (bitwise what the run held on the same machine and libraries; ~1-2 s an orientation
        for Ge). Without them, or when they do not fit the grid or the checkpoint, all are
        computed again (:attr:`moments_recomputed` says how many). A checkpoint that holds
        its moments (written before they moved beside it) is read as it is.
        """
        self.n_events = int(js.get("n_events", 0))
        if not js.get("started"):
            return
        nexus = arrays.get("nexus_structure")
        # the run goes on binned as it was checkpointed (a checkpoint from before the split
        # has no ``zone_classes``: the path)
        self._restored_split = bool(js.get("zone_classes", 0))
        try:
            self._setup(js["meta"], None if nexus is None else bytes(np.asarray(nexus)).decode())
        finally:
            self._restored_split = None
        assert self.acc is not None
        saved_classes = int(js.get("zone_classes", 0))
        have = 0 if self.classes is None else self.classes.n_classes
        if saved_classes != have:
            raise ConsumerError(
                f"the checkpoint's run is split by {saved_classes} zone classes, this "
                f"material by {have}: start the run afresh without the checkpoint"
            )
        saved = js.get("normalisation", ["proton_charge", None])
        if list(saved) != [self.acc.normalisation, self.acc.monitor]:
            raise ConsumerError(
                f"the checkpoint's run is normalised by {saved[0]} ({saved[1] or '-'}), this "
                f"service by {self.acc.normalisation} ({self.acc.monitor or '-'}): restart "
                "with the run's instrument config, or start the run afresh without the "
                "checkpoint"
            )
        self.monitor_events = Counter(js.get("monitor_events", {}))
        seg = dict(js["segmenter"])
        seg.update({k[4:]: v for k, v in arrays.items() if k.startswith("seg_")})
        self.segmenter = Segmenter.from_state(seg)
        self.acc.counts[:] = arrays["counts"]
        self.acc.exposure[:] = arrays["exposure"]
        holder = self.acc if self.split is None else self.split
        if self.split is not None:
            self.split.counts[:] = arrays["class_counts"]
            self.split.exposure[:] = arrays["class_exposure"]
        records = [OrientationRecord.from_json(i, r) for i, r in enumerate(js["records"])]
        inline = BinMoments.from_arrays(arrays)  # a checkpoint from before the side file
        if holder.moments is not None:
            if inline is not None:
                if inline.tensor.shape != holder.moments.tensor.shape:
                    raise ConsumerError("the checkpoint's moments do not fit this run's grid")
                holder.moments, covered = inline, len(records)
            elif moments is None:
                covered = 0
            elif moments[0].tensor.shape != holder.moments.tensor.shape or not (
                0 <= moments[1] <= len(records)
            ):
                logger.warning(
                    "the saved moments (%s, %d orientations) do not fit this run's grid or "
                    "checkpoint (%d orientations): computed again",
                    moments[0].tensor.shape,
                    moments[1],
                    len(records),
                )
                covered = 0
            else:
                holder.moments, covered = moments
            self._add_moments_again(holder.moments, records[covered:])
        for i, rec in enumerate(records):
            self.acc.per_orientation_counts.append(arrays["orient_counts"][i])
            self.acc.per_orientation_exposure.append(arrays["orient_exposure"][i])
            self.acc.records.append(rec)
            if self.split is not None:
                self.split.records.append(self.acc.records[-1])
        self.stopped = bool(js.get("stopped", False))
        self.failed = list(js.get("failed", []))
