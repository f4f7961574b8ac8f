"""The real ``steer`` entry point, run as a user runs it (a subprocess of this interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys

__all__ = ["steer"]


def steer(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m steering.cli ARGS`` (with ``env`` added to the environment): its exit
    code, stdout and stderr (not checked)."""
    return subprocess.run(
        [sys.executable, "-m", "steering.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )
