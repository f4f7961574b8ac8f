"""Real servers for the tests, started properly: uvicorn on a free loopback port, in a thread,
waited on until it has started (no fixed ports, no sleeps); or a whole ``steer serve``
process, waited on until ``/health`` answers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

__all__ = ["TOKEN", "ServeProcess", "serve", "steer_serve"]

#: The API token the tests' apps are created with.
TOKEN = "s3cret-token"


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """A real uvicorn server on a free port, in a thread; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@dataclass(frozen=True, slots=True, kw_only=True)
class ServeProcess:
    """A running ``steer serve``: its process, base URL, log file and the
    ``time.monotonic()`` of its start and of its first ``/health`` answer."""

    process: subprocess.Popen[bytes]
    base: str
    log: Path
    started: float
    healthy: float


@contextmanager
def steer_serve(
    folder: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> Iterator[ServeProcess]:
    """``python -m steering.cli serve`` on a free port with its database and state in
    ``folder`` (and ``args``, ``env`` added to this process's environment), yielded once
    ``/health`` answers 200; terminated (then killed) on exit."""
    port = _free_port()
    cmd: Sequence[str] = [
        sys.executable, "-m", "steering.cli", "serve", "--port", str(port),
        "--database", f"sqlite:///{folder / 'steer.db'}", "--state-dir", str(folder), *args,
    ]  # fmt: skip
    log = folder / "serve.log"
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = started + timeout
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no /health within {timeout} s"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        yield ServeProcess(
            process=proc, base=base, log=log, started=started, healthy=time.monotonic()
        )
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
