"""Starts once (its tools get listed); every later setup() raises an error carrying a credential, a
long path and 600 more characters."""

import os

from qanot.plugins.base import Plugin, tool


class QanotPlugin(Plugin):
    name = "leaky_setup"

    async def setup(self, config):
        marker = os.path.join(config["workspace_dir"], "leaky_setup", "started")
        if os.path.exists(marker):
            raise ValueError("cannot reach db: password=hunter2 at /srv/app/secret/dir/config.ini " + "x" * 600)
        open(marker, "a").close()

    def get_tools(self):
        return self._collect_tools()

    @tool(name="leaky_get", description="Answers.")
    async def get(self, params: dict) -> str:
        return "answered"
