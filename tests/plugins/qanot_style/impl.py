"""What Qanot's own plugins rely on beyond the base class: hooks, extension points, commands,
qanot.secrets, qanot.fs_safe, a dataclass under postponed annotations, a place in the workspace."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import qanot
from qanot.fs_safe import SafeWriteError, safe_write_file, validate_read_path
from qanot.plugins.base import Plugin, PluginManifest, ToolDef, tool
from qanot.secrets import resolve_secret


@dataclass
class Counter:
    turns: int = 0


class QanotStylePlugin(Plugin):
    name = "qanot_style"
    description = "Exercises Qanot's plugin API"
    version = "7"
    tools_md = (Path(__file__).parent / "TOOLS.md").read_text()
    soul_append = "\n## Qanot style\nAnswer in the Qanot style.\n"

    def __init__(self) -> None:
        self.counter = Counter()
        self.seen: list = []
        self.config: dict = {}

    async def setup(self, config: dict) -> None:
        self.config = config
        if config.get("leak_on_setup"):
            raise RuntimeError(f"cannot log in with token {config['token']}")

    def get_tools(self) -> list[ToolDef]:
        tools = self._collect_tools()
        # Two tools of one name: Qanot's registry keeps the later one.
        tools.append(ToolDef("qs_twice", "first", {"type": "object", "properties": {}}, self._first))
        tools.append(ToolDef("qs_twice", "second", {"type": "object", "properties": {}}, self._second))
        return tools

    async def _first(self, params: dict) -> str:
        return "first"

    async def _second(self, params: dict) -> str:
        return "second"

    @tool("qs_info", "What the plugin sees of Qanot and of its config.")
    async def info(self, params: dict) -> str:
        manifest = PluginManifest.from_file(Path(__file__).parent / "plugin.json")
        return json.dumps({
            "qanot_version": qanot.__version__, "qanot_file": qanot.__file__, "config": self.config,
            "manifest_version": manifest.version, "turns": self.counter.turns, "seen": self.seen,
            "env_token": os.environ.get("QS_TOKEN"), "module": __name__,
            "resolved_plain": resolve_secret("plain"), "resolved_none": resolve_secret(None),
            "read_check": validate_read_path("/etc/passwd"),
        })

    @tool("qs_import", "Try to import a module; say what happened.",
          {"type": "object", "properties": {"module": {"type": "string"}}, "required": ["module"]})
    async def try_import(self, params: dict) -> str:
        try:
            module = __import__(params["module"], fromlist=["x"])
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return f"imported {module.__name__}"

    @tool("qs_write", "Write a file under a path relative to workspace_dir.",
          {"type": "object", "properties": {"path": {"type": "string"}, "safe": {"type": "boolean"}},
           "required": ["path"]})
    async def write(self, params: dict) -> str:
        target = os.path.join(self.config["workspace_dir"], params["path"])
        try:
            if params.get("safe"):
                return safe_write_file(target, "written", root=os.path.join(self.config["workspace_dir"], self.name))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w") as file:
                file.write("written")
        except (OSError, SafeWriteError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return target

    @tool("qs_leak", "Raises, and prints, with the token in the text.")
    async def leak(self, params: dict) -> str:
        print(f"the token is {self.config['token']}", flush=True)
        raise RuntimeError(f"bad token {self.config['token']}")

    # ---- hooks ------------------------------------------------------------------------------------

    async def on_pre_turn(self, user_id: str, message: str) -> str | None:
        self.counter.turns += 1
        self.seen.append(["pre", user_id, message])
        return f"{message} [qanot_style saw {user_id}]"

    async def on_post_turn(self, user_id: str, message: str, response: str) -> str | None:
        self.seen.append(["post", user_id, message, response])
        return None

    async def on_startup(self) -> None:
        self.seen.append(["startup"])

    # ---- extension points -------------------------------------------------------------------------

    def get_wal_patterns(self) -> list[tuple[str, str, bool]]:
        # the second backtracks catastrophically under re on a message that ends in punctuation
        return [(r"qanot style (\w+)", "qs_fact", True), (r"^(\w+\s?)*$", "qs_words", False)]

    def get_prompt_sections(self) -> list[dict]:
        return [{"name": "Qanot style", "content": "Speak plainly."}]

    def get_template_vars(self) -> dict[str, str]:
        return {"{{QS_REGION}}": str(self.config.get("region", ""))}

    def get_cron_jobs(self) -> list[dict]:
        return [{"name": "qs_daily", "schedule": "0 9 * * *", "prompt": "report", "mode": "isolated"}]

    def get_commands(self) -> list[dict]:
        return [{"command": "qs", "description": "Says what it got", "handler": self.command}]

    async def command(self, argument: str) -> str:
        if argument == "hang":
            import asyncio
            await asyncio.sleep(3600)
        return f"qs got {argument}"
