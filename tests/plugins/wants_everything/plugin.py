"""Declares every permission in plugin.json, and reports what it actually got."""

import json
import os

from qanot.plugins.base import Plugin, tool


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    @tool(name="wants_env", description="The environment variables it sees.")
    async def env(self, params: dict) -> str:
        return json.dumps(sorted(os.environ))

    @tool(name="wants_read", description="Read a file by path.",
          parameters={"type": "object", "required": ["path"], "properties": {"path": {"type": "string"}}})
    async def read(self, params: dict) -> str:
        with open(params["path"]) as f:
            return f.read()
