"""A person in charge of the advisor: pause, excluded angles, a forced next angle, a target.

:class:`AdvisorControls` is what the people running the experiment have said about a run's
advice. The steering loop (:meth:`steering.loop.SteeringLoop.advise`) applies it after the
ranking is made: excluded angles are not offered, a paused advisor offers nothing, a forced
angle is offered once before the advisor's best. Every change is validated first (an
:class:`~steering.exceptions.AdvisorError` says what was wrong and how to fix it; a change
that contradicts the controls already set is a
:class:`~steering.exceptions.ControlsConflict`) and recorded in :attr:`overrides` with who
made it and when. A :class:`ControlsStore` (the run history,
:class:`steering.db.History`) keeps them, so that they survive a restart of the service.

Angles are goniometer angles omega, degrees. The goniometer's range that a change is
checked against is the run's candidate angles' min..max (``omega_range``; None when the
run's candidates are not known, and then only finiteness is checked).

This module imports no web framework and no database.
"""

from __future__ import annotations

import datetime as _dt
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray

from steering.exceptions import AdvisorError, ControlsConflict

__all__ = [
    "MAX_EXCLUDED",
    "MAX_OVERRIDES_KEPT",
    "MAX_TARGET_COEFFICIENTS",
    "AdvisorControls",
    "ControlsStore",
    "allowed",
    "check_target",
]

#: Most excluded ranges of one run.
MAX_EXCLUDED = 100
#: Most coefficients of a target precision.
MAX_TARGET_COEFFICIENTS = 500
#: Overrides kept in memory (the run history keeps them all).
MAX_OVERRIDES_KEPT = 1000
#: An orientation measured this close to the forced angle uses it up, degrees.
FORCED_TOLERANCE_DEG = 1e-3

#: Called with the controls' state (without the overrides) and the new override record
#: (None when the change was the loop's own bookkeeping); under the controls' lock, so
#: that the stored state never goes back.
StoreCallback = Callable[[dict[str, Any], dict[str, Any] | None], None]


class ControlsStore(Protocol):
    """Where a run's controls are kept (:class:`steering.db.History`)."""

    def load_controls(self, run_id: str) -> dict[str, Any] | None:
        """The run's controls (:meth:`AdvisorControls.to_dict`, all overrides), or None."""
        ...

    def save_controls(
        self, run_id: str, state: dict[str, Any], override: dict[str, Any] | None
    ) -> None:
        """Keep the run's controls ``state`` and append ``override`` to its log."""
        ...


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat()


