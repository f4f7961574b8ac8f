"""``POST /predict``: the spectra a crystal is expected to give, as a FastAPI router.

Include it with ``app.include_router(predict_router(live, history, runner=pool))``. The
computation is :func:`model_server.prediction.predict.predict` (see its module docstring for
the physics, units and caching); this module parses and validates the request
(:class:`steering.api.schemas.PredictRequest`) in a thread, off the event loop, applies the
service's limits before any work (angles, CIF sites counted before symmetry expansion:
:class:`steering.api.limits.ServiceLimits`), resolves ``fc: "current:<run id>"`` from the
run history and hands the prediction to the runner: in a service the bounded pool of worker
processes (:class:`model_server.prediction.pool.PredictionPool`: 429 when its queue is full,
503 past the time budget; a client that disconnects has its prediction stopped), else
:class:`~model_server.prediction.pool.InlinePredictions`. The answer is JSON or, with
``Accept: image/png``, a PNG with one panel per output.

A CIF without force constants is answered from the FCs that the e3nn structure ->
force-constant model predicts (``fc_source: "e3nn"``), with the model's ``distance`` from
its training set, ``in_domain`` and ``message`` in the answer; an out-of-domain prediction
is returned, marked in ``warnings`` and in the PNG's title.

Errors are 4xx with a message, never 500: an unknown run in ``current:`` (or a run without
an estimate) is 404; everything else the request gets wrong (unknown material or FC set,
Ei not above the grid's top energy, omegas outside the goniometer limits, empty outputs,
an unparseable CIF, partial occupancy, an element the model does not know, a cell above an
atom or site limit, more angles than the limit, non-finite or out-of-range numbers, an FC
file that is garbled, has no force constants, is too large or is for another structure) is
422.
When the FCs are to come from the e3nn model and no usable model is installed, the answer
is 503 with what is missing.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any

import anyio
from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError

from model_server.exceptions import PredictionUnavailable
from model_server.prediction.cif_input import CIFError, count_cif_sites
from model_server.prediction.fc_import import MAX_FC_FILE_BYTES, FCFile
from model_server.prediction.pool import InlinePredictions, PredictionRunner
from steering import metrics
from steering.api.errors import ValidatedRoute
from steering.api.limits import ENV, ServiceLimits
from steering.api.schemas import (
    ErrorBody,
    FCCoefficients,
    FCFileUpload,
    PredictRequest,
    PredictResponse,
)
from steering.db import History

__all__ = ["current_estimate", "predict_router", "request_schema"]

logger = logging.getLogger(__name__)

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": PredictResponse,
        "description": "The prediction: JSON with axes and units (NaN as null), or a PNG "
        "with one panel per output when the request has `Accept: image/png`.",
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
    },
    404: {"model": ErrorBody, "description": "`current:<run id>`: no such run or estimate."},
    413: {"model": ErrorBody, "description": "The body is over the size limit."},
    422: {
        "model": ErrorBody,
        "description": "The request is invalid, not JSON, or over a limit (angles, CIF "
        "sites, atoms): `detail` says why, as a message or as a list of validation errors.",
    },
    429: {
        "model": ErrorBody,
        "description": "The prediction queue is full; retry after `Retry-After` seconds.",
        "headers": {
            "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
        },
    },
    503: {
        "model": ErrorBody,
        "description": "No answer now: the FCs are to come from the e3nn structure -> "
        "force-constant model and no usable model is installed, the prediction ran past its "
        "time budget, its worker was lost, or the service is stopping (the message says "
        "which).",
    },
}


def current_estimate(history: History, run_id: str) -> tuple[str, dict[str, float], str]:
    """(material, FC means by name, label) of the latest estimate of run ``run_id``.

    Raises
    ------
    HTTPException
        404 for a run not in ``history`` or without an estimate; 422 when its latest
        estimate has no FC means.
    """
    run = history.run(run_id)
    if run is None:
        raise HTTPException(404, f"no run {run_id!r} in the history (fc 'current:{run_id}')")
    estimates = history.estimates(run_id)
    if not estimates:
        raise HTTPException(404, f"run {run_id!r} has no FC estimate yet")
    latest = estimates[-1]
    fc = latest.get("fc") or {}
    means = {
        str(name): value["mean"]
        for name, value in fc.items()
        if isinstance(value, dict) and "mean" in value
    }
    if not means:
        raise HTTPException(422, f"the latest estimate of run {run_id!r} has no FC means")
    label = (
        f"current:{run_id} (estimate after {latest.get('n_orientations')} orientations, "
        f"model {latest.get('model_version') or '?'})"
    )
    return str(run["material"]), means, label


def _resolve_fc(body: PredictRequest, history: History) -> tuple[str | None, Any, str | None]:
    """(material, FCs, label) of the request: ``current:<run id>`` read from ``history``,
    coefficients as a dict, anything else as it came."""
    fc: Any = body.fc
    material = body.material
    label = None
    if isinstance(fc, str) and fc.startswith("current:"):
        if body.cif is not None:
            raise HTTPException(422, "fc 'current:<run id>' needs a shipped material, not a CIF")
        run_id = fc.removeprefix("current:")
        run_material, fc, label = current_estimate(history, run_id)
        if material is not None and material != run_material:
            raise HTTPException(422, f"run {run_id!r} measures {run_material}, not {material}")
        material = run_material
    elif isinstance(fc, FCCoefficients):
        fc = dict(fc.coefficients)
    elif isinstance(fc, FCFileUpload):
        fc = _fc_file(fc)
    return material, fc, label


def _decoded(field: str, text: str) -> bytes:
    """The bytes of a base64 field of ``fc`` (422 when it is not base64 or too large)."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HTTPException(422, f"fc.{field} is not base64: {exc}") from exc
    if len(data) > MAX_FC_FILE_BYTES:
        raise HTTPException(
            422, f"fc.{field} has {len(data)} bytes; at most {MAX_FC_FILE_BYTES} are read"
        )
    return data


