"""The host's own open-files limit, raised as far as it may go: each worker holds a few of the host's
descriptors (its two protocol pipes and its stdout and stderr), so a host left at the usual soft
limit of 1024 runs out of descriptors at about 250 workers, and every start after that fails.

Workers never inherit the raised limit: the sandbox sets theirs (host.sandbox.rlimits.nofile).
"""

from __future__ import annotations

import logging
import os
import resource

__all__ = ["raise_open_files_limit", "FDS_PER_WORKER", "RESERVED_FDS"]

log = logging.getLogger("qanot_host")

FDS_PER_WORKER = 5  # measured: 200 workers, 812 descriptors in the host, and its cpuacct.usage kept open
RESERVED_FDS = 64  # the host's own: log files, sockets, the metrics port, uv, the control socket


def raise_open_files_limit() -> int:
    """Soft limit up to the hard one; as root, both up to the kernel's fs.nr_open. The limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard
    if os.geteuid() == 0:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                wanted = max(hard, int(f.read()))
        except (OSError, ValueError):
            pass
    for target in dict.fromkeys((wanted, hard)):  # the kernel's ceiling, else the hard limit
        if target == resource.RLIM_INFINITY or target <= soft:
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(target, hard)))
            soft = target
            break
        except (ValueError, OSError):
            continue
    log.info("open files: limit %d, room for about %d workers", soft, max(0, (soft - RESERVED_FDS) // FDS_PER_WORKER))
    return soft
