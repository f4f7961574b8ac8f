"""A stateless model-server replica: folded snapshots in, FC estimates out, over Kafka.

In the deployed, scaled-out mode the consumers (``steer consume --group
--publish-snapshots``) publish every orientation's cumulative snapshot to
``<prefix>_folded`` (keyed by run id, :class:`consumers.kafka.KafkaSnapshotSink`; the
message layout is :mod:`consumers.kafka.sink`'s). Any number of replicas (``steer
model-serve``) share that topic's partitions in the consumer group ``steer-<prefix>-model``;
each snapshot is self-contained (the whole cumulative I(q, E) and counts, its mask, the
per-bin moments of the folded cells, the run's material, instrument, Ei, temperature and
grid fingerprint), so any replica can take any snapshot. A replica keeps only its frozen
models and one :class:`~model_server.refinement.refiner.RunRefiner` per set-up (material,
instrument, Ei, temperature, :class:`RefinerCache`).

Every snapshot is estimated by the VAE; when it carries moments, the likelihood refinement
(:mod:`model_server.refinement`) starts from the VAE's means and its result becomes the
running estimate, as in the in-process loop
(:func:`~model_server.refinement.refiner.running_estimate`): ``source: "refined"`` with
every coefficient, or ``source: "vae"`` with ``fallback`` saying why (no moments, a
material that cannot be refined, a fit that failed or did not converge; logged and
counted, never dead-lettered). The fit is not warm-started from the run's previous
snapshot: a snapshot's estimate is then a function of the snapshot alone, whichever replica
handles it (a warm-started fit can stop early, a few hundredths of a standard deviation from
the optimum a start from the VAE reaches, which would make it depend on which snapshots a
replica saw before). Every estimate is published to ``<prefix>_estimates`` as JSON, keyed
by run id::

    {"run_id", "material", "orientation", "n_orientations", "omega", "model_version",
     "estimate": running_estimate(vae, refined), "replica", "seconds"}

and, for the facility's dashboards, as da00 on ``<prefix>_livedata`` (the source
``steer/fc_estimate``, :class:`consumers.kafka.KafkaLivedataSink`; best effort: a failure
is logged and counted, and never stops the replica). ``steer serve --follow-replicas``
(:mod:`steering.follow`) reads the JSON into the run history, the page and the advisor.

Offsets are committed after the estimate has been acknowledged by the broker, so a replica
that dies loses nothing: the next owner of its partitions estimates the snapshots that were
not committed (an estimate may then be published twice; it is the same estimate, since the
estimator is seeded and the fit starts from it, and ``(run_id, orientation)`` identifies
it). A snapshot that cannot be estimated (not a snapshot, wrong grid, unknown material, no
usable bins, moments of the wrong shape) is counted, logged with its position and
dead-lettered to ``<prefix>_deadletter`` with the reason; the replica goes on.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from consumers.kafka import (
    KafkaDeadLetter,
    KafkaLivedataSink,
    client_security,
    ensure_topics,
    to_source_message,
)
from consumers.kafka.sink import is_run_complete
from model_server.exceptions import ModelServerError, RefinementError
from simulations.lattice.grid import MAX_ZONE_PERIOD

if TYPE_CHECKING:
    from consumers.reduction.moments import BinMoments
    from model_server.refinement.refiner import RunRefiner

__all__ = [
    "ModelReplica",
    "RefinerCache",
    "SnapshotError",
    "check_moments",
    "decode_snapshot",
    "snapshot_moments",
]

logger = logging.getLogger(__name__)

#: The schema header of a snapshot message.
SNAPSHOT_SCHEMA = b"steer-snapshot-npz"
#: Largest snapshot payload accepted, bytes.
MAX_SNAPSHOT_BYTES = 64 << 20
#: The per-bin moment arrays of a snapshot (``moments_<name>``) besides ``moments_index``
#: and ``moments_n`` (:meth:`consumers.reduction.moments.BinMoments.arrays`).
MOMENT_FIELDS = ("tensor", "tensor_q2", "offset1", "offset2", "weight", "background")
#: Moment arrays a snapshot may leave out (an older consumer's): zeros then.
OPTIONAL_MOMENT_FIELDS = ("tensor_x",)
#: Set-ups (material, instrument, Ei, temperature) whose refiner a replica keeps.
REFINER_CACHE_SIZE = 4


class SnapshotError(ModelServerError, ValueError):
    """A ``<prefix>_folded`` message that is not a usable snapshot."""


def decode_snapshot(payload: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays (``intensity``, ``mask``, ``moments_*``, ...) and metadata of a snapshot
    message (layout: :mod:`consumers.kafka.sink`).

    Raises
    ------
    SnapshotError
        Not an ``.npz`` without pickles, an array missing or of the wrong shape, moments
        that do not fit the spectrum's (n_q, n_E) bins or (3N, 3N) branches, bad metadata.
    """
    if len(payload) > MAX_SNAPSHOT_BYTES:
        raise SnapshotError(f"snapshot of {len(payload)} bytes (limit {MAX_SNAPSHOT_BYTES})")
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as f:
            arrays = {k: np.asarray(f[k]) for k in f.files}
    except Exception as exc:
        raise SnapshotError(f"not an .npz snapshot: {exc}") from exc
    for key in ("intensity", "mask", "meta"):
        if key not in arrays:
            raise SnapshotError(f"snapshot without {key!r}")
    if arrays["intensity"].ndim != 2 or arrays["mask"].shape != arrays["intensity"].shape:
        raise SnapshotError(
            f"intensity {arrays['intensity'].shape} and mask {arrays['mask'].shape} must be "
            "one (n_q, n_E) shape"
        )
    try:
        meta = json.loads(arrays.pop("meta").astype(np.uint8).tobytes().decode())
    except Exception as exc:
        raise SnapshotError(f"snapshot metadata is not JSON: {exc}") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("material"), str):
        raise SnapshotError("snapshot metadata names no material (a consumer older than this?)")
    check_moments(arrays)
    return arrays, meta


