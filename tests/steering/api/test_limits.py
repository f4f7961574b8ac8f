"""The API under hostile and careless input, on a real uvicorn server: work is bounded before
it is done (body size, CIF sites before symmetry expansion, advisor candidates, event
streams), predictions run in worker processes that are killed past their time budget or
when their client leaves, and files are served from the state folder only."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from steering.api.app import create_app
from steering.api.limits import ServiceLimits
from tests.servers import TOKEN, serve

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def fm3m_cif(n_sites: int) -> str:
    """An Fm-3m CIF with ``n_sites`` general positions (192 images each)."""
    rng = np.random.default_rng(0)
    rows = "\n".join(
        f"Ge{k} Ge {x:.5f} {y:.5f} {z:.5f} 1.0"
        for k, (x, y, z) in enumerate(rng.random((n_sites, 3)))
    )
    return (
        "data_big\n_cell_length_a 10\n_cell_length_b 10\n_cell_length_c 10\n"
        "_cell_angle_alpha 90\n_cell_angle_beta 90\n_cell_angle_gamma 90\n"
        "_symmetry_space_group_name_H-M 'F m -3 m'\n_symmetry_Int_Tables_number 225\n"
        "loop_\n_atom_site_label\n_atom_site_type_symbol\n_atom_site_fract_x\n"
        f"_atom_site_fract_y\n_atom_site_fract_z\n_atom_site_occupancy\n{rows}\n"
    )


@pytest.fixture
def api(filled, tmp_path: Path) -> Iterator[tuple[str, Any, Path]]:  # type: ignore[no-untyped-def]
    history, live, _ = filled
    state = tmp_path / "state"
    state.mkdir()
    app = create_app(history, token=TOKEN, live=live, state_dir=state, model_dir=tmp_path)
    with serve(app) as base:
        yield base, app, state


def test_a_large_body_is_413_at_once_and_health_is_unaffected(api) -> None:  # type: ignore[no-untyped-def]
    base, _, _ = api
    body = b'{"material": "Ge", "omegas": [' + b"0.0," * 4_000_000 + b"0.0]}"  # 16 MB
    with httpx.Client(timeout=30) as c:
        t0 = time.perf_counter()
        r = c.post(f"{base}/predict", content=body, headers={"Content-Type": "application/json"})
        dt = time.perf_counter() - t0
        assert r.status_code == 413
        assert "STEER_MAX_BODY_BYTES" in r.json()["detail"]
        assert dt < 5.0  # bounds for a loaded CI machine; bench_hostile has the timings
        # a body without a length (chunked) is cut at the limit too
        r = c.post(f"{base}/runs/run-1/advisor", content=iter([b"x" * 65536] * 40), headers=AUTH)
        assert r.status_code == 413
        t0 = time.perf_counter()
        assert c.get(f"{base}/health").status_code == 200
        assert time.perf_counter() - t0 < 2.0
        # counted, by limit, in /metrics (text format 0.0.4)
        r = c.get(f"{base}/metrics")
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        refused = {
            s.labels["limit"]: s.value
            for f in text_string_to_metric_families(r.text)
            if f.name == "steer_requests_refused"
            for s in f.samples
            if s.name.endswith("_total")
        }
        assert refused["body"] >= 2


def test_a_huge_cif_is_refused_before_its_symmetry_is_expanded(api) -> None:  # type: ignore[no-untyped-def]
    """50 general sites of Fm-3m: 9,600 sites once expanded (pymatgen took 23 s to build
    them); refused in well under a second, naming the limit."""
    base, _, _ = api
    with httpx.Client(timeout=30) as c:
        t0 = time.perf_counter()
        r = c.post(f"{base}/predict", json={"cif": fm3m_cif(50), "outputs": ["dos"]})
        dt = time.perf_counter() - t0
    assert r.status_code == 422, r.text
    assert "once its symmetry is applied; at most 1000" in r.json()["detail"]
    assert "STEER_CIF_MAX_SITES" in r.json()["detail"]
    assert dt < 5.0  # building the sites took 23 s; bench_hostile times it (0.36 s)


def test_validation_errors_do_not_echo_large_inputs(api) -> None:  # type: ignore[no-untyped-def]
    base, _, _ = api
    with httpx.Client(timeout=30) as c:
        r = c.post(f"{base}/predict", json={"material": "Ge", "omegas": [0.0] * 100_000})
    assert r.status_code == 422
    assert len(r.content) < 2000
    assert "list of 100000 items" in r.text


def test_advisor_range_is_counted_before_it_is_made(api) -> None:  # type: ignore[no-untyped-def]
    base, _, _ = api
    with httpx.Client(timeout=30) as c:
        t0 = time.perf_counter()
        r = c.post(
            f"{base}/runs/run-1/advisor",
            json={"start": -180, "stop": 180, "step": 2e-7},
            headers=AUTH,
        )
        assert time.perf_counter() - t0 < 5.0  # making them took 20.7 s
        assert r.status_code == 422
        assert "1.8e+09 angles; at most 3600" in r.json()["detail"]
        r = c.post(f"{base}/runs/run-1/advisor", json={"start": 0, "stop": False}, headers=AUTH)
        assert r.status_code == 422  # a boolean is not an angle


def test_event_streams_are_capped(filled) -> None:  # type: ignore[no-untyped-def]
    history, live, _ = filled
    app = create_app(history, live=live, limits=ServiceLimits(max_streams=1))
    with serve(app) as base, httpx.Client(timeout=10) as c:
        with c.stream("GET", f"{base}/stream", params={"timeout": 5}) as first:
            assert first.status_code == 200
            second = c.get(f"{base}/stream", params={"timeout": 1})
            assert second.status_code == 503
            assert second.headers["Retry-After"]
        # the slot is given back when the stream ends
        deadline = time.monotonic() + 5
        while app.state.streams and time.monotonic() < deadline:
            time.sleep(0.05)
        with c.stream("GET", f"{base}/stream", params={"timeout": 0.5}) as again:
            assert again.status_code == 200


def test_files_only_from_the_state_folder(api, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, app, state = api
    history = app.state.history
    app.state.live.snapshots.clear()  # the spectrum must come from the export
    outside = tmp_path / "secret.h5"
    outside.write_bytes(b"not for the public")
    history.upsert_run("run-out", material="Ge", state="complete", export_path=str(outside))
    damaged = state / "runs" / "run-bad.h5"
    damaged.parent.mkdir()
    damaged.write_bytes(b"\x89HDF\r\n\x1a\n but cut off")
    history.upsert_run("run-bad", material="Ge", state="complete", export_path=str(damaged))
    history.add_model("Ge-1", material="Ge", path=str(tmp_path / "ge"))
    with httpx.Client(timeout=30) as c:
        r = c.get(f"{base}/runs/run-out/spectrum", params={"format": "h5"})
        assert r.status_code == 404
        assert b"not for the public" not in r.content
        assert c.get(f"{base}/runs/run-out/spectrum").status_code == 404
        r = c.get(f"{base}/runs/run-bad/spectrum")
        assert r.status_code == 503
        assert "(runs/run-bad.h5) cannot be read" in r.json()["detail"]
        assert str(tmp_path) not in r.text
        assert c.get(f"{base}/runs/run-bad/figures/spectrum.png").status_code == 503
        assert c.get(f"{base}/runs/run-bad/figures/fc.png").status_code == 200
        # names relative to the state or model folder, never the server's paths
        runs = {r["run_id"]: r for r in c.get(f"{base}/runs").json()}
        assert runs["run-bad"]["export_path"] == "runs/run-bad.h5"
        assert runs["run-out"]["export_path"] == "secret.h5"
        assert c.get(f"{base}/runs/run-bad").json()["export_path"] == "runs/run-bad.h5"
        models = c.get(f"{base}/models").json()["loaded"]
        assert [m["path"] for m in models] == ["ge"]
        assert str(tmp_path) not in c.get(f"{base}/runs").text + c.get(f"{base}/models").text


def test_a_client_that_leaves_has_its_prediction_stopped(filled) -> None:  # type: ignore[no-untyped-def]
    """The real disconnect path: uvicorn tells the route the client has gone, and the
    worker computing its 360 angles is killed (not left running for minutes)."""
    history, live, _ = filled
    app = create_app(history, live=live)
    pool = app.state.predictions
    body = {
        "material": "Ge",
        "fc": "raman",
        "omegas": [float(w) for w in range(-180, 180)],
        "outputs": ["iqe", "detector"],
    }
    with serve(app) as base:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/predict", json=body, timeout=3.0)
        (worker,) = pool.processes or [None]
        deadline = time.monotonic() + 5
        while pool.outcomes.get("client_gone", 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool.outcomes.get("client_gone") == 1, pool.outcomes
        assert not pool.processes  # the worker was killed, not returned to the pool
        with httpx.Client(timeout=10) as c:
            assert c.get(f"{base}/health").status_code == 200
    if worker is not None:
        worker.join(5)
        assert worker.exitcode is not None


def test_many_errors_are_listed_briefly(api) -> None:  # type: ignore[no-untyped-def]
    """A body just under the size limit with 80,000 unknown keys: 80,000 validation errors,
    of which 20 are listed, answered quickly with /health unaffected."""
    base, _, _ = api
    body = {f"k{i}": 0 for i in range(80_000)}
    with httpx.Client(timeout=30) as c:
        t0 = time.perf_counter()
        r = c.post(f"{base}/predict", json=body)
        dt = time.perf_counter() - t0
        assert r.status_code == 422
        detail = r.json()["detail"]
        assert len(detail) == 21
        assert "and 79980 more errors" in detail[-1]["msg"]
        assert dt < 10.0, dt
        t0 = time.perf_counter()
        assert c.get(f"{base}/health").status_code == 200
        assert time.perf_counter() - t0 < 2.0
