"""Bluesky plans of a steered run: one orientation, and orientation after orientation at the
advisor's suggestion until its advice says ``"done"``.

* :func:`count_at_plan` makes ``steer_count_at(omega, count_time=..., md=None)``, the plan
  the queue sink (:class:`steering.advisor.queue.QueueSink`) puts on a bluesky-queueserver
  queue: move the goniometer to ``omega`` and count. A profile collection makes it from
  its own devices: ``steer_count_at = count_at_plan(omega, [detector])``.
* :func:`steer_orientations` runs in a RunEngine without a queue: it reads the advice
  (:func:`http_advice` for the service's ``GET /runs/{id}/advice``, or any callable),
  measures the suggested orientation, waits for the advice that follows it, and stops
  when the advice's state is ``"done"``.

Counting: a detector with a ``count_time`` component has it set to the count time and
counts that long when triggered; with none, the plan waits the count time out before it
reads the detectors (``ophyd.sim``'s devices).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any

from steering.advisor.advice import advice_state, next_orientation
from steering.exceptions import AdvisorError

__all__ = ["AdviceSource", "count_at_plan", "http_advice", "steer_orientations"]

#: anything that returns the latest advice (None while there is none)
AdviceSource = Callable[[], Mapping[str, Any] | None]

Plan = Generator[Any, Any, Any]


def _measure(motor: Any, detectors: Sequence[Any], omega: float, count_time: float) -> Plan:
    """Move ``motor`` to ``omega`` (deg), count ``count_time`` (s), read (one Event)."""
    from bluesky import plan_stubs as bps

    yield from bps.mv(motor, omega)
    timed = [d for d in detectors if hasattr(d, "count_time")]
    for det in timed:
        yield from bps.mv(det.count_time, count_time)
    if not timed and count_time > 0:
        yield from bps.sleep(count_time)
    yield from bps.trigger_and_read([*detectors, motor])


def count_at_plan(
    motor: Any, detectors: Sequence[Any], *, name: str = "steer_count_at"
) -> Callable[..., Plan]:
    """A plan ``name(omega, count_time=1.0, md=None)`` over these devices (a generator
    function, so that the queueserver lists it).

    Parameters
    ----------
    motor
        The goniometer axis (an ophyd positioner, e.g. ``ophyd.sim.SynAxis(name="omega")``).
    detectors
        Readable devices counted at every orientation.
    name
        The plan's name (its ``__name__`` and ``plan_name`` in the run's metadata).
    """
    dets = list(detectors)

    def plan(omega: float, count_time: float = 1.0, md: dict[str, Any] | None = None) -> Plan:
        from bluesky import preprocessors as bpp

        _md = {
            "plan_name": name,
            "plan_args": {"omega": omega, "count_time": count_time},
            "motors": [motor.name],
            "detectors": [d.name for d in dets],
            **(md or {}),
        }

        @bpp.run_decorator(md=_md)
        def inner() -> Plan:
            yield from _measure(motor, dets, float(omega), float(count_time))

        return (yield from inner())

    plan.__name__ = plan.__qualname__ = name
    # real types, not this module's postponed strings: the queueserver builds a pydantic
    # model of the plan's parameters from them, outside this module's namespace
    plan.__annotations__ = {"omega": float, "count_time": float, "md": dict | None}
    plan.__doc__ = (
        f"Move {motor.name} to ``omega`` (deg) and count ``count_time`` seconds with "
        f"{', '.join(d.name for d in dets) or 'no detector'} (one run, one Event)."
    )
    return plan


def steer_orientations(
    advice: AdviceSource,
    motor: Any,
    detectors: Sequence[Any],
    *,
    count_time: float = 1.0,
    start_omegas: Sequence[float] = (),
    poll_s: float = 1.0,
    wait_s: float = 600.0,
    max_orientations: int | None = None,
    md: dict[str, Any] | None = None,
) -> Plan:
    """Measure orientation after orientation where the advice says, until it says ``done``.

    One bluesky run; one Event per orientation. After each orientation the plan polls
    ``advice`` every ``poll_s`` seconds (``bps.sleep``: the RunEngine can pause it there)
    until advice that follows the measurement arrives (its ``n_orientations`` changed),
    then measures its next orientation, at the advice's ``count_time_s`` when it gives
    one. While the advice's state is ``"paused"`` or ``"waiting"`` it waits.

    Parameters
    ----------
    advice
        Returns the latest advice dict (:func:`http_advice`, or an in-process callable).
    motor, detectors
        The goniometer axis and the devices counted at every orientation.
    count_time
        Seconds per orientation where the advice gives none.
    start_omegas
        Angles (deg) measured first, before any advice is asked for (the advisor has
        nothing to rank before the first orientation).
    poll_s
        Seconds between two readings of the advice.
    wait_s
        Longest wait for new advice, seconds; then the plan fails (the service is gone).
    max_orientations
        Stop after this many orientations in all (None: only on ``done``).
    md
        Added to the run's start document.

    Returns
    -------
    list of float
        The angles measured, degrees.
    """
    from bluesky import plan_stubs as bps
    from bluesky import preprocessors as bpp

    dets = list(detectors)
    measured: list[float] = []
    _md = {
        "plan_name": "steer_orientations",
        "motors": [motor.name],
        "detectors": [d.name for d in dets],
        **(md or {}),
    }

    def enough() -> bool:
        return max_orientations is not None and len(measured) >= max_orientations

    @bpp.run_decorator(md=_md)
    def inner() -> Plan:
        for omega in start_omegas:
            if enough():
                return
            yield from _measure(motor, dets, float(omega), count_time)
            measured.append(float(omega))
        seen: Any = None  # the n_orientations of the advice last measured at
        asked = False
        since = time.monotonic()
        while not enough():
            latest = advice()
            state = advice_state(latest)
            if state == "done":
                return
            nxt = next_orientation(latest)
            n = None if latest is None else latest.get("n_orientations")
            fresh = not asked or n != seen
            if state != "measuring" or nxt is None or not fresh:
                if time.monotonic() - since > wait_s:
                    raise AdvisorError(
                        f"no new advice within {wait_s:g} s (state {state!r}); is the "
                        "steering service running and following this run?"
                    )
                yield from bps.sleep(poll_s)
                continue
            t = nxt.count_time_s if nxt.count_time_s is not None else count_time
            yield from _measure(motor, dets, nxt.omega, t)
            measured.append(nxt.omega)
            seen, asked, since = n, True, time.monotonic()

    yield from inner()
    return measured


def http_advice(
    base_url: str, run_id: str, *, token: str | None = None, timeout_s: float = 5.0
) -> AdviceSource:
    """An advice source that reads ``GET {base_url}/runs/{run_id}/advice``: the run's latest
    advice, or None while it has none (or the run is not known yet: 404)."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)

    def latest() -> Mapping[str, Any] | None:
        response = client.get(f"/runs/{run_id}/advice")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        items = response.json().get("advice") or []
        return items[-1] if items else None

    return latest
