"""Background threads yield the CPU: :func:`simulations.threads.yield_cpu` lowers the calling
thread's priority alone (not the process's) and never raises it again."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from simulations.threads import BACKGROUND_NICENESS, yield_cpu


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread priorities are Linux's")
def test_a_background_thread_is_lowered_alone() -> None:
    seen: dict[str, int] = {}

    def work() -> None:
        yield_cpu()
        seen["after"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        yield_cpu(niceness=5)  # never raised again
        seen["again"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == {"after": BACKGROUND_NICENESS, "again": BACKGROUND_NICENESS}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main
    assert os.getpriority(os.PRIO_PROCESS, 0) == main
