"""Per-plugin environments built with uv from a local wheel directory (no network needed)."""

from __future__ import annotations

import json
import logging
import os
import re
import time

import pytest

from qanot_host import Host, PluginState

from .conftest import GREETER, check_report, make_wheel, plugin


@pytest.fixture
def wheels(tmp_path):
    directory = tmp_path / "wheels"
    directory.mkdir()
    make_wheel(directory, "qhtest-dep", "1.0.0")
    make_wheel(directory, "qhtest-dep", "2.0.0")
    return str(directory)


async def test_conflicting_versions_each_in_its_own_environment(write_config, wheels, tmp_path):
    config = write_config([plugin("dep_v1"), plugin("dep_v2"), GREETER], host={"wheel_dir": wheels})
    async with Host(config) as host:
        v1 = json.loads(await host.registry.execute("dep_v1_version", {}))
        v2 = json.loads(await host.registry.execute("dep_v2_version", {}))
    assert v1["version"] == "1.0.0" and v2["version"] == "2.0.0"
    assert v1["file"].startswith(str(tmp_path / "state" / "envs"))
    assert os.path.dirname(v1["file"]) != os.path.dirname(v2["file"])
    import importlib.util
    assert importlib.util.find_spec("qhtest_dep") is None  # never installed into the host


async def test_environment_is_reused_while_requirements_are_unchanged(write_config, wheels, tmp_path, caplog):
    config = write_config([plugin("dep_v1")], host={"wheel_dir": wheels})
    caplog.set_level(logging.INFO, logger="qanot_host.environments")
    async with Host(config) as host:
        assert host.install_seconds()["dep_v1"] > 0
    # an install is never silent: a line when it starts, one when it ends (time, size)
    assert "plugin dep_v1: installing 1 dependency with uv" in caplog.text
    assert re.search(r"plugin dep_v1: dependencies installed in \d+\.\d s \(\d+\.\d MB\)", caplog.text), caplog.text
    caplog.clear()
    envs = tmp_path / "state" / "envs"
    [env] = [p for p in envs.iterdir() if p.is_dir()]
    built = env.stat().st_mtime_ns
    started = time.monotonic()
    async with Host(config) as host:
        assert host.plugins["dep_v1"].state == PluginState.READY
    assert env.stat().st_mtime_ns == built
    assert "installing" not in caplog.text  # no rebuild happened
    assert time.monotonic() - started < 10  # (a bound, not a benchmark)


async def test_unresolvable_requirement_fails_that_plugin_with_uvs_message(write_config, wheels):
    config = write_config([plugin("dep_bad"), plugin("dep_v1"), GREETER], host={"wheel_dir": wheels})
    async with Host(config) as host:
        bad = host.plugins["dep_bad"]
        assert bad.state == PluginState.FAILED
        assert bad.error.startswith("installing dependencies failed:")
        assert "qhtest-dep==9.9.9" in bad.error  # uv's own explanation names the requirement
        assert host.plugins["dep_v1"].state == PluginState.READY
        assert host.plugins["greeter"].state == PluginState.READY


@pytest.fixture
def http_server():
    """A server that records every request; a refused dependency must never reach it."""
    import http.server
    import threading
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


