"""``POST /predict``: the spectra a crystal is expected to give, as a FastAPI router.

Include it with ``app.include_router(predict_router(live, history))``. The computation is
:func:`model_server.prediction.predict.predict` (see its module docstring for the physics, units and
caching); this module validates the request (pydantic, documented in the OpenAPI spec),
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
import math
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from consumers.exceptions import ConsumerError
from model_server.exceptions import ModelServerError
from model_server.prediction.indirect import INDIRECT_INSTRUMENTS
from model_server.prediction.predict import (
    DEFAULT_OUTPUTS,
    MAX_CIF_ATOMS,
    MAX_OMEGAS,
    OUTPUTS,
    PredictionError,
    predict,
)
from model_server.prediction.spectra import MAX_ATOMS_DOS, MAX_ATOMS_POWDER
from simulations.exceptions import SimulationError
from simulations.lattice.crystals import SHIPPED_MATERIALS
from steering.api.predict_schema import PredictResponse

__all__ = ["FCCoefficients", "PredictRequest", "predict_router", "validation_error_response"]

logger = logging.getLogger(__name__)

_SHIPPED = ", ".join(sorted(SHIPPED_MATERIALS))

Finite = Annotated[float, Field(allow_inf_nan=False)]
Miller = Annotated[float, Field(allow_inf_nan=False, ge=-100.0, le=100.0)]
CoefficientValue = Annotated[float, Field(allow_inf_nan=False, ge=-1000.0, le=1000.0)]
Output = Literal["iqe", "detector", "powder", "dos", "indirect"]
CoefficientName = Annotated[str, StringConstraints(min_length=1, max_length=64)]


def _default_outputs() -> list[Output]:
    return ["iqe", "detector", "powder"]


class FCCoefficients(BaseModel):
    """Force constants by coefficient name."""

    model_config = ConfigDict(extra="forbid")

    coefficients: dict[CoefficientName, CoefficientValue] = Field(
        max_length=500,
        description="Symmetry-reduced FC coefficients by name (e.g. `1NN_xx`), eV/A^2. For a "
        "shipped material the coefficients left out are those of `mlff_mean`; for a CIF "
        "every coefficient of its basis must be given (a request without them is answered "
        "with their names).",
    )


class PredictRequest(BaseModel):
    """What to predict: crystal, force constants, instrument setting and orientations."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"material": "Ge", "fc": "raman", "ei": 80.0, "omegas": [0.0, 30.0]},
                {"material": "Nb", "fc": {"coefficients": {"1NN_xx": 1.9}}, "ei": 50.0},
                {"fc": "current:sim-Ge-0", "omegas": [12.0], "outputs": ["iqe"]},
                {"cif": "data_NaCl ...", "outputs": ["dos", "indirect", "powder"]},
            ]
        },
    )

    material: Annotated[str, StringConstraints(max_length=100)] | None = Field(
        None,
        description=f"A shipped material: {_SHIPPED}. Leave it out with `cif`, or with "
        "`fc: current:<run id>` (the run's material).",
    )
    cif: Annotated[str, StringConstraints(max_length=200_000)] | None = Field(
        None,
        description="CIF text of an ordered crystal instead of `material`. Without `fc` the "
        "e3nn structure -> force-constant model predicts its FCs (the answer carries the "
        "model's `distance`, `in_domain` and `message`; 503 when no model is installed). "
        "Atoms in the primitive cell: at most "
        f"{MAX_CIF_ATOMS} for `iqe`/`detector` and for FCs given as coefficients (every "
        "coefficient of its 4-shell basis; the 422 answer to a named set lists them), "
        f"{MAX_ATOMS_POWDER} for `powder`, {MAX_ATOMS_DOS} for `dos`/`indirect`. Partial "
        "occupancy is refused with a supercell hint. Its q-path and grid are the generic "
        "defaults (with predicted FCs the grid reaches 1.1 x the highest mode); the first "
        "request builds its fold table (seconds).",
    )
    fc: Annotated[str, StringConstraints(min_length=1, max_length=300)] | FCCoefficients | None = (
        Field(
            None,
            description="Force constants. Left out: `mlff_mean` for a shipped material, the e3nn "
            "model's prediction for a CIF. `e3nn`: the model's prediction (shipped materials "
            "too, with its projection onto their named coefficients for comparison). A named "
            "set of the material (`mlff_mean`, a force-field name, `raman` for Ge), "
            "`current:<run id>` (the latest estimate of that run in the history: its FC "
            'means), or `{"coefficients": {name: value}}` (eV/A^2).',
        )
    )
    ei: float | None = Field(
        None,
        gt=0.0,
        le=1000.0,
        allow_inf_nan=False,
        description="Incident energy, meV (default: the material's, 80 for Ge, 50 for Nb, "
        "60 for Al). Must exceed the top of the material's energy grid.",
    )
    temperature: float = Field(
        5.0, ge=0.0, le=2000.0, allow_inf_nan=False, description="Sample temperature, K."
    )
    omegas: list[Finite] = Field(
        default_factory=lambda: [0.0],
        max_length=MAX_OMEGAS,
        description="Goniometer angles, degrees, within the goniometer's limits (-180..180); "
        f"at most {MAX_OMEGAS}. Needed by `iqe` and `detector`; about 0.5 s each.",
    )
    outputs: list[Output] = Field(
        default_factory=_default_outputs,
        max_length=10,
        description="Any of `iqe` (the folded I(q,E) the orientations would give), `detector` "
        "(expected S(Q,E) on the detector per omega: scattering angle vs E), `powder` "
        "(coherent S(|Q|,E)), `dos` (phonon DOS, partial by element and atom) and "
        "`indirect` (1D S(E) of a VISION/TOSCA-like indirect-geometry spectrometer); "
        f"default {', '.join(DEFAULT_OUTPUTS)}.",
    )
    u: tuple[Miller, Miller, Miller] = Field(
        (1.0, 0.0, 0.0),
        description="Conventional hkl along the beam at omega = 0 (simulated runs' default).",
    )
    v: tuple[Miller, Miller, Miller] = Field(
        (0.0, 1.0, 0.0),
        description="Conventional hkl in the horizontal plane at omega = 0 (not parallel to u).",
    )
    powder_directions: int = Field(
        128, ge=8, le=2048, description="Directions averaged at every |Q| of the powder output."
    )
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed of the powder average's random directions."
    )
    detector_angle_step: float = Field(
        2.0,
        ge=0.25,
        le=30.0,
        allow_inf_nan=False,
        description="Width of the detector output's scattering-angle bins, degrees.",
    )
    dos_sigma: float = Field(
        0.5,
        ge=0.05,
        le=20.0,
        allow_inf_nan=False,
        description="Gaussian broadening (standard deviation) of the `dos` output, meV.",
    )
    indirect_instrument: Literal[tuple(INDIRECT_INSTRUMENTS)] = Field(  # type: ignore[valid-type]
        "vision",
        description="Indirect-geometry spectrometer of the `indirect` output: `vision` (E_f "
        "3.5 meV, banks at 45 and 135 deg, FWHM 1.25 % of E) or `tosca`.",
    )
    indirect_orders: int = Field(
        2,
        ge=1,
        le=4,
        description="Highest phonon order of the `indirect` output (1: fundamentals; 2: "
        "with overtones and combinations of two phonons, ...).",
    )

    @field_validator("outputs")
    @classmethod
    def _some_outputs(cls, value: list[Output]) -> list[Output]:
        if not value:
            raise ValueError(f"outputs is empty: ask for at least one of {', '.join(OUTPUTS)}")
        return list(dict.fromkeys(value))


