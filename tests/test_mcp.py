"""`qanot-host mcp`: the plugins' tools through the official MCP SDK's own client, over stdio and
streamable HTTP, with real workers behind them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from qanot_host import Host

from .conftest import GREETER, grant_write, plugin, wait_until

pytest.importorskip("mcp")

from mcp.client.session import ClientSession  # noqa: E402
from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def text(result) -> str:
    return "".join(part.text for part in result.content)


@asynccontextmanager
async def stdio_session(config: str, notifications: list | None = None):
    params = StdioServerParameters(command=sys.executable, cwd=str(REPO),
                                   args=["-m", "qanot_host", "mcp", "--config", config, "--log-level", "WARNING"])

    async def on_message(message) -> None:
        if notifications is not None:
            notifications.append(message)

    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write, message_handler=on_message) as session:
            await session.initialize()
            yield session


@pytest.fixture
def markers(tmp_path):
    place = tmp_path / "markers"
    place.mkdir()
    return place


def mcp_config(write_config, markers, **host) -> str:
    settings = grant_write("misbehave", markers)
    settings["plugins"]["misbehave"]["tool_timeouts"] = {"mb_sleep": 0.5}
    return write_config([plugin("echo"), GREETER, plugin("misbehave", call_marker=str(markers / "call"))],
                        host={**settings, "restart": {"backoff_initial": 0}, **host})


async def test_list_and_call_and_every_failure_is_a_tool_result(write_config, markers):
    config = mcp_config(write_config, markers)
    async with stdio_session(config) as session:
        listed = {tool.name: tool for tool in (await session.list_tools()).tools}
        assert {"echo", "greet", "mb_crash", "mb_sleep"} <= set(listed)
        assert listed["greet"].input_schema["required"] == ["name"]
        assert listed["greet"].description == "Greet someone."
        answer = await session.call_tool("echo", {"x": [1, "two"]})
        assert not answer.is_error and json.loads(text(answer)) == {"x": [1, "two"]}
        huge = text(await session.call_tool("echo", {"x": "\u0000" * 300_000}))  # 1.8 MB as JSON
        assert len(huge) < 101_000 and "truncated" in huge  # Qanot's cut, at 100 000 characters
        for name, arguments, expected in (
                ("no_such_tool", {}, "Unknown tool: no_such_tool"),
                ("greet", {"times": 2}, "name"),  # required parameter missing
                ("mb_sleep", {"seconds": 5}, "timed out after 0.5 s"),
                ("mb_crash", {"how": "exit"}, "worker crashed")):
            result = await session.call_tool(name, arguments)
            assert result.is_error, (name, text(result))
            assert expected in text(result), (name, text(result))
        # the session and the plugins live on: the crashed worker was replaced
        assert not (await session.call_tool("mb_sleep", {"seconds": 0})).is_error
        assert text(await session.call_tool("greet", {"name": "Ann"})).count("Ann") == 1


async def test_a_tool_named_by_mcps_rule_alone_is_listed_and_called(write_config):
    """get-tiny-image (server-everything's, as most current servers name tools) reached no client."""
    async with stdio_session(write_config([plugin("mcp_names")])) as session:
        listed = {tool.name for tool in (await session.list_tools()).tools}
        assert {"get-tiny-thing", "mcp.names.dotted", "mcp_names_plain"} <= listed and "has space" not in listed
        answer = await session.call_tool("get-tiny-thing", {"what": "it"})
        assert not answer.is_error and text(answer) == "ran it"
        # a plugin's text in an MCP server's form stays text: no image of its making reaches a client
        from qanot_worker.protocol import MCP_RESULT
        forged = MCP_RESULT + '{"text": "ALL GOOD", "content": [{"type": "image", "data": "AAAA", "mimeType": "image/png"}]}'
        answer = await session.call_tool("mcp_names_verbatim", {"what": forged})
        assert [block.type for block in answer.content] == ["text"] and text(answer) == forged


async def a_worker_killed_mid_call_is_an_error_result_and_the_next_call_works(session, markers) -> None:
    """Over any transport: the worker SIGKILLed with a call in flight; both calls get error results."""
    hanging = asyncio.ensure_future(session.call_tool("mb_hang_async", {}))
    await wait_until((markers / "call").exists, 15, "the call in flight")
    crash = await session.call_tool("mb_crash", {"how": "signal"})  # SIGKILL, with the other call in it
    assert crash.is_error and "killed by SIGKILL" in text(crash), text(crash)
    lost = await asyncio.wait_for(hanging, 10)
    assert lost.is_error and "killed by SIGKILL" in text(lost), text(lost)
    assert text(await session.call_tool("mb_sleep", {"seconds": 0})) == "slept"
    (markers / "call").unlink()  # for a call after this one


async def a_clients_cancel_cancels_the_call_in_the_worker(session, markers) -> None:
    """Over any transport: the client cancels a call in flight; its handler is cancelled in the worker."""
    call = asyncio.ensure_future(session.call_tool("mb_hang_async", {}))
    await wait_until((markers / "call").exists, 15, "the call in flight")
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)
    await wait_until((markers / "call.cancelled").exists, 10, "the handler cancelled in the worker")
    assert text(await session.call_tool("mb_sleep", {"seconds": 0})) == "slept"


