"""Background threads that yield the CPU to the live path.

Work that nobody waits for (the planner's refresh of its nodes, a refinement's background
scan) runs on threads whose scheduling priority is lowered, so that on a machine with few
cores the chunk's fold, its estimate and the advice are not slowed by it. Work that a
later step may wait for (an orientation's preparation, which its close takes, the moments'
writer, which a clean stop waits for) keeps the process's priority: a thread at niceness
19 gets ~1.5 % of a core that a busy process also wants, so whoever waits for it would
wait for a long time. Linux schedules a process's threads on their own (a thread id is a
task id for ``setpriority``); elsewhere, or where the system refuses, a thread keeps the
process's priority.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

__all__ = ["BACKGROUND_NICENESS", "yield_cpu"]

logger = logging.getLogger(__name__)

#: Niceness of a background thread (the lowest priority: it takes the CPU the rest leaves).
BACKGROUND_NICENESS = 19


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
