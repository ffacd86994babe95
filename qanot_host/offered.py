"""What a worker offers, as the host keeps it: its tools (each schema decoded only once its size is
known to be sane) and its own words (descriptions, docs), cut to what the host will hold.

A worker is not trusted: a 60 MB tools_md or 1 MiB of tiny schema containers would otherwise stay
in the host's memory for as long as the worker lives, once per plugin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from qanot_worker import protocol as p

from .errors import PluginStartError
from .output import plain_text

__all__ = ["OfferedTool", "offered_tools", "kept_info", "MAX_DESCRIPTION", "MAX_DOC"]

MAX_DESCRIPTION = 16 * 1024
MAX_DOC = 64 * 1024  # characters of tools_md and soul_append the host keeps (the workspace takes 64 KiB)


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
        budget -= len(spec.parameters)
        if len(spec.parameters) > p.MAX_SCHEMA_BYTES:
            problem = f"parameters schema is {len(spec.parameters)} bytes encoded, over {p.MAX_SCHEMA_BYTES}"
        elif budget < 0:
            problem = f"parameters schema is past the {p.MAX_SCHEMAS_TOTAL} bytes all of a plugin's schemas may take"
        else:
            try:
                parameters = msgspec.msgpack.decode(spec.parameters, type=dict[str, Any])
            except (msgspec.DecodeError, RecursionError) as exc:
                problem = f"parameters must be a JSON object ({exc or 'nested too deeply'})"
        tools.append(OfferedTool(spec.name, _description(spec.description), parameters, problem))
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
                                   soul_append=info.soul_append[:MAX_DOC])
