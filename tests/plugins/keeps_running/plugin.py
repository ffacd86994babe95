import os

from qanot.plugins.base import Plugin, tool


class QanotPlugin(Plugin):
    """Holds state in memory: its plugin.json keeps it running whatever activation the host uses."""

    def get_tools(self):
        return self._collect_tools()

    @tool(name="keeps_running_pid", description="The answering worker's pid.")
    async def pid(self, params: dict) -> str:
        return str(os.getpid())
