"""The OpenAPI document as the server behaves: every status it answers, with its body.

FastAPI documents what the routes declare; :func:`truthful_openapi` adds what the app does
around them:

* every error answer is ``{"detail": ...}`` (:class:`steering.api.schemas.ErrorBody`: a
  message, or for a request that does not match its schema pydantic's list of errors), so
  every 4xx/5xx documents that body, and FastAPI's ``HTTPValidationError`` (a list only) is
  dropped;
* 413 on every operation that takes a body (:class:`steering.api.limits.BodySizeLimit`);
* 401 (with ``WWW-Authenticate``) and 403 on the operations that need the token;
* the ``omegas`` of ``POST /predict``'s body (:class:`~steering.api.schemas.PredictRequest`,
  inlined: the route parses the body itself, off the event loop) are at most the service's
  angle limit.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from steering.api.limits import ServiceLimits
from steering.api.schemas import ErrorBody

__all__ = ["truthful_openapi"]

_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
_ERROR_CONTENT = {"application/json": {"schema": _ERROR_REF}}
_AUTH: dict[int, dict[str, Any]] = {
    401: {
        "description": "No token, or a wrong one.",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
        "content": _ERROR_CONTENT,
    },
    403: {
        "description": "State changes are disabled (no token configured).",
        "content": _ERROR_CONTENT,
    },
}


def _add_models(schemas: dict[str, Any]) -> None:
    schemas["ErrorBody"] = ErrorBody.model_json_schema()


def _limit_omegas(doc: dict[str, Any], limits: ServiceLimits) -> None:
    """The ``omegas`` of ``POST /predict``'s body: at most the service's angle limit."""
    op = doc.get("paths", {}).get("/predict", {}).get("post")
    if op is None:
        return
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    schema["properties"]["omegas"]["maxItems"] = limits.predict_max_omegas


def _patch_operation(op: dict[str, Any], limits: ServiceLimits) -> None:
    responses: dict[str, Any] = op.setdefault("responses", {})
    if "requestBody" in op:
        responses.setdefault(
            "413",
            {
                "description": f"The body is over {limits.max_body_bytes} bytes "
                "(STEER_MAX_BODY_BYTES).",
                "content": _ERROR_CONTENT,
            },
        )
    if any("HTTPBearer" in sec for sec in op.get("security", [])):
        for code, auth in _AUTH.items():
            responses.setdefault(str(code), dict(auth))
    for status, answer in responses.items():
        if status[0] in "45":
            answer["content"] = _ERROR_CONTENT
            answer.setdefault("description", "An error (the message says why).")


def truthful_openapi(app: FastAPI, limits: ServiceLimits) -> None:
    """Make ``app`` serve the document described in the module docstring."""

    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        _add_models(schemas)
        _limit_omegas(doc, limits)
        for item in doc.get("paths", {}).values():
            for op in item.values():
                _patch_operation(op, limits)
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        app.openapi_schema = doc
        return doc

    app.openapi = build  # type: ignore[method-assign]
