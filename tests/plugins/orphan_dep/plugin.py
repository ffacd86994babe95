from qanot.plugins.base import Plugin, tool


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    @tool(name="orphan_dep_ping", description="pong")
    async def ping(self, params: dict) -> str:
        return "pong from orphan_dep"
