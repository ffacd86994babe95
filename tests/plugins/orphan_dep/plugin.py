from qanot.plugins.base import Plugin, tool


class QanotPlugin(Plugin):
    @tool(name="orphan_dep_ping", description="pong")
    async def ping(self, params: dict) -> str:
        return "pong from orphan_dep"
