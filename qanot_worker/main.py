"""Entry point of a worker process: check the cookie, arm the parent-death signal, serve.

The host starts it as ``python -I -S -c BOOT RUNTIME_DIR READ_FD WRITE_FD MAX_FRAME HOST_PID``: isolated
mode and no site, so nothing from the host's environment (PYTHON* variables, .pth files,
sitecustomize) runs before the worker is in control.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time

import msgspec

from . import eventloop
from . import protocol as p
from .sandbox import SandboxOutcome, SandboxRefused, apply_sandbox
from .server import serve

__all__ = ["main", "COOKIE_KEY", "COOKIE_VALUE", "SANDBOX_KEY", "PLUGIN_KEY"]

# Not a secret: it only stops someone from running a worker by hand and wondering why it hangs.
COOKIE_KEY = "QANOT_WORKER_COOKIE"
COOKIE_VALUE = "d1b4a8a0f3c94e39a7e1"
# The sandbox to enter (JSON of protocol.SandboxSpec) and the plugin's name, for its messages.
SANDBOX_KEY = "QANOT_WORKER_SANDBOX"
PLUGIN_KEY = "QANOT_WORKER_PLUGIN"

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    if os.environ.pop(COOKIE_KEY, None) != COOKIE_VALUE:
        sys.stderr.write("qanot_worker: this is a plugin worker of qanot-host; the host starts it\n")
        return 2
    read_fd, write_fd, max_frame, host_pid = (int(arg) for arg in argv[:4])
    _die_with_parent(host_pid)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    # The sandbox goes up before the event loop exists: libuv sets up an io_uring at loop creation
    # that seccomp would later deny (libuv aborts on that); created inside the sandbox, the loop
    # falls back to epoll. Plugin code comes later still, on Load.
    sandbox = _enter_sandbox()
    return eventloop.run(serve(read_fd, write_fd, max_frame, sandbox))


def _enter_sandbox() -> SandboxOutcome:
    raw = os.environ.pop(SANDBOX_KEY, None)
    if raw is None:
        return SandboxOutcome()
    spec = msgspec.json.decode(raw, type=p.SandboxSpec)
    began = time.perf_counter()
    try:
        layers, warnings, egress_fd = apply_sandbox(spec, os.environ.get(PLUGIN_KEY, "?"))
    except SandboxRefused as exc:
        return SandboxOutcome(refused=str(exc))
    return SandboxOutcome(layers, warnings, milliseconds=1000 * (time.perf_counter() - began),
                          cgroup_to_verify=spec.cgroup_procs if spec.cgroup_joined_by_parent else "",
                          strict=spec.strict, egress_fd=egress_fd)


def _die_with_parent(host_pid: int) -> None:
    """Ask the kernel for SIGKILL when the host dies, so a SIGKILLed host leaves no orphans."""
    if not sys.platform.startswith("linux"):
        return  # pipe EOF still ends the worker elsewhere
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != host_pid:
        # The host died between fork and prctl: nobody will ever talk to us.
        os._exit(0)
