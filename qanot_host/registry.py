"""A ToolRegistry with Qanot 2.0.4's contract, where a tool may live in the host or in a worker.

What Qanot's agent relies on holds here: `register(name, description, parameters, handler,
category="core")`, `get_definitions()` entries of `name`/`description`/`input_schema` (one cached
list until the next change), `get_lazy_definitions()`, `get_handler()`, `tool_names`, and
`execute(name, input_data, timeout=...)` returning a string with Qanot's checks in Qanot's order
(the name, the input, the tool, the params), Qanot's error strings, a result cut to 8000
characters as Qanot cuts it, and an exception's text sanitised as Qanot sanitises it.

`execute()` is the edge where typed errors become that ``{"error": "..."}`` string; `invoke()` is
the same call with errors left as exceptions and the result whole, for callers (the CLI, MCP) that
must tell a tool's own JSON from a failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Protocol

import msgspec

from qanot_worker.protocol import MCP_RESULT, McpText

from .errors import InvalidParams, PluginError, QanotHostError, ToolFailed, ToolNotFound
from .schema import CHECK_OFF_LOOP, SchemaError, check_schema, compile_params_check, compile_validator, type_name

__all__ = ["ToolRegistry", "RegisteredTool", "TOOL_TIMEOUT", "MAX_TOOL_RESULT_CHARS", "tool_name_problem",
           "truncate_tool_result", "sanitize_error", "redact_credentials", "call_error"]

log = logging.getLogger("qanot_host.registry")

# A plugin's tool handler also takes a timeout (supervisor.call); an in-host one takes the params only.
Handler = Callable[..., Awaitable[Any]]

TOOL_TIMEOUT = 30  # Qanot's default for execute()
MAX_TOOL_RESULT_CHARS = 8000  # what Qanot's agent lets one result put in the context
MAX_TOOL_NAME = 64
# MCP's rule for a tool's name (letters, digits, _ - and ., 1 to 128): a plugin's or MCP server's tool
# named by it but not by Qanot's (get-tiny-image: most current MCP servers write names so) is
# registered for MCP clients and the CLI, left out of what Qanot's agent is offered, and refused by
# execute() in Qanot's words. 12 of server-everything's 13 tools were lost to every client (11-27).
MCP_TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
BAD_NAME = "Invalid tool name: must be alphanumeric/underscore, max 64 chars"
_PATHS = re.compile(r"(/[\w./\-]+){3,}")
# Qanot's, but for a value the host redacted already ("api_key=[secret config.api_key]" became
# "api_[credential redacted] config.api_key]": newcomer pass 58)
_CREDENTIALS = re.compile(r"(?:key|token|secret|password|auth)[=:]\s*(?!\[secret )\S+", re.IGNORECASE)


class CallSender(Protocol):
    """A plugin's supervisor, as execute() uses it: sends a call and hands back its reply's future
    (None: no worker can take it now, and the handler's coroutine waits for one); told if the
    caller then goes away."""

    def send(self, tool: str, params: dict[str, Any], timeout: float | None = None) -> Awaitable[str] | None: ...

    def cancelled(self, reply: Awaitable[str]) -> None: ...


@dataclass
class RegisteredTool:
    name: str
    description: str
    parameters: dict[str, Any]
    handler: Handler
    plugin: str | None = None  # None: an in-host tool registered with register()
    category: str = "core"
    # A plugin's tool: its supervisor, and the tool's name in its worker (an MCP server's tool may be
    # registered as mcp_{server}_{tool}), for execute()'s way round the handler's coroutine.
    sender: CallSender | None = field(default=None, repr=False)
    remote_name: str = ""
    validate: Callable[[Any], list[str]] = field(init=False, repr=False)
    # a plugin's tool: what cannot cross the wire, then `validate`, in one pass (compile_params_check),
    # and the same for params too large to check on the event loop (checked on a thread)
    check: Callable[[dict], list[str]] = field(init=False, repr=False)
    check_whole: Callable[[dict], list[str]] = field(init=False, repr=False)
    callable_name: bool = field(init=False, repr=False)  # one Qanot's execute() accepts

    def __post_init__(self) -> None:
        """A plugin's tool with a name Qanot cannot call or a schema the host cannot use raises
        SchemaError (that tool is not registered); an in-host tool's is the host program's own,
        taken as Qanot takes it."""
        problem = tool_name_problem(self.name) if isinstance(self.name, str) else "its name is not text"
        self.callable_name = problem is None
        mcp_name = isinstance(self.name, str) and MCP_TOOL_NAME.fullmatch(self.name) is not None
        if problem and self.plugin is not None and not mcp_name:
            raise SchemaError(problem + "; nor MCP's (letters, digits, _ - and ., 1 to 128)")
        if self.plugin is not None and not self.name.isascii():
            # Qanot's rule takes any script's letters, so `victim_еcho` (a Cyrillic е) could pass for
            # another plugin's tool, past the rule of who has a name; no model's API takes them anyway.
            raise SchemaError(f"name {self.name[:80]!r} has letters or digits outside ASCII, which could "
                              "pass for another tool's name (and which models' APIs refuse)")
        try:
            check_schema(self.parameters)
        except SchemaError as exc:
            if self.plugin is not None:
                raise
            log.warning("tool %s: %s; its params are not checked", self.name, exc)
            self.validate = self.check = self.check_whole = _no_checks
            return
        # Qanot skips validation for an empty schema, and so does this.
        self.validate = compile_validator(self.parameters) if self.parameters else _no_checks
        if self.plugin is not None:
            self.check, self.check_whole = compile_params_check(self.parameters, self.validate)
        else:
            self.check = self.check_whole = self.validate

    def definition(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "input_schema": self.parameters}


class ToolRegistry:
    CORE_CATEGORY = "core"

    def __init__(self) -> None:
        self._tools: dict[str, RegisteredTool] = {}
        self._definitions: list[dict[str, Any]] | None = None
        self.timeout: float = TOOL_TIMEOUT  # an in-host tool's, when execute() is given none
        # Set by the host: why a name is not registered, when it knows (a disabled plugin's tool).
        self.explain_missing: Callable[..., str] = lambda name, whole=False: ""  # (tool, whole) -> why
        # Set by the host that serves metrics: told of every call's end (plugin, tool, error, seconds).
        self.observer: Callable[[str | None, str, BaseException | None, float], None] | None = None
        # Set by whoever shows the tool list elsewhere (the MCP front): told of every change to it.
        self.on_change: Callable[[], None] | None = None

    # ---- Qanot's API -----------------------------------------------------------------------------

    def register(self, name: str, description: str, parameters: dict[str, Any], handler: Handler,
                 category: str = "core") -> None:
        """Register an in-host tool (Qanot's manual registration); it replaces a tool of that name,
        in that tool's place."""
        old = self._tools.get(name)
        if old is not None:
            log.warning("Tool '%s' already registered — overriding%s", name,
                        f" (it was plugin {old.plugin}'s)" if old.plugin else "")
        self._put(RegisteredTool(name, description, parameters, handler, category=category))

    def get_definitions(self) -> list[dict[str, Any]]:
        if self._definitions is None:
            # a plugin's tool Qanot could not call (an MCP name) is the MCP front's and the CLI's only:
            # offered to the agent, it would be called and refused
            self._definitions = [tool.definition() for tool in self._tools.values()
                                 if tool.callable_name or tool.plugin is None]
        return self._definitions

    def get_lazy_definitions(self, user_message: str = "") -> list[dict[str, Any]]:
        return self.get_definitions()

    def get_handler(self, name: str) -> Handler | None:
        tool = self._tools.get(name)
        return tool.handler if tool is not None else None

    @property
    def tool_names(self) -> list[str]:
        return list(self._tools)

    async def execute(self, name: str, input_data: dict[str, Any], timeout: float | None = None) -> str:
        """Run a tool and return its result as Qanot's agent takes it: at most 8000 characters, and
        any failure as {"error": ...}. `timeout` (seconds) defaults to the tool's configured one
        (30 s, Qanot's, for an in-host tool); a plugin's call stops at whichever comes first.
        Like every call here, a checkpoint: it yields to the event loop at least once on every
        path, so a caller retrying a failing tool in a loop cannot starve the host."""
        try:
            known = self._tools.get(name) if type(name) is str else None
            if known is None or not known.callable_name or type(input_data) is not dict:
                # Qanot's checks, in Qanot's order; a registered, valid name with a dict skips them
                if not isinstance(name, str) or not name.strip():
                    raise _Refused("Invalid tool name")
                name = name.strip()
                if tool_name_problem(name):
                    log.warning("Rejected invalid tool name: %r", name[:80])
                    raise _Refused(BAD_NAME)
                if not isinstance(input_data, dict):
                    log.warning("Tool %s received non-dict input: %.200r", name, input_data)
                    raise _Refused("Tool input must be a JSON object")
                input_data = _plain(input_data)
                known = None
            if self.observer is None:
                # _checked()'s check, inline for a registered name with a dict (nearly every call)
                problems = known.check(input_data) if known is not None else None
                tool = known if known is not None and not problems else \
                    self._checked(name, input_data, known, problems)
                sender = tool.sender
                if sender is not None and (reply := sender.send(tool.remote_name, input_data, timeout)) is not None:
                    try:  # a ready plugin's call: its future, awaited here (no coroutine of its own)
                        result = await reply
                    except asyncio.CancelledError:
                        sender.cancelled(reply)
                        raise
                else:
                    result = await self._dispatch(tool, input_data, timeout)
            else:
                result = await self._observed(name, input_data, timeout)
            if type(result) is str and result[:1] == "\x00":  # an MCP server's, images in it: Qanot takes the text
                result = self.mcp_text(name, result)
            return result if len(result) <= MAX_TOOL_RESULT_CHARS else truncate_tool_result(result)
        except _Refused as exc:
            await asyncio.sleep(0)
            return _error(str(exc))
        except InvalidParams as exc:
            await asyncio.sleep(0)
            log.warning("Tool %s param validation: %s", name, exc.problems)
            # Qanot's words; sanitised, since a plugin's schema names what is missing (attack pass 24)
            return _error(sanitize_error("Invalid parameters: " + "; ".join(exc.problems)))
        except ToolNotFound as exc:
            await asyncio.sleep(0)
            return _error(str(exc))
        except ToolFailed as exc:  # the text is the plugin's own (its exception): sanitised as Qanot does
            return _error(f"plugin {exc.plugin}: tool {exc.tool} failed: {sanitize_error(exc.message)}")
        except PluginError as exc:  # may carry the plugin's text too (its setup()'s exception, its last exit)
            await asyncio.sleep(0)
            return _error(sanitize_error(str(exc)))
        except QanotHostError as exc:  # the host's own words, naming the plugin
            await asyncio.sleep(0)
            return _error(str(exc))
        except asyncio.TimeoutError:
            timeout = self.timeout if timeout is None else timeout
            log.error("Tool %s timed out after %ds", name, timeout)
            return _error(f"Tool timed out after {timeout}s")
        except Exception as exc:  # an in-host handler's own bug
            log.error("Tool %s failed: %s", name, exc, exc_info=True)
            return _error(sanitize_error(str(exc)))

    # ---- qanot-host's additions ------------------------------------------------------------------

    async def invoke(self, name: str, params: dict[str, Any], timeout: float | None = None, *,
                     whole_mcp_result: bool = False) -> Any:
        """execute() with typed errors raised instead of returned, and the result whole (a checkpoint
        too). `whole_mcp_result`: an MCP server's result with images or resources in it as its
        worker sent it (MCP_RESULT's form: `qanot-host mcp` hands it on), not its text."""
        try:
            params = _plain(params)
            if self.observer is None:
                result = await self._dispatch(self._checked(name, params), params, timeout)
            else:
                result = await self._observed(name, params, timeout)
        except QanotHostError:
            await asyncio.sleep(0)
            raise
        if whole_mcp_result or not isinstance(result, str) or result[:1] != "\x00":
            return result
        return self.mcp_text(name, result)

    def from_mcp_server(self, name: str) -> bool:
        """Whether `name` is an MCP server's tool, whose worker (the bridge) alone may send a result
        in MCP_RESULT's form: any plugin's result may start so, and be read as one (attack pass 54)."""
        tool = self._tools.get(name)
        return tool is not None and tool.plugin is not None and tool.category == "mcp"

    def mcp_text(self, name: str, result: str) -> str:
        """What Qanot's callers get of an MCP server's result in MCP_RESULT's form: the text Qanot's
        own MCP client makes of it (binary parts as their size), read alone (the rest is skipped,
        not made into objects); another tool's result, or one not well made, as it came."""
        if not self.from_mcp_server(name) or not result.startswith(MCP_RESULT):
            return result
        try:
            return msgspec.json.decode(result[len(MCP_RESULT):], type=McpText).text
        except (msgspec.DecodeError, msgspec.ValidationError):
            return result

    async def _observed(self, name: str, params: dict[str, Any], timeout: float | None) -> Any:
        """A call, timed and told to the observer however it ends."""
        observer = self.observer
        assert observer is not None  # only called with one
        began = time.perf_counter()
        known = self._tools.get(name) if isinstance(name, str) else None
        plugin = known.plugin if known else None
        try:
            result = await self._dispatch(self._checked(name, params), params, timeout)
        except BaseException as exc:
            observer(plugin, name, exc, time.perf_counter() - began)
            raise
        observer(plugin, name, None, time.perf_counter() - began)
        return result

    def _dispatch(self, tool: RegisteredTool, params: dict[str, Any], timeout: float | None) -> Awaitable[Any]:
        """How invoke() reaches a checked tool's handler, and execute() too but for a ready plugin's
        call (sent at once, its reply awaited there). A plugin's tool goes to its supervisor, which
        resolves the call's timeout (a caller's may only shorten it); an in-host tool runs under the
        registry's. No coroutine layer of its own."""
        if tool.plugin is not None:
            return tool.handler(params) if timeout is None else tool.handler(params, timeout)
        # a timeout that is not a number (NaN) is none: the registry's then, not no timeout at all
        own = self.timeout if timeout is None or timeout != timeout else timeout
        return asyncio.wait_for(tool.handler(params), own)

    def _checked(self, name: str, params: dict[str, Any], tool: RegisteredTool | None = None,
                 problems: list[str] | None = None) -> RegisteredTool:
        """`tool`: the caller looked `name` up already and found it, with a dict for params;
        `problems`: and checked them already."""
        if tool is None:
            tool = self._tools.get(name) if isinstance(name, str) else None
            if tool is None:
                raise ToolNotFound(name, self.explain_missing(name) if isinstance(name, str) else "")
            if type(params) is not dict:
                # JSON's names here (the CLI's caller wrote JSON); execute() answers Qanot's words first
                raise InvalidParams(name, [f"Parameters must be an object, got {type_name(params)}"])
        # What cannot cross the wire is refused here, before anything is written to a worker.
        if problems is None:
            problems = tool.check(params)
        if problems:
            if problems is CHECK_OFF_LOOP:  # rare: the same tool, checking its params on a thread first
                return replace(tool, handler=_checked_on_a_thread(tool, name), sender=None)
            raise InvalidParams(name, problems)
        return tool

    def get(self, name: str) -> RegisteredTool | None:
        return self._tools.get(name)

    def add_plugin_tool(self, tool: RegisteredTool) -> RegisteredTool | None:
        """Add a worker's tool unless the name is taken; returns the tool that holds the name then."""
        holder = self._tools.get(tool.name)
        if holder is not None and holder.plugin != tool.plugin:
            return holder
        self._put(tool)
        return None

    def remove_tool(self, name: str) -> None:
        if self._tools.pop(name, None) is not None:
            self._changed()

    def remove_plugin_tools(self, plugin: str) -> None:
        for name in [n for n, t in self._tools.items() if t.plugin == plugin]:
            self.remove_tool(name)

    def _put(self, tool: RegisteredTool) -> None:
        self._tools[tool.name] = tool
        self._changed()

    def _changed(self) -> None:
        self._definitions = None
        if self.on_change is not None:
            self.on_change()


class _Refused(Exception):
    """execute() refused the call before looking the tool up; the message is Qanot's."""


def tool_name_problem(name: str) -> str | None:
    """Qanot's rule for a name execute() accepts: 1 to 64 characters, each alphanumeric or '_'."""
    letters = name.replace("_", "")  # str.isalnum() tests each character, as Qanot's loop does (40x faster)
    if not name or len(name) > MAX_TOOL_NAME or (letters and not letters.isalnum()):
        return f"name {name[:80]!r} is not one Qanot can call (alphanumeric/underscore, 1 to 64 characters)"
    return None


def truncate_tool_result(result: Any, max_chars: int = MAX_TOOL_RESULT_CHARS) -> Any:
    """Qanot's cut: a result over max_chars keeps 70% of its budget from the head and 20% from the
    tail, with a marker saying how much went; a shorter one is returned as it is."""
    if len(result) <= max_chars:
        return result
    marker = "\n\n... [truncated {removed} chars] ...\n\n"
    budget = max_chars - len(marker.format(removed=len(result)))
    head, tail = int(budget * 0.70), int(budget * 0.20)
    return result[:head] + marker.format(removed=len(result) - head - tail) + result[len(result) - tail:]


def sanitize_error(message: str) -> str:
    """An exception's text as Qanot lets the model see it: at most 500 characters, long paths and
    key=value credentials redacted."""
    if len(message) > 500:
        message = message[:500] + "... [truncated]"
    return redact_credentials(_PATHS.sub("[path redacted]", message))


def redact_credentials(message: str) -> str:
    """key=value credentials in an exception's text redacted: what the operator's `call` shows too
    (paths stay: the operator debugs with them)."""
    return _CREDENTIALS.sub("[credential redacted]", message)


def call_error(exc: QanotHostError, context: str = "") -> QanotHostError:
    """A failed call's error as `qanot-host call` prints it: the plugins' text in it (an exception,
    a setup()'s) with credentials redacted, as execute() and `qanot-host mcp` redact them; and
    `context`, the command's own words, after it."""
    return QanotHostError(redact_credentials(str(exc)) + (f"; {context}" if context else ""))


def _checked_on_a_thread(tool: RegisteredTool, name: str) -> Handler:
    """`tool`'s handler, after its whole params check, run on a thread: params of millions of values
    walked there leave the host's event loop answering meanwhile (framing them is msgspec's, fast)."""
    async def handler(params: dict[str, Any], *timeout: float) -> Any:
        problems = await asyncio.to_thread(tool.check_whole, params)
        if problems:
            raise InvalidParams(name, problems)
        return await tool.handler(params, *timeout)

    return handler


def _plain(params: Any) -> Any:
    """A dict subclass (an OrderedDict, a defaultdict) as the plain dict Qanot's execute() takes it
    for (it asks isinstance); anything else as it is, for the checks to refuse."""
    return dict(params) if type(params) is not dict and isinstance(params, dict) else params


def _no_checks(params: Any) -> list[str]:
    return []


def _error(message: str) -> str:
    return json.dumps({"error": message})
