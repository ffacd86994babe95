from qanot.plugins.base import Plugin, tool


class InitStylePlugin(Plugin):
    """No plugin.py and no class named QanotPlugin: Qanot still finds this."""

    def get_tools(self):
        return self._collect_tools()

    name = "init_style"

    @tool(name="init_style_ping", description="pong")
    async def ping(self, params: dict) -> str:
        return "pong"
