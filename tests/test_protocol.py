"""Framing of the wire protocol shared by host and worker."""

from __future__ import annotations

import msgspec
import pytest

from qanot_worker import protocol as p


def test_round_trip_through_frames_split_anywhere():
    writer = p.FrameWriter()
    messages = [p.Call(1, "echo", {"a": [1, 2]}), p.Cancel(1), p.Ping(7), p.Setup(2, {"k": "v"})]
    stream = b"".join(bytes(writer.frame(m)) for m in messages)
    decoder = msgspec.msgpack.Decoder(p.HostMessage)
    for cut in range(1, 12):
        buffer = p.FrameBuffer()
        frames = []
        for i in range(0, len(stream), cut):
            frames += buffer.feed(stream[i:i + cut])
        # decoded only after every read: a frame handed out stays valid whatever comes next
        assert [decoder.decode(f) for f in frames] == messages and buffer.pending == 0


def test_oversized_prefix_is_refused_before_buffering():
    buffer = p.FrameBuffer(max_frame=1024)
    with pytest.raises(p.FrameTooLarge, match="4294967295 bytes exceeds the maximum of 1024"):
        buffer.feed(b"\xff\xff\xff\xff")
    with pytest.raises(p.FrameTooLarge):
        p.FrameWriter(max_frame=1024).frame(p.Result(1, "x" * 2000))


def test_wrong_message_type_fails_in_the_decoder():
    worker_frame = bytes(p.FrameWriter().frame(p.Result(1, "x")))[p.HEADER:]
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.Decoder(p.HostMessage).decode(worker_frame)


def test_truncated_frame_stays_pending():
    frame = bytes(p.FrameWriter().frame(p.Ping(1)))
    buffer = p.FrameBuffer()
    assert buffer.feed(frame[:-1]) == []
    assert buffer.pending == len(frame) - 1


def test_outbox_writes_chunks_in_order():
    class Pipe:
        def __init__(self) -> None:
            self.writes: list[bytes] = []

        def write(self, data) -> None:
            self.writes.append(bytes(data))

        def is_closing(self) -> bool:
            return False

    outbox = p.Outbox(max_frame=1024)
    outbox.transport = pipe = Pipe()
    outbox.chunk = 16
    for i in range(16 + 3):
        outbox.post(p.Ping(i), hold=True)
    assert len(pipe.writes) == 1  # a full chunk went at once; three are held
    with pytest.raises(p.FrameTooLarge):
        outbox.post(p.Result(99, "x" * 2000), hold=True)
    outbox.post(p.Ping(100), hold=False)  # written after the held ones, in one write; not the refused one
    outbox.post(p.Ping(101), hold=False)
    outbox.flush()  # nothing held: no empty write
    assert len(pipe.writes) == 3
    buffer, decoder = p.FrameBuffer(), msgspec.msgpack.Decoder(p.HostMessage)
    got = [decoder.decode(frame).id for frame in buffer.feed(b"".join(pipe.writes))]
    assert got == [*range(19), 100, 101]
