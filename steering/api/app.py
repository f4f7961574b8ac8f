"""``steer serve``: the status API (FastAPI) over the run history and the live runs.

Read-only endpoints are open (facility network); state-changing ones need
``Authorization: Bearer <STEER_API_TOKEN>`` (401 without or with a wrong token; when the
service has no token configured they are disabled: 403).

* ``GET /health``; ``GET /runs``; ``GET /runs/{id}``: state, orientations, events folded and
  dropped per reason, model version, last update;
* ``GET /runs/{id}/estimates``: the history of FC estimates (mean, std, quantiles,
  out-of-domain flag) against orientation count;
* ``GET /runs/{id}/advice``: the advisor's latest ranking (``?history=true``: all);
* ``GET /runs/{id}/spectrum``: I(q, E) with mask as JSON arrays (``Accept: image/png``: a
  PNG; ``?format=h5``: the HDF5 export), live while the run goes on;
* ``POST /predict``: the spectrum expected for a material (or CIF), FCs, Ei, temperature and
  angles (:mod:`steering.api.predict`);
* ``GET /models``; ``POST /models/reload``; ``POST /runs/{id}/advisor`` (candidate range);
* ``GET /metrics``: Prometheus;
* ``GET /``: the live page; ``GET /stream``: server-sent events (an ``update`` per new
  estimate); ``GET /runs/{id}/figures/{name}.png``: the page's figures.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    Response,
    StreamingResponse,
)
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from steering.db import History

__all__ = ["AdvisorRange", "LiveState", "create_app"]

_BEARER = HTTPBearer(auto_error=False)


class AdvisorRange(BaseModel):
    """Candidate range of a run's advisor (degrees)."""

    model_config = ConfigDict(allow_inf_nan=False)

    start: float = Field(description="First candidate angle, degrees.")
    stop: float = Field(description="Stop (exclusive), degrees.")
    step: float = Field(1.0, gt=0, description="Step, degrees.")


