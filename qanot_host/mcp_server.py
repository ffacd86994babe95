"""`qanot-host mcp`: every tool the host registers, served to any MCP client, with the official MCP
Python SDK (its low-level Server: the tool list is the registry's, which changes at reload).

A call goes through the registry like any other (validation, timeouts, restarts, the sandbox). A
tool's failure, whatever it is (bad params, a timeout, a crashed worker, an unknown tool), is a tool
result with isError and the message: a protocol error would end the client's turn for nothing. A
client's cancel cancels the handler, which cancels the call in the worker. After a reload that
changes the tool set, each client that listed the tools gets notifications/tools/list_changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import ipaddress
import logging
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .output import printable

if TYPE_CHECKING:
    from .host import Host

__all__ = ["McpFront", "listen"]

log = logging.getLogger("qanot_host.mcp")

# Characters of one result (Qanot's cut: head and tail kept, a marker between). Over JSON a character
# can take six bytes; the SDK's own HTTP client refuses an answer over 1 MiB.
MAX_RESULT_CHARS = 100_000
# A result with images or resources in it (an MCP server's, handed on whole): its text parts share
# MAX_RESULT_CHARS, its binary parts (base64) MAX_BINARY_CHARS, so that it fits in the SDK client's
# 1 MiB too; a binary part past that goes as a line saying its size, as Qanot's client writes it.
MAX_BINARY_CHARS = 700_000
MAX_FIELD_CHARS = 2000  # a block's uri, name, title, description, MIME type
MAX_HTTP_CONNECTIONS = 64  # at once; more are closed at once (no client can hold the host's descriptors)
IDLE_CONNECTION_SECONDS = 5
REQUEST_HEAD_SECONDS = 10  # from a connection's start, or its last answer, to a whole request head
STALLED_WRITE_SECONDS = 30  # an answer the client has stopped reading: the connection is dropped
# MCP sessions over HTTP: the SDK's defaults (10,000, each kept 30 minutes) let one client take the
# host from 74 to 444 MB and then stop any more, and made SIGTERM take 18 s
MAX_HTTP_SESSIONS = 256
SESSION_IDLE_SECONDS = 600
# Clients told of tool changes (the newest that listed them): as many as there may be sessions, or
# 100 clients listing the tools made a real one miss its list_changed (attack pass 51).
MAX_SESSIONS = MAX_HTTP_SESSIONS


class McpFront:
    """The MCP side of a running host: one SDK Server, over stdio or streamable HTTP."""

    def __init__(self, host: Host) -> None:
        import mcp_types as types
        from mcp.server.lowlevel.server import NotificationOptions, Server

        self._host = host
        self._types = types
        # clients that listed the tools, the newest MAX_SESSIONS of them, kept by client: the session
        # of its latest tools/list, and a digest of the tool definitions it was last shown (each
        # client's own: one that lists anew must not make another's list look current)
        self._sessions: dict[int, tuple[Any, str]] = {}
        self._telling: asyncio.Task | None = None
        self._stale = False  # the registry changed since the clients were last told
        self.server = Server("qanot-host", version=_version(), on_list_tools=self._list_tools,
                             on_call_tool=self._call_tool,
                             instructions="Tools of Qanot plugins, each run in a sandboxed worker by qanot-host.")
        host.registry.on_change = self.registry_changed
        notifications = NotificationOptions(tools_changed=True)
        self.options = self.server.create_initialization_options(notifications)
        # the streamable HTTP manager asks the server itself: the same listChanged there
        self.server.create_initialization_options = functools.partial(  # type: ignore[method-assign]
            self.server.create_initialization_options, notifications)

    async def _list_tools(self, ctx: Any, params: Any) -> Any:
        types = self._types
        # One entry a client: SDK 2.x hands each request a session of its own over the client's
        # connection (a notification sent on it goes down that connection), 1.x the connection's
        client = id(getattr(ctx.session, "_connection", None) or ctx.session)
        definitions = self._host.tool_definitions()
        self._sessions.pop(client, None)
        self._sessions[client] = (ctx.session, _digest(definitions))
        while len(self._sessions) > MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        return types.ListToolsResult(tools=[
            types.Tool(name=d["name"], description=d["description"], input_schema=d["input_schema"])
            for d in definitions])

    async def _call_tool(self, ctx: Any, params: Any) -> Any:
        """As the registry's execute() answers Qanot: a result cut to MAX_RESULT_CHARS, an error's
        text sanitised (500 characters, long paths and key=value credentials out)."""
        from .errors import QanotHostError
        from .registry import sanitize_error, truncate_tool_result
        types = self._types
        try:
            text = await self._host.registry.invoke(params.name, dict(params.arguments or {}), whole_mcp_result=True)
        except QanotHostError as exc:
            return self._error(sanitize_error(str(exc)))
        except Exception as exc:  # noqa: BLE001 - a tool's failure is the client's to read, the session lives on
            log.exception("tool %s: unexpected error", printable(str(params.name), 100))
            return self._error(sanitize_error(f"{type(exc).__name__}: {exc}"))
        if isinstance(text, str) and text[:1] == "\x00" and self._host.registry.from_mcp_server(params.name):
            whole = self._whole(params.name, text)
            if whole is not None:
                return whole
            text = self._host.registry.mcp_text(params.name, text)
        return types.CallToolResult(content=[types.TextContent(
            type="text", text=truncate_tool_result(str(text), MAX_RESULT_CHARS))])

    def _whole(self, tool: str, sent: str) -> Any:
        """An MCP server's result with images or resources in it, handed on as the server sent it
        (at most MAX_MCP_BLOCKS blocks, read as McpResult: typed, so nothing in it becomes more than
        its fields), within one result's bounds (_bounded); None, for its text, if not well made."""
        import msgspec

        from qanot_worker.protocol import MCP_RESULT, McpResult

        try:
            whole = msgspec.json.decode(sent[len(MCP_RESULT):], type=McpResult) if sent.startswith(MCP_RESULT) else None
        except (msgspec.DecodeError, msgspec.ValidationError):
            whole = None
        if whole is None:
            return None
        blocks = [_bounded(block, budget) for budget in [_Budget()] for block in msgspec.to_builtins(whole.content)]
        try:
            return self._types.CallToolResult.model_validate({"content": blocks})
        except ValueError as exc:  # pydantic's ValidationError is one
            log.warning("tool %s: its MCP server's result could not be handed on whole (%s); its text is",
                        printable(str(tool), 100), printable(str(exc), 300))
            return None

    def _error(self, message: str) -> Any:
        types = self._types
        return types.CallToolResult(content=[types.TextContent(type="text", text=message)], is_error=True)

    def registry_changed(self) -> None:
        """The registry's on_change (a reload, a restart, a lazy plugin's first start): the clients
        are told once the change has settled (one notification for a burst, and another for a change
        made while they were being told)."""
        self._stale = True
        if self._telling is None or self._telling.done():
            self._telling = asyncio.get_running_loop().create_task(self._tell_soon())

    async def _tell_soon(self) -> None:
        while self._stale:
            self._stale = False
            await asyncio.sleep(0.2)
            await self._tell()

    async def _tell(self) -> None:
        """Clients whose tool list is stale (names, descriptions or schemas) are told so, once."""
        now = _digest(self._host.tool_definitions())
        for key, (session, shown) in list(self._sessions.items()):
            if shown == now:
                continue
            if self._sessions.get(key, (None, ""))[0] is session:  # not listed anew meanwhile
                self._sessions[key] = (session, now)  # told once; its next tools/list shows it the rest
            try:
                await asyncio.wait_for(session.send_tool_list_changed(), 5)
            except Exception as exc:  # noqa: BLE001 - a client gone is no reason to fail the reload
                log.debug("tools/list_changed not delivered: %s", exc)
                self._sessions.pop(key, None)

    async def serve_stdio(self) -> None:
        """Until the client closes stdin. stdout carries MCP only (the SDK points fd 1 at stderr
        meanwhile, so nothing else can write to the wire)."""
        from mcp.server.stdio import stdio_server
        async with stdio_server() as (read, write):
            await self.server.run(read, write, self.options)

    async def serve_http(self, listener: socket.socket, token: str | None, names: Sequence[str] = ()) -> None:
        """Streamable HTTP at http://HOST:PORT/mcp on `listener` (bound before any plugin started, so
        a taken port is the command's error, not the end of a started host) until cancelled; with
        `token`, every request must carry `Authorization: Bearer TOKEN`. `names`: host names clients
        may reach it by, beside its addresses (the Host header must name one)."""
        import uvicorn
        host, port = listener.getsockname()[:2]
        app: Any = self.server.streamable_http_app(
            host=host, transport_security=transport_security(host, port, names), max_sessions=MAX_HTTP_SESSIONS,
            session_idle_timeout=SESSION_IDLE_SECONDS)
        if token is not None:
            app = _BearerOnly(app, token)
            log.info("MCP: streamable HTTP at http://%s:%s/mcp (a bearer token is required)", host, port)
        else:
            log.warning("MCP: streamable HTTP at http://%s:%s/mcp with no token: whoever reaches the port can "
                        "call every tool%s", host, port,
                        "" if ipaddress.ip_address(host).is_loopback else " (and it is not bound to loopback)")
        config = uvicorn.Config(app, log_level="warning", lifespan="on", http=_guarded_protocol(token),
                                timeout_keep_alive=IDLE_CONNECTION_SECONDS)
        server = uvicorn.Server(config)
        # SIGTERM and SIGINT are the host's (it stops everything, this included): uvicorn's own signal
        # handling, which replaces them while it serves, is left out
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        serving = asyncio.ensure_future(server.serve(sockets=[listener]))
        try:
            await asyncio.shield(serving)
        except asyncio.CancelledError:  # the host stops: uvicorn ends its sessions and lifespan itself
            server.should_exit = True
            await asyncio.wait([serving], timeout=10)
            raise


