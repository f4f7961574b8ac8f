"""The snapshot message of `<prefix>_folded` (no broker): the run's counts, the moments of the
bins of weight > 0 and what the replicas' refinement needs of the run; a snapshot without
moments is published as before, and one over the size limit goes without its moments."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from consumers.kafka import sink as sink_module
from consumers.kafka.sink import KafkaSnapshotSink, snapshot_payload
from consumers.reduction.accumulate import OrientationRecord, Snapshot
from consumers.reduction.moments import BinMoments

RUN = {
    "run_id": "run-7",
    "material": "Ge",
    "temperature_K": 5.0,
    "ei_meV": 80.0,
    "instrument": {"name": "ARCS", "l1_m": 13.6, "layout": {"n_columns": 4}},
    "grid_fingerprint": "abc",
    "orientation": {"u": [1, 0, 0], "v": [0, 1, 0]},
    "planned_omegas_deg": [0.0, 10.0],
    "crystal": {"not": "sent"},
}
BASE = {"intensity", "variance", "counts", "exposure", "mask", "meta"}
MOMENT_KEYS = {
    f"moments_{k}"
    for k in (
        "index",
        "tensor",
        "tensor_q2",
        "tensor_x",
        "offset1",
        "offset2",
        "weight",
        "background",
        "n",
    )
}


def _snapshot(with_moments: bool) -> Snapshot:
    """A (3, 4) snapshot; moments (3N = 6) in 5 of its 12 bins."""
    rng = np.random.default_rng(3)
    exposure = np.zeros((3, 4))
    exposure.flat[[0, 2, 5, 6, 11]] = rng.uniform(1, 2, 5)
    counts = np.where(exposure > 0, rng.poisson(5, (3, 4)), 0).astype(float)
    moments = None
    if with_moments:
        moments = BinMoments.zeros(12, 6)
        sel = exposure.ravel() > 0
        moments.tensor[sel] = rng.normal(size=(5, 6, 6)) + 1j * rng.normal(size=(5, 6, 6))
        moments.tensor_q2[sel] = 2.0 * moments.tensor[sel]
        moments.tensor_x[sel] = -0.25 * moments.tensor[sel]
        moments.offset1[sel] = rng.normal(size=(5, 3))
        moments.offset2[sel] = rng.normal(size=(5, 3, 3))
        moments.weight[:] = exposure.ravel()
        moments.background[sel] = rng.uniform(0, 1, 5)
        moments.n_orientations = 2
    return Snapshot.of(counts, exposure, 2, moments)


def _record(index: int, omega: float) -> OrientationRecord:
    return OrientationRecord(
        index=index, omega=omega, proton_charge=1.0, events=10, folded=9, dropped={}
    )


def _load(payload: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with np.load(io.BytesIO(payload), allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    return arrays, json.loads(arrays.pop("meta").tobytes().decode())


def test_payload_carries_the_moments_of_the_measured_bins() -> None:
    snap = _snapshot(with_moments=True)
    arrays, meta = _load(snapshot_payload(snap, _record(1, 10.0), RUN))
    assert set(arrays) == (BASE - {"meta"}) | MOMENT_KEYS
    np.testing.assert_array_equal(arrays["counts"], snap.counts)
    index = arrays["moments_index"]
    np.testing.assert_array_equal(index, [0, 2, 5, 6, 11])
    assert snap.moments is not None
    for name, full in snap.moments.arrays(prefix="").items():
        want = full if full.ndim == 0 else full[index]
        np.testing.assert_array_equal(arrays[f"moments_{name}"], want)  # copied, not computed
    assert int(arrays["moments_n"]) == 2
    assert meta["instrument"] == RUN["instrument"]
    assert (meta["material"], meta["ei_meV"], meta["temperature_K"]) == ("Ge", 80.0, 5.0)
    assert (meta["run_id"], meta["grid_fingerprint"], meta["orientation"]) == ("run-7", "abc", 1)
    assert "crystal" not in meta
    # what the advisor of `steer serve --follow-replicas` needs for its candidates
    assert meta["sample_orientation"] == RUN["orientation"]
    assert (meta["planned_omegas_deg"], meta["proton_charge"]) == ([0.0, 10.0], 1.0)


def test_payload_without_moments_is_as_before() -> None:
    arrays, meta = _load(snapshot_payload(_snapshot(with_moments=False), _record(0, 0.0)))
    assert set(arrays) == BASE - {"meta"}
    assert meta["run_id"] is None
    assert meta["instrument"] is None


class _Producer:
    def __init__(self, **_: Any) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, topic: str, **kw: Any) -> None:
        self.sent.append({"topic": topic, **kw})


def test_sink_drops_the_moments_of_an_oversized_snapshot(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    import kafka

    monkeypatch.setattr(kafka, "KafkaProducer", _Producer)
    monkeypatch.setattr(sink_module, "ensure_topics", lambda *a, **k: None)
    sink = KafkaSnapshotSink("unused:9092", "t")
    bound = sink.bind(lambda: RUN)
    bound(_snapshot(with_moments=True), _record(0, 0.0))
    monkeypatch.setattr(sink_module, "MAX_SNAPSHOT_PAYLOAD", 1000)
    bound(_snapshot(with_moments=True), _record(1, 1.0))
    first, second = sink._producer.sent  # type: ignore[attr-defined]
    assert first["topic"] == "t_folded"
    assert first["key"] == b"run-7"
    assert set(_load(first["value"])[0]) >= MOMENT_KEYS
    assert not MOMENT_KEYS & set(_load(second["value"])[0])
    assert "published without them" in caplog.text
