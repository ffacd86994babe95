"""A well-behaved plugin that records what the host did to it, so tests can ask."""

import asyncio
import json
import os

from qanot.plugins.base import Plugin, ToolDef, tool

from helpers import greeting
from .helpers import greeting as relative_greeting


class QanotPlugin(Plugin):
    name = "greeter"
    description = "Greets people"
    version = "1.2.3"
    tools_md = """
## Greeter Tools

### greet
Greets a person by name.
"""
    soul_append = """
## Greeter Behavior
Always greet in Uzbek first.
"""

    async def setup(self, config: dict) -> None:
        self.config = config
        self.errors = []

    async def teardown(self) -> None:
        marker = self.config.get("teardown_marker")
        if marker:
            with open(marker, "w") as f:
                f.write("teardown ran")

    async def on_error(self, tool_name: str, error: Exception) -> None:
        self.errors.append([tool_name, f"{type(error).__name__}: {error}"])

    def get_tools(self) -> list[ToolDef]:
        tools = self._collect_tools()
        tools.append(ToolDef(name="greet_sync", description="A plain function as handler.",
                             parameters={"type": "object", "properties": {}},
                             handler=self.greet_sync))
        return tools

    def greet_sync(self, params: dict) -> str:
        return relative_greeting(params.get("name", "sync"))

    @tool(name="greet", description="Greet someone.", parameters={
        "type": "object", "required": ["name"],
        "properties": {"name": {"type": "string"}, "times": {"type": "integer"}}})
    async def greet(self, params: dict) -> str:
        return " ".join([greeting(params["name"])] * params.get("times", 1))

    @tool(name="greeter_config", description="What setup() received.")
    async def get_config(self, params: dict) -> str:
        return json.dumps(self.config)

    @tool(name="greeter_env", description="The worker's environment and identity.")
    async def get_env(self, params: dict) -> str:
        import sys
        return json.dumps({"environ": dict(os.environ), "pid": os.getpid(), "path": sys.path,
                           "cwd": os.getcwd(), "flags": [sys.flags.isolated, sys.flags.no_site]})

    @tool(name="greeter_sleep", description="Sleep, then answer.",
          parameters={"type": "object", "properties": {"seconds": {"type": "number"}}})
    async def sleep(self, params: dict) -> str:
        await asyncio.sleep(params.get("seconds", 0.1))
        return f"slept {params.get('seconds', 0.1)}"

    @tool(name="greeter_fail", description="Always raises (with `why`, if given).")
    async def fail(self, params: dict) -> str:
        raise ValueError(params.get("why", "the greeter cannot greet today"))

    @tool(name="greeter_errors", description="What on_error() saw.")
    async def seen_errors(self, params: dict) -> str:
        return json.dumps(self.errors)

    @tool(name="greeter_number", description="Returns an int, which is not allowed.")
    async def number(self, params: dict) -> str:
        return 42

    @tool(name="greeter_big", description="Returns a large string.",
          parameters={"type": "object", "properties": {"size": {"type": "integer"}}})
    async def big(self, params: dict) -> str:
        return "x" * params["size"]

    @tool(name="greeter_print", description="Prints to stdout and stderr, then answers.")
    async def noisy(self, params: dict) -> str:
        import sys
        print("hello from the plugin's stdout")
        print("hello from the plugin's stderr", file=sys.stderr)
        return "printed"
