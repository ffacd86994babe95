"""The benchmark's plugin: the same echo every contender runs, and a large result."""

import json

from qanot.plugins.base import Plugin, tool


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    name = "bench"

    @tool(name="bench_echo", description="Return the params as a JSON string.")
    async def echo(self, params: dict) -> str:
        return json.dumps(params)

    @tool(name="bench_blob", description="Return a string of `size` bytes.",
          parameters={"type": "object", "properties": {"size": {"type": "integer"}}})
    async def blob(self, params: dict) -> str:
        return "x" * params["size"]
