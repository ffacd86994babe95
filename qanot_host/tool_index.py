"""Which configured plugin declares which tool, read from their code: only to say why a tool is
missing ("its plugin X is disabled", "failed to start: ...").

The code is read in a child process of bounded memory and time (static.py), never in the host, and
in the background: nothing waits for it, and an unknown tool's error is only less helpful until it
is done. It is read only once some plugin is disabled or has failed: until then no tool can be
missing for a reason it could tell, and a host whose plugins all run pays nothing for it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .discovery import find_plugin
from .registry import sanitize_error
from .settings import Config
from .static import SCAN_MEMORY, scan_plugins_async
from .supervisor import SERVING_STATES, PluginState
from .worker import LOADING

if TYPE_CHECKING:
    from .supervisor import PluginSupervisor

__all__ = ["ToolIndex", "INDEX_TIMEOUT"]

log = logging.getLogger("qanot_host")

INDEX_TIMEOUT = 10.0  # what the index's reader (a child process) may take
LOAD_FAILED = f"{LOADING} failed"  # how a plugin whose code did not load failed


class ToolIndex:
    def __init__(self) -> None:
        self._declared: dict[str, set[str] | None] = {}  # plugin -> the tools its code declares
        self._indexing: asyncio.Future | None = None
        self._built_for: Config | None = None
        self._closed = False  # the host stopped: nothing starts a reader any more

    def forget(self) -> None:
        """The config changed: what was read is stale (and a read under way is dropped)."""
        if self._indexing is not None:
            self._indexing.cancel()
        self._indexing = None
        self._built_for = None
        self._declared = {}

    def build_if_useful(self, config: Config, plugins: dict[str, PluginSupervisor]) -> None:
        """Start reading the plugins' code, once per config, as soon as some plugin is disabled or
        failed (only then can the index explain a missing tool)."""
        if self._built_for is config or self._closed:
            return
        if all(entry.enabled for entry in config.plugins) and \
                all(s.state is not PluginState.FAILED for s in plugins.values()):
            return
        self.forget()
        self._built_for = config
        self._indexing = asyncio.ensure_future(self._index(config))

    async def ready(self, timeout: float = INDEX_TIMEOUT) -> None:
        """Wait (up to `timeout`) for the index, if it is still being made."""
        indexing = self._indexing
        if indexing is not None and not indexing.done():
            await asyncio.wait([indexing], timeout=timeout)

    async def close(self) -> None:
        self._closed = True
        if self._indexing is not None:
            self._indexing.cancel()
            await asyncio.gather(self._indexing, return_exceptions=True)

    def explain_missing(self, tool: str, config: Config, plugins: dict[str, PluginSupervisor],
                        whole: bool = False) -> str:
        """Why a tool is not registered, when the config knows: its plugin is disabled or failed.
        Plugins' errors sanitised as a tool's are for Qanot's model, or `whole` (but for credentials,
        which call_error takes out) for the operator's `qanot-host call` (the newcomer of pass 56
        read "[path redacted]" in the command's error about his own config). Only from the index
        (never a parse here, in the event loop: a caller naming unknown tools must not make the
        host read plugin code each time); a plugin that failed since the last look starts the
        index, for the next caller."""
        self.build_if_useful(config, plugins)
        clean = _as_is if whole else sanitize_error
        for entry in config.plugins:
            supervisor = plugins.get(entry.name)
            if supervisor is not None and tool in supervisor.tools + supervisor.refused + supervisor.conflicts:
                continue
            if tool not in (self._declared.get(entry.name) or ()):
                continue
            if supervisor is not None and supervisor.state is PluginState.FAILED:
                # its setup()'s exception, maybe: sanitised as a tool's error is (status has it whole)
                return f"its plugin {entry.name} failed to start: {clean(supervisor.error)}"
            if not entry.enabled:
                return f"its plugin {entry.name} is disabled in {config.path}"
        # A failed plugin whose code names no tool that could be read (a syntax error, the likeliest
        # mistake, leaves none) may be the one: named, with why, rather than a bare "Unknown tool"
        # (the newcomer of 11-27 got that through a running host; a standalone call named it)
        # Only code that did not load (its error is the file's, not what setup() said, which may hold
        # its config: attack pass 54), and three at most: any caller of any unknown name reads this.
        unread = [(entry.name, supervisor.error) for entry in config.plugins
                  if (supervisor := plugins.get(entry.name)) is not None
                  and supervisor.state is PluginState.FAILED and entry.name in self._declared
                  and not self._declared[entry.name]  # read, and found to declare none
                  and supervisor.error.startswith(LOAD_FAILED)]
        if unread:
            more = f"; and {len(unread) - 3} more" if len(unread) > 3 else ""
            return "plugins whose code did not load, so their tools are not known: " + "; ".join(
                f"{name}: {clean(error)}" for name, error in unread[:3]) + more
        # An MCP server's tools are known once it has listed them: one that is not serving is named
        # (not why: its error quotes its stderr, and any caller of any name reads this; compat pass 57)
        down = [server.name for server in config.mcp_servers if (supervisor := plugins.get(server.name)) is not None
                and supervisor.state not in SERVING_STATES and not supervisor.offered_tools]
        if down:
            more = f", and {len(down) - 3} more" if len(down) > 3 else ""
            return "MCP servers not serving, whose tools are not known (status says why): " + ", ".join(down[:3]) + more
        return ""

    async def _index(self, config: Config) -> None:
        jobs = await asyncio.to_thread(_scan_jobs, config)  # finding plugins reads their plugin.json: not on the loop
        scanned = await scan_plugins_async(jobs, INDEX_TIMEOUT)
        self._declared = {name: set(found["tools"]) if found.get("tools") is not None else None
                          for name, found in scanned.items()}
        if len(scanned) < len(jobs):
            log.info("the code of %s could not be read in %g s and %d MB: an unknown tool's error will not "
                     "say which of them declares it", ", ".join(sorted(set(jobs) - set(scanned))), INDEX_TIMEOUT,
                     SCAN_MEMORY >> 20)


def _scan_jobs(config: Config) -> dict[str, tuple[str, str]]:
    """Every configured plugin's (directory, entry file), disabled ones too (their tools are named
    in an unknown tool's error)."""
    jobs = {}
    for entry in config.plugins:
        source = find_plugin(entry.name, config)
        if source is not None:
            jobs[entry.name] = (source.directory, source.entry_file)
    return jobs


def _as_is(text: str) -> str:
    return text
