"""Programs the host runs itself (uv, mkfs): they die with it.

The workers, the worker template and the namespaces' inits die with the host by PR_SET_PDEATHSIG
(set in our own code, in them). A program of someone else's cannot set it, and uv, killed with
nothing, went on under PID 1 after the host's SIGKILL, holding its index connection and a
`.building` environment, another one for each start of the host (attack pass 61). It is set in the
child between fork and exec, where it survives the exec (the signal is the parent thread's death:
these are started from the host's event loop, its main thread).
"""

from __future__ import annotations

import ctypes
import os
import signal
from typing import Callable

__all__ = ["die_with_host"]

PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it


def die_with_host() -> Callable[[], None]:
    """A preexec_fn for asyncio.create_subprocess_exec: SIGKILL when the host goes, and not even
    started when it went before this (the race PR_SET_PDEATHSIG leaves open)."""
    host_pid = os.getpid()

    def in_child() -> None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != host_pid:
            os._exit(1)
    return in_child
