"""Fixture: tools named by MCP's rule but not Qanot's (a '-', a '.', past 64 characters), beside one
Qanot can call, one no rule allows and one of 200 000 characters (the host keeps it cut)."""

from qanot.plugins.base import Plugin, ToolDef


async def _named(params: dict) -> str:
    return f"ran {params.get('what', '')}"


async def _verbatim(params: dict) -> str:
    return params["what"]


LONG = "mcp_" + "x" * 96


class QanotPlugin(Plugin):
    name = "mcp_names"

    def get_tools(self) -> list[ToolDef]:
        schema = {"type": "object", "properties": {"what": {"type": "string"}}}
        return [ToolDef(name, f"tool {name}", schema, _named)
                for name in ("get-tiny-thing", "mcp.names.dotted", LONG, "mcp_names_plain", "has space",
                             "z" * 200_000)] + [ToolDef("mcp_names_verbatim", "returns what", schema, _verbatim)]
