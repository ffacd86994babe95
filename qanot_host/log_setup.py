"""Where the command's logs go and how they look: stderr, and a rotated file if asked; as text, or one
JSON object a line for whatever collects them (journald, Loki, a container runtime).

Plugin output lines carry the plugin's name either way: in text as `[NAME stdout]`, in JSON as
`plugin` (with the worker's `pid` and the `stream`).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
from datetime import datetime, timezone

__all__ = ["configure_logging", "JsonFormatter", "LOG_FILE_BYTES", "LOG_FILES_KEPT"]

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
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)  # a file that was there before keeps no wider mode
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)


def configure_logging(level: str, log_format: str = "text", log_file: str | None = None) -> None:
    """stderr at `level`, and `log_file` (rotated at LOG_FILE_BYTES, LOG_FILES_KEPT kept) too.
    OSError if the file cannot be opened."""
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(PrivateRotatingFileHandler(log_file, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILES_KEPT,
                                                   encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=handlers, force=True)
