"""The real ``steer`` entry point, run as a user runs it (a subprocess of this interpreter)."""

from __future__ import annotations

import subprocess
import sys

__all__ = ["steer"]


def steer(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m steering.cli ARGS``: its exit code, stdout and stderr (not checked)."""
    return subprocess.run(
        [sys.executable, "-m", "steering.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
