"""The service itself: health, models, metrics, the live page and its event stream.

* ``GET /health``: liveness and a one-line state, with the prediction workers' warm-up;
* ``GET /models``; ``POST /models/reload`` (token);
* ``GET /metrics``: Prometheus;
* ``GET /``: the live page; ``GET /stream``: server-sent events (an ``update`` per new
  estimate, a ``controls`` event per change of a run's advisor controls).

The run history and the live state come from the app (:mod:`steering.api.deps`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

import consumers.metrics  # noqa: F401  (registers the service's metrics)
from steering import metrics as steering_metrics  # also registers the service's metrics
from steering.api.deps import HistoryDep, LimitsDep, LiveDep, public_path, require_token
from steering.api.limits import ENV
from steering.api.state import LiveState

__all__ = ["router"]

router = APIRouter()

#: seconds between the stream's ``: keep-alive`` comments and between its polls of the state
KEEP_ALIVE_S = 15
POLL_S = 0.2


@router.get("/health")
def health(request: Request, history: HistoryDep, live: LiveDep) -> dict[str, Any]:
    """Liveness and a one-line state; ``predictions``: the prediction workers and how far
    their warm-up is (:meth:`model_server.prediction.pool.PredictionPool.state`)."""
    runs = history.runs()
    out: dict[str, Any] = {
        "status": "ok",
        "runs": len(runs),
        "running": sum(r["state"] == "running" for r in runs),
        "model_version": live.model_version,
        "model_error": live.model_error,
    }
    pool = getattr(request.app.state, "predictions", None)
    if pool is not None and hasattr(pool, "state"):
        out["predictions"] = pool.state()
    return out


@router.get("/models")
def models(request: Request, history: HistoryDep, live: LiveDep) -> dict[str, Any]:
    """The model in use and the versions loaded before (paths relative to the model
    folder)."""
    loaded = history.models()
    for m in loaded:
        if "path" in m:
            m["path"] = public_path(m["path"], request.app.state.model_dir)
    return {"current": live.model_version, "loaded": loaded}


@router.post(
    "/models/reload",
    dependencies=[Depends(require_token)],
    responses={
        409: {"description": "This service runs no model server."},
        422: {"description": "The reload failed (the message says why)."},
    },
)
def reload(live: LiveDep) -> dict[str, Any]:
    """Reload the frozen model from its directory (token)."""
    if live.reload is None:
        raise HTTPException(409, "this service runs no model server")
    try:
        version = live.reload()
    except Exception as exc:
        raise HTTPException(422, f"reload failed: {exc}") from exc
    live.model_version = str(version)
    return {"model_version": live.model_version}


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format.",
            "content": {CONTENT_TYPE_PLAIN_0_0_4: {"schema": {"type": "string"}}},
        }
    },
)
def metrics() -> Response:
    """Prometheus metrics (text exposition format 0.0.4)."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_PLAIN_0_0_4)


def _page_html() -> str:
    return (Path(__file__).resolve().parents[1] / "static" / "index.html").read_text(
        encoding="utf-8"
    )


@router.get(
    "/",
    response_class=HTMLResponse,
    responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}}},
)
def page() -> HTMLResponse:
    """The live page: spectrum and model, dispersion, FC trajectories, advice, coverage."""
    return HTMLResponse(_page_html())


async def _events(
    request: Request, live: LiveState, start: int, timeout: float
) -> AsyncIterator[str]:
    """Server-sent events of the updates after version ``start``, for ``timeout`` s; counted
    in ``app.state.streams`` while they run."""
    state = request.app.state
    state.streams += 1
    try:
        seen = start
        t_end = time.monotonic() + timeout
        t_alive = time.monotonic()
        yield "retry: 2000\n\n"
        while time.monotonic() < t_end:
            version, updates = live.changes(seen)
            for u in sorted(updates, key=lambda x: x["version"]):
                event = u.get("event", "update")
                yield f"id: {u['version']}\nevent: {event}\ndata: {json.dumps(u)}\n\n"
            seen = version
            if time.monotonic() - t_alive > KEEP_ALIVE_S:
                t_alive = time.monotonic()
                yield ": keep-alive\n\n"
            if await request.is_disconnected():
                break
            await asyncio.sleep(POLL_S)
    finally:
        state.streams -= 1


@router.get(
    "/stream",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
        503: {
            "description": "As many event streams are open as the service takes "
            f"({ENV['max_streams']}); retry after `Retry-After` seconds.",
            "headers": {
                "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
            },
        },
    },
)
async def stream(
    request: Request,
    live: LiveDep,
    limits: LimitsDep,
    since: Annotated[int, Query(ge=0, description="Last version seen.")] = 0,
    timeout: Annotated[
        float, Query(gt=0, le=86400, description="Close the stream after this many s.")
    ] = 3600.0,
) -> StreamingResponse:
    """Server-sent events: an ``update`` event (JSON: run id, version, orientations,
    latest FC means and stds) whenever a run gets a new estimate, a ``controls`` event
    (JSON: run id, version, ``action``, ``who``, the advisor's ``state``) whenever a person
    changes a run's advisor controls; ``: keep-alive`` comments every 15 s. Reconnecting
    clients send ``since`` (or Last-Event-ID)."""
    last_id = request.headers.get("last-event-id", "")
    start = int(last_id) if last_id.isdigit() and len(last_id) < 19 else since
    # the streams running (a stream counts from its first event until it ends, however it
    # ends; one whose connection is dropped before it starts is never counted)
    if request.app.state.streams >= limits.max_streams:
        steering_metrics.REQUESTS_REFUSED.labels(limit="streams").inc()
        raise HTTPException(
            503,
            f"{request.app.state.streams} event streams are open, the most this service "
            f"takes ({ENV['max_streams']}); retry later",
            headers={"Retry-After": "15"},
        )
    return StreamingResponse(
        _events(request, live, start, timeout),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )
