"""``steer serve``: the status API (FastAPI) over the run history and the live runs.

Read-only endpoints are open (facility network); state-changing ones need
``Authorization: Bearer <STEER_API_TOKEN>`` (401 without or with a wrong token; when the
service has no token configured they are disabled: 403).

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
  (the page's figures).

The request and answer schemas are in :mod:`steering.api.schemas`, the state shared with
the service in :mod:`steering.api.state`.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from steering.api import live as live_routes
from steering.api import runs as run_routes
from steering.api.errors import validation_error_response
from steering.api.predict import predict_router
from steering.api.schemas import AdvisorRange
from steering.api.state import LiveState
from steering.db import History

__all__ = ["AdvisorRange", "LiveState", "create_app"]


def create_app(
    history: History, *, token: str | None = None, live: LiveState | None = None
) -> FastAPI:
    """The API over ``history`` (and ``live`` runs); ``token`` guards state changes."""
    live = live or LiveState()
    app = FastAPI(
        title="steer: streaming steering service for single-crystal INS",
        version="0.1",
        description="Status, estimates, advice and spectra of the runs.",
    )
    app.state.history = history
    app.state.live = live
    app.state.token = token
    # FastAPI's own handler echoes a NaN input back and fails to serialise it (a 500)
    app.add_exception_handler(
        RequestValidationError,
        lambda request, exc: validation_error_response(exc),  # type: ignore[arg-type]
    )
    app.include_router(predict_router(live, history))
    app.include_router(live_routes.router)
    app.include_router(run_routes.router)
    return app
