"""What the routers share: the run history, the live state and the tokens, as dependencies.

:func:`steering.api.app.create_app` puts them on ``app.state`` (``history``, ``live``,
``tokens``: {name: token}); the routes ask for them with :data:`HistoryDep`, :data:`LiveDep`
and ``dependencies=[Depends(require_token)]``, or :data:`TokenName` for the name of the
token presented (who made a change). A :class:`fastapi.Request` parameter adds nothing
to the OpenAPI document, so the routes' parameters are those of the path and the query.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from steering.api.limits import ServiceLimits
from steering.api.state import LiveState
from steering.db import History

logger = logging.getLogger(__name__)

__all__ = [
    "HistoryDep",
    "LimitsDep",
    "LiveDep",
    "TokenName",
    "export_file",
    "get_history",
    "get_limits",
    "get_live",
    "get_run",
    "public_path",
    "require_token",
]

_BEARER = HTTPBearer(auto_error=False)


async def get_history(request: Request) -> History:
    """The run history of the app serving ``request``."""
    history: History = request.app.state.history
    return history


async def get_live(request: Request) -> LiveState:
    """The live state of the app serving ``request``."""
    live: LiveState = request.app.state.live
    return live


async def get_limits(request: Request) -> ServiceLimits:
    """The request limits of the app serving ``request``."""
    limits: ServiceLimits = request.app.state.limits
    return limits


HistoryDep = Annotated[History, Depends(get_history)]
LiveDep = Annotated[LiveState, Depends(get_live)]
LimitsDep = Annotated[ServiceLimits, Depends(get_limits)]


def public_path(path: str | None, folder: Path | None) -> str | None:
    """``path`` as the public sees it: relative to ``folder`` (the state or model folder),
    else its file name alone; never the server's absolute path."""
    if not path:
        return path
    p = Path(path)
    if folder is not None:
        try:
            return p.resolve().relative_to(folder).as_posix()
        except ValueError:
            pass
    return p.name


def export_file(request: Request, run: dict[str, Any]) -> Path | None:
    """The run's HDF5 export when it is a file inside the app's state folder (the resolved
    path is checked: a history that names a file elsewhere gets None, logged)."""
    path = run.get("export_path")
    folder: Path | None = request.app.state.state_dir
    if not path:
        return None
    resolved = Path(path).resolve()
    if folder is None or not resolved.is_relative_to(folder):
        logger.warning(
            "run %s: its export %s is not in the state folder %s: not served",
            run.get("run_id"),
            path,
            folder,
        )
        return None
    return resolved if resolved.is_file() else None


def require_token(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
) -> str:
    """Let a state change through only with ``Authorization: Bearer <token>``.

    Returns
    -------
    str
        The token's name (``default`` for ``STEER_API_TOKEN``; the names of
        ``STEER_API_TOKENS``), for the record of who made the change.

    Raises
    ------
    HTTPException
        403 when the app has no token configured (state changes disabled); 401 without
        a token or with a wrong one.
    """
    tokens: dict[str, str] = request.app.state.tokens
    if not tokens:
        raise HTTPException(
            403, "state changes are disabled: no STEER_API_TOKEN or STEER_API_TOKENS configured"
        )
    given = creds.credentials.encode() if creds is not None else b""
    name = None
    for candidate, token in tokens.items():  # every token compared: no early exit
        if secrets.compare_digest(given, token.encode()) and name is None:
            name = candidate
    if creds is None or name is None:
        raise HTTPException(
            401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )
    return name


#: The name of the token a state change was made with (:func:`require_token`).
TokenName = Annotated[str, Depends(require_token)]


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
