"""Offers the tools its config names (`tools`), each answering with the config's `me` and the tool:
a plugin to copy under several names, for the rule of who has a tool name. `fail` fails its setup()."""

from qanot.plugins.base import Plugin, ToolDef


class QanotPlugin(Plugin):
    name = "offers"

    def __init__(self):
        self.names, self.me = [], "?"

    async def setup(self, config):
        self.names, self.me = list(config.get("tools", [])), config.get("me", "?")
        if config.get("fail"):
            raise RuntimeError("told to fail")

    def get_tools(self):
        def handler(tool):
            async def answer(params: dict) -> str:
                return f"{self.me} answered {tool}"
            return answer
        return [ToolDef(name=tool, description="Answers.", parameters={"type": "object", "properties": {}},
                        handler=handler(tool)) for tool in self.names]
