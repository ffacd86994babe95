"""Says which worker answers (a token of its own), records its setup() and teardown() in its place in the workspace,
and fails its setup() while a file named `fail` is there (put by the test: nothing the tool cache is keyed by)."""

import json
import os

from qanot.plugins.base import Plugin, tool


class QanotPlugin(Plugin):
    name = "lazy_probe"

    def __init__(self):
        self.place = ""
        self.worker = os.urandom(6).hex()  # pids repeat: each worker has a PID namespace of its own

    async def setup(self, config):
        self.place = os.path.join(config["workspace_dir"], "lazy_probe")
        self._note("setup")
        if os.path.exists(os.path.join(self.place, "fail")):
            raise RuntimeError("setup refuses: a file named fail is in its place")

    async def teardown(self):
        self._note("teardown")

    def _note(self, what):
        with open(os.path.join(self.place, "events"), "a") as f:
            f.write(f"{what} {self.worker}\n")

    def get_tools(self):
        return self._collect_tools()

    @tool(name="lazy_probe_pid", description="The answering worker's pid.")
    async def pid(self, params: dict) -> str:
        return json.dumps({"pid": self.worker})
