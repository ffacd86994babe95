"""A launcher that asks a pre-started worker template to fork each worker (see
qanot_worker/forkserver.py): a worker is ready in milliseconds instead of the ~100 ms an
interpreter needs to start and import the runtime.

The template is the workers' parent, so it reaps them and reports their exit codes over the socket;
the host still owns the protocol pipes and the workers' stdout and stderr, and signals each worker's
process group directly. If the template dies, its workers die with it (parent-death signal); they
are reported with an unknown exit status and the next launch starts a new template. If the host
dies, the template kills what is left in the workers' cgroups and removes them.
"""

from __future__ import annotations

import array
import asyncio
import errno
import itertools
import logging
import os
import signal
import socket
import sys

import msgspec

from qanot_worker import protocol as p

from .errors import PluginStartError, QanotHostError
from .launcher import LaunchSpec, WorkerProcess, finish_worker_group
from .loop import pipe_file, run_to_end
from .output import OutputLimit, start_output_pumps

__all__ = ["ForkServerLauncher"]

log = logging.getLogger("qanot_host.forkserver")

TEMPLATE_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
                 "from qanot_worker.forkserver import serve_template; "
                 "sys.exit(serve_template(int(sys.argv[2]), int(sys.argv[3])))")
READY_TIMEOUT = 30.0


class ForkServerLauncher:
    def __init__(self, import_root: str) -> None:
        self._import_root = import_root
        self._template: _Template | None = None
        self._starting: asyncio.Lock | None = None
        self._closed = False
        self._early: asyncio.Task | None = None  # prepare()'s start of the template
        self.template_starts = 0  # the first, and each replacement of a template that died

    async def launch(self, spec: LaunchSpec) -> WorkerProcess:
        """A launch failure is that plugin's start failure (its restart policy decides what next); a
        template that died is replaced at the next launch."""
        try:
            template = await self._running_template()
            return await template.spawn(spec)
        except QanotHostError as exc:
            raise PluginStartError(spec.plugin, str(exc)) from None

    def prepare(self) -> None:
        """Boot the template now, in the background: the interpreter's start and imports (~150 ms
        here) then overlap what the host does before its first launch, such as a plugin's
        environment that uv builds, instead of following it."""
        if self._closed or self._early is not None:
            return
        self._early = asyncio.get_running_loop().create_task(self._start_early())

    async def _start_early(self) -> None:
        try:
            await self._running_template()
        except QanotHostError as exc:  # the first launch starts it again, and that plugin's start reports why
            log.debug("the worker template did not start ahead of the first worker: %s", exc)

    def helper_pids(self) -> set[int]:
        template = self._template
        return {template.pid} if template is not None and not template.dead else set()

    async def release_disk(self, image: str) -> None:
        template = self._template
        if template is not None and not template.dead:
            try:
                await template.release_disk(image)
            except OSError as exc:  # a template gone meanwhile took its disks with it
                log.debug("the worker template did not hear that %s is released: %s", image, exc)

    async def close(self) -> None:
        """Also when a launch (a restart) is starting the template right now: that start is waited
        for, and its template closed too, never left running beside a stopped host."""
        self._closed = True
        if self._early is not None:
            await asyncio.gather(self._early, return_exceptions=True)
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._template is not None:
                await self._template.close()
                self._template = None

    async def _running_template(self) -> "_Template":
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._closed:
                raise QanotHostError("the host is stopping")
            if self._template is None or self._template.dead:
                self.template_starts += 1
                self._template = await _Template.start(self._import_root)
            return self._template


