"""The prediction pool with real worker processes: answers, reuse of a warm worker, the
queue bound (429 at once), the time budget and a client that leaves (the worker is killed),
and close (the request in flight is answered 503 at once)."""

from __future__ import annotations

import asyncio
import json
import multiprocessing.connection
import time
from typing import Any

import pytest

from model_server.exceptions import PredictionUnavailable
from model_server.prediction.pool import PredictionPool

QUICK: dict[str, Any] = {"material": "Ge", "fc": "raman", "outputs": ["dos"], "dos_sigma": 1.0}
#: minutes of work: 360 angles of Ge's folded I(q, E) and detector output
LONG: dict[str, Any] = {
    "material": "Ge",
    "fc": "raman",
    "omegas": [float(w) for w in range(-180, 180)],
    "outputs": ["iqe", "detector"],
}


def _gone(process: Any, timeout: float = 15.0) -> bool:
    """Whether ``process`` ended within ``timeout`` s, read from its sentinel (the pipe that
    closes when the process ends). Not ``join``: the pool reaps its killed workers in a
    thread of its own, and two threads joining one process race in ``waitpid`` (the loser
    sees ECHILD and an exit code of ``None`` although the process is gone). A killed worker
    ends at once on an idle machine; the generous bound is for a loaded one (CI on 2 shared
    cores: a worker killed while importing its libraries took more than 2 s to end)."""
    return bool(multiprocessing.connection.wait([process.sentinel], timeout))


@pytest.mark.slow
def test_answers_queue_bound_and_a_client_that_leaves() -> None:
    pool = PredictionPool(workers=1, queue=0, budget_s=120.0)

    async def scenario() -> None:
        first = await pool.run(QUICK)
        assert first.status == 200
        assert json.loads(first.body)["dos"]["units"]
        (worker,) = pool.processes
        again = await pool.run(QUICK)
        assert again.status == 200
        assert pool.processes == [worker]  # the warm worker is reused

        bad = await pool.run({**QUICK, "material": "Xx"})
        assert bad.status == 422
        assert "unknown material" in bad.detail

        gone_at: list[float] = []

        async def disconnected() -> bool:
            if time.monotonic() > t_leave:
                gone_at.append(time.monotonic())
                return True
            return False

        t_leave = time.monotonic() + 1.0
        long = asyncio.create_task(pool.run(LONG, disconnected=disconnected))
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        with pytest.raises(PredictionUnavailable) as full:
            await pool.run(QUICK)
        assert time.monotonic() - t0 < 1.0  # refused at once (a generous bound for CI)
        assert full.value.status == 429
        assert full.value.retry_after is not None
        assert full.value.retry_after >= 1
        with pytest.raises(PredictionUnavailable, match="client disconnected"):
            await long
        assert gone_at[0] - t_leave < 2.0  # polled every 0.2 s (a generous bound for CI)
        assert await asyncio.to_thread(_gone, worker)  # killed, not left computing
        assert pool.outcomes["client_gone"] == 1
        assert pool.outcomes["refused_full"] == 1

    try:
        asyncio.run(scenario())
    finally:
        pool.close_now()
    assert not pool.processes


@pytest.mark.slow
def test_time_budget_and_close() -> None:
    pool = PredictionPool(workers=1, queue=1, budget_s=3.0)

    async def over_budget() -> None:
        t0 = time.monotonic()
        with pytest.raises(PredictionUnavailable, match="time budget of 3 s") as exc:
            await pool.run(LONG)
        assert exc.value.status == 503
        assert time.monotonic() - t0 < 3.5
        assert pool.outcomes["timed_out"] == 1

    asyncio.run(over_budget())
    pool.close_now()

    closing = PredictionPool(workers=1, queue=1, budget_s=120.0)

    async def close_in_flight() -> None:
        long = asyncio.create_task(closing.run(LONG))
        await asyncio.sleep(1.0)
        (worker,) = closing.processes
        t0 = time.monotonic()
        closing.close()
        with pytest.raises(PredictionUnavailable, match="stopping") as exc:
            await long
        assert time.monotonic() - t0 < 3.0
        assert exc.value.status == 503
        assert await asyncio.to_thread(_gone, worker)
        with pytest.raises(PredictionUnavailable, match="stopping"):
            await closing.run(QUICK)

    try:
        asyncio.run(close_in_flight())
    finally:
        closing.close_now()
