"""A seccomp deny-list, written as classic BPF by hand (importing a libseccomp binding at every
worker start costs 14-20 ms; this costs a fraction of one).

Denied with EPERM: ptrace and reading other processes' memory, every way to mount or change
namespaces, module and kexec loading, reboot, bpf, perf_event_open, userfaultfd, the keyring,
io_uring, native AIO, splice/tee/vmsplice, memfd_secret, open_by_handle_at, raw port I/O, swap,
clock setters, mknod, socket() for AF_UNIX, NETLINK, PACKET, VSOCK and ALG (socketpair stays),
ioctl(TIOCSTI), fcntl(F_SETLEASE), huge pages (MAP_HUGETLB, SHM_HUGETLB, MFD_HUGETLB),
TCP_ZEROCOPY_RECEIVE; clone with namespace flags, and a thread without CLONE_FILES; and
clone3 answers ENOSYS so glibc falls back to clone, where flags can be checked, and TCP Fast Open
sends (a connect hidden in sendto/sendmsg, which the egress listener would not see). Without the
subprocess permission, execve and every clone that is not a thread are denied too.

A second filter, when the plugin's network is narrowed to host:port pairs, hands every connect() to
a listener (SECCOMP_RET_USER_NOTIF): the host answers for the kernel (qanot_host/egress.py). It
also refuses listen() and accept(), and keeps socket buffer sizes as the host set them.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import platform
import struct

__all__ = ["install_seccomp", "install_connect_listener", "warm_up"]

# x86_64 only for now; another architecture reports the layer as missing rather than guess numbers.
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
DENY = {
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "pidfd_getfd": 438,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
    "unshare": 272, "setns": 308, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175,
    "finit_module": 313, "delete_module": 176, "reboot": 169, "bpf": 321, "perf_event_open": 298,
    "userfaultfd": 323, "add_key": 248, "request_key": 249, "keyctl": 250, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "open_by_handle_at": 304, "iopl": 172,
    "ioperm": 173, "swapon": 167, "swapoff": 168, "settimeofday": 164, "clock_settime": 227,
    "adjtimex": 159, "clock_adjtime": 305, "mknod": 133, "mknodat": 259,
    # what no plugin needs and a privileged one could misuse: watching the host's whole file
    # system (and holding its opens), the kernel log, process accounting, the host's names
    "fanotify_init": 300, "fanotify_mark": 301, "syslog": 103, "acct": 163, "sethostname": 170,
    "setdomainname": 171,
    # Linux native AIO: its ceiling (fs.aio-max-nr) is one count for the whole machine, charged to no
    # cgroup, so one io_setup(65536) left every other process's io_setup (a database's) EAGAIN
    "io_setup": 206, "io_destroy": 207, "io_getevents": 208, "io_submit": 209, "io_cancel": 210,
    "io_pgetevents": 333,
    # data moved from a socket into pipes leaves the socket's count and is charged to no memory cgroup
    # (a host-made socket of a narrowed network: 387 MB held through one connection and 60 pipes)
    "splice": 275, "tee": 276, "vmsplice": 278,
    # secret memory is taken out of the kernel's direct map, which splits its large pages for the whole
    # machine until reboot (one 32 MiB run split 12 GiB of 1 GiB pages), and it escapes RLIMIT_MEMLOCK
    "memfd_secret": 447,
    # any file system of the machine by device number: another plugin's disk, how full it is, live (the
    # very figures /proc/diskstats is masked for; attack pass 68), and the kernel's file system types
    "ustat": 136, "sysfs": 139,
    # the new mount API's latest (Linux 6.15), with the rest of it
    "open_tree_attr": 467,
    # a local descriptor table: for 16-bit code (Wine, DOSEMU), never Python's, and kernel code with a
    # history of holes that only this call reaches
    "modify_ldt": 154,
}
# Calls that may aim at other processes: only at the worker itself here, (argument, value) pairs that
# must all hold. A worker shares its uid with nobody, unless identity is off: then it shares the
# host's, and could lower the host's limits (RLIMIT_CPU: the kernel kills the host), its priority
# (PRIO_USER reaches every process of the uid), or, with SHARED_UID_SELF_ONLY, its CPUs and policy.
SELF_ONLY = {"prlimit64": (302, [(0, 0)]), "setpriority": (141, [(0, 0), (1, 0)]),  # PRIO_PROCESS, itself
             "ioprio_set": (251, [(0, 1), (1, 0)])}  # IOPRIO_WHO_PROCESS, itself
SHARED_UID_SELF_ONLY = {"sched_setparam": (142, [(0, 0)]), "sched_setscheduler": (144, [(0, 0)]),
                        "sched_setaffinity": (203, [(0, 0)]), "sched_setattr": (314, [(0, 0)])}
# A file mode with setuid or setgid (S_ISUID | S_ISGID) is refused: a worker that keeps uid 0 would
# otherwise leave root shells in its workspace or grants for anyone on the host. (syscall, mode arg)
MODE_SETTERS = {"open": (2, 2), "creat": (85, 1), "chmod": (90, 1), "fchmod": (91, 1), "openat": (257, 3),
                "fchmodat": (268, 2), "fchmodat2": (452, 2)}
SET_ID_BITS = 0o6000
# Huge pages come from the machine's pool (vm.nr_hugepages, which an operator reserves for a database),
# charged to no memory cgroup: (syscall, flags argument, flag) refused. mmap(MAP_HUGETLB),
# shmget(SHM_HUGETLB), memfd_create(MFD_HUGETLB).
HUGE_PAGE_FLAGS = {"mmap": (9, 3, 0x40000), "shmget": (29, 2, 0o4000), "memfd_create": (319, 1, 0x4)}
OPENAT2 = 437  # its mode is in a struct the filter cannot read: ENOSYS, as an old kernel says
DENY_WITHOUT_SUBPROCESS = {"execve": 59, "execveat": 322, "fork": 57, "vfork": 58}
# A worker that may execve (subprocess, an MCP server) gets no memfd: vm.memfd_noexec stops an
# execve of one, but the ELF loader it may run maps code from any file it can open, a memfd's
# /proc/self/fd/N included (noexec mounts are what stop that for the files it writes).
DENY_WITH_SUBPROCESS = {"memfd_create": 319}
CLONE, CLONE3, SOCKET, IOCTL, CONNECT = 56, 435, 41, 16, 42
SENDTO, SENDMSG, SENDMMSG = 44, 46, 307  # flags are arg 3, 2 and 3
# A pidfd of its namespace's init (PID 1, out of its sight in /proc) told its uid and cgroup, though
# nothing could be done with it (attack pass 46): refused. Any other process's, its own among them,
# is as the kernel decides.
PIDFD_OPEN, INIT_PID = 434, 1
LISTEN, ACCEPT, ACCEPT4, SETSOCKOPT = 50, 43, 288, 54
SOL_SOCKET = 1
BUFFER_OPTIONS = (7, 8, 32, 33)  # SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE
MSG_FASTOPEN = 0x20000000
CLONE_THREAD = 0x00010000
CLONE_FILES = 0x00000400  # a thread without it has a descriptor table of its own, which no count of the
# host's reads (attack pass 30 hid 1000 host-made sockets so): threads must share the process's
GETSOCKOPT, IPPROTO_TCP, TCP_ZEROCOPY_RECEIVE = 55, 6, 35  # received pages mapped into the plugin,
# charged to no cgroup: 704 MB pinned through one host-made connection (attack pass 31)
CLONE_NEW_ANY = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x00000080
DENIED_FAMILIES = (1, 16, 17, 38, 40)  # AF_UNIX, AF_NETLINK, AF_PACKET, AF_ALG, AF_VSOCK
TIOCSTI = 0x5412
# A lease on a file it owns (its workspace place, which the agent reads) would make every other
# process's open() of that file wait for fs.lease-break-time (45 s), root's included.
FCNTL, F_SETLEASE = 72, 1024

# classic BPF
LD_W_ABS, JA, JEQ_K, JGE_K, JSET_K, RET_K = 0x20, 0x05, 0x15, 0x35, 0x45, 0x06
RET_ALLOW = 0x7FFF0000
RET_KILL = 0x80000000  # SECCOMP_RET_KILL_PROCESS: a foreign-architecture syscall is an attack
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
RET_USER_NOTIF = 0x7FC00000
SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER = 317, 1, 1 << 3
OFF_NR, OFF_ARCH, OFF_ARG0 = 0, 4, 16


def _arg(index: int) -> int:
    return OFF_ARG0 + 8 * index  # the low 32 bits, little-endian


def _errno(code: int) -> int:
    return 0x00050000 | code  # SECCOMP_RET_ERRNO


def _op(code: int, k: int, jt: int = 0, jf: int = 0) -> tuple[int, int, int, int]:
    return (code, jt, jf, k)


def _program(subprocess: bool, shares_uid: bool = False) -> list[tuple[int, int, int, int]]:
    eperm = _errno(errno.EPERM)
    prog = [_op(LD_W_ABS, OFF_ARCH), _op(JEQ_K, AUDIT_ARCH_X86_64, 1, 0), _op(RET_K, RET_KILL),
            _op(LD_W_ABS, OFF_NR), _op(JGE_K, X32_SYSCALL_BIT, 0, 1), _op(RET_K, eperm)]
    denied = dict(DENY)
    denied.update(DENY_WITH_SUBPROCESS if subprocess else DENY_WITHOUT_SUBPROCESS)
    # One test per denied call, all jumping to one shared RET: half the instructions of a RET each,
    # and the kernel's cost of taking the filter (checking and compiling it) goes by its length.
    numbers = sorted(set(denied.values()))
    if len(numbers) > 255:
        raise ValueError(f"{len(numbers)} denied calls: a jump of classic BPF reaches 255 instructions at most")
    prog += [_op(JEQ_K, number, len(numbers) - i, 0) for i, number in enumerate(numbers)]
    prog += [_op(JA, 1), _op(RET_K, eperm)]
    prog += [_op(JEQ_K, CLONE3, 0, 1), _op(RET_K, _errno(errno.ENOSYS))]
    prog += [_op(JEQ_K, OPENAT2, 0, 1), _op(RET_K, _errno(errno.ENOSYS))]
    clone = [_op(LD_W_ABS, OFF_ARG0), _op(JSET_K, CLONE_NEW_ANY, 0, 1), _op(RET_K, eperm),
             _op(JSET_K, CLONE_THREAD, 0, 2), _op(JSET_K, CLONE_FILES, 1, 0), _op(RET_K, eperm)]
    clone += [_op(RET_K, RET_ALLOW)] if subprocess else [
        _op(JSET_K, CLONE_THREAD, 0, 1), _op(RET_K, RET_ALLOW), _op(RET_K, eperm)]
    prog += [_op(JEQ_K, CLONE, 0, len(clone))] + clone
    sock = [_op(LD_W_ABS, OFF_ARG0)]
    for family in DENIED_FAMILIES:
        sock += [_op(JEQ_K, family, 0, 1), _op(RET_K, eperm)]
    sock.append(_op(RET_K, RET_ALLOW))
    prog += [_op(JEQ_K, SOCKET, 0, len(sock))] + sock
    aimed = {**SELF_ONLY, **(SHARED_UID_SELF_ONLY if shares_uid else {})}
    for number, required in aimed.values():
        checks = []
        for index, value in required:  # any argument that differs: EPERM
            checks += [_op(LD_W_ABS, _arg(index)), _op(JEQ_K, value, 1, 0), _op(RET_K, eperm)]
        checks.append(_op(RET_K, RET_ALLOW))
        prog += [_op(LD_W_ABS, OFF_NR), _op(JEQ_K, number, 0, len(checks))] + checks
    for number, flags_arg, flag in HUGE_PAGE_FLAGS.values():
        prog += [_op(LD_W_ABS, OFF_NR)] + _refused_when(number, flags_arg, JSET_K, flag)
    prog += [_op(LD_W_ABS, OFF_NR)] + _refused_when(PIDFD_OPEN, 0, JEQ_K, INIT_PID)
    for number, mode_arg in MODE_SETTERS.values():
        prog += [_op(LD_W_ABS, OFF_NR)] + _refused_when(number, mode_arg, JSET_K, SET_ID_BITS)
    zerocopy = [_op(LD_W_ABS, _arg(1)), _op(JEQ_K, IPPROTO_TCP, 0, 3), _op(LD_W_ABS, _arg(2)),
                _op(JEQ_K, TCP_ZEROCOPY_RECEIVE, 0, 1), _op(RET_K, eperm), _op(RET_K, RET_ALLOW)]
    prog += [_op(LD_W_ABS, OFF_NR), _op(JEQ_K, GETSOCKOPT, 0, len(zerocopy))] + zerocopy
    prog.append(_op(LD_W_ABS, OFF_NR))  # each block below leaves it loaded for the next when it does not match
    prog += _refused_when(IOCTL, 1, JEQ_K, TIOCSTI)
    prog += _refused_when(FCNTL, 1, JEQ_K, F_SETLEASE)
    for number, flags_arg in ((SENDTO, 3), (SENDMSG, 2), (SENDMMSG, 3)):
        prog += _refused_when(number, flags_arg, JSET_K, MSG_FASTOPEN)
    prog.append(_op(RET_K, RET_ALLOW))
    return prog


def _refused_when(number: int, arg: int, test: int, value: int) -> list[tuple[int, int, int, int]]:
    """With the syscall number loaded: syscall `number` is refused (EPERM) when its argument `arg`
    equals `value` (test JEQ_K) or has any of its bits (JSET_K), and allowed otherwise."""
    block = [_op(LD_W_ABS, _arg(arg)), _op(test, value, 0, 1), _op(RET_K, _errno(errno.EPERM)),
             _op(RET_K, RET_ALLOW)]
    return [_op(JEQ_K, number, 0, len(block))] + block


_libc = ctypes.CDLL(None, use_errno=True)


def warm_up() -> None:
    """Build the filters now (the template calls this before it forks)."""
    for subprocess in (True, False):
        for shares_uid in (True, False):
            _compiled(subprocess, shares_uid)
    _compiled_listener()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _Filter:
    """A program as the kernel takes it (struct sock_fprog), built in the worker template before
    any fork: a worker only hands its address to the kernel. Made in the worker, the ctypes array
    type and buffer behind it cost 0.2 ms of every start (measured in a freshly forked child)."""

    def __init__(self, prog: list[tuple[int, int, int, int]]) -> None:
        raw = b"".join(struct.pack("=HBBI", *insn) for insn in prog)
        self.count = len(prog)
        self._buffer = ctypes.create_string_buffer(raw, len(raw))  # lives as long as the filter
        self.fprog = _SockFprog(len(prog), ctypes.cast(self._buffer, ctypes.c_void_p))


@functools.lru_cache(maxsize=None)
def _compiled(subprocess: bool, shares_uid: bool = False) -> _Filter:
    """The deny-list, one of four: warm_up() makes them all in the template, before any fork."""
    return _Filter(_program(subprocess, shares_uid))


@functools.lru_cache(maxsize=None)
def _compiled_listener() -> _Filter:
    """The connect() listener's filter, made in the template as the deny-lists are."""
    return _Filter(_narrowed_network_program())


