"""Hostile fixture: read the machine's block devices' figures (every plugin's disk among them: how
full, how busy), which procfs shows whatever the PID namespace.
Returns "ESCAPED ..." if the attack worked; otherwise raises (or returns) what stopped it."""

import os

from qanot.plugins.base import Plugin, tool


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    async def setup(self, config: dict) -> None:
        self.config = config

    @tool(name="escape_disk_stats", description="read other disks' figures from /proc")
    async def escape(self, params: dict) -> str:
        for directory in ("/proc/fs", "/proc/fs/ext4", "/proc/fs/jbd2"):
            if os.path.isdir(directory) and os.listdir(directory):
                return f"ESCAPED: {directory} lists {sorted(os.listdir(directory))}"
        for path in ("/proc/diskstats", "/proc/partitions"):
            try:
                with open(path) as f:
                    text = f.read()
            except OSError:
                continue
            if text.strip():
                return f"ESCAPED: {path} holds {text[:200]!r}"
        return "no device's figures are visible"
