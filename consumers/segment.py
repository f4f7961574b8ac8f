"""Orientation segmentation: which counting step each neutron event belongs to.

Two sources of truth, both streaming (message by message, in timestamp order):

* ``"bluesky"``: the run engine's Event document of each step carries the counting window
  (``count_start_ns``, ``count_stop_ns``) and the omega readback. Event messages are held
  until the Event document of their window arrives (bluesky emits it after the count).
* ``"omega"``: the f144 omega log alone. A step starts at the first readback within
  ``tolerance`` of the current setpoint and ends at the next setpoint; pulses outside any
  step (the goniometer moving or settling) are dropped.

Events that belong to no step are counted as ``moving``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from .exceptions import FoldError

__all__ = ["Chunk", "Segmenter"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk:
    """The events of one completed counting step.

    Attributes
    ----------
    omega
        Goniometer angle, degrees.
    start_ns, stop_ns
        Counting window [start, stop) in pulse time, ns since the epoch.
    pixel_id, tof_ns
        (n,) int32 each.
    proton_charge
        uC delivered by the pulses in the window.
    """

    omega: float
    start_ns: int
    stop_ns: int
    pixel_id: NDArray[np.int32]
    tof_ns: NDArray[np.int32]
    proton_charge: float


@dataclass(slots=True)
class _Pulses:
    """Buffered events, one array triple per ev44 message."""

    pulse: list[NDArray[np.int64]] = field(default_factory=list)
    tof: list[NDArray[np.int32]] = field(default_factory=list)
    pixel: list[NDArray[np.int32]] = field(default_factory=list)

    def add(self, pulse: NDArray[np.int64], tof: NDArray[np.int32], pix: NDArray[np.int32]) -> None:
        self.pulse.append(pulse)
        self.tof.append(tof)
        self.pixel.append(pix)

    def take(self, lo: int, hi: int) -> tuple[NDArray[np.int32], NDArray[np.int32], int]:
        """Remove and return events with lo <= pulse < hi; also count those before lo."""
        if not self.pulse:
            return np.zeros(0, np.int32), np.zeros(0, np.int32), 0
        pulse = np.concatenate(self.pulse)
        tof = np.concatenate(self.tof)
        pix = np.concatenate(self.pixel)
        inside = (pulse >= lo) & (pulse < hi)
        before = pulse < lo
        keep = pulse >= hi
        self.pulse, self.tof, self.pixel = [pulse[keep]], [tof[keep]], [pix[keep]]
        return pix[inside], tof[inside], int(before.sum())

    def drop_before(self, t: int) -> int:
        """Discard events with pulse < t; return how many."""
        if not self.pulse:
            return 0
        pulse = np.concatenate(self.pulse)
        keep = pulse >= t
        n = int((~keep).sum())
        self.pulse = [pulse[keep]]
        self.tof = [np.concatenate(self.tof)[keep]]
        self.pixel = [np.concatenate(self.pixel)[keep]]
        return n


class Segmenter:
    """Cut one run's messages into orientation chunks.

    Parameters
    ----------
    mode
        ``"bluesky"`` or ``"omega"`` (see the module docstring).
    tolerance
        Omega settling tolerance, degrees (``"omega"`` mode).
    """

    def __init__(self, mode: str = "bluesky", tolerance: float = 0.01) -> None:
        if mode not in ("bluesky", "omega"):
            raise FoldError(f"segmentation mode must be 'bluesky' or 'omega', got {mode!r}")
        self.mode = mode
        self.tolerance = float(tolerance)
        self.moving = 0
        self._events = _Pulses()
        self._charge_t: list[int] = []
        self._charge_v: list[float] = []
        self._setpoint: float | None = None
        self._settled_at: int | None = None

    # -- inputs ------------------------------------------------------------------------------

    def on_events(
        self,
        pulse_times: NDArray[np.int64],
        index: NDArray[np.int32],
        tof,
        pixel,  # type: ignore[no-untyped-def]
    ) -> None:
        """An ev44 message: pulse times (ns), their start indices, tof (ns) and pixel ids."""
        n = len(tof)
        counts = np.diff(np.append(np.asarray(index, dtype=np.int64), n))
        pulse = np.repeat(np.asarray(pulse_times, dtype=np.int64), counts)
        self._events.add(pulse, np.asarray(tof), np.asarray(pixel))

    def on_charge(self, t_ns: int, value: float) -> None:
        """An f144 proton_charge value (uC) of the pulse at ``t_ns``."""
        self._charge_t.append(int(t_ns))
        self._charge_v.append(float(value))

    def on_omega(self, source: str, value: float, t_ns: int) -> list[Chunk]:
        """An f144 omega readback (``omega``) or setpoint (``omega_setpoint``)."""
        if self.mode != "omega":
            return []
        out: list[Chunk] = []
        if source == "omega_setpoint":
            if self._setpoint is not None and self._settled_at is not None:
                out.append(self._close(self._setpoint, self._settled_at, int(t_ns)))
            self._setpoint = float(value)
            self._settled_at = None
        elif (
            source == "omega"
            and self._setpoint is not None
            and self._settled_at is None
            and abs(float(value) - self._setpoint) <= self.tolerance
        ):
            self._settled_at = int(t_ns)
            self.moving += self._events.drop_before(int(t_ns))
        return out

    def on_bluesky(self, name: str, doc: dict[str, object]) -> list[Chunk]:
        """A bluesky document; an Event closes its counting window."""
        if self.mode != "bluesky" or name != "event":
            return []
        data = doc["data"]
        assert isinstance(data, dict)
        lo, hi = int(data["count_start_ns"]), int(data["count_stop_ns"])
        return [self._close(float(data["omega"]), lo, hi)]

    def on_stop(self, t_ns: int) -> list[Chunk]:
        """Run stop: close an open omega-mode step; what is left over was taken moving."""
        out: list[Chunk] = []
        if self.mode == "omega" and self._setpoint is not None and self._settled_at is not None:
            out.append(self._close(self._setpoint, self._settled_at, int(t_ns) + 1))
            self._setpoint = None
        self.moving += self._events.drop_before(2**62)
        return out

    # -- internals ---------------------------------------------------------------------------

    def _close(self, omega: float, lo: int, hi: int) -> Chunk:
        pix, tof, before = self._events.take(lo, hi)
        self.moving += before
        t = np.asarray(self._charge_t, dtype=np.int64)
        v = np.asarray(self._charge_v)
        sel = (t >= lo) & (t < hi)
        charge = float(v[sel].sum())
        keep = t >= hi
        self._charge_t = t[keep].tolist()
        self._charge_v = v[keep].tolist()
        return Chunk(
            omega=omega, start_ns=lo, stop_ns=hi, pixel_id=pix, tof_ns=tof, proton_charge=charge
        )
