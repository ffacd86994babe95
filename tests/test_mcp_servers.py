"""Qanot's `mcp_servers` as supervised, sandboxed workers: real third-party servers (mcp-server-time
from PyPI, the filesystem server from npm) and a probe server on the official SDK that misbehaves on
request, each run by the host as a plugin of the server's name."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from qanot_host.config import parse_config
from qanot_host.errors import ConfigError
from qanot_host.host import Host
from qanot_host.supervisor import PluginState

from .conftest import check_report, gone, grant_write, plugin, wait_until
from .third_party import filesystem_server, probe_script, python_servers

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def server_venv() -> Path:
    return python_servers()


@pytest.fixture
def token() -> str:
    """Marks one test's server processes (their command lines), so they can be found among all."""
    return f"probe-{uuid.uuid4().hex[:12]}"


def probe(venv: Path, token: str, name: str = "probe", **extra) -> dict:
    return {"name": name, "command": str(venv / "bin" / "python"), "args": [probe_script(), token], **extra}


def probe_grants(name: str = "probe", **settings) -> dict:
    read = {"filesystem": {"read": [os.path.dirname(probe_script())]}}
    return {"plugins": {name: {"permissions": read, **settings}}}


def server_processes(token: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if token in " ".join(proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


def sigkill_the_host_once_servers_run(config: str, log: Path, servers, count: int = 2) -> list[str]:
    """`qanot-host run` until `servers()` finds `count` processes, then SIGKILL the host: none of them
    may be left 10 s later. The names of the processes found."""
    with open(log, "wb") as out:
        host = subprocess.Popen([sys.executable, "-m", "qanot_host", "run", "--config", config], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=out)
    try:
        deadline = time.monotonic() + 90
        while len(servers()) < count:
            assert host.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        names = [proc.name() for proc in servers()]
        host.kill()
        host.wait()
        deadline = time.monotonic() + 10
        while servers() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert servers() == []
        return names
    finally:
        host.kill()
        host.wait()
        for proc in servers():
            proc.kill()


def the_server(token: str) -> psutil.Process:
    servers = server_processes(token)
    assert len(servers) == 1, servers
    return servers[0]


# ---- real third-party servers ---------------------------------------------------------------------

async def test_time_server_from_pypi_runs_sandboxed_with_qanots_tool_names(write_config, server_venv):
    config = write_config([plugin("echo")], mcp_servers=[
        {"name": "time", "transport": "stdio", "command": str(server_venv / "bin" / "mcp-server-time"),
         "args": ["--local-timezone", "UTC"]}])
    async with Host(config) as host:
        status = {row["plugin"]: row for row in host.status()}
        assert status["time"]["state"] == "ready", status["time"]
        tools = {tool["name"]: tool for tool in host.tool_definitions()}
        assert {"get_current_time", "convert_time"} <= set(tools)
        assert tools["get_current_time"]["description"].startswith("[MCP:time] ")
        assert tools["get_current_time"]["plugin"] == "time"
        assert "timezone" in tools["get_current_time"]["input_schema"]["properties"]
        answer = json.loads(await host.registry.execute("get_current_time", {"timezone": "Asia/Tashkent"}))
        assert answer["timezone"] == "Asia/Tashkent" and answer["datetime"].endswith("+05:00")
        converted = json.loads(await host.registry.execute(
            "convert_time", {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"}))
        assert converted["target"]["datetime"].startswith(converted["source"]["datetime"][:10])
        bad = json.loads(await host.registry.execute("get_current_time", {"timezone": "Mars/Olympus"}))
        assert "Mars/Olympus" in bad["error"]


async def test_filesystem_server_from_npm_is_confined_by_the_kernel(write_config, tmp_path):
    command = filesystem_server()
    granted = tmp_path / "granted"
    granted.mkdir()
    (granted / "note.txt").write_text("hello from the granted directory")
    secret = tmp_path / "secret.txt"
    secret.write_text("the host's secret")
    for path in (tmp_path, granted):
        os.chmod(path, 0o755)
    for path in (granted / "note.txt", secret):
        os.chmod(path, 0o644)  # readable by any uid: only the sandbox stands in the way
    # The server is told it may serve "/" (its own checks allow every path): only the kernel confines it.
    config = write_config([], host={"plugins": {"files": {"permissions": {"filesystem": {"read": [str(granted)]}}}}},
                          mcp_servers=[{"name": "files", "command": str(command), "args": ["/"]}])
    async with Host(config) as host:
        assert host.plugins["files"].state.value == "ready", host.status()
        assert "read_text_file" in host.registry.tool_names
        allowed = await host.registry.execute("list_allowed_directories", {})
        assert allowed.splitlines()[-1] == "/"
        assert await host.registry.execute("read_text_file", {"path": str(granted / "note.txt")}) \
            == "hello from the granted directory"
        for path in (secret, "/etc/shadow", "/proc/1/environ"):
            answer = await host.registry.execute("read_text_file", {"path": str(path)})
            assert "error" in json.loads(answer), answer
            assert "secret" not in answer.replace("secret.txt", "")
        written = await host.registry.execute("write_file", {"path": str(granted / "new.txt"), "content": "x"})
        assert "error" in json.loads(written) and not (granted / "new.txt").exists()


def processes_with_env(token: str) -> list[psutil.Process]:
    """Live processes whose environment holds QH_TEST_TOKEN=token (a real server's command line
    cannot carry a mark)."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and proc.environ().get("QH_TEST_TOKEN") == token:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def real_servers(server_venv: Path, token: str, granted: Path) -> tuple[list[dict], dict]:
    servers = [{"name": "time", "command": str(server_venv / "bin" / "mcp-server-time"),
                "args": ["--local-timezone", "UTC"], "env": {"QH_TEST_TOKEN": token}},
               {"name": "files", "command": str(filesystem_server()), "args": [str(granted)],
                "env": {"QH_TEST_TOKEN": token}}]
    os.chmod(granted, 0o755)
    grants = {"files": {"permissions": {"filesystem": {"read": [str(granted)]}}, "tool_timeouts": {"list_directory": 2}}}
    return servers, grants


async def test_real_servers_killed_or_stopped_are_replaced(write_config, server_venv, token, tmp_path):
    granted = tmp_path / "granted"
    granted.mkdir()
    (granted / "a.txt").write_text("a")
    servers, grants = real_servers(server_venv, token, granted)
    config = write_config([], host={"plugins": grants, "restart": {"backoff_initial": 0}, "ping_interval": 0.5,
                                    "ping_timeout": 1}, mcp_servers=servers)
    async with Host(config) as host:
        assert {"get_current_time", "list_directory"} <= set(host.registry.tool_names)

        def server_of(name: str) -> psutil.Process | None:
            worker = host.plugins[name].worker
            try:
                children = psutil.Process(worker.pid).children(recursive=True) if worker and worker.pid else []
            except psutil.NoSuchProcess:
                return None
            return next((p for p in processes_with_env(token) if p in children), None)

        def replaced(name: str, old: psutil.Process) -> bool:
            new = server_of(name)
            return host.plugins[name].state.value == "ready" and new is not None and new.pid != old.pid

        # SIGKILL: the bridge sees its child go at once; the next call reaches a new server
        node = server_of("files")
        assert node is not None and node.name() == "node"
        node.kill()
        await wait_until(lambda: replaced("files", node), 30, "a new filesystem server")
        assert "a.txt" in await host.registry.execute("list_directory", {"path": str(granted)})
        # SIGSTOP: a hung server; its call times out, its pings go unanswered, it is replaced
        python, node = server_of("time"), server_of("files")
        assert python is not None and node is not None
        node.suspend()
        answer = json.loads(await host.registry.execute("list_directory", {"path": str(granted)}))
        assert "timed out" in answer["error"], answer
        await wait_until(lambda: replaced("files", node), 30, "the hung server replaced")
        assert gone(node)
        assert "a.txt" in await host.registry.execute("list_directory", {"path": str(granted)})
        assert server_of("time") == python  # the other server untouched
        assert "Asia/Tokyo" in await host.registry.execute("get_current_time", {"timezone": "Asia/Tokyo"})


def test_no_real_server_outlives_the_hosts_sigkill(write_config, server_venv, token, tmp_path):
    granted = tmp_path / "granted"
    granted.mkdir()
    servers, grants = real_servers(server_venv, token, granted)
    config = write_config([plugin("echo")], host={"plugins": grants}, mcp_servers=servers)
    servers = sigkill_the_host_once_servers_run(config, tmp_path / "host.log", lambda: processes_with_env(token))
    assert "node" in servers


# ---- the probe server: supervision ----------------------------------------------------------------

def restarting_probe(write_config, server_venv: Path, token: str) -> str:
    """A config of the probe server alone, restarted at once when it goes."""
    return write_config([], host={**probe_grants(), "restart": {"backoff_initial": 0}},
                        mcp_servers=[probe(server_venv, token)])


async def slow_call_in_flight(host: Host) -> asyncio.Future:
    """A call the probe server is busy with (for 30 s) when this returns."""
    call = asyncio.ensure_future(host.registry.execute("slow", {"seconds": 30}))
    await asyncio.sleep(0.5)
    return call


async def test_a_server_killed_mid_call_fails_that_call_and_is_restarted(write_config, server_venv, token):
    async with Host(restarting_probe(write_config, server_venv, token)) as host:
        first = the_server(token)
        call = await slow_call_in_flight(host)
        first.kill()
        answer = json.loads(await asyncio.wait_for(call, 20))
        assert "error" in answer
        await wait_until(lambda: host.plugins["probe"].state.value == "ready" and server_processes(token)
                         and server_processes(token)[0].pid != first.pid, 30, "a new server")
        assert await host.registry.execute("echo", {"text": "back"}) == "back"
        assert host.plugins["probe"].status()["restarts"] >= 1
        # and a server that dies by its own hand, mid-call
        second = the_server(token)
        answer = json.loads(await host.registry.execute("crash", {}))
        # the caller is told it was the server (a tester saw only "worker crashed (exit code 3)"):
        # the worker's exit for it, or, if the bridge saw the pipe close before the exit, the call's
        assert "its MCP server exited, stopped answering or lost its connection" in answer["error"] and \
            answer["error"].endswith("during tool crash") or "MCP server probe" in answer["error"], answer
        await wait_until(lambda: host.plugins["probe"].state.value == "ready" and server_processes(token)
                         and server_processes(token)[0].pid != second.pid, 30, "a third server")
        assert await host.registry.execute("echo", {"text": "again"}) == "again"


async def test_a_server_that_closes_its_stdout_and_lives_on_is_replaced_at_once(write_config, server_venv, token,
                                                                                 caplog):
    config = write_config([], host={**probe_grants(), "restart": {"backoff_initial": 0}, "ping_interval": 120},
                          mcp_servers=[probe(server_venv, token)])
    async with Host(config) as host:
        first = the_server(token)
        started = time.monotonic()
        answer = json.loads(await asyncio.wait_for(host.registry.execute("hang_up", {}), 20))
        assert "error" in answer, answer

        def replaced() -> bool:
            servers = server_processes(token)
            return host.plugins["probe"].state.value == "ready" and bool(servers) and servers[0].pid != first.pid
        await wait_until(replaced, 30, "a new server")  # not at the next ping, 120 s on
        assert time.monotonic() - started < 30
        assert await host.registry.execute("echo", {"text": "back"}) == "back"
        assert host.plugins["probe"].status()["restarts"] >= 1
    assert "MCP server probe: the server closed its stdout" in caplog.text


async def test_bursts_of_calls_cancelled_as_they_are_answered_leave_a_healthy_server_alone(write_config, server_venv,
                                                                                          token):
    """Attack pass 65: bursts of calls timing out within milliseconds, as the server answered them,
    had the host kill the server's healthy worker ("did not stop within 3 s of being cancelled"):
    cancelled calls the bridge never answered (qanot_worker/eager.py)."""
    quick = {"name": "probe", "command": str(server_venv / "bin" / "python"), "args": [probe_script("quick_server.py"),
                                                                                      token]}
    config = write_config([], host={**probe_grants(), "cancel_grace": 1}, mcp_servers=[quick])
    async with Host(config) as host:
        sup = host.plugins["probe"]
        pid = sup.worker.pid
        for _ in range(15):  # one kill in one to five bursts before
            await asyncio.gather(*(host.registry.execute("quick", {}, timeout=0.003) for _ in range(100)))
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.5)  # past cancel_grace
        assert sup.worker.pid == pid and sup.restarts == 0, sup.status()
        assert await host.registry.execute("quick", {}) == "done"


def serial_server(server_venv: Path, token: str, milliseconds: int) -> dict:
    return {"name": "probe", "command": str(server_venv / "bin" / "python"),
            "args": [probe_script("quick_server.py"), token, str(milliseconds)]}


async def test_a_call_cancelled_behind_a_backlog_of_requests_is_answered_at_once(write_config, server_venv, token):
    """Attack pass 66: a server reading one request at a time, 10 MB of calls waiting for its stdin;
    the last call cancelled: its notifications/cancelled waited behind them all, its worker was not
    done with the cancel until then, and was killed cancel_grace later with every call in flight."""
    config = write_config([], host={**probe_grants(), "cancel_grace": 1},
                          mcp_servers=[serial_server(server_venv, token, 30)])
    async with Host(config) as host:
        sup = host.plugins["probe"]
        pid = sup.worker.pid
        calls = [asyncio.ensure_future(host.registry.execute("quick", {"pad": "q" * 100_000}, timeout=60))
                 for _ in range(100)]
        await asyncio.sleep(0.3)
        calls[-1].cancel()
        answers = await asyncio.gather(*calls[:-1])
        assert answers == ["done"] * 99, [answer for answer in answers if answer != "done"][:2]
        assert sup.worker.pid == pid and sup.restarts == 0, sup.status()


async def test_a_server_answering_its_queue_is_not_taken_for_hung_after_a_cancel(write_config, server_venv, token,
                                                                               caplog):
    """Attack pass 66: after a cancelled call, the ping that checks the server is not hung waited
    behind 140 calls a server answers one at a time (20 ms each), and the server was replaced while
    answering them; one answering requests within the patience is busy, not hung."""
    config = write_config([], host={**probe_grants(), "ping_interval": 1, "ping_timeout": 1},
                          mcp_servers=[serial_server(server_venv, token, 20)])
    async with Host(config) as host:
        sup = host.plugins["probe"]
        pid = sup.worker.pid
        calls = [asyncio.ensure_future(host.registry.execute("quick", {}, timeout=60)) for _ in range(150)]
        await asyncio.sleep(0.2)
        calls[-1].cancel()
        answers = await asyncio.gather(*calls[:-1])
        assert answers == ["done"] * 149, [answer for answer in answers if answer != "done"][:2]
        assert sup.worker.pid == pid and sup.restarts == 0, sup.status()
    assert "no answer to an MCP ping" not in caplog.text


async def test_a_hung_server_writing_answers_to_requests_never_sent_is_still_replaced(write_config, server_venv,
                                                                                       token):
    """Attack pass 67: after a cancelled call, a server gets longer to answer the check's ping while
    it answers other requests; a hung server's thread writing answers to requests nobody sent passed
    for that, and with a call always in flight (no heartbeat ping) was never replaced."""
    config = write_config([], host={**probe_grants(), "ping_interval": 1, "ping_timeout": 1,
                                    "restart": {"backoff_initial": 0}},
                          mcp_servers=[serial_server(server_venv, token, 0)])
    async with Host(config) as host:
        sup = host.plugins["probe"]
        assert "timed out" in await host.registry.execute("hang", {}, timeout=0.5)
        waiting = asyncio.ensure_future(host.registry.execute("quick", {}, timeout=30))  # a call in flight
        await wait_until(lambda: sup.restarts >= 1, 10, "the hung server replaced")
        assert "error" in json.loads(await asyncio.wait_for(waiting, 10))


async def test_the_worker_killed_mid_call_takes_its_server_along(write_config, server_venv, token):
    async with Host(restarting_probe(write_config, server_venv, token)) as host:
        first = the_server(token)
        call = await slow_call_in_flight(host)
        os.kill(host.plugins["probe"].worker.pid, signal.SIGKILL)
        assert "error" in json.loads(await asyncio.wait_for(call, 20))
        await wait_until(lambda: gone(first), 10,
                         "the old server gone")
        await wait_until(lambda: host.plugins["probe"].state.value == "ready" and server_processes(token)
                         and server_processes(token)[0].pid != first.pid, 30, "a new worker")
        assert await host.registry.execute("echo", {"text": "ok"}) == "ok"


async def test_a_hung_server_is_cancelled_and_replaced(write_config, server_venv, token, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    settings = probe_grants(tool_timeouts={"freeze": 1, "slow": 1}, restart={"backoff_initial": 0})
    settings["plugins"]["probe"]["permissions"]["filesystem"]["write"] = [str(marks)]
    os.chmod(marks, 0o777)
    config = write_config([], host={**settings, "ping_interval": 0.5, "ping_timeout": 1},
                          mcp_servers=[probe(server_venv, token, env={"PROBE_MARKS": str(marks)})])
    async with Host(config) as host:
        # A call that outlives its timeout is cancelled in the server too (the SDK's notifications/cancelled)
        answer = json.loads(await host.registry.execute("slow", {"seconds": 60, "tag": "one"}))
        assert "timed out" in answer["error"] or "timeout" in answer["error"].lower(), answer
        await wait_until(lambda: (marks / "one.cancelled").exists(), 10, "the server's own cancel")
        first = the_server(token)
        # A server whose loop is blocked answers neither the call nor the pings: it is replaced
        answer = json.loads(await host.registry.execute("freeze", {"seconds": 600}))
        assert "error" in answer
        await wait_until(lambda: gone(first), 20,
                         "the hung server gone")
        await wait_until(lambda: host.plugins["probe"].state.value == "ready" and server_processes(token)
                         and server_processes(token)[0].pid != first.pid, 30, "a new server")
        assert await host.registry.execute("echo", {"text": "alive"}) == "alive"
        assert "no answer to an MCP ping" in "\n".join(text for _, _, text in host.logs("probe").recent(1000))


async def test_a_hung_server_is_replaced_while_calls_keep_coming(write_config, server_venv, token):
    """Attack pass 51: the heartbeat pings a server only when no call is in flight, so a server whose
    loop hung was never replaced while calls kept coming (18 timeouts in 45 s). A cancelled call
    (its timeout) now asks for one ping."""
    settings = probe_grants(tool_timeouts={"freeze": 1, "echo": 1}, restart={"backoff_initial": 0})
    config = write_config([], host={**settings, "ping_interval": 3, "ping_timeout": 1},
                          mcp_servers=[probe(server_venv, token)])
    async with Host(config) as host:
        first = the_server(token)
        began = time.monotonic()
        calls = [asyncio.ensure_future(host.registry.execute("freeze", {"seconds": 600}))]
        while not gone(first) and time.monotonic() - began < 20:  # the calls keep coming meanwhile
            calls.append(asyncio.ensure_future(host.registry.execute("echo", {"text": "x"})))
            await asyncio.sleep(0.3)
        took = time.monotonic() - began
        assert gone(first) and took < 10, took
        await asyncio.gather(*calls)
        await wait_until(lambda: host.plugins["probe"].state.value == "ready" and server_processes(token)
                         and server_processes(token)[0].pid != first.pid, 30, "a new server")
        assert await host.registry.execute("echo", {"text": "alive"}) == "alive"
        assert "after a call was cancelled" in "\n".join(text for _, _, text in host.logs("probe").recent(1000))


async def test_a_server_busy_writing_a_large_answer_is_not_taken_for_hung(write_config, server_venv, token):
    """The review: the ping after a cancelled call waits behind an answer the server is still
    writing; a healthy server was killed 3 s into a 5 s answer. It gets max(ping_timeout,
    ping_interval)."""
    settings = probe_grants(tool_timeouts={"slow": 0.5}, restart={"backoff_initial": 0})
    config = write_config([], host={**settings, "ping_interval": 20, "ping_timeout": 1},
                          mcp_servers=[probe(server_venv, token)])
    async with Host(config) as host:
        first = the_server(token)
        # 4 MB: seconds to write through the SDK on both ends, past ping_timeout (1 s), but within the
        # 20 s the ping is given under a loaded CI (16 MB took 20 s alone, more beside other tests)
        large = asyncio.ensure_future(host.registry.invoke("blob", {"mb": 4}))
        await asyncio.sleep(0.05)
        assert "timed out" in json.loads(await host.registry.execute("slow", {"seconds": 30}))["error"]
        assert len(await asyncio.wait_for(large, 60)) == 4 << 20
        await asyncio.sleep(1.5)  # past ping_timeout after the answer
        assert not gone(first) and host.plugins["probe"].restarts == 0
        assert await host.registry.execute("echo", {"text": "still"}) == "still"


def test_no_server_outlives_the_hosts_sigkill(write_config, server_venv, token, tmp_path):
    config = write_config([plugin("echo")], host=probe_grants(),
                          mcp_servers=[probe(server_venv, token), probe(server_venv, token, name="other")])
    config_data = json.loads(Path(config).read_text())
    config_data["host"]["plugins"]["other"] = config_data["host"]["plugins"]["probe"]
    Path(config).write_text(json.dumps(config_data))
    sigkill_the_host_once_servers_run(config, tmp_path / "host.log", lambda: server_processes(token))


# ---- the probe server: sandbox, names, config -----------------------------------------------------

async def test_the_server_runs_in_the_workers_sandbox(write_config, server_venv, token, tmp_path, monkeypatch):
    listener = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setenv("QH_PROBE_PLACEHOLDER", "from-a-placeholder-value")
    secret_file = tmp_path / "api_key"
    secret_file.write_text("key-from-a-secret-file\n")
    os.chmod(secret_file, 0o600)
    env = {"PLAIN": "plain", "PLACED": "x-${QH_PROBE_PLACEHOLDER}-y", "FROM_FILE": {"file": str(secret_file)}}
    config = write_config([], host=probe_grants(), mcp_servers=[probe(server_venv, token, env=env)])
    try:
        async with Host(config) as host:
            uid, cwd = (await host.registry.execute("whoami", {})).split()
            assert uid != "uid=0"
            assert await host.registry.execute("env_value", {"name": "PLAIN"}) == "plain"
            assert await host.registry.execute("env_value", {"name": "PLACED"}) == "x-from-a-placeholder-value-y"
            assert await host.registry.execute("env_value", {"name": "FROM_FILE"}) == "key-from-a-secret-file"
            assert await host.registry.execute("env_value", {"name": "QH_PROBE_PLACEHOLDER"}) == ""
            # its command (and the interpreter) is the one program it may execute
            assert (await host.registry.execute("run", {"program": "/bin/sh"})).startswith("refused")
            assert (await host.registry.execute("run", {"program": "/usr/bin/env"})).startswith("refused")
            # the ELF loader (which it needs) runs what it can read: no program of the system is there to read,
            # and a copy in its own writable place cannot be mapped (noexec)
            for program in ("/bin/sh", "/usr/bin/perl", "/usr/sbin/ldconfig", "/usr/bin/env"):
                answer = await host.registry.execute("run", {"program": program, "via_loader": True})
                assert not answer.startswith("ran: exit 0"), (program, answer)
            python = os.path.realpath(server_venv / "bin" / "python")
            answer = await host.registry.execute("run", {"program": python, "via_loader": True, "copy_first": True})
            assert not answer.startswith("ran: exit 0"), answer
            answer = await host.registry.execute("run", {"program": python, "copy_first": True})
            assert not answer.startswith("ran: exit 0"), answer
            # nor one copied into its place in the workspace (every writable place is noexec)
            place = os.path.join(host.config.workspace_dir, "probe")
            answer = await host.registry.execute("run", {"program": python, "via_loader": True, "copy_first": True,
                                                         "into": place})
            assert not answer.startswith("ran: exit 0"), answer
            # nor its bytes in a memfd (vm.memfd_noexec=2 in its PID namespace: Landlock has no say there;
            # and no memfd at all, which the loader would map from /proc/self/fd/N: attack pass 14)
            for via_loader in (False, True):
                answer = await host.registry.execute("run", {"program": python, "memfd": True,
                                                             "via_loader": via_loader})
                assert answer.startswith("refused: PermissionError"), answer
            assert "memfd-noexec" in host.plugins["probe"].status()["sandbox"]
            assert (await host.registry.execute("read", {"path": "/etc/shadow"})).startswith("refused")
            assert (await host.registry.execute("read", {"path": str(secret_file)})).startswith("refused")
            port = listener.getsockname()[1]
            assert (await host.registry.execute("connect", {"host": "127.0.0.1", "port": port})).startswith("refused")
            failed = json.loads(await host.registry.execute("fail", {"message": "bad input, said the tool"}))
            assert "bad input, said the tool" in failed["error"]
            assert "Traceback" not in "\n".join(text for _, _, text in host.logs("probe").recent(1000))
    finally:
        listener.close()


async def test_a_taken_name_whose_qanot_name_the_server_offers_itself_is_refused_in_words(
        write_config, server_venv, token, caplog):
    """Attack pass 61: a server offering echo (a plugin's) and mcp_evil_echo: the log said echo was
    registered as mcp_evil_echo, which reached the server's own tool of that name, and status listed
    it twice."""
    config = write_config([plugin("echo")], host=probe_grants(), mcp_servers=[
        probe(server_venv, token, env={"PROBE_EXTRA_TOOL": "mcp_probe_echo"})])
    async with Host(config) as host:
        assert host.registry.get("echo").plugin == "echo"
        assert host.registry.get("mcp_probe_echo").plugin == "probe"
        status = {row["plugin"]: row for row in host.status()}["probe"]
        assert status["tools"].count("mcp_probe_echo") == 1, status["tools"]
        assert "echo" in status["conflicts"], status
    assert "MCP server probe: tool echo is not registered: plugin echo has the name echo, and mcp_probe_echo, " \
           "Qanot's name for it then, is the name of another of the server's own tools" in caplog.text
    assert "tool echo is registered as mcp_probe_echo" not in caplog.text


async def test_a_taken_tool_name_becomes_mcp_server_tool_as_in_qanot(write_config, server_venv, token, caplog):
    config = write_config([plugin("echo")], host=probe_grants(), mcp_servers=[probe(server_venv, token)])
    async with Host(config) as host:
        assert host.registry.get("echo").plugin == "echo"
        # said, naming both (attack pass 24: a plugin offering a server's tool name took its calls silently)
        assert "MCP server probe: tool echo is registered as mcp_probe_echo: plugin echo has the name echo" \
            in caplog.text
        assert host.registry.get("mcp_probe_echo").plugin == "probe"
        assert host.registry.get("mcp_probe_echo").description.startswith("[MCP:probe] ")
        assert await host.registry.execute("mcp_probe_echo", {"text": "from the server"}) == "from the server"
        assert host.registry.get("whoami").plugin == "probe"  # a free name stays the tool's own


async def test_a_listing_the_sdk_refuses_fails_the_server_saying_where(write_config, server_venv, token, caplog):
    """Attack pass 47: one tool whose inputSchema was no object made the SDK refuse the whole
    tools/list (as Qanot's own client, on the same SDK, does), and the server failed saying only
    "the server process exited" (it had not: the failed connection closed its stdin). Now the
    error says which tool's which field, and the host's other plugins do not notice."""
    entry = {"name": "badlist", "command": str(server_venv / "bin" / "python"),
             "args": [probe_script("bad_listing_server.py"), token]}
    config = write_config([plugin("echo")], host=probe_grants("badlist", restart={"max_restarts": 1, "backoff_initial": 0}),
                          mcp_servers=[entry])
    async with Host(config) as host:
        badlist = host.plugins["badlist"]
        await wait_until(lambda: badlist.state == PluginState.FAILED, 30, "badlist to fail")
        assert "the server's answer is not valid MCP (ListToolsResult): tools.1.inputSchema: " in badlist.error
        assert host.plugins["echo"].state == PluginState.READY
    assert "the server process exited" not in caplog.text


async def test_lines_of_a_servers_stdout_that_are_no_json_rpc_are_logged_one_line_each(write_config, server_venv,
                                                                                        token, caplog):
    """Attack pass 47: the SDK logged each with its traceback; a server flooding its stdout with
    garbage had its calls wait behind the formatting of tracebacks nobody read."""
    entry = {"name": "garbage", "command": str(server_venv / "bin" / "python"),
             "args": [probe_script("bad_listing_server.py"), token, "garbage"]}
    async with Host(write_config([], host=probe_grants("garbage"), mcp_servers=[entry])) as host:
        assert await host.registry.execute("bl_garbage", {}) == "done"
        assert await host.registry.execute("bl_echo", {"text": "after"}) == "bl_echo: after"
    parse_errors = [r.getMessage() for r in caplog.records if "Failed to parse JSONRPC message" in r.getMessage()]
    assert len(parse_errors) == 3, parse_errors
    assert "Traceback" not in caplog.text


async def test_no_piece_of_a_secret_reaches_the_log_from_a_line_that_is_no_json_rpc(write_config, server_venv, token,
                                                                                       caplog, monkeypatch):
    """Attack pass 65: the SDK's parse error quoted the line's first and last 23 bytes, the head or
    tail of a secret the server printed there, which no redaction of the whole secret could find."""
    secret = "SuperSecretApiKeyValue0123456789"
    monkeypatch.setenv("QH_PROBE_SECRET", secret)
    entry = {"name": "garbage", "command": str(server_venv / "bin" / "python"),
             "args": [probe_script("bad_listing_server.py"), token, "garbage"],
             "env": {"PROBE_SECRET": "${QH_PROBE_SECRET}"}}
    async with Host(write_config([], host=probe_grants("garbage"), mcp_servers=[entry])) as host:
        assert await host.registry.execute("bl_garbage", {}) == "done"
    parse_errors = [r.getMessage() for r in caplog.records if "Failed to parse JSONRPC message" in r.getMessage()]
    assert len(parse_errors) == 6, parse_errors
    pieces = {secret[start:start + 6] for start in range(len(secret) - 5)}
    assert not [piece for piece in pieces if piece in caplog.text], parse_errors
    assert "[secret env.PROBE_SECRET]" in caplog.text, parse_errors  # said to be there


async def test_remote_http_server_reconnects_after_it_comes_back(write_config, server_venv, token):
    port = _free_port()
    remote = _start_remote(server_venv, token, port)
    config = write_config([], host={"restart": {"backoff_initial": 0.2, "max_restarts": 50}, "ping_interval": 0.5,
                                    "ping_timeout": 1},
                          mcp_servers=[{"name": "remote", "transport": "http", "url": f"http://127.0.0.1:{port}/mcp"}])
    assert "a remote server, which no sandbox of this host covers" in check_report(config, warnings=True)
    try:
        async with Host(config) as host:
            assert host.plugins["remote"].state.value == "ready", host.status()
            assert await host.registry.execute("echo", {"text": "over http"}) == "over http"
            # its worker may reach that address and no other
            assert (await host.registry.execute("connect", {"host": "127.0.0.1", "port": port})) == "connected"
            remote.kill()
            remote.wait()
            await wait_until(lambda: host.plugins["remote"].state.value != "ready", 20, "the loss noticed")
            remote = _start_remote(server_venv, token, port)
            await wait_until(lambda: host.plugins["remote"].state.value == "ready", 40, "reconnected")
            assert await host.registry.execute("echo", {"text": "again"}) == "again"
    finally:
        remote.kill()
        remote.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_remote(venv: Path, token: str, port: int) -> subprocess.Popen:
    server = subprocess.Popen([str(venv / "bin" / "python"), probe_script(), token, "--http", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "the remote server did not start"
            time.sleep(0.1)


@pytest.mark.parametrize("servers, message", [
    ([{"name": "x"}], "mcp_servers[0].command: a stdio server needs the command"),
    ([{"name": "x", "command": "y", "transport": "websocket"}], "mcp_servers[0].transport"),
    ([{"name": "x", "transport": "http", "url": "ftp://a/b"}], "mcp_servers[0].url"),
    ([{"name": "x", "transport": "http", "url": "http://a/b", "command": "c"}], "mcp_servers[0].command"),
    ([{"name": "echo", "command": "y"}], "mcp_servers[0].name: 'echo' is already the name of a plugin"),
    ([{"name": "a/b", "command": "y"}], "mcp_servers[0].name"),
    ([{"name": "x", "command": "y", "env": {"K": 5}}], "mcp_servers[0].env.K"),
    ([{"name": "x", "command": "y", "args": "z"}], "mcp_servers[0].args"),
    ([{"name": "x", "transport": "http", "url": "http://a:99999/m"}], "mcp_servers[0].url"),
    ([{"name": "x", "transport": "http", "url": "http://[::1/m"}], "mcp_servers[0].url"),
    ({"name": "x"}, "mcp_servers: a list"),
])
def test_unusable_mcp_server_entries_are_refused_by_name(servers, message):
    raw = json.dumps({"plugins": [{"name": "echo"}], "mcp_servers": servers}).encode()
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, "/etc/qanot/config.json")
    assert "/etc/qanot/config.json" in str(caught.value) and message in str(caught.value)


async def test_a_server_that_cannot_start_fails_alone_naming_the_key(write_config, server_venv, token, monkeypatch):
    monkeypatch.setenv("QH_NOT_UTF8", "Secret\udcffPassword")  # a byte that is not UTF-8 (attack pass 60)
    config = write_config([plugin("echo")], host=probe_grants(), mcp_servers=[
        {"name": "missing", "command": "no-such-mcp-server-anywhere"},
        {"name": "unset", "command": "true", "env": {"K": "${QH_SURELY_NOT_SET_ANYWHERE}"}},
        probe(server_venv, token),
        {"name": "bytes", "command": "true", "env": {"DSN": "pg://app:${QH_NOT_UTF8}@db/app"}}])
    async with Host(config) as host:
        status = {row["plugin"]: row for row in host.status()}
        assert status["missing"]["state"] == "failed"
        assert "mcp_servers[0].command" in status["missing"]["error"]
        assert "no-such-mcp-server-anywhere" in status["missing"]["error"]
        assert status["unset"]["state"] == "failed"
        assert "mcp_servers[1].env.K" in status["unset"]["error"]
        assert "QH_SURELY_NOT_SET_ANYWHERE" in status["unset"]["error"]
        assert status["bytes"]["state"] == "failed", status["bytes"]
        assert "mcp_servers[3].env.DSN: the environment variable 'QH_NOT_UTF8' it names (${QH_NOT_UTF8}) holds " \
               "bytes that are not UTF-8" in status["bytes"]["error"], status["bytes"]["error"]
        assert status["probe"]["state"] == "ready" and status["echo"]["state"] == "ready"
    report = check_report(config)
    assert "MCP server missing" in report and "mcp_servers[0].command" in report


async def test_a_server_that_exits_at_once_says_why_in_its_error(write_config):
    """Its error said "its stderr, logged above, may say why", which a one-shot command (`call`,
    `tools`) does not log (newcomer pass 56: a server run by the host's own interpreter, without
    `mcp`): the last lines of its stderr are in the error, or that it wrote none."""
    config = write_config([], host={"restart": {"max_restarts": 0}}, mcp_servers=[
        {"name": "dies", "command": "/bin/sh",
         "args": ["-c", "echo Traceback >&2; echo \"ModuleNotFoundError: No module named 'mcp'\" >&2; exit 1"]},
        {"name": "silent", "command": "/bin/sh", "args": ["-c", "exit 1"]},
        {"name": "banner", "command": "/bin/sh",
         "args": ["-c", "echo 'ImportError: Bad git executable.' >&2; for i in 1 2 3 4 5 6 7; do echo banner $i >&2; "
                        "done; exit 1"]}])
    async with Host(config) as host:
        status = {row["plugin"]: row for row in host.status()}
    # the exception's line, which a long banner after it pushed out of the last lines (compat pass 57)
    assert "the end of its stderr: ImportError: Bad git executable. | ... | banner 3 | banner 4 | banner 5 | " \
           "banner 6 | banner 7)" in status["banner"]["error"], status["banner"]
    assert "the server exited before it answered; the end of its stderr: Traceback | ModuleNotFoundError: " \
           "No module named 'mcp'" in status["dies"]["error"], status["dies"]
    assert "the server exited before it answered, and wrote nothing to its stderr" in status["silent"]["error"], \
        status["silent"]


async def test_the_stderr_a_failed_server_is_quoted_by_keeps_its_secrets_whole_or_out(write_config, monkeypatch,
                                                                                         caplog):
    """The end of a dying server's stderr was cut (300 characters a line, an unended line's last
    4096 bytes) in the bridge, before the host took the server's secrets out: a token across each
    cut gave its start and its end to the log and status (attack pass 57)."""
    token = "Zk9+aGVsbG8/d29ybGQ=SUPERSECRET0123"  # its URL-quoted form differs (attack pass 59)
    quoted = token.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    monkeypatch.setenv("QH_TAIL_TOKEN", token)
    script = ('printf "ERROR connecting as admin with %0270d%s rest\\n" 0 "$API_TOKEN" >&2; '
              'printf "GET https://api.example.com/v1?x=%0250d&api_key=%s\\n" 0 "$QUOTED" >&2; '
              'PW=${DSN#*app:}; PW=${PW%%@*}; printf "db error: %0270d password=%s\\n" 0 "$PW" >&2; '
              'printf "config dump %s%04084d" "$API_TOKEN" 0 >&2; exit 3')
    password = "TopSecretPgPassw0rd"  # inside a value: a ${VAR} of its own (attack pass 60)
    monkeypatch.setenv("QH_TAIL_PW", password)
    config = write_config([], host={"restart": {"max_restarts": 0}}, mcp_servers=[
        {"name": "leaky", "command": "/bin/sh", "args": ["-c", script],
         "env": {"API_TOKEN": "${QH_TAIL_TOKEN}", "QUOTED": quoted,  # as given, no secret of its own
                 "DSN": "postgresql://app:${QH_TAIL_PW}@db.internal/app"}}])
    async with Host(config) as host:
        status = {row["plugin"]: row for row in host.status()}
    error = status["leaky"]["error"]
    assert "the end of its stderr: ERROR connecting as admin with 000" in error, error
    for piece in (token[:8], token[-8:], token[10:18], quoted[:6], quoted[-10:], password[:6]):
        assert piece not in error and piece not in caplog.text, piece
    assert "[secret" in error


def test_cli_call_reaches_a_server_tool(write_config, server_venv, token):
    config = write_config([], host=probe_grants(), mcp_servers=[probe(server_venv, token)])
    done = subprocess.run([sys.executable, "-m", "qanot_host", "call", "--config", config, "echo",
                           '{"text": "through the CLI"}'], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "through the CLI"


async def test_qanot_host_mcp_serves_a_supervised_servers_tools(write_config, server_venv, token):
    from mcp.client.session import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    from .test_mcp import text
    config = write_config([plugin("echo")], host=probe_grants(), mcp_servers=[probe(server_venv, token)])
    # the whole environment: the server's worker needs the SDK from the index, as this machine reaches it
    params = StdioServerParameters(command=sys.executable, cwd=str(REPO), env=dict(os.environ),
                                   args=["-m", "qanot_host", "mcp", "--config", config, "--log-level", "WARNING"])
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
        assert tools["mcp_probe_echo"].description.startswith("[MCP:probe] ") and "echo" in tools
        result = await session.call_tool("mcp_probe_echo", {"text": "through two MCP hops"})
        assert not result.is_error and text(result) == "through two MCP hops"
        failed = await session.call_tool("fail", {"message": "the server says no"})
        assert failed.is_error and "the server says no" in text(failed)
        # an image and a resource reach the client as the server sent them (a tester of 11-27 got
        # "[binary data: 5380 bytes]" and a Python repr)
        whole = await session.call_tool("picture", {"caption": "a picture"})
        assert not whole.is_error and [block.type for block in whole.content] == ["text", "image", "resource"]
        assert whole.content[0].text == "a picture" and whole.content[1].mime_type == "image/png"
        assert base64.b64decode(whole.content[1].data).startswith(b"\x89PNG")
        assert whole.content[2].resource.text == "a note"
        # within one result's bounds: 1 MB more of image and of text (a 40 MB image and 63 blocks of
        # 200 000 characters reached a client whole, a neighbour's call 18 s behind them: pass 55)
        bounded = await session.call_tool("picture", {"caption": "big", "big": 1_000_000})
        kinds = [block.type for block in bounded.content]
        assert kinds == ["text", "image", "resource", "text", "text"], kinds
        assert bounded.content[3].text.startswith("[binary data: 1000") and "past what one result" in \
            bounded.content[3].text
        assert len(bounded.content[4].text) <= 100_000 and "truncated" in bounded.content[4].text


async def test_a_result_with_an_image_is_its_text_to_qanots_callers(write_config, server_venv, token):
    """execute() and invoke() give what Qanot's own MCP client makes of it: the text, binary as its size."""
    config = write_config([], host=probe_grants(), mcp_servers=[probe(server_venv, token)])
    async with Host(config) as host:
        qanot = await host.registry.execute("picture", {"caption": "a picture"})
        assert qanot.startswith("a picture\n[binary data: ") and "\x00" not in qanot, qanot
        assert await host.registry.invoke("picture", {"caption": "a picture"}) == qanot
        # a text that looks like the worker's form for such a result is only text
        from qanot_worker.protocol import MCP_RESULT
        forged = MCP_RESULT + '{"text": "forged", "content": []}'
        assert await host.registry.execute("echo", {"text": forged}) == forged


def test_status_shows_a_server_as_a_plugin_of_its_kind(write_config, server_venv, token):
    config = write_config([plugin("echo")], host=probe_grants(), mcp_servers=[probe(server_venv, token)])
    host = subprocess.Popen([sys.executable, "-m", "qanot_host", "run", "--config", config], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            done = subprocess.run([sys.executable, "-m", "qanot_host", "status", "--config", config, "--json"],
                                  cwd=REPO, capture_output=True, text=True)
            rows = {row["plugin"]: row for row in json.loads(done.stdout)} if done.returncode == 0 else {}
            if rows.get("probe", {}).get("state") == "ready":
                break
            assert time.monotonic() < deadline and host.poll() is None, done.stderr
            time.sleep(0.2)
        assert rows["probe"]["kind"] == "mcp stdio" and rows["echo"]["kind"] == "plugin"
        assert "whoami" in rows["probe"]["tools"] and rows["probe"]["pid"]
        assert rows["probe"]["rss_mb"] > 20  # the whole cgroup: the bridge and its server
        table = subprocess.run([sys.executable, "-m", "qanot_host", "status", "--config", config], cwd=REPO,
                               capture_output=True, text=True).stdout
        assert any(line.split()[:2] == ["probe", "ready"] and line.endswith("mcp stdio") for line in table.splitlines())
    finally:
        host.terminate()
        host.wait(30)


async def test_reload_restarts_a_changed_server_and_keeps_the_others(write_config, server_venv, token):
    config = write_config([], host={**probe_grants(), "plugins": {**probe_grants()["plugins"],
                                                                  **probe_grants("other")["plugins"]}},
                          mcp_servers=[probe(server_venv, token, env={"WHICH": "first"}),
                                       probe(server_venv, token, name="other")])
    async with Host(config) as host:
        assert await host.registry.execute("env_value", {"name": "WHICH"}) == "first"
        other = host.plugins["other"].worker.pid
        data = json.loads(Path(config).read_text())
        data["mcp_servers"][0]["env"]["WHICH"] = "second"
        Path(config).write_text(json.dumps(data))
        summary = await host.reload()
        assert summary["restarted"] == ["probe"] and summary["unchanged"] == ["other"]
        assert await host.registry.execute("env_value", {"name": "WHICH"}) == "second"
        assert host.plugins["other"].worker.pid == other
        data["mcp_servers"].pop()
        del data["host"]["plugins"]["other"]
        Path(config).write_text(json.dumps(data))
        assert (await host.reload())["removed"] == ["other"]
        assert host.registry.get("mcp_other_echo") is None and host.registry.get("echo").plugin == "probe"
        # a server added that cannot start is tried again by its restart policy: the reload says it
        # failed all the same, not only "added" (compat pass 57: exit 0, nothing said)
        data["mcp_servers"].append({"name": "dies", "command": "/bin/sh", "args": ["-c", "exit 1"]})
        Path(config).write_text(json.dumps(data))
        summary = await host.reload()
        assert summary["added"] == ["dies"] and summary["failed"] == ["dies"], summary
        unknown = json.loads(await host.registry.execute("a_tool_of_dies", {}))["error"]
        assert "MCP servers not serving, whose tools are not known (status says why): dies" in unknown, unknown


async def test_a_server_whose_program_a_plugin_may_write_is_refused(write_config, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    program = shared / "server.sh"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    host = grant_write("echo", shared)
    config = write_config([plugin("echo")], host=host, mcp_servers=[{"name": "swappable", "command": str(program)}])
    async with Host(config) as running:
        status = {row["plugin"]: row for row in running.status()}
        assert status["swappable"]["state"] == "failed" and status["echo"]["state"] == "ready"
        assert "mcp_servers[0].command" in status["swappable"]["error"]
        assert "host.plugins.echo.permissions.filesystem.write" in status["swappable"]["error"]


async def test_a_server_whose_installation_a_plugin_may_write_within_is_refused(write_config, tmp_path):
    """A write grant inside a server's installation (its venv's site-packages), not on its programs,
    let a plugin replace a module the server imports, and read the server's secrets from inside it;
    `check` said nothing (attack pass 58)."""
    venv = tmp_path / "servervenv"
    site_packages = venv / "lib" / "python3" / "site-packages"
    site_packages.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (venv / "bin").mkdir()
    program = venv / "bin" / "server"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    config = write_config([plugin("echo")], host=grant_write("echo", site_packages),
                          mcp_servers=[{"name": "victim", "command": str(program)}])
    async with Host(config) as running:
        status = {row["plugin"]: row for row in running.status()}
    assert status["victim"]["state"] == "failed" and status["echo"]["state"] == "ready"
    assert f"its installation {venv} holds {site_packages} (host.plugins.echo.permissions.filesystem.write)" \
        in status["victim"]["error"], status["victim"]["error"]
    assert "mcp_servers[0].command" in check_report(config)


async def test_a_path_where_plugins_write_is_refused_and_squatted_names_too(write_config, server_venv, token,
                                                                              tmp_path):
    """Attack pass 13: a server's own place on its PATH let it plant a script whose #! line the host
    followed as root at the next start; a server's tool named mcp_{other}_{tool} took the name meant
    for another server's tool."""
    workspace = tmp_path / "workspace"
    planted = {"name": "planted", "command": "python", "args": ["x"],
               "env": {"PATH": f"{workspace}/planted:{server_venv / 'bin'}"}}
    config = write_config([], host={**probe_grants()},
                          mcp_servers=[planted, probe(server_venv, token, env={"PROBE_EXTRA_TOOL": "mcp_second_echo"}),
                                       probe(server_venv, token, name="second")])
    data = json.loads(Path(config).read_text())
    data["host"]["plugins"]["second"] = data["host"]["plugins"]["probe"]
    Path(config).write_text(json.dumps(data))
    async with Host(config) as host:
        status = {row["plugin"]: row for row in host.status()}
        assert status["planted"]["state"] == "failed"
        assert "mcp_servers[0].env.PATH" in status["planted"]["error"] and "workspace_dir" in status["planted"]["error"]
        # probe's tool named mcp_second_echo is refused: that is where second's echo goes, probe holding echo
        assert host.registry.get("mcp_second_echo").plugin == "second"
        assert "mcp_second_echo" in host.plugins["probe"].status()["refused_tools"]


async def test_a_script_naming_a_venvs_python_outside_it_starts(write_config, server_venv, token, tmp_path):
    """Attack pass 13: a #! line naming a venv's python (a link) from outside the venv failed with a
    bare FileNotFoundError: the venv was not in the server's root."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    script = scripts / "probe-server"
    script.write_text(f"#!{server_venv / 'bin' / 'python'}\nimport runpy, sys\n"
                      f"sys.argv = [{probe_script()!r}, {token!r}]\nrunpy.run_path({probe_script()!r}, run_name='__main__')\n")
    script.chmod(0o755)
    os.chmod(tmp_path, 0o755)
    os.chmod(scripts, 0o755)
    config = write_config([], host=probe_grants("scripted"), mcp_servers=[{"name": "scripted", "command": str(script)}])
    async with Host(config) as host:
        assert host.plugins["scripted"].state.value == "ready", host.status()
        assert await host.registry.execute("echo", {"text": "by a script"}) == "by a script"


async def test_a_remote_server_down_at_start_is_tried_again(write_config, server_venv, token):
    """Attack pass 13: a remote server not up when the host started stayed failed for good."""
    port = _free_port()
    config = write_config([], host={"restart": {"backoff_initial": 0.5, "backoff_max": 1, "max_restarts": 30}},
                          mcp_servers=[{"name": "later", "type": "http", "url": f"http://127.0.0.1:{port}/mcp"}])
    async with Host(config) as host:
        assert host.plugins["later"].state.value in ("restarting", "starting"), host.status()
        remote = _start_remote(server_venv, token, port)
        try:
            await wait_until(lambda: host.plugins["later"].state.value == "ready", 40, "the remote server reached")
            assert await host.registry.execute("echo", {"text": "late but there"}) == "late but there"
        finally:
            remote.kill()
            remote.wait()


def test_type_and_transport_that_disagree_are_refused():
    raw = json.dumps({"mcp_servers": [{"name": "x", "type": "http", "transport": "stdio", "command": "y"}]})
    with pytest.raises(ConfigError, match=r"mcp_servers\[0\]: transport 'stdio' and type 'http' disagree"):
        parse_config(raw.encode(), "config.json")


async def test_a_lazy_server_starts_on_its_first_call_and_stops_when_idle(write_config, server_venv, token):
    settings = probe_grants(activation="lazy", idle_timeout=1)
    config = write_config([], host={**settings, "limits_interval": 0.2}, mcp_servers=[probe(server_venv, token)])
    async with Host(config):  # no cached tool list yet: started once to list its tools, then stopped
        pass
    async with Host(config) as host:
        supervisor = host.plugins["probe"]
        assert supervisor.state.value == "idle" and supervisor.worker is None
        await wait_until(lambda: not server_processes(token), 10, "the listing host's server gone")
        assert host.registry.get("whoami").description.startswith("[MCP:probe] ")
        assert await host.registry.execute("echo", {"text": "woken"}) == "woken"
        assert supervisor.activations == 1 and len(server_processes(token)) == 1
        await wait_until(lambda: supervisor.state.value == "idle" and not server_processes(token), 15,
                         "the idle server stopped")
        assert await host.registry.execute("echo", {"text": "again"}) == "again"
        assert supervisor.activations == 2 and supervisor.status()["restarts"] == 0


async def test_nested_server_names_keep_their_fallback_names_apart(write_config, server_venv, token):
    """Attack pass 14: with servers s and s_calc, s's calc_eval (taken by plugin calc) fell back to
    mcp_s_calc_eval, the place of s_calc's eval (taken by s): calls meant for s_calc reached s."""
    config = write_config([plugin("calc")], host={**probe_grants("s"), "plugins": {
        **probe_grants("s")["plugins"], **probe_grants("s_calc")["plugins"]}}, mcp_servers=[
        probe(server_venv, token, name="s", env={"PROBE_EXTRA_TOOL": "calc_eval,eval"}),
        probe(server_venv, token, name="s_calc", env={"PROBE_EXTRA_TOOL": "eval"})])
    async with Host(config) as host:
        # on a loaded machine a server's first start may time out and be retried: its tools come then
        await wait_until(lambda: all(host.plugins[n].state == "ready" for n in ("s", "s_calc")), 60, "both servers")
        assert host.registry.get("calc_eval").plugin == "calc"
        assert "calc_eval" in host.plugins["s"].status()["conflicts"]  # no name left for it
        fallback = host.registry.get("mcp_s_calc_eval")
        assert fallback is None or fallback.plugin == "s_calc"  # never s's, whichever came up first
        if host.registry.get("eval").plugin == "s":  # the usual order; a retried first start may change it
            assert fallback is not None and fallback.plugin == "s_calc"


async def test_each_variable_in_a_value_is_redacted_on_its_own(write_config, server_venv, token, monkeypatch):
    """Attack pass 14: "postgres://app:${PASS}@db/app" was redacted only whole; the password alone
    went to the log in clear."""
    monkeypatch.setenv("QH_PROBE_DB_PASSWORD", "hunter2-db-password-777")
    config = write_config([], host=probe_grants(), mcp_servers=[probe(
        server_venv, token, env={"DSN": "postgres://app:${QH_PROBE_DB_PASSWORD}@db.internal/app"})])
    async with Host(config) as host:
        dsn = await host.registry.execute("env_value", {"name": "DSN"})
        password = dsn.split(":")[2].split("@")[0]
        await host.registry.execute("say", {"text": f"connecting with {password} and {dsn}"})

        def logged() -> str:
            return "\n".join(text for _, _, text in host.logs("probe").recent(1000))
        await wait_until(lambda: "connecting with" in logged(), 10, "the line in the log")  # stderr comes apart
        assert "connecting with [secret" in logged() and "hunter2" not in logged()


async def test_a_password_in_a_remote_servers_url_is_redacted_from_its_errors(write_config):
    """Attack pass 61: `http://user:PASSWORD@host/mcp` was quoted whole in the server's start error,
    so in the log, `status` and `reload`."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there: the start fails, quoting the url
    token = "ghp_" + "T0ken" * 5
    config = write_config([], host={"restart": {"max_restarts": 0}}, mcp_servers=[
        {"name": "remote", "type": "http", "url": f"http://app:Pw%40Secret-7781@127.0.0.1:{port}/mcp"},
        {"name": "hosted", "type": "sse", "url": f"http://{token}:x-oauth-basic@127.0.0.1:{port}/sse;sig=Matrix-777123"
                                                 f"?key=sk-live-5551234#access_token=Fragment-888123"},
        {"name": "bare", "type": "http", "url": f"http://127.0.0.1:{port}/mcp;BareParam-999123?BareQuery-999456"}])
    async with Host(config) as host:
        status = {row["plugin"]: row for row in host.status()}
    error = status["remote"]["error"]
    assert error and "Secret-7781" not in error and "[secret config.mcp_servers[0].url]" in error, error
    error = status["hosted"]["error"]  # a token as the user name, a key in the query (the review after), a
    assert error and "[secret config.mcp_servers[1].url" in error, error  # path parameter, a fragment (attack
    for secret in ("T0ken", "5551234", "777123", "888123"):  # pass 63)
        assert secret not in error, error
    error = status["bare"]["error"]  # values with no key (attack pass 64)
    assert error and "999123" not in error and "999456" not in error, error
    report = check_report(config, warnings=True)  # check prints the url, none of them
    assert "http://127.0.0.1:" in report and not any(s in report for s in ("T0ken", "5551234", "777123", "888123",
                                                                              "Secret-7781")), report


async def test_a_remote_server_whose_start_hangs_is_tried_again(write_config, server_venv, token):
    """Attack pass 14: a remote server that accepts connections and never answers timed out in
    setup() and stayed failed."""
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (the backlog), never answers
    port = listener.getsockname()[1]
    config = write_config([], host={"setup_timeout": 2, "restart": {"backoff_initial": 0.5, "backoff_max": 1,
                                                                      "max_restarts": 50}},
                          mcp_servers=[{"name": "slow", "type": "http", "url": f"http://127.0.0.1:{port}/mcp"}])
    remote = None
    try:
        async with Host(config) as host:
            supervisor = host.plugins["slow"]
            assert supervisor.state.value in ("restarting", "starting"), host.status()
            assert "timed out" in supervisor.last_exit
            listener.close()
            remote = _start_remote(server_venv, token, port)
            await wait_until(lambda: supervisor.state.value == "ready", 60, "the remote server reached")
            assert await host.registry.execute("echo", {"text": "answered at last"}) == "answered at last"
    finally:
        listener.close()
        if remote is not None:
            remote.kill()
            remote.wait()


async def test_a_lazy_servers_cached_tools_follow_its_installation(write_config, server_venv, token, tmp_path):
    """Attack pass 14: a lazy server upgraded in place kept offering its old tool list."""
    place = tmp_path / "server"
    place.mkdir()
    script = place / "probe_server.py"
    script.write_text(Path(probe_script()).read_text())
    for path in (tmp_path, place):
        os.chmod(path, 0o755)
    os.chmod(script, 0o644)
    entry = {"name": "probe", "command": str(server_venv / "bin" / "python"), "args": [str(script), token]}
    settings = {"plugins": {"probe": {"permissions": {"filesystem": {"read": [str(place)]}}, "activation": "lazy"}}}
    config = write_config([], host=settings, mcp_servers=[entry])
    async with Host(config) as host:
        assert "shout" not in host.registry.tool_names
    script.write_text(script.read_text().replace('if __name__ == "__main__":', """@server.tool()
def shout(text: str) -> str:
    return text.upper()


if __name__ == "__main__":"""))
    async with Host(config) as host:
        assert host.plugins["probe"].state.value == "idle"
        assert await host.registry.execute("shout", {"text": "new tool"}) == "NEW TOOL"


async def test_places_plugins_write_are_compared_as_the_kernel_finds_them(write_config, server_venv, tmp_path):
    """Attack pass 14: a workspace_dir reached through a symlink, named by its real path on PATH,
    passed the check (string prefixes)."""
    real = tmp_path / "real-workspace"
    real.mkdir()
    (tmp_path / "workspace").symlink_to(real)  # write_config's workspace_dir
    entry = {"name": "sneaky", "command": "python", "env": {"PATH": f"{real}/sneaky:{server_venv / 'bin'}"}}
    config = write_config([], mcp_servers=[entry])
    async with Host(config) as host:
        status = host.plugins["sneaky"].status()
        assert status["state"] == "failed" and "mcp_servers[0].env.PATH" in status["error"], status


def test_check_says_what_to_grant_for_a_directory_a_server_is_given(write_config, tmp_path):
    """Newcomer pass: the filesystem server given a directory it was not granted only said EACCES and
    restarted; check found nothing wrong."""
    shared = tmp_path / "shared"
    shared.mkdir()
    entry = {"name": "files", "command": str(filesystem_server()), "args": [str(shared)]}
    report = check_report(write_config([], mcp_servers=[entry]), warnings=True)
    assert "mcp_servers[0].args[0]" in report and "host.plugins.files.permissions.filesystem.read" in report
    granted = {"plugins": {"files": {"permissions": {"filesystem": {"read": [str(shared)]}}}}}
    assert "args[0]" not in check_report(write_config([], host=granted, mcp_servers=[entry]), warnings=True)


async def test_a_fallback_name_qanot_cannot_call_is_refused_and_never_stops_the_host(write_config, server_venv, token,
                                                                                     caplog):
    """Real servers, tried by hand: a taken tool's fallback name mcp_{server}_{tool} was registered
    unchecked, and one Qanot cannot call (a server named with '-', or a long tool name of a server's
    choosing) ended the host's start with a traceback, and a reload with "bad control request"."""
    long_tool = "lookup_customer_order_history_by_phone_number_and_date_range_v2"  # 62 characters
    grants = {**probe_grants("my-probe")["plugins"], **probe_grants("p1")["plugins"]}
    servers = [probe(server_venv, token, name="my-probe"),
               probe(server_venv, token, name="p1", env={"PROBE_EXTRA_TOOL": long_tool})]
    config = write_config([plugin("echo")], host={"plugins": grants}, mcp_servers=servers)
    assert "MCP server my-probe: a tool of it whose name another plugin has would be registered as " \
           "mcp_my-probe_TOOL, which Qanot cannot call" in check_report(config, warnings=True)
    async with Host(config) as host:
        await wait_until(lambda: all(host.plugins[n].state == "ready" for n in ("my-probe", "p1")), 60, "servers")
        assert host.registry.get("echo").plugin == "echo" and "echo" in host.plugins["my-probe"].status()["conflicts"]
        assert "MCP server my-probe: tool echo is not registered: plugin echo has the name echo, and " \
               "'mcp_my-probe_echo', Qanot's name for it then, is not one Qanot can call" in caplog.text
        assert host.registry.get("whoami").plugin in ("my-probe", "p1")  # its other tools work on
        data = json.loads(Path(config).read_text())
        data["mcp_servers"].append(probe(server_venv, token, name="p2", env={"PROBE_EXTRA_TOOL": long_tool}))
        data["host"]["plugins"].update(probe_grants("p2")["plugins"])
        Path(config).write_text(json.dumps(data))
        assert (await host.reload())["added"] == ["p2"]
        await wait_until(lambda: host.plugins["p2"].state == "ready", 60, "p2")
        assert host.registry.get(long_tool).plugin == "p1" and long_tool in host.plugins["p2"].status()["conflicts"]
        assert f"MCP server p2: tool {long_tool} is not registered" in caplog.text
        assert await host.registry.execute("echo", {"text": "still"}) == "{\"text\": \"still\"}"


@pytest.mark.skipif(shutil.which("npx") is None, reason="npx is not installed")
def test_check_says_a_runner_that_fetches_at_each_start_cannot_work_in_the_sandbox(write_config):
    """Qanot's own example entry, `npx -y PACKAGE`, timed out or failed with "Permission denied" in the
    sandbox (no network, and nothing it downloads may execute), and neither `check` nor the log said why."""
    config = write_config([], mcp_servers=[{"name": "fs", "command": "npx",
                                            "args": ["-y", "@modelcontextprotocol/server-filesystem", "/srv"]}])
    assert "MCP server fs: npx fetches the package and runs it at each start, which its sandbox does not allow" \
        in check_report(config, warnings=True)


def test_check_says_a_server_run_by_the_hosts_own_python_finds_none_of_its_packages(write_config, server_venv):
    """The newcomer of pass 56 made the host's own interpreter a server's command: "No module named
    'mcp'" at its start, as the host's site-packages are hidden from every worker, and `check` said
    nothing. A server in an environment of its own is not warned of."""
    config = write_config([], mcp_servers=[
        {"name": "own", "command": sys.executable, "args": [probe_script(), "x"]},
        {"name": "apart", "command": str(server_venv / "bin" / "python"), "args": [probe_script(), "x"]}])
    report = check_report(config, warnings=True)
    assert f"MCP server own: {sys.executable} is the host's own Python, and the host's installed packages" in report
    assert "give the server a virtual environment of its own" in report
    assert "apart: " + str(server_venv) not in report and "is the host's own Python" not in report.split("MCP server apart")[1], report
