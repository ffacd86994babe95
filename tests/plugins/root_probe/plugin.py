"""What a worker can do when it keeps uid 0 (host.sandbox.identity false): the sixth attacker's tries."""

import ctypes
import json
import os
import resource
import socket

from qanot.plugins.base import Plugin, tool

libc = ctypes.CDLL(None, use_errno=True)


def outcome(call) -> str:
    try:
        result = call()
    except OSError as exc:
        return f"denied: {exc.strerror}"
    return f"ALLOWED: {result}"


class QanotPlugin(Plugin):
    name = "root_probe"

    def get_tools(self):
        return self._collect_tools()

    @tool(name="root_probe", description="try what root could do", parameters={"type": "object"})
    async def probe(self, params: dict) -> str:
        with open("/proc/self/status") as f:
            caps = next(line.split()[1] for line in f if line.startswith("CapEff:"))

        def fanotify():
            fd = libc.syscall(300, 0x8, 0)  # fanotify_init(FAN_CLASS_CONTENT, O_RDONLY)
            if fd < 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            return fd

        target = int(params.get("pid", 1))
        with open("plain", "w") as f:  # in its data directory (its working directory)
            f.write("#!/bin/sh\n")

        def setuid_file():
            os.chmod("plain", 0o4755)
            return oct(os.stat("plain").st_mode)

        def setuid_create():
            os.close(os.open("created", os.O_CREAT | os.O_WRONLY, 0o4755))
            return oct(os.stat("created").st_mode)

        return json.dumps({
            "uid": os.getuid(), "caps": caps,
            "fanotify": outcome(fanotify),
            "raw_socket": outcome(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)),
            "prlimit_other": outcome(lambda: resource.prlimit(target, resource.RLIMIT_CPU, (1, 1))),
            "prlimit_self": outcome(lambda: resource.prlimit(0, resource.RLIMIT_CORE)),
            "setpriority_other": outcome(lambda: os.setpriority(os.PRIO_PROCESS, target, 19)),
            "setpriority_uid": outcome(lambda: os.setpriority(os.PRIO_USER, 0, 19)),
            "affinity_other": outcome(lambda: os.sched_setaffinity(target, {0})),
            "setuid_chmod": outcome(setuid_file), "setuid_create": outcome(setuid_create),
            "nice_self": outcome(lambda: os.nice(1)),
        })
