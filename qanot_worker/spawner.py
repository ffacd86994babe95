"""How a worker process comes to be, for both launchers: the worker template forks one per request,
and a spawned worker's first process forks its one.

With namespaces, the forked child is the init (PID 1) of a PID namespace of its own, and the
worker is its only child. The init does nothing but reap: orphans a plugin leaves (a shell's
background job, a double-forked daemon) are reparented to it, and when it dies the kernel kills
every process in the namespace, setsid daemons included. It dies with its parent (the template, or
the spawned first process, which die with the host): a parent-death signal that is never cleared,
because the init never changes its credentials before arming it again. The worker is an ordinary
process (PID 2), so signals, os.abort() and os.kill(os.getpid(), ...) behave as they do anywhere.
The init reports the worker's exit status to its parent through a pipe, then exits.

Why not the worker as PID 1: signals without a handler do not reach a namespace's init, not even
from itself, and it would have to reap orphans without stealing the statuses its own subprocess
calls wait for.
"""

from __future__ import annotations

import gc
import os
import random
import signal
import struct
import sys
import traceback
from typing import Callable

import msgspec

from . import linux
from . import protocol as p

__all__ = ["Forker"]

STATUS = struct.Struct("=i")
RunWorker = Callable[[p.Spawn, list[int], int], int]


class Forker:
    """Forks workers (and their inits) and reads back their exit statuses."""

    def __init__(self, new_session: bool = True) -> None:
        # The template's workers each lead a session of their own (the host signals the group); a
        # spawned worker's first process leads one already, and its worker stays in it.
        self._new_session = new_session
        self._own_pid_ns = _open_or(f"/proc/{os.getpid()}/ns/pid")
        self._self_pidfd = _pidfd_or(os.getpid())
        self._status: dict[int, int] = {}  # pid of a namespace's init -> read end of its status pipe

    def fork(self, request: p.Spawn, fds: list[int], disk: tuple[int, str], run_worker: RunWorker) -> int:
        """Fork the worker for `request` (fds: its protocol read and write ends, stdout, stderr;
        disk: a detached mount, or -1 and DiskError.setting()); returns the pid to signal and wait for.
        `run_worker(request, [read_fd, write_fd, go_fd], parent_pid)` is the worker's main. The
        child keeps no descriptor of the parent's but these."""
        if not request.namespaces or self._own_pid_ns < 0:
            go_r, go_w = os.pipe2(os.O_CLOEXEC)
            pid = os.fork()
            if pid == 0:
                _child(lambda: _become_worker(request, fds, disk, go_r, self._new_session, run_worker),
                       keep=[*fds, disk[0], go_r])
            os.close(go_r)
            _place(pid, _not_by_itself(request.cgroup_procs))
            _go(go_w)
            return pid
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        linux.unshare(linux.CLONE_NEWPID)
        try:
            pid = linux.bare_fork()  # the init runs a few lines of ours, then os._exit: see bare_fork
        finally:
            if os.getpid() != 1:
                linux.setns(self._own_pid_ns, linux.CLONE_NEWPID)  # the next fork is ours again
        if pid == 0:
            _child(lambda: _init(request, fds, disk, status_w, self._self_pidfd, self._new_session, run_worker),
                   keep=[*fds, disk[0], status_w, self._self_pidfd])
        os.close(status_w)
        self._status[pid] = status_r
        return pid

    def exit_code(self, pid: int, wait_status: int) -> int:
        """The worker's exit code as subprocess reports it (negative: killed by that signal): the one
        its init passed on, or the init's own if it died first."""
        code = os.waitstatus_to_exitcode(wait_status)
        fd = self._status.pop(pid, -1)
        if fd >= 0:
            try:
                data = os.read(fd, STATUS.size)
            finally:
                os.close(fd)
            if len(data) == STATUS.size:
                code = STATUS.unpack(data)[0]
        return code


def _place(pid: int, cgroup_procs: list[str]) -> None:
    """Put a worker in the cgroups it cannot join by itself (the worker checks on Load)."""
    for procs in cgroup_procs:
        try:
            with open(procs, "w") as f:
                f.write(str(pid))
        except OSError as exc:
            sys.stderr.write(f"could not put worker {pid} in {procs}: {exc.strerror}\n")


def _place_itself(cgroup_procs: list[str]) -> None:
    """The worker, just forked, joins its cgroup v1 groups by itself: "0" written to a group's
    `tasks` file moves the writing thread, which spares the kernel's global threadgroup lock and
    the RCU grace period that moving a whole process (cgroup.procs) waits for: 0.7 ms against 10
    here, for every worker's start, and no start holds up every fork on the machine meanwhile.
    Moving one thread is moving the process only while it has no other: this runs first thing
    after fork, when it has none, and its threads to come are born where it is."""
    for procs in _by_itself(cgroup_procs):
        try:
            with open(os.path.join(os.path.dirname(procs), "tasks"), "w") as f:
                f.write("0")
        except OSError as exc:
            sys.stderr.write(f"could not join {os.path.dirname(procs)}: {exc.strerror}\n")


