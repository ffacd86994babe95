from qanot.plugins.base import Plugin, tool


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    @tool(name="shared_tool", description="offered by two plugins")
    async def shared(self, params: dict) -> str:
        return "answered by conflict_a"
