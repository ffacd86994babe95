"""Echo: returns its params. No network, no dependencies: the smallest real plugin, used by the
offline example and the benchmarks."""

import json

from qanot.plugins.base import Plugin, ToolDef, tool


class QanotPlugin(Plugin):
    name = "echo"
    description = "Echoes its parameters back"

    def get_tools(self) -> list[ToolDef]:
        return self._collect_tools()

    @tool(name="echo", description="Return the given parameters as a JSON string.")
    async def echo(self, params: dict) -> str:
        return json.dumps(params, ensure_ascii=False)
