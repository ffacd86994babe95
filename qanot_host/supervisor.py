"""One configured plugin through its whole life: start, serve, restart, recycle, stop.

A worker that exits without being asked to is replaced according to the plugin's RestartPolicy.
Calls that arrive while a replacement starts wait for it (within their own timeout) instead of
failing, so a crash costs callers milliseconds; calls that were in flight on the dead worker end at
once with its exit reason.

A lazy plugin, or one idle for its idle_timeout, has no worker (state IDLE) and still has its tools
registered (from the tool cache, or from its last worker): its next call starts a worker and waits
for it within the call's own timeout. Stopping an idle worker is no crash: no restart is counted.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import psutil

from qanot_worker import protocol as p

from .datadirs import place_full_error
from .discovery import PluginSource
from .errors import CallTimedOut, PlaceFull, PluginError, PluginUnavailable, ProtocolMismatch, WorkerTimeout
from .mcp_servers import mcp_server
from .offered import OfferedTool
from .output import printable
from .registry import redact_credentials
from .restarter import RestartDecision, RestartPolicy, exit_reason
from .settings import Config, PluginEntry
from .tool_cache import CachedOffer
from .worker import WorkerHandle

if TYPE_CHECKING:
    from .worker_factory import WorkerFactory

__all__ = ["PluginSupervisor", "PluginState", "SERVING_STATES"]

log = logging.getLogger("qanot_host.supervisor")


class PluginState(enum.StrEnum):
    """A StrEnum: it compares, prints and serialises as its value ("ready"), as status shows it."""

    STARTING = "starting"
    READY = "ready"
    IDLE = "idle"  # no worker (lazy, or stopped when idle), tools registered: a call starts one
    RESTARTING = "restarting"
    FAILED = "failed"  # did not start, or gave up restarting: `error` says why; reload retries
    EXITED = "exited"  # ended normally and its restart policy says not to restart
    STOPPED = "stopped"


_READY = PluginState.READY  # for the hot path: `is` against a global, not a lookup on the enum

# The states in which a plugin's tools are registered and a call reaches it (an idle one starts its worker)
SERVING_STATES = (PluginState.READY, PluginState.IDLE)
MISSING_LAYER = "sandbox layer "  # how the worker words a layer it could not have (qanot_worker/sandbox.py)


@dataclass
class _Recycle:
    reason: str
    counts: bool  # toward the restart intensity (a limit breach does; max_calls does not)
    label: str = "recycled"  # the metrics' restart reason when it does not count ("operator": restart PLUGIN)


class PluginSupervisor:
    """Owns one plugin's worker for its whole life: asks `factory` for it at every (re)start,
    decides alone whether it can take a call, and tells the host (`on_ready`) when it may register
    the worker's tools. The host reads it; it never writes its fields."""

    def __init__(self, entry: PluginEntry, config: Config, source: PluginSource | None, factory: WorkerFactory,
                 on_ready: Callable[["PluginSupervisor"], None]) -> None:
        self.entry = entry
        self.name = entry.name
        self.source = source  # None: no plugin of that name was found (start() fails)
        self.site_dirs: list[str] = []  # its dependencies' environment
        restart = config.restart_for(entry.name)
        self.policy = RestartPolicy(restart.policy, restart.max_restarts, restart.window,
                                    restart.backoff_initial, restart.backoff_max, restart.stable_after,
                                    plugin=entry.name)
        self.limits = config.limits_for(entry.name)
        self._config = config
        self._timeouts: dict[str | None, float] = {}  # per tool (None: hooks, commands), resolved once
        self._factory = factory
        self._on_ready = on_ready
        self.state = PluginState.STARTING
        self.error = ""
        self.worker: WorkerHandle | None = None
        self.tools: list[str] = []
        self.conflicts: list[str] = []  # tools another plugin holds the name of
        self.refused: list[str] = []  # tools whose schema the host cannot use
        self.unknown_timeouts: list[str] = []  # tool_timeouts keys naming no tool it offers
        self.calls = self.errors = self.timeouts = self.restarts = 0
        self.last_exit = ""
        self.in_flight = 0
        self.idle = asyncio.Event()  # set while no call is in flight: drains wait on it, never poll
        self.idle.set()
        self.settled = asyncio.Event()  # set whenever the plugin is not starting or restarting
        self.recoveries: collections.deque[float] = collections.deque(maxlen=10000)
        self.restart_reasons: collections.Counter[str] = collections.Counter()  # what the metrics count
        self.sandbox_warned = False
        self._closing = False
        self._closing_why = ""  # what a call is told once it is closing: the host stops, or a reload restarts it
        self._recycling: _Recycle | None = None
        self._calls_since_start = 0
        self._restart_task: asyncio.Task | None = None
        self._exit_seen_at = 0.0
        self._proc: psutil.Process | None = None
        self._cpu_at_start = 0.0
        keep = source is not None and source.manifest.keep_running  # plugin.json opts out of lazy and idle
        lazy, idle_timeout = config.activation_for(entry.name) == "lazy", config.idle_timeout_for(entry.name)
        self.lazy = lazy and not keep
        self.idle_timeout = None if keep else idle_timeout
        if keep and (lazy or idle_timeout):
            log.warning("plugin %s: its plugin.json says keep_running: it starts with the host and is never "
                        "stopped when idle, whatever activation and idle_timeout say", entry.name)
        self.offer_key = ""  # what its tool list is cached under (set by the host before start)
        self._offer: CachedOffer | None = None  # what its last worker offered, or the cache did
        self._last_active = 0.0  # when its last call ended (monotonic)
        self._activation: asyncio.Task | None = None
        self._failed_activations = 0  # starts for a call that failed: a call waiting through one fails with it
        self._next_activation_at = 0.0  # after a failed one, the restart policy's backoff (monotonic)
        self._idle_stop: asyncio.Task | None = None  # the idle worker's teardown, still under way
        self._stopping: WorkerHandle | None = None  # that worker
        self._background: set[asyncio.Task] = set()  # a failed plugin's disk being let go
        self.activations = 0  # workers started by a call to an idle plugin
        self.idle_stops = 0

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self, site_dirs: list[str]) -> None:
        """First start, in the environment `site_dirs` make; raises PluginError (the host records it
        with fail()). A lazy plugin with a valid cached tool list starts no worker; one without is
        started once to list its tools, then stopped."""
        self.site_dirs = site_dirs
        if self.lazy and self.offer_key:
            self._offer = self._factory.tool_cache.load(self.name, self.offer_key)
            if self._offer is not None:
                self._became_idle()
                return
        self.worker = await self._spawn()
        self._became_ready()
        if self.lazy:
            self._stop_idle_worker("lazy: started only to list its tools")
            if self._idle_stop is not None:  # its place measured after it, before the start is reported
                await asyncio.wait([self._idle_stop])  # (a reload said nothing of one over its ceiling then:
                # attack pass 63)

    async def _spawn(self) -> WorkerHandle:
        worker = await self._factory.spawn(self)
        if worker.report.sandbox_warnings and not self.sandbox_warned:
            self.sandbox_warned = True  # once per plugin, not at every restart
            for warning in worker.report.sandbox_warnings:
                log.warning("plugin %s: %s", self.name, warning)
        assert worker.info is not None  # a started worker has said what it offers
        offer = CachedOffer(self.offer_key, worker.info, worker.tools, worker.extensions)
        if self.offer_key and (self.lazy or self.idle_timeout) and offer != self._offer:  # a lazy start mostly
            self._factory.tool_cache.store(self.name, offer)  # offers what the cache said it would
        self._offer = offer
        return worker

    @property
    def offered_tools(self) -> list[OfferedTool]:
        """The tools its worker offers (or its last worker, or the cache, while it has none)."""
        return self._offer.tools if self._offer is not None else []

    @property
    def offer(self) -> CachedOffer | None:
        """What it offers: tools, docs (info) and extension points; None before it ever started."""
        return self._offer

    @property
    def serving(self) -> bool:
        """Its tools are registered and a call reaches it (starting its worker if it is idle)."""
        return self.state in SERVING_STATES

    def retry_start(self, detail: str) -> bool:
        """A first start that failed where a later one may not (an MCP server not up yet, or one that
        exited while starting): the restart policy decides, as after a crash. False: it gives up."""
        decision = self._start_failed(detail, "start")
        if not decision.restart or self._closing:
            return False
        self.error = detail
        self._exit_seen_at = time.monotonic()
        log.warning("plugin %s: its start failed (%s); trying again in %.2f s", self.name, detail, decision.delay)
        self._schedule_restart(decision.delay)
        return True

    def fail(self, message: str) -> None:
        self.state = PluginState.FAILED
        self.error = message
        self.settled.set()
        self._let_disk_go()

    def _let_disk_go(self) -> None:
        """A failed plugin holds nothing until a reload tries it again: its disk's loop device and
        mount go now, not at the host's stop (newcomer pass 56: a plugin failed at its start kept
        both for the host's life). The worker template hears it before any later start's request."""
        worker = self.worker
        if self._closing or (worker is not None and not worker.exited.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._factory.release_disk(self.name))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _became_ready(self) -> None:
        self._cpu_at_start = self._factory.group_cpu(self.name) or 0.0
        self.state = PluginState.READY
        self.error = ""
        self._calls_since_start = 0
        self._proc = None
        self._last_active = time.monotonic()
        self.settled.set()
        self._on_ready(self)

    def _became_idle(self) -> None:
        self.state = PluginState.IDLE
        self.settled.set()
        self._on_ready(self)

    # ---- idle and lazy ---------------------------------------------------------------------------

    def stop_if_idle(self, now: float) -> None:
        """Called periodically by the host: a worker without a call for idle_timeout is stopped."""
        if self.idle_timeout is None or self.state != PluginState.READY or self.in_flight or \
                now - self._last_active < self.idle_timeout or self._recycling is not None:
            return
        self._stop_idle_worker(f"no call for {self.idle_timeout:g} s")

    def _stop_idle_worker(self, why: str) -> None:
        """The worker goes (teardown() first); the plugin stays, IDLE, its tools registered."""
        worker = self.worker
        if worker is None:
            return
        self.worker = None  # its exit is no crash: worker_exited ignores a worker that is not current
        self._stopping = worker  # until it is gone: status shows its pid (its teardown() may take a while)
        self.idle_stops += 1
        self.state = PluginState.IDLE
        log.info("plugin %s: stopping worker pid %s (%s); its next call starts one", self.name, worker.pid, why)
        self._idle_stop = asyncio.get_running_loop().create_task(self._stop_idle(worker, why))

    async def _stop_idle(self, worker: WorkerHandle, why: str) -> None:
        """An idle plugin holds nothing: its worker goes, and so does its disk (the launcher would keep
        it attached, a loop device, a mount and a journal thread, for the host's life)."""
        began = time.monotonic()
        await worker.stop(reason=f"idle: {why}")
        log.info("plugin %s: worker pid %s stopped (%.2f s after it was asked to)", self.name, worker.pid,
                 time.monotonic() - began)
        await self._factory.release_disk(self.name)
        await self._measure_place_after_stop()

    async def _measure_place_after_stop(self) -> None:
        """Its teardown() may have written to its place in the workspace, and no walk follows an idle
        stop (attack pass 62: 5 GB taken by fallocate() in teardown(), unseen until the next call):
        measured once its worker is gone; over its ceiling, the plugin fails, as it would at a start."""
        if self._closing:
            return
        problem = await self._factory.place_problem(self.name, self.limits.workspace_mb)
        if problem and self.state is PluginState.IDLE and not self._closing:
            self.place_full(problem)

    def place_full(self, problem: str) -> None:
        """An idle plugin (no worker) whose place in the workspace is over its ceiling: failed, as its
        start would fail, at once rather than at its next call."""
        message = place_full_error(self.name, problem)
        log.error("plugin %s: %s", self.name, message)
        self.fail(message)

    def _activate(self) -> None:
        """An idle plugin's first call: start a worker (once, however many calls wait for it)."""
        if self._activation is None or self._activation.done():
            self.state = PluginState.STARTING
            self.settled.clear()
            self._activation = asyncio.get_running_loop().create_task(self._start_on_call())

    async def _start_on_call(self) -> None:
        if self._idle_stop is not None:  # the last worker's teardown ends first (its disk, its cgroup);
            await asyncio.wait([self._idle_stop])  # cancelling this start must not cancel that teardown
        backoff = self._next_activation_at - time.monotonic()
        if backoff > 0:  # the start before failed: the callers wait, within their timeouts, as for a restart
            await asyncio.sleep(backoff)
        if self._closing:
            return
        try:
            self.worker = await self._spawn()
        except Exception as exc:  # noqa: BLE001 - whatever it was, the waiting calls are told, the host runs on
            detail, decision = self._spawn_failed(exc, "start on a call")
            self._failed_activations += 1
            if isinstance(exc, PlaceFull):  # no later call can start it either
                log.error("plugin %s: its worker did not start for a call (%s)", self.name, detail)
                self.fail(detail)  # (status showed it idle: attack pass 64)
            elif decision.restart:
                # Attack pass 69: with no backoff, a burst of calls to a plugin whose setup() failed (a
                # service down for a moment) spent its restart intensity in 0.2 s, and it was failed.
                self._next_activation_at = time.monotonic() + decision.delay
                log.error("plugin %s: its worker did not start for a call: %s%s", self.name, detail,
                          f"; the next call's start waits {decision.delay:.2f} s" if decision.delay else "")
                self.error = detail
                self.state = PluginState.IDLE
                self.settled.set()
            else:
                log.error("plugin %s: its worker did not start for a call (%s); giving up", self.name, detail)
                self.fail(f"{decision.reason}; last exit: {self.last_exit}")
            return
        self.activations += 1
        log.info("plugin %s: worker started for a call (pid %s, %.1f ms)", self.name, self.worker.pid,
                 1000 * self.worker.start_seconds)
        self._became_ready()

    def worker_exited(self, worker: WorkerHandle) -> None:
        """WorkerHandle's on_exit: decide between restart and giving up."""
        if worker is not self.worker or self._closing:
            return
        now = time.monotonic()
        self._exit_seen_at = now
        code = worker.exited.result()
        self.last_exit = worker.exit_error.detail if worker.exit_error else f"exit code {code}"
        recycle, self._recycling = self._recycling, None
        if recycle is not None:
            self.last_exit = f"recycled: {recycle.reason}"
        uptime = now - worker.started_at if worker.started_at else 0.0
        if recycle is not None and not recycle.counts:
            self.restart_reasons[recycle.label] += 1
            self._schedule_restart(0.0)
            return
        decision = self.policy.decide(abnormal=recycle is not None or code != 0, uptime=uptime, now=now)
        in_flight = f" with {_calls(worker.lost_calls)} in flight" if worker.lost_calls else ""
        if decision.restart:
            self.restart_reasons[exit_reason(worker.exit_error, recycle is not None, code)] += 1
            log.warning("plugin %s: worker pid %s ended (%s)%s; restarting in %.2f s", self.name, worker.pid,
                        self.last_exit, in_flight, decision.delay)
            self._schedule_restart(decision.delay)
            return
        self.state = PluginState.FAILED if code != 0 or recycle else PluginState.EXITED
        self.error = f"{decision.reason}; last exit: {self.last_exit}"
        self.settled.set()
        self._let_disk_go()
        log.error("plugin %s: worker pid %s ended (%s)%s; not restarting: %s", self.name, worker.pid,
                  self.last_exit, in_flight, decision.reason)

    def _schedule_restart(self, delay: float) -> None:
        self.state = PluginState.RESTARTING
        self.settled.clear()
        self._restart_task = asyncio.get_running_loop().create_task(self._restart(delay))

    async def _restart(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        if self._closing:
            return
        old_pid = self.worker.pid if self.worker else None
        try:
            self.worker = await self._spawn()
        except ProtocolMismatch as exc:  # restarting cannot fix a worker of another version
            self.last_exit = f"restart failed: {exc.detail}"
            self.fail(exc.detail)
            log.error("plugin %s: %s; not restarting", self.name, exc.detail)
            return
        except Exception as exc:  # PluginError, or the host short of something (EMFILE from a pipe)
            detail, decision = self._spawn_failed(exc, "restart")
            if isinstance(exc, PlaceFull):  # trying again cannot help until files are removed
                self.fail(detail)
                log.error("plugin %s: restart failed (%s); not trying again until a reload", self.name, detail)
            elif decision.restart and not self._closing:
                log.error("plugin %s: restart failed (%s); retrying in %.2f s", self.name, detail, decision.delay)
                self._schedule_restart(decision.delay)
            else:
                self.fail(f"{decision.reason}; last exit: {self.last_exit}")
                log.error("plugin %s: restart failed (%s); giving up", self.name, detail)
            return
        self.restarts += 1
        self.recoveries.append(time.monotonic() - self._exit_seen_at)
        log.warning("plugin %s: restarted (pid %s replaces %s, %.1f ms after the exit)", self.name,
                    self.worker.pid, old_pid, 1000 * self.recoveries[-1])
        self._became_ready()

    def _spawn_failed(self, exc: Exception, what: str) -> tuple[str, RestartDecision]:
        """A worker that did not start (a restart, or a start for a call): why, and _start_failed's
        decision."""
        detail = exc.detail if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}"
        return detail, self._start_failed(detail, what)

    def _start_failed(self, detail: str, what: str) -> RestartDecision:
        """A start that failed, recorded as the last exit; whether the restart policy allows another try."""
        self.last_exit = f"{what} failed: {detail}"
        return self.policy.decide(abnormal=True, uptime=0.0, now=time.monotonic())

    def recycle(self, reason: str, counts: bool, label: str = "recycled", at_once: bool = False) -> None:
        """Replace a running worker on purpose: teardown() is tried, then the worker is killed.
        `at_once`: killed straight away, with no teardown() (a ceiling it would go on passing)."""
        worker = self.worker
        if worker is not None and at_once and self._recycling is not None and not worker.exited.done():
            # over a ceiling while a recycle drains its calls (max_calls, an operator's restart) or
            # waits for teardown(): that time is not given to it (the review of 11-27)
            log.warning("plugin %s: killing worker pid %s: %s", self.name, worker.pid, reason)
            self._recycling = _Recycle(reason, counts, label)
            asyncio.get_running_loop().create_task(worker.stop(reason=f"worker recycled: {reason}", at_once=True))
            return
        if self.state != PluginState.READY or worker is None or self._recycling is not None:
            return
        log.warning("plugin %s: recycling worker pid %s: %s", self.name, worker.pid, reason)
        self._recycling = _Recycle(reason, counts, label)
        self.state = PluginState.RESTARTING
        self.settled.clear()
        asyncio.get_running_loop().create_task(self._recycle(worker, reason, drain=not counts, at_once=at_once))

    async def _recycle(self, worker: WorkerHandle, reason: str, drain: bool, at_once: bool) -> None:
        if drain:  # a planned recycle lets calls in flight finish first, as long as the plugin's calls may take
            try:
                await asyncio.wait_for(self.idle.wait(), self.longest_call_timeout())
            except asyncio.TimeoutError:
                pass
        await worker.stop(reason=f"worker recycled: {reason}", at_once=at_once)

    def longest_call_timeout(self) -> float:
        """The longest any call to this plugin may take: its own timeout, or a tool's if longer."""
        tools = self._config.settings_for(self.name).tool_timeouts or {}
        return max([self._call_timeout(None), *(self._call_timeout(tool) for tool in tools)])

    async def stop(self, why: str = "the host is shutting down") -> None:
        """`why`: what a call that comes meanwhile is told."""
        self.close_to_calls(why)
        for task in (self._restart_task, self._activation):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._idle_stop is not None:
            await asyncio.gather(self._idle_stop, return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.worker is not None:
            await self.worker.stop()
        if self.state != PluginState.FAILED:
            self.state = PluginState.STOPPED
        self.settled.set()

    @property
    def config(self) -> Config:
        """The config its workers are made from: the host's (a build job's adds the job itself)."""
        return self._config

    def rebind(self, config: Config) -> None:
        """A reload left this plugin untouched: later calls use the new config's host defaults."""
        self._config = config
        self._timeouts.clear()

    def close_to_calls(self, why: str = "the host is shutting down") -> None:
        self._closing = True
        self._closing_why = why

    # ---- calls -----------------------------------------------------------------------------------

    def set_tools(self, tools: list[str], conflicts: list[str], refused: list[str],
                  unknown_timeouts: list[str]) -> None:
        """What the registry made of the worker's tools: registered, held by another plugin, refused,
        and tool_timeouts keys naming none of them."""
        self.tools, self.conflicts, self.refused, self.unknown_timeouts = tools, conflicts, refused, unknown_timeouts

    def _call_timeout(self, tool: str | None) -> float:
        """The one place a call's timeout is resolved (the tool's, else the plugin's, else the
        host's; None: a hook or command, the plugin's), once per tool until a reload."""
        timeout = self._timeouts.get(tool)
        if timeout is None:
            timeout = self._timeouts[tool] = self._config.call_timeout(self.name, tool)
        return timeout

    def _serving(self) -> WorkerHandle | None:
        """"Can this take a call now?": the worker of a ready plugin, while it accepts calls (send()
        asks the same, inline, and also whether the plugin is closing, which _refuse_if_unavailable
        then turns into the caller's error)."""
        worker = self.worker
        if self.state is PluginState.READY and worker is not None and worker.accepting_calls:
            return worker
        return None

    def send(self, tool: str, params: dict[str, Any], timeout: float | None = None) -> Awaitable[str] | None:
        """A ready plugin's call, sent at once: its future, which the worker's reply settles; None if
        no worker can take it now (call() waits for one). The call stops at its configured timeout,
        or at the caller's if that is sooner. Every call comes this way, so it takes the short way
        through each check (the checks' own method calls cost a fifth of the host's CPU per call at
        64 in flight), and the caller awaits the channel's future itself (execute() does: a
        coroutine of this method's own cost as much again). How the call ends is counted by
        call_ended(), which the channel calls; a caller cancelled while it waits says so with
        cancelled(), so that the worker is told."""
        worker = self.worker
        if self.state is not _READY or self._closing or worker is None:
            return None
        configured = self._timeouts.get(tool) or self._call_timeout(tool)  # the cache, then its method
        # Refused here (params that cannot be framed): nothing is in flight. Counted in flight only
        # once sent: a refused call was left in flight for good, and the host's stop waited on it.
        reply = worker.call(tool, params, configured if timeout is None else _clamped(timeout, configured))
        if reply is None:  # its pipe closed, or a stop began: call() waits for the next worker
            return None
        self.calls += 1
        self._calls_since_start += 1
        self.in_flight += 1
        if self.in_flight == 1:
            self.idle.clear()
        max_calls = self.limits.max_calls
        if max_calls and self._calls_since_start >= max_calls:
            # its last call: calls that come while it is in flight wait for the next worker
            self.recycle(f"served max_calls={max_calls} calls", counts=False)
        return reply

    async def call(self, tool: str, params: dict[str, Any], timeout: float | None = None) -> str:
        """send() and the wait for its reply, as one coroutine; a call that finds no ready worker
        waits for one (a start, a restart) within its timeout."""
        reply = self.send(tool, params, timeout)
        waited_from = left = 0.0
        if reply is None:
            self._refuse_if_unavailable()
            configured = self._call_timeout(tool)
            timeout = configured if timeout is None else _clamped(timeout, configured)
            waited_from = timeout
            try:  # not in flight while it waits: a drain (a recycle) waits for calls sent, not these
                _, left = await self._wait_for_worker(f"tool {tool}", timeout)
                reply = self.send(tool, params, left)
                if reply is None:  # taken from under it in the same step: say why, as a call then would
                    self._refuse_if_unavailable()
                    raise PluginUnavailable(self.name, "its worker is not taking calls")
            except PluginError:
                self.errors += 1  # failed all the same (its start for this call failed, say): counted
                raise
        try:
            return await reply
        except asyncio.CancelledError:  # the caller went away (an MCP client's cancel): so does the call
            self.cancelled(reply)
            raise
        except CallTimedOut as exc:
            if waited_from:  # its time ran partly while it waited for a worker
                raise WorkerTimeout(self.name, f"tool {tool} timed out after {waited_from:g} s, "
                                               f"{waited_from - left:.3g} s of it waiting for a worker") from None
            raise exc from None

    def cancelled(self, reply: Awaitable[str]) -> None:
        """The caller awaiting send()'s `reply` was cancelled: the worker is told to cancel the
        handler (and killed if it cannot within cancel_grace), as at a timeout."""
        if self.worker is not None:
            self.worker.call_cancelled(reply)

    def call_ended(self, error: PluginError | None) -> None:
        """A call sent by send() ended (answered, failed, timed out, its caller gone, its worker
        gone): the channel says so, once for each."""
        if error is not None:
            self.errors += 1
            if isinstance(error, WorkerTimeout):
                self.timeouts += 1
                worker = self.worker
                log.warning("plugin %s: %s (pid %s)", self.name, error.detail, worker.pid if worker else None)
        self._ended()

    async def hook(self, name: str, kwargs: dict[str, Any]) -> Any:
        """Run one of the plugin's hooks in its worker (the Qanot drop-in forwards them); its value."""
        return await self._ask(lambda i: p.Hook(i, name, kwargs), f"hook {name}")

    async def run_command(self, index: int, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Call the handler of the plugin's get_commands()[index] in its worker; its value."""
        commands = self._offer.extensions.commands if self._offer is not None else []
        what = f"command {printable(commands[index].command, 80)!r}" if 0 <= index < len(commands) else \
            f"command {index}"
        return await self._ask(lambda i: p.RunCommand(i, index, args, kwargs), what)

    async def _ask(self, make, what: str) -> Any:
        self._refuse_if_unavailable()
        timeout = self._call_timeout(None)
        worker = self._serving()
        if worker is None:
            worker, timeout = await self._wait_for_worker(what, timeout)
        self._began()  # a drain (a planned recycle, the host's stop) waits for it as for a call
        try:
            return await worker.ask(make, timeout, what)
        finally:
            self._ended()

    def _began(self) -> None:
        """One more call, hook or command in flight: `idle`, which drains wait on, is clear."""
        self.in_flight += 1
        if self.in_flight == 1:
            self.idle.clear()

    def _ended(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self.idle.set()
            if self.idle_timeout is not None:
                self._last_active = time.monotonic()

    def _refuse_if_unavailable(self) -> None:
        """At once, and without arming a timer: a caller retrying in a loop must leave nothing behind."""
        if self._closing:
            raise PluginUnavailable(self.name, self._closing_why)
        if self.state in (PluginState.FAILED, PluginState.EXITED, PluginState.STOPPED):
            raise PluginUnavailable(self.name, self.error or f"plugin is {self.state}")

    async def _wait_for_worker(self, what: str, timeout: float) -> tuple[WorkerHandle, float]:
        """Wait (within the call's timeout) for a worker that can take the call; returns it and the
        time left. A worker whose pipe just closed is about to be reaped and replaced: wait for that
        rather than fail the call."""
        deadline = time.monotonic() + timeout
        activated = False
        failed_starts = self._failed_activations  # one failing after this call came is its answer too
        try:
            async with asyncio.timeout(timeout):
                while True:
                    worker = self.worker
                    if worker is not None and not worker.accepting_calls and self.state == PluginState.READY:
                        await asyncio.shield(worker.exited)
                        await asyncio.sleep(0)  # let the exit callback move the state on
                        continue
                    if self.state == PluginState.IDLE:
                        if activated or self._failed_activations != failed_starts:
                            # the start this call waited for failed: say why rather than try again (calls
                            # that shared it each started another: attack pass 69, six setup()s in 0.16 s)
                            raise PluginUnavailable(self.name, f"its worker did not start: {self.error}")
                        self._activate()
                        activated = True
                    await self.settled.wait()
                    serving = self._serving()
                    if serving is not None:
                        return serving, max(deadline - time.monotonic(), 0.001)
                    if not self.settled.is_set():  # a call woken with this one took the worker's last call
                        continue
                    if self.state == PluginState.IDLE and self.worker is None:
                        continue
                    if self._closing:  # stopped meanwhile (a reload restarts it, the host stops): say so
                        raise PluginUnavailable(self.name, self._closing_why)
                    if self.state != PluginState.READY or self.worker is None:
                        raise PluginUnavailable(self.name, self.error or f"plugin is {self.state}")
        except TimeoutError:
            self.timeouts += 1
            starting = activated or (self._activation is not None and not self._activation.done())
            waited = "start" if starting else "restart"  # an idle plugin's start is no restart (attack pass 69)
            raise WorkerTimeout(self.name, f"{what} timed out after {timeout:g} s waiting for "
                                f"the plugin's worker to {waited}") from None

    # ---- limits and status -----------------------------------------------------------------------

    def check_limits(self) -> None:
        """Called periodically by the host: recycle a worker over its memory or CPU limit."""
        limits = self.limits
        if self.state != PluginState.READY or not (limits.max_rss_mb or limits.max_cpu_seconds):
            return
        usage = self.usage()
        if usage is None:
            return
        rss_mb, cpu = usage
        if limits.max_rss_mb and rss_mb > limits.max_rss_mb:
            self.recycle(f"memory {rss_mb:.0f} MB is over max_rss_mb={limits.max_rss_mb:g}", counts=True)
        elif limits.max_cpu_seconds and cpu > limits.max_cpu_seconds:
            self.recycle(f"CPU time {cpu:.1f} s is over max_cpu_seconds={limits.max_cpu_seconds:g}",
                         counts=True)

    def usage(self) -> tuple[float, float] | None:
        """(memory in MB, CPU seconds) of the current worker, or None if it is not running: of its
        whole cgroup where the host has one (children and memfds count), else of its process."""
        worker = self.worker
        if worker is None or worker.pid is None or worker.exited.done():
            return None
        memory, cpu = self._factory.group_usage(self.name)
        if cpu is not None:
            cpu -= self._cpu_at_start  # the group outlives its workers: count this one's time only
        if memory is not None and cpu is not None:
            return memory, cpu
        try:
            if self._proc is None or self._proc.pid != worker.pid:
                self._proc = psutil.Process(worker.pid)
            with self._proc.oneshot():
                times = self._proc.cpu_times()
                rss = self._proc.memory_info().rss / 2**20
        except psutil.Error:
            return None
        return (memory if memory is not None else rss), (cpu if cpu is not None else times.user + times.system)

    def status(self) -> dict[str, Any]:
        live = self.worker if self.worker is not None and not self.worker.exited.done() else None
        usage = self.usage() if live else None
        server = mcp_server(self._config, self.name)
        return {
            "plugin": self.name, "kind": f"mcp {server[1].transport}" if server else "plugin",
            # key=value credentials in a plugin's own words redacted, as `call` shows them (attack pass 47)
            "state": self.state, "error": redact_credentials(self.error),
            "pid": live.pid if live else None,
            "uptime": round(time.monotonic() - live.started_at, 3) if live and live.started_at else 0.0,
            "restarts": self.restarts, "last_exit": redact_credentials(self.last_exit),
            "rss_mb": round(usage[0], 1) if usage else None, "cpu_s": round(usage[1], 2) if usage else None,
            "calls": self.calls, "errors": self.errors, "timeouts": self.timeouts,
            "tools": list(self.tools), "conflicts": list(self.conflicts), "refused_tools": list(self.refused),
            "unknown_tool_timeouts": list(self.unknown_timeouts),
            "sandbox": list(live.report.sandbox_layers) if live else [],
            # the layers not active, apart from its other warnings (a granted path that does not
            # exist was counted as a missing layer: newcomer pass 58)
            "sandbox_missing": [w for w in live.report.sandbox_warnings if w.startswith(MISSING_LAYER)] if live else [],
            "sandbox_warnings": [w for w in live.report.sandbox_warnings
                                 if not w.startswith(MISSING_LAYER)] if live else [],
            "egress": live.egress.status() if live and live.egress else None,
            "activation": "lazy" if self.lazy else "eager", "idle_timeout": self.idle_timeout,
            "activations": self.activations, "idle_stops": self.idle_stops,
            # a worker stopped when idle, still there: its teardown() runs (attack pass 69: shown as no
            # worker while it held 841 MB for seconds)
            "stopping_pid": self._stopping.pid if self._stopping is not None and not self._stopping.exited.done()
            else None,
        }


def _calls(tools: list[str]) -> str:
    """"tool a", "calls of a (3), b": the calls a worker had in flight, for the log."""
    counts = collections.Counter(tools)
    if len(tools) == 1:
        return f"tool {tools[0]}"
    return "calls of " + ", ".join(f"{tool} ({n})" if n > 1 else tool for tool, n in sorted(counts.items()))


def _clamped(timeout: float, configured: float) -> float:
    """A caller's timeout may only shorten the configured one; not a number (NaN) is no timeout at
    all, which turned the configured one off (attack pass 50)."""
    if timeout != timeout or timeout >= configured:
        return configured
    return max(timeout, 0.001)
