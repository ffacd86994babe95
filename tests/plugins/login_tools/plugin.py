"""Lists its tool only when its login works, as Qanot's eskiz does: its `token` (a SecretRef) must
be "good", and the service must be up (no file `down` in its place in the workspace)."""

import os

from qanot.plugins.base import Plugin, tool


class QanotPlugin(Plugin):
    name = "login_tools"

    def __init__(self):
        self.logged_in = False

    async def setup(self, config):
        down = os.path.join(config["workspace_dir"], "login_tools", "down")
        self.logged_in = str(config.get("token")).strip() == "good" and not os.path.exists(down)

    def get_tools(self):
        return self._collect_tools() if self.logged_in else []

    @tool(name="login_send", description="Sends a message, once logged in.")
    async def send(self, params: dict) -> str:
        return "sent"
