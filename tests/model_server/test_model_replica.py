"""The stateless model-server replica (`steer model-serve`) against a real broker: the live
consumer publishes snapshots of a run, the replica estimates each one (the same estimate as
the estimator gives in-process), dead-letters what is not a snapshot, and commits: a
replica started afterwards in the same group has nothing left to do."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from consumers.kafka import KafkaSnapshotSink, KafkaSource
from consumers.replay import replay
from consumers.service import ConsumerService
from model_server.replica import SnapshotError, decode_snapshot
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


def test_replica_estimates_every_snapshot_once(broker, make_small_run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from model_server.inversion.inference import Estimator

    path, _, _ = make_small_run(tmp_path / "run.steer", (0.0, 20.0, 40.0, 60.0), seed=21)
    replay(path, broker.bootstrap, prefix="mr")
    sink = KafkaSnapshotSink(broker.bootstrap, "mr")
    src = KafkaSource(broker.bootstrap, "mr")
    service = ConsumerService(src, tmp_path / "state")
    service.set_snapshot_sink(sink.bind(service.run_info))
    service.run(idle_exit_s=10)
    src.close()
    # a message on the topic that is not a snapshot
    sink._producer.send("mr_folded", value=b"not an npz", key=b"junk")
    sink.close()
    snapshots = _read_all(broker.bootstrap, "mr_folded")
    assert len(snapshots) == 5
    run_id = service.finished_runs[-1]["run_id"] if service.finished_runs else None
    assert all(k == str(run_id).encode() for k, _, _ in snapshots[:4])

    first = _model_serve(broker.bootstrap)
    assert first["estimates"] == 4
    assert first["dead_lettered"] == 1
    estimates = [json.loads(v) for _, v, _ in _read_all(broker.bootstrap, "mr_estimates")]
    assert [e["orientation"] for e in estimates] == [0, 1, 2, 3]
    assert [e["n_orientations"] for e in estimates] == [1, 2, 3, 4]
    assert {e["run_id"] for e in estimates} == {run_id}
    # the same estimate as the estimator gives in-process on the same snapshot
    est = Estimator(ROOT / "models" / "ge")
    arrays, meta = decode_snapshot(snapshots[3][1])
    assert meta["material"] == "Ge"
    assert meta["grid_fingerprint"]
    direct = est.estimate(arrays["intensity"], arrays["mask"]).to_dict()
    assert estimates[3]["estimate"]["fc"] == json.loads(json.dumps(direct))["fc"]
    dead = [h for _, _, h in _read_all(broker.bootstrap, "mr_deadletter")]
    assert any(h.get("reason", b"").startswith(b"snapshot: not an .npz") for h in dead)
    # offsets were committed after the estimates: a new replica finds nothing to do
    second = _model_serve(broker.bootstrap)
    assert second.get("estimates", 0) == 0
    assert len(_read_all(broker.bootstrap, "mr_estimates")) == 4


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