class _ForkedWorker:
    def __init__(self, pid: int, spec: LaunchSpec, stdout: tuple[asyncio.StreamReader, asyncio.BaseTransport],
                 stderr: tuple[asyncio.StreamReader, asyncio.BaseTransport]) -> None:
        self.pid = pid
        self.exit: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._pipes = [stdout[1], stderr[1]]
        self.output = OutputLimit(spec.plugin, spec.log_lines_per_second)
        self.output.redact = spec.redact
        self.output.ring = spec.ring
        self.output.pid = pid
        self._pumps = start_output_pumps(spec.plugin, stdout[0], stderr[0], self.output)

    @property
    def returncode(self) -> int | None:
        return self.exit.result() if self.exit.done() else None

    async def wait(self) -> int | None:
        code = await self.exit
        await finish_worker_group(self.pid, self._pumps, self._close_pipes)
        return code

    def _close_pipes(self) -> None:
        for transport in self._pipes:
            transport.close()

    def signal_group(self, sig: int) -> None:
        if self.exit.done():
            return  # reaped: its pid (and so its group id) may belong to someone else by now
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class _Template:
    """One template process and the socket to it."""

    def __init__(self, proc: asyncio.subprocess.Process, sock: socket.socket) -> None:
        self._proc = proc
        self._sock = sock
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(p.TemplateMessage)
        self._ids = itertools.count(1)
        self._spawning: dict[int, asyncio.Future[p.Spawned]] = {}
        self._workers: dict[int, _ForkedWorker] = {}
        self._early_exits: dict[int, int] = {}
        self._sending = asyncio.Lock()
        self.ready: asyncio.Future[p.TemplateReady] = asyncio.get_running_loop().create_future()
        self.dead = False
        self.pid = proc.pid
        self._pumps = start_output_pumps("forkserver", proc.stdout, proc.stderr)
        self._watcher: asyncio.Future | None = None  # _watch(), once started

    @classmethod
    async def start(cls, import_root: str) -> "_Template":
        host_end, template_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", "-c", TEMPLATE_BOOT, import_root,
                str(template_end.fileno()), str(os.getpid()),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, pass_fds=(template_end.fileno(),),
                env={"PATH": os.defpath, "LANG": "C.UTF-8", p.COOKIE_KEY: p.COOKIE_VALUE},
                start_new_session=True)
        finally:
            template_end.close()
        host_end.setblocking(False)
        template = cls(proc, host_end)
        asyncio.get_running_loop().add_reader(host_end.fileno(), template._readable)
        template._watcher = asyncio.ensure_future(template._watch())
        try:
            await asyncio.wait_for(asyncio.shield(template.ready), READY_TIMEOUT)
        except (asyncio.TimeoutError, QanotHostError) as exc:
            await template.close()
            raise QanotHostError(f"the worker template did not start: {exc}") from None
        log.debug("worker template pid %s ready", proc.pid)
        return template

    async def spawn(self, spec: LaunchSpec) -> WorkerProcess:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        env_fd = spec.environment_fd()
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._spawning[request_id] = future
        try:
            message = self._encoder.encode(spec.request(request_id))
            fds = array.array("i", [spec.read_fd, spec.write_fd, out_w, err_w, env_fd])
            await self._send(message, fds)
        except BaseException as exc:  # an OSError, or the host stopping (cancelled) meanwhile
            self._spawning.pop(request_id, None)
            for fd in (out_r, err_r):
                os.close(fd)
            if isinstance(exc, OSError):
                raise QanotHostError(f"the worker template is gone: {exc}") from None
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
            os.close(env_fd)
        try:
            reply = await future
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        if not reply.pid:
            os.close(out_r)
            os.close(err_r)
            raise QanotHostError(f"the worker template could not fork: {reply.error}")
        loop = asyncio.get_running_loop()
        try:
            stdout = await _reader(loop, out_r)
        except BaseException:
            os.close(err_r)
            _kill_group(reply.pid)
            raise
        try:
            stderr = await _reader(loop, err_r)
        except BaseException:
            stdout[1].close()
            _kill_group(reply.pid)
            raise
        worker = _ForkedWorker(reply.pid, spec, stdout, stderr)
        if reply.pid in self._early_exits:  # it died before we even heard its pid
            worker.exit.set_result(self._early_exits.pop(reply.pid))
        else:
            self._workers[reply.pid] = worker
        return worker

    async def release_disk(self, image: str) -> None:
        await self._send(self._encoder.encode(p.ReleaseDisk(image)), array.array("i"))

    async def _send(self, message: bytes, fds: array.array) -> None:
        """One request with its descriptors; when many plugins start at once the socket's buffer
        fills, and the request waits for room instead of failing (EAGAIN)."""
        loop = asyncio.get_running_loop()
        async with self._sending:  # one waiter on the socket at a time (add_writer keeps one callback)
            while True:
                try:
                    self._sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)] if fds else [])
                    return
                except BlockingIOError:
                    if self.dead:
                        raise OSError(errno.EPIPE, "the worker template exited") from None
                    writable = loop.create_future()
                    loop.add_writer(self._sock.fileno(), _settle, writable)
                    try:
                        await asyncio.wait_for(writable, READY_TIMEOUT)
                    finally:
                        if not self.dead:
                            loop.remove_writer(self._sock.fileno())

    def _readable(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._died()
                return
            try:
                msg = self._decoder.decode(data)
            except msgspec.DecodeError as exc:
                log.error("bad message from the worker template: %s", exc)
                self._died()
                return
            match msg:
                case p.Spawned():
                    future = self._spawning.pop(msg.id, None)
                    if future is not None and not future.done():
                        future.set_result(msg)
                case p.Exited():
                    worker = self._workers.pop(msg.pid, None)
                    if worker is None:
                        self._early_exits[msg.pid] = msg.returncode
                    elif not worker.exit.done():
                        worker.exit.set_result(msg.returncode)
                case p.TemplateReady():
                    if not self.ready.done():
                        self.ready.set_result(msg)

    async def _watch(self) -> None:
        code = await self._proc.wait()
        if not self.dead:
            log.error("the worker template (pid %s) exited (code %s); its workers die with it",
                      self._proc.pid, code)
        self._died()

    def _died(self) -> None:
        if self.dead:
            return
        self.dead = True
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._sock.fileno())
        self._sock.close()
        error = QanotHostError("the worker template exited")
        for future in self._spawning.values():
            if not future.done():
                future.set_exception(error)
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # retrieved: nobody may be waiting for it any more
        for worker in self._workers.values():
            worker.signal_group(signal.SIGKILL)  # parent-death already did it; be sure
            if not worker.exit.done():
                worker.exit.set_result(None)
        self._workers.clear()
        if self._proc.returncode is None:
            self._proc.kill()

    async def close(self) -> None:
        self._died()
        await self._proc.wait()
        await asyncio.gather(*self._pumps, return_exceptions=True)


