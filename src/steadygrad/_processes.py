"""Worker processes that die with the process that started them, however it dies (SIGKILL included).

A worker calls ``die_with_parent(parent_pid)`` first thing (a pool's initializer). On Linux the kernel sends it
SIGKILL when its parent exits (``prctl(PR_SET_PDEATHSIG)``); everywhere a daemon thread also checks every
``POLL_SECONDS`` that its parent is still the one that started it (an orphan is re-parented to init or a
subreaper), for the platforms without the signal and for a parent thread that exits before the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

__all__ = ["POLL_SECONDS", "die_with_parent"]

POLL_SECONDS = 0.5
_PR_SET_PDEATHSIG = 1


def _watch(parent: int) -> None:
    while True:
        time.sleep(POLL_SECONDS)
        if os.getppid() != parent:
            os._exit(1)


def die_with_parent(parent: int, *, ignore_interrupt: bool = True) -> None:
    """Make this process exit when ``parent`` (the pid that started it) dies.

    With ``ignore_interrupt`` Ctrl-C's SIGINT, which a terminal sends to the whole process group, is left to the
    parent: it stops the pool itself, and a worker interrupted mid-run would only report a spurious failure.
    """
    if ignore_interrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the signal was set
        os._exit(1)
    threading.Thread(target=_watch, args=(parent,), name="steadygrad-parent-watch", daemon=True).start()
