"""One worker process as the host sees it: start it, call into it, stop it for certain.

The start is a handshake under a deadline (a distinct error when the worker dies before saying
Hello), then load, setup() and get_tools(). Stopping always ends: teardown() under its timeout, then
SIGTERM to the worker's process group, then SIGKILL, and the exit is always awaited.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import msgspec
import psutil

from qanot_worker import protocol as p

from .channel import RemoteFailure, WorkerChannel
from .egress import DEFAULT_MAX_SOCKETS, MAX_LOGGED_DENIALS, RESOLVER_ENV, EgressGate, EgressPolicy, quotable
from .egress_policy import NameResolver
from .errors import (CallStuck, ClosedMidFrame, PluginError, PluginStartError, PluginUnavailable,
                     ProtocolMismatch, WorkerCrashed, WorkerTimeout, describe_exit)
from .heartbeat import Heartbeats
from .launcher import Launcher, LaunchSpec, WorkerProcess
from .log_ring import LogRing
from .loop import run_to_end
from .offered import OfferedTool, kept_extensions, kept_info, offered_tools
from .pid_namespaces import find_in_namespace

__all__ = ["WorkerHandle", "WorkerOptions"]

log = logging.getLogger("qanot_host.worker")

# How long a worker may live on after closing its end of the protocol pipe.
EOF_GRACE = 0.25


LOADING = "loading the plugin"  # a failure's words then: "loading the plugin failed: ..." (tool_index.py)


@dataclass
class WorkerOptions:
    import_root: str
    data_dir: str
    max_frame: int
    handshake_timeout: float
    setup_timeout: float
    teardown_timeout: float
    term_timeout: float = 2.0
    ping_interval: float = 10.0
    ping_timeout: float = 3.0
    cancel_grace: float = 3.0
    extra_env: dict[str, str] = field(default_factory=dict)  # env_vars the operator granted
    namespaces: bool = False  # the worker gets a PID namespace and a root of its own
    disk: str = ""  # the plugin's disk image, for its data directory
    log_lines_per_second: float | None = None
    # How often the kernel's OOM killer has struck the plugin's memory cgroup (None: no cgroup),
    # and its ceiling, so that an exit by SIGKILL can be told apart.
    oom_kills: Callable[[], int] | None = None
    members: Callable[[], list[int]] | None = None  # the processes of the plugin's cgroup, where it has one
    memory_mb: int | None = None
    bridged: bool = False  # an MCP server's worker (its exit EXIT_MCP_SERVER_GONE: the server is gone)
    redact: Callable[[str], str] | None = None  # the plugin's resolved secrets out of what is logged
    ring: LogRing | None = None  # the plugin's recent output lines, kept for `qanot-host logs`
    # Shared by every worker of the host: how many may be between launch and loaded at once (the
    # sandbox, the interpreter and the plugin's imports are CPU work; five hundred at once on two
    # cores took 8.6 s each, close to handshake_timeout). setup() runs outside it.
    start_gate: asyncio.Semaphore | None = None
    heartbeats: Heartbeats = field(default_factory=Heartbeats)  # one timer for the pings of all the host's workers
    names: NameResolver = field(default_factory=NameResolver)  # the host's DNS look-ups for narrowed egress


class WorkerHandle:
    def __init__(self, plugin: str, launcher: Launcher, options: WorkerOptions,
                 on_exit: Callable[["WorkerHandle"], None] | None = None,
                 on_call_ended: Callable[[PluginError | None], None] | None = None) -> None:
        """`on_call_ended`: told how each tool call ended, once for each (the supervisor counts them)."""
        self.plugin = plugin
        self._launcher = launcher
        self._options = options
        self._on_exit = on_exit
        self._on_call_ended = on_call_ended
        self._process: WorkerProcess | None = None
        self._channel: WorkerChannel | None = None
        self._stopping = False
        self._stop_reason = ""
        self._sandbox: p.SandboxSpec | None = None
        self._plugin_pid: int | None = None  # the worker itself, below its namespace's init
        self._oom_kills_at_start = 0
        self._lost_reason: PluginError | None = None
        self.exited: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.info: p.Loaded | None = None
        self.report = p.Hello(0, 0)  # the worker's sandbox report, from before any plugin code ran
        self.tools: list[OfferedTool] = []
        self.extensions = p.Extensions()  # what the plugin's extension points returned at load
        self.started_at = 0.0
        self.start_seconds = 0.0
        self.stop_path: list[str] = []  # how the last stop went, for logs and tests
        self._tasks: list[asyncio.Task] = []
        self.exit_error: PluginError | None = None  # why the worker ended, once it has
        self.lost_calls: list[str] = []  # the tools of the calls in flight when it ended
        self.egress: EgressGate | None = None  # network narrowed to hosts: the host connects for it
        self._no_network_logged: set[str] = set()  # destinations it was refused, with no network at all

    @property
    def pid(self) -> int | None:
        """The plugin's own process (with namespaces, the child of the init the launcher started)."""
        if self._plugin_pid is not None:
            return self._plugin_pid
        return self._process.pid if self._process is not None else None

    @property
    def accepting_calls(self) -> bool:
        """False once the pipe closed or a stop began, even before the exit is reaped."""
        channel = self._channel
        return channel is not None and channel.closed is None and not self._stopping

    @property
    def in_flight(self) -> int:
        return self._channel.in_flight if self._channel is not None else 0

    # ---- start -----------------------------------------------------------------------------------

    async def start(self, entry_file: str, plugin_dir: str, site_dirs: list[str],
                    config: dict[str, Any], sandbox: p.SandboxSpec | None = None) -> None:
        """Spawn, handshake, load, setup(config), get_tools(). Raises PluginStartError subtypes."""
        gate = self._options.start_gate
        if gate is not None:
            await gate.acquire()
        began = time.monotonic()
        try:
            await self._launch_and_load(entry_file, plugin_dir, site_dirs, sandbox)
        finally:
            if gate is not None:
                gate.release()
        await self._ask(lambda i: p.Setup(i, config), p.Done, self._options.setup_timeout, "setup()")
        reply = await self._ask(p.GetTools, p.ToolList, self._options.setup_timeout, "get_tools()")
        self.tools = offered_tools(self.plugin, reply)
        self.extensions = kept_extensions(reply.extensions, self.plugin)  # bounded: kept while it lives
        self.started_at = time.monotonic()
        self.start_seconds = self.started_at - began  # spawn to tools listed
        # Pings start only now: a setup() that blocks its loop is bounded by setup_timeout instead.
        self._options.heartbeats.add(self, self._options.ping_interval, self._options.ping_timeout)

    async def _launch_and_load(self, entry_file: str, plugin_dir: str, site_dirs: list[str],
                               sandbox: p.SandboxSpec | None) -> None:
        self._sandbox = sandbox
        self._oom_kills_at_start = self._options.oom_kills() if self._options.oom_kills else 0
        await self._spawn()
        hello = await self._handshake()
        self.report = hello
        self._plugin_pid = self._find_plugin_pid(hello.pid)
        output = getattr(self._process, "output", None)
        if output is not None and self._plugin_pid:
            output.pid = self._plugin_pid  # its lines name the worker, not its namespace's init
        if hello.egress_fd >= 0:
            self._take_egress_listener(hello.egress_fd)
        self.info = kept_info(await self._ask(
            lambda i: p.Load(i, self.plugin, entry_file, plugin_dir, site_dirs), p.Loaded,
            self._options.handshake_timeout, LOADING, "handshake_timeout"))

    async def _spawn(self) -> None:
        opts = self._options
        worker_reads, host_writes = os.pipe()
        host_reads, worker_writes = os.pipe()
        sandbox = self._sandbox
        try:
            spec = LaunchSpec(plugin=self.plugin, import_root=opts.import_root, read_fd=worker_reads,
                              write_fd=worker_writes, max_frame=opts.max_frame, env=self._environment(),
                              cwd=opts.data_dir if not opts.namespaces else "/",
                              cgroup_procs=sorted(set(filter(None, sandbox.cgroups.values()))) if sandbox else [],
                              disk=opts.disk, uid=sandbox.uid if sandbox else -1, namespaces=opts.namespaces,
                              log_lines_per_second=opts.log_lines_per_second, redact=opts.redact, ring=opts.ring)
            self._process = await self._launcher.launch(spec)
        except BaseException:
            os.close(host_writes)
            os.close(host_reads)
            raise
        finally:
            os.close(worker_reads)
            os.close(worker_writes)
        loop = asyncio.get_running_loop()
        # From the launch on, the exit is watched: whatever happens next, stop() ends (a worker whose
        # start was cancelled here once "survived SIGKILL" for 5 s: nothing was watching its exit).
        self._tasks = [loop.create_task(self._watch_exit())]
        # The host stopping meanwhile: the worker goes, and its output pipes with it; the open itself
        # runs to its end (a loop turn or two) and its pipes are closed once, by their transports.
        process = self._process
        channel = await run_to_end(
            WorkerChannel.open(self.plugin, opts.max_frame, host_writes, host_reads, self._channel_lost,
                               self._call_abandoned, self._on_call_ended),
            undo=lambda opened: opened.close(None), abandoned=lambda: process.signal_group(signal.SIGKILL))
        channel.redact = opts.redact
        channel.on_denied = self._denied_in_worker
        self._channel = channel

    def _denied_in_worker(self, count: int, destinations: list[str]) -> None:
        """Connects (and look-ups) its own check refused: a narrowed network's gate counts them;
        without a network at all, each destination is logged once with the key that grants it
        (a library's own error, "Can't connect to MySQL server", said nothing of it: compat pass 57)."""
        if self.egress is not None:
            self.egress.denied_in_worker(count, destinations, self._options.redact)
            return
        for reported in destinations:
            destination = quotable(reported, self._options.redact)
            if destination is None or destination in self._no_network_logged \
                    or len(self._no_network_logged) >= MAX_LOGGED_DENIALS:
                continue
            self._no_network_logged.add(destination)
            log.warning("plugin %s: connect to %s denied: it has no 'network' permission; to allow it, grant "
                        "config.json host.plugins.%s.permissions.network (true, or {\"hosts\": [\"HOST:PORT\"]})",
                        self.plugin, destination, self.plugin)

    def _environment(self) -> dict[str, str]:
        """Workers start with a scrubbed environment: no host secrets pass through."""
        opts = self._options
        tmp = "/tmp" if opts.namespaces else os.path.join(opts.data_dir, ".tmp")  # a private tmpfs, or made by the host
        env = {**opts.extra_env, "PATH": os.defpath, "LANG": "C.UTF-8", "HOME": opts.data_dir, "TMPDIR": tmp,
               p.COOKIE_KEY: p.COOKIE_VALUE, p.PLUGIN_KEY: self.plugin}
        if self._sandbox is not None:
            env[p.SANDBOX_KEY] = msgspec.json.encode(self._sandbox).decode()
            if self._sandbox.egress_filtered:
                env.update(RESOLVER_ENV)
        return env

    def _find_plugin_pid(self, pid_in_its_namespace: int) -> int | None:
        """The host's pid of the process that said Hello: the launched process itself, or, with a
        PID namespace, the descendant whose pid in there is the one it gave."""
        assert self._process is not None
        if not self._options.namespaces:
            return self._process.pid
        return find_in_namespace(self._process.pid, pid_in_its_namespace)

    def _take_egress_listener(self, fd_in_worker: int) -> None:
        """Before Load: the worker closes its own copy on Load, so plugin code never holds it."""
        assert self._process is not None and self._sandbox is not None
        try:
            self.egress = EgressGate(self.plugin, self.pid or self._process.pid, fd_in_worker,
                                     EgressPolicy.from_spec(self.plugin, self._sandbox, self._options.names),
                                     self._sandbox.rlimits.get("nofile") or DEFAULT_MAX_SOCKETS, self.processes)
        except OSError as exc:
            raise PluginStartError(self.plugin, f"cannot take the worker's connect() listener ({exc.strerror}): "
                                   "its network is narrowed to hosts, and no connection could be made") from None

    def processes(self) -> list[int]:
        """Every process of the worker's: its cgroup's members where it has one, else its launcher's
        tree (with namespaces, the namespace's init's, which orphans are reparented to). Reads /proc
        or the cgroup: for the egress's census and the workspace's measure, off the loop."""
        if self._options.members is not None:
            return self._options.members()
        root = self._process.pid if self._process is not None else None
        if root is None:
            return []
        try:
            return [root, *(child.pid for child in psutil.Process(root).children(recursive=True))]
        except psutil.Error:
            return []

    async def _handshake(self) -> p.Hello:
        assert self._channel is not None
        try:
            hello = await asyncio.wait_for(asyncio.shield(self._channel.hello),
                                           self._options.handshake_timeout)
        except asyncio.TimeoutError:
            raise PluginStartError(self.plugin, f"worker did not say hello within "
                                   f"{self._options.handshake_timeout:g} s") from None
        except WorkerCrashed as exc:
            raise PluginStartError(self.plugin, f"worker exited before the handshake "
                                   f"({describe_exit(exc.returncode)}); see its stderr above") from None
        if hello.protocol != p.PROTOCOL_VERSION:
            raise ProtocolMismatch(self.plugin, f"worker speaks protocol {hello.protocol}, "
                                   f"the host speaks {p.PROTOCOL_VERSION}")
        return hello

    async def _ask(self, make, expect: type, timeout: float, what: str, setting: str = "setup_timeout"):
        """`setting`: the host key that gives `timeout`, named when it runs out (newcomer pass 58:
        "setup() timed out after 5 s" said nothing of what to raise)."""
        if self._channel is None:
            raise PluginUnavailable(self.plugin, "worker is not running")
        try:
            return await self._channel.request(make, expect, timeout, what)
        except WorkerTimeout as exc:
            raise type(exc)(self.plugin, f"{exc.detail} (host.{setting})") from None
        except RemoteFailure as exc:
            raise PluginStartError(self.plugin, f"{what} failed: {exc.message}") from None
        except WorkerCrashed as exc:
            raise PluginStartError(self.plugin, f"worker crashed during {what} "
                                   f"({describe_exit(exc.returncode)})") from None

    # ---- calls -----------------------------------------------------------------------------------

    def call(self, tool: str, params: dict[str, Any], timeout: float) -> Awaitable[str] | None:
        """The call's future, straight from the channel: no coroutine layer of its own; None if this
        worker takes no calls now (accepting_calls, asked here rather than by every caller first:
        one step less on every call)."""
        channel = self._channel
        if channel is None or channel.closed is not None or self._stopping:
            return None
        return channel.call(tool, params, timeout)

    def call_cancelled(self, reply: Awaitable[str]) -> None:
        """The caller of call() was cancelled: the worker is told to cancel the handler (and killed if
        it cannot within cancel_grace), as at a timeout."""
        if self._channel is not None:
            self._channel.caller_cancelled(reply)

    async def ask(self, make: Callable[[int], p.HostMessage], timeout: float, what: str) -> Any:
        """A hook or a command: its return value; PluginError (naming `what`) if it raised."""
        channel = self._channel
        if channel is None or not self.accepting_calls:
            raise PluginUnavailable(self.plugin, "worker is stopping")
        try:
            reply = await channel.request(make, p.HookResult, timeout, what)
        except RemoteFailure as exc:
            raise PluginError(self.plugin, f"{what} failed: {exc.message}") from None
        try:
            return p.decode_hook_value(reply.value)
        except (ValueError, msgspec.DecodeError, RecursionError) as exc:  # a worker that lies about its value
            raise PluginError(self.plugin, f"{what} failed: {exc}") from None

    # ---- health ----------------------------------------------------------------------------------

    def beat(self, now: float) -> float | None:
        """A heartbeat tick's look at this worker (heartbeat.py): ping it if it has been silent for a
        whole ping_interval; kill it if its ping has gone unanswered for ping_timeout (a blocked
        event loop cannot answer). Returns when it should next be looked at; None once there is
        nothing left to watch."""
        channel = self._channel
        if channel is None or channel.closed is not None:
            return None
        opts = self._options
        if channel.ping_pending:
            answer_by = channel.ping_sent + opts.ping_timeout
            if now >= answer_by:
                self.kill(WorkerTimeout(self.plugin, f"unresponsive: no answer to a ping within "
                                        f"{opts.ping_timeout:g} s (event loop blocked?); killed"))
                return None
            return answer_by
        ping_at = channel.last_heard + opts.ping_interval
        if now < ping_at:
            return ping_at
        channel.ping()
        return now + opts.ping_timeout

    def _call_abandoned(self, request_id: int, what: str) -> None:
        """A call timed out, or its caller was cancelled, and the worker was told to cancel it; a worker
        that cannot even answer the cancel is stuck."""
        grace = self._options.cancel_grace

        def check() -> None:
            channel = self._channel
            if channel is not None and channel.closed is None and channel.is_abandoned(request_id):
                self.kill(CallStuck(self.plugin, f"{what} did not stop within {grace:g} s of being "
                                    "cancelled (a handler blocking the event loop?); killed"))

        asyncio.get_running_loop().call_later(grace, check)

    def kill(self, reason: PluginError) -> None:
        """SIGKILL the worker's process group; calls in flight end with `reason`."""
        if self._process is None or self.exited.done():
            return
        if self._lost_reason is None:  # said once: calls abandoned together each ask for the kill
            self._lost_reason = reason
            log.error("%s (pid %s)", reason, self.pid)
        self._process.signal_group(signal.SIGKILL)

    # ---- end -------------------------------------------------------------------------------------

    def _channel_lost(self, reason: PluginError | None) -> None:
        """The pipe closed or the worker broke the protocol: it must not outlive its channel."""
        if reason is not None and not isinstance(reason, ClosedMidFrame):
            log.error("%s (pid %s); killing the worker", reason, self.pid)
            self._lost_reason = self._lost_reason or reason
        if not self._stopping and self._process is not None and self._process.returncode is None:
            # A dying worker closes its pipes a moment before it exits: give it that moment, so its
            # own exit code is what gets reported (a worker killed while writing a frame crashed, it
            # did not lie); one that lives on without its pipes is killed.
            asyncio.get_running_loop().call_later(EOF_GRACE, self._kill_if_alive, reason)

    def _kill_if_alive(self, reason: PluginError | None = None) -> None:
        if self._process is not None and not self.exited.done():
            if isinstance(reason, ClosedMidFrame):
                log.error("%s (pid %s); killing the worker", reason, self.pid)
                self._lost_reason = self._lost_reason or reason
            self._process.signal_group(signal.SIGKILL)

    async def _watch_exit(self) -> None:
        assert self._process is not None
        code = await self._process.wait()
        if self._stopping:
            error: PluginError = PluginUnavailable(self.plugin, self._stop_reason)
        else:
            error = self._lost_reason or self._crash(code)
        self.exit_error = error
        if self.egress is not None:
            self.egress.close()
        if self._channel is not None:  # None: the start ended before its pipes were open
            self.lost_calls = self._channel.fail_pending(error)
            self._channel.close(None)
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._options.heartbeats.discard(self)
        if not self.exited.done():
            self.exited.set_result(code)
        if self._on_exit is not None:
            self._on_exit(self)

    def _crash(self, code: int | None) -> WorkerCrashed:
        oom = self._options.oom_kills
        if code == -signal.SIGKILL and oom is not None and oom() > self._oom_kills_at_start:
            return WorkerCrashed(self.plugin, code, f": out of memory, over its memory_mb={self._options.memory_mb}")
        if code == p.EXIT_MCP_SERVER_GONE and self._options.bridged:
            return WorkerCrashed(self.plugin, code, ": its MCP server exited, stopped answering or lost its "
                                                    "connection (the log says which)")
        return WorkerCrashed(self.plugin, code)

    async def stop(self, teardown: bool = True, reason: str = "worker stopped", at_once: bool = False) -> int | None:
        """Teardown, then SIGTERM, then SIGKILL; returns the exit code. Safe to call many times.
        `at_once`: SIGKILL straight away (a plugin over a ceiling gets no time to go on)."""
        if self._process is None:
            return None
        self._stopping = True
        self._stop_reason = reason
        opts = self._options
        first_grace = 0.0
        if teardown and not at_once and not self.exited.done() and self._channel is not None \
                and self._channel.closed is None:
            try:
                await self._channel.request(p.Teardown, p.Done, opts.teardown_timeout, "teardown()")
                self.stop_path.append("teardown")
                first_grace = 1.0  # the worker exits by itself right after answering
            except (PluginError, RemoteFailure) as exc:
                self.stop_path.append("teardown-failed")
                log.warning("plugin %s: teardown() did not finish cleanly: %s", self.plugin, exc)
        steps = ((signal.SIGKILL, 5.0),) if at_once else \
            ((None, first_grace), (signal.SIGTERM, opts.term_timeout), (signal.SIGKILL, 5.0))
        for sig, grace in steps:
            if sig is not None:
                self.stop_path.append(sig.name)
                self._process.signal_group(sig)
            try:
                return await asyncio.wait_for(asyncio.shield(self.exited), grace)
            except asyncio.TimeoutError:
                continue
        log.error("plugin %s: worker pid %s survived SIGKILL for 5 s", self.plugin, self.pid)
        if self._channel is not None:  # what it left of the host's is closed now, not when it ends
            self._channel.fail_pending(PluginUnavailable(self.plugin, reason))
            self._channel.close(None)
        return None
