"""A person in charge of the advisor over the API (real uvicorn over a SQLite history): the
named tokens, the controls' endpoints, the override log with who and when, and the controls
after a restart."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from steering.api.app import LiveState, create_app
from steering.api.tokens import parse_tokens, token_table
from steering.db import History
from steering.exceptions import SteeringError
from tests.servers import TOKEN, serve

NAMED = {"alice": "alice-token", "bob": "bob-token"}


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_named_tokens_are_parsed_with_clear_errors() -> None:
    assert parse_tokens(" alice:tok1 , bob:tok2,") == {"alice": "tok1", "bob": "tok2"}
    assert parse_tokens(None) == parse_tokens("") == {}
    for raw, why in [
        ("alice", "no token"),
        ("alice:", "no token"),
        ("al ice:t", "letters"),
        ("alice:t1,alice:t2", "twice"),
        ("alice:t,bob:t", "share one token"),
    ]:
        with pytest.raises(SteeringError, match=why):
            parse_tokens(raw)
    assert token_table("t0", {"alice": "t1"}) == {"alice": "t1", "default": "t0"}
    with pytest.raises(SteeringError, match="also a named token"):
        token_table("t1", {"alice": "t1"})


def test_controls_need_a_token_and_record_its_name(filled) -> None:  # type: ignore[no-untyped-def]
    history, live, _ = filled
    live.omega_ranges["run-1"] = (0.0, 90.0)
    app = create_app(history, token=TOKEN, tokens=NAMED, live=live)
    with serve(app) as base, httpx.Client() as c:
        url = f"{base}/runs/run-1/advisor"
        assert c.post(f"{url}/pause").status_code == 401
        assert c.post(f"{url}/pause", headers=_auth("wrong")).status_code == 401
        assert c.post(f"{base}/runs/nope/advisor/pause", headers=_auth(TOKEN)).status_code == 404
        assert c.get(f"{base}/runs/nope/advisor").status_code == 404
        # a path of two routes (the candidate range, the controls): 405 lists both methods
        put = c.put(url)
        assert put.status_code == 405
        assert put.headers["allow"] == "GET, HEAD, POST"
        assert c.put(f"{url}/exclude").headers["allow"] == "DELETE, POST"
        view = c.get(url).json()  # open: no token
        assert view["state"] == "measuring"
        assert view["next"] == {"omega": 7.0, "source": "advisor", "by": None}
        assert view["omega_range"] == [0.0, 90.0]

        r = c.post(f"{url}/pause", headers=_auth(NAMED["alice"]))
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "paused"
        assert r.json()["next"] is None
        assert r.json()["override"]["who"] == "alice"
        c.post(f"{url}/resume", headers=_auth(TOKEN))
        r = c.post(f"{url}/exclude", json={"from": 5, "to": 10}, headers=_auth(NAMED["bob"]))
        assert r.status_code == 200, r.text
        assert r.json()["controls"]["excluded"] == [[5.0, 10.0]]
        assert r.json()["next"] is None  # the latest ranking's only candidate is excluded
        for body in (
            {"from": 10, "to": 5},  # reversed
            {"from": 10, "to": 10},  # empty
            {"from": 100, "to": 120},  # off the goniometer
            {"from": "nan", "to": 5},
            {"from": 1},
            {"from": 1, "to": 2, "extra": 3},
            {"from": True, "to": 2},
        ):
            bad = c.post(f"{url}/exclude", json=body, headers=_auth(TOKEN))
            assert bad.status_code == 422, (body, bad.text)
        nan = c.post(
            f"{url}/exclude",
            content=b'{"from": NaN, "to": 5}',
            headers={**_auth(TOKEN), "Content-Type": "application/json"},
        )
        assert nan.status_code == 422
        assert c.post(f"{url}/force", json={"omega": 95.0}, headers=_auth(TOKEN)).status_code == 422
        conflict = c.post(f"{url}/force", json={"omega": 7.5}, headers=_auth(TOKEN))
        assert conflict.status_code == 409
        assert "excluded" in conflict.json()["detail"]
        r = c.post(f"{url}/force", json={"omega": 30}, headers=_auth(NAMED["alice"]))
        assert r.json()["next"] == {"omega": 30.0, "source": "forced", "by": "alice"}
        r = c.post(f"{url}/target", json={"std": {"1NN_xx": 0.05}}, headers=_auth(NAMED["bob"]))
        assert r.json()["controls"]["target"] == {"std": {"1NN_xx": 0.05}}
        for body in ({}, {"std": {"1NN_xx": -1}}, {"d_criterion": 0}, {"std": {}}):
            assert c.post(f"{url}/target", json=body, headers=_auth(TOKEN)).status_code == 422
        assert c.delete(f"{url}/exclude", headers=_auth(TOKEN)).json()["controls"]["excluded"] == []
        assert c.delete(f"{url}/target").status_code == 401

        log = c.get(url).json()["controls"]["overrides"]
        assert [(o["action"], o["who"]) for o in log] == [
            ("pause", "alice"),
            ("resume", "default"),
            ("exclude", "bob"),
            ("force", "alice"),
            ("target", "bob"),
            ("include_all", "default"),
        ]
        assert all(o["at"] for o in log)
        # the run history has them all, with who and when
        assert history.load_controls("run-1")["overrides"] == log
    # without a configured token, the controls are read-only
    with serve(create_app(history, live=live)) as base, httpx.Client() as c:
        assert c.post(f"{base}/runs/run-1/advisor/pause").status_code == 403
        assert c.get(f"{base}/runs/run-1/advisor").status_code == 200


def test_controls_survive_a_restart(filled) -> None:  # type: ignore[no-untyped-def]
    history, live, url = filled
    with serve(create_app(history, tokens=NAMED, live=live)) as base, httpx.Client() as c:
        api = f"{base}/runs/run-1/advisor"
        c.post(f"{api}/pause", headers=_auth(NAMED["alice"]))
        c.post(f"{api}/exclude", json={"from": 40, "to": 50}, headers=_auth(NAMED["bob"]))
        c.post(f"{api}/force", json={"omega": 12.5}, headers=_auth(NAMED["bob"]))
        c.post(f"{api}/target", json={"d_criterion": 0.002}, headers=_auth(NAMED["alice"]))
        before: dict[str, Any] = c.get(api).json()
    history.engine.dispose()
    again = History(url)  # a new service process on the same database, a new live state
    with serve(create_app(again, tokens=NAMED, live=LiveState())) as base, httpx.Client() as c:
        after = c.get(f"{base}/runs/run-1/advisor").json()
    assert after["controls"] == before["controls"]
    assert after["state"] == "paused"
    assert after["controls"]["forced_next"] == 12.5
    assert after["controls"]["forced_by"] == "bob"
    assert [o["who"] for o in after["controls"]["overrides"]] == ["alice", "bob", "bob", "alice"]
    # the loop of the re-opened run gets the same controls (steering.service._make_loop)
    controls = LiveState().controls_for("run-1", again)
    assert controls.paused
    assert controls.excluded == [(40.0, 50.0)]
    assert controls.target == {"d_criterion": 0.002}


def test_a_change_of_the_controls_is_pushed_on_the_live_stream(filled) -> None:  # type: ignore[no-untyped-def]
    """Every open page hears of a change at once: a ``controls`` event on ``/stream`` with
    what was done, by whom, and the advisor's state; the estimates' ``update`` events are
    left as they were."""
    import json
    import threading
    import time

    history, live, _ = filled
    live.omega_ranges["run-1"] = (0.0, 90.0)
    got: list[tuple[str, dict[str, Any]]] = []
    listening = threading.Event()

    def read(base: str) -> None:
        with (
            httpx.Client(timeout=30) as c,
            c.stream("GET", f"{base}/stream", params={"since": live.version, "timeout": 20}) as r,
        ):
            event = ""
            for line in r.iter_lines():
                listening.set()  # the stream's first line ("retry:") came
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    got.append((event, json.loads(line.split(":", 1)[1])))
                if len(got) >= 3:
                    return

    app = create_app(history, token=TOKEN, tokens=NAMED, live=live)
    with serve(app) as base, httpx.Client() as c:
        reader = threading.Thread(target=read, args=(base,), daemon=True)
        reader.start()
        assert listening.wait(15)
        url = f"{base}/runs/run-1/advisor"

        def heard(n: int) -> bool:  # the stream keeps each run's latest event of a kind:
            t_end = time.monotonic() + 10  # one at a time, so that none is coalesced
            while len(got) < n and time.monotonic() < t_end:
                time.sleep(0.05)
            return len(got) >= n

        assert c.post(f"{url}/pause", headers=_auth(NAMED["alice"])).status_code == 200
        assert heard(1)
        live.notify("run-1", n_orientations=9, fc={})
        assert heard(2)
        r = c.post(f"{url}/exclude", json={"from": 5, "to": 10}, headers=_auth(NAMED["bob"]))
        assert r.status_code == 200, r.text
        reader.join(15)
    assert [e for e, _ in got] == ["controls", "update", "controls"]
    controls = [u for e, u in got if e == "controls"]
    assert [(u["action"], u["who"], u["state"]) for u in controls] == [
        ("pause", "alice", "paused"),
        ("exclude", "bob", "paused"),
    ]
    assert all(u["run_id"] == "run-1" for _, u in got)
    assert next(u for e, u in got if e == "update")["n_orientations"] == 9
