"""Declares every permission in plugin.json, and reports what it actually got."""

import json
import os

from qanot.plugins.base import Plugin, tool


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    @tool(name="wants_env", description="The environment variables it sees.")
    async def env(self, params: dict) -> str:
        return json.dumps(sorted(os.environ))

    @tool(name="wants_read", description="Read a file by path.",
          parameters={"type": "object", "required": ["path"], "properties": {"path": {"type": "string"}}})
    async def read(self, params: dict) -> str:
        with open(params["path"]) as f:
            return f.read()

    @tool(name="wants_write", description="Write `text` to a file by path.",
          parameters={"type": "object", "required": ["path", "text"],
                      "properties": {"path": {"type": "string"}, "text": {"type": "string"}}})
    async def write(self, params: dict) -> str:
        with open(params["path"], "w") as f:
            f.write(params["text"])
        return "written"

    @tool(name="wants_run", description="Run a program; its output, or why it could not run.",
          parameters={"type": "object", "required": ["argv"], "properties": {"argv": {"type": "array"}}})
    async def run(self, params: dict) -> str:
        import subprocess
        import sys
        argv = [{"PYTHON": sys.executable, "HERE": __file__}.get(arg, arg) for arg in params["argv"]]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        except OSError as exc:
            return f"{type(exc).__name__}: {exc.strerror}"
        return f"rc={done.returncode} out={done.stdout.strip()} err={done.stderr.strip()[-300:]}"
