"""host.metrics: Prometheus metrics and the health probes, scraped as Prometheus would and read with
prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qanot_host import ConfigError, Host, PluginState

from .conftest import GREETER, plugin, wait_until


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fetch(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample: (name, sorted labels) -> value; and (family name, ()) -> 0 for every family."""
    status, text = await asyncio.to_thread(fetch, port, "/metrics")
    assert status == 200, text
    families = list(text_string_to_metric_families(text))
    return {**{(family.name, ()): 0.0 for family in families},
            **{(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in families for sample in family.samples}}


def dashboard_series() -> set[str]:
    dashboard = json.loads((Path(__file__).parent.parent / "examples" / "grafana-dashboard.json").read_text())
    return {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"qanot_host_\w+", target["expr"])}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_counters_histograms_and_gauges_after_a_mix_of_calls(write_config):
    port = free_port()
    config = write_config([plugin("echo"), GREETER, plugin("misbehave")], host={
        "metrics": f"127.0.0.1:{port}", "restart": {"backoff_initial": 0},
        "plugins": {"misbehave": {"call_timeout": 0.3}}})
    async with Host(config) as host:
        registry = host.registry
        for text in ("a", "b", "c"):
            assert json.loads(await registry.execute("echo", {"text": text})) == {"text": text}
        assert "Missing required parameter" in await registry.execute("greet", {})
        assert "cannot greet today" in await registry.execute("greeter_fail", {})
        assert "timed out" in await registry.execute("mb_hang_async", {})
        misbehave = host.plugins["misbehave"]
        crashed_pid = misbehave.worker.pid
        assert "crashed" in await registry.execute("mb_crash", {"how": "exit"})
        await wait_until(lambda: misbehave.state == PluginState.READY and misbehave.worker.pid != crashed_pid, 10,
                         "the restart")
        assert "Unknown tool" in await registry.execute("no_such_tool", {})
        samples = await scrape(port)
    calls = "qanot_host_calls_total"
    assert value(samples, calls, plugin="echo", tool="echo", outcome="ok") == 3
    assert value(samples, calls, plugin="greeter", tool="greet", outcome="invalid_params") == 1
    assert value(samples, calls, plugin="greeter", tool="greeter_fail", outcome="tool_error") == 1
    assert value(samples, calls, plugin="misbehave", tool="mb_hang_async", outcome="timeout") == 1
    assert value(samples, calls, plugin="misbehave", tool="mb_crash", outcome="crashed") == 1
    assert value(samples, "qanot_host_unknown_tool_calls_total") == 1
    assert value(samples, "qanot_host_call_duration_seconds_count", plugin="echo", tool="echo") == 3
    hung = value(samples, "qanot_host_call_duration_seconds_sum", plugin="misbehave", tool="mb_hang_async")
    # its timeout, as the caller saw it: the host's timers run on the event loop's clock, which uvloop
    # reads once per loop turn in whole milliseconds, so the caller may see it a millisecond or two early
    assert 0.29 <= hung < 5, hung
    assert value(samples, "qanot_host_restarts_total", plugin="misbehave", reason="crashed") == 1
    for name in ("echo", "greeter", "misbehave"):
        assert value(samples, "qanot_host_plugin_state", plugin=name, state="ready") == 1
        assert value(samples, "qanot_host_calls_in_flight", plugin=name) == 0
        # its cgroup's charge: pages still shared with the template are the template's (0.7 MB seen for echo)
        assert value(samples, "qanot_host_worker_memory_bytes", plugin=name) > 1e5
        assert (("qanot_host_worker_cpu_seconds_total", (("plugin", name),)) in samples)
    assert value(samples, "qanot_host_workers") == 3
    assert value(samples, "qanot_host_uptime_seconds") > 0
    assert value(samples, "qanot_host_frames_total", direction="sent") >= 8  # 8 calls, and the starts
    assert value(samples, "qanot_host_frames_total", direction="received") >= 6
    assert value(samples, "qanot_host_template_starts_total") == 1
    # examples/grafana-dashboard.json asks only for series this host serves
    families = {name for name, labels in samples}
    assert not {name for name in dashboard_series()
                if name not in families and re.sub(r"_(total|bucket)$", "", name) not in families}


async def test_healthz_and_readyz_with_a_quorum(write_config):
    port = free_port()
    config = write_config([plugin("echo"), plugin("setup_fails")], host={"metrics": f"127.0.0.1:{port}"})
    async with Host(config):
        assert await asyncio.to_thread(fetch, port, "/healthz") == (200, '{"ok": true}')
        status, body = await asyncio.to_thread(fetch, port, "/readyz")
        assert status == 503 and json.loads(body)["not_ready"] == ["setup_fails"], body
        assert (await asyncio.to_thread(fetch, port, "/nope"))[0] == 404
    port = free_port()
    config = write_config([plugin("echo"), plugin("setup_fails")], host={"metrics": f"127.0.0.1:{port}",
                                                                           "ready_quorum": 1})
    async with Host(config):
        status, body = await asyncio.to_thread(fetch, port, "/readyz")
        assert status == 200 and json.loads(body)["ready"] == 1, body
    with pytest.raises(OSError):  # the port is closed with the host
        await asyncio.to_thread(fetch, port, "/healthz")


