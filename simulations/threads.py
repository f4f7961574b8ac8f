"""Background threads that yield the CPU to the live path.

Work that is not waited for (an orientation's coverage and moments prepared while it
counts, the run's moments saved beside the checkpoint, the candidates' coverages, the
planner's nodes, a refinement's background scan) runs on threads whose scheduling priority
is lowered, so that on a machine with few cores the chunk's fold, its estimate and the
advice are not slowed by it. Linux schedules a process's threads on their own (a thread id
is a task id for ``setpriority``); elsewhere, or where the system refuses, a thread keeps
the process's priority.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

__all__ = ["BACKGROUND_NICENESS", "WAITED_NICENESS", "yield_cpu"]

logger = logging.getLogger(__name__)

#: Niceness of a background thread (the lowest priority: it takes the CPU the rest leaves).
BACKGROUND_NICENESS = 19
#: Niceness of work that the run's first advice waits for (the candidates' coverages, the
#: planner's nodes): below the live path, above the work nobody waits for.
WAITED_NICENESS = 10


def yield_cpu(niceness: int = BACKGROUND_NICENESS) -> None:
    """Lower the calling thread's scheduling priority to ``niceness`` (never raise it);
    usable as a :class:`~concurrent.futures.ThreadPoolExecutor` ``initializer``."""
    if sys.platform != "linux":  # a thread id is a task for setpriority on Linux alone
        return
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
            os.setpriority(os.PRIO_PROCESS, tid, niceness)
    except (AttributeError, OSError) as exc:
        logger.debug(
            "thread %s keeps the process's priority: %s", threading.current_thread().name, exc
        )
