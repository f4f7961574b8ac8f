"""Property-based tests of the API from its own OpenAPI spec (schemathesis): whatever the
generated path parameters, query strings, headers and bodies, no response is a server error.

Runs against a real uvicorn server over a filled SQLite history. ``/stream`` (an endless
event stream) is left out here and tested on its own in tests/steering/api/test_web.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from steering.api.app import LiveState, create_app
from steering.db import History
from tests.servers import TOKEN, serve

SERVER_ERRORS: list[str] = []


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from consumers.reduction.accumulate import RunAccumulator
    from simulations.lattice.materials import setup

    tmp: Path = tmp_path_factory.mktemp("fuzz")
    history = History(f"sqlite:///{tmp / 'steer.db'}")
    history.upsert_run("run-1", material="Ge", n_orientations=1, summary={"events_folded": 3})
    fc = {"1NN_xx": {"mean": -3.0, "std": 0.1, "q05": -3.2, "q95": -2.8}}
    history.add_estimate(
        "run-1",
        n_orientations=1,
        omega=0.0,
        estimate={"model_version": "Ge-test", "fc": fc, "out_of_domain": False},
    )
    grid = setup("Ge").grid
    acc = RunAccumulator(grid)
    counts = np.zeros(grid.shape)
    counts[3, 4] = 3
    acc.add(counts, np.ones(grid.shape), omega=0.0, proton_charge=1.0, events=3, dropped={})
    live = LiveState(reload=lambda: "Ge-reloaded", model_version="Ge-test")
    live.snapshots["run-1"] = acc.snapshot()
    live.runs["run-1"] = {"material": "Ge", "temperature": 5.0, "omegas": [0.0], "truth": None}
    with serve(create_app(history, token=TOKEN, live=live)) as base:
        yield schemathesis.openapi.from_url(f"{base}/openapi.json").exclude(path="/stream")


def test_no_server_errors(api_schema: Any) -> None:
    """Every operation, 30 generated cases each (8 for /predict; seeded), each sent without
    and with the token: no 5xx."""
    from hypothesis import given

    calls: dict[str, int] = {}
    for result in api_schema.get_all_operations():
        op = result.ok()
        # a prediction takes about half a second: fewer of them
        n = 8 if op.path == "/predict" else 30

        @given(case=op.as_strategy())
        @settings(
            max_examples=n,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            # without and with the token (so that state-changing endpoints get past it)
            for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
                response = case.call(timeout=60, headers=headers)
                label = f"{case.method} {case.operation.path}"
                calls[label] = calls.get(label, 0) + 1
                if response.status_code >= 500:
                    SERVER_ERRORS.append(
                        f"{case.method} {case.formatted_path} {case.query} {case.body!r}: "
                        f"{response.status_code} {response.text[:300]}"
                    )

        check()
    print(f"schemathesis: {sum(calls.values())} calls over {len(calls)} operations: {calls}")
    assert len(calls) >= 10, calls
    assert sum(calls.values()) >= 100, calls
    assert not SERVER_ERRORS, "\n".join(SERVER_ERRORS[:10])