@dataclass
class LiveState:
    """What the running service shares with the API (all optional).

    ``snapshots``: run id -> latest :class:`consumers.reduction.accumulate.Snapshot`; ``energy`` and
    ``qpoints`` of each run's grid; ``runs``: run id -> ``material``, ``temperature``,
    ``omegas`` measured and ``truth`` (a simulated run's FCs) for the figures;
    ``advisor_ranges``: run id -> candidate range set over the API; ``reload``: called by
    ``POST /models/reload``, returns the new model version.
    """

    snapshots: dict[str, Any] = field(default_factory=dict)
    grids: dict[str, dict[str, Any]] = field(default_factory=dict)
    advisor_ranges: dict[str, dict[str, float]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: run id -> {orientation index: (counts, exposure)} of each orientation alone
    orientations: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    reload: Any = None
    model_version: str | None = None
    #: why the model server cannot estimate now (None when it can)
    model_error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: incremented on every update; ``updates`` holds the latest update of each run
    version: int = 0
    updates: dict[str, dict[str, Any]] = field(default_factory=dict)

    def notify(self, run_id: str, **update: Any) -> None:
        """Tell the page (server-sent events) that ``run_id`` changed."""
        with self.lock:
            self.version += 1
            self.updates[run_id] = {"run_id": run_id, "version": self.version, **update}

    def changes(self, since: int) -> tuple[int, list[dict[str, Any]]]:
        """(current version, the runs' latest updates newer than ``since``)."""
        with self.lock:
            return self.version, [u for u in self.updates.values() if u["version"] > since]


def _finite(a: np.ndarray) -> list[Any]:
    """JSON-safe nested list: NaN/inf as None."""
    out: list[Any] = np.where(np.isfinite(a), a, np.nan).astype(object).tolist()

    def clean(x: Any) -> Any:
        if isinstance(x, list):
            return [clean(v) for v in x]
        return None if isinstance(x, float) and not math.isfinite(x) else x

    return [clean(v) for v in out]


def create_app(
    history: History, *, token: str | None = None, live: LiveState | None = None
) -> FastAPI:
    """The API over ``history`` (and ``live`` runs); ``token`` guards state changes."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    import consumers.metrics  # noqa: F401  (registers the service's metrics)
    import steering.metrics  # noqa: F401

    live = live or LiveState()
    app = FastAPI(
        title="steer: streaming steering service for single-crystal INS",
        version="0.1",
        description="Status, estimates, advice and spectra of the runs.",
    )

    def require_token(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        if not token:
            raise HTTPException(403, "state changes are disabled: no STEER_API_TOKEN configured")
        if creds is None or not secrets.compare_digest(creds.credentials, token):
            raise HTTPException(
                401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
            )

    def get_run(run_id: str) -> dict[str, Any]:
        run = history.run(run_id)
        if run is None:
            raise HTTPException(404, f"no run {run_id!r}")
        return run

    from fastapi.exceptions import RequestValidationError

    from steering.api.predict import predict_router, validation_error_response

    # FastAPI's own handler echoes a NaN input back and fails to serialise it (a 500)
    app.add_exception_handler(
        RequestValidationError,
        lambda request, exc: validation_error_response(exc),  # type: ignore[arg-type]
    )
    app.include_router(predict_router(live, history))

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness and a one-line state."""
        runs = history.runs()
        return {
            "status": "ok",
            "runs": len(runs),
            "running": sum(r["state"] == "running" for r in runs),
            "model_version": live.model_version,
            "model_error": live.model_error,
        }

    @app.get("/runs")
    def runs() -> list[dict[str, Any]]:
        """Every run, newest first."""
        return history.runs()

    @app.get("/runs/{run_id}")
    def run(run_id: str) -> dict[str, Any]:
        """One run: state, orientations, events folded and dropped, latest estimate."""
        out = get_run(run_id)
        est = history.estimates(run_id)
        out["model_version"] = est[-1]["model_version"] if est else None
        out["estimates"] = len(est)
        out["advisor_range"] = live.advisor_ranges.get(run_id)
        return out

    @app.get("/runs/{run_id}/estimates")
    def estimates(run_id: str) -> dict[str, Any]:
        """FC estimates (mean, std, quantiles, out-of-domain) against orientations."""
        get_run(run_id)
        return {"run_id": run_id, "estimates": history.estimates(run_id)}

    @app.get("/runs/{run_id}/advice")
    def advice(run_id: str, history_: bool = False) -> dict[str, Any]:
        """The advisor's latest ranking (``history_=true``: every one)."""
        get_run(run_id)
        items = history.advice(run_id, latest=not history_)
        return {"run_id": run_id, "advice": items}

    @app.get(
        "/runs/{run_id}/spectrum",
        responses={200: {"content": {"application/json": {}, "image/png": {}}}},
    )
    def spectrum(
        run_id: str,
        request: Request,
        format: str = "json",
        orientation: Annotated[
            int | None,
            Query(ge=0, description="0-based index of one orientation: its spectrum alone."),
        ] = None,
    ) -> Response:
        """I(q, E) (1/(uC sr meV), null where unmeasured) with its mask; PNG with
        ``Accept: image/png``; the HDF5 export with ``format=h5``; one orientation's
        spectrum alone with ``orientation=k`` (live runs)."""
        info = get_run(run_id)
        if format not in ("json", "h5", "png"):
            raise HTTPException(422, "format must be json, png or h5")
        if orientation is not None:
            if format == "h5":
                raise HTTPException(422, "the HDF5 export is of the whole run")
            with live.lock:
                one = live.orientations.get(run_id, {}).get(orientation)
                grid = live.grids.get(run_id, {})
            if one is None:
                raise HTTPException(
                    404, f"run {run_id!r} has no orientation {orientation} in this service"
                )
            from consumers.reduction.accumulate import Snapshot

            alone = Snapshot.of(one[0].astype(float), one[1].astype(float), 1)
            if format == "png" or "image/png" in request.headers.get("accept", ""):
                return Response(
                    _png(alone, grid, f"{run_id} #{orientation}"), media_type="image/png"
                )
            return JSONResponse(_spectrum_json(run_id, alone, grid, orientation=orientation))
        if format == "h5":
            path = info.get("export_path")
            if not path or not Path(path).is_file():
                raise HTTPException(404, f"run {run_id!r} has no HDF5 export yet (complete runs)")
            return FileResponse(path, media_type="application/x-hdf5", filename=f"{run_id}.h5")
        with live.lock:
            snap = live.snapshots.get(run_id)
            grid = live.grids.get(run_id, {})
        if snap is None:
            path = info.get("export_path")
            if path and Path(path).is_file():
                snap, grid = _from_export(Path(path))
            else:
                raise HTTPException(404, f"run {run_id!r} has no spectrum yet")
        if format == "png" or "image/png" in request.headers.get("accept", ""):
            return Response(_png(snap, grid, run_id), media_type="image/png")
        return JSONResponse(_spectrum_json(run_id, snap, grid))

    @app.get("/models")
    def models() -> dict[str, Any]:
        """The model in use and the versions loaded before."""
        return {"current": live.model_version, "loaded": history.models()}

    @app.post("/models/reload", dependencies=[Depends(require_token)])
    def reload() -> dict[str, Any]:
        """Reload the frozen model from its directory (token)."""
        if live.reload is None:
            raise HTTPException(409, "this service runs no model server")
        try:
            version = live.reload()
        except Exception as exc:
            raise HTTPException(422, f"reload failed: {exc}") from exc
        live.model_version = str(version)
        return {"model_version": live.model_version}

    @app.post("/runs/{run_id}/advisor", dependencies=[Depends(require_token)])
    def set_advisor(run_id: str, body: AdvisorRange) -> dict[str, Any]:
        """Set the advisor's candidate range for a run (token)."""
        from simulations.instrument.spectrometer import Instrument
        from steering.advisor.ranking import candidate_omegas
        from steering.exceptions import AdvisorError

        get_run(run_id)
        try:
            omegas = candidate_omegas(body.start, body.stop, body.step, Instrument.arcs_like())
        except AdvisorError as exc:
            raise HTTPException(422, str(exc)) from exc
        live.advisor_ranges[run_id] = body.model_dump()
        return {"run_id": run_id, "candidates": len(omegas), **body.model_dump()}

    @app.get("/metrics")
    def metrics() -> Response:
        """Prometheus metrics."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        """The live page: spectrum and model, dispersion, FC trajectories, advice, coverage."""
        return HTMLResponse(_page_html())

    @app.get("/stream", responses={200: {"content": {"text/event-stream": {}}}})
    async def stream(
        request: Request,
        since: Annotated[int, Query(ge=0, description="Last version seen.")] = 0,
        timeout: Annotated[
            float, Query(gt=0, le=86400, description="Close the stream after this many s.")
        ] = 3600.0,
    ) -> StreamingResponse:
        """Server-sent events: an ``update`` event (JSON: run id, version, orientations,
        latest FC means and stds) whenever a run gets a new estimate; ``: keep-alive``
        comments every 15 s. Reconnecting clients send ``since`` (or Last-Event-ID)."""
        last_id = request.headers.get("last-event-id", "")
        start = int(last_id) if last_id.isdigit() else since

        async def events() -> AsyncIterator[str]:
            seen = start
            t_end = time.monotonic() + timeout
            t_alive = time.monotonic()
            yield "retry: 2000\n\n"
            while time.monotonic() < t_end:
                version, updates = live.changes(seen)
                for u in sorted(updates, key=lambda x: x["version"]):
                    yield f"id: {u['version']}\nevent: update\ndata: {json.dumps(u)}\n\n"
                seen = version
                if time.monotonic() - t_alive > 15:
                    t_alive = time.monotonic()
                    yield ": keep-alive\n\n"
                if await request.is_disconnected():
                    break
                await asyncio.sleep(0.2)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.get(
        "/runs/{run_id}/figures/{name}.png",
        responses={200: {"content": {"image/png": {}}}},
        response_class=Response,
    )
    def figure(run_id: str, name: FigureName) -> Response:
        """A figure of the run (PNG): ``spectrum`` (data beside the model at the estimate),
        ``dispersion`` (the estimate's branches over the data), ``coverage`` (exposure map
        and angles measured), ``fc`` (FC estimates with error bars against orientations)."""
        from steering import figures

        info = get_run(run_id)
        est = history.estimates(run_id)
        with live.lock:
            snap = live.snapshots.get(run_id)
            extra = dict(live.runs.get(run_id, {}))
        if snap is None and info.get("export_path") and Path(info["export_path"]).is_file():
            snap, _ = _from_export(Path(info["export_path"]))
        material = str(extra.get("material") or info["material"])
        truth = extra.get("truth")
        temperature = float(extra.get("temperature", 5.0))
        if name == "fc":
            png = figures.fc_figure(est, truth=truth)
            return Response(png, media_type="image/png")
        if snap is None:
            raise HTTPException(404, f"run {run_id!r} has no spectrum yet")
        try:
            latest = est[-1] if est else None
            if name == "spectrum":
                png = figures.spectrum_figure(
                    snap, material, latest, temperature=temperature, title=run_id
                )
            elif name == "dispersion":
                png = figures.dispersion_figure(
                    snap, material, latest, truth=truth, temperature=temperature
                )
            else:
                # angles measured: the live run's, else those of the estimates on record
                omegas = extra.get("omegas") or [e["omega"] for e in est]
                png = figures.coverage_figure(snap, material, omegas)
        except (KeyError, FileNotFoundError, ValueError) as exc:
            raise HTTPException(404, f"no figure for run {run_id!r}: {exc}") from exc
        return Response(png, media_type="image/png")

    return app


class FigureName(StrEnum):
    """Figures of a run."""

    spectrum = "spectrum"
    dispersion = "dispersion"
    coverage = "coverage"
    fc = "fc"


def _page_html() -> str:
    return (Path(__file__).resolve().parents[1] / "static" / "index.html").read_text(
        encoding="utf-8"
    )


def _spectrum_json(
    run_id: str, snap: Any, grid: dict[str, Any], *, orientation: int | None = None
) -> dict[str, Any]:
    out = {
        "run_id": run_id,
        "n_orientations": int(snap.n_orientations),
        "units": "1/(uC sr meV)",
        "energy_meV": grid.get("energy"),
        "q_index": list(range(snap.intensity.shape[0])),
        "intensity": _finite(snap.intensity),
        "mask": snap.mask.tolist(),
    }
    if orientation is not None:
        out["orientation"] = orientation
    return out


def _from_export(path: Path) -> tuple[Any, dict[str, Any]]:
    import h5py

    from consumers.reduction.accumulate import Snapshot

    with h5py.File(path, "r") as f:
        e = f["entry"]
        data = e["iqe"]
        counts = np.asarray(data["counts"][()], float)
        exposure = np.asarray(data["exposure"][()], float)
        edges = np.asarray(e["grid/energy_edges"][()], float)
        n = len(e["orientations/omega"][()]) if "orientations" in e else 0
    snap = Snapshot.of(counts, exposure, n)
    return snap, {"energy": (0.5 * (edges[1:] + edges[:-1])).tolist()}


def _png(snap: Any, grid: dict[str, Any], run_id: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    energy = grid.get("energy")
    extent = None
    if energy:
        extent = (0, snap.intensity.shape[0], energy[0], energy[-1])
    img = np.ma.masked_invalid(snap.intensity.T)
    m = ax.imshow(img, origin="lower", aspect="auto", extent=extent, cmap="viridis")
    fig.colorbar(m, ax=ax, label="I (1/(uC sr meV))")
    ax.set_xlabel("q-path index")
    ax.set_ylabel("E (meV)")
    ax.set_title(f"{run_id}: {snap.n_orientations} orientations")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