class PredictError(BaseModel):
    """An error: a message, or pydantic's list of validation errors."""

    detail: str | list[dict[str, Any]]


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


class _ValidatedRoute(APIRoute):
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


def predict_router(live: Any, history: Any) -> APIRouter:
    """A router with ``POST /predict`` over the run ``history`` (:class:`steering.db.History`).

    ``live`` (:class:`steering.api.app.LiveState`) is accepted for the app's wiring; the
    estimates that ``current:<run id>`` needs come from the history.
    """
    router = APIRouter(tags=["prediction"], route_class=_ValidatedRoute)

    def current(run_id: str) -> tuple[str, dict[str, float], str]:
        """(material, FC means by name, label) of a run's latest estimate."""
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
        fc: Any = body.fc
        material = body.material
        label = None
        if isinstance(fc, str) and fc.startswith("current:"):
            if body.cif is not None:
                raise HTTPException(
                    422, "fc 'current:<run id>' needs a shipped material, not a CIF"
                )
            run_id = fc.removeprefix("current:")
            run_material, fc, label = current(run_id)
            if material is not None and material != run_material:
                raise HTTPException(422, f"run {run_id!r} measures {run_material}, not {material}")
            material = run_material
        elif isinstance(fc, FCCoefficients):
            fc = dict(fc.coefficients)
        try:
            result = predict(
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
        if "image/png" in request.headers.get("accept", ""):
            return Response(result.to_png(), media_type="image/png")
        return JSONResponse(result.to_dict())

    return router
