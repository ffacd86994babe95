"""A plugin's extension points and hooks, on the worker's side of the process boundary.

Qanot reads the extension points once, after get_tools(): WAL patterns, prompt sections, a template
directory, cron jobs, commands, template variables. The worker reads them at the same moment and
sends what can cross a pipe (Extensions); what cannot is dropped with a line in `problems`, so the
host can say why. A command's handler cannot cross: the worker keeps it, and the host calls it by
index (RunCommand) with arguments and a return value that JSON can hold.

Hooks run here when the host forwards them (Hook): the keyword arguments Qanot's HookRegistry
passes, to the plugin's own method.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import msgspec

from . import protocol as p
from .plugin_api import HOOKS, Plugin

__all__ = ["read_extensions", "run_hook", "run_command", "RemoteError", "ToolFailed"]


class RemoteError(Exception):
    """An exception from the agent's side (on_error's `error`), rebuilt from its text."""


class ToolFailed(Exception):
    """A failure a built-in tool reports as its answer (an MCP server's isError result): its message
    is the whole story, so the caller gets it as it is and no traceback is logged."""


def read_extensions(plugin: Plugin) -> tuple[p.Extensions, list[Callable | None]]:
    """The plugin's extension points, and the command handlers that stay in this process."""
    problems: list[str] = []

    def ask(method: str, default: Any) -> Any:
        try:
            return getattr(plugin, method)()
        except Exception as exc:
            problems.append(f"{method}() raised {type(exc).__name__}: {exc}")
            return default

    def plain(method: str, items: Any, kind: type) -> list:
        if not isinstance(items, (list, tuple)):
            problems.append(f"{method}() returned {type(items).__name__}, expected a list")
            return []
        kept: list = []
        for index, item in enumerate(items):
            if len(kept) == p.MAX_ITEMS:
                problems.append(f"{method}() returned {len(items)} items; the first {p.MAX_ITEMS} are taken")
                break
            try:
                kept.append(msgspec.convert(_json(item), kind))
            except (msgspec.ValidationError, TypeError, ValueError) as exc:
                problems.append(f"{method}()[{index}]: {exc}; left out")
        return kept

    wal = plain("get_wal_patterns", ask("get_wal_patterns", []), tuple[str, str, bool])
    # Qanot's sections and cron jobs are flat dicts of strings (name, content, schedule, prompt...)
    sections = plain("get_prompt_sections", ask("get_prompt_sections", []), p.Fields)
    template_dir = ask("get_template_dir", None)
    if template_dir is not None and not isinstance(template_dir, str):
        problems.append(f"get_template_dir() returned {type(template_dir).__name__}, expected str or None")
        template_dir = None
    cron = plain("get_cron_jobs", ask("get_cron_jobs", []), p.Fields)
    commands: list[p.CommandSpec] = []
    handlers: list[Any] = []
    raw_commands = ask("get_commands", [])
    for index, item in enumerate(raw_commands if isinstance(raw_commands, (list, tuple)) else []):
        if len(commands) == p.MAX_ITEMS:
            problems.append(f"get_commands() returned {len(raw_commands)} commands; the first {p.MAX_ITEMS} are taken")
            break
        if not isinstance(item, dict) or not isinstance(item.get("command"), str):
            problems.append(f"get_commands()[{index}]: expected a dict with a 'command' string; left out")
            continue
        commands.append(p.CommandSpec(item["command"], str(item.get("description", ""))))
        handlers.append(item.get("handler"))
    variables = ask("get_template_vars", {})
    if not isinstance(variables, dict):
        problems.append(f"get_template_vars() returned {type(variables).__name__}, expected a dict")
        variables = {}
    if len(variables) > p.MAX_TEMPLATE_VARS:
        problems.append(f"get_template_vars() returned {len(variables)} variables; the first "
                        f"{p.MAX_TEMPLATE_VARS} are taken")
    variables = {str(key): str(value) for key, value in list(variables.items())[:p.MAX_TEMPLATE_VARS]}
    if len(problems) > p.MAX_ITEMS:
        problems[p.MAX_ITEMS - 1:] = [f"... and {len(problems) - p.MAX_ITEMS + 1} more problems"]
    return p.Extensions(wal, sections, template_dir, cron, commands, variables, problems), handlers


def _json(value: Any) -> Any:
    """The value if JSON can hold it (tuples become lists), else TypeError naming what cannot."""
    return msgspec.json.decode(msgspec.json.encode(value))


async def run_hook(plugin: Plugin, name: str, kwargs: dict[str, Any]) -> Any:
    if name not in HOOKS:
        raise LookupError(f"{name!r} is not one of Qanot's hooks ({', '.join(HOOKS)})")
    if name == "on_error" and isinstance(kwargs.get("error"), str):
        kwargs = {**kwargs, "error": RemoteError(kwargs["error"])}
    return await _settle(getattr(plugin, name)(**kwargs))


async def run_command(handlers: list[Callable], index: int, args: list, kwargs: dict[str, Any]) -> Any:
    if not 0 <= index < len(handlers) or not callable(handlers[index]):
        raise LookupError(f"get_commands()[{index}] has no handler to call")
    return await _settle(handlers[index](*args, **kwargs))


async def _settle(result: Any) -> Any:
    if inspect.isawaitable(result):
        result = await result
    return _json(result)