async def test_healthz_fails_when_the_event_loop_is_stuck(write_config):
    port = free_port()
    async with Host(write_config([plugin("echo")], host={"metrics": f"127.0.0.1:{port}"})):
        answers: list = []
        asking = threading.Thread(target=lambda: (time.sleep(0.2), answers.append(fetch(port, "/healthz"))))
        asking.start()
        time.sleep(3)  # the loop itself blocked: the probe, asked meanwhile, must say so, not hang
        await asyncio.to_thread(asking.join, 10)
        assert answers and answers[0][0] == 503, answers
        assert await asyncio.to_thread(fetch, port, "/healthz") == (200, '{"ok": true}')  # and recovers


async def test_a_taken_metrics_port_is_a_config_error_naming_the_key(write_config):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        host = Host(write_config([plugin("echo")], host={"metrics": f"127.0.0.1:{port}"}))
        with pytest.raises(ConfigError, match=r"host\.metrics: cannot listen on 127\.0\.0\.1:\d+"):
            await host.start()
    assert not host.plugins  # nothing started




async def test_series_stay_bounded_when_a_plugin_invents_tool_names(write_config):
    """Tool names are the plugin's: a worker restarting with new names each time must not grow the
    host's series without end. Past MAX_TOOL_SERIES per plugin they share the tool label "(other)"."""
    from qanot_host.metrics import MAX_TOOL_SERIES, HostMetrics
    host = Host(write_config([plugin("echo")]))
    metrics = HostMetrics(host)
    for i in range(MAX_TOOL_SERIES + 200):
        metrics.observe_call("shapeshifter", f"tool_{i}", None, 0.001)
    tools = {sample.labels["tool"] for family in metrics.registry.collect() if family.name == "qanot_host_calls"
             for sample in family.samples if sample.labels.get("plugin") == "shapeshifter"}
    assert len(tools) == MAX_TOOL_SERIES + 1 and "(other)" in tools


async def test_idle_connections_to_the_metrics_port_take_no_more_than_their_share(write_config):
    from qanot_host.metrics import MAX_CONNECTIONS
    import psutil
    port = free_port()
    async with Host(write_config([plugin("echo")], host={"metrics": f"127.0.0.1:{port}"})):
        threads = psutil.Process().num_threads()
        # past the limit, connections wait in the listen backlog (5 deep), not in threads of their own
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS + 4)]
        try:
            await asyncio.sleep(0.5)  # whatever the server would start for them, it has started
            assert psutil.Process().num_threads() <= threads + MAX_CONNECTIONS
        finally:
            for sock in idle:
                sock.close()
        # the server frees a closed connection's slot as its thread sees the close: soon, not at once
        answer = None
        for _ in range(50):
            answer = await asyncio.to_thread(fetch, port, "/healthz")
            if answer[0] == 200:
                break
            await asyncio.sleep(0.1)
        assert answer == (200, '{"ok": true}')


async def test_idle_plugins_and_their_activations_are_counted_and_ready(write_config):
    port = free_port()
    config = write_config([plugin("echo"), GREETER], host={
        "metrics": f"127.0.0.1:{port}", "activation": "lazy", "plugins": {"echo": {"activation": "eager"}}})
    async with Host(config) as host:
        status, body = await asyncio.to_thread(fetch, port, "/readyz")
        assert status == 200, body  # an idle plugin is ready: a call reaches it
        samples = await scrape(port)
        assert value(samples, "qanot_host_plugin_state", plugin="greeter", state="idle") == 1
        assert value(samples, "qanot_host_idle_stops_total", plugin="greeter") == 1  # listed, then stopped
        await host.registry.execute("greet", {"name": "x"})
        samples = await scrape(port)
        assert value(samples, "qanot_host_activations_total", plugin="greeter") == 1
        assert value(samples, "qanot_host_plugin_state", plugin="greeter", state="ready") == 1


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1:99999"])
def test_a_metrics_address_that_is_no_host_port_is_refused_by_check_too(write_config, address):
    """`check` passed host.metrics "nonsense", which `run` then refused (newcomer pass 58): it is
    refused where config.json is read, by both."""
    from qanot_host.config import load_config
    config = write_config([GREETER], host={"metrics": address})
    with pytest.raises(ConfigError, match=rf"config\.json: host\.metrics: '{re.escape(address)}' is not \"host:port\""):
        load_config(config)
