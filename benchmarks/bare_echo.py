"""Contender (b): the channel alone. msgspec msgpack frames over two pipes (fds in argv, as the
host's worker has), uvloop, no host logic: [id, kind, arg] in, [id, result] out."""

import asyncio
import os
import sys

import msgspec
import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workload import blob, echo  # noqa: E402


class Echo(asyncio.Protocol):
    def __init__(self, out):
        self.buf = bytearray()
        self.out = out
        self.enc = msgspec.msgpack.Encoder()
        self.dec = msgspec.msgpack.Decoder()

    def data_received(self, data):
        self.buf += data
        while len(self.buf) >= 4:
            size = int.from_bytes(self.buf[:4], "big")
            if len(self.buf) < 4 + size:
                break
            rid, kind, arg = self.dec.decode(self.buf[4:4 + size])
            del self.buf[:4 + size]
            result = echo(arg) if kind == "echo" else blob(arg)
            payload = self.enc.encode([rid, result])
            self.out.write(len(payload).to_bytes(4, "big") + payload)

    def connection_lost(self, exc):
        os._exit(0)


async def main():
    loop = asyncio.get_running_loop()
    read_fd, write_fd = int(sys.argv[1]), int(sys.argv[2])
    out, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(write_fd, "wb", buffering=0))
    await loop.connect_read_pipe(lambda: Echo(out), os.fdopen(read_fd, "rb", buffering=0))
    await asyncio.Event().wait()


uvloop.run(main())
