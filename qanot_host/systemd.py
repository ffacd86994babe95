"""systemd's service notifications (sd_notify), for `Type=notify` units: READY once the plugins have
started, RELOADING and READY around a reload, STOPPING at shutdown, STATUS with the counts, and a
WATCHDOG ping from the event loop itself when the unit sets WatchdogSec (a stuck loop stops pinging,
and systemd restarts the service).

The protocol is one datagram to the unix socket NOTIFY_SOCKET names ("@name": the abstract namespace),
stdlib only; without NOTIFY_SOCKET (not under systemd) every call does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

__all__ = ["Notifier"]

log = logging.getLogger("qanot_host.systemd")


class Notifier:
    def __init__(self) -> None:
        path = os.environ.pop("NOTIFY_SOCKET", "")  # not passed on to anything the host starts
        self._address = "\0" + path[1:] if path.startswith("@") else path
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = os.environ.pop("WATCHDOG_USEC", "")
        pid = os.environ.pop("WATCHDOG_PID", "")
        self._watchdog = int(usec) / 1e6 if usec.isdigit() and (not pid or pid == str(os.getpid())) else 0.0
        self._pinging: asyncio.Task | None = None

    @property
    def active(self) -> bool:
        return self._sock is not None

    def notify(self, *fields: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:  # systemd gone or the socket full: the host runs on regardless
            log.warning("sd_notify to %s failed: %s", self._address.replace("\0", "@"), exc.strerror or exc)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")
        if self._watchdog and self._pinging is None:
            self._pinging = asyncio.ensure_future(self._ping())

    def reloading(self) -> None:
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    async def close(self) -> None:
        if self._pinging is not None:
            self._pinging.cancel()
            await asyncio.gather(self._pinging, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _ping(self) -> None:
        """At half the watchdog interval, from the loop: only a loop that runs pings."""
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self._watchdog / 2)
