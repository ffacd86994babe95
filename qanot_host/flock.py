"""An exclusive flock() waited for until a deadline, never for good: whoever holds a lock longer is
in the wrong (a workspace file), or is another host (a state_dir)."""

from __future__ import annotations

import fcntl
import time

__all__ = ["flock_within"]


def flock_within(fd: int, seconds: float, poll: float = 0.05) -> bool:
    """True once `fd` holds the exclusive lock; False if someone else still held it after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)
