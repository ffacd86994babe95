"""Prometheus metrics and the health probes, on one port (host.metrics: "127.0.0.1:9464"; off by default).

The exposition format is the official prometheus_client's; the port is served from a thread by the
standard library's WSGI server, so a scrape neither waits on the event loop nor stalls it. Counters
are increments made on the loop and read by the scrape thread (prometheus_client's values are
thread-safe); what only the loop may read (each plugin's state and usage, and whether the loop
answers at all) is asked of the loop, with a deadline.

    /metrics   every qanot_host_* series
    /healthz   200 while the host's event loop answers within 2 s, else 503
    /readyz    200 while enough enabled plugins are ready (host.ready_quorum, default all), else 503
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .errors import (ConfigError, InvalidParams, PluginUnavailable, ProtocolViolation, ToolFailed, ToolNotFound,
                     WorkerCrashed, WorkerTimeout)
from .settings import split_host_port

if TYPE_CHECKING:
    from .host import Host

__all__ = ["HostMetrics", "call_outcome"]

log = logging.getLogger("qanot_host.metrics")

LOOP_DEADLINE = 2.0  # what /healthz gives the event loop to answer
# Calls to a worker take tens of microseconds to the call's own timeout: buckets from 100 µs to 60 s.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)
IN_HOST = "(host)"  # the plugin label of a tool registered in the host itself
# Tool names are the plugin's to choose, and a worker that restarts may choose new ones each time:
# past this many tools with series of their own, a plugin's further tools share the tool label OTHER.
MAX_TOOL_SERIES = 256
OTHER = "(other)"
MAX_CONNECTIONS = 16  # scrapes and probes served at once; more are answered 503 at once
CONNECTION_SECONDS = 10  # what one connection may take in all (a client trickling a header included)


def call_outcome(exc: BaseException | None) -> str:
    """How a call ended, as the `outcome` label says it."""
    if exc is None:
        return "ok"
    if isinstance(exc, ToolFailed):
        return "tool_error"
    if isinstance(exc, InvalidParams):
        return "invalid_params"
    if isinstance(exc, (WorkerTimeout, asyncio.TimeoutError)):
        return "timeout"
    if isinstance(exc, (WorkerCrashed, ProtocolViolation)):
        return "crashed"
    if isinstance(exc, PluginUnavailable):
        return "unavailable"
    if isinstance(exc, ToolNotFound):
        return "unknown_tool"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return "error"


class HostMetrics:
    """The host's metrics; `observe_call` is what the registry calls at the end of every call."""

    def __init__(self, host: Host) -> None:
        self._host = host
        self.registry = CollectorRegistry()
        self._calls = Counter("qanot_host_calls", "Tool calls, by how they ended", ["plugin", "tool", "outcome"],
                              registry=self.registry)
        self._latency = Histogram("qanot_host_call_duration_seconds", "Tool call latency, as the caller saw it",
                                  ["plugin", "tool"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self._unknown = Counter("qanot_host_unknown_tool_calls", "Calls naming no registered tool (the name is "
                                "not a label: callers choose it)", registry=self.registry)
        self._started = time.time()
        self._cache: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._tools_of: dict[str, set[str]] = {}  # plugin -> the tools with series of their own
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.registry.register(_HostCollector(self))

    # ---- recording (on the event loop) -----------------------------------------------------------

    def observe_call(self, plugin: str | None, tool: str, exc: BaseException | None, seconds: float) -> None:
        if isinstance(exc, ToolNotFound):
            self._unknown.inc()
            return
        key = (plugin or IN_HOST, tool)
        children = self._cache.get(key)
        if children is None:
            labelled = self._tools_of.setdefault(key[0], set())
            if len(labelled) < MAX_TOOL_SERIES:
                labelled.add(tool)
            else:  # shared, and not remembered by name: what a plugin invents costs nothing here
                key = (key[0], OTHER)
            children = self._cache.get(key)
            if children is None:
                children = self._cache[key] = (self._latency.labels(*key), key)
        key = children[1]
        children[0].observe(seconds)
        self._calls.labels(*key, call_outcome(exc)).inc()

    # ---- serving (a thread of its own) -----------------------------------------------------------

    def serve(self, address: str) -> None:
        """Listen on "host:port"; ConfigError naming host.metrics if that cannot be done."""
        try:
            host, port = split_host_port(address, "host.metrics")
        except ValueError as exc:
            raise ConfigError(f"{self._host.config.path}: {exc}") from None
        self._loop = asyncio.get_running_loop()
        app = self._app(make_wsgi_app(self.registry))
        try:
            self._server = make_server(host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler)
        except OSError as exc:
            raise ConfigError(f"{self._host.config.path}: host.metrics: cannot listen on {address}: "
                              f"{exc.strerror or exc}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="qanot-metrics", daemon=True)
        self._thread.start()
        log.info("metrics, /healthz and /readyz on http://%s:%d", host, self.port)

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server is not None else 0

    async def close(self) -> None:
        """Off the event loop: shutdown() waits for the serving thread to notice (up to half a second)."""
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()

    def _app(self, metrics_app: Callable) -> Callable:
        def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/healthz":
                healthy = self._ask_loop(_noop) is not None
                return _reply(start_response, 200 if healthy else 503,
                              {"ok": healthy} if healthy else {"ok": False, "error": "the event loop did not answer "
                                                                          f"within {LOOP_DEADLINE:g} s"})
            if path == "/readyz":
                answer = self._ask_loop(self._readiness)
                if answer is None:
                    return _reply(start_response, 503, {"ok": False, "error": "the event loop did not answer"})
                return _reply(start_response, 200 if answer["ok"] else 503, answer)
            if path in ("/metrics", "/"):
                return metrics_app(environ, start_response)
            return _reply(start_response, 404, {"ok": False, "error": f"no {path}: /metrics, /healthz, /readyz"})
        return app

    def _ask_loop(self, read: Callable[[], Any]) -> Any:
        """`read()`'s answer, computed on the event loop; None if the loop does not answer in time."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return None
        try:
            if asyncio.get_running_loop() is loop:
                return read()  # asked on the loop itself (a test, or prometheus_client's own describe)
        except RuntimeError:
            pass  # the scrape thread: no loop of its own

        async def on_loop() -> Any:
            return read()
        try:
            return asyncio.run_coroutine_threadsafe(on_loop(), loop).result(LOOP_DEADLINE)
        except (concurrent.futures.TimeoutError, RuntimeError):
            return None

    def _readiness(self) -> dict[str, Any]:
        host = self._host
        enabled = [e.name for e in host.config.plugins if e.enabled]
        ready = [name for name in enabled if name in host.plugins and host.plugins[name].serving]
        quorum = host.config.host.ready_quorum
        needed = len(enabled) if quorum is None else min(len(enabled), max(0, int(quorum)))
        return {"ok": len(ready) >= needed and not host.stopping, "ready": len(ready), "enabled": len(enabled),
                "needed": needed, "not_ready": sorted(set(enabled) - set(ready))}

    def _usage(self) -> list[tuple[str, str, dict[str, Any], int, dict[str, int]]]:
        """Per plugin (on the loop): its name, state, status, calls in flight and restarts by reason."""
        return [(name, str(s.state), s.status(), s.in_flight, dict(s.restart_reasons))
                for name, s in self._host.plugins.items()]


class _HostCollector(Collector):
    """What is read at scrape time: the plugins' state and usage, and the host's own figures."""

    def __init__(self, metrics: HostMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Any]:
        return []  # nothing to check for clashes at registration; collect() is for scrapes

    def collect(self) -> Iterable[Any]:
        metrics = self._metrics
        host = metrics._host
        yield GaugeMetricFamily("qanot_host_uptime_seconds", "Seconds since the host started",
                                value=time.time() - metrics._started)
        rows = metrics._ask_loop(metrics._usage) or []
        states = GaugeMetricFamily("qanot_host_plugin_state", "1 for the state each plugin is in",
                                   labels=["plugin", "state"])
        in_flight = GaugeMetricFamily("qanot_host_calls_in_flight", "Calls running now", labels=["plugin"])
        rss = GaugeMetricFamily("qanot_host_worker_memory_bytes", "Each worker's memory (its cgroup's where it has "
                                "one)", labels=["plugin"])
        cpu = CounterMetricFamily("qanot_host_worker_cpu_seconds", "Each worker's CPU time since it started",
                                  labels=["plugin"])
        egress = CounterMetricFamily("qanot_host_egress_connections", "Connections of a plugin whose network is "
                                     "narrowed to hosts, by the host's decision", labels=["plugin", "decision"])
        workers = 0
        for name, state, status, flying, _ in rows:
            states.add_metric([name, state], 1)
            in_flight.add_metric([name], flying)
            if status["pid"]:
                workers += 1
            if status["rss_mb"] is not None:
                rss.add_metric([name], status["rss_mb"] * 2**20)
                cpu.add_metric([name], status["cpu_s"])
            if status["egress"]:
                egress.add_metric([name, "allowed"], status["egress"]["allowed"])
                egress.add_metric([name, "denied"], status["egress"]["denied"])
                egress.add_metric([name, "over_limit"], status["egress"]["over_limit"])
        yield from (states, in_flight, rss, cpu, egress)
        yield GaugeMetricFamily("qanot_host_workers", "Worker processes running", value=workers)
        restarts = CounterMetricFamily("qanot_host_restarts", "Worker restarts, by why the worker ended",
                                       labels=["plugin", "reason"])
        for name, _, _, _, reasons in rows:
            for reason, count in sorted(reasons.items()):
                restarts.add_metric([name, reason], count)
        yield restarts
        activations = CounterMetricFamily("qanot_host_activations", "Workers started by a call to an idle (lazy "
                                          "or idle-stopped) plugin", labels=["plugin"])
        idle_stops = CounterMetricFamily("qanot_host_idle_stops", "Workers stopped for want of calls "
                                         "(idle_timeout, or a lazy plugin listed)", labels=["plugin"])
        for name, _, status, _, _ in rows:
            activations.add_metric([name], status["activations"])
            idle_stops.add_metric([name], status["idle_stops"])
        yield from (activations, idle_stops)
        installs = CounterMetricFamily("qanot_host_dependency_install_seconds", "Time spent building each "
                                       "plugin's dependency environments", labels=["plugin"])
        for name, seconds in sorted(host.install_seconds().items()):
            installs.add_metric([name], seconds)
        yield installs
        frames = CounterMetricFamily("qanot_host_frames", "Protocol frames between the host and its workers",
                                     labels=["direction"])
        sent, received = host.frame_counts()
        frames.add_metric(["sent"], sent)
        frames.add_metric(["received"], received)
        yield frames
        yield CounterMetricFamily("qanot_host_template_starts", "Starts of the worker template (the fork server)",
                                  value=host.template_starts())


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most MAX_CONNECTIONS at once: whoever reaches the port cannot
    make the host start threads without end."""

    daemon_threads = True

    def server_activate(self) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._deadlines: dict[Any, float] = {}  # connection -> when it is cut
        self._lock = threading.Lock()
        self._closing = threading.Event()
        super().server_activate()
        threading.Thread(target=self._cut_late, name="qanot-metrics-deadlines", daemon=True).start()

    def server_close(self) -> None:
        closing = getattr(self, "_closing", None)  # none when the bind failed, before activation
        if closing is not None:
            closing.set()
        super().server_close()

    def _cut_late(self) -> None:
        """One thread for every connection's deadline (not a timer thread each)."""
        while not self._closing.wait(0.25):
            now = time.monotonic()
            with self._lock:
                late = [conn for conn, deadline in self._deadlines.items() if deadline < now]
            for conn in late:
                try:
                    conn.shutdown(2)  # SHUT_RDWR: the handler's read or write ends at once
                except OSError:
                    pass

    block_on_close = False  # closing never waits on a client

    def process_request(self, request: Any, client_address: Any) -> None:
        """Never blocks the accepting thread (so close() always ends): past MAX_CONNECTIONS a client
        gets 503 at once; each connection is cut after CONNECTION_SECONDS, however it trickles."""
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Content-Length: 53\r\n\r\n"
                                b'{"ok": false, "error": "too many connections (16)"}\r\n')
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self._lock:
            self._deadlines[request] = time.monotonic() + CONNECTION_SECONDS
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client cut at its deadline, or gone: not worth a traceback on the host's stderr (which
        anyone reaching the port could otherwise fill, past --log-format json)."""
        log.debug("metrics: a connection from %s ended badly", client_address, exc_info=True)

    def _done(self, request: Any) -> None:
        with self._lock:
            self._deadlines.pop(request, None)
        self._slots.release()


class _QuietHandler(WSGIRequestHandler):
    timeout = CONNECTION_SECONDS

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass  # a scrape every 15 s is not news


def _noop() -> bool:
    return True


def _reply(start_response: Callable, code: int, body: dict[str, Any]) -> list[bytes]:
    reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[code]
    data = json.dumps(body).encode()
    start_response(f"{code} {reason}", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]
