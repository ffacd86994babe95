"""A pids cgroup per plugin, so a fork bomb stops at pids_max (RLIMIT_NPROC does nothing for root).

The host makes the group and sets its limit; the worker moves itself in before its plugin runs
(qanot_worker/sandbox.py). Where no pids controller can be written (no cgroups, no privilege), the
worker reports the layer as missing.
"""

from __future__ import annotations

import logging
import os

__all__ = ["PidsCgroups"]

log = logging.getLogger("qanot_host.cgroups")
V1_ROOT = "/sys/fs/cgroup/pids"
V2_ROOT = "/sys/fs/cgroup"


class PidsCgroups:
    def __init__(self) -> None:
        self._base: str | None = None
        self._made: list[str] = []

    def prepare(self, plugin: str, pids_max: int) -> str:
        """The cgroup.procs file the plugin's worker should join, or "" where there is none."""
        try:
            base = self._base or self._make_base()
            group = os.path.join(base, plugin)
            if not os.path.isdir(group):
                os.mkdir(group)
            if group not in self._made:
                self._made.append(group)
            with open(os.path.join(group, "pids.max"), "w") as f:
                f.write(str(pids_max))
            return os.path.join(group, "cgroup.procs")
        except OSError as exc:
            log.debug("no pids cgroup for %s: %s", plugin, exc)
            return ""

    def _make_base(self) -> str:
        # Only ever mkdir inside a real cgroup filesystem: as root, makedirs elsewhere would make
        # plain directories that merely look like a cgroup.
        if os.path.isfile(os.path.join(V1_ROOT, "cgroup.procs")):
            base = os.path.join(V1_ROOT, f"qanot-host-{os.getpid()}")
            if not os.path.isdir(base):
                os.mkdir(base)
        elif "pids" in _read(os.path.join(V2_ROOT, "cgroup.controllers")).split():
            base = os.path.join(V2_ROOT, f"qanot-host-{os.getpid()}")
            if not os.path.isdir(base):
                os.mkdir(base)
            with open(os.path.join(base, "cgroup.subtree_control"), "w") as f:
                f.write("+pids")
        else:
            raise OSError(f"no pids controller at {V1_ROOT} or {V2_ROOT}")
        self._made.append(base)
        self._base = base
        return base

    def remove(self) -> None:
        """rmdir every group made (children first); a group still holding a process stays."""
        for group in reversed(self._made):
            try:
                os.rmdir(group)
            except OSError:
                pass
        self._made.clear()
        self._base = None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
