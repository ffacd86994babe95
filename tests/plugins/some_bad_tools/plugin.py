"""A plugin whose get_tools() mixes one good tool with every kind of bad one: each bad one is left
out alone, said in the log, and the good one is served."""

from qanot.plugins.base import Plugin, ToolDef, tool


async def _unused(params: dict) -> str:
    return "never"


class QanotPlugin(Plugin):
    name = "some_bad_tools"

    def get_tools(self):
        return [
            *self._collect_tools(),
            "not a ToolDef",
            ToolDef(name="", description="no name", parameters={}, handler=_unused),
            ToolDef(name="sbt_list_schema", description="x", parameters=[1, 2], handler=_unused),
            ToolDef(name="sbt_not_callable", description="x", parameters={}, handler="nope"),
            ToolDef(name="sbt_set_in_schema", description="x", parameters={"type": "object", "default": object()},
                    handler=_unused),
            ToolDef(name="sbt_surrogate_\udcff", description="x", parameters={}, handler=_unused),
            ToolDef(name=123, description="x", parameters={}, handler=_unused),
            ToolDef(name="sbt_odd_description", description="half a pair: \udcff", parameters={}, handler=self.good),
        ]

    @tool(name="sbt_good", description="The one good tool.")
    async def good(self, params: dict) -> str:
        return "good"
