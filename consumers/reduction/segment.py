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

Beam-monitor events (:meth:`Segmenter.on_monitor`) are kept as counts per pulse and
assigned to windows by pulse time like the detector's events and the charge. A window also
waits for each monitor stream, but at most until the detector stream is
:data:`MONITOR_LAG_NS` of pulse time past its end: a monitor stream that far behind is taken
as stopped, and the window closes with what it has, its monitor listed in
:attr:`Chunk.monitor_incomplete` (a monitor stream "complete" for a window has reached its
end, or at the run's end the detector stream's last pulse).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from consumers.exceptions import FoldError

__all__ = ["MONITOR_LAG_NS", "Chunk", "Segmenter"]

logger = logging.getLogger(__name__)

# pulse times are int64 ns: a counting window outside that range cannot exist
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1

#: Pulse time (ns) the detector stream may run ahead of a window's end before the window
#: stops waiting for a monitor stream that has not reached it (taken as stopped): 30 s.
MONITOR_LAG_NS = 30 * 10**9


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
    monitor_counts
        Beam-monitor events in the window, per monitor source (every monitor the run
        names or that has sent events).
    monitor_incomplete
        Monitor sources whose stream had not reached the window's end when it closed
        (stopped or far behind): their counts cover part of the window or none of it.
    """

    omega: float
    start_ns: int
    stop_ns: int
    pixel_id: NDArray[np.int32]
    tof_ns: NDArray[np.int32]
    proton_charge: float
    monitor_counts: dict[str, int] = field(default_factory=dict)
    monitor_incomplete: tuple[str, ...] = ()


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
    monitors
        Monitor sources the run names (their counts are expected in every window).
    monitor_lag_ns
        How far (pulse time, ns) the detector stream may run past a window's end while the
        window waits for a monitor stream (:data:`MONITOR_LAG_NS`).
    powder
        A powder run: no goniometer, so its Events carry no omega (every step is at angle
        0); only ``"bluesky"`` segmentation.
    """

    def __init__(
        self,
        mode: str = "bluesky",
        tolerance: float = 0.01,
        *,
        monitors: tuple[str, ...] = (),
        monitor_lag_ns: int = MONITOR_LAG_NS,
        powder: bool = False,
    ) -> None:
        if mode not in ("bluesky", "omega"):
            raise FoldError(f"segmentation mode must be 'bluesky' or 'omega', got {mode!r}")
        if powder and mode != "bluesky":
            raise FoldError(
                "a powder run has no goniometer: its counting steps come from its bluesky "
                "Events (segmentation 'bluesky')"
            )
        self.mode = mode
        self.powder = bool(powder)
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
        self.monitor_lag_ns = int(monitor_lag_ns)
        # per monitor source: pulse times (ns) and events of each pulse; latest pulse seen
        self._mon_t: dict[str, list[int]] = {m: [] for m in monitors}
        self._mon_n: dict[str, list[int]] = {m: [] for m in monitors}
        self._mon_mark: dict[str, int] = dict.fromkeys(monitors, -1)
        #: monitor events outside every window (the goniometer moving), per source
        self.monitor_outside: dict[str, int] = dict.fromkeys(monitors, 0)

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

    def on_monitor(
        self, source: str, pulse_times: NDArray[np.int64], index: NDArray[np.integer], n: int
    ) -> list[Chunk]:
        """A monitor's ev44 message: its pulse times (ns), their start indices and its
        number of events ``n`` (only the counts per pulse are kept)."""
        times = np.asarray(pulse_times, dtype=np.int64)
        counts = np.diff(np.append(np.asarray(index, dtype=np.int64), n))
        if source not in self._mon_t:
            self._mon_t[source], self._mon_n[source] = [], []
            self._mon_mark[source] = -1
            self.monitor_outside[source] = 0
        self._mon_t[source] += times.tolist()
        self._mon_n[source] += counts.tolist()
        if len(times):
            self._mon_mark[source] = max(self._mon_mark[source], int(times.max()))
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
        omega = 0.0 if self.powder else float(data["omega"])
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
        for m, counts in self._mon_n.items():
            self.monitor_outside[m] += int(sum(counts))
            self._mon_t[m], self._mon_n[m] = [], []
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
            "powder": self.powder,
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
            "monitor_lag_ns": self.monitor_lag_ns,
            "monitor_sources": list(self._mon_t),
            "monitor_mark": [self._mon_mark[m] for m in self._mon_t],
            "monitor_outside": [self.monitor_outside[m] for m in self._mon_t],
            "mon_t": np.asarray([t for m in self._mon_t for t in self._mon_t[m]], np.int64),
            "mon_n": np.asarray([c for m in self._mon_n for c in self._mon_n[m]], np.int64),
            "mon_len": np.asarray([len(self._mon_t[m]) for m in self._mon_t], np.int64),
        }

    @classmethod
    def from_state(cls, st: dict[str, object]) -> Segmenter:
        """Rebuild from :meth:`state`."""
        sources = [str(m) for m in st.get("monitor_sources", [])]  # type: ignore[attr-defined]
        seg = cls(
            str(st["mode"]),
            float(st["tolerance"]),  # type: ignore[arg-type]
            monitors=tuple(sources),
            monitor_lag_ns=int(st.get("monitor_lag_ns", MONITOR_LAG_NS)),  # type: ignore[call-overload]
            powder=bool(st.get("powder", False)),
        )
        if sources:
            ends = np.cumsum(np.asarray(st["mon_len"], dtype=np.int64))
            mon_t = np.split(np.asarray(st["mon_t"], dtype=np.int64), ends[:-1])
            mon_n = np.split(np.asarray(st["mon_n"], dtype=np.int64), ends[:-1])
            marks = st["monitor_mark"]
            outside = st["monitor_outside"]
            for i, m in enumerate(sources):
                seg._mon_t[m] = mon_t[i].tolist()
                seg._mon_n[m] = mon_n[i].tolist()
                seg._mon_mark[m] = int(marks[i])  # type: ignore[index]
                seg.monitor_outside[m] = int(outside[i])  # type: ignore[index]
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
        while (
            self._windows and self._windows[0][2] <= mark and self._monitors_in(self._windows[0][2])
        ):
            out.append(self._close(*self._windows.pop(0)))
        return out

    def _monitors_in(self, hi: int) -> bool:
        """Every monitor stream has reached ``hi`` or is taken as stopped (the detector
        stream is :attr:`monitor_lag_ns` past it)."""
        late = self._event_mark >= hi + self.monitor_lag_ns
        return late or all(m >= hi for m in self._mon_mark.values())

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
        counts: dict[str, int] = {}
        incomplete = []
        for m in self._mon_t:
            mt = np.asarray(self._mon_t[m], dtype=np.int64)
            mn = np.asarray(self._mon_n[m], dtype=np.int64)
            counts[m] = int(mn[(mt >= lo) & (mt < hi)].sum())
            self.monitor_outside[m] += int(mn[mt < lo].sum())
            self._mon_t[m], self._mon_n[m] = mt[mt >= hi].tolist(), mn[mt >= hi].tolist()
            # reached the window's end (or, at the run's end, the detector's last pulse)
            if self._mon_mark[m] < min(hi, max(self._event_mark, lo)):
                incomplete.append(m)
        if incomplete:
            logger.warning(
                "orientation at omega %s [%d, %d): monitor stream %s did not reach its end; "
                "its monitor counts are incomplete",
                omega,
                lo,
                hi,
                ", ".join(incomplete),
            )
        return Chunk(
            omega=omega,
            start_ns=lo,
            stop_ns=hi,
            pixel_id=pix,
            tof_ns=tof,
            proton_charge=charge,
            monitor_counts=counts,
            monitor_incomplete=tuple(incomplete),
        )
