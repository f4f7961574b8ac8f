"""How a file was made: the git commit of the checkout, package versions and the host.

The FC database (:mod:`simulations.fcdb.build`) and the e3nn FC model
(:mod:`model_server.structure_fc.train`) record these in their provenance. Every lookup
degrades to a placeholder string instead of failing: a build must never stop because git is
missing or a package has no metadata.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "NOT_INSTALLED",
    "UNKNOWN_COMMIT",
    "git_commit",
    "host",
    "package_version",
    "package_versions",
]

#: What :func:`git_commit` returns outside a git checkout (or without git).
UNKNOWN_COMMIT = "unknown"
#: What :func:`package_version` returns for a package that is not installed.
NOT_INSTALLED = "not installed"


def git_commit() -> str:
    """The commit (40 hex digits) checked out where this code runs from.

    Returns
    -------
    str
        ``git rev-parse HEAD`` run beside this module, or ``"unknown"`` when this is not a git
        checkout (an installed wheel), git is missing or takes more than 10 s.
    """
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN_COMMIT


def package_version(package: str) -> str:
    """Installed version of a distribution (``"2.1.0"``), or ``"not installed"``."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def package_versions(packages: Iterable[str]) -> dict[str, str]:
    """``{package: version}`` for each distribution name (see :func:`package_version`)."""
    return {p: package_version(p) for p in packages}


def host() -> dict[str, str]:
    """The machine and interpreter: ``python`` (``"3.11.9"``), ``platform``
    (``platform.platform()``) and ``machine`` (``"x86_64"``)."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
