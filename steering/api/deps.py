"""What the routers share: the run history, the live state and the token, as dependencies.

:func:`steering.api.app.create_app` puts them on ``app.state`` (``history``, ``live``,
``token``); the routes ask for them with :data:`HistoryDep`, :data:`LiveDep` and
``dependencies=[Depends(require_token)]``. A :class:`fastapi.Request` parameter adds nothing
to the OpenAPI document, so the routes' parameters are those of the path and the query.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from steering.api.state import LiveState
from steering.db import History

__all__ = ["HistoryDep", "LiveDep", "get_history", "get_live", "get_run", "require_token"]

_BEARER = HTTPBearer(auto_error=False)


async def get_history(request: Request) -> History:
    """The run history of the app serving ``request``."""
    history: History = request.app.state.history
    return history


async def get_live(request: Request) -> LiveState:
    """The live state of the app serving ``request``."""
    live: LiveState = request.app.state.live
    return live


HistoryDep = Annotated[History, Depends(get_history)]
LiveDep = Annotated[LiveState, Depends(get_live)]


def require_token(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
) -> None:
    """Let a state change through only with ``Authorization: Bearer <token>``.

    Raises
    ------
    HTTPException
        403 when the app has no token configured (state changes disabled); 401 without
        the token or with a wrong one.
    """
    token: str | None = request.app.state.token
    if not token:
        raise HTTPException(403, "state changes are disabled: no STEER_API_TOKEN configured")
    if creds is None or not secrets.compare_digest(creds.credentials, token):
        raise HTTPException(
            401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )


def get_run(history: History, run_id: str) -> dict[str, Any]:
    """The run ``run_id`` of ``history``.

    Raises
    ------
    HTTPException
        404 when the history has no such run.
    """
    run = history.run(run_id)
    if run is None:
        raise HTTPException(404, f"no run {run_id!r}")
    return run
