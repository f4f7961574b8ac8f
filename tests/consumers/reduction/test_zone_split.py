"""The live pipeline's zone-class split (``RunPipeline(zone_classes="auto")``, the consumer
service's default): the path's spectrum is what it is without the split, bit for bit; the
classes' counts and moments ride along in the snapshot, the checkpoint and the snapshot
message, and a restored run keeps the binning it was checkpointed with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from consumers.kafka.sink import snapshot_payload
from consumers.offline import schema_of
from consumers.reduction.accumulate import OrientationRecord
from consumers.reduction.pipeline import RunPipeline
from model_server.replica import SnapshotError, decode_snapshot, snapshot_classes, snapshot_moments
from simulations.runs.recording import RunReader


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, make_small_run: Any) -> Path:
    path, _, _ = make_small_run(tmp_path_factory.mktemp("split") / "r.steer", (0.0, 25.0), 11)
    return Path(path)


def _feed(path: Path, pipe: RunPipeline) -> RunPipeline:
    with RunReader(path) as reader:
        for m in reader:
            pipe.handle(schema_of(m.headers, m.payload), m.payload, m.timestamp_ns, topic=m.topic)
    pipe.finish()
    pipe.close()
    return pipe


@pytest.fixture(scope="module")
def folds(run: Path) -> tuple[RunPipeline, RunPipeline]:
    return _feed(run, RunPipeline()), _feed(run, RunPipeline(zone_classes="auto"))


def test_the_split_keeps_the_path_spectrum_and_adds_the_classes(folds: Any) -> None:
    path, split = folds
    a, b = path.snapshot(), split.snapshot()
    assert a.class_counts is None
    assert a.n_classes == 1
    assert b.n_classes == 4
    assert split.classes is not None
    # the path's spectrum is the unsplit one, exactly (the page, the VAE, the exports)
    np.testing.assert_array_equal(b.counts, a.counts)
    np.testing.assert_array_equal(b.exposure, a.exposure)
    assert split.acc is not None
    assert split.acc.moments is None
    n_q, n_e = a.counts.shape
    assert b.class_counts is not None
    assert b.class_counts.shape == (4 * n_q, n_e)
    np.testing.assert_array_equal(b.class_counts.reshape(n_q, 4, n_e).sum(axis=1), a.counts)
    assert b.fitted_counts is b.class_counts
    assert a.fitted_counts is a.counts
    # every class holds a real share of the counts, and the classes' moments sum to the path's
    share = b.class_counts.reshape(n_q, 4, n_e).sum(axis=(0, 2)) / a.counts.sum()
    assert np.all(share > 0.05), share
    assert a.moments is not None
    assert b.moments is not None
    merged = b.moments.merge_classes(4, n_e)
    for name, want in a.moments.arrays(prefix="").items():
        got = merged.arrays(prefix="")[name]
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_a_checkpoint_keeps_the_binning_it_was_taken_with(folds: Any) -> None:
    path, split = folds
    js, arrays = split.state()
    assert js["zone_classes"] == 4
    resumed = RunPipeline(zone_classes=False)  # the checkpoint decides, not the setting
    resumed.restore(json.loads(json.dumps(js)), arrays)
    got, want = resumed.snapshot(), split.snapshot()
    assert got.n_classes == 4
    np.testing.assert_array_equal(got.class_counts, want.class_counts)
    np.testing.assert_array_equal(got.counts, want.counts)
    assert got.moments is not None
    assert want.moments is not None
    np.testing.assert_array_equal(got.moments.tensor, want.moments.tensor)
    # a run checkpointed on the path goes on on the path under the split's default
    js, arrays = path.state()
    assert js["zone_classes"] == 0
    old = RunPipeline(zone_classes="auto")
    old.restore(json.loads(json.dumps(js)), arrays)
    assert old.classes is None
    assert old.snapshot().class_counts is None


def test_zone_classes_must_be_a_known_setting() -> None:
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        RunPipeline(zone_classes="yes")


def test_the_snapshot_message_carries_the_classes_or_their_sum(folds: Any) -> None:
    """The message to the replicas: the classes' counts and moments on their grid; without
    room for them (``classes=False``), the path's moments, the classes' sum."""
    path, split = folds
    snap = split.snapshot()
    rec = OrientationRecord(index=1, omega=25.0, proton_charge=1.0, events=1, folded=1, dropped={})
    run_meta = {"run_id": "r", "material": "Ge"}
    arrays, meta = decode_snapshot(snapshot_payload(snap, rec, run_meta))
    assert meta["n_classes"] == 4
    assert snapshot_classes(arrays) == 4
    got = snapshot_moments(arrays)
    assert got is not None
    assert snap.moments is not None
    np.testing.assert_array_equal(got.weight, snap.moments.weight)
    np.testing.assert_array_equal(arrays["class_counts"], snap.class_counts)
    arrays, meta = decode_snapshot(snapshot_payload(snap, rec, run_meta, classes=False))
    assert "n_classes" not in meta
    assert snapshot_classes(arrays) == 1
    got = snapshot_moments(arrays)
    want = path.snapshot().moments
    assert got is not None
    assert want is not None
    np.testing.assert_allclose(got.weight, want.weight, rtol=1e-9)
    # a split of another shape is refused, with the shape in the reason
    bad = dict(decode_snapshot(snapshot_payload(snap, rec, run_meta))[0])
    bad["class_counts"] = bad["class_counts"][:-1]
    with pytest.raises(SnapshotError, match="class_counts"):
        snapshot_classes(bad)
