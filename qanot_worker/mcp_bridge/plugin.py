"""One MCP server as a plugin: its tools offered through the worker protocol like any plugin's.

The host runs this plugin, in a worker of the server's own name, for each `mcp_servers` entry of
config.json. For a stdio entry the server is this worker's child: it inherits every layer of the
worker's sandbox (uid, root, namespaces, cgroup, seccomp, Landlock: its command, the interpreter it
names and their loader are all it may execute by name), and it dies with the worker's PID
namespace, so it can never outlive the host. For a remote entry (`sse`, `http`) this worker is the
client, granted that one address.

The worker's life is the connection's: if the server exits, stops answering MCP pings or the
connection drops, the worker exits, and the host's supervisor restarts it (policy, backoff,
intensity) as it would a crashed plugin. Everything MCP is the official SDK's (client session,
messages, remote transports, cancellation); a stdio server's pipes are the session's streams
directly (stdio_pipes.py, for speed), and nothing here speaks JSON-RPC.
"""

import asyncio
import json
import os
import re
import select
import sys
import threading
from contextlib import asynccontextmanager

import msgspec
from qanot.plugins.base import Plugin, ToolDef
from qanot_worker.extensions import ToolFailed
from qanot_worker.protocol.secret_forms import replace_secrets, secret_forms
from qanot_worker.protocol import EXIT_MCP_SERVER_GONE, MAX_MCP_BLOCKS, MCP_RESULT, McpBlock, McpResult

from mcp import ClientSession, MCPError, types
from pydantic import ValidationError
from qanot_worker.mcp_bridge.stdio_pipes import ServerLines, server_pipes