def check_moments(arrays: Mapping[str, np.ndarray]) -> None:
    """Check a snapshot's ``moments_*`` arrays (if any) against its intensity's shape.

    ``moments_index``: (n_m,) strictly increasing flat bins ``q * n_E + E`` of the
    (n_q, n_E) intensity; ``moments_tensor``, ``moments_tensor_q2`` and (optional)
    ``moments_tensor_x``: (n_m, 3N, 3N);
    ``moments_offset1``: (n_m, 3); ``moments_offset2``: (n_m, 3, 3); ``moments_weight``,
    ``moments_background``: (n_m,) (>= 0); ``moments_n``: () orientations (>= 0); and the
    run's ``counts`` (n_q, n_E) (>= 0). All finite.

    Raises
    ------
    SnapshotError
        What is missing or wrong.
    """
    present = {k for k in arrays if k.startswith("moments_")}
    if not present:
        return
    missing = sorted(
        {"moments_index", "moments_n", *(f"moments_{f}" for f in MOMENT_FIELDS)} - present
    )
    if missing:
        raise SnapshotError(f"snapshot moments without {', '.join(missing)}")
    n_q, n_e = arrays["intensity"].shape
    counts = arrays.get("counts")
    if counts is None or counts.shape != (n_q, n_e) or counts.dtype.kind not in "fiu":
        raise SnapshotError(
            f"a snapshot with moments needs the run's counts of the intensity's shape "
            f"({n_q}, {n_e}), got {None if counts is None else counts.shape}"
        )
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise SnapshotError("the snapshot's counts must be finite and >= 0")
    n_c = snapshot_classes(arrays)
    n_q *= n_c  # a run split by zone class: its moments are on the classes' rows
    index = arrays["moments_index"]
    if index.ndim != 1 or index.dtype.kind not in "iu":
        raise SnapshotError(
            f"moments_index must be a 1-d integer array, got {index.dtype} {index.shape}"
        )
    if len(index) and (
        int(index[0]) < 0 or int(index[-1]) >= n_q * n_e or np.any(np.diff(index) <= 0)
    ):
        raise SnapshotError(
            f"moments_index must be strictly increasing flat bins in [0, {n_q * n_e}) of the "
            f"({n_q}, {n_e}) intensity"
        )
    m = len(index)
    tensor = arrays["moments_tensor"]
    if (
        tensor.ndim != 3
        or tensor.shape[0] != m
        or tensor.shape[1] != tensor.shape[2]
        or tensor.shape[1] % 3
        or not tensor.shape[1]
    ):
        raise SnapshotError(
            f"moments_tensor {tensor.shape} must be (n_m, 3N, 3N) with n_m = {m}, the bins of "
            "moments_index"
        )
    b = tensor.shape[1]
    shapes = {
        "tensor": (m, b, b),
        "tensor_q2": (m, b, b),
        **({"tensor_x": (m, b, b)} if "moments_tensor_x" in arrays else {}),
        "offset1": (m, 3),
        "offset2": (m, 3, 3),
        "weight": (m,),
        "background": (m,),
    }
    for name, shape in shapes.items():
        a = arrays[f"moments_{name}"]
        if a.shape != shape:
            raise SnapshotError(f"moments_{name} {a.shape} must be {shape} (n_m = {m}, 3N = {b})")
        if a.dtype.kind not in ("fc" if name.startswith("tensor") else "f") or not np.all(
            np.isfinite(a)
        ):
            raise SnapshotError(f"moments_{name} must hold finite numbers ({a.dtype})")
    if np.any(arrays["moments_weight"] < 0) or np.any(arrays["moments_background"] < 0):
        raise SnapshotError("moments_weight and moments_background must be >= 0")
    n = arrays["moments_n"]
    if n.shape != () or n.dtype.kind not in "iu" or int(n) < 0:
        raise SnapshotError(f"moments_n must be an integer >= 0, got {n.dtype} {n.shape}")


