"""Where the command's logs go and how they look: stderr, and a rotated file if asked; as text, or one
JSON object a line for whatever collects them (journald, Loki, a container runtime).

Plugin output lines carry the plugin's name either way: in text as `[NAME stdout]`, in JSON as
`plugin` (with the worker's `pid` and the `stream`).
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import logging.handlers
import os
import queue
import stat
import sys
from datetime import datetime, timezone

from .safe_files import unsafe_directory

__all__ = ["configure_logging", "flush_logs", "JsonFormatter", "LOG_FILE_BYTES", "LOG_FILES_KEPT"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FILE_BYTES = 10 * 2**20
LOG_FILES_KEPT = 5
PLUGIN_LOGGER = "qanot_host.plugin."  # + the plugin's name: its stdout and stderr


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, plugin (when the record is a
    plugin's), pid (the worker's for its output, else the host's), event, and stream for output lines."""

    def format(self, record: logging.LogRecord) -> str:
        plugin = getattr(record, "plugin", None)
        if plugin is None and record.name.startswith(PLUGIN_LOGGER):
            plugin = record.name[len(PLUGIN_LOGGER):]
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "plugin": plugin,
            "pid": getattr(record, "pid", None) or os.getpid(), "event": record.getMessage()}
        stream = getattr(record, "stream", None)
        if stream is not None:
            entry["stream"] = stream
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Rotated log files only their owner can read (mode 0600): plugins' output is in them."""

    def _open(self):
        """The file is the host's own, in a directory of its own, or refused: a log file in a place
        others may write (/tmp) may have been planted there, as a symlink or a hard link to a file of
        root's (that took a chmod and the host's log), or as a file its planter keeps reading, and
        a directory of theirs on the way (or their symlink) leads the host's writes and rotations
        wherever they like."""
        unsafe = unsafe_directory(os.path.dirname(self.baseFilename))  # checked again at each rotation
        if unsafe:
            raise OSError(errno.EPERM, f"its directory {unsafe}")
        try:
            fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OSError(errno.ELOOP, "a symlink: refused") from None
            if exc.errno == errno.ENXIO:  # a FIFO with no reader (with one, fstat tells)
                raise OSError(errno.ENXIO, "not a regular file: refused") from None
            raise
        try:
            info = os.fstat(fd)
            problem = ("not a regular file" if not stat.S_ISREG(info.st_mode)
                       else f"owned by uid {info.st_uid}, not by this host's user" if info.st_uid != os.geteuid()
                       else "it has other names (hard links)" if info.st_nlink > 1 else "")
            if problem:
                raise OSError(errno.EPERM, f"{problem}: refused")
            os.fchmod(fd, 0o600)  # a file that was there before keeps no wider mode
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)


def configure_logging(level: str, log_format: str = "text", log_file: str | None = None) -> None:
    """stderr at `level`, and `log_file` (rotated at LOG_FILE_BYTES, LOG_FILES_KEPT kept) too.
    OSError if the file cannot be opened.

    Records are written by a thread of their own, never by the caller: a stderr nobody reads (an MCP
    client that keeps the pipe and never drains it) once froze the host's event loop on a full pipe,
    every plugin with it. When the writer falls QUEUED records behind, records are dropped and counted
    (said in the log once it is read again)."""
    global _listener
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(PrivateRotatingFileHandler(log_file, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILES_KEPT,
                                                   encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
    if _listener is not None:
        _listener.stop()
    records: queue.Queue[logging.LogRecord] = queue.Queue(QUEUED)
    _listener = _Writer(records, *handlers)
    _listener.start()
    logging.basicConfig(level=level.upper(), handlers=[_Enqueue(records)], force=True)


QUEUED = 10_000  # records waiting for the writer thread, at most
_listener: "_Writer | None" = None


class _Enqueue(logging.handlers.QueueHandler):
    """Hands the record to the writer thread as it is (its exception kept for the JSON formatter),
    never waiting: a full queue drops it, and the writer says how many went."""

    def __init__(self, records: queue.Queue) -> None:
        super().__init__(records)
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.msg, record.args = record.getMessage(), None  # its arguments may change once it is queued
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            if _listener is not None:
                _listener.dropped += 1


class _Writer(logging.handlers.QueueListener):
    def __init__(self, records: queue.Queue, *handlers: logging.Handler) -> None:
        super().__init__(records, *handlers, respect_handler_level=True)
        self.dropped = 0
        self._told = 0

    def handle(self, record: logging.LogRecord) -> None:
        if self.dropped != self._told:
            missed, self._told = self.dropped - self._told, self.dropped
            super().handle(logging.makeLogRecord({
                "name": "qanot_host", "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": f"{missed} log records were dropped: the log's reader fell {QUEUED} records behind"}))
        super().handle(record)

    def stop(self) -> None:
        """What is queued is written, for at most STOP_SECONDS (a reader that never reads must not
        keep the process from ending)."""
        if self._thread is None:
            return
        try:
            self.queue.put_nowait(None)  # QueueListener's sentinel
        except queue.Full:
            pass
        self._thread.join(STOP_SECONDS)
        if self._thread.is_alive():  # stuck writing to a reader that is not there: leave it behind
            for handler in self.handlers:
                handler.createLock()  # logging's own shutdown would wait on the stuck thread's
                if isinstance(handler, logging.StreamHandler):
                    handler.stream = open(os.devnull, "w")  # noqa: SIM115 - closed by logging at exit
        self._thread = None


STOP_SECONDS = 2.0


@atexit.register
def flush_logs() -> None:
    """What is queued is written (for at most STOP_SECONDS); at exit, and before an os._exit."""
    if _listener is not None:
        _listener.stop()
