"""The worker template: a process that has already imported the worker runtime and forks a worker
per request, so a worker starts in milliseconds and shares the runtime's pages with its siblings.

It runs isolated exactly like a spawned worker (``python -I -S``, scrubbed environment, only the
import root on its path) and imports no plugin code itself. It forks each worker (with its init,
in a PID namespace of its own: spawner.py), puts it in its cgroups before any plugin code can run,
attaches each plugin's disk once and keeps it, reaps its children and tells the host their exit
codes.

It dies with the host: its parent-death signal is SIGTERM, on which it kills what is left in the
cgroups it placed workers in and removes them, so even a SIGKILLed host leaves no process and no
cgroup behind (each worker's init also dies with the template, and its namespace with it).
"""

from __future__ import annotations

import array
import gc
import os
import resource
import select
import signal
import socket
import sys
import time

import msgspec

from . import linux
from . import protocol as p
from .disk import DiskBusy, DiskError, attach_disk
from . import seccomp
from .main import main
from .spawner import Forker
# Imported here, before any fork, so that every worker shares them instead of importing its own.
from . import loader, namespaces, plugin_api, sandbox, server  # noqa: F401
import asyncio  # noqa: E402,F401
import json  # noqa: E402,F401
import logging  # noqa: E402,F401

try:
    import uvloop  # noqa: F401
except ImportError:
    pass

__all__ = ["serve_template", "run_spawned"]

FDS_PER_SPAWN = 5  # protocol read, protocol write, stdout, stderr, environment
CLEANUP_SECONDS = 2.0


class Template:
    def __init__(self, sock: socket.socket, host_pid: int) -> None:
        self.sock = sock
        self.host_pid = host_pid
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(p.TemplateRequest)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.forker = Forker()
        self.disks: dict[str, int] = {}  # image -> detached mount, kept for the template's life
        self.cgroups: set[str] = set()  # every cgroup a worker was put in: emptied when we go
        self.host_gone = False

    def serve(self) -> int:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_host_death)
        self.sock.send(self.encoder.encode(p.TemplateReady(os.getpid())))
        _warm_up()
        # Objects made so far are never collected again: forked children then do not dirty (copy)
        # the pages that hold them when their own collector runs.
        gc.freeze()
        try:
            while not self.host_gone:
                readable, _, _ = select.select([self.sock.fileno(), self.wake_r], [], [])
                if self.wake_r in readable:
                    _drain(self.wake_r)
                    self._reap()
                if self.sock.fileno() in readable and not self._serve_one():
                    return 0  # the host closed its end
            return 0
        finally:
            self._clean_up()

    def _on_host_death(self, *_: object) -> None:
        self.host_gone = True

    def _serve_one(self) -> bool:
        message, fds = _receive(self.sock)
        if message is None:
            return False
        if not message:
            return True
        request = self.decoder.decode(message)
        if isinstance(request, p.ReleaseDisk):
            for fd in fds:
                os.close(fd)
            self._release_disk(request.image)
            return True
        pid, error = self._fork(request, fds)
        self.sock.send(self.encoder.encode(p.Spawned(request.id, pid, error)))
        return True

    def _fork(self, request: p.Spawn, fds: list[int]) -> tuple[int, str]:
        if len(fds) != FDS_PER_SPAWN:
            for fd in fds:
                os.close(fd)
            return 0, f"expected {FDS_PER_SPAWN} fds, got {len(fds)}"
        self.cgroups.update(os.path.dirname(procs) for procs in request.cgroup_procs)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = self.forker.fork(request, fds, self._disk(request), _run_worker)
        except DiskBusy as exc:
            return 0, f"{exc}; the worker does not start without its disk (its files are there)"
        except OSError as exc:
            return 0, f"fork failed: {exc.strerror or exc}"
        finally:
            for fd in fds:
                os.close(fd)
        return pid, ""

    def _disk(self, request: p.Spawn) -> tuple[int, str]:
        if not request.disk:
            return -1, ""
        fd = self.disks.get(request.disk)
        if fd is None:
            try:
                fd = self.disks[request.disk] = attach_disk(request.disk, request.uid)
            except DiskBusy:
                raise
            except DiskError as exc:
                return -1, exc.setting()
        return fd, ""

    def _release_disk(self, image: str) -> None:
        fd = self.disks.pop(image, None)
        if fd is not None:
            os.close(fd)  # its workers' copies go with them; then the loop device detaches itself (and
            # lets go of the image's lock: attaching it again waits for that)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            try:
                self.sock.send(self.encoder.encode(p.Exited(pid, self.forker.exit_code(pid, status))))
            except OSError:
                pass  # the host is gone; we are about to follow

    def _clean_up(self) -> None:
        """Kill what is left in the workers' cgroups and remove them: after a host's death, or a host
        that failed on its way up, nobody else will."""
        groups = sorted(self.cgroups, key=len, reverse=True)
        deadline = time.monotonic() + CLEANUP_SECONDS
        for group in groups:
            while _kill_members(group) and time.monotonic() < deadline:
                time.sleep(0.01)
                self._reap()
        for group in groups:  # the host removes them too; whoever comes first, nothing is left
            for directory in (group, os.path.dirname(group)):
                try:
                    os.rmdir(directory)
                except OSError:
                    pass


