"""A ToolRegistry with Qanot's API, where a tool may live in the host or in a plugin's worker.

`execute()` is the edge where typed errors become Qanot's ``{"error": "..."}`` string; `invoke()`
is the same call with the errors left as exceptions, for callers (the CLI) that must tell a tool's
own JSON from a failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from .errors import InvalidParams, QanotHostError, ToolNotFound
from .schema import MAX_PARAMS_DEPTH, SchemaError, check_schema, compile_validator, json_problem, type_name

__all__ = ["ToolRegistry", "RegisteredTool"]

log = logging.getLogger("qanot_host.registry")

Handler = Callable[[dict], Awaitable[str]]

# Qanot's own registry gives an in-process handler 30 seconds.
DEFAULT_TIMEOUT = 30.0


@dataclass
class RegisteredTool:
    name: str
    description: str
    parameters: dict[str, Any]
    handler: Handler
    plugin: str | None = None  # None: an in-host tool registered with register()
    validate: Callable[[dict], list[str]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        """A plugin's tool with a schema the host cannot use raises SchemaError (that tool is not
        registered); an in-host tool's is the host program's own, taken as Qanot takes it."""
        try:
            check_schema(self.parameters)
        except SchemaError as exc:
            if self.plugin is not None:
                raise
            log.warning("tool %s: %s; its params are not checked", self.name, exc)
            self.validate = _no_checks
            return
        self.validate = compile_validator(self.parameters)

    def definition(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


class ToolRegistry:
    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._tools: dict[str, RegisteredTool] = {}
        self.timeout = timeout
        # Set by the host: why a name is not registered, when it knows (a disabled plugin's tool).
        self.explain_missing: Callable[[str], str] = lambda name: ""

    # ---- Qanot's API -----------------------------------------------------------------------------

    def register(self, name: str, description: str, parameters: dict[str, Any], handler: Handler) -> None:
        """Register an in-host tool (Qanot's manual registration). It replaces a tool of that name."""
        old = self._tools.get(name)
        if old is not None:
            log.warning("tool %s: replaced (was registered by %s)", name,
                        f"plugin {old.plugin}" if old.plugin else "the host")
        self._tools[name] = RegisteredTool(name, description, parameters, handler)

    async def execute(self, name: str, params: dict[str, Any]) -> str:
        """Run a tool and return its result string; any failure comes back as {"error": ...}.
        Like every call here, a checkpoint: it yields to the event loop at least once on every path,
        so a caller retrying a failing tool in a loop cannot starve the host."""
        try:
            tool = self._checked(name, params)
            if tool.plugin is not None:  # invoke()'s hot path, without a coroutine layer between
                return await tool.handler(params)
            return await self._in_host(tool, params)
        except QanotHostError as exc:
            await asyncio.sleep(0)
            return _error(str(exc))
        except asyncio.TimeoutError:
            return _error(f"Tool {name} timed out after {self.timeout:g} s")
        except Exception as exc:  # an in-host handler's own bug
            log.exception("tool %s raised", name)
            return _error(f"Tool {name} failed: {type(exc).__name__}: {exc}")

    def get_definitions(self) -> list[dict[str, Any]]:
        return [tool.definition() for tool in self._tools.values()]

    @property
    def tool_names(self) -> list[str]:
        return list(self._tools)

    # ---- qanot-host's additions ------------------------------------------------------------------

    async def invoke(self, name: str, params: dict[str, Any]) -> str:
        """execute() with typed errors raised instead of returned (a checkpoint too)."""
        try:
            tool = self._checked(name, params)
            if tool.plugin is not None:
                return await tool.handler(params)  # the worker enforces its own per-call timeout
            return await self._in_host(tool, params)
        except QanotHostError:
            await asyncio.sleep(0)
            raise

    def _checked(self, name: str, params: dict[str, Any]) -> RegisteredTool:
        tool = self._tools.get(name)
        if tool is None:
            raise ToolNotFound(name, self.explain_missing(name) if isinstance(name, str) else "")
        if type(params) is not dict:
            raise InvalidParams(name, [f"Parameters must be an object, got {type_name(params)}"])
        # What cannot cross the wire is refused here, before anything is written to a worker.
        problem = json_problem(params, "params", max_depth=MAX_PARAMS_DEPTH)
        if problem:
            raise InvalidParams(name, [problem])
        problems = tool.validate(params)
        if problems:
            raise InvalidParams(name, problems)
        return tool

    async def _in_host(self, tool: RegisteredTool, params: dict[str, Any]) -> str:
        result = await asyncio.wait_for(tool.handler(params), self.timeout)
        if not isinstance(result, str):
            raise QanotHostError(f"Tool {tool.name} returned {type(result).__name__}, expected str")
        return result

    def get(self, name: str) -> RegisteredTool | None:
        return self._tools.get(name)

    def add_plugin_tool(self, tool: RegisteredTool) -> RegisteredTool | None:
        """Add a worker's tool unless the name is taken; returns the tool that holds the name then."""
        holder = self._tools.get(tool.name)
        if holder is not None and holder.plugin != tool.plugin:
            return holder
        self._tools[tool.name] = tool
        return None

    def remove_tool(self, name: str) -> None:
        self._tools.pop(name, None)

    def remove_plugin_tools(self, plugin: str) -> None:
        for name in [n for n, t in self._tools.items() if t.plugin == plugin]:
            del self._tools[name]


def _no_checks(params: dict) -> list[str]:
    return []


def _error(message: str) -> str:
    return json.dumps({"error": message}, ensure_ascii=False)