def _guarded_protocol(token: str | None = None) -> type:
    """uvicorn's HTTP/1.1 protocol, guarded: past MAX_HTTP_CONNECTIONS a connection is closed at
    once, and one that sends nothing is closed after IDLE_CONNECTION_SECONDS (uvicorn only times out
    a connection after a response): idle connections once took 20 000 of the host's descriptors, and
    a crashed plugin could not restart meanwhile. With `token`, a client without it cannot keep one
    with it out: a request without the token ends its connection (no pipelined requests ride on a
    401), and when all connections are taken, a new one takes the place of the oldest that has not
    shown the token (a client reading its 401s slowly held all 64 otherwise)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol
    expected = token.encode() if token else None

    class Guarded(H11Protocol):
        head_deadline: asyncio.TimerHandle | None = None
        write_deadline: asyncio.TimerHandle | None = None
        trusted = False  # has shown the token
        opened = 0.0

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.opened = self.loop.time()
            if len(self.connections) > MAX_HTTP_CONNECTIONS:
                strangers = [c for c in self.connections if isinstance(c, Guarded) and c is not self and not c.trusted]
                if expected is None or not strangers:
                    transport.close()
                    return
                min(strangers, key=lambda c: c.opened).transport.abort()
            self.timeout_keep_alive_task = self.loop.call_later(IDLE_CONNECTION_SECONDS,
                                                                self.timeout_keep_alive_handler)
            self._await_head()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a whole request head came
                if self.head_deadline is not None:
                    self.head_deadline.cancel()
                    self.head_deadline = None
                if expected is not None and self.cycle is not None:
                    self._note_token()

        def _note_token(self) -> None:
            if _shows_token(self.headers, expected or b""):
                self.trusted = True
            elif not self.trusted:
                self.cycle.keep_alive = False  # its 401 is its last answer

        def on_response_complete(self) -> None:
            self._await_head()  # first: a pipelined request is read within the call below
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            for timer in (self.head_deadline, self.write_deadline):
                if timer is not None:
                    timer.cancel()
            super().connection_lost(exc)

        def pause_writing(self) -> None:
            """The client reads none of what it is sent: pipelined requests whose answers it never
            read kept all 64 connections busy writing (no token needed: the 401s piled up), and
            nothing timed them out. A client still reading resumes the writes well within the time."""
            super().pause_writing()
            if self.write_deadline is None:
                self.write_deadline = self.loop.call_later(STALLED_WRITE_SECONDS, self._write_stalled)

        def resume_writing(self) -> None:
            if self.write_deadline is not None:
                self.write_deadline.cancel()
                self.write_deadline = None
            super().resume_writing()

        def _write_stalled(self) -> None:
            self.write_deadline = None
            self.transport.abort()  # close() would wait for the very buffer nobody reads

        def _await_head(self) -> None:
            """uvicorn's idle timer stops at a request's first byte, and nothing bounds the rest of
            its head: one byte every 2 s on each of the 64 connections kept every other client out
            (the bearer token is only checked once the head is whole)."""
            if self.head_deadline is not None:
                self.head_deadline.cancel()
            self.head_deadline = self.loop.call_later(REQUEST_HEAD_SECONDS, self._head_too_slow)

        def _head_too_slow(self) -> None:
            self.head_deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return Guarded


def transport_security(host: str, port: int, names: Sequence[str] = ()) -> Any:
    """Host and Origin held to the listener's own addresses (and `names`), whatever it is bound to:
    the SDK checks them only for a literal 127.0.0.1, localhost or ::1, so a web page that rebinds its
    own DNS name to another address of the machine (127.0.0.2, a LAN address) reached every tool. A
    host name the machine calls itself is allowed beside the addresses it is bound to (a page cannot
    make a browser send it without being served from it). A name given in `names` is allowed without
    a port too: a TLS proxy in front (on 443) passes its clients' Host on as it came."""
    from mcp.server.transport_security import TransportSecuritySettings
    import psutil
    address = ipaddress.ip_address(host)
    if address.is_unspecified:
        addresses = {ipaddress.ip_address(a.address.split("%")[0]) for nic in psutil.net_if_addrs().values()
                     for a in nic if a.family in (socket.AF_INET, socket.AF_INET6)}
    else:
        addresses = {address}
    hosts = {f"[{a}]" if a.version == 6 else str(a) for a in addresses}
    if any(a.is_loopback for a in addresses):
        hosts.add("localhost")
    if not all(a.is_loopback for a in addresses):
        hosts |= {socket.gethostname(), socket.getfqdn()}
    hosts |= set(names)
    allowed = sorted(f"{h}:{port}" for h in hosts) + sorted(set(names) | (hosts if port == 80 else set()))
    origins = [f"http://{h}" for h in allowed] + [f"https://{h}:{port}" for h in sorted(hosts)] + \
        [f"https://{name}" for name in sorted(set(names))]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=allowed,
                                     allowed_origins=origins)


