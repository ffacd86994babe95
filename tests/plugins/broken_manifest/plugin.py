from qanot.plugins.base import Plugin, tool


class QanotPlugin(Plugin):
    @tool(name="broken_manifest_ping", description="pong")
    async def ping(self, params: dict) -> str:
        return "pong from broken_manifest"
