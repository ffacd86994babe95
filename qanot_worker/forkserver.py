"""The worker template: a process that has already imported the worker runtime and forks a worker
per request, so a worker starts in milliseconds and shares the runtime's pages with its siblings.

It runs isolated exactly like a spawned worker (``python -I -S``, scrubbed environment, only the
import root on its path) and imports no plugin code itself. Each child gets its own session, fds,
working directory and environment before any plugin code runs, then serves exactly as a spawned
worker does. The template reaps its children and tells the host their exit codes; it dies with
the host (parent-death signal), and its workers die with it.
"""

from __future__ import annotations

import array
import gc
import os
import select
import signal
import socket
import sys
import traceback

import msgspec

from . import protocol as p
from .main import COOKIE_KEY, COOKIE_VALUE, _die_with_parent, main
# Imported here, before any fork, so that every worker shares them instead of importing its own.
from . import loader, plugin_api, server  # noqa: F401
import asyncio  # noqa: E402,F401
import json  # noqa: E402,F401
import logging  # noqa: E402,F401

try:
    import uvloop  # noqa: F401
except ImportError:
    pass

__all__ = ["serve_template"]

FDS_PER_SPAWN = 4
PR_SET_NAME = 15


def serve_template(sock_fd: int, host_pid: int) -> int:
    if os.environ.pop(COOKIE_KEY, None) != COOKIE_VALUE:
        sys.stderr.write("qanot_worker: this is the worker template of qanot-host; the host starts it\n")
        return 2
    _die_with_parent(host_pid)
    sock = socket.socket(fileno=sock_fd)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(p.Spawn)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sock.send(encoder.encode(p.TemplateReady(os.getpid())))
    # Objects made so far are never collected again: forked children then do not dirty (copy) the
    # pages that hold them when their own collector runs.
    gc.freeze()
    while True:
        readable, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in readable:
            _drain(wake_r)
            _reap(sock, encoder)
        if sock in readable:
            message, fds = _receive(sock)
            if message is None:
                return 0  # the host closed its end: our workers die with us (parent-death signal)
            request = decoder.decode(message)
            pid, error = _fork_worker(request, fds, sock, (wake_r, wake_w))
            sock.send(encoder.encode(p.Spawned(request.id, pid, error)))


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


def _fork_worker(request: p.Spawn, fds: list[int], sock: socket.socket,
                 wake: tuple[int, int]) -> tuple[int, str]:
    if len(fds) != FDS_PER_SPAWN:
        for fd in fds:
            os.close(fd)
        return 0, f"expected {FDS_PER_SPAWN} fds, got {len(fds)}"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError as exc:
        pid, error = 0, f"fork failed: {exc.strerror}"
    else:
        error = ""
        if pid == 0:
            _become_worker(request, fds, sock, wake)  # never returns
    for fd in fds:
        os.close(fd)
    if pid and request.cgroup_procs:
        # Before Spawned goes out: the host loads plugin code only after it, so the plugin never
        # runs outside its pids cgroup; meanwhile the child gets on with its own start.
        try:
            with open(request.cgroup_procs, "w") as f:
                f.write(str(pid))
        except OSError as exc:
            sys.stderr.write(f"could not put worker {pid} in {request.cgroup_procs}: {exc.strerror}\n")
    return pid, error


def _become_worker(request: p.Spawn, fds: list[int], sock: socket.socket, wake: tuple[int, int]) -> None:
    code = 70
    try:
        read_fd, write_fd, out_fd, err_fd = fds
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock.close()
        for fd in wake:
            os.close(fd)
        os.setsid()
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        os.close(out_fd)
        os.close(err_fd)
        os.chdir(request.cwd)
        os.environ.clear()
        os.environ.update(request.env)
        import random
        random.seed()  # a forked child would otherwise repeat its siblings' random numbers
        gc.unfreeze()
        _name_process(f"qanot:{request.plugin}")
        code = main([str(read_fd), str(write_fd), str(request.max_frame), str(os.getppid())])
    except SystemExit as exc:  # what `python -c` would turn into the exit status
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _name_process(name: str) -> None:
    """Forked workers share the template's command line; give `ps` and `top` the plugin's name."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _reap(sock: socket.socket, encoder: msgspec.msgpack.Encoder) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.send(encoder.encode(p.Exited(pid, os.waitstatus_to_exitcode(status))))
