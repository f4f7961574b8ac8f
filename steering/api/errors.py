"""Request-validation errors answered as JSON that survives non-finite inputs.

FastAPI's own handler echoes each error's input, and a NaN or inf input (which Python's
JSON reader accepts) then fails to serialise: a 500. :func:`validation_error_response` is
the app's handler (:func:`steering.api.app.create_app`); :class:`ValidatedRoute` makes a
router answer its own validation errors the same way when it is used without the app
(:func:`steering.api.predict.predict_router`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

__all__ = ["ValidatedRoute", "validation_error_response"]


def _json_safe(value: Any) -> Any:
    """``value`` with NaN and inf (which JSON cannot carry) as their names."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 answer, with non-finite inputs quoted.

    The default handler echoes each error's input, and a NaN or inf input (which Python's
    JSON reader accepts) then fails to serialise: a 500. Usable as the app's handler too:
    ``app.add_exception_handler(RequestValidationError, lambda r, e:
    validation_error_response(e))``.
    """
    return JSONResponse(
        status_code=422, content={"detail": _json_safe(jsonable_encoder(exc.errors()))}
    )


class ValidatedRoute(APIRoute):
    """A route that answers its own request-validation errors (see
    :func:`validation_error_response`)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def safe(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return validation_error_response(exc)

        return safe
