"""Connects where it is told, in every way a client library might; for the host:port grant tests.
Returns what happened; a denial comes back as the error text the plugin saw."""

import asyncio
import ctypes
import json
import os
import socket
import struct
import threading
import time

from qanot.plugins.base import Plugin, tool

libc = ctypes.CDLL(None, use_errno=True)
# clone(flags, stack) then, in the child, pause() for good: a thread (CLONE_VM | CLONE_SIGHAND |
# CLONE_THREAD) without CLONE_FILES, so with a copy of the descriptor table of its own (attack pass 30)
CLONE_THEN_PAUSE = bytes.fromhex("b838000000" "31d2" "4531d2" "4531c0" "0f05" "4885c0" "7509"
                                 "b822000000" "0f05" "ebf7" "c3")
ADDRESS = {"type": "object", "required": ["host", "port"],
           "properties": {"host": {"type": "string"}, "port": {"type": "integer"}}}
SECONDS = {"type": "object", "required": ["seconds"], "properties": {"seconds": {"type": "number"}}}


def _raw_connect(host: str, port: int) -> int:
    """connect(2) through libc: no Python audit event, only the kernel (and the host) decide."""
    fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
    addr = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(host) + bytes(8)
    if libc.connect(fd, addr, len(addr)) != 0:
        error = ctypes.get_errno()
        os.close(fd)
        raise OSError(error, os.strerror(error))
    return fd