def install_seccomp(subprocess: bool, shares_uid: bool = False) -> tuple[bool, str]:
    """Load the filter into this process (no_new_privs must already be set). `shares_uid`: the worker
    kept the host's uid (identity off), so calls aimed at other processes are narrowed further."""
    if platform.machine() != "x86_64":
        return False, f"no syscall table for {platform.machine()} yet"
    compiled = _compiled(subprocess, shares_uid)
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(compiled.fprog), 0, 0) != 0:
        return False, f"prctl(PR_SET_SECCOMP) failed: {errno.errorcode.get(ctypes.get_errno(), '?')}"
    return True, f"{compiled.count} instructions"


def _narrowed_network_program() -> list[tuple[int, int, int, int]]:
    """connect() goes to the listener; listen() and accept() are refused (a socket the host made,
    disconnected while still connecting, would otherwise listen in the host's namespace); and the
    buffer sizes of a socket stay the host's (setting them answers 0 and does nothing), so a host
    socket's memory, which no cgroup of the plugin's counts, stays small."""
    eperm = _errno(errno.EPERM)
    sockopt = [_op(LD_W_ABS, _arg(1)), _op(JEQ_K, SOL_SOCKET, 0, 1 + 2 * len(BUFFER_OPTIONS)),
               _op(LD_W_ABS, _arg(2))]
    for option in BUFFER_OPTIONS:
        sockopt += [_op(JEQ_K, option, 0, 1), _op(RET_K, _errno(0))]
    sockopt.append(_op(RET_K, RET_ALLOW))
    prog = [_op(LD_W_ABS, OFF_ARCH), _op(JEQ_K, AUDIT_ARCH_X86_64, 1, 0), _op(RET_K, RET_KILL),
            _op(LD_W_ABS, OFF_NR), _op(JEQ_K, CONNECT, 0, 1), _op(RET_K, RET_USER_NOTIF)]
    for number in (LISTEN, ACCEPT, ACCEPT4):
        prog += [_op(JEQ_K, number, 0, 1), _op(RET_K, eperm)]
    prog += [_op(JEQ_K, SETSOCKOPT, 0, len(sockopt))] + sockopt
    prog.append(_op(RET_K, RET_ALLOW))
    return prog


def install_connect_listener() -> tuple[int, str]:
    """Send every connect() of this process (and its threads and children) to a listener; returns
    (listener fd, "") or (-1, why not). Until someone answers, a connect waits; once nobody holds
    the listener, every connect fails with ENOSYS: closed, never open."""
    if platform.machine() != "x86_64":
        return -1, f"no syscall table for {platform.machine()} yet"
    fd = _libc.syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER,
                       ctypes.byref(_compiled_listener().fprog))
    if fd < 0:
        return -1, f"seccomp(NEW_LISTENER) failed: {errno.errorcode.get(ctypes.get_errno(), '?')}"
    return fd, ""
