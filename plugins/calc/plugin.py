"""Calculator: exact arithmetic for the agent, offline."""

import json

from qanot.plugins.base import Plugin, ToolDef, tool

from helpers import evaluate


class QanotPlugin(Plugin):
    name = "calc"
    description = "Arithmetic the agent can trust"
    tools_md = """
## Calculator Tools

### calc_eval
Evaluate an arithmetic expression exactly (+ - * / // % **, parentheses).
- **expression**: e.g. "(1200 * 12) / 7"
"""
    soul_append = """
## Calculator Behavior
Never do arithmetic in your head: use calc_eval and quote its result.
"""

    async def setup(self, config: dict) -> None:
        self.precision = int(config.get("precision", 10))

    def get_tools(self) -> list[ToolDef]:
        return self._collect_tools()

    @tool(
        name="calc_eval",
        description="Evaluate an arithmetic expression.",
        parameters={
            "type": "object",
            "required": ["expression"],
            "properties": {"expression": {"type": "string", "description": "e.g. 2 * (3 + 4)"}},
        },
    )
    async def calc_eval(self, params: dict) -> str:
        try:
            value = evaluate(params["expression"])
        except (ValueError, SyntaxError, ZeroDivisionError, OverflowError) as exc:
            return json.dumps({"error": f"cannot evaluate: {exc}"})
        if isinstance(value, float):
            value = round(value, self.precision)
        return json.dumps({"expression": params["expression"], "result": value})
