"""A stdio MCP server's stdin and stdout as the two streams the SDK's ClientSession reads and
writes (the SDK's ReadStream and WriteStream protocols), for the bridge.

Why not the SDK's `stdio_client`: it carries each message through a zero-buffer memory stream and
a task of its own on each side (a rendezvous and two task switches a message, both ways). Here a
line read is handed to the session's waiting receive() from the pipe's own callback, and a message
sent is written to the pipe by the session's own task. Measured with the benchmarks' echo server
on the 2-core VM, the bridge's CPU a call fell from 570 to 460 µs (the session's side of a call,
side by side: 1366 -> 1226 µs), and a 10 MB result is read 7 times as fast. The messages are still
the SDK's: parsed by its `jsonrpc_message_adapter` and written by its models' `model_dump_json`,
as `stdio_client` does; the server is started with the SDK's default environment under the
entry's, in a session of its own, and stopped as MCP's lifecycle says (stdin closed, then SIGTERM
to its process group, then SIGKILL).

Where it differs on purpose:
- The server is started by `subprocess` (every descriptor but its stdin, stdout and stderr
  closed), not by the event loop: uvloop's spawn left the worker's own pipes to the host open in
  the server, and copies of the server's stdout, so that a server closing its stdout was never
  seen to.
- What is read ahead of the session is bounded: at most BACKLOG messages and one read's worth of
  lines (the server's stdout is no longer read until the session takes some), and one line of at
  most `line_limit` bytes (the SDK's reader holds any line whole). A longer line is dropped, one
  error in its place.
- At most WRITE_HIGH bytes wait unread in the server's stdin: a message is written only once
  they fit (in the order sent), so a server that never reads makes its senders wait, not the
  worker's memory grow; a send cancelled while it waits was never written.
- A line that is not JSON-RPC is logged in one line, not with a traceback (a server flooding its
  stdout with garbage had its own calls wait behind the formatting: attack pass 47): its length,
  pydantic's kinds of error, and its start, cut only after `redact` (the bridge's: the secrets the
  server was given) has taken them out (pydantic's own message quotes the line's first and last 23
  bytes, pieces of a secret where the cut went through one: attack pass 65). Bytes that are not
  UTF-8 make that line an error, not the end of the connection.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import subprocess
from contextlib import asynccontextmanager, suppress
from typing import Any, AsyncIterator, Callable, cast

import anyio
from mcp import types
from mcp.client.stdio import get_default_environment
from mcp.shared.message import SessionMessage
from pydantic import ValidationError

__all__ = ["BACKLOG", "LINE_LIMIT", "WRITE_HIGH", "ServerLines", "server_pipes"]

log = logging.getLogger("mcp.client.stdio")

LINE_LIMIT = 256 * 1024 * 1024  # bytes of one line (a message): above the host's largest frame
BACKLOG = 64  # messages read and not yet taken by the session before the server's stdout waits
WRITE_HIGH = 64 * 1024  # bytes waiting unread in the server's stdin before a send waits
OUTSTANDING_KEPT = 4096  # ids of requests written and not answered, kept to recognise their answers


class ServerLines(asyncio.Protocol):
    """The server's stdout, a message a line: the session's read stream. Lines are split as they
    arrive and parsed as the session takes them."""

    SHOWN_CHARS = 200  # of a line that is no JSON-RPC, once its secrets are out

    def __init__(self, line_limit: int, redact: Callable[[str], str] = str) -> None:
        self._limit = line_limit
        self._redact = redact
        self._lines: collections.deque[bytes | Exception] = collections.deque()
        self._partial = bytearray()  # the start of a line not yet ended
        self._dropping = False  # in a line over the limit: the rest of it, up to its newline, goes
        self._transport: asyncio.ReadTransport | None = None
        self._paused = False
        self._waiter: asyncio.Future | None = None  # the session's receive(), waiting for a line
        # set when the server's stdout closed (or its stdin broke): nothing more will come. The bridge
        # waits on it too: a server that closed its stdout and lives on would answer nothing, its calls
        # failing until a ping found out
        self.ended = asyncio.Event()
        self._closed = False  # the session is done reading: lines are read and dropped
        self.why_ended = "closed its stdout"
        self.answered_at: float | None = None  # loop time of the server's last answer to a request
        # ids of the requests written to the server and not yet answered (the newest OUTSTANDING_KEPT):
        # only an answer to one of them is an answer (a hung server's thread writing answers to
        # requests nobody sent passed for a busy server: attack pass 67)
        self.outstanding: dict[Any, None] = {}

    # ---- the pipe's side ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.ReadTransport, transport)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return  # read on, so that a server writing as it stops never waits on a full pipe
        start, lines, limit = 0, self._lines, self._limit
        while (end := data.find(b"\n", start)) >= 0:
            end += 1
            if self._dropping:
                self._dropping = False
            elif self._partial:
                self._partial += data[start:end]
                if len(self._partial) > limit:
                    lines.append(self._too_long())
                else:
                    lines.append(bytes(self._partial))
                self._partial = bytearray()
            elif end - start > limit:
                lines.append(self._too_long())
            else:
                lines.append(data[start:end])
            start = end
        if start < len(data) and not self._dropping:
            if len(self._partial) + len(data) - start > limit:
                self._partial, self._dropping = bytearray(), True
                lines.append(self._too_long())
            else:
                self._partial += data[start:]
        if len(lines) >= BACKLOG and not self._paused and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        """End of file (a last line without its newline is no message, as in the SDK)."""
        self.end()

    def end(self, why: str | None = None) -> None:
        if why is not None and not self.ended.is_set():
            self.why_ended = why
        self.ended.set()
        self._wake()

    def _too_long(self) -> ValueError:
        refused = ValueError(f"the server wrote a line of more than {self._limit} bytes; it was dropped")
        log.error("Failed to read a JSONRPC message from server: %s", refused)
        return refused

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---- the session's side -------------------------------------------------------------------

    async def receive(self) -> SessionMessage | Exception:
        line = await self._next_line()
        if isinstance(line, Exception):
            return line
        try:
            message = types.jsonrpc_message_adapter.validate_json(line, by_name=False)
        except ValueError as exc:  # pydantic's ValidationError is one; so is a line not UTF-8
            refused = self._refused(line, exc)
            log.error("Failed to parse JSONRPC message from server: %s", refused)
            return refused
        if isinstance(message, (types.JSONRPCResponse, types.JSONRPCError)) and \
                self.outstanding.pop(message.id, self) is None:
            self.answered_at = asyncio.get_running_loop().time()
        return SessionMessage(message)

    def _refused(self, line: bytes, exc: ValueError) -> ValueError:
        """What is said of a line that is no JSON-RPC: never pydantic's words, which quote it cut."""
        kinds = (", ".join(sorted({error["type"] for error in exc.errors()})) if isinstance(exc, ValidationError)
                 else type(exc).__name__)
        text = " ".join(self._redact(line.decode("utf-8", "replace")).split())
        shown = text if len(text) <= self.SHOWN_CHARS else text[:self.SHOWN_CHARS] + "..."
        return ValueError(f"a line of {len(line)} bytes that is not JSON-RPC ({kinds}): {shown}")

    async def _next_line(self) -> bytes | Exception:
        """The next line as read (or the error in place of one), waiting for it."""
        while not self._lines:
            if self.ended.is_set() or self._closed:
                raise anyio.EndOfStream
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        line = self._lines.popleft()
        if self._paused and len(self._lines) < BACKLOG // 2 and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return line

    async def aclose(self) -> None:
        self._closed = True
        self._lines.clear()
        self._partial = bytearray()
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        self._wake()

    def __aiter__(self) -> ServerLines:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> ServerLines:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()


