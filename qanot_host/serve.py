"""`qanot-host run` and `qanot-host mcp`: the long-lived host process. Signals (SIGTERM and SIGINT stop
it, SIGHUP reloads), the control socket, systemd's notifications, and a clean stop whatever ends it.
With a front (the MCP server), the host serves through it too, and stops when it ends (an MCP
client closing stdin).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from typing import Any, Awaitable, Callable

from .config import directory_problems
from .control import ControlServer
from .errors import ConfigError, QanotHostError
from .host import Host, PluginState
from .log_setup import flush_logs
from .systemd import Notifier

__all__ = ["serve"]

log = logging.getLogger("qanot_host")

FRONT_STOP_SECONDS = 5.0


async def serve(config_path: str, front: Callable[[Host], Any] | None = None,
                serve_front: Callable[[Any], Awaitable[None]] | None = None) -> int:
    """`front(host)` makes the front (McpFront) once the host exists; `serve_front(front)` serves
    through it once every plugin has started."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    systemd = Notifier()
    host = Host(config_path)
    problems = directory_problems(host.config, create=True)
    if problems:
        raise ConfigError(problems[0])
    control = ControlServer(host)
    await control.start()
    made = front(host) if front is not None else None
    reloads: set[asyncio.Task] = set()
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload_in_background(host, reloads, systemd))
    serving: asyncio.Future | None = None
    count = sum(e.enabled for e in host.config.plugins)
    log.info("starting %d plugin%s from %s", count, "" if count == 1 else "s", config_path)
    try:
        starting = asyncio.ensure_future(host.start())
        await asyncio.wait([starting, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()
            _print_ready(host)
            systemd.ready(_summary(host))
            # A long-lived process: what start-up made (modules, config, the registry) lives as
            # long as the host, so the collector stops rescanning it (a full collection of a
            # large heap stalled calls for tens of ms in the benchmarks).
            gc.collect()
            gc.freeze()
            waits = [asyncio.ensure_future(stop.wait())]
            if made is not None and serve_front is not None:
                serving = asyncio.ensure_future(serve_front(made))
                waits.append(serving)
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if serving is not None and serving in done and serving.exception() is not None:
                log.error("the MCP front ended: %s", serving.exception())
        else:
            starting.cancel()
            # Let each half-started worker be stopped by its own start path before we go on.
            await asyncio.gather(starting, return_exceptions=True)
        log.info("stopping")
    finally:
        if serving is not None and not serving.done():
            serving.cancel()  # bounded: a client that no longer reads leaves the SDK's writer stuck
            await asyncio.wait([serving], timeout=FRONT_STOP_SECONDS)
        systemd.stopping()
        loop.remove_signal_handler(signal.SIGHUP)
        await control.close(keep_lock=True)
        try:
            await asyncio.gather(*reloads, return_exceptions=True)
            await host.stop()
        finally:
            control.release_lock()  # only now may another host start on this state_dir
        await systemd.close()
    log.info("stopped")
    if serving is not None and not serving.done():
        # The MCP client stopped reading: the SDK's writer thread is stuck on the full pipe, and the
        # interpreter would wait for it at exit. Everything of the host's is stopped by now.
        log.warning("the MCP client no longer reads its answers; exiting without them")
        flush_logs()
        os._exit(0)
    return 0


def _reload_in_background(host: Host, tasks: set, systemd: Notifier) -> None:
    async def reload() -> None:
        systemd.reloading()
        try:
            await host.reload()
        except QanotHostError as exc:  # a broken config.json must not stop a running host
            log.error("reload refused, keeping the running config: %s", exc)
        systemd.ready(_summary(host))

    task = asyncio.ensure_future(reload())
    tasks.add(task)
    task.add_done_callback(tasks.discard)


def _summary(host: Host) -> str:
    ready = sum(s.serving for s in host.plugins.values())
    return f"{ready} of {len(host.plugins)} plugins ready, {len(host.registry.tool_names)} tools"


def _print_ready(host: Host) -> None:
    for row in host.status():
        about = {"plugin": row["plugin"]}  # --log-format json names it
        if row["state"] == PluginState.READY:
            log.info("plugin %s: pid %s, tools: %s", row["plugin"], row["pid"], ", ".join(row["tools"]), extra=about)
        elif row["state"] == PluginState.IDLE:
            log.info("plugin %s: idle (its first call starts it), tools: %s", row["plugin"], ", ".join(row["tools"]),
                     extra=about)
        else:
            log.error("plugin %s: %s: %s", row["plugin"], row["state"], row["error"], extra=about)
