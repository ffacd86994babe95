"""Starting a worker process, behind a small interface.

The rest of the host only needs a process it can wait for and signal; keeping the launch here means a
fork-server launcher (a pre-started template that forks per plugin) can replace plain spawning later
without touching supervision.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Protocol

__all__ = ["LaunchSpec", "WorkerProcess", "Launcher", "SubprocessLauncher", "start_output_pumps",
           "finish_worker_group"]

# A plugin that prints without newlines must not make the host buffer without bound.
MAX_LOG_LINE = 4096
# After a worker exits and its process group is killed, how long its output may take to drain.
OUTPUT_DRAIN_SECONDS = 2.0


# How a spawned worker starts: isolated mode, no site, and only the import root on its path.
BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); from qanot_worker.main import main; "
        "sys.exit(main(sys.argv[2:]))")


@dataclass
class LaunchSpec:
    plugin: str
    import_root: str
    read_fd: int  # the worker's ends of the two protocol pipes
    write_fd: int
    max_frame: int
    env: dict[str, str]
    cwd: str
    cgroup_procs: str = ""  # a launcher that can place the worker in its cgroup itself does so

    def argv(self) -> list[str]:
        return [sys.executable, "-I", "-S", "-c", BOOT, self.import_root, str(self.read_fd),
                str(self.write_fd), str(self.max_frame), str(os.getpid())]


class WorkerProcess(Protocol):
    pid: int

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def signal_group(self, sig: int) -> None:
        """Signal the worker and every process it started (its own process group)."""


class Launcher(Protocol):
    # True if launch() itself puts the worker in spec.cgroup_procs before its plugin code can run;
    # otherwise the worker joins its cgroup itself.
    places_in_cgroup: bool

    async def launch(self, spec: LaunchSpec) -> WorkerProcess: ...

    def helper_pids(self) -> set[int]:
        """Processes of the launcher's own that plugin code could reach (a fork server's template)."""

    async def close(self) -> None:
        """Release what the launcher itself holds (a fork server); workers are stopped first."""


async def finish_worker_group(pgid: int, pumps: list[asyncio.Future], close_pipes) -> None:
    """After a worker's exit: kill whatever it left in its process group (no orphans; they would
    also hold its output pipes open), then log its last output, waiting a bounded time for it."""
    try:
        os.killpg(pgid, signal.SIGKILL)  # safe just after reaping: a live group keeps its id reserved
    except (ProcessLookupError, PermissionError):
        pass
    _, pending = await asyncio.wait(pumps, timeout=OUTPUT_DRAIN_SECONDS)
    if pending:  # something escaped the group and still holds a pipe: stop reading it
        close_pipes()
        for pump in pending:
            pump.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def start_output_pumps(plugin: str, stdout: asyncio.StreamReader | None,
                       stderr: asyncio.StreamReader | None) -> list[asyncio.Future]:
    log = logging.getLogger(f"qanot_host.plugin.{plugin}")
    return [asyncio.ensure_future(_pump(stdout, log, plugin, "stdout")),
            asyncio.ensure_future(_pump(stderr, log, plugin, "stderr"))]


class _SpawnedWorker:
    def __init__(self, proc: asyncio.subprocess.Process, plugin: str) -> None:
        self._proc = proc
        self.pid = proc.pid
        self._pumps = start_output_pumps(plugin, proc.stdout, proc.stderr)

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        code = await self._proc.wait()
        await finish_worker_group(self.pid, self._pumps, self._proc._transport.close)
        return code

    def signal_group(self, sig: int) -> None:
        if self._proc.returncode is not None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # the group is gone and its id reused; signal only our child
            self._proc.send_signal(sig)


class SubprocessLauncher:
    """One fresh interpreter per worker, in a session (and process group) of its own."""

    places_in_cgroup = False

    def helper_pids(self) -> set[int]:
        return set()

    async def launch(self, spec: LaunchSpec) -> WorkerProcess:
        proc = await asyncio.create_subprocess_exec(
            *spec.argv(), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=spec.env, cwd=spec.cwd,
            pass_fds=(spec.read_fd, spec.write_fd), start_new_session=True)
        return _SpawnedWorker(proc, spec.plugin)

    async def close(self) -> None:
        pass


async def _pump(stream: asyncio.StreamReader | None, log: logging.Logger, plugin: str, kind: str) -> None:
    """Log what a worker writes, a line at a time, tagged with its plugin's name."""
    if stream is None:
        return
    pending = b""
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            break
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        if len(pending) > MAX_LOG_LINE:
            lines.append(pending)
            pending = b""
        for line in lines:
            _emit(log, plugin, kind, line)
    if pending:
        _emit(log, plugin, kind, pending)


def _emit(log: logging.Logger, plugin: str, kind: str, line: bytes) -> None:
    text = line[:MAX_LOG_LINE].decode("utf-8", errors="replace").rstrip()
    if text:
        log.log(logging.WARNING if kind == "stderr" else logging.INFO, "[%s %s] %s", plugin, kind, text)
