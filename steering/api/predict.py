"""``POST /predict``: the spectra a crystal is expected to give, as a FastAPI router.

Include it with ``app.include_router(predict_router(live, history))``. The computation is
:func:`model_server.prediction.predict.predict` (see its module docstring for the physics, units and
caching); this module validates the request (:class:`steering.api.schemas.PredictRequest`),
resolves ``fc: "current:<run id>"`` from the run history and answers JSON or, with
``Accept: image/png``, a PNG with one panel per output.

A CIF without force constants is answered from the FCs that the e3nn structure ->
force-constant model predicts (``fc_source: "e3nn"``), with the model's ``distance`` from
its training set, ``in_domain`` and ``message`` in the answer; an out-of-domain prediction
is returned, marked in ``warnings`` and in the PNG's title.

Errors are 4xx with a message, never 500: an unknown run in ``current:`` (or a run without
an estimate) is 404; everything else the request gets wrong (unknown material or FC set,
Ei not above the grid's top energy, omegas outside the goniometer limits, empty outputs,
an unparseable CIF, partial occupancy, an element the model does not know, a cell above an
atom limit, non-finite or out-of-range numbers) is 422. When the FCs are to come from the
e3nn model and no usable model is installed, the answer is 503 with what is missing.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response

from consumers.exceptions import ConsumerError
from model_server.exceptions import ModelServerError
from model_server.prediction.predict import PredictionError, predict
from model_server.prediction.results import Prediction
from simulations.exceptions import SimulationError
from steering.api.errors import ValidatedRoute
from steering.api.schemas import FCCoefficients, PredictError, PredictRequest, PredictResponse
from steering.db import History

__all__ = ["current_estimate", "predict_router"]

logger = logging.getLogger(__name__)

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": PredictResponse,
        "description": "The prediction: JSON with axes and units (NaN as null), or a PNG "
        "with one panel per output when the request has `Accept: image/png`.",
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
    },
    400: {"model": PredictError, "description": "The body cannot be parsed as JSON."},
    404: {"model": PredictError, "description": "`current:<run id>`: no such run or estimate."},
    422: {"model": PredictError, "description": "The request is invalid (the message says why)."},
    503: {
        "model": PredictError,
        "description": "The FCs are to come from the e3nn structure -> force-constant model "
        "and no usable model is installed (the message says what is missing).",
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
    return material, fc, label


def _predict(body: PredictRequest, history: History) -> Prediction:
    """:func:`model_server.prediction.predict.predict` of the request, its errors as 4xx/5xx."""
    material, fc, label = _resolve_fc(body, history)
    try:
        return predict(
            material,
            cif=body.cif,
            fc=fc,
            fc_label=label,
            ei=body.ei,
            temperature=body.temperature,
            omegas=body.omegas,
            outputs=body.outputs,
            u=body.u,
            v=body.v,
            powder_directions=body.powder_directions,
            seed=body.seed,
            detector_angle_step=body.detector_angle_step,
            dos_sigma=body.dos_sigma,
            indirect_instrument=body.indirect_instrument,
            indirect_orders=body.indirect_orders,
        )
    except PredictionError as exc:
        if exc.status >= 500:
            logger.warning("prediction unavailable: %s", exc)
        raise HTTPException(exc.status, str(exc)) from exc
    except (SimulationError, ConsumerError, ModelServerError, ValueError) as exc:
        logger.info("prediction refused: %s", exc)
        raise HTTPException(422, str(exc)) from exc


def predict_router(live: Any, history: History) -> APIRouter:
    """A router with ``POST /predict`` over the run ``history`` (:class:`steering.db.History`).

    ``live`` (:class:`steering.api.state.LiveState`) is accepted for the app's wiring; the
    estimates that ``current:<run id>`` needs come from the history.
    """
    router = APIRouter(tags=["prediction"], route_class=ValidatedRoute)

    @router.post("/predict", responses=_RESPONSES, response_class=Response)
    def predict_endpoint(body: PredictRequest, request: Request) -> Response:
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

        Where the FCs come from is `fc_source` (`reference`, `given`, `e3nn`); with `e3nn`
        the answer carries `distance`, `in_domain` and `message` (an out-of-domain
        prediction is marked in `warnings` and in the PNG's title).

        About 0.5 s per omega once the material is loaded (the first request of a material
        or FC set takes seconds).
        """
        result = _predict(body, history)
        if "image/png" in request.headers.get("accept", ""):
            return Response(result.to_png(), media_type="image/png")
        return JSONResponse(result.to_dict())

    return router
