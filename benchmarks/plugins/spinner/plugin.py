"""A plugin that burns every core it can: threads hashing large buffers (hashlib lets go of the
GIL for them), for the CPU-share figure."""

import hashlib
import os
import threading

from qanot.plugins.base import Plugin, tool


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    name = "spinner"

    async def setup(self, config: dict) -> None:
        self.spinning = threading.Event()

    @tool(name="spinner_start", description="Start one spinning thread per core, and more.")
    async def start(self, params: dict) -> str:
        buffer = os.urandom(4 << 20)

        def spin() -> None:
            while self.spinning.is_set():
                hashlib.sha256(buffer).digest()

        self.spinning.set()
        threads = 2 * (os.cpu_count() or 2)
        for _ in range(threads):
            threading.Thread(target=spin, daemon=True).start()
        return f"{threads} threads spinning"

    @tool(name="spinner_stop", description="Stop spinning.")
    async def stop(self, params: dict) -> str:
        self.spinning.clear()
        return "stopped"
