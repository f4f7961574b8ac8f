"""The broker goes away in the middle of a run and comes back: the consumer waits,
reconnects, and the run completes with nothing lost or doubled (bitwise the offline fold).

The embedded broker keeps its topics in memory only (Tansu's memory storage: a restarted
process starts empty), so the outage is made in front of it: clients reach it through a TCP
proxy on the advertised port, and the proxy drops every connection and refuses new ones for
the outage. For the clients that is a broker restart; the messages survive it as they would
on a persistent broker. The outage comes in the middle of the replay: the replay's producer
re-sends what was not acknowledged when the broker is back.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from consumers.kafka import EmbeddedBroker
from consumers.replay import replay


class OutageProxy:
    """TCP proxy 127.0.0.1:port -> 127.0.0.1:target that can go down and come back."""

    def __init__(self, target: int) -> None:
        self.target = target
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.up()

    def up(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self._server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and reset the open ones."""
        with self._lock:
            srv, self._server = self._server, None
            conns, self._conns = self._conns, []
        if srv is not None:
            srv.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._server is not srv:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def test_broker_outage_mid_run(tmp_path: Path, make_small_run) -> None:  # type: ignore[no-untyped-def]
    omegas = (0.0, 15.0, 30.0, 45.0, 60.0)
    path, offline, acc = make_small_run(tmp_path / "ge.steer", omegas, seed=66)
    broker_port = EmbeddedBroker().port
    proxy = OutageProxy(broker_port)
    broker = EmbeddedBroker(broker_port, advertised_port=proxy.port)
    broker.start()
    state = tmp_path / "state"
    ckpt = state / "checkpoint.npz"
    try:
        sender = threading.Thread(
            target=replay, args=(path, broker.bootstrap), kwargs={"prefix": "out", "speed": 2}
        )
        sender.start()
        proc = subprocess.Popen(
            [sys.executable, "-m", "steering.cli", "consume", "--bootstrap", broker.bootstrap,
             "--prefix", "out", "--state-dir", str(state), "--idle-exit", "60", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert ckpt.exists(), "no checkpoint before the outage"
        # the outage comes while the run is still being sent: the consumer cannot have it
        # all, and the producer (retrying, idempotent) re-sends what was not acknowledged
        assert sender.is_alive(), "the replay ended before the outage"
        proxy.down()
        time.sleep(12)  # the broker is away for 12 s
        assert proc.poll() is None, "the consumer gave up during the outage"
        proxy.up()
        sender.join(180)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.down()
        broker.stop()
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out)
    assert summary["done"]
    assert summary["events_folded"] == offline["events_folded"]
    assert summary["events_dropped"] == offline["events_dropped"]
    with np.load(ckpt) as f:
        np.testing.assert_array_equal(f["counts"], acc.counts)
        np.testing.assert_array_equal(f["exposure"], acc.exposure)
