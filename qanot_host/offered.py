"""What a worker offers, as the host keeps it: its tools (each schema decoded only once its size is
known to be sane) and its own words (descriptions, docs), cut to what the host will hold.

A worker is not trusted: a 60 MB tools_md or 1 MiB of tiny schema containers would otherwise stay
in the host's memory for as long as the worker lives, once per plugin.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgspec

from qanot_worker import protocol as p

from .errors import PluginStartError
from .output import plain_text

__all__ = ["OfferedTool", "offered_tools", "kept_info", "kept_extensions", "MAX_DESCRIPTION", "MAX_DOC",
           "MAX_EXTENSION_TEXT"]

log = logging.getLogger("qanot_host")

MAX_DESCRIPTION = 16 * 1024
MAX_TOOL_NAME = 128  # MCP's longest; Qanot's is 64 (registry.py): what is kept of a longer one is cut
MAX_DOC = 64 * 1024  # characters of tools_md and soul_append the host keeps (the workspace takes 64 KiB)
# What the host keeps of a plugin's extension points' strings: each at most what the most generous
# of their readers takes (a prompt section's 64 KiB), a name or a path much less, and all of them
# together at most 1 MiB, far over what those readers keep (their caps in qanot_extensions.py come
# to ~300 KB), so that what they make of it is the same, cut or not.
MAX_EXTENSION_STRING, MAX_EXTENSION_NAME = 64 * 1024, 4096
MAX_EXTENSION_TEXT = 1024 * 1024


@dataclass
class OfferedTool:
    """A tool as the worker offered it; `problem` says why its schema cannot be used (then it is
    not registered)."""

    name: str
    description: str
    parameters: dict[str, Any]
    problem: str = ""


def offered_tools(plugin: str, reply: p.ToolList) -> list[OfferedTool]:
    """The worker's tool list, each schema decoded only once its size is known to be sane."""
    if len(reply.tools) > p.MAX_TOOLS:
        raise PluginStartError(plugin, f"get_tools() offered {len(reply.tools)} tools; at most {p.MAX_TOOLS} are taken")
    tools = []
    budget = p.MAX_SCHEMAS_TOTAL  # one byte of msgpack can become a Python list: the sum is bounded too
    for spec in reply.tools:
        parameters: dict[str, Any] = {}
        problem = ""
        name = spec.name
        budget -= len(spec.parameters)
        if len(name) > MAX_TOOL_NAME:  # kept cut: 255 names of 240 KB each held 61 MB of the host's memory
            name, problem = f"{name[:80]}...", f"name is {len(name)} characters, over {MAX_TOOL_NAME} (MCP's limit)"
        elif len(spec.parameters) > p.MAX_SCHEMA_BYTES:
            problem = f"parameters schema is {len(spec.parameters)} bytes encoded, over {p.MAX_SCHEMA_BYTES}"
        elif budget < 0:
            problem = f"parameters schema is past the {p.MAX_SCHEMAS_TOTAL} bytes all of a plugin's schemas may take"
        else:
            try:
                parameters = msgspec.msgpack.decode(spec.parameters, type=dict[str, Any])
            except (msgspec.DecodeError, RecursionError) as exc:
                problem = f"parameters must be a JSON object ({exc or 'nested too deeply'})"
        tools.append(OfferedTool(name, _description(spec.description), parameters, problem))
    return tools


def _description(text: str) -> str:
    """What the model is shown of a tool: at most MAX_DESCRIPTION characters, no control characters
    but newlines and tabs."""
    if len(text) > MAX_DESCRIPTION:
        text = text[:MAX_DESCRIPTION] + " [cut]"
    return plain_text(text)


def kept_info(info: p.Loaded) -> p.Loaded:
    """What the host keeps of the plugin's own words for as long as the worker lives: a 60 MB
    tools_md would otherwise stay in the host's memory, once per plugin."""
    return msgspec.structs.replace(info, name=info.name[:200], description=_description(info.description),
                                   version=info.version[:100], tools_md=info.tools_md[:MAX_DOC],
                                   soul_append=info.soul_append[:MAX_DOC],
                                   # Qanot's hooks by name: 60 names of 1 MiB each were kept whole (attack pass 53)
                                   hooks=[hook for hook in info.hooks if hook in p.HOOK_NAMES])


def kept_extensions(extensions: p.Extensions, plugin: str) -> p.Extensions:
    """What the host keeps, for as long as the worker lives (and in the tool cache), of what the
    plugin's extension points returned: their item counts were bounded, their strings were not,
    so one 60 MB template variable stayed in the host's memory, once per plugin (attack pass 52).
    Items past the whole budget are left out, and the problems say so."""
    left = MAX_EXTENSION_TEXT
    short = False

    def text(value: str, limit: int = MAX_EXTENSION_STRING) -> str:
        nonlocal left, short
        if len(value) > limit:
            value, short = value[:limit], True
        left -= len(value)
        return value

    def kept(items: list, keep: Any) -> list:
        nonlocal short
        out = []
        for item in items:
            if left <= 0:
                short = True
                break
            out.append(keep(item))
        return out

    def fields(item: dict[str, Any]) -> dict[str, Any]:
        return {text(key, MAX_EXTENSION_NAME): text(value) if isinstance(value, str) else value
                for key, value in item.items()}

    template_vars = dict(kept(list(extensions.template_vars.items()),
                              lambda kv: (text(kv[0], MAX_EXTENSION_NAME), text(kv[1]))))
    kept_ext = msgspec.structs.replace(
        extensions,
        wal_patterns=kept(extensions.wal_patterns, lambda w: (text(w[0]), text(w[1], MAX_EXTENSION_NAME), w[2])),
        prompt_sections=kept(extensions.prompt_sections, fields),
        template_dir=None if extensions.template_dir is None else text(extensions.template_dir, MAX_EXTENSION_NAME),
        cron_jobs=kept(extensions.cron_jobs, fields),
        commands=kept(extensions.commands, lambda c: p.CommandSpec(text(c.command, MAX_EXTENSION_NAME),
                                                                    text(c.description))),
        template_vars=template_vars,
        problems=[problem[:MAX_EXTENSION_NAME] for problem in extensions.problems])
    if short:
        said = (f"its extension points returned strings over {MAX_EXTENSION_STRING} characters, or over "
                f"{MAX_EXTENSION_TEXT} in all: cut, and the items past that left out")
        log.warning("plugin %s: %s", plugin, said)
        kept_ext.problems = [*kept_ext.problems[:p.MAX_ITEMS - 1], said]
    return kept_ext