class ServerInput(asyncio.BaseProtocol):
    """The server's stdin: the session's write stream."""

    def __init__(self, lines: ServerLines) -> None:
        self._lines = lines  # ended when stdin breaks: the session then sees the connection closed
        self._transport: asyncio.WriteTransport | None = None
        self._room = asyncio.Event()  # set while under WRITE_HIGH bytes wait unread
        self._room.set()
        self._order = asyncio.Lock()  # messages go out in the order sent, each only once there is room
        self._broken = False
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writing = cast(asyncio.WriteTransport, transport)  # uvloop's is one, without the class
        writing.set_write_buffer_limits(high=WRITE_HIGH)
        self._transport = writing

    def pause_writing(self) -> None:
        self._room.clear()

    def resume_writing(self) -> None:
        self._room.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._broken = True
        self._room.set()  # the waiting senders find out
        self._lines.end("closed its stdin")  # as the SDK's writer closes the read side: calls waiting fail now

    async def send(self, message: SessionMessage, /) -> None:
        data = message.message.model_dump_json(by_alias=True, exclude_unset=True).encode() + b"\n"
        if isinstance(message.message, types.JSONRPCNotification):
            # at once, past the requests waiting for room: a cancelled call's notifications/cancelled
            # waited behind them, and its worker, not done with the cancel until it was written, was
            # killed cancel_grace later (attack pass 66); small, and one a call at most
            self._write(data)
            return
        async with self._order:
            await self._room.wait()
            self._write(data)
        if isinstance(message.message, types.JSONRPCRequest):
            outstanding = self._lines.outstanding
            outstanding[message.message.id] = None
            if len(outstanding) > OUTSTANDING_KEPT:  # requests never answered (cancelled ones, say)
                del outstanding[next(iter(outstanding))]

    def _write(self, data: bytes) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        transport = self._transport
        if self._broken or transport is None or transport.is_closing():
            raise anyio.BrokenResourceError
        transport.write(data)

    async def aclose(self) -> None:
        self._closed = True  # stdin itself is closed by server_pipes(), as the server is stopped
        self._room.set()

    async def __aenter__(self) -> ServerInput:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()


