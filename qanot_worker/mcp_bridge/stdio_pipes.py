"""A stdio MCP server's stdin and stdout as the two streams the SDK's ClientSession reads and
writes (the SDK's ReadStream and WriteStream protocols), for the bridge.

Why not the SDK's `stdio_client`: it carries each message through a zero-buffer memory stream and
a task of its own on each side (a rendezvous and two task switches a message, both ways). Here a
line read is parsed and handed to the session's waiting receive() at once, and a message sent is
written to the pipe by the session's own task. Measured side by side on the 2-core VM with the
benchmarks' echo server: 1366 -> 1226 µs a call (client CPU 444 -> 357 µs): what the call's hop
through the host costs is paid back. The messages are still the SDK's: parsed by its
`jsonrpc_message_adapter` and written by its models' `model_dump_json`, as `stdio_client` does;
the server is started as `stdio_client` starts it (its own session, the SDK's default
environment under the entry's), and stopped as MCP's lifecycle says (stdin closed, then SIGTERM
to its process group, then SIGKILL).

Where it differs on purpose: a line longer than LINE_LIMIT is dropped with an error in its place
(the SDK's reader buffers any line whole, however long), and a line that is not JSON-RPC is
logged in one line, not with a traceback (a server flooding its stdout with garbage had its own
calls wait behind the formatting: attack pass 47).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
from contextlib import asynccontextmanager, suppress
from typing import Any, AsyncIterator

import anyio
from mcp import types
from mcp.client.stdio import get_default_environment
from mcp.shared.message import SessionMessage

__all__ = ["LINE_LIMIT", "server_pipes"]

log = logging.getLogger("mcp.client.stdio")

LINE_LIMIT = 256 * 1024 * 1024  # bytes of one line (a message): above the host's largest frame
BACKLOG = 64  # messages read and not yet taken by the session before the server's stdout waits
WRITE_HIGH = 64 * 1024  # bytes queued for the server's stdin before a send waits for it to read


class ServerLines:
    """The server's stdout, a message a line: the session's read stream."""

    def __init__(self, stdout: asyncio.StreamReader, line_limit: int) -> None:
        self._stdout = stdout
        self._line_limit = line_limit  # the stream's own: readline() raises ValueError past it
        self._items: collections.deque[SessionMessage | Exception] = collections.deque()
        self._waiter: asyncio.Future | None = None  # the session's receive(), waiting for a line
        self._room: asyncio.Future | None = None  # the pump, waiting for the session to take some
        self._ended = False  # the server's stdout closed: nothing more will come
        self.ended = asyncio.Event()  # ...for whoever waits on it (the bridge: a server that closed
        # its stdout and lives on would answer nothing, its calls failing until a ping found out)
        self._closed = False  # the session is done reading: lines are read and dropped

    async def pump(self) -> None:
        """Reads until the server's stdout ends, the session closed or not, so that a server
        writing as it stops never waits on a full pipe."""
        readline, parse = self._stdout.readline, types.jsonrpc_message_adapter.validate_json
        try:
            while True:
                try:
                    line = await readline()
                except ValueError:  # longer than the stream's limit: what was read of it is gone
                    if not self._closed:
                        self._put(ValueError(f"the server wrote a line of more than {self._line_limit} "
                                             "bytes; it was dropped"))
                    continue
                if not line.endswith(b"\n"):
                    return  # end of file (a last line without its newline is no message, as in the SDK)
                if self._closed:
                    continue
                try:
                    item: SessionMessage | Exception = SessionMessage(parse(line, by_name=False))
                except ValueError as exc:  # pydantic's ValidationError is one
                    log.error("Failed to parse JSONRPC message from server: %s", str(exc)[:300])
                    item = exc
                self._put(item)
                if len(self._items) >= BACKLOG:
                    self._room = asyncio.get_running_loop().create_future()
                    await self._room
        finally:
            self._ended = True
            self.ended.set()
            self._wake()

    def _put(self, item: SessionMessage | Exception) -> None:
        self._items.append(item)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def receive(self) -> SessionMessage | Exception:
        while not self._items:
            if self._ended or self._closed:
                raise anyio.EndOfStream
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        room = self._room
        if room is not None and len(self._items) < BACKLOG // 2 and not room.done():
            room.set_result(None)
        return item

    async def aclose(self) -> None:
        self._closed = True
        self._items.clear()
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)
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


class ServerInput:
    """The server's stdin: the session's write stream. A message is written by the task that
    sends it; past WRITE_HIGH bytes unread by the server, the sender waits for it to read."""

    def __init__(self, stdin: asyncio.StreamWriter) -> None:
        self._stdin = stdin
        self._closed = False

    async def send(self, message: SessionMessage, /) -> None:
        stdin = self._stdin
        if self._closed or stdin.is_closing():
            raise anyio.ClosedResourceError if self._closed else anyio.BrokenResourceError
        data = message.message.model_dump_json(by_alias=True, exclude_unset=True).encode() + b"\n"
        try:
            stdin.write(data)
            if stdin.transport.get_write_buffer_size() > WRITE_HIGH:
                await stdin.drain()
        except (OSError, RuntimeError) as exc:  # the server's stdin closed: it is gone, or going
            raise anyio.BrokenResourceError from exc

    async def aclose(self) -> None:
        self._closed = True  # stdin itself is closed by server_pipes(), as the server is stopped

    async def __aenter__(self) -> ServerInput:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()


Connected = tuple[ServerLines, ServerInput, asyncio.subprocess.Process]


@asynccontextmanager
async def server_pipes(command: str, args: list[str], env: dict[str, str], cwd: str, stderr: int,
                       stdin_grace: float = 0.5, term_grace: float = 2.0,
                       line_limit: int = LINE_LIMIT) -> AsyncIterator[Connected]:
    """Starts the server and yields (read stream, write stream, process); on the way out stops
    it: stdin closed, `stdin_grace` seconds to exit on its own (MCP's shutdown), then SIGTERM to
    its process group and `term_grace` seconds, then SIGKILL. OSError if it cannot be started."""
    process = await asyncio.create_subprocess_exec(
        command, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
        env=get_default_environment() | env, cwd=cwd, start_new_session=True, limit=line_limit)
    assert process.stdin is not None and process.stdout is not None
    lines, sending = ServerLines(process.stdout, line_limit), ServerInput(process.stdin)
    pump = asyncio.create_task(lines.pump())
    try:
        yield lines, sending, process
    finally:
        try:
            await asyncio.shield(_stop(process, stdin_grace, term_grace))  # to its end, even when cancelled
        finally:
            if not pump.done():  # a child of the server's may hold its stdout open
                pump.cancel()


async def _stop(process: asyncio.subprocess.Process, stdin_grace: float, term_grace: float) -> None:
    assert process.stdin is not None
    with suppress(OSError, RuntimeError):
        process.stdin.close()
    if await _exited(process, stdin_grace):
        return
    for sig, grace in ((signal.SIGTERM, term_grace), (signal.SIGKILL, 1.0)):
        try:
            os.killpg(process.pid, sig)  # its own session: the group's id is its pid
        except ProcessLookupError:
            return
        except PermissionError:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(process.pid, sig)
        if await _exited(process, grace):
            return


async def _exited(process: asyncio.subprocess.Process, timeout: float) -> bool:
    """By its return code, not process.wait(), which also waits for its pipes to close (a child
    that inherited them would make an exited server look hung)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while process.returncode is None:
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True