class QanotPlugin(Plugin):
    def get_tools(self):
        return self._collect_tools()

    @tool(name="net_blocking", description="socket.create_connection, send ping, read the reply.", parameters=ADDRESS)
    async def blocking(self, params: dict) -> str:
        with socket.create_connection((params["host"], params["port"]), timeout=5) as sock:
            sock.sendall(b"ping")
            return sock.recv(100).decode()

    @tool(name="net_asyncio", description="asyncio.open_connection on the worker's loop.", parameters=ADDRESS)
    async def on_loop(self, params: dict) -> str:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(params["host"], params["port"]), 5)
        writer.write(b"ping")
        reply = await reader.read(100)
        writer.close()
        return reply.decode()

    @tool(name="net_raw", description="connect(2) through libc, then ping.", parameters=ADDRESS)
    async def raw(self, params: dict) -> str:
        fd = _raw_connect(params["host"], params["port"])
        with socket.socket(fileno=fd) as sock:
            sock.sendall(b"ping")
            return sock.recv(100).decode()

    @tool(name="net_reaim", description="Connect where granted, then try to point a socket elsewhere.",
          parameters={"type": "object", "required": ["host", "port", "other_port"], "properties": {
              "host": {"type": "string"}, "port": {"type": "integer"}, "other_port": {"type": "integer"}}})
    async def reaim(self, params: dict) -> str:
        host, other = params["host"], params["other_port"]
        outcome = {}
        sock = socket.socket(fileno=_raw_connect(host, params["port"]))
        unspec = struct.pack("=H", socket.AF_UNSPEC) + bytes(14)
        rc = libc.connect(sock.fileno(), unspec, len(unspec))
        outcome["disconnect"] = "ok" if rc == 0 else os.strerror(ctypes.get_errno())
        try:
            sock.sendto(b"x", socket.MSG_FASTOPEN, (host, other))
            outcome["fastopen"] = "sent"
        except OSError as exc:
            outcome["fastopen"] = exc.strerror
        sock.close()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.sendto(b"udp", (host, other))
            outcome["udp"] = "sent"
        except OSError as exc:
            outcome["udp"] = exc.strerror
        udp.close()
        return json.dumps(outcome)

    @tool(name="net_race", description="Connect to a granted address while another thread rewrites it.",
          parameters={"type": "object", "required": ["host", "port", "other_port"], "properties": {
              "host": {"type": "string"}, "port": {"type": "integer"}, "other_port": {"type": "integer"}}})
    async def race(self, params: dict) -> str:
        import threading
        granted, other = (struct.pack("!H", params[key]) for key in ("port", "other_port"))
        addr = ctypes.create_string_buffer(struct.pack("=H", socket.AF_INET) + granted +
                                           socket.inet_aton(params["host"]) + bytes(8), 16)
        stop = threading.Event()

        def flip() -> None:  # the port bytes, back and forth, as fast as the GIL allows
            while not stop.is_set():
                ctypes.memmove(ctypes.addressof(addr) + 2, other, 2)
                ctypes.memmove(ctypes.addressof(addr) + 2, granted, 2)

        flipper = threading.Thread(target=flip)
        flipper.start()
        connected = refused = 0
        try:
            for _ in range(200):
                fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
                if libc.connect(fd, addr, 16) == 0:
                    connected += 1
                else:
                    refused += 1
                os.close(fd)
        finally:
            stop.set()
            flipper.join()
        return json.dumps({"connected": connected, "refused": refused})

    @tool(name="net_deny_loop", description="From a thread, for `seconds`: connect where the grant surely "
          "refuses, every 10 ms (the worker's own check refuses each).", parameters=SECONDS)
    async def deny_loop(self, params: dict) -> str:
        def loop() -> None:
            end = time.monotonic() + params["seconds"]
            while time.monotonic() < end:
                try:
                    socket.create_connection(("127.0.0.1", 1), timeout=1).close()
                except OSError:
                    pass
                time.sleep(0.01)
        threading.Thread(target=loop, daemon=True).start()
        return "started"

    @tool(name="net_fds", description="What each open descriptor of this process is.")
    async def fds(self, params: dict) -> str:
        return json.dumps(sorted(os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                                 if os.path.exists(f"/proc/self/fd/{fd}")))

    @tool(name="net_hoard", description="Connect `count` times, fill each socket's send buffer (the peer "
          "reads nothing; or, `closed`, take it to CLOSE after the peer closed), map it into memory and close its "
          "descriptor: sockets held past nofile (attack passes 28 and 29).",
          parameters={**ADDRESS, "properties": {**ADDRESS["properties"], "count": {"type": "integer"},
                                                 "closed": {"type": "boolean"}}})
    async def hoard(self, params: dict) -> str:
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        self.mapped = getattr(self, "mapped", [])
        held, error = 0, ""
        for _ in range(params["count"]):
            try:
                fd = _raw_connect(params["host"], params["port"])
            except OSError as exc:
                error = exc.strerror
                break
            os.set_blocking(fd, False)
            if params.get("closed"):  # the peer closes first: shut ours too, and wait for CLOSE (out of the table)
                sock = socket.socket(fileno=os.dup(fd))
                sock.shutdown(socket.SHUT_WR)
                for _ in range(200):
                    if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 7:
                        break
                    await asyncio.sleep(0.01)
                sock.close()
            else:
                try:
                    while True:
                        os.write(fd, b"x" * 65536)
                except BlockingIOError:
                    pass
            address = libc.mmap(None, 4096, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED: the mapping holds the socket
            os.close(fd)
            if address in (None, ctypes.c_void_p(-1).value):
                error = f"mmap: {os.strerror(ctypes.get_errno())}"
                break
            self.mapped.append(address)
            held += 1
        return json.dumps({"held": held, "error": error,
                           "descriptors": len(os.listdir("/proc/self/fd"))})

    @tool(name="net_hidden_tables", description="Hold host-made sockets, closed both ways, in threads that "
          "each have a descriptor table of their own (attack pass 30).",
          parameters={**ADDRESS, "properties": {**ADDRESS["properties"], "rounds": {"type": "integer"},
                                                 "count": {"type": "integer"}}})
    async def hidden_tables(self, params: dict) -> str:
        import mmap
        code = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        code.write(CLONE_THEN_PAUSE)
        clone = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_ulong, ctypes.c_void_p)(
            ctypes.addressof(ctypes.c_char.from_buffer(code)))
        self.kept = getattr(self, "kept", []) + [code]
        held, error = 0, ""
        for _ in range(params["rounds"]):
            socks = []
            for _ in range(params["count"]):
                try:
                    socks.append(socket.create_connection((params["host"], params["port"]), timeout=10))
                except OSError as exc:
                    error = exc.strerror or str(exc)
                    break
            await asyncio.sleep(0.3)  # the peer's data and FIN arrive
            for sock in socks:
                sock.shutdown(socket.SHUT_RDWR)
            await asyncio.sleep(0.3)
            stack = mmap.mmap(-1, 1 << 16)
            self.kept.append(stack)
            if clone(0x100 | 0x800 | 0x10000, ctypes.addressof(ctypes.c_char.from_buffer(stack)) + (1 << 16) - 64) < 0:
                return json.dumps({"held": held, "error": "clone failed"})
            held += len(socks)
            for sock in socks:
                sock.close()  # the thread's table still holds them
            if error:
                break
        return json.dumps({"held": held, "error": error})