class QanotPlugin(Plugin):
    name = "mcp-bridge"
    description = "One MCP server's tools"

    def __init__(self) -> None:
        self.config: dict = {}
        self.session: ClientSession | None = None
        self.listed: list[types.Tool] = []
        self._stop = asyncio.Event()
        self._stopping = False
        self._connection: asyncio.Task | None = None
        self._pidfd: int | None = None  # the stdio server's
        self._in_flight = 0  # calls the server has not answered yet
        self._checking: asyncio.Task | None = None  # the ping after a cancelled call, while it waits
        self._stderr: StderrTail | None = None  # the stdio server's stderr, passed on
        self._lines: ServerLines | None = None  # the stdio server's stdout, as the session reads it

    async def setup(self, config: dict) -> None:
        self.config = config
        self.name = config["server"]
        ready = asyncio.get_running_loop().create_future()
        self._connection = asyncio.create_task(self._connect(ready))
        await ready  # the connection's own error, if it fails before the tools are listed

    def get_tools(self) -> list[ToolDef]:
        # a tool without a name cannot be called (and would fail the whole list): left out, said once
        nameless = sum(1 for tool in self.listed if not tool.name)
        if nameless:
            print(f"MCP server {self.name}: {nameless} tool(s) without a name left out", file=sys.stderr, flush=True)
        return [ToolDef(name=tool.name, description=f"[MCP:{self.name}] {tool.description or ''}",
                        parameters=dict(tool.input_schema or {"type": "object", "properties": {}}),
                        handler=self._handler(tool.name)) for tool in self.listed if tool.name]

    async def teardown(self) -> None:
        """MCP's own shutdown (the transport's, _transport), waited for; its PID namespace ends
        whatever is left of the server after that."""
        self._stopping = True
        self._stop.set()
        if self._connection is None:
            return
        # the transport's stop at its longest (half a second, close_timeout, a second after SIGKILL), and a second
        await asyncio.wait({self._connection}, timeout=self.config.get("close_timeout", 2.0) + 2.5)

    # ---- the connection ------------------------------------------------------------------------

    async def _connect(self, ready: asyncio.Future) -> None:
        """Holds the transport and the session for the worker's life (the SDK's contexts must be
        entered and left in one task). Ends the worker if the connection ends unasked."""
        why = "the connection closed"
        try:
            async with self._transport() as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                self.listed = await _all_tools(session)
                self.session = session
                if self._pidfd is not None and select.select([self._pidfd], [], [], 0)[0]:
                    self._lost("the server process exited")  # just now: its exit was seen before this
                ready.set_result(None)
                pinging = asyncio.create_task(self._ping(session))
                try:
                    await self._until_stopped()
                finally:
                    pinging.cancel()
        except BaseException as exc:  # noqa: BLE001 - whatever ends the connection is reported once
            why = _describe(exc)
            if not ready.done():
                ready.set_exception(ConnectionError(f"MCP server {self.name}: {self._starting_failed(exc, why)}"))
                return
            if isinstance(exc, asyncio.CancelledError) and self._stopping:
                raise
        if not self._stopping:
            self._lost(why)

    def _starting_failed(self, exc: BaseException, why: str) -> str:
        """Why the server did not get as far as its tool list, with what the SDK's words leave out:
        the program that could not be run, or that the server exited (its stderr is logged above)."""
        if self.config.get("transport", "stdio") != "stdio":
            return f"{self.config['url']}: {why}"
        exc = _leaf(exc)
        if isinstance(exc, OSError) and not exc.filename:
            return f"{self.config['command']} could not be started: {why}"
        exited = self._pidfd is not None and bool(select.select([self._pidfd], [], [], 0)[0])
        if self._pidfd is None and self._stderr is not None:  # gone before its pid was found: its stderr ended
            exited = self._stderr.ended()
        if exited:
            tail = self._stderr.last_lines() if self._stderr is not None else []
            if not tail:
                return f"{why} (the server exited before it answered, and wrote nothing to its stderr)"
            return f"{why} (the server exited before it answered; the end of its stderr: {' | '.join(tail)})"
        return why

    @asynccontextmanager
    async def _transport(self):
        transport = self.config.get("transport", "stdio")
        if transport == "stdio":
            env = {"HOME": os.getcwd(), **self.config["env"]}  # the worker's data directory, its own
            # its stderr through this worker's (the host logs each line), its last lines kept: the
            # reason a server that exits at once gives (the newcomer of pass 56 read "its stderr,
            # logged above", but a one-shot command logs no such lines)
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            secrets = {str(key): str(value) for key, value in (self.config.get("secrets") or {}).items()}
            tail = self._stderr = StderrTail(read_end, secrets)
            try:
                try:
                    # MCP's shutdown: stdin closed; a server still there after half a second gets
                    # SIGTERM, as the spec's next step, rather than the SDK's seconds of patience (a
                    # restart of mcp-server-time waited 5 s for it); its PID namespace ends whatever is left
                    forms = secret_forms(secrets)
                    pipes = server_pipes(self.config["command"], self.config["args"], env, os.getcwd(), write_end,
                                         stdin_grace=0.5, term_grace=self.config.get("close_timeout", 2.0),
                                         redact=lambda text: replace_secrets(text, forms, "env"))
                    async with pipes as (read, write, process):
                        os.close(write_end)  # the server holds it now: its exit is the tail's end of file
                        write_end = -1
                        tail.start()
                        self._watch_child(process.pid)
                        self._lines = read
                        yield read, write
                finally:
                    if write_end >= 0:
                        os.close(write_end)
            finally:
                tail.close_unless_started()
        elif transport == "sse":
            from mcp.client.sse import sse_client
            async with sse_client(self.config["url"], headers=self.config["headers"],
                                  timeout=self.config["connect_timeout"]) as streams:
                yield streams[0], streams[1]
        else:
            import httpx2
            from mcp.client.streamable_http import streamable_http_client
            timeout = httpx2.Timeout(self.config["connect_timeout"], read=None)
            async with httpx2.AsyncClient(headers=self.config["headers"], timeout=timeout) as client, \
                    streamable_http_client(self.config["url"], http_client=client) as streams:
                yield streams[0], streams[1]

    async def _until_stopped(self) -> None:
        """Until teardown; or, for a stdio server that closed its stdout (an exit is seen by its
        pidfd), until the answers it wrote before are passed on: the worker then goes, so that the
        host restarts it, rather than failing every call ("Connection closed") until a ping finds out."""
        stop = asyncio.ensure_future(self._stop.wait())
        waits = {stop}
        if self._lines is not None:
            waits.add(asyncio.ensure_future(self._lines.ended.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if not self._stop.is_set():
            await asyncio.sleep(0.2)  # the session's last answers reach their calls, and the host
            if not self._stopping:
                self._lost(f"the server {self._lines.why_ended if self._lines else 'closed its stdout'}")
            await self._stop.wait()

    def _check_alive(self) -> None:
        """After a failed call: if the server is gone, the worker goes now, before it answers, so
        the host sees the crash (and restarts) rather than a tool error from a worker about to die."""
        if self._pidfd is not None and select.select([self._pidfd], [], [], 0)[0] and not self._stopping:
            self._lost("the server process exited during a call")

    def _watch_child(self, pid: int) -> None:
        """The server's exit is seen at once (a pidfd), not at the next ping, so calls meanwhile
        are not lost to a dead server."""
        try:
            pidfd = self._pidfd = os.pidfd_open(pid)
        except OSError:
            return  # the pings still find out
        loop = asyncio.get_running_loop()

        def exited() -> None:
            loop.remove_reader(pidfd)
            # Before its tools are listed, setup() says why the connection failed: a server ended by
            # that failure (a refused tools/list closes its stdin) has not "exited" on its own.
            if not self._stopping and self.session is not None:
                self._lost("the server process exited")
        loop.add_reader(pidfd, exited)

    async def _ping(self, session: ClientSession) -> None:
        """MCP ping as the heartbeat, while no call is in flight (a call has its own timeout, and a
        ping waiting behind a large answer is no sign of a hang): a server that stops answering
        (hung, its loop blocked) is replaced, as a worker that stops answering the host's pings is."""
        interval, timeout = self.config["ping_interval"], self.config["ping_timeout"]
        while True:
            await asyncio.sleep(interval)
            if self._in_flight:  # calls have their own timeouts; a ping behind a 10 MB answer is no sign
                continue
            try:
                await asyncio.wait_for(session.send_ping(), timeout)
            except asyncio.TimeoutError:
                if not self._in_flight:  # a call begun meanwhile may hold the answer up
                    self._lost(f"no answer to an MCP ping within {timeout:g} s")
            except Exception as exc:  # noqa: BLE001
                self._lost(f"an MCP ping failed: {_describe(exc)}")

    def _check_answering(self, session: ClientSession) -> None:
        """After a cancelled call, an MCP ping, calls in flight or not: a server whose only thread
        hung answered no call and no ping was sent while calls kept coming (the heartbeat waits for
        a moment without calls), so it was never replaced (attack pass 51), where a plugin's worker
        in that state is killed cancel_grace after the cancel. Its answer may wait behind a large
        answer the server is still writing (600 KB over 5 s: the review), so it gets the longer of
        ping_timeout and ping_interval, as a server waits that long for a heartbeat anyway. One
        check at a time."""
        if self._stopping or (self._checking is not None and not self._checking.done()):
            return  # a teardown cancels the calls itself
        patience = max(self.config["ping_timeout"], self.config["ping_interval"])
        loop = asyncio.get_running_loop()

        async def ping() -> None:
            pinging = asyncio.ensure_future(session.send_ping())
            try:
                while not (await asyncio.wait({pinging}, timeout=patience))[0]:
                    # A stdio server that answered other requests within the patience is busy, not
                    # hung: a server answering one request at a time had its ping wait behind the
                    # calls queued before it, and was replaced while answering them (attack pass 66)
                    answered = self._lines.answered_at if self._lines is not None else None
                    if answered is None or loop.time() - answered >= patience:
                        if not self._stopping:
                            self._lost(f"no answer to an MCP ping within {patience:g} s after a call was "
                                       "cancelled, nor to any request")
                        return
                pinging.result()
            except Exception as exc:  # noqa: BLE001
                if not self._stopping:
                    self._lost(f"an MCP ping after a cancelled call failed: {_describe(exc)}")
            finally:
                pinging.cancel()
        self._checking = asyncio.get_running_loop().create_task(ping())

    def _lost(self, why: str) -> None:
        """The worker ends with the connection: the host restarts it, with its backoff. Said on
        stderr first, which the host logs under the server's name."""
        print(f"MCP server {self.name}: {why}; the worker exits so that the host restarts it",
              file=sys.stderr, flush=True)
        os._exit(EXIT_MCP_SERVER_GONE)

    # ---- calls ---------------------------------------------------------------------------------

    def _handler(self, tool: str):
        async def call(params: dict) -> str:
            session = self.session
            if session is None:
                raise ConnectionError(f"MCP server {self.name} is not connected")
            self._in_flight += 1
            try:
                result = await session.call_tool(tool, params)
            except asyncio.CancelledError:  # its timeout, or its caller gone: is the server still there?
                self._check_answering(session)
                raise
            except MCPError as exc:  # a JSON-RPC error: the server refused the call
                self._check_alive()
                raise ToolFailed(f"MCP server {self.name}: {exc}") from None
            except Exception:
                self._check_alive()
                raise
            finally:
                self._in_flight -= 1
            if not isinstance(result, types.CallToolResult):
                raise ToolFailed(f"MCP server {self.name} answered {tool} with a {type(result).__name__}, "
                                 "not a tool result")
            text = _text(result)
            if result.is_error:
                raise ToolFailed(text or f"MCP server {self.name}: {tool} failed")
            return _as_sent(result, text)
        return call


def _as_sent(result, text: str) -> str:
    """The text alone when the content is all text; else MCP_RESULT's form (McpResult), in which
    the host gives Qanot's callers the text and `qanot-host mcp`'s clients the images and resources
    as the server sent them (a tester of 11-27 got "[binary data: 5380 bytes]" for an image): its
    first MAX_MCP_BLOCKS blocks. Structured content is not carried: the text carries it (a tool's
    dict, or its one value) and the front offers no outputSchema to read it by. A text that looks
    like that form is sent in it, so none can pass for it."""
    rich = any(getattr(content, "type", "text") != "text" for content in result.content)
    if not rich and not text.startswith(MCP_RESULT):
        return text
    blocks = [msgspec.convert(content.model_dump(mode="json", by_alias=True, exclude_none=True), McpBlock)
              for content in result.content[:MAX_MCP_BLOCKS]]
    return MCP_RESULT + msgspec.json.encode(McpResult(text, blocks)).decode()


async def _all_tools(session: ClientSession) -> list:
    """Every page of tools/list."""
    tools, cursor = [], None
    while True:
        page = await session.list_tools(params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            return tools


def _text(result) -> str:
    """What Qanot's MCP client makes of a result: the text parts joined, binary data as its size."""
    parts = []
    for content in result.content:
        if getattr(content, "text", None) is not None:
            parts.append(content.text)
        elif getattr(content, "data", None) is not None:
            parts.append(f"[binary data: {len(content.data)} bytes]")
        else:
            parts.append(str(content))
    if parts:
        return "\n".join(parts)
    structured = getattr(result, "structured_content", None)
    return json.dumps(structured) if structured is not None else json.dumps({"result": "ok"})


def _describe(exc: BaseException) -> str:
    """An exception group (anyio's task groups raise them) as its first leaf; an answer the SDK's
    models refuse as where and why, on one line (a tools/list with one tool whose inputSchema is
    no object: the SDK refuses the whole answer, as Qanot's own client, on the same SDK, would)."""
    exc = _leaf(exc)
    if isinstance(exc, ValidationError):
        errors = exc.errors()
        where = ".".join(str(part) for part in errors[0]["loc"]) if errors else ""
        what = errors[0]["msg"] if errors else str(exc)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"the server's answer is not valid MCP ({exc.title}): {where}: {what}{more}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _leaf(exc: BaseException) -> BaseException:
    """The first exception an exception group (anyio's task groups raise them) holds, however deep."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


PYTHON_ERROR = re.compile(rb"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b(: |$)")


class StderrTail:
    """A stdio server's stderr: passed on to this worker's stderr as it comes (the host logs each
    line under the plugin's name, its secrets out), the last few lines kept for the error of a
    server that exits before it answers. On a thread, writing as the server did: when the host
    reads slowly, the thread waits and the server with it, never the bridge's event loop.

    No line is cut before the secrets the server was given are out of it: a cut through one kept
    its start (attack pass 57: two cuts gave back a whole token). A line too long to keep whole is
    said to be there, not quoted."""

    KEEP = 5
    LINE_CHARS = 300  # shown of a line, once its secrets are out
    LONGEST = 16384  # bytes of a line kept to be shown; a longer one is only counted
    DRAIN_SECONDS = 0.5  # for what an exited server wrote last (a child of it may hold the pipe on)

    def __init__(self, fd: int, secrets: dict[str, str] | None = None) -> None:
        self._fd = fd
        self._last: list[bytes | int] = []  # a line, or the length of one too long to keep
        self._partial = b""
        self._partial_length = 0  # of the unfinished line, all of it
        self._error: bytes | None = None  # the last line that reads as a Python exception's
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pass_on, name="mcp-server-stderr", daemon=True)
        self._secrets = secret_forms(secrets or {})  # the host's forms: the URL-quoted one too (attack pass 59)

    def start(self) -> None:
        self._thread.start()

    def close_unless_started(self) -> None:
        """No server was started (its command could not be run): nothing to read."""
        if self._thread.ident is None:
            os.close(self._fd)

    def ended(self) -> bool:
        """Whether the server's end of the pipe is closed (it has exited), waiting a moment for it."""
        if self._thread.ident is None:
            return False
        self._thread.join(self.DRAIN_SECONDS)
        return not self._thread.is_alive()

    def last_lines(self) -> list[str]:
        """What the server wrote last (it has exited: what it wrote is read first, briefly), its
        secrets out, each line cut after that."""
        if self._thread.is_alive():
            self._thread.join(self.DRAIN_SECONDS)
        with self._lock:
            kept: list[bytes | int] = list(self._last)
            if self._partial_length:
                kept.append(self._partial if self._partial_length <= self.LONGEST else self._partial_length)
            if self._error is not None and self._error not in kept:  # what a long banner after it hid
                kept = [self._error, b"...", *kept]  # (GitPython's "Bad git executable": compat pass 57)
        return [self._shown(line) for line in kept]

    def _pass_on(self) -> None:
        try:
            while data := os.read(self._fd, 65536):
                view = memoryview(data)
                while view:
                    view = view[os.write(2, view):]
                with self._lock:
                    self._take(data)
        except OSError:
            pass  # the host's end of stderr gone: the worker is ending
        finally:
            os.close(self._fd)

    def _take(self, data: bytes) -> None:
        *ended, rest = data.split(b"\n")
        for piece in ended:
            whole = self._partial_length + len(piece)
            line = self._partial + piece if whole <= self.LONGEST else whole
            self._partial, self._partial_length = b"", 0
            if whole and (not isinstance(line, bytes) or line.strip()):
                self._last = [*self._last, line][-self.KEEP:]
                if isinstance(line, bytes) and PYTHON_ERROR.match(line):
                    self._error = line
        self._partial_length += len(rest)
        self._partial = self._partial + rest if self._partial_length <= self.LONGEST else b""

    def _shown(self, line: bytes | int) -> str:
        if isinstance(line, int):
            return f"(a line of {line} bytes)"
        text = replace_secrets(line.decode("utf-8", "replace").strip(), self._secrets, "env")
        return text if len(text) <= self.LINE_CHARS else text[:self.LINE_CHARS] + "..."
