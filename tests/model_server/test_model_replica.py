"""The stateless model-server replica (`steer model-serve`) against a real broker: the live
consumer publishes snapshots of a run with their moments, the replica estimates each one
(the same VAE estimate as the estimator gives in-process) and refines it (the running
estimate is the refined one, the same whichever replica refines it), dead-letters what is
not a snapshot or carries bad moments, and commits: a replica started afterwards in the
same group has nothing left to do."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from kafka import KafkaProducer

from consumers.kafka import KafkaSnapshotSink, KafkaSource
from consumers.replay import replay
from consumers.service import ConsumerService
from model_server.replica import ModelReplica, SnapshotError, decode_snapshot, snapshot_moments
from tests.paths import REPO

pytestmark = pytest.mark.kafka
ROOT = REPO


def _read_all(bootstrap: str, topic: str) -> list[tuple[bytes | None, bytes, dict[str, bytes]]]:
    from kafka import KafkaConsumer

    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                      consumer_timeout_ms=3000, group_id=None)  # fmt: skip
    out = [(m.key, m.value, dict(m.headers or [])) for m in c]
    c.close()
    return out


def _model_serve(bootstrap: str) -> dict[str, int]:
    proc = subprocess.run(
        [sys.executable, "-m", "steering.cli", "model-serve", "--bootstrap", bootstrap,
         "--prefix", "mr", "--model-dir", str(ROOT / "models"), "--idle-exit", "8", "--json"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def test_replica_estimates_every_snapshot_once(broker, make_small_run, tmp_path, ge) -> None:  # type: ignore[no-untyped-def]
    from model_server.inversion.inference import Estimator

    path, _, _ = make_small_run(tmp_path / "run.steer", (0.0, 20.0, 40.0, 60.0), seed=21)
    replay(path, broker.bootstrap, prefix="mr")
    sink = KafkaSnapshotSink(broker.bootstrap, "mr")
    src = KafkaSource(broker.bootstrap, "mr")
    service = ConsumerService(src, tmp_path / "state")
    service.set_snapshot_sink(sink.bind(service.run_info))
    service.run(idle_exit_s=10)
    src.close()
    # a message on the topic that is not a snapshot, and two with bad moments
    sink._producer.send("mr_folded", value=b"not an npz", key=b"junk")
    sink.close()
    snapshots = _read_all(broker.bootstrap, "mr_folded")
    assert len(snapshots) == 5
    last = snapshots[3][1]
    bad = _with(last, moments_weight=lambda a: a[:-1])  # fewer bins than moments_index
    branches = {f"moments_{k}": lambda a: a[:, :3, :3] for k in ("tensor", "tensor_q2", "tensor_x")}
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, max_request_size=32 << 20)
    producer.send("mr_folded", value=bad, key=b"bad-shape")
    producer.send("mr_folded", value=_with(last, **branches), key=b"bad-branches")
    producer.flush()
    producer.close()
    run_id = service.finished_runs[-1]["run_id"] if service.finished_runs else None
    assert all(k == str(run_id).encode() for k, _, _ in snapshots[:4])

    first = _model_serve(broker.bootstrap)
    assert first["estimates"] == 4
    assert first["refined"] == 4
    assert first["dead_lettered"] == 3
    estimates = [json.loads(v) for _, v, _ in _read_all(broker.bootstrap, "mr_estimates")]
    assert [e["orientation"] for e in estimates] == [0, 1, 2, 3]
    assert [e["n_orientations"] for e in estimates] == [1, 2, 3, 4]
    assert {e["run_id"] for e in estimates} == {run_id}
    # the running estimate is the refinement's, with every coefficient of Ge
    arrays, meta = decode_snapshot(last)
    assert len(ge.basis.names) == 16
    for e in estimates:
        assert e["estimate"]["source"] == "refined", e["estimate"].get("fallback")
        assert list(e["estimate"]["fc"]) == list(ge.basis.names)
        assert e["estimate"]["refined"]["converged"]
    # the same VAE estimate as the estimator gives in-process on the same snapshot
    est = Estimator(ROOT / "models" / "ge")
    assert meta["material"] == "Ge"
    assert meta["grid_fingerprint"]
    assert meta["ei_meV"] > 0
    assert meta["instrument"]["name"]
    direct = est.estimate(arrays["intensity"], arrays["mask"]).to_dict()
    # the same estimate as the estimator gives directly (to float rounding: torch's
    # reductions may take another order on another thread)
    got = estimates[3]["estimate"]["vae"]["fc"]
    assert set(got) == set(direct["fc"])
    for name, fc in direct["fc"].items():
        assert got[name] == pytest.approx(fc, rel=1e-6, abs=1e-9), name
    # another replica, which saw none of the run's earlier snapshots, refines the last one
    # alike: the fit is a function of the snapshot (a warm start would move it by ~0.06 std)
    other = ModelReplica(broker.bootstrap, "mr", ROOT / "models", group_id="mr-other")
    try:
        again = other.handle(last)["estimate"]
    finally:
        other.close()
    assert again["source"] == "refined"
    for name, fc in estimates[3]["estimate"]["fc"].items():
        assert abs(again["fc"][name]["mean"] - fc["mean"]) < 1e-3 * fc["std"], name
        assert again["fc"][name]["std"] == pytest.approx(fc["std"], rel=1e-3)
    dead = {
        h.get("reason", b"").decode() for _, _, h in _read_all(broker.bootstrap, "mr_deadletter")
    }
    assert any(r.startswith("snapshot: not an .npz") for r in dead)
    assert any(r.startswith("snapshot: moments_weight") for r in dead), dead
    assert any(r.startswith("snapshot: moments of 3 branches; Ge has 6") for r in dead), dead
    # offsets were committed after the estimates: a new replica finds nothing to do
    second = _model_serve(broker.bootstrap)
    assert second.get("estimates", 0) == 0
    assert len(_read_all(broker.bootstrap, "mr_estimates")) == 4


def _with(payload: bytes, **change: Any) -> bytes:
    """A snapshot payload with some arrays changed (``name=function of the array``)."""
    import io

    with np.load(io.BytesIO(payload), allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    for name, fn in change.items():
        arrays[name] = fn(arrays[name])
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def test_bad_snapshots_are_refused_clearly() -> None:
    import io

    with pytest.raises(SnapshotError, match=r"not an \.npz"):
        decode_snapshot(b"\x00" * 10)
    buf = io.BytesIO()
    np.savez(buf, intensity=np.zeros((3, 4)), mask=np.ones((3, 4), bool),
             meta=np.frombuffer(b'{"orientation": 1}', np.uint8))  # fmt: skip
    with pytest.raises(SnapshotError, match="names no material"):
        decode_snapshot(buf.getvalue())
    buf = io.BytesIO()
    np.savez(buf, intensity=np.zeros((3, 4)), mask=np.ones((2, 4), bool),
             meta=np.frombuffer(b"{}", np.uint8))  # fmt: skip
    with pytest.raises(SnapshotError, match="one \\(n_q, n_E\\) shape"):
        decode_snapshot(buf.getvalue())


def _small_moments_snapshot(*, positions: bool = False) -> bytes:
    """A (3, 4) Ge-like snapshot with the moments (3N = 6) of 3 bins; without
    ``positions``, no ``moments_tensor_x`` (an older consumer's message)."""
    import io

    rng = np.random.default_rng(5)
    tensor = rng.normal(size=(3, 6, 6)) + 1j * rng.normal(size=(3, 6, 6))
    buf = io.BytesIO()
    np.savez(
        buf,
        intensity=np.ones((3, 4)),
        mask=np.ones((3, 4), bool),
        counts=np.full((3, 4), 2.0),
        meta=np.frombuffer(b'{"material": "Ge"}', np.uint8),
        moments_index=np.array([1, 4, 11]),
        moments_tensor=tensor,
        moments_tensor_q2=3.0 * tensor,
        moments_offset1=rng.normal(size=(3, 3)),
        moments_offset2=rng.normal(size=(3, 3, 3)),
        moments_weight=np.array([1.0, 2.0, 3.0]),
        moments_background=np.array([0.5, 0.5, 0.5]),
        moments_n=np.array(2),
        **({"moments_tensor_x": 0.5 * tensor} if positions else {}),
    )
    return buf.getvalue()


def test_moments_are_checked_and_scattered_back() -> None:
    import io

    good = _small_moments_snapshot()
    arrays, _ = decode_snapshot(good)
    moments = snapshot_moments(arrays)
    assert moments is not None
    assert moments.tensor.shape == (12, 6, 6)
    assert moments.n_orientations == 2
    np.testing.assert_array_equal(moments.weight, [0, 1, 0, 0, 2, 0, 0, 0, 0, 0, 0, 3])
    np.testing.assert_array_equal(moments.tensor_q2[4], 3.0 * arrays["moments_tensor"][1])
    np.testing.assert_array_equal(moments.tensor[[0, 2, 3, 5]], 0.0)
    assert not np.any(moments.tensor_x)  # an older consumer's snapshot: no positions
    with_x = _small_moments_snapshot(positions=True)
    moments_x = snapshot_moments(decode_snapshot(with_x)[0])
    assert moments_x is not None
    np.testing.assert_array_equal(moments_x.tensor_x[4], 0.5 * arrays["moments_tensor"][1])
    with pytest.raises(SnapshotError, match=r"moments_tensor_x \(3, 5, 5\) must be"):
        decode_snapshot(_with(with_x, moments_tensor_x=lambda a: a[:, :5, :5]))
    without = {k: v for k, v in arrays.items() if not k.startswith("moments_")}
    assert snapshot_moments(without) is None
    bad = {
        "moments_index": (lambda a: a[::-1], "strictly increasing"),
        "moments_tensor": (lambda a: a[:, :5, :5], r"must be \(n_m, 3N, 3N\)"),
        "moments_offset2": (lambda a: a[:, :2], r"moments_offset2 \(3, 2, 3\) must be \(3, 3, 3\)"),
        "moments_weight": (lambda a: -a, ">= 0"),
        "moments_background": (lambda a: a * np.nan, "finite"),
        "moments_n": (lambda a: np.array([2, 2]), "moments_n must be an integer"),
        "counts": (lambda a: a[:2], "needs the run's counts"),
    }
    for name, (fn, message) in bad.items():
        with pytest.raises(SnapshotError, match=message):
            decode_snapshot(_with(good, **{name: fn}))
    index_out = _with(good, moments_index=lambda a: a + 1)  # 12 is past the last bin
    with pytest.raises(SnapshotError, match=r"flat bins in \[0, 12\)"):
        decode_snapshot(index_out)
    with np.load(io.BytesIO(good)) as f:
        partial = {k: f[k] for k in f.files if k != "moments_tensor_q2"}
    buf = io.BytesIO()
    np.savez(buf, **partial)
    with pytest.raises(SnapshotError, match="without moments_tensor_q2"):
        decode_snapshot(buf.getvalue())
