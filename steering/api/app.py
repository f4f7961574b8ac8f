"""``steer serve``: the status API (FastAPI) over the run history and the live runs.

Read-only endpoints are open (facility network); state-changing ones need
``Authorization: Bearer <token>``: ``STEER_API_TOKEN`` (named ``default``) or one of the
named ``STEER_API_TOKENS`` (:mod:`steering.api.tokens`; the name is recorded with the
advisor's overrides). 401 without or with a wrong token; when the service has no token
configured they are disabled: 403.

:func:`create_app` only wires the parts together: the run history, the live state and the
token go on ``app.state`` (read by the routes through :mod:`steering.api.deps`), and one
router per resource serves them:

* :mod:`steering.api.predict`: ``POST /predict``, the spectrum expected for a material (or
  CIF), FCs, Ei, temperature and angles;
* :mod:`steering.api.live`: ``GET /health``; ``GET /models``; ``POST /models/reload``;
  ``GET /metrics`` (Prometheus); ``GET /`` (the live page); ``GET /stream`` (server-sent
  events, an ``update`` per new estimate);
* :mod:`steering.api.runs`: ``GET /runs``; ``GET /runs/{id}`` (state, orientations, events
  folded and dropped per reason, model version, last update); ``GET /runs/{id}/estimates``
  (mean, std, quantiles, out-of-domain flag against orientation count);
  ``GET /runs/{id}/advice`` (the advisor's latest ranking; ``?history_=true``: all);
  ``GET /runs/{id}/spectrum`` (I(q, E) with mask as JSON arrays, ``Accept: image/png``: a
  PNG, ``?format=h5``: the HDF5 export, live while the run goes on);
  ``POST /runs/{id}/advisor`` (candidate range); ``GET /runs/{id}/figures/{name}.png``
  (the page's figures);
* :mod:`steering.api.controls`: ``GET /runs/{id}/advisor`` and the person in charge's
  controls of the advisor (pause, resume, exclude, force, target), each recorded with the
  token's name.

The request and answer schemas are in :mod:`steering.api.schemas`, the state shared with
the service in :mod:`steering.api.state`. What one request may ask is bounded before any
work (:mod:`steering.api.limits`: the body size, 413; angles, CIF sites, advisor candidates,
422; event streams, 503); predictions run in a bounded pool of worker processes
(:class:`model_server.prediction.pool.PredictionPool`, killed on shutdown), so that
``/health``, ``/runs``, ``/metrics`` and the event stream answer whatever ``/predict`` is
doing. Files are served from the state folder only, and public answers name files relative
to the state or model folder. The OpenAPI document lists every status and error body
(:mod:`steering.api.openapi`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from model_server.prediction.pool import PredictionPool
from steering.api import controls as control_routes
from steering.api import live as live_routes
from steering.api import runs as run_routes
from steering.api.errors import allowed_methods, body_not_decoded, validation_error_response
from steering.api.limits import BodySizeLimit, ServiceLimits
from steering.api.openapi import truthful_openapi
from steering.api.predict import predict_router
from steering.api.schemas import AdvisorRange
from steering.api.state import LiveState
from steering.api.tokens import token_table
from steering.db import History

__all__ = ["AdvisorRange", "LiveState", "create_app"]


def create_app(
    history: History,
    *,
    token: str | None = None,
    tokens: Mapping[str, str] | None = None,
    live: LiveState | None = None,
    limits: ServiceLimits | None = None,
    predictions: PredictionPool | None = None,
    state_dir: str | Path | None = None,
    model_dir: str | Path | None = None,
) -> FastAPI:
    """The API over ``history`` (and ``live`` runs); the tokens guard state changes.

    Parameters
    ----------
    token
        ``STEER_API_TOKEN``: the token named ``default``.
    tokens
        Named tokens {name: token} (``STEER_API_TOKENS``,
        :func:`steering.api.tokens.parse_tokens`).
    limits
        What one request may ask (default :class:`~steering.api.limits.ServiceLimits`).
    predictions
        The prediction pool (default: one made from ``limits``, its workers started on
        first use); closed when the app shuts down.
    state_dir
        The service's state folder: the only place run exports are served from, and what
        their names are relative to (None: no export is served).
    model_dir
        The folder that the models' paths are given relative to.
    """
    live = live or LiveState()
    limits = limits or ServiceLimits()
    pool = predictions or PredictionPool(
        workers=limits.predict_workers,
        queue=limits.predict_queue,
        budget_s=limits.predict_timeout_s,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await pool.aclose()

    app = FastAPI(
        title="steer: streaming steering service for single-crystal INS",
        version="0.1",
        description="Status, estimates, advice and spectra of the runs.",
        lifespan=lifespan,
    )
    app.state.history = history
    app.state.live = live
    app.state.token = token
    app.state.tokens = token_table(token, tokens)
    app.state.limits = limits
    app.state.predictions = pool
    app.state.state_dir = Path(state_dir).resolve() if state_dir is not None else None
    app.state.model_dir = Path(model_dir).resolve() if model_dir is not None else None
    app.state.streams = 0  # event streams running (steering.api.live)
    # FastAPI's own handler echoes a NaN input back and fails to serialise it (a 500)
    app.add_exception_handler(
        RequestValidationError,
        lambda request, exc: validation_error_response(exc),  # type: ignore[arg-type]
    )

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:  # every method of the path, not the first route's only
            headers = {**(exc.headers or {}), "Allow": allowed_methods(request)}
            exc = StarletteHTTPException(405, exc.detail, headers=headers)
        return body_not_decoded(exc) or await http_exception_handler(request, exc)

    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.include_router(predict_router(live, history, runner=pool, limits=limits))
    app.include_router(live_routes.router)
    app.include_router(run_routes.router)
    app.include_router(control_routes.router)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    truthful_openapi(app, limits)
    return app