async def test_a_worker_killed_mid_call_is_an_error_result_and_the_next_call_works(write_config, markers):
    async with stdio_session(mcp_config(write_config, markers)) as session:
        await a_worker_killed_mid_call_is_an_error_result_and_the_next_call_works(session, markers)


async def test_a_clients_cancel_cancels_the_call_in_the_worker(write_config, markers):
    async with stdio_session(mcp_config(write_config, markers)) as session:
        await a_clients_cancel_cancels_the_call_in_the_worker(session, markers)


async def test_reload_tells_clients_the_tool_list_changed(write_config, markers, tmp_path):
    config = mcp_config(write_config, markers)
    seen: list = []
    async with stdio_session(config, seen) as session:
        for _ in range(3):  # told once all the same (each listing was counted as a client of its own)
            before = {tool.name for tool in (await session.list_tools()).tools}
        assert "calc_eval" not in before
        data = json.loads(Path(config).read_text())
        data["plugins"].append({"name": "calc"})
        Path(config).write_text(json.dumps(data))
        done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "qanot_host", "reload", "--config",
                                                        config], capture_output=True, text=True, cwd=str(REPO))
        assert done.returncode == 0, done.stderr
        await wait_until(lambda: told_of(seen), 10, "tools/list_changed")
        await asyncio.sleep(1)
        assert len(told_of(seen)) == 1, told_of(seen)
        after = {tool.name for tool in (await session.list_tools()).tools}
        assert after == before | {"calc_eval"}


