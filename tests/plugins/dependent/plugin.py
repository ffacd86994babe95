from qanot.plugins.base import Plugin, tool


class QanotPlugin(Plugin):
    @tool(name="dependent_ping", description="pong")
    async def ping(self, params: dict) -> str:
        return "pong from dependent"
