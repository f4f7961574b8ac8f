"""The advisor's next orientation onto a bluesky-queueserver queue.

:class:`QueueSink` is an advice sink (:data:`steering.loop.AdviceSink`): for each advice
whose state is ``"measuring"`` and that suggests a next orientation
(:func:`steering.advisor.advice.next_orientation`) it puts a plan item on the queue of an
RE Manager, as bluesky-adaptive's queue-based agents do (``REManagerAPI.item_add`` of a
``BPlan``), over 0MQ with bluesky-queueserver-api. By default the item is
``steer_count_at(omega=..., count_time=...)`` (:func:`steering.advisor.plans.count_at_plan`,
to be defined in the RE Manager's profile collection).

Rules, per advice:

* ``"paused"`` or ``"done"``: nothing is added, and a still-pending item of this sink is
  taken off the queue (the suggestion it carries no longer stands);
* ``"waiting"``, or no next orientation: nothing;
* the same suggestion (same run, same advice count, same plan arguments) as one submitted
  before, or the same plan arguments as this sink's item still pending or running: nothing
  (a duplicate);
* a still-pending item of this sink (not yet started): replaced in place by the new one
  (``item_update``), so that suggestions never pile up;
* else the item is added at the back of the queue.

This sink's items are known by their ``user`` (``"steer advisor"`` by default) and the
``steer`` key of their ``meta`` (run id, advice count, source, who forced it); items of
people or other agents are never touched. Errors (the RE Manager unreachable, an item
rejected) are logged and counted (:attr:`QueueSink.counts`, the
``steer_queue_submissions_total`` metric) and never raised to the steering loop.

With :meth:`QueueSink.start` the submissions run on a thread: the loop only hands the
advice over (a newer advice supersedes one not yet submitted, counted as
``"superseded"``); without it, each call submits at once (what the tests step through).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Mapping
from typing import Any, Protocol

from steering import metrics
from steering.advisor.advice import advice_state, next_orientation

__all__ = ["DEFAULT_PLAN", "QueueManager", "QueueSink"]

logger = logging.getLogger(__name__)

#: the plan the sink queues by default (:func:`steering.advisor.plans.count_at_plan`)
DEFAULT_PLAN = "steer_count_at"


class QueueManager(Protocol):
    """What the sink asks of an RE Manager: the part of
    ``bluesky_queueserver_api.zmq.REManagerAPI`` it uses (requests that fail raise)."""

    def queue_get(self, *, reload: bool = False) -> dict[str, Any]:
        """``{"items": [...], "running_item": {...}, ...}``."""
        ...

    def item_add(self, item: Any, *, user: str | None = None, user_group: str | None = None) -> Any:
        """Add an item at the back of the queue."""
        ...

    def item_update(
        self,
        item: Any,
        *,
        replace: bool | None = None,
        user: str | None = None,
        user_group: str | None = None,
    ) -> Any:
        """Replace the queued item with the same ``item_uid``."""
        ...

    def item_remove(self, *, uid: str | None = None) -> Any:
        """Remove a queued item."""
        ...

    def queue_autostart(self, enable: bool) -> Any:
        """Start the queue by itself whenever it holds items (and the environment is open)."""
        ...


class QueueSink:
    """Puts the advice's next orientation on a bluesky-queueserver queue (module docstring).

    Parameters
    ----------
    manager
        The RE Manager's API (``REManagerAPI``); :meth:`connect` makes one from an address.
    plan
        Name of the plan to queue (defined in the RE Manager's profile collection).
    plan_kwargs
        Further keyword arguments of every item (JSON-ready).
    omega_kwarg
        The plan's keyword for the angle (degrees).
    count_time_kwarg
        The plan's keyword for the count time (seconds), given when the advice or
        ``count_time`` has one; None: never given.
    count_time
        Seconds to count where the advice gives no ``count_time_s`` (None: the plan's
        default).
    autostart
        Switch the queue's autostart on at the first contact, so that an added item runs
        without anyone pressing start.
    user, user_group
        Who the items are submitted as (the group must be allowed the plan).
    """

    def __init__(
        self,
        manager: QueueManager,
        *,
        plan: str = DEFAULT_PLAN,
        plan_kwargs: Mapping[str, Any] | None = None,
        omega_kwarg: str = "omega",
        count_time_kwarg: str | None = "count_time",
        count_time: float | None = None,
        autostart: bool = False,
        user: str = "steer advisor",
        user_group: str = "primary",
    ) -> None:
        self.manager = manager
        self.plan = plan
        self.plan_kwargs = dict(plan_kwargs or {})
        self.omega_kwarg = omega_kwarg
        self.count_time_kwarg = count_time_kwarg
        self.count_time = None if count_time is None else float(count_time)
        self.autostart = bool(autostart)
        self.user = user
        self.user_group = user_group
        #: outcomes so far: added, replaced, duplicate, withdrawn, skipped, rejected,
        #: unreachable, superseded
        self.counts: Counter[str] = Counter()
        #: the suggestions submitted lately (run, advice count, plan, arguments), oldest first
        self._submitted: dict[str, None] = {}
        self._autostart_set = False
        self._lock = threading.Lock()
        self._wake = threading.Condition()
        self._mailbox: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    @classmethod
    def connect(cls, address: str, *, timeout_s: float = 2.0, **kwargs: Any) -> QueueSink:
        """A sink on the RE Manager's 0MQ control address (``tcp://host:60615``); the
        keyword arguments are the sink's. Nothing is sent until the first advice."""
        from bluesky_queueserver_api.zmq import REManagerAPI

        manager = REManagerAPI(zmq_control_addr=address, timeout_recv=timeout_s)
        return cls(manager, **kwargs)

    # -- the advice sink ---------------------------------------------------------------------

    def __call__(self, advice: dict[str, Any]) -> None:
        """Hand one advice over: to the thread when started, else submitted at once."""
        if self._thread is None:
            self.submit(advice)
            return
        with self._wake:
            if self._mailbox is not None:
                self._count("superseded")
            self._mailbox = advice
            self._wake.notify()

    def submit(self, advice: Mapping[str, Any]) -> str:
        """Act on one advice now (the rules of the module docstring); returns the outcome
        (a key of :attr:`counts`). Never raises for the RE Manager's errors."""
        with self._lock:
            try:
                outcome = self._submit(advice)
            except Exception as exc:
                outcome = self._failure(exc)
        self._count(outcome)
        return outcome

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> QueueSink:
        """Submit on a thread from now on (the loop never waits for the RE Manager)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="queue-sink", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Submit what was handed over, stop the thread and close the connection."""
        thread = self._thread
        if thread is not None:
            with self._wake:
                self._stopping = True
                self._wake.notify()
            thread.join(timeout)
            self._thread = None
        close = getattr(self.manager, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> QueueSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wake:
                while self._mailbox is None and not self._stopping:
                    self._wake.wait()
                advice, self._mailbox = self._mailbox, None
                stopping = self._stopping
            if advice is not None:
                self.submit(advice)
            if stopping:
                return

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        metrics.QUEUE_SUBMISSIONS.labels(outcome=outcome).inc()

    def _failure(self, exc: Exception) -> str:
        """Log an error of the RE Manager; 'unreachable' (no answer) or 'rejected'."""
        if isinstance(exc, TimeoutError):  # RequestTimeoutError: no answer in time
            logger.warning(
                "the RE Manager did not answer (%s): no orientation queued; is "
                "start-re-manager running at that address?",
                exc,
            )
            self._autostart_set = False  # a restarted manager needs it again
            return "unreachable"
        logger.warning("the RE Manager refused the advisor's item: %s", exc)
        return "rejected"

    def _kwargs(self, omega: float, count_time_s: float | None) -> dict[str, Any]:
        kwargs = dict(self.plan_kwargs)
        kwargs[self.omega_kwarg] = round(float(omega), 6)
        count_time = count_time_s if count_time_s is not None else self.count_time
        if self.count_time_kwarg is not None and count_time is not None:
            kwargs[self.count_time_kwarg] = float(count_time)
        return kwargs

    def _remember(self, key: str, keep: int = 1000) -> None:
        """Remember a suggestion as submitted (the latest ``keep`` of them)."""
        self._submitted[key] = None
        while len(self._submitted) > keep:
            del self._submitted[next(iter(self._submitted))]

    def _ours(self, item: Mapping[str, Any] | None) -> bool:
        """An item this sink submitted (its user, and the ``steer`` key in its meta)."""
        if not item or item.get("user") != self.user:
            return False
        return "steer" in (item.get("meta") or {})

    def _submit(self, advice: Mapping[str, Any]) -> str:
        from bluesky_queueserver_api import BPlan

        state = advice_state(advice)
        nxt = next_orientation(advice)
        if state in ("paused", "done"):
            queue = self.manager.queue_get(reload=True)
            pending = [i for i in queue.get("items", []) if self._ours(i)]
            for item in pending:
                self.manager.item_remove(uid=item["item_uid"])
            if pending:
                logger.info(
                    "steering %s: took %d advisor item(s) off the queue", state, len(pending)
                )
                return "withdrawn"
            return "skipped"
        if state != "measuring" or nxt is None:
            return "skipped"
        kwargs = self._kwargs(nxt.omega, nxt.count_time_s)
        run_id = str(advice.get("run_id", ""))
        n = advice.get("n_orientations")
        key = json.dumps([run_id, n, self.plan, kwargs], sort_keys=True)
        if key in self._submitted:
            return "duplicate"
        if self.autostart and not self._autostart_set:
            self.manager.queue_autostart(True)
            self._autostart_set = True
        queue = self.manager.queue_get(reload=True)
        pending = [i for i in queue.get("items", []) if self._ours(i)]
        running = queue.get("running_item") or None
        same = [
            i
            for i in [*pending, *([running] if self._ours(running) else [])]
            if i.get("name") == self.plan and i.get("kwargs") == kwargs
        ]
        if same:
            self._remember(key)
            return "duplicate"
        meta = {
            "steer": {
                "run_id": run_id,
                "n_orientations": n,
                "source": nxt.source,
                "by": nxt.by,
            }
        }
        item = BPlan(self.plan, **kwargs)
        item.meta = meta
        if pending:
            target, *extra = pending
            item.item_uid = target["item_uid"]
            self.manager.item_update(item, replace=True, user=self.user, user_group=self.user_group)
            for other in extra:  # more than one of ours pending: keep only the newest
                self.manager.item_remove(uid=other["item_uid"])
            outcome = "replaced"
        else:
            self.manager.item_add(item, user=self.user, user_group=self.user_group)
            outcome = "added"
        self._remember(key)
        logger.info(
            "queued %s(%s) for run %s after %s orientations (%s)",
            self.plan,
            ", ".join(f"{k}={v!r}" for k, v in kwargs.items()),
            run_id,
            n,
            outcome,
        )
        return outcome
