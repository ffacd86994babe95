"""Frames: a 4-byte big-endian length, then that many bytes of msgpack.

The reader refuses an oversized frame as soon as its prefix arrives; the writer encodes a message
straight behind its prefix, in one buffer, and leaves no partial frame when encoding fails.
"""

from __future__ import annotations

import struct

import msgspec

__all__ = ["HEADER", "DEFAULT_MAX_FRAME", "FrameTooLarge", "FrameBuffer", "FrameWriter"]

HEADER = 4
_PREFIX = struct.Struct(">I")
# Big enough for a 10 MB tool result with room to spare, small enough that a hostile length prefix
# cannot make either side reserve gigabytes.
DEFAULT_MAX_FRAME = 64 * 1024 * 1024


class FrameTooLarge(ValueError):
    """A length prefix above the agreed maximum: the peer is broken or hostile."""


class FrameBuffer:
    """Splits a byte stream into frames, refusing an oversized frame as soon as its prefix arrives.

    Checking the prefix first means a peer that announces 4 GiB never makes us buffer it.
    """

    __slots__ = ("_buf", "_max")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[memoryview]:
        """The whole frames that `data` completes, as views (no copy of each frame); a partial
        frame at the end is kept for the next read."""
        buf = self._buf
        if buf:  # a frame was split across reads
            buf += data
            if len(buf) >= HEADER:
                size = _PREFIX.unpack_from(buf)[0]
                self._check(size)
                if len(buf) < HEADER + size:
                    return []  # still short of that frame: keep gathering, copy nothing yet
            # join once, into bytes the views can hold on to
            data = bytes(buf)
            buf.clear()
        view = memoryview(data)
        end = len(data)
        start = 0
        frames: list[memoryview] = []
        unpack = _PREFIX.unpack_from
        while end - start >= HEADER:
            size = unpack(data, start)[0]
            self._check(size)
            if end - start - HEADER < size:
                break
            start += HEADER
            frames.append(view[start:start + size])
            start += size
        if start < end:
            buf += view[start:]
        return frames

    def _check(self, size: int) -> None:
        if size > self._max:
            raise FrameTooLarge(f"frame of {size} bytes exceeds the maximum of {self._max}")

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole frame (a truncated frame at EOF)."""
        return len(self._buf)


class FrameWriter:
    """Encodes a message straight behind its length prefix, in one buffer."""

    __slots__ = ("_encoder", "_max")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._max = max_frame

    def frame(self, message: msgspec.Struct) -> bytearray:
        buf = bytearray()
        self.frame_into(message, buf)
        return buf

    def frame_into(self, message: msgspec.Struct, buf: bytearray) -> None:
        """Append the message's frame to `buf`. If it cannot be framed (FrameTooLarge, or what msgspec
        raises for a value it cannot encode), `buf` is left exactly as it was: no partial frame."""
        start = len(buf)
        buf += _EMPTY_HEADER
        try:
            self._encoder.encode_into(message, buf, -1)
        except BaseException:
            del buf[start:]
            raise
        size = len(buf) - start - HEADER
        if size > self._max:
            del buf[start:]
            raise FrameTooLarge(f"message of {size} bytes exceeds the maximum frame of {self._max}")
        _PREFIX.pack_into(buf, start, size)


_EMPTY_HEADER = bytes(HEADER)
