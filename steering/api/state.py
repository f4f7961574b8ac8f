"""What the running service shares with the API: :class:`LiveState`.

The service (:class:`steering.service.SteeringService`) writes it from its consumer thread;
the routers (:mod:`steering.api.runs`, :mod:`steering.api.live`) read it under its lock.
This module imports no web framework.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from consumers.reduction.accumulate import Snapshot

__all__ = ["LiveState"]


@dataclass
class LiveState:
    """What the running service shares with the API (all optional).

    ``snapshots``: run id -> latest :class:`consumers.reduction.accumulate.Snapshot`; ``energy`` and
    ``qpoints`` of each run's grid; ``runs``: run id -> ``material``, ``temperature``,
    ``omegas`` measured and ``truth`` (a simulated run's FCs) for the figures;
    ``advisor_ranges``: run id -> candidate range set over the API; ``reload``: called by
    ``POST /models/reload``, returns the new model version.
    """

    snapshots: dict[str, Snapshot] = field(default_factory=dict)
    grids: dict[str, dict[str, Any]] = field(default_factory=dict)
    advisor_ranges: dict[str, dict[str, float]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: run id -> {orientation index: (counts, exposure)} of each orientation alone
    orientations: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    reload: Callable[[], Any] | None = None
    model_version: str | None = None
    #: why the model server cannot estimate now (None when it can)
    model_error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: incremented on every update; ``updates`` holds the latest update of each run
    version: int = 0
    updates: dict[str, dict[str, Any]] = field(default_factory=dict)

    def notify(self, run_id: str, **update: Any) -> None:
        """Tell the page (server-sent events) that ``run_id`` changed."""
        with self.lock:
            self.version += 1
            self.updates[run_id] = {"run_id": run_id, "version": self.version, **update}

    def changes(self, since: int) -> tuple[int, list[dict[str, Any]]]:
        """(current version, the runs' latest updates newer than ``since``)."""
        with self.lock:
            return self.version, [u for u in self.updates.values() if u["version"] > since]