Connected = tuple[ServerLines, ServerInput, subprocess.Popen]


@asynccontextmanager
async def server_pipes(command: str, args: list[str], env: dict[str, str], cwd: str, stderr: int,
                       stdin_grace: float = 0.5, term_grace: float = 2.0, line_limit: int = LINE_LIMIT,
                       redact: Callable[[str], str] = str) -> AsyncIterator[Connected]:
    """Starts the server and yields (read stream, write stream, process); on the way out stops
    it: stdin closed, `stdin_grace` seconds to exit on its own (MCP's shutdown), then SIGTERM to
    its process group and `term_grace` seconds for the group to go, then SIGKILL to what is left.
    `redact` takes the server's secrets out of a line quoted in the log. OSError (without a file
    name) if it cannot be started."""
    loop = asyncio.get_running_loop()
    stdin_read, stdin_write = os.pipe2(os.O_CLOEXEC)
    stdout_read, stdout_write = os.pipe2(os.O_CLOEXEC)
    try:
        # blocks only until the exec (Popen reads its error pipe): the bridge's own loop, at its start
        process = subprocess.Popen([command, *args], stdin=stdin_read, stdout=stdout_write, stderr=stderr,  # noqa: ASYNC220
                                   env=get_default_environment() | env, cwd=cwd, start_new_session=True,
                                   close_fds=True)
    except OSError as exc:
        for fd in (stdin_write, stdout_read):
            os.close(fd)
        raise OSError(exc.errno, exc.strerror) from None  # the command is the caller's to name
    finally:
        for fd in (stdin_read, stdout_write):
            os.close(fd)
    lines = ServerLines(line_limit, redact)
    sending = ServerInput(lines)
    stdout_transport = stdin_transport = None
    try:
        stdout_transport, _ = await loop.connect_read_pipe(lambda: lines, os.fdopen(stdout_read, "rb", 0))
        stdin_transport, _ = await loop.connect_write_pipe(lambda: sending, os.fdopen(stdin_write, "wb", 0))
        yield lines, sending, process
    finally:
        stopping = asyncio.ensure_future(_stop(process, stdin_transport, stdin_grace, term_grace))
        cancelled = False
        while not stopping.done():  # to its end, however often this task is cancelled meanwhile
            try:
                await asyncio.shield(stopping)
            except asyncio.CancelledError:
                cancelled = True
        for transport in (stdin_transport, stdout_transport):
            if transport is not None:
                transport.close()  # a child of the server's may hold its stdout on: read no more
        if cancelled:
            raise asyncio.CancelledError


async def _stop(process: subprocess.Popen, stdin: asyncio.WriteTransport | None, stdin_grace: float,
                term_grace: float) -> None:
    if stdin is not None:
        stdin.close()  # what was sent goes first, then end of file
    if await _exited(process, stdin_grace):
        return
    if stdin is not None:
        stdin.abort()  # a server that does not read: what it never read is dropped
    if not _signal_group(process, signal.SIGTERM):
        return
    if not await _group_gone(process, term_grace):
        _signal_group(process, signal.SIGKILL)
        await _exited(process, 1.0)


def _signal_group(process: subprocess.Popen, sig: int) -> bool:
    """False if nothing of the group is left to signal."""
    try:
        os.killpg(process.pid, sig)  # its own session: the group's id is its pid
    except ProcessLookupError:
        return False
    except PermissionError:
        with suppress(ProcessLookupError, PermissionError):
            process.send_signal(sig)
    return True


async def _exited(process: subprocess.Popen, timeout: float) -> bool:
    """Whether the server (not its children) has exited, and been reaped, within `timeout`."""
    return await _within(timeout, lambda: process.poll() is not None)


async def _group_gone(process: subprocess.Popen, timeout: float) -> bool:
    """Whether every process of the server's group has gone within `timeout` (the server reaped by
    this process, the others by whoever is their parent, or the PID namespace's init)."""
    def gone() -> bool:
        process.poll()
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False
    return await _within(timeout, gone)


async def _within(timeout: float, done: Callable[[], bool]) -> bool:
    """Whether `done()` comes true within `timeout` seconds, looked at every 10 ms."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not done():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True
