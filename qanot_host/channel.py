"""The host's side of the protocol: requests out, replies matched to them by id.

Nothing a worker sends is trusted. A frame over the size limit, bytes that do not decode, a message
type a worker may not send, a reply to an id never asked: each is a protocol violation that ends the
channel (the owner then kills the worker). A late reply to a call the host already gave up on is not a
violation: the worker could not know, so those ids are remembered until answered.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Callable

import msgspec

from qanot_worker import protocol as p

from .deadlines import Deadlines
from .errors import (CallStuck, CallTimedOut, ClosedMidFrame, InvalidParams, PluginError, ProtocolViolation,
                     RemoteFailure, ToolFailed, WorkerKilled, WorkerTimeout)
from .loop import pipe_file
from .output import printable

__all__ = ["WorkerChannel", "RemoteFailure"]


# What msgspec raises for a value it cannot encode (nothing is written then: protocol.FrameWriter).
UNENCODABLE = (TypeError, ValueError, OverflowError, RecursionError)


class _CALL:
    """The reply type a tool call expects: Result, settled as its value string."""


class FrameCount:
    """Frames through every channel of this process (the metrics read them). An instance, not class
    attributes of the channel: writing a class attribute at every frame invalidated the interpreter's
    attribute caches for every channel, and cost a fifth of the throughput at 64 calls in flight."""

    __slots__ = ("sent", "received")

    def __init__(self) -> None:
        self.sent = self.received = 0


FRAMES = FrameCount()


DENIED_REPORTS_PER_SECOND = 20  # a worker sends at most 10
DENIED_REPORTS_HELD = 600  # a minute of an honest worker's reports, read at once after a stall


_RESULT = p.Result  # the hot path's, looked up once


def _nobody(error: PluginError | None) -> None:
    pass


class WorkerChannel(asyncio.Protocol):
    def __init__(self, plugin: str, max_frame: int, on_lost: Callable[[PluginError | None], None],
                 on_abandoned: Callable[[int, str], None] | None = None,
                 on_call_ended: Callable[[PluginError | None], None] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._plugin = plugin
        self._frames = p.FrameBuffer(max_frame)
        self._decoder = msgspec.msgpack.Decoder(p.WorkerMessage)
        self._ids = itertools.count(1)
        # id -> (future, the reply type expected, what was asked); a tool call expects _CALL
        self._pending: dict[int, tuple[asyncio.Future, type, str]] = {}
        self._deadlines = Deadlines(loop, self._pending, self._expire, sealed_by_owner=True)  # by _end_of_turn
        self._abandoned: set[int] = set()
        # Takes the plugin's resolved secrets out of the error messages its worker sends.
        self.redact: Callable[[str], str] | None = None
        self._out: asyncio.WriteTransport | None = None
        self._outbox = p.Outbox(max_frame)
        self._turn_flush_pending = False
        self._posted = self._last_wave = 0  # messages posted in this loop turn, and in the last
        self._in: asyncio.ReadTransport | None = None
        self._on_lost = on_lost
        self._on_abandoned = on_abandoned
        # told how each tool call ended (None: answered, or its caller went away), once for each
        self._call_ended = on_call_ended or _nobody
        self.last_heard = loop.time()  # when the worker last sent a whole frame: proof its loop runs
        self._ping_id = 0  # the heartbeat's Ping that awaits its Pong (0: none)
        self.ping_sent = 0.0  # ...sent at this loop time
        self.closed: PluginError | None = None
        self.hello: asyncio.Future[p.Hello] = loop.create_future()
        # connects the worker's own check refused (p.Denied): (count, first destinations)
        self.on_denied: Callable[[int, list[str]], None] | None = None
        self._denied_since = loop.time()
        self._denied_allowance = float(DENIED_REPORTS_HELD)
        self._reports_read = 0  # of the frames of one read, reports of denied connects

    @classmethod
    async def open(cls, plugin: str, max_frame: int, to_worker: int, from_worker: int,
                   on_lost: Callable[[PluginError | None], None],
                   on_abandoned: Callable[[int, str], None] | None = None,
                   on_call_ended: Callable[[PluginError | None], None] | None = None) -> "WorkerChannel":
        """Wrap the host's ends of the two pipes (the fds are owned by the channel from here on)."""
        loop = asyncio.get_running_loop()
        channel = cls(plugin, max_frame, on_lost, on_abandoned, on_call_ended)
        try:
            channel._out, _ = await loop.connect_write_pipe(asyncio.Protocol, pipe_file(to_worker, "wb"))
        except BaseException:
            os.close(from_worker)
            raise
        channel._outbox.transport = channel._out
        try:
            channel._in, _ = await loop.connect_read_pipe(lambda: channel, pipe_file(from_worker, "rb"))
        except BaseException:
            channel._out.close()
            raise
        return channel

    # ---- requests --------------------------------------------------------------------------------

    async def request(self, make: Callable[[int], msgspec.Struct], expect: type, timeout: float,
                      what: str):
        """Send make(id) and wait for its reply, which must be `expect` (or Failure).

        On timeout the caller gets WorkerTimeout at once and the worker is told to cancel.
        """
        request_id = self._next_id()
        try:
            future = self._start(request_id, make(request_id), expect, timeout, what)
        except p.FrameTooLarge as exc:
            raise RemoteFailure(p.FailureKind.TOO_LARGE, f"the request is too large: {exc}") from None
        except UNENCODABLE as exc:
            raise RemoteFailure(p.FailureKind.PROTOCOL, f"the request cannot be encoded: {exc}") from None
        return await future

    def call(self, tool: str, params: dict, timeout: float) -> asyncio.Future[str]:
        """request() specialised for the hot path: a future of the tool's result string, failed
        with ToolFailed or WorkerTimeout. No coroutine and no timer of its own: the reply settles
        the future directly, and the timeout is one entry among the channel's deadlines."""
        if self.closed is not None:  # _start(), inline: every call comes this way
            raise self.closed
        request_id = next(self._ids)
        try:
            self._post(p.Call(request_id, tool, params))
        except p.FrameTooLarge as exc:
            raise InvalidParams(tool, [f"params are too large: {exc} (host.max_frame_bytes)"]) from None
        except UNENCODABLE as exc:  # the registry checks params first; this is the last line
            raise InvalidParams(tool, [f"params cannot be sent: {type(exc).__name__}: {exc}"]) from None
        future = self._loop.create_future()
        self._pending[request_id] = (future, _CALL, tool)
        self._deadlines.add(request_id, timeout)
        return future

    def ping(self) -> None:
        """The heartbeat's Ping (heartbeat.py), one at a time, with no future or timer of its own:
        `ping_pending` says whether its Pong is still awaited."""
        if self._ping_id:
            return
        self._ping_id = self._next_id()
        self.ping_sent = self._loop.time()
        self._post(p.Ping(self._ping_id))

    @property
    def ping_pending(self) -> bool:
        return bool(self._ping_id)

    def _next_id(self) -> int:
        if self.closed is not None:
            raise self.closed
        return next(self._ids)

    def _start(self, request_id: int, message: msgspec.Struct, expect: type, timeout: float,
               what: str) -> asyncio.Future:
        """Frame and send one request, remember it, and enter its deadline (FrameTooLarge: nothing
        sent). No timer of its own: the timeout is one entry among the channel's deadlines."""
        self._post(message)
        future = self._loop.create_future()
        self._pending[request_id] = (future, expect, what)
        self._deadlines.add(request_id, timeout)
        return future

    def _expire(self, request_id: int, timeout: float) -> None:
        """A request's time is up. Whether or not its caller still waits (it may have been
        cancelled), the worker is told to stop, and its late answer is expected, not a violation."""
        entry = self._pending.pop(request_id, None)
        if entry is None:
            return
        future, _, what = entry
        self._abandoned.add(request_id)
        kind = WorkerTimeout
        if entry[1] is _CALL:
            what, kind = f"tool {what}", CallTimedOut
        error = kind(self._plugin, f"{what} timed out after {timeout:.3g} s")  # 3.93, not 3.92617: what was left of 4
        if not future.done():
            future.set_exception(error)
        if entry[1] is _CALL:
            self._call_ended(error)
        self._post(p.Cancel(request_id))
        if self._on_abandoned is not None:
            self._on_abandoned(request_id, what)

    def caller_cancelled(self, future: object) -> None:
        """A call whose caller was cancelled: found among the pending (a scan, on this rare path
        only: the hot path keeps no map from futures to ids) and cancelled in the worker."""
        request_id = next((key for key, entry in self._pending.items() if entry[0] is future), None)
        if request_id is None:
            return  # answered meanwhile, or the worker is gone
        entry = self._pending.pop(request_id)
        self._abandoned.add(request_id)
        if entry[1] is _CALL:
            self._call_ended(None)
        if self.closed is None:
            self._post(p.Cancel(request_id))
            if self._on_abandoned is not None:
                self._on_abandoned(request_id, f"tool {entry[2]}")

    def is_abandoned(self, request_id: int) -> bool:
        """True while a cancelled request has not been answered by the worker."""
        return request_id in self._abandoned

    def _post(self, message: msgspec.Struct) -> None:
        """The first message of a loop turn goes at once (a lone call waits for nothing); the ones
        after it in the same turn, from calls made together, are coalesced (protocol.Outbox).
        FrameTooLarge: nothing was sent."""
        self._outbox.post(message, self._turn_flush_pending)
        self._posted += 1
        if not self._turn_flush_pending:
            # Calls come in waves (the replies of one read wake their callers together): size
            # this turn's chunks by the last turn's wave.
            self._outbox.chunk = self._last_wave // p.CHUNK_DIVISOR + 1
            self._turn_flush_pending = True
            self._loop.call_soon(self._end_of_turn)

    def _end_of_turn(self) -> None:
        """Every request is posted (_post schedules this) before its deadline is added: this seals them
        (a ping, every worker's every ping_interval, adds none: no call for it)."""
        if self._deadlines.open_batches:
            self._deadlines.seal()
        self._turn_flush_pending = False
        FRAMES.sent += self._posted  # by the turn: at every frame, it showed in the calls' throughput
        self._last_wave, self._posted = self._posted, 0
        self._outbox.flush()

    # ---- replies ---------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed is not None:
            return
        try:
            frames = self._frames.feed(data)
            heard = self.last_heard
            if frames:  # whole frames only: a frame trickled a byte at a time kept a hung worker from
                self.last_heard = self._loop.time()  # ever being pinged, and its buffer held (attack pass 52)
            FRAMES.received += len(frames)
            self._reports_read = 0
            for frame in frames:
                self._deliver(self._decoder.decode(frame))
            if self._reports_read and self._reports_read == len(frames):
                # reports of denied connects alone are no sign of life: a thread can write them while
                # the loop is blocked, and kept the worker from ever being pinged (attack pass 59)
                self.last_heard = heard
        except (p.FrameTooLarge, msgspec.DecodeError) as exc:
            self.close(ProtocolViolation(self._plugin, f"bad frame from the worker: {exc}"))
        except RecursionError:
            self.close(ProtocolViolation(self._plugin, "bad frame from the worker: nested deeper than the "
                                                       "decoder accepts"))

    def _deliver(self, msg: p.WorkerMessage) -> None:
        if type(msg) is not _RESULT:  # a tool's result, nearly every frame, is none of these three
            if isinstance(msg, p.Hello):
                if self.hello.done():
                    raise msgspec.DecodeError("a second Hello")
                self.hello.set_result(msg)
                return
            if isinstance(msg, p.Denied):
                self._denied(msg)
                return
            if msg.id == self._ping_id and self._ping_id and type(msg) is p.Pong:
                self._ping_id = 0  # a Pong with no ping out is a reply to no request: unsolicited frames
                return  # cost the host's loop a core (attack pass 52), and each one passed for a heartbeat
        entry = self._pending.pop(msg.id, None)
        if entry is None:
            if msg.id in self._abandoned:
                self._abandoned.discard(msg.id)
                return
            raise msgspec.DecodeError(f"a reply to request {msg.id}, which was never sent or was "
                                      "already answered")
        future, expect, what = entry
        if expect is _CALL:
            if type(msg) is _RESULT:
                if not future.done():  # done: the caller went away (cancelled), nobody to tell
                    future.set_result(msg.value)
                self._call_ended(None)
            elif isinstance(msg, p.Failure):
                error = ToolFailed(self._plugin, what, self._message(msg.message))
                if not future.done():
                    future.set_exception(error)
                self._call_ended(error)
            else:
                what = f"{type(msg).__name__} in reply to a tool call"
                self._call_ended(self._wrong_reply(future, what))
                raise msgspec.DecodeError(what)  # the channel ends
            return
        failed = isinstance(msg, p.Failure)
        if type(msg) is not expect and not failed:
            what = f"{type(msg).__name__} in reply to a request that expects {expect.__name__}"
            self._wrong_reply(future, what)
            raise msgspec.DecodeError(what)  # the channel ends
        if future.done():
            return
        if isinstance(msg, p.Failure):
            future.set_exception(RemoteFailure(msg.kind, self._message(msg.message)))
        else:
            future.set_result(msg)

    def _denied(self, msg: p.Denied) -> None:
        """A worker reports once per DENIED_REPORT_SECONDS at most: a flood of reports (plugin code
        can write frames into the pipe) is a lying worker, as unsolicited Pongs are (attack pass 52).
        Counted as a bucket that refills at twice an honest worker's rate and holds a minute of it:
        the reports of a host whose loop was late for seconds arrive together, and its honest
        worker was ended for that (attack pass 57: a 1.2 s stall sufficed with a per-second count)."""
        now = self._loop.time()
        self._denied_allowance = min(DENIED_REPORTS_HELD, self._denied_allowance
                                     + (now - self._denied_since) * DENIED_REPORTS_PER_SECOND)
        self._denied_since = now
        if self._denied_allowance < 1:
            raise msgspec.DecodeError(f"reports of denied connects faster than {DENIED_REPORTS_PER_SECOND} a second "
                                      "for a minute (a worker sends one every 0.1 s at most)")
        self._denied_allowance -= 1
        self._reports_read += 1
        if self.on_denied is not None:
            self.on_denied(msg.count, msg.destinations)

    def _message(self, text: str) -> str:
        """A worker's error message as the host passes it on: secrets out, printable, bounded."""
        return printable(text if self.redact is None else self.redact(text))

    def _wrong_reply(self, future: asyncio.Future, what: str) -> ProtocolViolation:
        """The request was answered, wrongly: its caller learns so now (the channel ends then)."""
        error = ProtocolViolation(self._plugin, f"bad reply from the worker: {what}")
        if not future.done():
            future.set_exception(error)
        return error

    def eof_received(self) -> bool:
        self.close(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(None)

    # ---- end -------------------------------------------------------------------------------------

    def close(self, error: PluginError | None) -> None:
        """End the channel once; pending requests are failed by the owner through on_lost. The pipes
        are closed here whatever ended it first (fail_pending too): a transport left to the garbage
        collector closes its descriptor late, and under uvloop its file object then closes the same
        number again, which by then may be another pipe's (uvloop#763)."""
        for transport in (self._in, self._out):
            if transport is not None and not transport.is_closing():
                transport.close()
        if self.closed is not None:
            return
        if error is None and self._frames.pending:
            error = ClosedMidFrame(self._plugin, f"the worker closed its pipe in the middle of a "
                                                 f"frame ({self._frames.pending} bytes)")
        self.closed = error or PluginError(self._plugin, "the worker closed its pipe")
        self._on_lost(error)

    def fail_pending(self, error: PluginError) -> list[str]:
        """End every request still waiting, at once, with `error`; returns the tools of the calls
        among them. A crash's error names each call's own tool (the caller of the tool that crashed
        the worker was told only that it crashed: the newcomer of 11-27)."""
        self.closed = error
        pending = list(self._pending.values())
        self._pending.clear()  # the same dict: the deadlines watch it
        self._deadlines.clear()
        tools = []
        for future, expect, what in pending:
            failure = error
            if expect is _CALL:
                tools.append(what)
                failure = _naming(error, what)
            if not future.done():
                future.set_exception(failure)
            if expect is _CALL:
                self._call_ended(failure)
        if not self.hello.done():
            self.hello.set_exception(error)
            self.hello.exception()  # retrieved: nobody may be waiting for it any more
        return tools

    @property
    def in_flight(self) -> int:
        return len(self._pending)


def _naming(error: PluginError, tool: str) -> PluginError:
    """The end of the worker as one call's error, naming the call's own tool: a crash or a broken
    protocol keeps its type and fields (whoever catches it reads them); a worker killed because
    another call would not stop is that other call's fault, and says so (WorkerKilled, not a
    timeout of this one: the newcomer of 11-27's call was blamed on the tool that blocked).
    Not copy.copy(): that calls the class with the message alone."""
    if isinstance(error, CallStuck):
        return WorkerKilled(error.plugin, tool, error.detail)
    failure = PluginError.__new__(type(error))
    failure.__dict__.update(error.__dict__)
    failure.args = (f"{error} during tool {tool}",)
    failure.detail = f"{error.detail} during tool {tool}"
    return failure
