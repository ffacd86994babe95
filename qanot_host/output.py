"""A worker's stdout and stderr, into the host's log a line at a time, tagged with its plugin's name,
and no faster than the plugin's log_lines_per_second.

A plugin printing in a loop must not fill the host's disk or take its CPU: lines past the rate (a
burst of BURST_SECONDS worth is let through first) are counted, not logged, and the count is logged
within NOTICE_SECONDS, once a second at most. While over the rate, the host reads one pipeful (64
KiB) each time a line may be logged, and drops the rest of it: the pipe fills and the plugin waits
on its own writes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .log_ring import LogRing

__all__ = ["start_output_pumps", "OutputLimit", "MAX_LOG_LINE", "printable", "plain_text", "one_line", "MAX_MESSAGE",
           "for_terminal"]

# A plugin that prints without newlines must not make the host buffer without bound.
MAX_LOG_LINE = 4096
BURST_SECONDS = 10.0
NOTICE_SECONDS = 1.0  # "N lines not logged": within a second of the first, and at most once a second


class OutputLimit:
    """One token bucket per worker, shared by its stdout and stderr."""

    def __init__(self, plugin: str, lines_per_second: float | None) -> None:
        self.plugin = plugin
        self.rate = lines_per_second
        self.capacity = (lines_per_second or 0) * BURST_SECONDS
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self.dropped = 0  # lines not logged, over the plugin's whole life
        self._unreported = 0
        self._reported_at = self._stamp
        self._report_timer: asyncio.TimerHandle | None = None
        self._log = logging.getLogger(f"qanot_host.plugin.{plugin}")
        self.redact: Callable[[str], str] | None = None  # the plugin's secrets out of its lines
        self.ring: LogRing | None = None  # the plugin's recent lines, for `qanot-host logs`
        self.pid: int | None = None  # the worker's, for the log records (--log-format json)
        self._need = 1.0  # tokens the reader waits for: the cost of the last line refused

    def exhausted(self) -> bool:
        """True while not one more line may be logged (one as long as the last refused one)."""
        return self.rate is not None and self._refill() < self._need

    def budget(self) -> int | None:
        """How many lines, at most, may be logged now (each costs a token or more); None: no rate."""
        return None if self.rate is None else max(0, int(self._refill()))

    def until_next(self) -> float:
        """Seconds until one more line may be logged (one as long as the last refused one)."""
        return max(0.01, (self._need - self._tokens) / self.rate) if self.rate else 0.0

    def take(self, line_bytes: int) -> bool:
        """May one line of `line_bytes` be logged now? Each KiB of a line counts as one line more
        (log_lines_per_second counts lines: without this, 4 KiB lines, escaped to 20 KiB, filled a
        rotated log file's whole history in a minute)."""
        if self.rate is None:
            return True
        cost = 1 + line_bytes // 1024
        self._refill()
        if self._tokens >= cost:
            self._tokens -= cost
            self._need = 1.0
            if self._unreported and self._stamp - self._reported_at >= NOTICE_SECONDS:
                # lines flow again: say how many were not logged; once a second at most, or a plugin
                # flooding at the rate had a notice logged after each of its lines (attack pass 49)
                self.report(self._stamp)
            return True
        self._need = min(cost, self.capacity)  # the reader waits for this much before reading on
        self.drop(1)
        return False

    def spend(self, lines: int) -> None:
        """Lines read and not logged, being blank: they cost what a logged line costs (a flood of
        empty lines cost nothing and kept the host splitting 64 KiB of them a read, as fast as the
        plugin wrote: attack pass 40), so the host reads no faster than the rate, as for the rest."""
        if self.rate is None or not lines:
            return
        self._refill()
        # at most one burst's worth owed: a 64 KiB read of blank lines then waits ~2 bursts, not 20 min
        self._tokens = max(self._tokens - lines, -self.capacity)
        self._need = 1.0

    def drop(self, lines: int) -> None:
        """`lines` not logged: counted, and the count said within NOTICE_SECONDS, by a timer: a plugin
        that floods and then goes quiet had its count said only when its worker ended, minutes
        later (attack pass 51)."""
        self.dropped += lines
        self._unreported += lines
        if self._report_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # counted outside the host's loop (a test): said at the next report
                return
            delay = max(0.0, self._reported_at + NOTICE_SECONDS - time.monotonic())
            self._report_timer = loop.call_later(delay, self.report)  # which lets go of the timer

    def _refill(self) -> float:
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * (self.rate or 0))
        self._stamp = now
        return self._tokens

    def report(self, now: float | None = None) -> None:
        if self._report_timer is not None:  # said now (or by the timer itself): nothing left for it to say
            self._report_timer.cancel()
            self._report_timer = None
        if self._unreported:
            self._log.warning("[%s] %d lines of output not logged: over log_lines_per_second=%g", self.plugin,
                              self._unreported, self.rate, extra={"plugin": self.plugin, "pid": self.pid})
            self._unreported = 0
        self._reported_at = now if now is not None else time.monotonic()


