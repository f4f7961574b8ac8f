"""Orientation segmentation: which counting step each neutron event belongs to.

Two sources of truth, both streaming (message by message, in timestamp order):

* ``"bluesky"``: the run engine's Event document of each step carries the counting window
  (``count_start_ns``, ``count_stop_ns``) and the omega readback. Event messages are held
  until the Event document of their window arrives (bluesky emits it after the count).
* ``"omega"``: the f144 omega log alone. A step starts at the first readback within
  ``tolerance`` of the current setpoint and ends at the next setpoint; pulses outside any
  step (the goniometer moving or settling) are dropped.

Topics arrive in any order relative to each other (Kafka orders messages only within a
partition), so an announced window is closed only when both the event stream and the
proton-charge stream have reached its end (a pulse at or after ``stop``), or when the run
is over (:meth:`Segmenter.flush`). Events that belong to no step are counted as
``moving``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from consumers.exceptions import FoldError

__all__ = ["Chunk", "Segmenter"]

logger = logging.getLogger(__name__)

# pulse times are int64 ns: a counting window outside that range cannot exist
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


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
        pulse, tof, pix = self.arrays()
        inside = (pulse >= lo) & (pulse < hi)
        keep = pulse >= hi
        self.pulse, self.tof, self.pixel = [pulse[keep]], [tof[keep]], [pix[keep]]
        return pix[inside], tof[inside], int((pulse < lo).sum())

    def arrays(self) -> tuple[NDArray[np.int64], NDArray[np.int32], NDArray[np.int32]]:
        """All buffered events as three arrays."""
        if not self.pulse:
            return np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32)
        return np.concatenate(self.pulse), np.concatenate(self.tof), np.concatenate(self.pixel)


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
        # counting windows waiting for their events: (omega, lo, hi)
        self._windows: list[tuple[float, int, int]] = []
        # latest pulse time seen on the event and charge streams (topics arrive in any order)
        self._event_mark = -1
        self._charge_mark = -1
        # end of the latest bluesky counting window: steps follow one another in time
        self._window_end: int | None = None
        # the run stop's time (ns), once seen: the last omega-mode step ends there, even when
        # its readback settles after the stop has been read (topics arrive in any order)
        self._stop_at: int | None = None

    # -- inputs ------------------------------------------------------------------------------

    def on_events(
        self,
        pulse_times: NDArray[np.int64],
        index: NDArray[np.int32],
        tof: NDArray[np.int32],
        pixel: NDArray[np.int32],
    ) -> list[Chunk]:
        """An ev44 message: pulse times (ns), their start indices, tof (ns) and pixel ids."""
        n = len(tof)
        times = np.asarray(pulse_times, dtype=np.int64)
        counts = np.diff(np.append(np.asarray(index, dtype=np.int64), n))
        pulse = np.repeat(times, counts)
        self._events.add(pulse, np.asarray(tof), np.asarray(pixel))
        if len(times):
            self._event_mark = max(self._event_mark, int(times.max()))
        return self._drain()

    def on_charge(self, t_ns: int, value: float) -> list[Chunk]:
        """An f144 proton_charge value (uC) of the pulse at ``t_ns``."""
        self._charge_t.append(int(t_ns))
        self._charge_v.append(float(value))
        self._charge_mark = max(self._charge_mark, int(t_ns))
        return self._drain()

    def on_omega(self, source: str, value: float, t_ns: int) -> list[Chunk]:
        """An f144 omega readback (``omega``) or setpoint (``omega_setpoint``)."""
        if self.mode != "omega":
            return []
        if source == "omega_setpoint":
            if self._setpoint is not None and self._settled_at is not None:
                self._windows.append((self._setpoint, self._settled_at, int(t_ns)))
            self._setpoint = float(value)
            self._settled_at = None
        elif (
            source == "omega"
            and self._setpoint is not None
            and self._settled_at is None
            and abs(float(value) - self._setpoint) <= self.tolerance
            and (self._stop_at is None or int(t_ns) <= self._stop_at)
        ):
            self._settled_at = int(t_ns)
        return self._drain()

    def on_bluesky(self, name: str, doc: dict[str, object]) -> list[Chunk]:
        """A bluesky document; an Event announces a counting window."""
        if self.mode != "bluesky" or name != "event":
            return []
        data = doc["data"]
        assert isinstance(data, dict)
        lo, hi = int(data["count_start_ns"]), int(data["count_stop_ns"])
        omega = float(data["omega"])
        if not np.isfinite(omega) or not _I64_MIN <= lo < hi <= _I64_MAX:
            raise ValueError(f"bluesky Event with omega {omega} and window [{lo}, {hi})")
        if self._window_end is not None and lo < self._window_end:
            # a repeated or out-of-order Event: it would take (or leave as moving) the
            # events of another step
            raise ValueError(
                f"bluesky Event window [{lo}, {hi}) starts before the end of the previous "
                f"one ({self._window_end})"
            )
        self._window_end = hi
        self._windows.append((omega, lo, hi))
        return self._drain()

    def on_stop(self, t_ns: int) -> None:
        """Run stop: the omega-mode step open at the end of the run ends here. Which step
        that is, is known only once the whole motion log is in (the run-control topic may be
        read before it), so :meth:`flush` makes its window."""
        self._stop_at = int(t_ns)

    def _end_last_step(self) -> None:
        """After the run stop: the settled omega-mode step becomes the last window."""
        if (
            self.mode == "omega"
            and self._stop_at is not None
            and self._setpoint is not None
            and self._settled_at is not None
        ):
            self._windows.append((self._setpoint, self._settled_at, self._stop_at + 1))
            self._setpoint = None

    def flush(self) -> list[Chunk]:
        """Close every announced window (all messages of the run are in); the events left
        over were taken while moving."""
        self._end_last_step()
        out = [self._close(*w) for w in self._windows]
        self._windows = []
        self.moving += len(self._events.arrays()[0])
        self._events = _Pulses()
        return out

    @property
    def pending_windows(self) -> int:
        """Announced windows still waiting for their events."""
        return len(self._windows)

    # -- state (checkpoints) -----------------------------------------------------------------

    def state(self) -> dict[str, object]:
        """Everything needed to resume: JSON-ready scalars plus numpy arrays."""
        pulse, tof, pix = self._events.arrays()
        return {
            "mode": self.mode,
            "tolerance": self.tolerance,
            "moving": self.moving,
            "setpoint": self._setpoint,
            "settled_at": self._settled_at,
            "windows": [list(w) for w in self._windows],
            "event_mark": self._event_mark,
            "charge_mark": self._charge_mark,
            "window_end": self._window_end,
            "stop_at": self._stop_at,
            "charge_t": np.asarray(self._charge_t, dtype=np.int64),
            "charge_v": np.asarray(self._charge_v, dtype=np.float64),
            "pulse": pulse,
            "tof": tof,
            "pixel": pix,
        }

    @classmethod
    def from_state(cls, st: dict[str, object]) -> Segmenter:
        """Rebuild from :meth:`state`."""
        seg = cls(str(st["mode"]), float(st["tolerance"]))  # type: ignore[arg-type]
        seg.moving = int(st["moving"])  # type: ignore[call-overload]
        seg._setpoint = None if st["setpoint"] is None else float(st["setpoint"])  # type: ignore[arg-type]
        seg._settled_at = None if st["settled_at"] is None else int(st["settled_at"])  # type: ignore[call-overload]
        seg._windows = [(float(a), int(b), int(c)) for a, b, c in st["windows"]]  # type: ignore[attr-defined]
        seg._event_mark = int(st["event_mark"])  # type: ignore[call-overload]
        seg._charge_mark = int(st["charge_mark"])  # type: ignore[call-overload]
        end = st.get("window_end")  # absent from older checkpoints
        seg._window_end = None if end is None else int(end)  # type: ignore[call-overload]
        stop = st.get("stop_at")  # absent from older checkpoints
        seg._stop_at = None if stop is None else int(stop)  # type: ignore[call-overload]
        seg._charge_t = np.asarray(st["charge_t"]).tolist()
        seg._charge_v = np.asarray(st["charge_v"]).tolist()
        seg._events.add(
            np.asarray(st["pulse"], dtype=np.int64),
            np.asarray(st["tof"], dtype=np.int32),
            np.asarray(st["pixel"], dtype=np.int32),
        )
        return seg

    # -- internals ---------------------------------------------------------------------------

    def _drain(self) -> list[Chunk]:
        """Close the windows whose events and charges have all arrived, in order."""
        out: list[Chunk] = []
        mark = min(self._event_mark, self._charge_mark)
        while self._windows and self._windows[0][2] <= mark:
            out.append(self._close(*self._windows.pop(0)))
        return out

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
