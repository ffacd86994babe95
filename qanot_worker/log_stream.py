"""The worker's log records (its own, and those plugins write with `logging`) onto stderr without ever
blocking the event loop.

The host reads a plugin's output no faster than its log_lines_per_second allows, so the pipe behind
stderr fills when a plugin logs more than that. A plain StreamHandler then blocks in write(2) inside
the event loop: a tool failing 5000 times a second, each failure's traceback logged, stopped its worker
answering pings, and the host killed it as unresponsive. This handler writes through a description of
its own of the same pipe, opened non-blocking (so a plugin's own print() keeps its blocking stream),
and a record that does not fit now is counted and dropped; the count is written with the next record
that fits.
"""

from __future__ import annotations

import logging
import os
import stat

__all__ = ["install_log_stream"]

# A pipe write of at most PIPE_BUF bytes is all or nothing: each line is written whole or not at all,
# so a dropped record never leaves half a line for the next one to be glued to.
PIPE_BUF = 4096
FORMAT = "%(levelname)s %(name)s: %(message)s"


class NonBlockingStderr(logging.Handler):
    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - logging's own contract: a bad record is reported, not raised
            self.handleError(record)
            return
        if self.dropped and self._write_line(f"WARNING qanot_worker: {self.dropped} log records not written: "
                                             f"logged faster than the host reads them"):
            self.dropped = 0
        for line in text.split("\n"):
            if not self._write_line(line):
                self.dropped += 1
                return

    def _write_line(self, line: str) -> bool:
        data = line.encode("utf-8", "backslashreplace")[:PIPE_BUF - 1] + b"\n"
        try:
            os.write(self.fd, data)
        except BlockingIOError:
            return False
        except OSError:  # the host closed its end: nothing left to tell
            return False
        return True


def install_log_stream() -> None:
    """Route the root logger to stderr: non-blocking when stderr is a pipe (as the host makes it),
    a plain stream otherwise (a worker run by hand on a terminal)."""
    handler: logging.Handler
    try:
        if not stat.S_ISFIFO(os.fstat(2).st_mode):
            raise OSError("stderr is not a pipe")
        # A new open file description of the same pipe: O_NONBLOCK on it leaves fd 2's alone. Opened
        # before the sandbox goes up (the worker's own /proc and Landlock come after).
        handler = NonBlockingStderr(os.open("/proc/self/fd/2", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
    except OSError:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