def start_output_pumps(plugin: str, stdout: asyncio.StreamReader | None, stderr: asyncio.StreamReader | None,
                       limit: OutputLimit | None = None) -> list[asyncio.Future]:
    limit = limit or OutputLimit(plugin, None)
    log = logging.getLogger(f"qanot_host.plugin.{plugin}")
    return [asyncio.ensure_future(_pump(stdout, log, limit, "stdout")),
            asyncio.ensure_future(_pump(stderr, log, limit, "stderr"))]


# What of a line longer than MAX_LOG_LINE is kept to redact before the cut: a secret that starts
# before the cut ends within it (redacted whole), and nothing after the cut is ever logged, so no tail of
# a secret is either.
REDACT_MARGIN = 64 * 1024


async def _pump(stream: asyncio.StreamReader | None, log: logging.Logger, limit: OutputLimit, kind: str) -> None:
    if stream is None:
        return
    pending = b""
    skipping = False  # inside a line that was cut or dropped: nothing more of it is logged
    try:
        while True:
            if limit.exhausted():
                # Backpressure: while over the rate the pipe is left to fill, and the plugin waits on
                # its writes instead of the host spending its CPU on lines it will not log; nor does
                # the stream read on meanwhile (a plugin writing a byte at a time had the host read
                # each into the stream's buffer: 4 200 reads a second a stream, attack pass 64).
                release = _hold(stream)
                try:
                    await asyncio.sleep(limit.until_next())
                finally:
                    if release is not None:
                        release()
            chunk = await stream.read(65536)
            if not chunk:
                break
            if skipping:  # the rest of a line already cut or dropped: each KiB, or part of one, a read
                end = chunk.find(b"\n")  # costs what a line does (read for nothing at the plugin's
                limit.spend(_kib(len(chunk) if end < 0 else end + 1))  # speed, one line that never ended
                if end < 0:  # took 69% of a core of the host's: attack pass 61; in pieces under a KiB,
                    continue  # the review after it)
                chunk, skipping = chunk[end + 1:], False
            if limit.exhausted():  # still over: count the lines, do not split them; and a part of a
                limit.drop(chunk.count(b"\n") or 1)  # line is never logged (it could start mid-secret)
                pending, skipping = b"", not chunk.endswith(b"\n")
                continue
            if b"\n" not in chunk:  # a piece of a line still to end: each read costs a line (one written
                limit.spend(1)  # a byte at a time was read free up to the cut, a core-second a line:
                # attack pass 63); what it ends as is charged as well, as every line is
            budget = limit.budget()  # split no more lines than may be logged: 64 KiB of "x\n" is 32 768
            lines = (pending + chunk).split(b"\n", -1 if budget is None else budget)  # of them
            pending = lines.pop()
            cut = pending.rfind(b"\n")
            if cut >= 0:  # whole lines past the budget: counted as dropped, never split (the reader
                limit.drop(pending.count(b"\n", 0, cut + 1))  # waits for a token before reading on)
                pending = pending[cut + 1:]
            if len(pending) > MAX_LOG_LINE + REDACT_MARGIN:
                lines.append(pending)  # logged as its head (charged whole); the rest of the line is skipped
                pending, skipping = b"", True
            blank = 0
            for index, line in enumerate(lines):
                if not line.strip():
                    blank += 1
                    continue
                if limit.exhausted():  # the rest of this read dropped at once, not looked at a line
                    limit.drop(len(lines) - index)  # at a time (64 KiB of "x\n" a read kept the host's
                    break  # loop busy at any rate: attack pass 62)
                text = _prepare(limit, line)
                if text and limit.take(max(len(text), len(line))):  # what was read, not only what is logged
                    _log(log, limit, kind, text)
            limit.spend(blank)
        if pending:
            text = _prepare(limit, pending)
            if text and limit.take(max(len(text), len(pending))):
                _log(log, limit, kind, text)
    finally:
        limit.report()


def _hold(stream: asyncio.StreamReader) -> Callable[[], None] | None:
    """Stop `stream`'s transport from reading ahead while the pump waits; the function that lets it
    read again, or None where it could not be (or its reader has paused it already, its buffer full:
    the reader resumes it itself). asyncio's StreamReader keeps its transport and whether it paused
    it in `_transport` and `_paused` (CPython's, which uvloop uses too)."""
    transport = getattr(stream, "_transport", None)
    if transport is None or getattr(stream, "_paused", True) or transport.is_closing():
        return None
    try:
        transport.pause_reading()
    except (AttributeError, RuntimeError):
        return None

    def release() -> None:
        if not transport.is_closing():
            try:
                transport.resume_reading()
            except (AttributeError, RuntimeError):
                pass
    return release


