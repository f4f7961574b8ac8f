"""Request-validation errors answered as JSON that survives non-finite inputs.

FastAPI's own handler echoes each error's input, and a NaN or inf input (which Python's
JSON reader accepts) then fails to serialise: a 500. :func:`validation_error_response` is
the app's handler (:func:`steering.api.app.create_app`); :class:`ValidatedRoute` makes a
router answer its own validation errors the same way when it is used without the app
(:func:`steering.api.predict.predict_router`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

__all__ = ["ValidatedRoute", "allowed_methods", "body_not_decoded", "validation_error_response"]


#: Longest string, and most items of a list or object, echoed back in a validation error;
#: a larger input is described, not echoed (a 200 MB body was once echoed whole).
MAX_ECHO = 200
#: Most validation errors listed in one answer (a body of 100,000 unknown keys has as many).
MAX_ERRORS = 20


def _json_safe(value: Any, depth: int = 0) -> Any:
    """``value`` with NaN and inf (which JSON cannot carry) as their names, and large or
    deep inputs described rather than echoed."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str) and len(value) > MAX_ECHO:
        return f"{value[:MAX_ECHO]}... ({len(value)} characters)"
    if isinstance(value, dict | list | tuple) and (len(value) > MAX_ECHO or depth > 8):
        kind = "keys" if isinstance(value, dict) else "items"
        return f"<{type(value).__name__} of {len(value)} {kind}>"
    if isinstance(value, dict):
        return {k: _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v, depth + 1) for v in value]
    return value


def _error_entry(error: dict[str, Any]) -> dict[str, Any]:
    """One validation error with its ``input`` made safe (see :func:`_json_safe`)."""
    out = {k: v for k, v in error.items() if k not in ("input", "ctx", "url")}
    if "ctx" in error:
        out["ctx"] = {k: str(v) for k, v in error["ctx"].items()}
    if "input" in error:
        value = error["input"]
        if isinstance(value, bytes | bytearray):
            value = bytes(value[: 4 * MAX_ECHO]).decode("utf-8", errors="replace")
        out["input"] = _json_safe(value)
    return out


def allowed_methods(request: Request) -> str:
    """The ``Allow`` header of a 405: the methods the OpenAPI document gives the request's
    path (with ``HEAD`` beside ``GET``).

    Starlette lists those of the first route on the path only, and a path served by two
    routes (``POST /runs/{id}/advisor`` for the candidate range, ``GET`` for the controls)
    would then say less than the document.
    """
    path = request.url.path
    methods: set[str] = set()
    for template, item in request.app.openapi().get("paths", {}).items():
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            methods |= {m.upper() for m in item if m.upper() in _METHODS}
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


def body_not_decoded(exc: HTTPException) -> JSONResponse | None:
    """FastAPI answers a body it cannot decode (not UTF-8) with 400 and a message of its own;
    the API answers every body that is not JSON with 422 and a validation error instead,
    as its OpenAPI document says. None for any other HTTP error."""
    if exc.status_code != 400 or exc.detail != "There was an error parsing the body":
        return None
    errors = [
        {
            "type": "json_invalid",
            "loc": ["body"],
            "msg": "the body is not JSON text (UTF-8)",
        }
    ]
    return JSONResponse(status_code=422, content={"detail": errors})


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 answer, with non-finite inputs quoted.

    The default handler echoes each error's input, and a NaN or inf input (which Python's
    JSON reader accepts) then fails to serialise: a 500; and it echoes a large input whole.
    Here inputs are shortened (:data:`MAX_ECHO`). Usable as the app's handler too:
    ``app.add_exception_handler(RequestValidationError, lambda r, e:
    validation_error_response(e))``.
    """
    all_errors = exc.errors()
    errors = [_error_entry(dict(e)) for e in all_errors[:MAX_ERRORS]]
    if len(all_errors) > MAX_ERRORS:
        errors.append(
            {
                "type": "too_many_errors",
                "loc": ["body"],
                "msg": f"and {len(all_errors) - MAX_ERRORS} more errors (the first "
                f"{MAX_ERRORS} are listed)",
            }
        )
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})


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
