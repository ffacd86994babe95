"""A hostile worker: speaks the protocol until the first Call, then sends FAKE_PAYLOAD (hex) or the
bytes of FAKE_PAYLOAD_FILE raw.

Started by tests in place of the real worker (same argv), so it imports the protocol from the
worker's import root.
"""

import os
import sys
import time

sys.path.insert(0, sys.argv[1])
import msgspec  # noqa: E402

from qanot_worker import protocol as p  # noqa: E402

read_fd, write_fd = int(sys.argv[2]), int(sys.argv[3])
payload = bytes.fromhex(os.environ.get("FAKE_PAYLOAD", ""))
if os.environ.get("FAKE_PAYLOAD_FILE"):  # too large for the environment
    with open(os.environ["FAKE_PAYLOAD_FILE"], "rb") as f:
        payload = f.read()
writer = p.FrameWriter()
decoder = msgspec.msgpack.Decoder(p.HostMessage)
frames = p.FrameBuffer()


def send(msg) -> None:
    os.write(write_fd, bytes(writer.frame(msg)))


send(p.Hello(int(os.environ.get("FAKE_PROTOCOL", p.PROTOCOL_VERSION)), os.getpid()))
while True:
    data = os.read(read_fd, 65536)
    if not data:
        sys.exit(0)
    for frame in frames.feed(data):
        msg = decoder.decode(frame)
        if isinstance(msg, p.Load):
            send(p.Loaded(msg.id, "fake", "", "0", "", ""))
        elif isinstance(msg, p.Setup):
            send(p.Done(msg.id))
        elif isinstance(msg, p.Teardown):  # as the real worker: answer, then exit at once
            send(p.Done(msg.id))
            sys.exit(0)
        elif isinstance(msg, p.GetTools) and os.environ.get("FAKE_DEEP_TOOLS"):
            # a ToolList whose schema is nested deeper than any decoder will follow
            depth = int(os.environ["FAKE_DEEP_TOOLS"])
            body = (b"\x93" + msgspec.msgpack.encode("ToolList") + msgspec.msgpack.encode(msg.id) + b"\x91"
                    + b"\x93" + msgspec.msgpack.encode("fake_tool") + msgspec.msgpack.encode("deep")
                    + b"\x81\xa1x" * depth + b"\xc0")
            os.write(write_fd, len(body).to_bytes(4, "big") + body)
        elif isinstance(msg, p.GetTools):
            send(p.ToolList(msg.id, [p.ToolSpec("fake_tool", "hostile",
                                                p.ToolSpec.encode_parameters({"type": "object", "properties": {}}))]))
        elif isinstance(msg, p.Ping):
            send(p.Pong(msg.id))
        elif isinstance(msg, p.Call):
            os.write(write_fd, payload.replace(b"@ID@", msgspec.msgpack.encode(msg.id)))
            if os.environ.get("FAKE_THEN") == "exit":
                os._exit(0)
            if os.environ.get("FAKE_THEN") == "close":  # ends its pipe, and lives on
                os.close(write_fd)
            if os.environ.get("FAKE_THEN") == "trickle":  # a frame that never ends, a byte at a time
                for _ in range(600):
                    time.sleep(0.05)
                    os.write(write_fd, b"\x00")
            time.sleep(30)