def _kib(size: int) -> int:
    """KiB, a part of one counting as one."""
    return -(-size // 1024)


# Control characters are written as escapes: a plugin must not be able to move the cursor, clear a
# line or start a new one in the host's log and forge what seems to be the host's own line. Beyond
# ASCII's: the C1 controls (U+0085 NEL breaks a line for Python and many viewers, U+009B is an 8-bit
# CSI), the Unicode line and paragraph separators, the bidi controls that reorder what is shown, and
# what shows nothing at all: the zero-width space, word joiner and BOM (a name or an error could hide
# a difference in them: attack pass 61) and the tag characters, in which text invisible to the operator
# reaches a model through a tool's description ("ASCII smuggling"). The zero-width (non-)joiners are
# kept: emoji sequences and Persian and Indic writing need them.
UNSAFE_CODEPOINTS = (*range(0x20), *range(0x7F, 0xA0), 0x061C, 0x200B, 0x200E, 0x200F, 0x2028, 0x2029,
                     *range(0x202A, 0x202F), 0x2060, *range(0x2066, 0x206A), 0xFEFF, *range(0xE0000, 0xE0080))
_CONTROLS = {c: (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" if c < 0x10000 else f"\\U{c:08x}")
             for c in UNSAFE_CODEPOINTS if c != 0x09}
_NOT_IN_TEXT = {c: None for c in UNSAFE_CODEPOINTS if c not in (0x09, 0x0A)}
_ON_TERMINAL = {c: escaped for c, escaped in _CONTROLS.items() if c != 0x0A}
_NOT_IN_LINE = {c: None for c in UNSAFE_CODEPOINTS}


def for_terminal(text: str) -> str:
    """A plugin's result as a terminal shows it: lines and tabs kept, every other control character
    escaped (a result's ESC sequences recoloured, moved the cursor or retitled the operator's
    terminal: attack pass 49)."""
    return text.translate(_ON_TERMINAL)


def plain_text(text: str) -> str:
    """A plugin's text for a file, a tool description or the agent's prompt: newlines and tabs kept,
    every other control character and bidi override taken out."""
    return text.translate(_NOT_IN_TEXT)


def one_line(text: str) -> str:
    """A plugin's name, category or command: no control characters, no line breaks of any kind."""
    return text.translate(_NOT_IN_LINE)


MAX_MESSAGE = 8 * 1024  # a worker's error message, as the host keeps, logs and returns it


def printable(text: str, limit: int = MAX_MESSAGE) -> str:
    """A worker's text made safe for the host's log and a caller: control characters escaped (no
    forged line can start), at most `limit` characters."""
    if len(text) > limit:
        text = f"{text[:limit]}... [{len(text) - limit} more characters]"
    return text.translate(_CONTROLS)


def _prepare(limit: OutputLimit, line: bytes) -> str:
    """A line as it is logged: secrets out (before the cut: a secret across it would leak its start),
    at most MAX_LOG_LINE characters, control characters escaped."""
    text = line.decode("utf-8", errors="replace").rstrip()
    if limit.redact is not None:
        text = limit.redact(text)
    return text[:MAX_LOG_LINE].translate(_CONTROLS)


# The level a plugin's own logging wrote at the front of its line: "INFO:name:message" (the logging
# module's default), "INFO name: message", "[INFO] message", "2026-11-27 10:00:00,123 INFO ...". Every
# stderr line was a WARNING, so a plugin's routine INFO lines and a server's start-up banner filled
# the host's warnings (a tester of 11-27). Read in the line's first 80 characters, anchored.
_LEVEL_AT_START = re.compile(r"[\[\s]*(?:\d[\d:.,TZ+ -]*\s)?[\[(]?(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL)\b")
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "WARN": logging.WARNING,
           "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL, "FATAL": logging.CRITICAL}


def line_level(kind: str, text: str) -> int:
    """The level a plugin's output line is logged at: the one it names at its start, else WARNING
    for stderr and INFO for stdout."""
    named = _LEVEL_AT_START.match(text[:80])
    if named is not None:
        return _LEVELS[named.group(1)]
    return logging.WARNING if kind == "stderr" else logging.INFO


def _log(log: logging.Logger, limit: OutputLimit, kind: str, text: str) -> None:
    if limit.ring is not None:
        limit.ring.append(kind, text)
    log.log(line_level(kind, text), "[%s %s] %s", limit.plugin, kind, text,
            extra={"plugin": limit.plugin, "pid": limit.pid, "stream": kind})
