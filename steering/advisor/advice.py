"""Reading an advice dict: the steering's state and the next orientation it suggests.

The steering loop (:class:`steering.loop.SteeringLoop`) hands every advice dict to its
sinks; ``GET /runs/{id}/advice`` serves the run's latest. What the control system needs
of one is two things, read here in one place for the queue sink
(:mod:`steering.advisor.queue`) and the plans (:mod:`steering.advisor.plans`):

* the state, ``advice["state"]``: ``"waiting"``, ``"measuring"``, ``"paused"`` or
  ``"done"``;
* the next orientation, ``advice["next"]``: ``{"omega": deg, "count_time_s": s
  (optional), "source": "advisor" | "forced", "by": name or None}`` or None.

Advice without these keys (from a service that does not set them) falls back to the
ranking's best candidate, ``advice["ranking"]["candidates"][0]["omega"]`` (or, for an
item of ``GET /runs/{id}/advice``, which carries the ranking's keys at its top level,
``advice["candidates"][0]["omega"]``), and its state is ``"measuring"`` when there is
one, else ``"waiting"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["STATES", "NextOrientation", "advice_state", "next_orientation"]

#: the states of the steering, as the advice's ``state`` names them
STATES = ("waiting", "measuring", "paused", "done")


@dataclass(frozen=True, slots=True, kw_only=True)
class NextOrientation:
    """Where the advice says to measure next.

    Attributes
    ----------
    omega
        Goniometer angle, degrees.
    count_time_s
        How long to count there, seconds (None: the advice does not say).
    source
        ``"advisor"`` (the ranking's choice) or ``"forced"`` (a person's).
    by
        Who forced it (None for the advisor).
    """

    omega: float
    count_time_s: float | None = None
    source: str = "advisor"
    by: str | None = None


def next_orientation(advice: Mapping[str, Any] | None) -> NextOrientation | None:
    """The advice's next orientation, or None when it suggests none (no ranking yet, the
    advisor refused the input, ``next`` is None, or the angle is not a finite number)."""
    if not advice:
        return None
    if "next" in advice:
        nxt = advice["next"]
        if not isinstance(nxt, Mapping):
            return None
        omega = _number(nxt.get("omega"))
        if omega is None:
            return None
        by = nxt.get("by")
        return NextOrientation(
            omega=omega,
            count_time_s=_number(nxt.get("count_time_s")),
            source=str(nxt.get("source") or "advisor"),
            by=None if by is None else str(by),
        )
    ranking = advice.get("ranking") if "ranking" in advice else advice
    if not isinstance(ranking, Mapping):
        return None
    candidates = ranking.get("candidates")
    if not candidates or not isinstance(candidates[0], Mapping):
        return None
    omega = _number(candidates[0].get("omega"))
    return None if omega is None else NextOrientation(omega=omega)


def advice_state(advice: Mapping[str, Any] | None) -> str:
    """The steering's state in the advice (one of :data:`STATES`); without a ``state``
    key, ``"measuring"`` when the advice suggests a next orientation, else ``"waiting"``."""
    if advice and isinstance(advice.get("state"), str):
        return str(advice["state"])
    return "measuring" if next_orientation(advice) is not None else "waiting"


def _number(value: Any) -> float | None:
    """A finite float, or None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None
