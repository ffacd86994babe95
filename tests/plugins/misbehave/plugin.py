"""Misbehaves on cue, so tests can watch the host contain each failure.

config: crash_in_setup (bool), slow_start (seconds slept in setup), die_in_teardown (bool),
hang_in_teardown (bool). Tools do the rest.
"""

import asyncio
import ctypes
import os
import signal
import sys
import time

from qanot.plugins.base import Plugin, tool

ANY = {"type": "object", "properties": {"how": {"type": "string"}, "mb": {"type": "integer"},
                                        "n": {"type": "integer"}, "seconds": {"type": "number"}}}


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    name = "misbehave"

    async def setup(self, config: dict) -> None:
        self.config = config
        self.hoard = []
        if config.get("crash_in_setup"):
            os._exit(5)
        if config.get("slow_start"):
            await asyncio.sleep(config["slow_start"])

    async def teardown(self) -> None:
        if self.config.get("teardown_marker"):
            with open(self.config["teardown_marker"], "w") as f:
                f.write("teardown ran")
        if self.config.get("die_in_teardown"):
            os._exit(9)
        if self.config.get("hang_in_teardown"):
            await asyncio.sleep(3600)

    @tool(name="mb_ok", description="Answers at once.", parameters=ANY)
    async def ok(self, params: dict) -> str:
        return f"ok {os.getpid()}"

    @tool(name="mb_crash", description="Dies, in the way asked.", parameters=ANY)
    async def crash(self, params: dict) -> str:
        how = params.get("how", "signal")
        await asyncio.sleep(params.get("seconds", 0))
        if how == "signal":
            os.kill(os.getpid(), signal.SIGKILL)
        elif how == "exit":
            os._exit(7)
        elif how == "segfault":
            ctypes.string_at(0)
        elif how == "close_pipes":
            os.closerange(3, 1024)
            time.sleep(60)
        elif how == "raise_in_loop":
            asyncio.get_running_loop().call_soon(sys.exit, 3)
            await asyncio.sleep(60)
        elif how == "normal":
            os._exit(0)
        return "still alive?"

    @tool(name="mb_hang_async", description="Awaits forever (cancellable).", parameters=ANY)
    async def hang_async(self, params: dict) -> str:
        marker = self.config.get("call_marker")
        if marker:  # for a test that must act while the call is in flight
            with open(marker, "w") as f:
                f.write("in flight")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if marker:
                with open(marker + ".cancelled", "w") as f:
                    f.write("cancelled")
            raise
        return "woke"

    async def on_pre_turn(self, user_id: str, message: str) -> str | None:
        """A hook that takes its time when asked ("sleep:SECONDS"): drains must wait for it too."""
        if message.startswith("sleep:"):
            await asyncio.sleep(float(message[6:]))
        return f"{message} [seen]"

    @tool(name="mb_print", description="Prints `text` to stdout as it is.", parameters=ANY)
    async def print_text(self, params: dict) -> str:
        print(params["text"])
        return "printed"

    @tool(name="mb_sleep", description="Answers after `seconds` (the loop stays free).", parameters=ANY)
    async def sleep(self, params: dict) -> str:
        await asyncio.sleep(params.get("seconds", 1.0))
        return "slept"

    @tool(name="mb_hang_blocking", description="Blocks the event loop.", parameters=ANY)
    async def hang_blocking(self, params: dict) -> str:
        time.sleep(params.get("seconds", 3600))
        return "woke"

    @tool(name="mb_block_later", description="Returns, then blocks the loop.", parameters=ANY)
    async def block_later(self, params: dict) -> str:
        asyncio.get_running_loop().call_later(0.05, time.sleep, 3600)
        return "blocking soon"

    @tool(name="mb_spin", description="Burns CPU for `seconds`, yielding to the loop.", parameters=ANY)
    async def spin(self, params: dict) -> str:
        end = time.process_time() + params.get("seconds", 1.0)
        while time.process_time() < end:
            sum(range(10000))
            await asyncio.sleep(0)
        return "spun"

    @tool(name="mb_eat_memory", description="Keeps `mb` megabytes.", parameters=ANY)
    async def eat_memory(self, params: dict) -> str:
        self.hoard.append(bytearray(os.urandom(1024)) * (1024 * params.get("mb", 100)))
        return f"holding {sum(len(b) for b in self.hoard) // 2**20} MB"

    @tool(name="mb_leak_fds", description="Opens `n` files and never closes them.", parameters=ANY)
    async def leak_fds(self, params: dict) -> str:
        self.hoard.extend(open(os.devnull) for _ in range(params.get("n", 100)))
        return f"leaked {params.get('n', 100)}"

    @tool(name="mb_bad_string", description="Returns a string msgpack cannot carry.", parameters=ANY)
    async def bad_string(self, params: dict) -> str:
        return "half a surrogate pair: \ud800"

    @tool(name="mb_fancy_string", description="Returns a str subclass.", parameters=ANY)
    async def fancy_string(self, params: dict) -> str:
        class Fancy(str):
            def __str__(self) -> str:
                return "not what was returned"
        return Fancy("a str subclass")

    @tool(name="mb_garbage", description="Writes random bytes to stdout and stderr.", parameters=ANY)
    async def garbage(self, params: dict) -> str:
        os.write(1, os.urandom(params.get("n", 100000)))
        os.write(2, os.urandom(1000) + b"\n")
        return "garbage written"
