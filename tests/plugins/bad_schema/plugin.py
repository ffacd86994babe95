"""Fixture: tools whose parameter schemas the host cannot use, beside one it can."""

from qanot.plugins.base import Plugin, ToolDef


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


class QanotPlugin(Plugin):
    name = "bad_schema"

    def get_tools(self) -> list[ToolDef]:
        async def ok(params: dict) -> str:
            return "fine"

        return [
            ToolDef("schema_required_int", "required is a number", {"type": "object", "required": 5}, ok),
            ToolDef("schema_properties_list", "properties is a list", {"type": "object", "properties": ["a"]}, ok),
            ToolDef("schema_property_str", "a property is a string", {"type": "object", "properties": {"a": "x"}},
                    ok),
            ToolDef("schema_too_deep", "nested 60 deep", nested(60), ok),
            ToolDef("schema_fine", "a usable schema", {"type": "object", "properties": {"a": {"type": "string"}}},
                    ok),
        ]