def _fc_file(upload: FCFileUpload) -> FCFile:
    """The FC file of a request (its base64 fields decoded)."""
    extras = {
        role: _decoded(role, text)
        for role, text in (
            ("force_constants", upload.force_constants),
            ("force_sets", upload.force_sets),
            ("born", upload.born),
        )
        if text is not None
    }
    return FCFile(
        data=_decoded("file", upload.file),
        filename=upload.filename,
        format=upload.format,
        extras=extras,
        nac=upload.nac,
    )


def request_schema() -> dict[str, Any]:
    """The JSON schema of :class:`PredictRequest` with its sub-schemas inlined (the route
    parses the body itself, so FastAPI does not list the model among the components)."""
    doc = PredictRequest.model_json_schema()
    defs = doc.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    result: dict[str, Any] = inline(doc)
    return result


def _job(raw: bytes, history: History, limits: ServiceLimits, png: bool) -> dict[str, Any]:
    """The prediction job of a request body (run in a thread: parsing, validation, the
    limits, the run history).

    Raises
    ------
    RequestValidationError
        A body that is not JSON or not a valid request (422, pydantic's list of errors).
    HTTPException
        422 over a limit or for a bad ``current:`` / CIF; 404 for an unknown run.
    """
    try:
        body = PredictRequest.model_validate_json(raw or b"null")
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        for e in errors:
            e["loc"] = ("body", *e["loc"])
        raise RequestValidationError(errors) from None
    if len(body.omegas) > limits.predict_max_omegas:
        metrics.REQUESTS_REFUSED.labels(limit="omegas").inc()
        raise HTTPException(
            422,
            f"{len(body.omegas)} omegas; at most {limits.predict_max_omegas} are accepted per "
            f"prediction (the angle limit, {ENV['predict_max_omegas']})",
        )
    if body.cif is not None and body.material is None:
        try:
            count_cif_sites(body.cif, max_sites=limits.predict_max_cif_sites)
        except CIFError as exc:
            if "site limit" in str(exc):
                metrics.REQUESTS_REFUSED.labels(limit="cif_sites").inc()
            raise HTTPException(422, str(exc)) from exc
    material, fc, label = _resolve_fc(body, history)
    return {
        "material": material,
        "cif": body.cif,
        "fc": fc,
        "fc_label": label,
        "ei": body.ei,
        "temperature": body.temperature,
        "omegas": list(body.omegas),
        "outputs": list(body.outputs),
        "u": tuple(body.u),
        "v": tuple(body.v),
        "powder_directions": body.powder_directions,
        "seed": body.seed,
        "detector_angle_step": body.detector_angle_step,
        "dos_sigma": body.dos_sigma,
        "indirect_instrument": body.indirect_instrument,
        "indirect_orders": body.indirect_orders,
        "backgrounds": list(body.backgrounds),
        "background_fraction": body.background_fraction,
        "can_atoms": body.can_atoms,
        "png": png,
    }


