"""The status API on a real uvicorn server over a SQLite history."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from steering.api.app import create_app
from steering.db import History
from tests.servers import TOKEN, serve


def test_read_endpoints(filled) -> None:  # type: ignore[no-untyped-def]
    history, live, _ = filled
    with serve(create_app(history, token=TOKEN, live=live)) as base, httpx.Client() as c:
        assert c.get(f"{base}/health").json()["runs"] == 1
        assert [r["run_id"] for r in c.get(f"{base}/runs").json()] == ["run-1"]
        run = c.get(f"{base}/runs/run-1").json()
        assert run["n_orientations"] == 3
        assert run["model_version"] == "Ge-test"
        assert c.get(f"{base}/runs/nope").status_code == 404
        est = c.get(f"{base}/runs/run-1/estimates").json()["estimates"]
        assert [e["n_orientations"] for e in est] == [1, 2, 3]
        assert est[-1]["fc"]["1NN_xx"]["std"] == pytest.approx(0.1 / 3)
        advice = c.get(f"{base}/runs/run-1/advice").json()["advice"]
        assert advice[0]["candidates"][0]["omega"] == 7.0
        spec = c.get(f"{base}/runs/run-1/spectrum").json()
        assert spec["intensity"][10][20] == pytest.approx(2.5)  # 5 counts / (2 uC x 1)
        assert spec["intensity"][0][0] is None  # unmeasured: null, not 0
        assert spec["mask"][0][0] is False
        png = c.get(f"{base}/runs/run-1/spectrum", headers={"Accept": "image/png"})
        assert png.headers["content-type"] == "image/png"
        assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert c.get(f"{base}/runs/run-1/spectrum?format=h5").status_code == 404
        families = {f.name for f in text_string_to_metric_families(c.get(f"{base}/metrics").text)}
        assert "steer_events_folded" in families
        assert c.get(f"{base}/openapi.json").json()["info"]["title"].startswith("steer")


def test_state_changes_need_the_token(filled) -> None:  # type: ignore[no-untyped-def]
    history, live, _ = filled
    with serve(create_app(history, token=TOKEN, live=live)) as base, httpx.Client() as c:
        url = f"{base}/models/reload"
        assert c.post(url).status_code == 401
        assert c.post(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = c.post(url, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
        assert ok.json()["model_version"] == "Ge-reloaded"
        body = {"start": 0, "stop": 90, "step": 2}
        url = f"{base}/runs/run-1/advisor"
        assert c.post(url, json=body).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = c.post(url, json=body, headers=auth)
        assert r.status_code == 200
        assert r.json()["candidates"] == 45
        assert c.get(f"{base}/runs/run-1").json()["advisor_range"]["step"] == 2
        bad = c.post(url, json={"start": 10, "stop": 10}, headers=auth)
        assert bad.status_code == 422
        assert "empty" in bad.text
    # without a configured token, state changes are off
    with serve(create_app(history, token=None, live=live)) as base, httpx.Client() as c:
        assert c.post(f"{base}/models/reload").status_code == 403


def test_history_survives_a_restart(filled) -> None:  # type: ignore[no-untyped-def]
    history, live, url = filled
    with serve(create_app(history, token=TOKEN, live=live)) as base, httpx.Client() as c:
        assert len(c.get(f"{base}/runs/run-1/estimates").json()["estimates"]) == 3
    history.engine.dispose()
    again = History(url)  # a new service process on the same database
    with serve(create_app(again, token=TOKEN)) as base, httpx.Client() as c:
        est = c.get(f"{base}/runs/run-1/estimates").json()["estimates"]
        assert [e["n_orientations"] for e in est] == [1, 2, 3]
        assert c.get(f"{base}/runs/run-1/spectrum").status_code == 404  # live state is gone
