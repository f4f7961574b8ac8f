"""A person in charge of the advisor: the controls of a run's advice over the API.

* ``GET /runs/{id}/advisor``: the controls, the override log, the state and the next angle
  as the controls make them now (open);
* ``POST /runs/{id}/advisor/pause`` and ``/resume``: stop and restart offering angles;
* ``POST /runs/{id}/advisor/exclude`` ``{"from": deg, "to": deg}``: never offer that closed
  range; ``DELETE /runs/{id}/advisor/exclude``: clear every excluded range;
* ``POST /runs/{id}/advisor/force`` ``{"omega": deg}``: offer that angle next, once;
  ``DELETE /runs/{id}/advisor/force``: drop it;
* ``POST /runs/{id}/advisor/target`` ``{"std": {name: eV/A^2}}`` and/or
  ``{"d_criterion": x}``: the target precision; ``DELETE /runs/{id}/advisor/target``.

Every change needs a token (:func:`steering.api.deps.require_token`) and is recorded with
the token's name and the time in the run history, which keeps the controls across a
restart (:meth:`steering.api.state.LiveState.controls_for`). Bodies are validated
(:mod:`steering.api.schemas`; 422), then the values against the run's goniometer range
(422) and the other controls (409); an unknown run is 404. The run goes on whatever is
refused. The controls are applied by :meth:`steering.loop.SteeringLoop.advise`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException

from steering import metrics
from steering.advisor.controls import MAX_EXCLUDED, AdvisorControls
from steering.api.deps import HistoryDep, LiveDep, TokenName, get_run
from steering.api.schemas import ExcludeRange, ForceNext, TargetPrecision
from steering.api.state import LiveState
from steering.db import History
from steering.exceptions import AdvisorError, ControlsConflict

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(tags=["advisor controls"])

_READ: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such run."},
    503: {"description": "The run's stored controls are damaged (the message says how)."},
}
_CHANGE: dict[int | str, dict[str, Any]] = {
    **_READ,
    409: {"description": "The change contradicts the controls already set."},
    422: {"description": "A bad value: not finite, an empty range, off the goniometer."},
}


def _controls(run_id: str, history: History, live: LiveState) -> AdvisorControls:
    """The controls of a run on record (404 for an unknown run)."""
    get_run(history, run_id)
    try:
        return live.controls_for(run_id, history)
    except AdvisorError as exc:
        logger.error("run %s: its stored advisor controls are damaged: %s", run_id, exc)
        raise HTTPException(
            503, f"the stored advisor controls of run {run_id!r} are damaged: {exc}"
        ) from exc


def _view(
    run_id: str, controls: AdvisorControls, history: History, live: LiveState
) -> dict[str, Any]:
    """The controls with the state and next angle they make of the latest ranking."""
    latest = history.advice(run_id, latest=True)
    last = latest[-1] if latest else None
    candidates = list(last.get("candidates") or []) if last else []
    state = controls.state_name(ranked=last is not None)
    if last is not None and last.get("state") == "done":
        state = "done"
    rng = live.omega_range(run_id)
    return {
        "run_id": run_id,
        "state": state,
        "next": None if state == "done" else controls.next_angle(candidates),
        "omega_range": None if rng is None else list(rng),
        "controls": controls.to_dict(),
    }


def _change(
    run_id: str, history: History, live: LiveState, action: str, *args: Any
) -> dict[str, Any]:
    """Apply ``AdvisorControls.<action>(*args)``; 409 for a conflict, 422 for a bad value."""
    controls = _controls(run_id, history, live)
    try:
        record = getattr(controls, action)(*args)
    except ControlsConflict as exc:
        raise HTTPException(409, str(exc)) from exc
    except AdvisorError as exc:
        if f"at most {MAX_EXCLUDED} excluded" in str(exc):
            metrics.REQUESTS_REFUSED.labels(limit="advisor_excluded").inc()
        raise HTTPException(422, str(exc)) from exc
    logger.info("run %s: advisor %s by %s: %s", run_id, record["action"], record["who"], record)
    view = _view(run_id, controls, history, live)
    # every open page sees the change at once (the live stream's ``controls`` event)
    live.notify(
        run_id, event="controls", action=record["action"], who=record["who"], state=view["state"]
    )
    return {**view, "override": record}


@router.get("/runs/{run_id}/advisor", responses=_READ)
def get_controls(run_id: str, history: HistoryDep, live: LiveDep) -> dict[str, Any]:
    """The advisor's controls and their override log (who, when), the state (``paused``,
    ``waiting``, ``measuring``, ``done``) and the next angle as the controls make it of the
    latest ranking (``{"omega", "source": "advisor" | "forced", "by"}``), and the
    goniometer's range the changes are checked against (null: not known yet)."""
    return _view(run_id, _controls(run_id, history, live), history, live)


