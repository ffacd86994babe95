from qanot.plugins.base import Plugin, tool


class QanotPlugin(Plugin):
    @tool(name="shared_tool", description="offered by two plugins")
    async def shared(self, params: dict) -> str:
        return "answered by conflict_b"
