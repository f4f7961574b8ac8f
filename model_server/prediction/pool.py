"""Predictions off the service's process: a bounded pool of worker processes.

One prediction can take minutes and gigabytes (a 360-angle Ge request, a large cell), and a
thread running it cannot be stopped. :class:`PredictionPool` runs each prediction in a
worker process (:func:`model_server.prediction.worker.serve`, started with ``spawn``,
BLAS/OpenMP/torch on one thread each, numba's kernels on the cores shared among the
workers), so that

* at most ``workers`` predictions run at once, and at most ``queue`` more wait for a worker:
  a request beyond that is refused at once (:class:`~model_server.exceptions.
  PredictionUnavailable`, status 429 with a ``retry_after``);
* each request has a time budget (queueing included): past it, its worker is killed and
  replaced, and the request gets status 503;
* a request whose client has gone (``disconnected`` says so; polled every 0.2 s) has its
  worker killed too;
* :meth:`PredictionPool.close` (SIGTERM) kills every worker at once: the requests in flight
  get 503 and the service stops within a second.

Workers start on first use (or with :meth:`PredictionPool.start`) and keep their caches
(materials, fold tables, S(Q, E) models) between requests; a killed one loses them. With
``warmup=True`` every worker warms itself as soon as it starts
(:data:`model_server.prediction.worker.WARMUP_STEPS`: Ge's setup, tables and compiled
kernels, the e3nn model), between jobs: a request that arrives meanwhile waits at most for
the step in progress, never fails for it. :meth:`PredictionPool.state` says how far the
workers are (``GET /health`` shows it).
Everything here runs on the event loop of the caller (asyncio); the pipe reads and writes
that could block go to threads.

:class:`InlinePredictions` answers in a thread of this process, one at a time, without a
time budget: for embedding the route in an app of one's own and for the physics tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from model_server.exceptions import PredictionUnavailable
from model_server.prediction import worker as worker_module
from model_server.prediction.worker import STEP_FAILED, WARMUP_STEPS, Answer, answer

__all__ = ["Answer", "InlinePredictions", "PredictionPool", "PredictionRunner"]

logger = logging.getLogger(__name__)

#: How often a running prediction checks whether its client is still there, seconds.
POLL_S = 0.2

Disconnected = Callable[[], Awaitable[bool]]


class PredictionRunner(Protocol):
    """What the prediction route asks of whatever runs its predictions."""

    async def run(self, job: dict[str, Any], *, disconnected: Disconnected | None = None) -> Answer:
        """The :class:`Answer` of ``job``; raises :class:`PredictionUnavailable` when it
        cannot be had now."""
        ...


class _Worker:
    """One worker process and the parent's end of its pipe; with ``warmup``, the shared
    array where it writes when each warm-up step ended (see :func:`worker_module.serve`)."""

    def __init__(self, ctx: Any, warmup: bool = False, numba_threads: int = 1) -> None:
        parent, child = ctx.Pipe(duplex=True)
        self.warmup: Any = None
        args: tuple[Any, ...] = (child,)
        if warmup:
            self.warmup = ctx.Array("d", [math.nan] * len(WARMUP_STEPS), lock=False)
            args = (child, self.warmup)
        self.started = time.time()
        self.process = ctx.Process(
            target=worker_module.serve,
            args=args,
            kwargs={"numba_threads": numba_threads},
            name="steer-predict",
            daemon=True,
        )
        self.process.start()
        child.close()
        self.conn = parent
        self.jobs = 0

    def warmup_steps(self) -> list[float | None]:
        """Per warm-up step: seconds from the process's start to the step's end, ``-1.0``
        when it failed, ``None`` while to do."""
        out: list[float | None] = []
        for ended in self.warmup:
            if math.isnan(ended):
                out.append(None)
            else:
                out.append(STEP_FAILED if ended == STEP_FAILED else ended - self.started)
        return out

    def kill(self) -> None:
        """Kill the process (signal-safe: no waiting)."""
        if self.process.exitcode is None:
            with contextlib.suppress(OSError, ValueError):  # already gone, or closed
                self.process.kill()

    def reap(self, timeout: float) -> None:
        """Wait for the process to end, then free its resources."""
        self.process.join(timeout)
        self.conn.close()


class PredictionPool:
    """A bounded pool of prediction worker processes (see the module docstring).

    Parameters
    ----------
    workers
        Predictions running at once (worker processes). Each runs BLAS, OpenMP and torch on
        one thread and numba's parallel kernels on the machine's cores divided among the
        workers (:attr:`numba_threads`).
    queue
        Requests that may wait for a worker; beyond ``workers + queue`` a request is refused
        with status 429.
    budget_s
        Seconds a request may take, waiting included; past it the worker is killed.
    warmup
        Workers warm themselves up as soon as they start (see the module docstring).
    """

    def __init__(
        self, *, workers: int = 1, queue: int = 4, budget_s: float = 120.0, warmup: bool = False
    ) -> None:
        if workers < 1 or queue < 0 or not budget_s > 0:
            raise ValueError(
                f"a prediction pool needs workers >= 1, queue >= 0 and a budget > 0 s, got "
                f"{workers}, {queue} and {budget_s}"
            )
        self.workers = int(workers)
        #: Threads of numba's parallel kernels in each worker: the machine's cores shared
        #: among the workers (BLAS, OpenMP and torch stay on one thread).
        self.numba_threads = max(1, (os.cpu_count() or 1) // self.workers)
        self.queue = int(queue)
        self.budget_s = float(budget_s)
        self.warmup = bool(warmup)
        self._ctx = multiprocessing.get_context("spawn")
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = 0
        self._closed = False
        #: seconds of the recent predictions (an exponential mean), for ``Retry-After``
        self._typical_s = 5.0
        #: counts of what happened to the requests, by outcome
        self.outcomes: dict[str, int] = {}

    # -- state ------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests running or waiting."""
        return self._pending

    @property
    def processes(self) -> list[Any]:
        """The live worker processes (:class:`multiprocessing.Process`)."""
        return [w.process for w in (*self._idle, *self._busy)]

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def start(self) -> None:
        """Start the worker processes now rather than on first use (with ``warmup``, they
        warm up at once). Spawning does not wait for the process to be ready."""
        while len(self._idle) + len(self._busy) < self.workers and not self._closed:
            self._idle.append(_Worker(self._ctx, self.warmup, self.numba_threads))

    def state(self) -> dict[str, Any]:
        """What the pool is doing, JSON-ready: ``workers`` (processes alive), ``running``,
        ``pending`` (running or waiting), ``warmup``: ``off`` (not asked for), ``not
        started`` (no worker yet), ``warming`` (a worker has steps to do) or ``ready``;
        ``warmup_s``: per step of :data:`~model_server.prediction.worker.WARMUP_STEPS`, the
        seconds from its worker's start to its end (the slowest worker's), ``"failed"``, or
        null while to do. Safe to call from any thread."""
        workers = (*self._idle, *self._busy)
        out: dict[str, Any] = {
            "workers": len(workers),
            "running": len(workers) - len(self._idle),
            "pending": self._pending,
            "warmup": "off",
        }
        if not self.warmup:
            return out
        if not workers:
            out["warmup"] = "not started"
            return out
        per_worker = [w.warmup_steps() for w in workers]
        steps: dict[str, float | str | None] = {}
        for k, step in enumerate(WARMUP_STEPS):
            seen = [ws[k] for ws in per_worker]
            if any(v == STEP_FAILED for v in seen):
                steps[step.name] = "failed"
            elif any(v is None for v in seen):
                steps[step.name] = None
            else:
                steps[step.name] = round(max(v for v in seen if v is not None), 2)
        out["warmup"] = "warming" if None in steps.values() else "ready"
        out["warmup_s"] = steps
        return out

    # -- running a prediction ----------------------------------------------------------------

    async def run(self, job: dict[str, Any], *, disconnected: Disconnected | None = None) -> Answer:
        """The :class:`Answer` of ``job`` from a worker.

        Raises
        ------
        PredictionUnavailable
            429 when ``workers + queue`` requests are already running or waiting; 503 when
            the request ran past the time budget, its worker died, or the pool is closed.
        asyncio.CancelledError
            When the caller is cancelled (its worker is killed first).
        """
        if self._closed:
            raise PredictionUnavailable("the service is stopping", retry_after=5, reason="stopping")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)
            self._loop = asyncio.get_running_loop()
        if self._pending >= self.workers + self.queue:
            self._count("refused_full")
            raise PredictionUnavailable(
                f"{self._pending} predictions are running or waiting, the most this service "
                f"takes ({self.workers} at once + a queue of {self.queue}: "
                "STEER_PREDICT_WORKERS, STEER_PREDICT_QUEUE); retry later",
                status=429,
                retry_after=max(1, math.ceil(self._typical_s)),
                reason="queue_full",
            )
        self._pending += 1
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(self.budget_s):
                await self._slots.acquire()
                try:
                    result = await self._run_in_worker(job, disconnected)
                finally:
                    self._slots.release()
        except TimeoutError:
            self._count("timed_out")
            raise PredictionUnavailable(
                f"the prediction ran past its time budget of {self.budget_s:g} s "
                "(STEER_PREDICT_TIMEOUT_S) and was stopped; ask for fewer angles or outputs",
                reason="timed_out",
            ) from None
        finally:
            self._pending -= 1
        dt = time.monotonic() - t0
        self._typical_s = 0.7 * self._typical_s + 0.3 * dt
        self._count("answered")
        return result

    async def _start_worker(self) -> _Worker:
        """A new worker, started in a thread (spawning is not instant; the loop goes on).
        One whose request is cancelled while it starts is killed once it has started."""
        starting = asyncio.ensure_future(asyncio.to_thread(_Worker, self._ctx, self.warmup))
        try:
            return await asyncio.shield(starting)
        except asyncio.CancelledError:
            starting.add_done_callback(_kill_started)
            raise

    async def _take_worker(self) -> _Worker:
        if self._closed:
            raise PredictionUnavailable("the service is stopping", retry_after=5, reason="stopping")
        w = self._idle.pop() if self._idle else await self._start_worker()
        if self._closed:  # closed while it started
            w.kill()
            raise PredictionUnavailable("the service is stopping", retry_after=5, reason="stopping")
        self._busy.add(w)
        return w

    async def _run_in_worker(
        self, job: dict[str, Any], disconnected: Disconnected | None
    ) -> Answer:
        w = await self._take_worker()
        ok = False
        try:
            await asyncio.to_thread(w.conn.send, job)
            result = await self._wait_for(w, disconnected)
            ok = True
            return result
        except (EOFError, OSError) as exc:
            if self._closed:
                raise PredictionUnavailable(
                    "the service is stopping", retry_after=5, reason="stopping"
                ) from None
            self._count("worker_lost")
            logger.warning("a prediction worker was lost (exit code %s)", w.process.exitcode)
            raise PredictionUnavailable(
                f"the prediction's worker stopped ({type(exc).__name__}, exit code "
                f"{w.process.exitcode}); it is replaced, retry later",
                retry_after=5,
                reason="worker_lost",
            ) from exc
        finally:
            self._busy.discard(w)
            if ok and not self._closed:
                w.jobs += 1
                self._idle.append(w)
            else:  # timed out, client gone, cancelled, died: the worker goes
                w.kill()
                asyncio.get_running_loop().run_in_executor(None, w.reap, 5.0)

    async def _wait_for(self, w: _Worker, disconnected: Disconnected | None) -> Answer:
        """The worker's answer; raises :class:`PredictionUnavailable` (499-like: 503) when
        the client goes first."""
        received = asyncio.ensure_future(self._receive(w))
        try:
            while True:
                done, _ = await asyncio.wait({received}, timeout=POLL_S)
                if done:
                    result: Answer = received.result()
                    return result
                if disconnected is not None and await disconnected():
                    self._count("client_gone")
                    logger.info("client gone: its prediction is stopped")
                    raise PredictionUnavailable("the client disconnected", reason="client_gone")
        finally:
            if not received.done():
                received.cancel()

    async def _receive(self, w: _Worker) -> Answer:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        fd = w.conn.fileno()

        def on_ready() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, on_ready)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
        result: Answer = await asyncio.to_thread(w.conn.recv)
        return result

    # -- stopping ----------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every worker now; the requests in flight and waiting get 503. Safe in a
        signal handler (no waiting)."""
        self._closed = True
        for w in (*self._idle, *self._busy):
            w.kill()
        if self._loop is not None and self._slots is not None:
            slots = self._slots
            with contextlib.suppress(RuntimeError):  # RuntimeError: the loop is closed
                # wake the waiters, which then see the pool closed
                self._loop.call_soon_threadsafe(_release, slots, self.workers + self.queue)

    async def aclose(self, timeout: float = 5.0) -> None:
        """:meth:`close`, then wait (in a thread) for the processes to end."""
        self.close()
        workers = [*self._idle, *self._busy]
        self._idle.clear()
        await asyncio.gather(*(asyncio.to_thread(w.reap, timeout) for w in workers))

    def close_now(self, timeout: float = 5.0) -> None:
        """:meth:`close` and wait for the processes, without an event loop."""
        self.close()
        for w in [*self._idle, *self._busy]:
            w.reap(timeout)
        self._idle.clear()


def _kill_started(starting: asyncio.Future[_Worker]) -> None:
    if not starting.cancelled() and starting.exception() is None:
        w = starting.result()
        w.kill()
        w.reap(5.0)


def _release(slots: asyncio.Semaphore, n: int) -> None:
    for _ in range(n):
        slots.release()


class InlinePredictions:
    """Predictions in a thread of this process, one at a time, with no time budget and no
    way to stop one: for an app of one's own around the route, and for tests of the physics
    through it. A service uses :class:`PredictionPool`."""

    async def run(self, job: dict[str, Any], *, disconnected: Disconnected | None = None) -> Answer:
        """The :class:`Answer` of ``job``, computed in a thread (predictions in this process
        take turns: :data:`model_server.prediction.cache.LOCK`)."""
        return await asyncio.to_thread(answer, job)
