"""The worker's side of the protocol: one plugin, served over two pipes.

A call's first step runs as soon as it is read (eager.py); one that has to wait goes on in a task
keyed by request id, so a slow call never holds up the others and the host can cancel it by id.
The replies to the calls in one read leave together, a few frames per write (protocol.Outbox).
Nothing here trusts the plugin: every exception from its code becomes a Failure.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import os
import sys
import traceback
from functools import partial
from types import CoroutineType
from typing import Any

import msgspec

from . import protocol as p
from .eager import EagerStarter
from .explain import denial_reports
from .extensions import ToolFailed, read_extensions, run_command, run_hook
from .loader import PluginLoadError, check_tools, load_plugin
from .plugin_api import Plugin, ToolDef, overridden_hooks
from .sandbox import SandboxOutcome

__all__ = ["serve"]

log = logging.getLogger("qanot_worker")

# A host that vanished gets this long for teardown() before the worker exits anyway.
ORPHAN_TEARDOWN_SECONDS = 3.0

# Built at import, so in the worker template before it forks: msgspec compiles a union of this
# size on first use (about a millisecond), which every worker would otherwise do for itself.
HOST_MESSAGES = msgspec.msgpack.Decoder(p.HostMessage)
_CALL, _RESULT = p.Call, p.Result  # the hot path's, looked up once


class WorkerServer(asyncio.Protocol):
    def __init__(self, max_frame: int, sandbox: SandboxOutcome) -> None:
        self._sandbox = sandbox
        self._frames = p.FrameBuffer(max_frame)
        self._outbox = p.Outbox(max_frame)
        self._reading = False  # inside data_received: replies are held and go out in chunks
        self._plugin: Plugin | None = None
        self._plugin_name = ""
        self._command_handlers: list = []
        self._tools: dict[str, ToolDef] = {}
        self._calls: dict[int, asyncio.Task] = {}
        self._cancelled_by_host: set[int] = set()
        self._tasks: set[asyncio.Task] = set()
        self._loop = asyncio.get_running_loop()
        self._eager = EagerStarter(self._loop)
        self.finished: asyncio.Future[int] = self._loop.create_future()

    def attach(self, out: asyncio.WriteTransport) -> None:
        self._outbox.transport = out
        sandbox = self._sandbox
        sandbox.verify_cgroups()  # the launcher put us in our cgroups before we were let go on
        warnings = sandbox.warnings
        if len(warnings) > p.MAX_ITEMS:
            warnings = [*warnings[:p.MAX_ITEMS - 1], f"... and {len(warnings) - p.MAX_ITEMS + 1} more"]
        self._send(p.Hello(p.PROTOCOL_VERSION, os.getpid(), sandbox.egress_fd, sandbox.layers[:p.MAX_ITEMS],
                           warnings, sandbox.milliseconds))
        denial_reports.attach(self._loop, self._send)

    # ---- transport callbacks ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._reading = True
        try:
            frames = self._frames.feed(data)
            self._outbox.chunk = len(frames) // p.CHUNK_DIVISOR + 1
            decode, calls, start = HOST_MESSAGES.decode, self._calls, self._eager.start
            for frame in frames:
                msg = decode(frame)
                if type(msg) is _CALL and msg.id not in calls:  # nearly every message, started here
                    task = start(self._call(msg))
                    if task is not None:  # it waits: _calls holds its task until it ends
                        calls[msg.id] = task
                        task.add_done_callback(partial(self._call_ended, msg.id))
                else:
                    self._dispatch(msg)
        except (p.FrameTooLarge, msgspec.DecodeError, RecursionError) as exc:
            log.error("bad frame from the host: %s", exc or type(exc).__name__)
            self._finish(70)
        finally:
            self._reading = False
            self._outbox.flush()

    def eof_received(self) -> bool:
        # The host is gone (exited or killed): give the plugin a bounded chance to clean up.
        self._spawn(self._orphaned())
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            self._spawn(self._orphaned())

    # ---- requests --------------------------------------------------------------------------------

    def _dispatch(self, msg: p.HostMessage) -> None:
        """Every message but a Call, which data_received() starts itself; a Call here reuses the id of
        one in flight."""
        if type(msg) is _CALL:
            self._send(p.Failure(msg.id, p.FailureKind.PROTOCOL, "duplicate request id"))
            return
        match msg:
            case p.Cancel():
                task = self._calls.get(msg.id)
                if task is not None:
                    self._cancelled_by_host.add(msg.id)
                    task.cancel()
            case p.Ping():
                self._send(p.Pong(msg.id))
            case p.Load():
                self._load(msg)
            case p.Setup():
                self._spawn(self._setup(msg))
            case p.GetTools():
                self._get_tools(msg)
            case p.Teardown():
                self._spawn(self._teardown(msg))
            case p.Hook():
                self._spawn(self._answer(msg.id, lambda: run_hook(self._require_plugin(), msg.name, msg.kwargs),
                                         f"hook {msg.name}"))
            case p.RunCommand():
                self._spawn(self._answer(msg.id, lambda: run_command(self._command_handlers, msg.index, msg.args,
                                                                     msg.kwargs), f"command {msg.index}"))

    def _load(self, msg: p.Load) -> None:
        sandbox = self._sandbox
        sandbox.release_egress_listener()
        if sandbox.refused:  # strict, and a layer is missing: no plugin code may run
            self._send(p.Failure(msg.id, p.FailureKind.LOAD, sandbox.refused))
            return
        try:
            plugin = load_plugin(msg.plugin_name, msg.plugin_file, msg.plugin_dir, msg.site_dirs)
        except PluginLoadError as exc:
            log.error("%s", exc)
            self._send(p.Failure(msg.id, p.FailureKind.LOAD, str(exc)))
            return
        self._plugin = plugin
        self._plugin_name = msg.plugin_name
        self._send(p.Loaded(
            msg.id, _text(plugin.name), _text(plugin.description), _text(plugin.version),
            _text(plugin.tools_md), _text(plugin.soul_append), overridden_hooks(plugin)))

    async def _setup(self, msg: p.Setup) -> None:
        try:
            await self._require_plugin().setup(msg.config)
        except Exception as exc:
            log.error("setup() raised:\n%s", traceback.format_exc())
            self._send(p.Failure(msg.id, p.FailureKind.SETUP, _describe(exc)))
            return
        # What the plugin imported and set up lives as long as the worker: out of the collector's
        # sight, so its full collections stay short (an MCP SDK's heap made them pause calls).
        gc.freeze()
        self._send(p.Done(msg.id))

    def _get_tools(self, msg: p.GetTools) -> None:
        try:
            tools = self._require_plugin().get_tools()
            if isinstance(tools, (list, tuple)) and len(tools) > p.MAX_TOOLS:
                raise ValueError(f"get_tools() offered {len(tools)} tools; at most {p.MAX_TOOLS} are taken")
            self._tools = check_tools(tools, self._plugin_name)
        except Exception as exc:
            log.error("get_tools() failed: %s", exc)
            self._send(p.Failure(msg.id, p.FailureKind.BAD_TOOLS, _describe(exc, bare_type=True)))
            return
        extensions, self._command_handlers = read_extensions(self._require_plugin())
        specs = []
        for tool in list(self._tools.values()):
            try:
                parameters = p.ToolSpec.encode_parameters(tool.parameters)
                # a lone surrogate in a description (which msgpack cannot carry) becomes '?', not a failed list
                description = _text(tool.description).encode(errors="replace").decode()
                specs.append(p.ToolSpec(tool.name, description, parameters))
            except (TypeError, ValueError, OverflowError, RecursionError) as exc:  # an object() in its schema, say
                log.error("plugin %s: tool %r: its parameters cannot be sent to the host (%s: %s); that tool is left "
                          "out, the others are served", self._plugin_name, tool.name[:100], type(exc).__name__, exc)
                del self._tools[tool.name]
        if self._tools or not tools:
            self._send(p.ToolList(msg.id, specs, extensions))
        else:  # every tool left out at the last step: as broken as a list with nothing usable
            self._send(p.Failure(msg.id, p.FailureKind.BAD_TOOLS, "no tool of get_tools() can be sent to the host"))

    async def _answer(self, request_id: int, work, what: str) -> None:
        """A hook's or a command's reply: its value, or a Failure saying what went wrong."""
        try:
            value = await work()
        except Exception as exc:
            log.error("%s raised:\n%s", what, traceback.format_exc())
            self._send(p.Failure(request_id, p.FailureKind.HOOK, _describe(exc)))
            return
        try:
            encoded = p.HookResult.encode_value(value)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            self._send(p.Failure(request_id, p.FailureKind.BAD_RESULT, f"{what} returned what cannot be sent to "
                                 f"the host: {type(exc).__name__}: {exc}"))
            return
        if len(encoded) > p.MAX_HOOK_VALUE and not isinstance(value, str):
            self._send(p.Failure(request_id, p.FailureKind.BAD_RESULT, f"{what} returned a {type(value).__name__} "
                                 f"of {len(encoded)} bytes encoded; at most {p.MAX_HOOK_VALUE} are taken"))
            return
        self._send(p.HookResult(request_id, encoded))

    async def _call(self, msg: p.Call) -> None:
        tool = self._tools.get(msg.tool)
        if tool is None:
            self._send(p.Failure(msg.id, p.FailureKind.UNKNOWN_TOOL, f"no tool named {msg.tool!r}"))
            return
        try:
            result: Any = tool.handler(msg.params)
            if type(result) is CoroutineType or (type(result) is not str and inspect.isawaitable(result)):
                result = await result
        except asyncio.CancelledError:
            # Only the host's Cancel is answered; a cancel from the loop shutting down (the
            # worker is dying) must not look like one: the host reports the exit instead.
            if msg.id in self._cancelled_by_host:
                self._send(p.Failure(msg.id, p.FailureKind.CANCELLED, "cancelled by the host"))
            return
        except ToolFailed as exc:
            self._send(p.Failure(msg.id, p.FailureKind.TOOL, str(exc)))
            return
        except Exception as exc:
            log.error("tool %s raised:\n%s", msg.tool, traceback.format_exc())
            await self._on_error(msg.tool, exc)
            self._send(p.Failure(msg.id, p.FailureKind.TOOL, _describe(exc)))
            return
        if type(result) is not str:
            if not isinstance(result, str):
                self._send(p.Failure(msg.id, p.FailureKind.BAD_RESULT,
                                     f"returned {type(result).__name__}, expected str"))
                return
            result = str.__str__(result)  # a str subclass, as the plain str msgpack carries
        try:  # _send(), inline: every call's reply comes this way
            self._outbox.post(_RESULT(msg.id, result), self._reading)
        except (p.FrameTooLarge, TypeError, ValueError, OverflowError, RecursionError):
            self._send(_RESULT(msg.id, result))  # says why, in a Failure of its own

    def _call_ended(self, request_id: int, task: asyncio.Task) -> None:
        self._calls.pop(request_id, None)
        self._cancelled_by_host.discard(request_id)

    async def _on_error(self, tool_name: str, exc: Exception) -> None:
        try:
            await self._require_plugin().on_error(tool_name, exc)
        except Exception:
            log.error("on_error(%r) itself raised:\n%s", tool_name, traceback.format_exc())

    async def _teardown(self, msg: p.Teardown) -> None:
        for task in list(self._calls.values()):
            task.cancel()
        try:
            if self._plugin is not None:
                await self._plugin.teardown()
        except Exception as exc:
            log.error("teardown() raised:\n%s", traceback.format_exc())
            self._send(p.Failure(msg.id, p.FailureKind.TOOL, _describe(exc)))
        else:
            self._send(p.Done(msg.id))
        self._finish(0)

    async def _orphaned(self) -> None:
        if self.finished.done():
            return
        for task in list(self._calls.values()):
            task.cancel()
        if self._plugin is not None:
            try:
                await asyncio.wait_for(self._plugin.teardown(), ORPHAN_TEARDOWN_SECONDS)
            except BaseException:
                log.error("teardown() after the host vanished failed:\n%s", traceback.format_exc())
        self._finish(0)

    # ---- helpers ---------------------------------------------------------------------------------

    def _require_plugin(self) -> Plugin:
        if self._plugin is None:
            raise RuntimeError("no plugin is loaded")
        return self._plugin

    def _send(self, msg: msgspec.Struct) -> None:
        request_id = getattr(msg, "id", 0)  # every reply has one; Hello (never too large) has none
        try:
            self._outbox.post(msg, self._reading)
        except p.FrameTooLarge as exc:
            self._outbox.post(p.Failure(request_id, p.FailureKind.TOO_LARGE, str(exc)), self._reading)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            # Something of the plugin's that msgpack cannot carry (a string with a lone surrogate,
            # say): that one reply fails, the channel stays whole.
            self._outbox.post(p.Failure(request_id, p.FailureKind.BAD_RESULT, f"cannot be sent to the host: "
                                        f"{type(exc).__name__}: {exc}"), self._reading)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _finish(self, code: int) -> None:
        if not self.finished.done():
            self.finished.set_result(code)


def _text(value: object) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def _describe(exc: BaseException, bare_type: bool = False) -> str:
    text = str(exc)
    if bare_type and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def serve(read_fd: int, write_fd: int, max_frame: int, sandbox: SandboxOutcome, go_fd: int) -> int:
    """Serve the host until it is done with us. `go_fd` says the launcher has put us in our cgroups:
    read only just before Hello (and so any plugin code), so that setting up the loop and pipes
    overlaps the move, which waits for the kernel's RCU (milliseconds)."""
    loop = asyncio.get_running_loop()
    server = WorkerServer(max_frame, sandbox)
    out, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(write_fd, "wb", buffering=0))
    os.read(go_fd, 1)
    os.close(go_fd)
    server.attach(out)
    await loop.connect_read_pipe(lambda: server, os.fdopen(read_fd, "rb", buffering=0))
    code = await server.finished
    # Let the last frame (Done) reach the pipe before the process goes away.
    out.close()
    await asyncio.sleep(0)
    sys.stdout.flush()
    return code
