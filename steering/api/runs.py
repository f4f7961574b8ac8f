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

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from consumers.reduction.accumulate import Snapshot
from steering.api.deps import HistoryDep, LiveDep, get_run, require_token
from steering.api.schemas import AdvisorRange, FigureName
from steering.api.spectra import snapshot_from_export, spectrum_json, spectrum_png
from steering.api.state import LiveState

__all__ = ["router"]

router = APIRouter()


@router.get("/runs")
def runs(history: HistoryDep) -> list[dict[str, Any]]:
    """Every run, newest first."""
    return history.runs()


@router.get("/runs/{run_id}")
def run(run_id: str, history: HistoryDep, live: LiveDep) -> dict[str, Any]:
    """One run: state, orientations, events folded and dropped, latest estimate."""
    out = get_run(history, run_id)
    est = history.estimates(run_id)
    out["model_version"] = est[-1]["model_version"] if est else None
    out["estimates"] = len(est)
    out["advisor_range"] = live.advisor_ranges.get(run_id)
    return out


@router.get("/runs/{run_id}/estimates")
def estimates(run_id: str, history: HistoryDep) -> dict[str, Any]:
    """FC estimates (mean, std, quantiles, out-of-domain) against orientations."""
    get_run(history, run_id)
    return {"run_id": run_id, "estimates": history.estimates(run_id)}


@router.get("/runs/{run_id}/advice")
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


def _run_spectrum(run_id: str, info: dict[str, Any], live: LiveState, *, png: bool) -> Response:
    """The run's cumulative spectrum: the live one, else that of its export."""
    with live.lock:
        snap = live.snapshots.get(run_id)
        grid = live.grids.get(run_id, {})
    if snap is None:
        path = info.get("export_path")
        if path and Path(path).is_file():
            snap, grid = snapshot_from_export(Path(path))
        else:
            raise HTTPException(404, f"run {run_id!r} has no spectrum yet")
    if png:
        return Response(spectrum_png(snap, grid, run_id), media_type="image/png")
    return JSONResponse(spectrum_json(run_id, snap, grid))


@router.get(
    "/runs/{run_id}/spectrum",
    responses={200: {"content": {"application/json": {}, "image/png": {}}}},
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
    if format == "h5":
        path = info.get("export_path")
        if not path or not Path(path).is_file():
            raise HTTPException(404, f"run {run_id!r} has no HDF5 export yet (complete runs)")
        return FileResponse(path, media_type="application/x-hdf5", filename=f"{run_id}.h5")
    return _run_spectrum(run_id, info, live, png=_wants_png(format, request))


@router.post("/runs/{run_id}/advisor", dependencies=[Depends(require_token)])
def set_advisor(
    run_id: str, body: AdvisorRange, history: HistoryDep, live: LiveDep
) -> dict[str, Any]:
    """Set the advisor's candidate range for a run (token)."""
    from simulations.instrument.spectrometer import Instrument
    from steering.advisor.ranking import candidate_omegas
    from steering.exceptions import AdvisorError

    get_run(history, run_id)
    try:
        omegas = candidate_omegas(body.start, body.stop, body.step, Instrument.arcs_like())
    except AdvisorError as exc:
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
    responses={200: {"content": {"image/png": {}}}},
    response_class=Response,
)
def figure(run_id: str, name: FigureName, history: HistoryDep, live: LiveDep) -> Response:
    """A figure of the run (PNG): ``spectrum`` (data beside the model at the estimate),
    ``dispersion`` (the estimate's branches over the data), ``coverage`` (exposure map
    and angles measured), ``fc`` (FC estimates with error bars against orientations)."""
    from steering import figures

    info = get_run(history, run_id)
    est = history.estimates(run_id)
    with live.lock:
        snap = live.snapshots.get(run_id)
        extra = dict(live.runs.get(run_id, {}))
    if snap is None and info.get("export_path") and Path(info["export_path"]).is_file():
        snap, _ = snapshot_from_export(Path(info["export_path"]))
    material = str(extra.get("material") or info["material"])
    if name == "fc":
        return Response(figures.fc_figure(est, truth=extra.get("truth")), media_type="image/png")
    if snap is None:
        raise HTTPException(404, f"run {run_id!r} has no spectrum yet")
    try:
        png = _figure_png(name, run_id, snap, material, est, extra)
    except (KeyError, FileNotFoundError, ValueError) as exc:
        raise HTTPException(404, f"no figure for run {run_id!r}: {exc}") from exc
    return Response(png, media_type="image/png")
