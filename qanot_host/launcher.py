"""Starting a worker process, behind a small interface: the seam between supervision and how a
process comes to be.

The rest of the host only needs a process it can wait for and signal. Two launchers stand behind
it: the fork server (forkserver.py, the default: a pre-started template forks each worker) and
plain spawning (here: a fresh interpreter per worker, which forks its worker exactly as the
template would). A remote launcher would be a third.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Callable, Protocol

import msgspec

from qanot_worker import protocol as p

from .log_ring import LogRing
from .output import OutputLimit, start_output_pumps

__all__ = ["LaunchSpec", "WorkerProcess", "Launcher", "SubprocessLauncher", "finish_worker_group"]

F_SEAL_ALL = 0x0001 | 0x0002 | 0x0004 | 0x0008  # seal, shrink, grow, write

# After a worker exits and its process group is killed, how long its output may take to drain.
OUTPUT_DRAIN_SECONDS = 2.0


# How a spawned worker starts: isolated mode, no site, and only the import root on its path.
BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); from qanot_worker.forkserver import run_spawned; "
        "sys.exit(run_spawned(*map(int, sys.argv[2:6])))")


@dataclass
class LaunchSpec:
    plugin: str
    import_root: str
    read_fd: int  # the worker's ends of the two protocol pipes
    write_fd: int
    max_frame: int
    env: dict[str, str]
    cwd: str
    cgroup_procs: list[str] = field(default_factory=list)  # put the worker here before its code runs
    disk: str = ""  # the plugin's disk image, attached by the launcher
    uid: int = -1  # the plugin's own uid (its disk's owner)
    namespaces: bool = False  # a PID namespace of its own, with an init that reaps it
    log_lines_per_second: float | None = None  # of its stdout and stderr into the host's log
    redact: Callable[[str], str] | None = None  # takes the plugin's secrets out of those lines
    ring: LogRing | None = None  # where those lines are also kept, for `qanot-host logs`

    def request(self, request_id: int = 0) -> p.Spawn:
        return p.Spawn(request_id, self.plugin, self.cwd, self.max_frame, self.cgroup_procs, self.disk,
                       self.uid, self.namespaces)

    def environment_fd(self) -> int:
        """The worker's environment in a sealed memfd: it reaches the worker through the launcher
        without the launcher reading it (the caller closes the fd once handed over)."""
        fd = os.memfd_create(f"qanot-env-{self.plugin}"[:200], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, msgspec.json.encode(self.env))
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_ALL)
        except BaseException:
            os.close(fd)
            raise
        return fd


class WorkerProcess(Protocol):
    pid: int  # the process the launcher started: signal its group to reach the worker

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int | None: ...

    def signal_group(self, sig: int) -> None:
        """Signal the worker and every process it started (its own process group)."""


class Launcher(Protocol):
    async def launch(self, spec: LaunchSpec) -> WorkerProcess: ...

    def prepare(self) -> None:
        """A worker will be wanted soon: get ready for it in the background (a fork server boots
        its template), so that the wait overlaps the host's other start work."""

    def helper_pids(self) -> set[int]:
        """Processes of the launcher's own that plugin code could reach (a fork server's template)."""

    async def release_disk(self, image: str) -> None:
        """A plugin's workers are stopped for good (or until its disk is made anew): let go of its
        disk if the launcher keeps it (a fork server's template does, for its life)."""

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


class _SpawnedWorker:
    def __init__(self, proc: asyncio.subprocess.Process, spec: LaunchSpec) -> None:
        self._proc = proc
        self.pid = proc.pid
        self.output = OutputLimit(spec.plugin, spec.log_lines_per_second)
        self.output.redact = spec.redact
        self.output.ring = spec.ring
        self.output.pid = proc.pid
        self._pumps = start_output_pumps(spec.plugin, proc.stdout, proc.stderr, self.output)

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        code = await self._proc.wait()
        await finish_worker_group(self.pid, self._pumps, self._proc._transport.close)  # type: ignore[attr-defined]
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

    def helper_pids(self) -> set[int]:
        return set()

    def prepare(self) -> None:
        pass  # nothing shared to start: each worker is an interpreter of its own

    async def release_disk(self, image: str) -> None:
        pass  # each worker's first process holds its disk, and it ends with the worker

    def command(self, spec: LaunchSpec, env_fd: int) -> tuple[list[str], dict[str, str]]:
        """The interpreter's argv and environment: it forks the worker as the template would."""
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", p.COOKIE_KEY: p.COOKIE_VALUE,
               p.SPAWN_KEY: msgspec.json.encode(spec.request()).decode()}
        return [sys.executable, "-I", "-S", "-c", BOOT, spec.import_root, str(spec.read_fd), str(spec.write_fd),
                str(env_fd), str(os.getpid())], env

    async def launch(self, spec: LaunchSpec) -> WorkerProcess:
        env_fd = spec.environment_fd()
        try:
            argv, env = self.command(spec, env_fd)
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env, cwd="/", pass_fds=(spec.read_fd, spec.write_fd, env_fd),
                start_new_session=True)
        finally:
            os.close(env_fd)
        return _SpawnedWorker(proc, spec)

    async def close(self) -> None:
        pass
