"""Fold a recorded run offline: the same decoding, segmentation and folding as the live
consumer, reading a ``.steer`` file instead of Kafka (``steer fold``)."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from streaming_data_types.eventdata_ev44 import deserialise_ev44
from streaming_data_types.logdata_f144 import deserialise_f144
from streaming_data_types.run_start_pl72 import deserialise_pl72
from tqdm import tqdm

from simulations.instrument import Instrument, Orientation
from simulations.materials import setup
from simulations.recording import RecordedMessage, RunReader

from .accumulate import RunAccumulator
from .exceptions import FoldError
from .folding import DROP_REASONS, Folder, FoldTable
from .segment import Chunk, Segmenter

__all__ = ["fold_recorded_run", "schema_of"]

logger = logging.getLogger(__name__)

_FLATBUFFER_IDS = {"ev44", "f144", "pl72", "6s4t"}


def schema_of(msg: RecordedMessage) -> str:
    """The message's schema: its ``schema`` header, else the flatbuffer file identifier."""
    for k, v in msg.headers:
        if k == "schema":
            return v.decode(errors="replace")
    ident = msg.payload[4:8].decode("ascii", errors="replace")
    return ident if ident in _FLATBUFFER_IDS else "unknown"


class _RunFolder:
    """Run state built from the pl72 run start."""

    def __init__(self, meta: dict[str, Any], tolerance: float, voxels: int) -> None:
        self.meta = meta
        self.setup = setup(str(meta["material"]))
        self.instrument = Instrument.from_metadata(meta["instrument"])
        o = meta["orientation"]
        self.orientation = Orientation.from_vectors(
            self.setup.crystal, tuple(o["u"]), tuple(o["v"])
        )
        self.table = FoldTable.build(
            self.setup.crystal, self.setup.grid, tolerance=tolerance, voxels=voxels
        )
        self.folder = Folder(
            self.table, self.setup.grid, self.instrument, self.orientation, float(meta["ei_meV"])
        )
        self.acc = RunAccumulator(self.setup.grid)

    def add(self, chunk: Chunk) -> None:
        counts, dropped = self.folder.fold(chunk.pixel_id, chunk.tof_ns, chunk.omega)
        coverage = self.folder.coverage(chunk.omega)
        self.acc.add(
            counts,
            coverage,
            omega=chunk.omega,
            proton_charge=chunk.proton_charge,
            events=len(chunk.pixel_id),
            dropped=dict(zip(DROP_REASONS, map(int, dropped), strict=True)),
        )


def fold_recorded_run(
    path: str | Path,
    out: str | Path | None = None,
    *,
    mode: str = "auto",
    tolerance: float = 0.05,
    voxels: int = 96,
    progress: bool = True,
) -> tuple[dict[str, object], RunAccumulator]:
    """Fold every counting step of a recorded run into I(q, E); optionally write HDF5.

    Parameters
    ----------
    mode
        Segmentation: ``"bluesky"`` (Event documents), ``"omega"`` (the omega log), or
        ``"auto"`` (bluesky when the recording has a bluesky topic).

    Returns
    -------
    summary
        ``{"orientations", "events_folded", "events_dropped", "seconds",
        "events_per_second"}`` plus ``dropped_by_reason``, ``malformed``, ``segmentation``,
        ``grid_fingerprint`` and ``path`` (when ``out`` is given).
    accumulator
        The run's counts and exposure.
    """
    t0 = time.perf_counter()
    with RunReader(path) as reader:
        topics = reader.metadata.get("topics", {})
        if mode == "auto":
            mode = "bluesky" if "bluesky" in topics else "omega"
        seg = Segmenter(mode)
        run: _RunFolder | None = None
        malformed: Counter[str] = Counter()
        n_events = 0
        bar = tqdm(desc="orientations", unit="orient", disable=not progress)
        for msg in reader:
            schema = schema_of(msg)
            chunks: list[Chunk] = []
            try:
                if schema == "ev44":
                    ev = deserialise_ev44(msg.payload)
                    seg.on_events(
                        ev.reference_time, ev.reference_time_index, ev.time_of_flight, ev.pixel_id
                    )
                    n_events += len(ev.time_of_flight)
                elif schema == "f144":
                    log = deserialise_f144(msg.payload)
                    if log.source_name == "proton_charge":
                        seg.on_charge(log.timestamp_unix_ns, float(log.value))
                    elif log.source_name in ("omega", "omega_setpoint"):
                        chunks = seg.on_omega(
                            log.source_name, float(log.value), log.timestamp_unix_ns
                        )
                elif schema == "pl72":
                    start = deserialise_pl72(msg.payload)
                    if run is not None:
                        malformed["second_run_start"] += 1
                        continue
                    run = _RunFolder(json.loads(start.metadata), tolerance, voxels)
                elif schema == "6s4t":
                    chunks = seg.on_stop(msg.timestamp_ns)
                elif schema == "bluesky-json":
                    name, doc = json.loads(msg.payload)
                    chunks = seg.on_bluesky(name, doc)
                else:
                    malformed["unknown_schema"] += 1
            except Exception as exc:  # a bad message never stops the fold
                logger.warning("skipping malformed %s message on %s: %s", schema, msg.topic, exc)
                malformed[f"malformed_{schema}"] += 1
                continue
            for chunk in chunks:
                if run is None:
                    malformed["events_before_run_start"] += len(chunk.pixel_id)
                    continue
                run.add(chunk)
                bar.update(1)
        bar.close()
    if run is None:
        raise FoldError(f"{path}: no run start (pl72) found")
    acc = run.acc
    dropped = Counter({"moving": seg.moving})
    for rec in acc.records:
        dropped.update(rec.dropped)
    folded = int(sum(r.folded for r in acc.records))
    seconds = time.perf_counter() - t0
    result: dict[str, object] = {
        "orientations": len(acc.records),
        "events_folded": folded,
        "events_dropped": int(sum(dropped.values())),
        "seconds": round(seconds, 3),
        "events_per_second": n_events / seconds if seconds > 0 else 0.0,
        "dropped_by_reason": dict(dropped),
        "malformed": dict(malformed),
        "segmentation": mode,
        "grid_fingerprint": run.setup.grid.fingerprint,
    }
    if out is not None:
        acc.write_hdf5(out, metadata={"source": str(path), "run": run.meta.get("run_id")})
        result["path"] = str(out)
    return result, acc