def _kill_group(pid: int) -> None:
    """A worker forked for a launch that then failed (the host stopping): nobody will ever talk to it."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class _PipeReaderProtocol(asyncio.StreamReaderProtocol):
    def eof_received(self) -> bool:
        super().eof_received()
        return False  # a pipe has no half-close: let the transport close (uvloop keeps it otherwise)


async def _reader(loop: asyncio.AbstractEventLoop, fd: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    """A stream of the pipe `fd` (owned by it from here on). The connect runs to its end even when
    the caller is cancelled (a host stopping mid-start), and the transport is then closed (loop.py's
    run_to_end: a full run caught a descriptor closed twice as a ResourceWarning)."""
    # 64 KiB, as a spawned worker's (asyncio's default): the transport reads ahead of the output pump up
    # to twice this, whatever the plugin's rate, one read per write the plugin makes (1 MiB: 2 MiB of
    # 1-byte writes a stream, a core-second of the host's each, and 2 MiB held per stream, 2 GB for 500
    # plugins: attack pass 63)
    reader = asyncio.StreamReader(limit=1 << 16)
    transport, _ = await run_to_end(loop.connect_read_pipe(lambda: _PipeReaderProtocol(reader), pipe_file(fd, "rb")),
                                    undo=lambda connected: connected[0].close())
    return reader, transport