def snapshot_classes(arrays: Mapping[str, np.ndarray]) -> int:
    """The zone classes of a snapshot split by them (its ``class_counts``: (n_q * n_c,
    n_E), finite, >= 0, their sum over classes its ``counts``), 1 without a split.

    Raises
    ------
    SnapshotError
        ``class_counts`` of another shape, or not finite and >= 0.
    """
    split = arrays.get("class_counts")
    if split is None:
        return 1
    n_q, n_e = arrays["intensity"].shape
    if (
        split.ndim != 2
        or split.shape[1] != n_e
        or split.shape[0] % n_q
        or not 1 <= split.shape[0] // n_q <= MAX_ZONE_PERIOD**3
        or split.dtype.kind not in "fiu"
    ):
        raise SnapshotError(
            f"class_counts {split.shape} must be (n_q * n_classes, n_E) of the ({n_q}, {n_e}) "
            "intensity"
        )
    if not np.all(np.isfinite(split)) or np.any(split < 0):
        raise SnapshotError("the snapshot's class_counts must be finite and >= 0")
    return int(split.shape[0] // n_q)


def snapshot_moments(arrays: Mapping[str, np.ndarray]) -> BinMoments | None:
    """The :class:`~consumers.reduction.moments.BinMoments` of a checked snapshot (zero in
    the bins it does not send), or None when it carries none."""
    from consumers.reduction.moments import BinMoments

    if "moments_index" not in arrays:
        return None
    n_q, n_e = arrays["intensity"].shape
    index = arrays["moments_index"]
    out = BinMoments.zeros(n_q * snapshot_classes(arrays) * n_e, arrays["moments_tensor"].shape[1])
    for name in MOMENT_FIELDS + OPTIONAL_MOMENT_FIELDS:
        if f"moments_{name}" in arrays:
            getattr(out, name)[index] = arrays[f"moments_{name}"]
        elif name == "tensor_x":
            logger.warning(
                "snapshot moments without the in-bin positions (an older consumer's): the "
                "counts model spreads their samples evenly over each bin"
            )
    out.n_orientations = int(arrays["moments_n"])
    return out


class RefinerCache:
    """The :class:`~model_server.refinement.refiner.RunRefiner` of each set-up (material,
    instrument, Ei, temperature) a replica has seen, the last :data:`REFINER_CACHE_SIZE`;
    a set-up that cannot be refined is remembered with the reason, not retried. Not
    thread-safe (a replica handles one snapshot at a time)."""

    def __init__(self) -> None:
        self._refiners: OrderedDict[str, RunRefiner | str] = OrderedDict()

    @staticmethod
    def setup_key(meta: Mapping[str, Any]) -> str:
        """The set-up of a snapshot's run: material, instrument, Ei, temperature and the
        zone classes its bins are split by (``n_classes``, 1 for the path)."""
        return json.dumps(
            [
                *(meta.get(k) for k in ("material", "instrument", "ei_meV", "temperature_K")),
                int(meta.get("n_classes") or 1),
            ],
            sort_keys=True,
        )

    def get(self, meta: Mapping[str, Any]) -> RunRefiner:
        """The refiner of a snapshot's set-up (``meta``: the snapshot's metadata).

        Raises
        ------
        RefinementError
            The set-up cannot be refined (no reference FC set, no instrument or Ei, ...).
        """
        from model_server.refinement.refiner import RunRefiner

        key = self.setup_key(meta)
        hit = self._refiners.get(key)
        if hit is None:
            try:
                hit = RunRefiner.from_metadata(
                    {k: v for k, v in meta.items() if v is not None},
                    classes=int(meta.get("n_classes") or 1) > 1,
                )
            except Exception as exc:  # remembered: the set-up's next snapshots are not retried
                hit = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "material %s at Ei %s meV cannot be refined: %s",
                    meta.get("material"),
                    meta.get("ei_meV"),
                    hit,
                )
            self._refiners[key] = hit
            while len(self._refiners) > REFINER_CACHE_SIZE:
                self._refiners.popitem(last=False)
        self._refiners.move_to_end(key)
        if isinstance(hit, str):
            raise RefinementError(hit)
        return hit