def _by_itself(cgroup_procs: list[str]) -> list[str]:
    """The groups a worker joins by itself: cgroup v1's, which have a `tasks` file (v2 has none)."""
    return [procs for procs in cgroup_procs if procs and os.path.exists(os.path.join(os.path.dirname(procs), "tasks"))]


def _not_by_itself(cgroup_procs: list[str]) -> list[str]:
    by_itself = _by_itself(cgroup_procs)
    return [procs for procs in cgroup_procs if procs and procs not in by_itself]


def _go(go_w: int) -> None:
    """Tell the worker to go on: it says Hello only after this, so no plugin code runs before its
    launcher has placed it and (an init) given up root."""
    try:
        os.write(go_w, b"g")
    except BrokenPipeError:
        pass  # the worker is gone already (the host is stopping): its exit is reported as any other
    os.close(go_w)


def _init(request: p.Spawn, fds: list[int], disk: tuple[int, str], status_w: int, parent_pidfd: int,
          new_session: bool, run_worker: RunWorker) -> int:
    """PID 1 of the worker's namespace: fork the worker, put it in the cgroups it cannot join by
    itself (cgroup v2's: moving a process waits for the kernel's RCU, milliseconds here, while the
    worker builds its sandbox), then reap."""
    _die_with(parent_pidfd)
    _name_process(f"qanot:init:{request.plugin}")
    if new_session:
        os.setsid()  # the worker's session and process group: the host signals the group
    _memfd_noexec()  # before the worker exists: it builds its sandbox (and looks) while this init goes on
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    worker = os.fork()
    if worker == 0:
        _child(lambda: _become_worker(request, fds, disk, go_r, False, run_worker), keep=[*fds, disk[0], go_r])
    os.close(go_r)
    _place(worker, _not_by_itself(request.cgroup_procs))
    _close_all_but([status_w, parent_pidfd, go_w])
    if request.uid >= 0:
        # The plugin's uid, and with the change no longer dumpable: a plugin cannot read or
        # trace its init through /proc/1 (its root is the host's).
        os.setgroups([])
        os.setresgid(request.uid, request.uid, request.uid)
        os.setresuid(request.uid, request.uid, request.uid)
    linux.prctl(linux.PR_SET_DUMPABLE, 0)  # also as root (identity off): /proc/1 stays closed
    _die_with(parent_pidfd)  # a change of credentials cleared the parent-death signal
    os.close(parent_pidfd)
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    _go(go_w)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 0
        if pid == worker:
            os.write(status_w, STATUS.pack(os.waitstatus_to_exitcode(status)))
            return 0  # the kernel now ends whatever else is left in the namespace


def _memfd_noexec() -> None:
    """No memfd of this PID namespace can be executed (vm.memfd_noexec=2, per PID namespace since
    Linux 6.3; set while still root): Landlock has no say over memfds, so a process allowed execve
    (an MCP server, a plugin granted subprocess) could otherwise run any bytes it wrote into one.
    The worker reports whether it took (the memfd-noexec layer)."""
    try:
        with open("/proc/sys/vm/memfd_noexec", "w") as f:
            f.write("2")
    except OSError:
        pass


def _become_worker(request: p.Spawn, fds: list[int], disk: tuple[int, str], go_r: int, new_session: bool,
                   run_worker: RunWorker) -> int:
    read_fd, write_fd, out_fd, err_fd, env_fd = fds
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)  # first, so that a failure to join is logged under the plugin's name
    _place_itself(request.cgroup_procs)  # then at once: few pages of its own are charged outside them
    if new_session:
        os.setsid()  # no init above it: the worker leads its own session and process group
    os.close(out_fd)
    os.close(err_fd)
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(_read_environment(env_fd))
    if request.disk:  # else the host has said (in env) why there is no disk
        os.environ[p.DISK_KEY] = f"fd:{disk[0]}" if disk[0] >= 0 else disk[1]  # DiskError.setting()
    random.seed()  # a forked child would otherwise repeat its siblings' random numbers
    gc.unfreeze()
    _name_process(f"qanot:{request.plugin}")
    return run_worker(request, [read_fd, write_fd, go_r], os.getppid())


def _read_environment(fd: int) -> dict[str, str]:
    try:
        size = os.fstat(fd).st_size
        return msgspec.json.decode(os.pread(fd, size, 0), type=dict[str, str])
    finally:
        os.close(fd)


def _child(body: Callable[[], int], keep: list[int]) -> None:
    """Run `body` in a freshly forked child and exit with its result; never returns."""
    code = 70
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        _close_all_but(keep)
        code = body()
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


def _close_all_but(keep: list[int]) -> None:
    """Close every descriptor above stderr but `keep`: nothing of the parent's (the template's
    socket, other workers' pipes and disks) reaches the plugin."""
    low = 3
    for fd in sorted({fd for fd in keep if fd >= 3}):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def _die_with(parent_pidfd: int) -> None:
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if not linux.parent_alive(parent_pidfd):
        os._exit(0)  # the parent died before the signal was armed: nobody will ever talk to us


def _name_process(name: str) -> None:
    """Forked workers share the template's command line; give `ps` and `top` the plugin's name."""
    try:
        linux.libc.prctl(linux.PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _open_or(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def _pidfd_or(pid: int) -> int:
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return -1