class _BearerOnly:
    """ASGI: refuse (401) any HTTP request without the bearer token; compared in constant time."""

    def __init__(self, app: Any, token: str) -> None:
        self._app = app
        self._expected = token.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if not _shows_token(scope.get("headers") or [], self._expected):
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": b'{"error": "a bearer token is required"}'})
                return
        await self._app(scope, receive, send)


def _shows_token(headers: list[tuple[bytes, bytes]], expected: bytes) -> bool:
    """The request's headers (names lower-cased) carry `Authorization: Bearer` the token: the
    scheme's case is the client's (RFC 9110), the token is compared in constant time."""
    scheme, _, given = dict(headers).get(b"authorization", b"").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), expected)


def _digest(definitions: list[dict]) -> str:
    import hashlib
    import json
    return hashlib.sha256(json.dumps(definitions, sort_keys=True, default=str).encode()).hexdigest()


def listen(text: str) -> socket.socket:
    """A listening socket for "127.0.0.1:8765" (an IP address and a port); ValueError naming what is
    wrong (the form, or the address taken)."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        family: socket.AddressFamily | None = (socket.AF_INET6 if ipaddress.ip_address(host).version == 6
                                               else socket.AF_INET)
    except ValueError:
        family = None
    if family is None or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--http {text!r}: give an IP address and a port, such as 127.0.0.1:8765")
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, int(port)))
        listener.listen(128)
    except OSError as exc:
        listener.close()
        raise ValueError(f"--http {text}: {exc.strerror or exc}") from None
    return listener


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("qanot-host")
    except PackageNotFoundError:
        return "0"


class _Budget:
    """What is left of one result's text and binary allowance (a 40 MB image and 63 blocks of 200 000
    characters each reached a client whole, and a neighbour's call waited 18 s behind them on the
    same session: attack pass 55)."""

    def __init__(self) -> None:
        self.text = MAX_RESULT_CHARS
        self.binary = MAX_BINARY_CHARS


def _bounded(block: dict[str, Any], budget: _Budget) -> dict[str, Any]:
    """One block of a whole result within what is left: text cut as a text result is (head and tail
    kept), a binary part past the allowance as its size in a text block, other fields cut."""
    from .registry import truncate_tool_result
    for key in ("uri", "name", "title", "description", "mimeType"):
        if isinstance(block.get(key), str):
            block[key] = block[key][:MAX_FIELD_CHARS]
    holder = block["resource"] if isinstance(block.get("resource"), dict) else block
    for key in ("uri", "mimeType"):  # an embedded resource's own (its MIME type reached a client at
        if isinstance(holder.get(key), str):  # 480 000 characters, 64 times a result: attack pass 65)
            holder[key] = holder[key][:MAX_FIELD_CHARS]
    if isinstance(holder.get("text"), str):
        text = holder["text"]
        holder["text"] = truncate_tool_result(text, max(budget.text, 200)) if len(text) > budget.text else text
        budget.text = max(budget.text - len(holder["text"]), 0)
    for key in ("data", "blob"):
        data = holder.get(key)
        if isinstance(data, str):
            if len(data) > budget.binary:
                return {"type": "text", "text": f"[binary data: {len(data) * 3 // 4} bytes, past what one result "
                                                f"carries here ({MAX_BINARY_CHARS * 3 // 4} bytes)]"}
            budget.binary -= len(data)
    return block
