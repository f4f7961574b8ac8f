"""How much work one request may ask of the API, decided before the work is done.

:class:`ServiceLimits` holds the limits (each a ``STEER_*`` variable, read by
:meth:`ServiceLimits.from_env` when ``steer serve`` starts; a bad value stops it with the
variable's name). :class:`BodySizeLimit` is the ASGI middleware that refuses a request body
over ``max_body_bytes`` with 413 before it is read (by its ``Content-Length``) or as soon as
the bytes received pass the limit (a chunked body). The other limits are applied by the
routes: angles and CIF sites of ``POST /predict`` (:mod:`steering.api.predict`), candidates of
``POST /runs/{id}/advisor`` (:mod:`steering.api.runs`), event-stream connections
(:mod:`steering.api.live`); the prediction pool takes ``predict_workers``,
``predict_queue`` and ``predict_timeout_s`` (:class:`model_server.prediction.pool.PredictionPool`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from model_server.prediction.cif_input import MAX_CIF_SITES
from model_server.prediction.request import MAX_OMEGAS
from steering import metrics
from steering.advisor.ranking import MAX_CANDIDATES
from steering.exceptions import SteeringError

__all__ = ["ENV", "BodySizeLimit", "ServiceLimits"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceLimits:
    """The API's limits (the environment variable of each in :data:`ENV`).

    Attributes
    ----------
    max_body_bytes
        Largest request body, bytes (413 beyond). 1 MiB: a CIF of 200,000 characters or
        360 angles fit many times over.
    predict_max_omegas
        Most goniometer angles of one prediction (422 beyond; at most 360).
    predict_max_cif_sites
        Most atom sites of a CIF's cell once its symmetry is applied, counted before they
        are built (422 beyond; at most 1000).
    predict_workers
        Predictions running at once, each in a worker process.
    predict_queue
        Predictions that may wait for a worker (429 with ``Retry-After`` beyond).
    predict_timeout_s
        Time budget of a prediction, waiting included, seconds (503 beyond; its worker is
        killed).
    advisor_max_candidates
        Most candidate angles of an advisor range (422 beyond; at most 3600).
    max_streams
        Event-stream (``GET /stream``) connections at once (503 with ``Retry-After`` beyond).
    """

    max_body_bytes: int = 1 << 20
    predict_max_omegas: int = MAX_OMEGAS
    predict_max_cif_sites: int = MAX_CIF_SITES
    predict_workers: int = 1
    predict_queue: int = 4
    predict_timeout_s: float = 120.0
    advisor_max_candidates: int = MAX_CANDIDATES
    max_streams: int = 32

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            low = 0 if f.name == "predict_queue" else 1
            if not value >= low:
                raise SteeringError(f"{ENV[f.name]} must be at least {low}, got {value}")
        caps = {
            "predict_max_omegas": MAX_OMEGAS,
            "predict_max_cif_sites": MAX_CIF_SITES,
            "advisor_max_candidates": MAX_CANDIDATES,
        }
        for name, cap in caps.items():
            if getattr(self, name) > cap:
                raise SteeringError(f"{ENV[name]} can lower the limit of {cap}, not raise it")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceLimits:
        """The limits from ``STEER_*`` variables (the defaults for those not set).

        Raises
        ------
        SteeringError
            A value that is not a number, or out of range (the message names the variable).
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV[f.name])
            if raw is None or not raw.strip():
                continue
            try:
                values[f.name] = float(raw) if f.type == "float" else int(raw)
            except ValueError:
                raise SteeringError(
                    f"{ENV[f.name]}={raw!r} is not a{'' if f.type == 'float' else 'n integer'} "
                    "number"
                ) from None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The limits by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: The environment variable of each limit.
ENV = {
    "max_body_bytes": "STEER_MAX_BODY_BYTES",
    "predict_max_omegas": "STEER_PREDICT_MAX_OMEGAS",
    "predict_max_cif_sites": "STEER_CIF_MAX_SITES",
    "predict_workers": "STEER_PREDICT_WORKERS",
    "predict_queue": "STEER_PREDICT_QUEUE",
    "predict_timeout_s": "STEER_PREDICT_TIMEOUT_S",
    "advisor_max_candidates": "STEER_ADVISOR_MAX_CANDIDATES",
    "max_streams": "STEER_MAX_STREAMS",
}


class _TooLarge(Exception):
    """Raised from ``receive`` when a body passes the limit."""


class BodySizeLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes`` (see the module
    docstring); the answer is ``{"detail": ...}`` naming the limit."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    def _refusal(self, size: str) -> tuple[dict[str, Any], dict[str, Any]]:
        body = json.dumps(
            {
                "detail": f"the request body is {size}; at most {self.max_bytes} bytes are "
                f"accepted (the body limit, {ENV['max_body_bytes']})"
            }
        ).encode()
        start = {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
        return start, {"type": "http.response.body", "body": body}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            metrics.REQUESTS_REFUSED.labels(limit="body").inc()
            for message in self._refusal(f"{int(length)} bytes"):
                await send(message)
            return
        received = 0
        over = False
        started = False

        async def limited_receive() -> Any:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise _TooLarge
            return message

        async def guarded_send(message: Any) -> None:
            nonlocal started
            if over:  # whatever the app makes of the aborted read, the answer is 413
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, limited_receive, guarded_send)
        if over:
            metrics.REQUESTS_REFUSED.labels(limit="body").inc()
        if over and not started:
            for message in self._refusal(f"more than {self.max_bytes} bytes"):
                await send(message)