@router.post("/runs/{run_id}/advisor/pause", responses=_CHANGE)
def pause(run_id: str, who: TokenName, history: HistoryDep, live: LiveDep) -> dict[str, Any]:
    """Pause the advisor: no next angle is offered until resumed (token)."""
    return _change(run_id, history, live, "pause", who)


@router.post("/runs/{run_id}/advisor/resume", responses=_CHANGE)
def resume(run_id: str, who: TokenName, history: HistoryDep, live: LiveDep) -> dict[str, Any]:
    """Resume the advisor (token)."""
    return _change(run_id, history, live, "resume", who)


@router.post("/runs/{run_id}/advisor/exclude", responses=_CHANGE)
def exclude(
    run_id: str, body: ExcludeRange, who: TokenName, history: HistoryDep, live: LiveDep
) -> dict[str, Any]:
    """Never offer the closed range ``from``..``to`` (degrees; token). 422 when it is empty,
    reversed or off the goniometer; 409 when it holds the forced angle."""
    rng = live.omega_range(run_id)
    return _change(run_id, history, live, "exclude", body.from_, body.to, who, rng)


@router.delete("/runs/{run_id}/advisor/exclude", responses=_CHANGE)
def include_all(run_id: str, who: TokenName, history: HistoryDep, live: LiveDep) -> dict[str, Any]:
    """Clear every excluded range (token)."""
    return _change(run_id, history, live, "clear_excluded", who)


@router.post("/runs/{run_id}/advisor/force", responses=_CHANGE)
def force(
    run_id: str, body: ForceNext, who: TokenName, history: HistoryDep, live: LiveDep
) -> dict[str, Any]:
    """Offer ``omega`` (degrees) as the next angle, once (token). 422 off the goniometer;
    409 in an excluded range."""
    return _change(run_id, history, live, "force", body.omega, who, live.omega_range(run_id))


@router.delete("/runs/{run_id}/advisor/force", responses=_CHANGE)
def unforce(run_id: str, who: TokenName, history: HistoryDep, live: LiveDep) -> dict[str, Any]:
    """Drop the forced angle (token)."""
    return _change(run_id, history, live, "clear_forced", who)


@router.post("/runs/{run_id}/advisor/target", responses=_CHANGE)
def target(
    run_id: str, body: TargetPrecision, who: TokenName, history: HistoryDep, live: LiveDep
) -> dict[str, Any]:
    """Set the target precision: ``std`` per coefficient (eV/A^2) and/or ``d_criterion``
    (token). 422 without either."""
    value = body.model_dump(exclude_none=True)
    return _change(run_id, history, live, "set_target", value, who)


@router.delete("/runs/{run_id}/advisor/target", responses=_CHANGE)
def clear_target(run_id: str, who: TokenName, history: HistoryDep, live: LiveDep) -> dict[str, Any]:
    """Drop the target precision (token)."""
    return _change(run_id, history, live, "clear_target", who)
