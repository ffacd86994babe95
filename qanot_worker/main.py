"""Entry point of a worker process: check the cookie, arm the parent-death signal, enter the
sandbox, serve.

A launcher forks it (spawner.py) from a process that started as ``python -I -S``: isolated mode and
no site, so nothing from the host's environment (PYTHON* variables, .pth files, sitecustomize) runs
before the worker is in control.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import msgspec

from . import eventloop, linux
from . import protocol as p
from .log_stream import install_log_stream
from .sandbox import SandboxOutcome, SandboxRefused, apply_sandbox
from .server import serve

__all__ = ["main"]

# Built at import, so in the worker template before it forks (msgspec compiles the type on first
# use, about a millisecond that every worker would otherwise spend on its own).
SANDBOX_SPEC = msgspec.json.Decoder(p.SandboxSpec)


def main(argv: list[str]) -> int:
    if os.environ.pop(p.COOKIE_KEY, None) != p.COOKIE_VALUE:
        sys.stderr.write("qanot_worker: this is a plugin worker of qanot-host; the host starts it\n")
        return 2
    read_fd, write_fd, max_frame, parent_pid, go_fd = (int(arg) for arg in argv[:5])
    _die_with_parent(parent_pid)
    # A plugin's print() reaches the host's log (and `qanot-host logs`) when it is made, not when 8 KiB
    # have gathered or the worker ends: stdout is a pipe, which Python would fill block by block.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    # Never a bytecode cache in the plugin's directory (a worker with the sandbox off could write one):
    # it is part of what the directory's fingerprint reads, and only its author's files belong there.
    sys.dont_write_bytecode = True
    install_log_stream()
    # The sandbox goes up before the event loop exists: libuv sets up an io_uring at loop creation
    # that seccomp would later deny (libuv aborts on that); created inside the sandbox, the loop
    # falls back to epoll. Plugin code comes later still, on Load.
    sandbox = _enter_sandbox()
    # Meanwhile the launcher puts us in our cgroups; serve() waits for that before its Hello.
    return eventloop.run(serve(read_fd, write_fd, max_frame, sandbox, go_fd), audited=True)


def _enter_sandbox() -> SandboxOutcome:
    raw = os.environ.pop(p.SANDBOX_KEY, None)
    disk = os.environ.pop(p.DISK_KEY, "")
    plugin = os.environ.pop(p.PLUGIN_KEY, "?")  # the host's, not the plugin's: gone before its code runs
    if raw is None:
        if disk.startswith("fd:"):
            os.close(int(disk[3:]))
        return SandboxOutcome()
    spec = SANDBOX_SPEC.decode(raw)
    began = time.perf_counter()
    try:
        outcome = apply_sandbox(spec, plugin, disk)
    except SandboxRefused as exc:
        return SandboxOutcome(refused=str(exc))
    outcome.milliseconds = 1000 * (time.perf_counter() - began)
    return outcome


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGKILL when the parent (the launcher, or the init of the worker's own
    PID namespace) dies, so a SIGKILLed host leaves no orphans."""
    try:
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        return
    if os.getppid() != parent_pid:
        os._exit(0)  # the parent died between fork and prctl: nobody will ever talk to us
