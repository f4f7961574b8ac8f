"""Fold a recorded run offline: the same pipeline as the live consumer, reading a ``.steer``
file instead of Kafka (``steer fold``)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from simulations.recording import RunReader

from .accumulate import RunAccumulator
from .exceptions import FoldError
from .pipeline import MalformedMessage, RunPipeline, schema_of

__all__ = ["fold_recorded_run"]

logger = logging.getLogger(__name__)


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
        ``"auto"`` (bluesky when the run start names a bluesky topic).

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
    pipe = RunPipeline(mode=mode, tolerance=tolerance, voxels=voxels)
    malformed: Counter[str] = Counter()
    bar = tqdm(desc="orientations", unit="orient", disable=not progress)
    with RunReader(path) as reader:
        for i, msg in enumerate(reader):
            try:
                done = pipe.handle(
                    schema_of(msg.headers, msg.payload), msg.payload, msg.timestamp_ns
                )
            except MalformedMessage as exc:
                logger.warning("%s: message %d on %s skipped: %s", path, i, msg.topic, exc)
                malformed[exc.reason] += 1
                continue
            bar.update(len(done))
    bar.update(len(pipe.finish()))
    bar.close()
    if pipe.acc is None:
        raise FoldError(f"{path}: no run start (pl72) found")
    seconds = time.perf_counter() - t0
    result = pipe.summary()
    result.update(
        {
            "seconds": round(seconds, 3),
            "events_per_second": pipe.n_events / seconds if seconds > 0 else 0.0,
            "malformed": dict(malformed),
        }
    )
    order = ["orientations", "events_folded", "events_dropped", "seconds", "events_per_second"]
    result = {k: result[k] for k in order} | {k: v for k, v in result.items() if k not in order}
    if out is not None:
        meta = pipe.meta or {}
        pipe.acc.write_hdf5(out, metadata={"source": str(path), "run": meta.get("run_id")})
        result["path"] = str(out)
    return result, pipe.acc
