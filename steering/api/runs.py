"""The runs: status, estimates, advice, spectrum, figures and the advisor's range.

* ``GET /runs``; ``GET /runs/{id}``: state, orientations, events folded and dropped per
  reason, model version, last update;
* ``GET /runs/{id}/estimates``: the history of FC estimates against orientation count;
* ``GET /runs/{id}/advice``: the advisor's latest ranking (``?history_=true``: all);
* ``GET /runs/{id}/spectrum``: I(q, E) with mask (JSON, PNG or the HDF5 export);
* ``POST /runs/{id}/advisor``: the advisor's candidate range (token);
* ``GET /runs/{id}/figures/{name}.png``: the live page's figures.

The run history and the live state come from the app (:mod:`steering.api.deps`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from consumers.reduction.accumulate import Snapshot
from steering import metrics
from steering.api.deps import (
    HistoryDep,
    LimitsDep,
    LiveDep,
    export_file,
    get_run,
    public_path,
    require_token,
)
from steering.api.schemas import AdvisorRange, FigureName
from steering.api.spectra import snapshot_from_export, spectrum_json, spectrum_png
from steering.api.state import LiveState

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter()

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such run (or nothing of that kind for it yet)."}
}
_DAMAGED: dict[int | str, dict[str, Any]] = {
    503: {"description": "The run's export cannot be read (the message says why)."}
}


def _public(run: dict[str, Any], request: Request) -> dict[str, Any]:
    """A run as the public sees it: its export named relative to the state folder."""
    if run.get("export_path"):
        run["export_path"] = public_path(run["export_path"], request.app.state.state_dir)
    return run


def _read_export(run_id: str, path: Path, request: Request) -> tuple[Snapshot, dict[str, Any]]:
    """The snapshot of a run's export; 503 with the reason when it cannot be read (the
    reason names the file relative to the state folder, as every answer does)."""
    try:
        return snapshot_from_export(path)
    except (OSError, KeyError, ValueError, TypeError, IndexError) as exc:
        logger.warning("run %s: export %s cannot be read: %s", run_id, path, exc)
        name = public_path(str(path), request.app.state.state_dir) or path.name
        reason = str(exc).replace(str(path), name).replace(str(path.parent), ".")
        raise HTTPException(
            503,
            f"the export of run {run_id!r} ({name}) cannot be read "
            f"({type(exc).__name__}: {reason}); it is damaged or incomplete",
        ) from exc


@router.get("/runs")
def runs(request: Request, history: HistoryDep) -> list[dict[str, Any]]:
    """Every run, newest first."""
    return [_public(r, request) for r in history.runs()]


@router.get("/runs/{run_id}", responses=_NOT_FOUND)
def run(run_id: str, request: Request, history: HistoryDep, live: LiveDep) -> dict[str, Any]:
    """One run: state, orientations, events folded and dropped, latest estimate."""
    out = _public(get_run(history, run_id), request)
    est = history.estimates(run_id)
    out["model_version"] = est[-1]["model_version"] if est else None
    out["estimates"] = len(est)
    out["advisor_range"] = live.advisor_ranges.get(run_id)
    return out


@router.get("/runs/{run_id}/estimates", responses=_NOT_FOUND)
def estimates(run_id: str, history: HistoryDep) -> dict[str, Any]:
    """FC estimates (mean, std, quantiles, out-of-domain) against orientations."""
    get_run(history, run_id)
    return {"run_id": run_id, "estimates": history.estimates(run_id)}


@router.get("/runs/{run_id}/advice", responses=_NOT_FOUND)
def advice(run_id: str, history: HistoryDep, history_: bool = False) -> dict[str, Any]:
    """The advisor's latest ranking (``history_=true``: every one)."""
    get_run(history, run_id)
    items = history.advice(run_id, latest=not history_)
    return {"run_id": run_id, "advice": items}


def _wants_png(format: str, request: Request) -> bool:
    return format == "png" or "image/png" in request.headers.get("accept", "")


def _orientation_spectrum(run_id: str, orientation: int, live: LiveState, *, png: bool) -> Response:
    """One orientation's spectrum alone (kept by the live service only)."""
    with live.lock:
        one = live.orientations.get(run_id, {}).get(orientation)
        grid = live.grids.get(run_id, {})
    if one is None:
        raise HTTPException(404, f"run {run_id!r} has no orientation {orientation} in this service")
    alone = Snapshot.of(one[0].astype(float), one[1].astype(float), 1)
    if png:
        return Response(
            spectrum_png(alone, grid, f"{run_id} #{orientation}"), media_type="image/png"
        )
    return JSONResponse(spectrum_json(run_id, alone, grid, orientation=orientation))


def _run_spectrum(
    run_id: str, export: Path | None, live: LiveState, request: Request, *, png: bool
) -> Response:
    """The run's cumulative spectrum: the live one, else that of its export."""
    with live.lock:
        snap = live.snapshots.get(run_id)
        grid = live.grids.get(run_id, {})
    if snap is None:
        if export is None:
            raise HTTPException(404, f"run {run_id!r} has no spectrum yet")
        snap, grid = _read_export(run_id, export, request)
    if png:
        return Response(spectrum_png(snap, grid, run_id), media_type="image/png")
    return JSONResponse(spectrum_json(run_id, snap, grid))


