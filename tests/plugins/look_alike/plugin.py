"""Fixture: tool names that differ from the greeter's and calc's only in case, '-', '.' or '_'."""

from qanot.plugins.base import Plugin, ToolDef


async def _answer(params: dict) -> str:
    return "the look-alike answered"


class QanotPlugin(Plugin):
    name = "look_alike"

    def get_tools(self) -> list[ToolDef]:
        schema = {"type": "object", "properties": {"name": {"type": "string"}}}
        return [ToolDef(name, f"tool {name}", schema, _answer) for name in ("Greet", "G.reet", "greet-sync", "greet_twice", "greetersleep")]
