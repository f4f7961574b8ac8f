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
from steering.advisor.controls import AdvisorControls, ControlsStore

__all__ = ["LiveState"]


@dataclass
class LiveState:
    """What the running service shares with the API (all optional).

    ``snapshots``: run id -> latest :class:`consumers.reduction.accumulate.Snapshot`; ``energy`` and
    ``qpoints`` of each run's grid; ``runs``: run id -> ``material``, ``temperature``,
    ``omegas`` measured and ``truth`` (a simulated run's FCs) for the figures;
    ``advisor_ranges``: run id -> candidate range set over the API; ``reload``: called by
    ``POST /models/reload``, returns the new model version; ``controls``: run id -> the
    advisor's controls (:meth:`controls_for`), shared by the API and the run's steering
    loop; ``omega_ranges``: run id -> (min, max) of the run's candidate angles, degrees
    (set by the service when the run's loop is made).
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
    controls: dict[str, AdvisorControls] = field(default_factory=dict)
    omega_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: incremented on every update; ``updates`` holds the latest update of each run and
    #: event kind
    version: int = 0
    updates: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def notify(self, run_id: str, *, event: str = "update", **update: Any) -> None:
        """Tell the page (server-sent events) that ``run_id`` changed: ``update`` (a new
        estimate, then again its advice) or ``controls`` (a person changed the advisor's
        controls)."""
        with self.lock:
            self.version += 1
            self.updates[(run_id, event)] = {
                "run_id": run_id,
                "version": self.version,
                "event": event,
                **update,
            }

    def changes(self, since: int) -> tuple[int, list[dict[str, Any]]]:
        """(current version, the runs' latest updates newer than ``since``)."""
        with self.lock:
            return self.version, [u for u in self.updates.values() if u["version"] > since]

    def controls_for(self, run_id: str, store: ControlsStore) -> AdvisorControls:
        """The advisor controls of ``run_id``: those in memory, else those ``store`` (the run
        history) kept (a restarted service), else new ones; every change of them is kept in
        ``store``.

        Raises
        ------
        steering.exceptions.AdvisorError
            The stored controls are damaged (the message says which value).
        """
        with self.lock:
            controls = self.controls.get(run_id)
            if controls is None:
                saved = store.load_controls(run_id)
                controls = AdvisorControls() if saved is None else AdvisorControls.from_dict(saved)

                def keep(state: dict[str, Any], override: dict[str, Any] | None) -> None:
                    store.save_controls(run_id, state, override)

                controls.store = keep
                self.controls[run_id] = controls
            return controls

    def omega_range(self, run_id: str) -> tuple[float, float] | None:
        """The goniometer's range of a run, degrees: its candidate angles' min..max (those of
        the live loop, else of the candidate range set over the API), or None (not known)."""
        with self.lock:
            rng = self.omega_ranges.get(run_id)
            if rng is not None:
                return rng
            custom = self.advisor_ranges.get(run_id)
        if custom is None:
            return None
        w = np.arange(custom["start"], custom["stop"], custom["step"])
        return (float(w.min()), float(w.max())) if len(w) else None