@router.get(
    "/runs/{run_id}/spectrum",
    responses={
        200: {
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "application/x-hdf5": {"schema": {"type": "string", "format": "binary"}},
            }
        },
        **_NOT_FOUND,
        **_DAMAGED,
    },
)
def spectrum(
    run_id: str,
    request: Request,
    history: HistoryDep,
    live: LiveDep,
    format: str = "json",
    orientation: Annotated[
        int | None,
        Query(ge=0, description="0-based index of one orientation: its spectrum alone."),
    ] = None,
) -> Response:
    """I(q, E) (1/(uC sr meV), null where unmeasured) with its mask; PNG with
    ``Accept: image/png``; the HDF5 export with ``format=h5``; one orientation's
    spectrum alone with ``orientation=k`` (live runs)."""
    info = get_run(history, run_id)
    if format not in ("json", "h5", "png"):
        raise HTTPException(422, "format must be json, png or h5")
    if orientation is not None:
        if format == "h5":
            raise HTTPException(422, "the HDF5 export is of the whole run")
        return _orientation_spectrum(run_id, orientation, live, png=_wants_png(format, request))
    export = export_file(request, info)
    if format == "h5":
        if export is None:
            raise HTTPException(404, f"run {run_id!r} has no HDF5 export yet (complete runs)")
        return FileResponse(export, media_type="application/x-hdf5", filename=f"{run_id}.h5")
    return _run_spectrum(run_id, export, live, request, png=_wants_png(format, request))


@router.post("/runs/{run_id}/advisor", dependencies=[Depends(require_token)], responses=_NOT_FOUND)
def set_advisor(
    run_id: str, body: AdvisorRange, history: HistoryDep, live: LiveDep, limits: LimitsDep
) -> dict[str, Any]:
    """Set the advisor's candidate range for a run (token). The candidates are counted
    before they are made: more than the limit (`STEER_ADVISOR_MAX_CANDIDATES`) is 422."""
    from simulations.instrument.spectrometer import Instrument
    from steering.advisor.ranking import candidate_omegas
    from steering.exceptions import AdvisorError

    get_run(history, run_id)
    try:
        omegas = candidate_omegas(
            body.start,
            body.stop,
            body.step,
            Instrument.arcs_like(),
            max_candidates=limits.advisor_max_candidates,
        )
    except AdvisorError as exc:
        if "candidate limit" in str(exc):
            metrics.REQUESTS_REFUSED.labels(limit="advisor_candidates").inc()
        raise HTTPException(422, str(exc)) from exc
    live.advisor_ranges[run_id] = body.model_dump()
    return {"run_id": run_id, "candidates": len(omegas), **body.model_dump()}


def _figure_png(
    name: FigureName,
    run_id: str,
    snap: Snapshot,
    material: str,
    est: list[dict[str, Any]],
    extra: dict[str, Any],
) -> bytes:
    """The PNG of figure ``name`` (not ``fc``) of a run's spectrum and estimates."""
    from steering import figures

    truth = extra.get("truth")
    temperature = float(extra.get("temperature", 5.0))
    latest = est[-1] if est else None
    if name == "spectrum":
        return figures.spectrum_figure(
            snap, material, latest, temperature=temperature, title=run_id
        )
    if name == "dispersion":
        return figures.dispersion_figure(
            snap, material, latest, truth=truth, temperature=temperature
        )
    # angles measured: the live run's, else those of the estimates on record
    omegas = extra.get("omegas") or [e["omega"] for e in est]
    return figures.coverage_figure(snap, material, omegas)


@router.get(
    "/runs/{run_id}/figures/{name}.png",
    responses={
        200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
        **_NOT_FOUND,
        **_DAMAGED,
    },
    response_class=Response,
)
def figure(
    run_id: str, name: FigureName, request: Request, history: HistoryDep, live: LiveDep
) -> Response:
    """A figure of the run (PNG): ``spectrum`` (data beside the model at the estimate),
    ``dispersion`` (the estimate's branches over the data), ``coverage`` (exposure map
    and angles measured), ``fc`` (FC estimates with error bars against orientations)."""
    from steering import figures

    info = get_run(history, run_id)
    est = history.estimates(run_id)
    with live.lock:
        snap = live.snapshots.get(run_id)
        extra = dict(live.runs.get(run_id, {}))
    if name == "fc":  # the estimates alone: the export is not read
        return Response(figures.fc_figure(est, truth=extra.get("truth")), media_type="image/png")
    if snap is None:
        export = export_file(request, info)
        if export is not None:
            snap, _ = _read_export(run_id, export, request)
    material = str(extra.get("material") or info["material"])
    if snap is None:
        raise HTTPException(404, f"run {run_id!r} has no spectrum yet")
    try:
        png = _figure_png(name, run_id, snap, material, est, extra)
    except (KeyError, FileNotFoundError, ValueError) as exc:
        raise HTTPException(404, f"no figure for run {run_id!r}: {exc}") from exc
    return Response(png, media_type="image/png")
