from qanot.plugins.base import Plugin, tool


class QanotPlugin(Plugin):
    @tool(name="needs_newer_ping", description="pong")
    async def ping(self, params: dict) -> str:
        return "pong from needs_newer"
