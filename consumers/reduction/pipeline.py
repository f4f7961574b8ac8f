"""One run's data path, message by message: decode -> segment -> fold -> accumulate.

The same object serves the offline fold of a recorded file and the live Kafka consumer,
so both give identical results. It holds no I/O: callers feed it messages and save its
:meth:`RunPipeline.state` in checkpoints.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
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
    StructureConstants,
    orientation_moments,
    star_operations,
    structure_constants,
)
from consumers.reduction.segment import Chunk, Segmenter
from consumers.reduction.table import FoldTable
from consumers.wire import decode_ev44, decode_f144, loads_json
from simulations.instrument.spectrometer import Instrument, Orientation
from simulations.lattice.materials import MaterialSetup, setup

__all__ = [
    "MAX_IN_FLIGHT",
    "MAX_PULSE_CHARGE",
    "MalformedMessage",
    "RunPipeline",
    "run_folder",
    "schema_of",
]

logger = logging.getLogger(__name__)

#: Closed orientations waiting for the background fold, at most.
MAX_IN_FLIGHT = 4

#: Largest proton charge of one pulse (uC) taken as real: far above any source's (ESS
#: ~4 uC, SNS ~23 uC), and low enough that an orientation's sum cannot overflow.
MAX_PULSE_CHARGE = 1e6

# counts (n_q, n_E), coverage (n_q, n_E), dropped (4,), seconds, moments (unit charge)
_Folded = tuple[
    NDArray[np.float64], NDArray[np.float64], NDArray[np.int64], float, BinMoments | None
]

_FLATBUFFER_IDS = {"ev44", "f144", "pl72", "6s4t"}


def run_folder(
    meta: dict[str, Any],
    *,
    tolerance: float = 0.05,
    voxels: int = 96,
    instrument_file: str | Path | None = None,
) -> tuple[MaterialSetup, Folder]:
    """The material set-up and the folder of a run start's metadata (``material``,
    ``instrument``, ``orientation`` u and v, ``ei_meV``). ``instrument_file``: the pixel
    table or instrument definition the run's instrument came from, when it is not where
    the run start says (:meth:`Instrument.from_metadata`).

    Raises
    ------
    ValueError, KeyError
        For metadata that give no usable set-up.
    """
    ms = setup(str(meta["material"]))
    ins = Instrument.from_metadata(meta["instrument"], instrument_file)
    o = meta["orientation"]
    orientation = Orientation.from_vectors(ms.crystal, tuple(o["u"]), tuple(o["v"]))
    if not np.all(np.isfinite(orientation.ub)):
        raise ValueError(f"orientation vectors u={o['u']}, v={o['v']} give no UB matrix")
    ei = float(meta["ei_meV"])
    if not np.isfinite(ei):
        raise ValueError(f"Ei = {ei} meV")
    table = FoldTable.cached(ms.crystal, ms.grid, tolerance=tolerance, voxels=voxels)
    return ms, Folder(table, ms.grid, ins, orientation, ei)


class MalformedMessage(ConsumerError):
    """A message that cannot be used; ``reason`` is the counter label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def schema_of(headers: Any, payload: bytes) -> str:
    """The message's schema: its ``schema`` header, else the flatbuffer file identifier."""
    for k, v in headers or ():
        if k == "schema":
            return bytes(v).decode(errors="replace")
    ident = payload[4:8].decode("ascii", errors="replace")
    return ident if ident in _FLATBUFFER_IDS else "unknown"


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
    background
        Fold closed orientations (fold kernel and coverage, both without the GIL) on a
        worker thread while the caller goes on decoding messages; results are added in the
        order the orientations closed, so they are the same either way. A pipeline with
        orientations in flight has no consistent :meth:`state`: callers checkpoint when
        :attr:`in_flight` is 0 (or :meth:`collect` with ``block``).
    """

    def __init__(
        self,
        *,
        mode: str = "auto",
        tolerance: float = 0.05,
        voxels: int = 96,
        background: bool = True,
        moments: bool = True,
        instrument_file: str | Path | None = None,
    ) -> None:
        self.mode = mode
        #: the file the run's instrument came from, when not where the run start says
        self.instrument_file = instrument_file
        #: take the per-bin moments of the refinement (:mod:`consumers.reduction.moments`)
        self.take_moments = bool(moments)
        self._constants: StructureConstants | None = None
        self._inverse_ops: NDArray[np.float64] | None = None
        self.background = bool(background)
        self._pool: ThreadPoolExecutor | None = None
        self._jobs: deque[tuple[Chunk, Future[_Folded]]] = deque()
        #: seconds of fold + coverage of each collected orientation (the caller drains it)
        self.fold_seconds: list[float] = []
        #: with ``keep_snapshots``: the cumulative spectrum as it stood after each collected
        #: orientation, by index (the caller pops them)
        self.keep_snapshots = False
        #: orientations whose fold failed (lost; see :meth:`collect`)
        self.failed: list[dict[str, Any]] = []
        self.snapshots: dict[int, Snapshot] = {}
        #: with ``keep_snapshots``: wall time (s since the epoch) at which each collected
        #: orientation closed, by index (the caller pops them; latency measurements)
        self.closed_at: dict[int, float] = {}
        self._closed: deque[float] = deque()
        self.tolerance = float(tolerance)
        self.voxels = int(voxels)
        self.meta: dict[str, Any] | None = None
        self.segmenter: Segmenter | None = None
        self.folder: Folder | None = None
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
        self, schema: str, payload: bytes, timestamp_ns: int, key: bytes | None = None
    ) -> list[OrientationRecord]:
        """Feed one message; returns the orientations it completed.

        Messages keyed with another run's id (the simulated instrument keys every message
        with its run id) are refused as ``other_run``.

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
            if key and self._run_key and key != self._run_key:
                raise MalformedMessage("other_run", f"key {key!r} is not this run's")
            if schema == "ev44":
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
                self.n_events += len(tof)
                chunks = self.segmenter.on_events(ref_time, ref_index, tof, pixel_id)
            elif schema == "f144":
                source, raw, t_ns = decode_f144(payload)
                value = float(raw)  # type: ignore[arg-type]
                if not np.isfinite(value):
                    raise MalformedMessage("non_finite", f"f144 {source} = {value}")
                if source == "proton_charge":
                    if value < 0:
                        raise MalformedMessage("negative_charge", f"proton_charge {value}")
                    if value > MAX_PULSE_CHARGE:
                        raise MalformedMessage("huge_charge", f"proton_charge {value} uC")
                    chunks = self.segmenter.on_charge(t_ns, value)
                elif source in ("omega", "omega_setpoint"):
                    chunks = self.segmenter.on_omega(source, value, t_ns)
                else:
                    chunks = []
            elif schema == "6s4t":
                deserialise_6s4t(payload)  # a run stop must at least be one
                self.segmenter.on_stop(timestamp_ns)
                self.stopped = True
                chunks = []
            elif schema == "bluesky-json":
                name, doc = loads_json(payload)
                if not isinstance(name, str) or not isinstance(doc, dict):
                    raise ValueError("not a [name, document] pair")
                chunks = self.segmenter.on_bluesky(name, doc)
            else:
                raise MalformedMessage("unknown_schema", f"schema {schema!r}")
        except MalformedMessage:
            raise
        except Exception as exc:
            raise MalformedMessage(f"malformed_{schema}", str(exc)) from exc
        for c in chunks:
            self._submit(c)
        return self.collect()

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
                counts, coverage, dropped, seconds, moments = job.result()
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
                continue
            assert self.acc is not None
            out.append(
                self.acc.add(
                    counts,
                    coverage,
                    omega=chunk.omega,
                    proton_charge=chunk.proton_charge,
                    events=len(chunk.pixel_id),
                    dropped=dict(zip(DROP_REASONS, map(int, dropped), strict=True)),
                    moments=moments,
                )
            )
            self.fold_seconds.append(seconds)
            if self.keep_snapshots:
                self.snapshots[out[-1].index] = self.acc.snapshot()
                self.closed_at[out[-1].index] = t_closed
        return out

    def close(self) -> None:
        """Stop the background worker (waiting for the fold in progress; orientations
        not collected are dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._jobs.clear()
        self._closed.clear()

    # -- internals ---------------------------------------------------------------------------

    def _run_start(self, payload: bytes) -> list[OrientationRecord]:
        try:
            meta = loads_json(deserialise_pl72(payload).metadata)
        except Exception as exc:
            raise MalformedMessage("malformed_pl72", str(exc)) from exc
        if self.meta is not None:
            raise MalformedMessage(
                "second_run_start", f"run {meta.get('run_id')} while {self.meta.get('run_id')}"
            )
        self._setup(meta)
        assert self.segmenter is not None
        return []

    def _setup(self, meta: dict[str, Any]) -> None:
        # everything is built before anything is kept: a run start that fails here leaves
        # the pipeline waiting for a usable one
        mode = self.mode
        if mode == "auto":
            mode = "bluesky" if "bluesky" in meta.get("topics", {}) else "omega"
        ms, folder = run_folder(
            meta,
            tolerance=self.tolerance,
            voxels=self.voxels,
            instrument_file=self.instrument_file,
        )
        segmenter = Segmenter(mode)
        constants = self._moment_constants(meta, ms) if self.take_moments else None
        self.meta = meta
        self._run_key = str(meta.get("run_id", "")).encode()
        self.folder = folder
        self.acc = RunAccumulator(ms.grid)
        self.segmenter = segmenter
        self._constants = constants
        if constants is not None:
            self._inverse_ops = star_operations(folder, constants.operations)
            self.acc.moments = BinMoments.zeros(ms.grid.n_q * ms.grid.n_e, constants.n_branches)

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
        if not self.background:
            job: Future[_Folded] = Future()
            job.set_result(self._fold(chunk))
            self._jobs.append((chunk, job))
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fold")
        while len(self._jobs) >= MAX_IN_FLIGHT and not self._jobs[0][1].done():
            wait([self._jobs[0][1]])
        self._jobs.append((chunk, self._pool.submit(self._fold, chunk)))

    def _fold(self, chunk: Chunk) -> _Folded:
        """Counts, coverage, drops and seconds of one orientation (pure: the same chunk
        gives bitwise the same result on any thread). Both kernels release the GIL."""
        assert self.folder is not None
        t0 = time.perf_counter()
        counts, dropped = self.folder.fold(chunk.pixel_id, chunk.tof_ns, chunk.omega)
        coverage = self.folder.coverage(chunk.omega)
        moments = None
        if self._constants is not None:
            moments = orientation_moments(
                self.folder, self._constants, chunk.omega, inverse_ops=self._inverse_ops
            )
        return counts, coverage, dropped, time.perf_counter() - t0, moments

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
        return {
            "orientations": len(self.acc.records) if self.acc else 0,
            "events_folded": folded,
            "events_dropped": int(sum(dropped.values())),
            "dropped_by_reason": dict(dropped),
            "segmentation": self.segmenter.mode if self.segmenter else None,
            "grid_fingerprint": self.acc.grid.fingerprint if self.acc else None,
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
        if self.acc.moments is not None:
            arrays.update(self.acc.moments.arrays())
        if self.acc.records:
            arrays["orient_counts"] = np.stack(self.acc.per_orientation_counts)
            arrays["orient_exposure"] = np.stack(self.acc.per_orientation_exposure)
        return {
            "started": True,
            "meta": self.meta,
            "segmenter": seg_json,
            "records": [
                {
                    "omega": r.omega,
                    "proton_charge": r.proton_charge,
                    "events": r.events,
                    "folded": r.folded,
                    "dropped": r.dropped,
                }
                for r in self.acc.records
            ],
            "stopped": self.stopped,
            "n_events": self.n_events,
            "failed": self.failed,
        }, arrays

    def restore(self, js: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Resume from :meth:`state` output (the fold table is rebuilt)."""
        self.n_events = int(js.get("n_events", 0))
        if not js.get("started"):
            return
        self._setup(js["meta"])
        assert self.acc is not None
        seg = dict(js["segmenter"])
        seg.update({k[4:]: v for k, v in arrays.items() if k.startswith("seg_")})
        self.segmenter = Segmenter.from_state(seg)
        self.acc.counts[:] = arrays["counts"]
        self.acc.exposure[:] = arrays["exposure"]
        restored = BinMoments.from_arrays(arrays)
        if self.acc.moments is not None and restored is not None:
            if restored.tensor.shape != self.acc.moments.tensor.shape:
                raise ConsumerError("the checkpoint's moments do not fit this run's grid")
            self.acc.moments = restored
        elif self.acc.moments is not None and js.get("records"):
            # a checkpoint from before moments were taken: the refinement starts afresh
            logger.warning("checkpoint without moments: refinement covers new orientations")
        from consumers.reduction.accumulate import OrientationRecord as Rec

        for i, r in enumerate(js["records"]):
            self.acc.per_orientation_counts.append(arrays["orient_counts"][i])
            self.acc.per_orientation_exposure.append(arrays["orient_exposure"][i])
            self.acc.records.append(
                Rec(
                    index=i,
                    omega=r["omega"],
                    proton_charge=r["proton_charge"],
                    events=r["events"],
                    folded=r["folded"],
                    dropped=r["dropped"],
                )
            )
        self.stopped = bool(js.get("stopped", False))
        self.failed = list(js.get("failed", []))
