"""What a handler may expect of the task it runs in, whether its call finishes at once or waits:
asyncio.timeout() works, current_task() stays the same task across awaits, context variables are
the call's own."""

import asyncio
import contextvars

from qanot.plugins.base import Plugin, tool

SEEN = contextvars.ContextVar("seen", default="unset")


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    @tool(name="ts_timeout", description="asyncio.timeout() around a wait longer than the timeout.")
    async def timeout(self, params: dict) -> str:
        try:
            async with asyncio.timeout(0.05):
                await asyncio.sleep(5)
        except TimeoutError:
            return "timed out"
        return "not timed out"

    @tool(name="ts_same_task", description="current_task() before and after an await.")
    async def same_task(self, params: dict) -> str:
        before = asyncio.current_task()
        await asyncio.sleep(0.01)
        after = asyncio.current_task()
        return "same" if before is after and before is not None else f"changed: {before} -> {after}"

    @tool(name="ts_context", description="Set a context variable, wait, read it back.",
          parameters={"type": "object", "properties": {"value": {"type": "string"}}})
    async def context(self, params: dict) -> str:
        found = SEEN.get()
        SEEN.set(params["value"])
        await asyncio.sleep(0.01)
        return f"{found}->{SEEN.get()}"

    @tool(name="ts_cancel_self", description="Cancel its own task, then finish without waiting.")
    async def cancel_self(self, params: dict) -> str:
        asyncio.current_task().cancel()
        return "finished"

    @tool(name="ts_quick", description="Finishes at once.")
    async def quick(self, params: dict) -> str:
        return "quick"