class ModelReplica:
    """One replica of the model server (see the module docstring).

    Parameters
    ----------
    bootstrap, prefix
        Broker and instrument prefix.
    model_dir
        Folder of frozen models, one per material (``<model_dir>/<material lower>``).
    group_id
        Consumer group of the replicas (default ``steer-<prefix>-model``).
    partitions
        Partitions of ``<prefix>_folded`` and ``<prefix>_estimates`` when this replica
        creates them.
    refine
        Refine the snapshots that carry moments; off, the VAE's estimate is the running
        one.
    livedata
        Also publish every estimate as da00 on ``<prefix>_livedata``.
    """

    def __init__(
        self,
        bootstrap: str,
        prefix: str,
        model_dir: str | Path = "models",
        *,
        group_id: str | None = None,
        partitions: int = 1,
        session_timeout_ms: int = 6000,
        refine: bool = True,
        livedata: bool = True,
    ) -> None:
        from kafka import KafkaConsumer, KafkaProducer

        self.prefix = prefix
        self.model_dir = Path(model_dir)
        self.in_topic = f"{prefix}_folded"
        self.out_topic = f"{prefix}_estimates"
        ensure_topics(bootstrap, [self.in_topic, self.out_topic], partitions)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._consumer = KafkaConsumer(
            self.in_topic,
            bootstrap_servers=bootstrap,
            group_id=group_id or f"steer-{prefix}-model",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(100, session_timeout_ms // 6),
            max_partition_fetch_bytes=MAX_SNAPSHOT_BYTES,
            fetch_max_bytes=MAX_SNAPSHOT_BYTES,
            **client_security(),
        )
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", **client_security())
        self._dead = KafkaDeadLetter(bootstrap, prefix)
        self._livedata = KafkaLivedataSink(bootstrap, prefix) if livedata else None
        self._estimators: dict[str, Any] = {}
        self.refiners = RefinerCache() if refine else None
        self.counters: Counter[str] = Counter()
        self._stop = threading.Event()

    def estimator(self, material: str) -> Any:
        """The cached estimator of a material's frozen model."""
        from model_server.inversion.inference import Estimator

        key = material.lower()
        if key not in self._estimators:
            path = self.model_dir / key
            if not (path / "model.json").exists():
                raise SnapshotError(f"no frozen model for material {material!r} in {path}")
            self._estimators[key] = Estimator(path)
        return self._estimators[key]

    def handle(self, payload: bytes) -> dict[str, Any]:
        """The estimate message of one snapshot payload: the VAE's estimate, refined when the
        snapshot carries moments (:meth:`running_estimate`).

        Raises
        ------
        SnapshotError
            A payload that is no usable snapshot (dead-lettered by :meth:`step`).
        """
        t0 = time.perf_counter()
        arrays, meta = decode_snapshot(payload)
        est = self.estimator(str(meta["material"]))
        try:
            estimate = est.estimate(
                arrays["intensity"],
                arrays["mask"].astype(bool),
                grid_fingerprint=meta.get("grid_fingerprint") or None,
            )
        except ModelServerError as exc:
            raise SnapshotError(str(exc)) from exc
        return {
            "run_id": meta.get("run_id"),
            "material": meta["material"],
            "orientation": meta.get("orientation"),
            "n_orientations": meta.get("n_orientations"),
            "omega": meta.get("omega"),
            "model_version": estimate.model_version,
            "estimate": self.running_estimate(estimate.to_dict(), arrays, meta),
            "replica": self.name,
            "seconds": time.perf_counter() - t0,
        }

    def running_estimate(
        self, vae: dict[str, Any], arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The running estimate of a decoded snapshot given its VAE estimate ``vae``
        (:meth:`~model_server.inversion.inference.Estimate.to_dict`): the refinement's when it
        converged, else the VAE's with the reason (logged, counted).

        Raises
        ------
        SnapshotError
            The moments do not fit the material (3N branches, grid).
        """
        from model_server.refinement.refiner import running_estimate

        if self.refiners is None:
            return running_estimate(vae)
        if "moments_index" not in arrays:
            return running_estimate(vae, reason="the snapshot carries no moments")
        extra = {"run_id": meta.get("run_id"), "orientation": meta.get("orientation")}
        try:
            refiner = self.refiners.get(meta)
        except RefinementError as exc:
            self.counters["refine_fallbacks"] += 1
            return running_estimate(vae, reason=f"refinement unavailable: {exc}")
        branches = 3 * len(refiner.setup.crystal.positions)
        if arrays["moments_tensor"].shape[1] != branches:
            raise SnapshotError(
                f"moments of {arrays['moments_tensor'].shape[1]} branches; "
                f"{meta['material']} has {branches}"
            )
        if arrays["intensity"].shape != refiner.setup.grid.shape:
            raise SnapshotError(
                f"moments over a {arrays['intensity'].shape} grid; {meta['material']}'s is "
                f"{refiner.setup.grid.shape}"
            )
        n_c = snapshot_classes(arrays)
        have = 1 if refiner.classes is None else refiner.classes.n_classes
        if n_c != have:
            raise SnapshotError(
                f"a snapshot split by {n_c} zone classes; {meta['material']} has {have}"
            )
        moments = snapshot_moments(arrays)
        assert moments is not None
        start = {n: float(v["mean"]) for n, v in vae.get("fc", {}).items()}
        counts = np.asarray(arrays["counts" if n_c == 1 else "class_counts"], dtype=np.float64)
        try:
            refined = refiner.refine(counts, moments, start)
        except Exception as exc:  # a failed fit never loses the snapshot: the VAE stands in
            logger.warning(
                "run %s, orientation %s: refinement failed: %s",
                meta.get("run_id"),
                meta.get("orientation"),
                exc,
                extra=extra,
            )
            self.counters["refine_fallbacks"] += 1
            return running_estimate(vae, reason=f"refinement failed: {exc}")
        running = running_estimate(vae, refined, binning=refiner.binning)
        if running["source"] == "refined":
            self.counters["refined"] += 1
        else:
            self.counters["refine_fallbacks"] += 1
            logger.warning(
                "run %s, orientation %s: %s",
                meta.get("run_id"),
                meta.get("orientation"),
                running.get("fallback"),
                extra=extra,
            )
        return running

    def step(self, timeout_s: float = 0.5) -> int:
        """Poll once, estimate and publish what came, commit; returns messages handled."""
        from kafka.structs import OffsetAndMetadata

        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=16)
        n = 0
        offsets = {}
        for tp, records in batches.items():
            for r in records:
                n += 1
                offsets[tp] = OffsetAndMetadata(r.offset + 1, "", -1)
                if is_run_complete(r.headers):  # for the services that follow: not ours
                    self.counters["runs_complete"] += 1
                    continue
                try:
                    out = self.handle(bytes(r.value or b""))
                except SnapshotError as exc:
                    self.counters["dead_lettered"] += 1
                    logger.warning(
                        "%s[%d]@%d: %s (dead-lettered)", tp.topic, tp.partition, r.offset, exc
                    )
                    self._dead(to_source_message(r), f"snapshot: {exc}")
                    continue
                self.counters["estimates"] += 1
                self._producer.send(self.out_topic, value=json.dumps(out).encode(), key=r.key)
                if self._livedata is not None:  # best effort: logged and counted
                    self._livedata.estimate(out)
        if offsets:
            # acknowledged estimates first, then the offsets: nothing is lost on a crash
            self._producer.flush()
            self._dead.flush()
            if self._livedata is not None:
                self._livedata.flush()
            self._consumer.commit(offsets)
        return n

    def run(self, *, idle_exit_s: float | None = None) -> None:
        """Step until SIGTERM (or :meth:`stop`, or ``idle_exit_s`` without a snapshot)."""
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGTERM, lambda *_: self._stop.set()) if main else None
        last = time.monotonic()
        try:
            while not self._stop.is_set():
                if self.step():
                    last = time.monotonic()
                elif idle_exit_s is not None and time.monotonic() - last > idle_exit_s:
                    break
        finally:
            if main:
                signal.signal(signal.SIGTERM, old)

    def stop(self) -> None:
        """Ask :meth:`run` to return (any thread)."""
        self._stop.set()

    def close(self) -> None:
        """Leave the group and close the connections."""
        self._consumer.close()
        self._producer.close()
        self._dead.close()
        if self._livedata is not None:
            self._livedata.close()

    def summary(self) -> dict[str, object]:
        """Counts so far (JSON-ready)."""
        out: dict[str, object] = {"replica": self.name, **self.counters}
        if self._livedata is not None and self._livedata.failures:
            out["livedata_failures"] = self._livedata.failures
        return out