def _finite(value: Any, what: str) -> float:
    """``value`` as a finite float; AdvisorError naming ``what`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AdvisorError(f"{what} must be a number (degrees), got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise AdvisorError(f"{what} must be finite, got {value!r}")
    return x


def _check_range(omega_range: tuple[float, float] | None) -> tuple[float, float] | None:
    if omega_range is None:
        return None
    lo, hi = (_finite(v, "the goniometer's range") for v in omega_range)
    return (min(lo, hi), max(lo, hi))


def allowed(omegas: ArrayLike, excluded: Sequence[Sequence[float]]) -> NDArray[np.bool_]:
    """(n,) bool: True where an angle (degrees) lies in none of the closed ``excluded``
    ranges."""
    w = np.asarray(omegas, dtype=float)
    ok = np.ones(w.shape, dtype=bool)
    for lo, hi in excluded:
        ok &= ~((w >= float(lo)) & (w <= float(hi)))
    return ok


def check_target(target: Mapping[str, Any], names: Sequence[str] | None = None) -> dict[str, Any]:
    """A target precision checked for shape, finiteness and sign (and, with ``names``,
    that it names coefficients of the material).

    Parameters
    ----------
    target
        ``{"std": {coefficient name: std, eV/A^2}}`` and/or ``{"d_criterion": x}`` (the
        D-criterion, ``det(C)^(1/(2k))`` of the k coefficients' covariance, eV/A^2).
    names
        The material's coefficients (None: names are not checked, e.g. before the run's
        material is known).

    Returns
    -------
    dict
        A copy with floats.

    Raises
    ------
    AdvisorError
        Not a mapping, no known key, an unknown key, an empty or too long ``std``, a name
        that is not a string (or not one of ``names``), or a value that is not a positive
        finite number.
    """
    if not isinstance(target, Mapping):
        raise AdvisorError(f"a target is an object, got {type(target).__name__}")
    unknown = sorted(str(k) for k in target if k not in ("std", "d_criterion"))
    if unknown:
        raise AdvisorError(f"a target is `std` and/or `d_criterion`; unknown keys: {unknown}")
    out: dict[str, Any] = {}
    if target.get("std") is not None:
        std = target["std"]
        if not isinstance(std, Mapping) or not std:
            raise AdvisorError(
                "target `std` must be a non-empty object {coefficient name: std in eV/A^2}"
            )
        if len(std) > MAX_TARGET_COEFFICIENTS:
            raise AdvisorError(
                f"target `std` has {len(std)} coefficients; at most {MAX_TARGET_COEFFICIENTS}"
            )
        checked: dict[str, float] = {}
        for name, value in std.items():
            if not isinstance(name, str) or not 1 <= len(name) <= 64:
                raise AdvisorError(f"a coefficient name is 1 to 64 characters, got {name!r}")
            if names is not None and name not in names:
                raise AdvisorError(f"target names {name!r}, not a coefficient of {list(names)}")
            x = _finite(value, f"target std of {name}")
            if x <= 0:
                raise AdvisorError(f"target std of {name} must be > 0 eV/A^2, got {x}")
            checked[name] = x
        out["std"] = checked
    if target.get("d_criterion") is not None:
        d = _finite(target["d_criterion"], "target d_criterion")
        if d <= 0:
            raise AdvisorError(f"target d_criterion must be positive, got {d}")
        out["d_criterion"] = d
    if not out:
        raise AdvisorError('a target needs `std` ({"1NN_xx": 0.05, ...}) or `d_criterion`')
    return out


@dataclass
class AdvisorControls:
    """What the people in charge have said about one run's advice.

    Attributes
    ----------
    paused
        The advisor offers no next angle (it still ranks, for the record).
    excluded
        Closed ranges (from, to) of omega, degrees, never offered (e.g. where the sample
        environment shadows the beam).
    forced_next
        An angle, degrees, offered as the next one before the advisor's best; used up once
        an orientation has been measured after it was offered (or at it).
    forced_by
        Who forced it (a token's name).
    forced_offered
        The forced angle has been offered in an advice.
    target
        The target precision (:func:`check_target`), stored for whoever consumes it.
    overrides
        Every change: ``{"action", "value", "who", "at"}`` (``at``: ISO 8601, UTC;
        ``who``: the token's name, None for the loop's own bookkeeping), oldest first;
        the last :data:`MAX_OVERRIDES_KEPT` in memory.
    store
        Called on every change (see :data:`StoreCallback`); None: kept in memory only.
    """

    paused: bool = False
    excluded: list[tuple[float, float]] = field(default_factory=list)
    forced_next: float | None = None
    forced_by: str | None = None
    forced_offered: bool = False
    target: dict[str, Any] | None = None
    overrides: list[dict[str, Any]] = field(default_factory=list)
    store: StoreCallback | None = field(default=None, repr=False, compare=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    # -- (de)serialisation -----------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The controls without the override log (JSON-ready)."""
        with self._lock:
            return {
                "paused": self.paused,
                "excluded": [[lo, hi] for lo, hi in self.excluded],
                "forced_next": self.forced_next,
                "forced_by": self.forced_by,
                "forced_offered": self.forced_offered,
                "target": None if self.target is None else dict(self.target),
            }

    def to_dict(self, last: int | None = None) -> dict[str, Any]:
        """JSON-ready dict; ``last``: only the last overrides (``n_overrides`` counts all)."""
        with self._lock:
            log = self.overrides if last is None else self.overrides[-last:] if last else []
            return {
                **self.state(),
                "overrides": [dict(o) for o in log],
                "n_overrides": len(self.overrides),
            }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdvisorControls:
        """Controls from :meth:`to_dict` (or :meth:`state`); the values are checked again.

        Raises
        ------
        AdvisorError
            A value that does not pass the checks (a damaged record).
        """
        excluded = []
        for pair in data.get("excluded") or []:
            if not isinstance(pair, Sequence) or len(pair) != 2:
                raise AdvisorError(f"an excluded range is [from, to], got {pair!r}")
            lo, hi = _finite(pair[0], "excluded from"), _finite(pair[1], "excluded to")
            if not lo < hi:
                raise AdvisorError(f"excluded range [{lo}, {hi}] is empty or reversed")
            excluded.append((lo, hi))
        forced = data.get("forced_next")
        target = data.get("target")
        return cls(
            paused=bool(data.get("paused", False)),
            excluded=excluded,
            forced_next=None if forced is None else _finite(forced, "forced_next"),
            forced_by=None if data.get("forced_by") is None else str(data["forced_by"]),
            forced_offered=bool(data.get("forced_offered", False)),
            target=None if target is None else check_target(target),
            overrides=[dict(o) for o in data.get("overrides") or []][-MAX_OVERRIDES_KEPT:],
        )

    # -- what the controls allow -------------------------------------------------------------

    def allowed(self, omegas: ArrayLike) -> NDArray[np.bool_]:
        """(n,) bool: True where an angle (degrees) lies in no excluded range."""
        with self._lock:
            return allowed(omegas, self.excluded)

    def state_name(self, *, ranked: bool) -> str:
        """``"paused"``, ``"waiting"`` (no ranking yet) or ``"measuring"``."""
        if self.paused:
            return "paused"
        return "measuring" if ranked else "waiting"

    def next_angle(
        self, candidates: Sequence[Mapping[str, Any]], *, offer: bool = False
    ) -> dict[str, Any] | None:
        """The next angle to measure: ``{"omega", "source", "by"}``.

        The forced angle (``source: "forced"``, ``by``: who forced it), else the first of
        ``candidates`` (ranked, best first, each with ``omega`` in degrees) that no range
        excludes (``source: "advisor"``, ``by``: None); None when paused or when nothing is
        allowed. ``offer=True`` marks the forced angle as offered (the loop's advice; it is
        then used up by the next orientation measured).
        """
        with self._lock:
            if self.paused:
                return None
            if self.forced_next is not None:
                if offer and not self.forced_offered:
                    self.forced_offered = True
                    self._stored(None)
                return {"omega": self.forced_next, "source": "forced", "by": self.forced_by}
            omegas = [float(c["omega"]) for c in candidates]
            ok = self.allowed(omegas)
            for w, good in zip(omegas, ok, strict=True):
                if good:
                    return {"omega": w, "source": "advisor", "by": None}
            return None

    def measured(self, omega: float) -> dict[str, Any] | None:
        """An orientation was measured at ``omega`` (degrees): the forced angle is used up
        when it had been offered, or when this is it. Returns the override record of that,
        or None."""
        with self._lock:
            if self.forced_next is None:
                return None
            at_it = abs(float(omega) - self.forced_next) <= FORCED_TOLERANCE_DEG
            if not (self.forced_offered or at_it):
                return None
            value = {"omega": self.forced_next, "measured": float(omega), "by": self.forced_by}
            self.forced_next, self.forced_by, self.forced_offered = None, None, False
            return self._record("forced_used", value, None)

    # -- changes (each checked, recorded and stored) -----------------------------------------

    def pause(self, who: str | None) -> dict[str, Any]:
        """Pause the advice (no next angle is offered). Returns the override record."""
        with self._lock:
            self.paused = True
            return self._record("pause", None, who)

    def resume(self, who: str | None) -> dict[str, Any]:
        """Resume the advice. Returns the override record."""
        with self._lock:
            self.paused = False
            return self._record("resume", None, who)

    def exclude(
        self,
        lo: float,
        hi: float,
        who: str | None,
        omega_range: tuple[float, float] | None = None,
    ) -> dict[str, Any]:
        """Never offer angles in the closed range [``lo``, ``hi``], degrees.

        Parameters
        ----------
        omega_range
            The goniometer's range (the run's candidate angles' min, max), degrees; None:
            not known, not checked.

        Raises
        ------
        AdvisorError
            A non-finite bound, an empty or reversed range, a range entirely outside the
            goniometer's, or more than :data:`MAX_EXCLUDED` ranges.
        ControlsConflict
            The range holds the forced angle.
        """
        lo, hi = _finite(lo, "excluded `from`"), _finite(hi, "excluded `to`")
        if not lo < hi:
            raise AdvisorError(
                f"excluded range from {lo} to {hi} deg is empty or reversed: give `from` < `to`"
            )
        rng = _check_range(omega_range)
        if rng is not None and (hi < rng[0] or lo > rng[1]):
            raise AdvisorError(
                f"excluded range [{lo}, {hi}] deg lies outside the goniometer's range "
                f"[{rng[0]}, {rng[1]}] deg (the run's candidate angles): it excludes nothing"
            )
        with self._lock:
            if len(self.excluded) >= MAX_EXCLUDED:
                raise AdvisorError(
                    f"a run has at most {MAX_EXCLUDED} excluded ranges: clear them "
                    "(DELETE .../advisor/exclude) and give wider ones"
                )
            if self.forced_next is not None and lo <= self.forced_next <= hi:
                raise ControlsConflict(
                    f"the forced next angle {self.forced_next} deg lies in [{lo}, {hi}] deg: "
                    "clear it (DELETE .../advisor/force) or force another angle first"
                )
            self.excluded.append((lo, hi))
            return self._record("exclude", [lo, hi], who)

    def clear_excluded(self, who: str | None) -> dict[str, Any]:
        """Offer every angle again. Returns the override record."""
        with self._lock:
            value = [[lo, hi] for lo, hi in self.excluded]
            self.excluded = []
            return self._record("include_all", value, who)

    def force(
        self, omega: float, who: str | None, omega_range: tuple[float, float] | None = None
    ) -> dict[str, Any]:
        """Offer ``omega`` (degrees) as the next angle, once.

        Raises
        ------
        AdvisorError
            A non-finite angle, or one outside the goniometer's range ``omega_range``.
        ControlsConflict
            An angle in an excluded range.
        """
        w = _finite(omega, "the forced angle `omega`")
        rng = _check_range(omega_range)
        if rng is not None and not rng[0] <= w <= rng[1]:
            raise AdvisorError(
                f"the forced angle {w} deg is outside the goniometer's range "
                f"[{rng[0]}, {rng[1]}] deg (the run's candidate angles)"
            )
        with self._lock:
            if not self.allowed([w])[0]:
                ranges = [(lo, hi) for lo, hi in self.excluded if lo <= w <= hi]
                raise ControlsConflict(
                    f"the forced angle {w} deg lies in the excluded range {list(ranges[0])} "
                    "deg: force another angle or clear the exclusions first"
                )
            self.forced_next, self.forced_by, self.forced_offered = w, who, False
            return self._record("force", w, who)

    def clear_forced(self, who: str | None) -> dict[str, Any]:
        """Drop the forced angle (the advisor's best is offered again)."""
        with self._lock:
            value = self.forced_next
            self.forced_next, self.forced_by, self.forced_offered = None, None, False
            return self._record("unforce", value, who)

    def set_target(self, target: Mapping[str, Any], who: str | None) -> dict[str, Any]:
        """Set the target precision (:func:`check_target`; AdvisorError when bad)."""
        checked = check_target(target)
        with self._lock:
            self.target = checked
            return self._record("target", checked, who)

    def clear_target(self, who: str | None) -> dict[str, Any]:
        """Drop the target precision."""
        with self._lock:
            self.target = None
            return self._record("clear_target", None, who)

    # -- bookkeeping -----------------------------------------------------------------------

    def _record(self, action: str, value: Any, who: str | None) -> dict[str, Any]:
        """Log a change (under the lock) and store it."""
        record = {"action": action, "value": value, "who": who, "at": _now()}
        self.overrides.append(record)
        del self.overrides[:-MAX_OVERRIDES_KEPT]
        self._stored(record)
        return dict(record)

    def _stored(self, record: dict[str, Any] | None) -> None:
        if self.store is not None:
            self.store(self.state(), record)