@pytest.fixture
def stalling_index():
    """A package index that answers a byte a second: uv waits on it as long as the test likes."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            try:
                for _ in range(120):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    server.shutdown()
    server.server_close()


def test_uv_dies_with_a_sigkilled_host(write_config, tmp_path, stalling_index):
    """Attack pass 61: uv, installing a plugin's dependencies from a slow index, went on under PID 1
    after the host's SIGKILL (holding the connection and its scratch environment), and each start
    of the host added another."""
    import signal
    import subprocess
    import sys

    import psutil
    plugins = tmp_path / "extra"
    (plugins / "slow_deps").mkdir(parents=True)
    (plugins / "slow_deps" / "plugin.py").write_text("from qanot.plugins.base import Plugin\n"
                                                     "class QanotPlugin(Plugin):\n    pass\n")
    (plugins / "slow_deps" / "plugin.json").write_text(json.dumps({"dependencies": ["qhtest-stalled>=1"]}))
    config = write_config([plugin("slow_deps")], plugins_dir=str(plugins), host={"index_url": stalling_index})

    def uvs() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["name", "cmdline"]):
            try:
                if proc.info["name"] == "uv" and str(tmp_path) in " ".join(proc.info["cmdline"] or []) \
                        and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except psutil.NoSuchProcess:
                pass
        return found
    host = subprocess.Popen([sys.executable, "-m", "qanot_host", "run", "--config", config],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not uvs():
            assert host.poll() is None and time.monotonic() < deadline, "no uv started"
            time.sleep(0.05)
        time.sleep(0.5)  # uv on its way to the index
        host.send_signal(signal.SIGKILL)
        host.wait()
        deadline = time.monotonic() + 5
        while uvs() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert uvs() == [], [(p.pid, p.ppid()) for p in uvs()]
    finally:
        host.kill()
        host.wait()
        for proc in uvs():
            proc.kill()


@pytest.mark.parametrize("entry, why", [
    ("--index-url={url}/simple", "options are not taken from plugin.json"),
    ("evil @ {url}/evil-1.0-py3-none-any.whl", "a direct reference (URL or path) is refused"),
    ("evil @ {url}/evil-1.0.tar.gz", "a direct reference (URL or path) is refused"),
    ("evil @ file:///tmp/evil-1.0-py3-none-any.whl", "a direct reference (URL or path) is refused"),
    ("git+{url}/evil.git", "is not a plain requirement"),
    ("./evil", "is not a plain requirement"),
    ("/tmp/evil-1.0-py3-none-any.whl", "is not a plain requirement"),
    ("evil -i {url}/simple", "is not a plain requirement"),
])
async def test_dependencies_are_plain_requirements_only(write_config, tmp_path, http_server, entry, why):
    url, hits = http_server
    entry = entry.format(url=url)
    plugins = tmp_path / "extra"
    (plugins / "sneaky").mkdir(parents=True)
    (plugins / "sneaky" / "plugin.py").write_text("from qanot.plugins.base import Plugin\n"
                                                  "class QanotPlugin(Plugin):\n    pass\n")
    (plugins / "sneaky" / "plugin.json").write_text(json.dumps({"dependencies": ["msgspec>=0.18", entry]}))
    async with Host(write_config([plugin("sneaky"), plugin("echo")], plugins_dir=str(plugins))) as host:
        error = host.plugins["sneaky"].error
        assert f"plugin.json: dependencies[1]: {entry!r}" in error and why in error, error
        assert "\n" not in error  # one line: packaging's own message draws a caret under the entry (newcomer pass 56)
        assert host.plugins["echo"].state == PluginState.READY
    assert hits == []  # the host fetched nothing the plugin named
    report = check_report(write_config([plugin("sneaky")], plugins_dir=str(plugins)))
    assert f"dependencies[1]: {entry!r}" in report


@pytest.mark.parametrize("dependencies, why", [
    (["a" * 200_000], "characters long; a requirement takes at most 500"),
    ([f"pkg{i}" for i in range(150)], "dependencies: 150 given; at most 100 are taken"),
])
async def test_an_outsized_dependency_list_fails_its_plugin_only(write_config, tmp_path, dependencies, why):
    """The fifth attacker's F1: one 200 000-character requirement made launching uv fail with E2BIG,
    outside any handler, and took the whole host's start down with a traceback."""
    plugins = tmp_path / "extra"
    (plugins / "bigdep").mkdir(parents=True)
    (plugins / "bigdep" / "plugin.py").write_text("from qanot.plugins.base import Plugin\n"
                                                  "class QanotPlugin(Plugin):\n    pass\n")
    (plugins / "bigdep" / "plugin.json").write_text(json.dumps({"dependencies": dependencies}))
    async with Host(write_config([plugin("bigdep"), plugin("echo")], plugins_dir=str(plugins))) as host:
        assert host.plugins["bigdep"].state == PluginState.FAILED
        assert why in host.plugins["bigdep"].error, host.plugins["bigdep"].error
        assert host.plugins["echo"].state == PluginState.READY
    assert why in check_report(write_config([plugin("bigdep")], plugins_dir=str(plugins)))