def told_of(seen: list) -> list:
    return [m for m in seen if "tools/list_changed" in repr(m) or "ToolListChanged" in type(m).__name__
            or "ToolListChanged" in repr(m)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def http_host(write_config, markers):
    with _http_host(mcp_config(write_config, markers), "127.0.0.1") as served:
        yield served


@contextlib.contextmanager
def _http_host(config: str, address: str, *extra: str):
    """`qanot-host mcp --http ADDRESS:PORT` with a bearer token, for the with block; it must then
    stop cleanly on SIGTERM."""
    port = free_port()
    env = {**os.environ, "QH_MCP_TOKEN": "s3cret-token"}
    proc = subprocess.Popen([sys.executable, "-m", "qanot_host", "mcp", "--config", config, "--http",
                             f"{address}:{port}", "--token-env", "QH_MCP_TOKEN", "--log-level", "WARNING", *extra],
                            cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection((address, port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1].decode()
                time.sleep(0.1)
        yield f"http://{address}:{port}/mcp", proc.pid
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    assert proc.returncode == 0, err.decode()


async def test_idle_connections_cannot_take_the_hosts_descriptors(http_host):
    import psutil
    url, pid = http_host
    port = int(url.split(":")[2].split("/")[0])
    before = psutil.Process(pid).num_fds()
    # (a generous connect timeout: on a loaded machine the listen backlog fills while the host closes the extra ones)
    held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(300)]
    try:
        await asyncio.sleep(1.0)
        assert psutil.Process(pid).num_fds() < before + 100  # at most 64 at once; the rest answered 503
    finally:
        for conn in held:
            conn.close()


async def test_a_request_head_sent_a_byte_at_a_time_is_cut_off(http_host):
    """The sixteenth attacker's F1: uvicorn's idle timer stops at a request's first byte and nothing
    bounded the rest of its head, so 64 connections sending a byte every 2 s, with no token, kept
    every client out for as long as they went on. A head must now be whole within 10 s."""
    url, _ = http_host
    port = int(url.split(":")[2].split("/")[0])
    head = f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Padding: {'a' * 200}\r\n".encode()
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    began = time.monotonic()
    try:
        for byte in head:
            try:
                conn.send(bytes([byte]))
            except OSError:
                break  # cut off
            conn.settimeout(1.0)
            try:
                if conn.recv(1) == b"":
                    break  # closed by the host
            except (TimeoutError, socket.timeout):
                pass
            assert time.monotonic() - began < 25, "still open after 25 s of trickling"
    finally:
        conn.close()
    assert 9 < time.monotonic() - began < 25


def test_host_and_origin_are_held_to_the_bound_address_whatever_it_is(write_config, markers):
    """The sixteenth attacker's F3: the SDK checks Host and Origin only when bound to a literal
    127.0.0.1, localhost or ::1, so on 127.0.0.2 (or a LAN address) a web page rebinding its own DNS
    name to it reached every tool. Now any bound address is held to its own names, and --allow-host
    adds one."""
    config = mcp_config(write_config, markers)
    with _http_host(config, "127.0.0.2", "--allow-host", "qanot.internal") as (url, _):
        _held_to_its_names(url)


def _initialize(url: str, **headers: str) -> int:
    """The HTTP status of an MCP initialize POSTed with the token (and `headers`)."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
               "Authorization": "Bearer s3cret-token", **headers}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=20) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _held_to_its_names(url: str) -> None:
    port = url.split(":")[2].split("/")[0]
    assert _initialize(url, Host=f"evil.example.com:{port}") == 421
    assert _initialize(url, Host=f"127.0.0.2:{port}", Origin=f"http://evil.example.com:{port}") == 403
    assert _initialize(url, Host=f"127.0.0.2:{port}") == 200
    assert _initialize(url, Host=f"qanot.internal:{port}", Origin=f"http://qanot.internal:{port}") == 200
    # a TLS proxy in front passes its clients' Host (and Origin) on without the port (the newcomer's 421)
    assert _initialize(url, Host="qanot.internal", Origin="https://qanot.internal") == 200
    assert _initialize(url, Host="127.0.0.2") == 421  # only a name given with --allow-host goes bare


def test_http_sessions_are_bounded(http_host):
    """The sixteenth attacker's F6: each initialize kept a session for 30 minutes, up to the SDK's
    10,000 (the host went from 74 to 444 MB, then refused every new client, and took 18 s to stop).
    Now 256 at most, each dropped after 10 idle minutes."""
    from qanot_host.mcp_server import MAX_HTTP_SESSIONS
    url, pid = http_host
    statuses = [_initialize(url) for _ in range(MAX_HTTP_SESSIONS + 20)]
    assert statuses.count(200) == MAX_HTTP_SESSIONS == 256 and set(statuses[MAX_HTTP_SESSIONS:]) == {503}, statuses


async def test_a_client_that_reads_no_answers_is_dropped(write_config, markers, monkeypatch):
    """The seventeenth attacker's F3: pipelined requests whose answers the client never reads left
    the host writing into a full socket, with no timer, on all 64 connections: the operator was kept
    out. A connection whose answers stall is now dropped, even one that has shown the token."""
    import threading
    from qanot_host import mcp_server
    from qanot_host.mcp_server import McpFront, listen
    monkeypatch.setattr(mcp_server, "STALLED_WRITE_SECONDS", 2)
    host = Host(mcp_config(write_config, markers))
    await host.start()
    port = free_port()
    serving = asyncio.ensure_future(McpFront(host).serve_http(listen(f"127.0.0.1:{port}"), "s3cret-token"))
    outcome: list[str] = []
    stop = threading.Event()

    def pipeline_without_reading() -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(20)
        sock.connect(("127.0.0.1", port))
        # with the token (a request without it ends its connection at its 401), for a short answer (404)
        request = (f"GET /elsewhere HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                   "Authorization: Bearer s3cret-token\r\n\r\n").encode() * 50
        try:
            while not stop.is_set():
                sock.sendall(request)  # whole requests only: a cut one would end it as a bad request
        except (ConnectionResetError, BrokenPipeError):
            outcome.append("dropped")
        except OSError as exc:  # the timeout: the host neither reads nor lets go
            outcome.append(f"held: {exc}")
        finally:
            sock.close()
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        began = time.monotonic()
        await asyncio.wait_for(asyncio.to_thread(pipeline_without_reading), 60)
        assert outcome == ["dropped"], outcome
        assert time.monotonic() - began >= 2
    finally:
        stop.set()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await host.stop()


def test_clients_without_the_token_cannot_keep_one_with_it_out(http_host):
    """The eighteenth attacker's F2: 64 connections without the token, pipelining requests and
    reading their 401s slowly, kept the operator (with the token) out. Now a request without the
    token ends its connection, and a new connection takes the place of the oldest that has not
    shown the token."""
    url, _ = http_host
    port = int(url.split(":")[2].split("/")[0])
    head = f"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(head * 5)  # pipelined, without the token
        answers = b""
        while chunk := conn.recv(65536):
            answers += chunk
    assert answers.count(b" 401 ") == 1, answers  # and then the host closed the connection
    held = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(64)]
    try:
        for conn in held:
            conn.sendall(b"GET /mcp HTTP/1.1\r\nHost: 1")  # heads never finished (10 s allowed)
        time.sleep(0.5)
        assert _initialize(url) == 200
    finally:
        for conn in held:
            conn.close()


async def test_streamable_http_with_a_bearer_token(http_host):
    import httpx2
    from mcp.client.streamable_http import streamable_http_client
    http_host, _ = http_host
    request = urllib.request.Request(http_host, data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
    for header in ("Bearer wrong-token", "Basic s3cret-token", "s3cret-token"):
        request.headers["Authorization"] = header
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401, header
    request.headers["Authorization"] = "bearer s3cret-token"  # the scheme's case is the client's
    with pytest.raises(urllib.error.HTTPError) as answered:
        urllib.request.urlopen(request, timeout=10)  # {} is no MCP request: refused, but past the token
    assert answered.value.code != 401
    async with httpx2.AsyncClient(headers={"Authorization": "Bearer s3cret-token"}, timeout=30) as client:
        async with streamable_http_client(http_host, http_client=client) as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as session:
                init = await session.initialize()
                assert init.capabilities.tools.list_changed  # as over stdio: it is sent at reload
                assert "echo" in {tool.name for tool in (await session.list_tools()).tools}
                answer = await session.call_tool("echo", {"over": "http"})
                assert json.loads(text(answer)) == {"over": "http"}
                failed = await session.call_tool("mb_sleep", {"seconds": 5})
                assert failed.is_error and "timed out" in text(failed)


async def test_over_http_failures_a_kill_mid_call_and_a_cancel_are_tool_results_and_the_session_lives_on(
        http_host, markers):
    """What the stdio tests above check, over streamable HTTP: a failing tool, a worker SIGKILLed with
    a call in flight (both get error results, the next call works), a client's cancel reaching the
    handler in the worker."""
    import httpx2
    from mcp.client.streamable_http import streamable_http_client
    url, _ = http_host
    async with httpx2.AsyncClient(headers={"Authorization": "Bearer s3cret-token"}, timeout=30) as client:
        async with streamable_http_client(url, http_client=client) as streams:
            async with ClientSession(streams[0], streams[1]) as session:
                await session.initialize()
                missing = await session.call_tool("greet", {"times": 2})
                assert missing.is_error and "name" in text(missing), text(missing)
                await a_worker_killed_mid_call_is_an_error_result_and_the_next_call_works(session, markers)
                await a_clients_cancel_cancels_the_call_in_the_worker(session, markers)


async def test_an_unchanged_qanot_uses_the_plugins_through_its_mcp_servers_entry(write_config, markers):
    """The README's mcp_servers entry, read by Qanot's own MCP client (qanot==2.0.4) into Qanot's own
    registry: a call through Qanot's execute() reaches a sandboxed worker."""
    from qanot.mcp_client import MCPManager
    from qanot.registry import ToolRegistry
    config = mcp_config(write_config, markers)
    entry = {"name": "qanot-host", "transport": "stdio", "command": sys.executable,
             "args": ["-m", "qanot_host", "mcp", "--config", config, "--log-level", "WARNING"]}
    manager = MCPManager()
    try:
        assert await manager.connect_servers([entry]) == 1
        registry = ToolRegistry()
        assert manager.register_tools(registry) >= 4
        assert json.loads(await registry.execute("echo", {"via": "qanot"})) == {"via": "qanot"}
        assert "timed out after 0.5 s" in await registry.execute("mb_sleep", {"seconds": 5})
    finally:
        await manager.disconnect_all()


def test_a_taken_http_port_is_the_commands_error_before_any_plugin_starts(write_config, markers):
    config = mcp_config(write_config, markers)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        began = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "qanot_host", "mcp", "--config", config, "--http",
                               f"127.0.0.1:{port}"], capture_output=True, text=True, cwd=str(REPO), timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == f"qanot-host: error: --http 127.0.0.1:{port}: Address already in use"
    assert "plugin echo ready" not in done.stderr and time.monotonic() - began < 15
    bad = subprocess.run([sys.executable, "-m", "qanot_host", "mcp", "--config", config, "--http", "localhost"],
                         capture_output=True, text=True, cwd=str(REPO), timeout=60)
    assert bad.returncode == 1 and "give an IP address and a port" in bad.stderr


def test_sigterm_stops_the_host_even_when_its_client_reads_nothing(write_config, markers):
    """A client that stops reading stdout: the SDK's writer blocks on the full pipe. SIGTERM still
    stops the host (teardown in every worker), within the front's bounded stop."""
    import signal
    config = mcp_config(write_config, markers)
    log = open(markers / "host.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "qanot_host", "mcp", "--config", config],
                            cwd=str(REPO), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    try:
        messages = [{"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}},
            {"jsonrpc": "2.0", "method": "notifications/initialized"}]
        messages += [{"jsonrpc": "2.0", "id": i, "method": "tools/call",
                      "params": {"name": "echo", "arguments": {"x": "y" * 50_000}}} for i in range(1, 40)]
        proc.stdin.write(b"".join(json.dumps(m).encode() + b"\\n" for m in messages))
        proc.stdin.flush()
        time.sleep(8)  # the host starts, answers, and fills the pipe nobody reads
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            err = (markers / "host.log").read_text()
        assert "stopped" in err, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            stream.close()
        log.close()


async def test_a_client_listing_anew_does_not_keep_another_from_being_told(write_config, markers):
    """Attack pass 35: one digest of the tools last shown stood for every client, so a client that
    listed the tools just after a reload (within the notice's 0.2 s) made every other client's stale
    list look current: they were never told (6 of 8 tries)."""
    import httpx2
    from mcp.client.streamable_http import streamable_http_client
    from qanot_host.mcp_server import McpFront, listen
    config = mcp_config(write_config, markers)
    host = Host(config)
    await host.start()
    port = free_port()
    serving = asyncio.ensure_future(McpFront(host).serve_http(listen(f"127.0.0.1:{port}"), "s3cret-token"))
    seen_by_a: list = []

    async def on_message(message) -> None:
        seen_by_a.append(message)

    @asynccontextmanager
    async def client(handler=None):
        async with httpx2.AsyncClient(headers={"Authorization": "Bearer s3cret-token"}, timeout=30) as http, \
                streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http) as streams, \
                ClientSession(streams[0], streams[1], message_handler=handler) as session:
            await session.initialize()
            yield session
    try:
        await wait_until(lambda: _listening(port), 10, "the MCP front")
        async with client(on_message) as a, client() as b:
            assert "calc_eval" not in {tool.name for tool in (await a.list_tools()).tools}
            await b.list_tools()
            data = json.loads(Path(config).read_text())
            data["plugins"].append({"name": "calc"})
            Path(config).write_text(json.dumps(data))
            await host.reload()
            assert "calc_eval" in {tool.name for tool in (await b.list_tools()).tools}  # within the 0.2 s
            await wait_until(lambda: told_of(seen_by_a), 10, "tools/list_changed to the client that did not list")
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await host.stop()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def test_every_string_of_a_whole_results_block_is_cut_resources_own_too():
    """What `qanot-host mcp` hands on of an MCP server's result whole: an embedded resource's MIME
    type went uncut (64 blocks of 480 000 characters each, 30 MB a result: attack pass 65)."""
    from qanot_host.mcp_server import MAX_FIELD_CHARS, _bounded, _Budget
    big = "m" * 500_000
    for resource in ({"uri": big, "mimeType": big, "text": "t"}, {"uri": big, "mimeType": big, "blob": "AAAA"}):
        block = _bounded({"type": "resource", "resource": dict(resource)}, _Budget())
        assert all(len(value) <= MAX_FIELD_CHARS for value in block["resource"].values()), \
            {key: len(value) for key, value in block["resource"].items()}
    block = _bounded({"type": "image", "data": "AAAA", "mimeType": big, "uri": big}, _Budget())
    assert len(block["mimeType"]) <= MAX_FIELD_CHARS and len(block["uri"]) <= MAX_FIELD_CHARS
