"""Where the project keeps derived files on this machine (fold tables, coverages, instrument
geometries read from definition files): one root for every package.

The root is ``$STEER_CACHE_DIR``, else ``$XDG_CACHE_HOME/ins-steering``
(``~/.cache/ins-steering``). Everything under it can be deleted at any time: it is rebuilt
on the next use.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """The machine's cache directory: ``$STEER_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/ins-steering`` (``~/.cache/ins-steering``). Not created here."""
    env = os.environ.get("STEER_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ins-steering"