def _warm_up() -> None:
    """What every worker would otherwise do for itself, done once before any fork: the seccomp
    filters compiled, and the `qanot` shim imported (a plugin's first import; no worker may write
    its bytecode cache, so each compiled it from source, about two milliseconds). Only the template
    imports the shim: the host may have the real `qanot` installed."""
    seccomp.warm_up()
    try:
        import qanot.plugins.base  # noqa: F401
    except ImportError:
        pass  # the plugin's own import will say what is wrong


def _run_worker(request: p.Spawn, fds: list[int], parent_pid: int) -> int:
    read_fd, write_fd, go_fd = fds
    return main([str(read_fd), str(write_fd), str(request.max_frame), str(parent_pid), str(go_fd)])


def _kill_members(group: str) -> bool:
    """SIGKILL every process in a cgroup; True if there were any."""
    try:
        with open(os.path.join(group, "cgroup.procs")) as f:
            pids = [int(line) for line in f if line.strip()]
    except OSError:
        return False
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return bool(pids)


def serve_template(sock_fd: int, host_pid: int) -> int:
    if os.environ.pop(p.COOKIE_KEY, None) != p.COOKIE_VALUE:
        sys.stderr.write("qanot_worker: this is the worker template of qanot-host; the host starts it\n")
        return 2
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGTERM)  # handled: see Template._clean_up
    if os.getppid() != host_pid:
        return 0  # the host died before the signal was armed
    return Template(socket.socket(fileno=sock_fd), host_pid).serve()


def run_spawned(read_fd: int, write_fd: int, env_fd: int, host_pid: int) -> int:
    """The "spawn" launcher's worker: a fresh interpreter that forks its one worker (and its init)
    exactly as the template would, waits for it and exits as it did."""
    if os.environ.get(p.COOKIE_KEY) != p.COOKIE_VALUE:
        sys.stderr.write("qanot_worker: this is a plugin worker of qanot-host; the host starts it\n")
        return 2
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != host_pid:
        return 0
    request = msgspec.json.decode(os.environ.pop(p.SPAWN_KEY), type=p.Spawn)
    disk = (-1, "")
    if request.disk:
        try:
            disk = (attach_disk(request.disk, request.uid), "")
        except DiskBusy as exc:
            sys.stderr.write(f"{exc}; the worker does not start without its disk (its files are there)\n")
            return 75  # EX_TEMPFAIL: the host's restart policy tries again
        except DiskError as exc:
            disk = (-1, exc.setting())
    forker = Forker(new_session=False)
    fds = [read_fd, write_fd, os.dup(1), os.dup(2), env_fd]
    pid = forker.fork(request, fds, disk, _run_worker)
    for fd in fds:
        os.close(fd)
    if disk[0] >= 0:
        os.close(disk[0])  # the worker has its copy of the mount by the time it matters
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    code = forker.exit_code(pid, status)
    if code < 0:  # die the same way, so the host reports the worker's own signal
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code & 0xFF


def _receive(sock: socket.socket) -> tuple[bytes | None, list[int]]:
    fds = array.array("i")
    try:
        message, ancillary, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(FDS_PER_SPAWN * fds.itemsize))
    except InterruptedError:
        return b"", []
    if not message:
        return None, []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return message, list(fds)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