def predict_router(
    live: Any,
    history: History,
    *,
    runner: PredictionRunner | None = None,
    limits: ServiceLimits | None = None,
) -> APIRouter:
    """A router with ``POST /predict`` over the run ``history`` (:class:`steering.db.History`).

    ``live`` (:class:`steering.api.state.LiveState`) is accepted for the app's wiring; the
    estimates that ``current:<run id>`` needs come from the history. ``runner`` runs the
    predictions (default :class:`~model_server.prediction.pool.InlinePredictions`; a service
    passes its :class:`~model_server.prediction.pool.PredictionPool`); ``limits`` are the
    request limits (default :class:`~steering.api.limits.ServiceLimits`).
    """
    router = APIRouter(tags=["prediction"], route_class=ValidatedRoute)
    run = runner or InlinePredictions()
    lim = limits or ServiceLimits()

    @router.post(
        "/predict",
        responses=_RESPONSES,
        response_class=Response,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": request_schema()}},
            }
        },
    )
    async def predict_endpoint(request: Request) -> Response:
        """The spectra a crystal is expected to give for an instrument setting and a list of
        goniometer angles.

        * `iqe`: the folded I(q,E) of the orientations together, from the event simulator's
          expected counts folded with the service's fold table (coverage-weighted mean
          S(Q,E) of the Q folded into each bin, mbarn/(sr meV) per atom; `coverage` in
          sr meV, `signal` in mbarn per atom, `dispersion_meV` the branches on the path);
          axes `q_index` (with `qpoints_rlu`, `ticks`) x `energy_meV`.
        * `detector`: per omega, the expected S(Q,E) (mbarn/(sr meV) per atom) against the
          in-plane scattering angle (degrees) and E, with |Q| of every bin.
        * `powder`: coherent S(|Q|,E) (mbarn/meV per atom) averaged over directions, with
          the mask of what the detector reaches.
        * `dos`: phonon DOS (states/meV per primitive cell), partial by element and atom.
        * `indirect`: 1D S(E) of a VISION/TOSCA-like spectrometer (mbarn/(sr meV) per atom),
          incoherent approximation, per bank and order.

        Where the FCs come from is `fc_source` (`reference`, `given`, `e3nn`, `imported`);
        with `e3nn` the answer carries `distance`, `in_domain` and `message` (an
        out-of-domain prediction is marked in `warnings` and in the PNG's title). An FC file
        (`fc: {"file": <base64>}`: phonopy YAML, CASTEP .castep_bin) is used as it is, on
        the request's structure (422 when it is for another one).

        About 0.5 s per omega once the material is loaded (the first request of a material
        or FC set takes seconds). Limits (the service's settings): the body size (413),
        angles and CIF sites (422), the queue of predictions (429 with `Retry-After`), the
        time budget of a prediction (503).
        """
        png = "image/png" in request.headers.get("accept", "")
        raw = await request.body()
        job = await anyio.to_thread.run_sync(_job, raw, history, lim, png)
        try:
            answer = await run.run(job, disconnected=request.is_disconnected)
        except PredictionUnavailable as exc:
            metrics.PREDICTIONS.labels(outcome=exc.reason).inc()
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
            raise HTTPException(exc.status, str(exc), headers=headers) from exc
        outcome = "ok" if answer.status == 200 else "invalid" if answer.status < 500 else "failed"
        metrics.PREDICTIONS.labels(outcome=outcome).inc()
        if answer.status != 200:
            raise HTTPException(answer.status, answer.detail)
        return Response(answer.body, media_type=answer.media_type)

    return router
