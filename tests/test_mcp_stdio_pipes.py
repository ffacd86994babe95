"""The bridge's stdio transport (qanot_worker/mcp_bridge/stdio_pipes.py) against real processes:
what it does where the SDK's stdio_client would do otherwise, or where a server misbehaves."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import anyio
import pytest

pytest.importorskip("mcp")

from mcp import types  # noqa: E402
from mcp.shared.message import SessionMessage  # noqa: E402

from qanot_worker.mcp_bridge.stdio_pipes import WRITE_HIGH, server_pipes  # noqa: E402

PING = json.dumps({"jsonrpc": "2.0", "id": 7, "result": {}})
NOTE = SessionMessage(types.JSONRPCNotification(jsonrpc="2.0", method="x", params={"pad": "y" * 4096}))
REQUEST = SessionMessage(types.JSONRPCRequest(jsonrpc="2.0", id=1, method="x", params={"pad": "y" * 4096}))


def pipes(code: str, *args: str, **settings):
    return server_pipes(sys.executable, ["-c", code, *args], {}, os.getcwd(), 2, **settings)


async def test_the_server_holds_no_descriptor_of_the_bridge_but_its_stdin_stdout_and_stderr(tmp_path):
    """uvloop's spawn left the worker's pipes to the host open in the server (and copies of the
    server's own stdout): the server could write frames to the host, or keep its stdout open."""
    leaked = os.open(os.devnull, os.O_RDONLY)  # an inheritable descriptor of this process
    os.set_inheritable(leaked, True)
    try:
        code = "import os; print(sorted(int(fd) for fd in os.listdir('/proc/self/fd')), flush=True); input()"
        async with pipes(code) as (read, write, process):
            line = await asyncio.wait_for(read._next_line(), 10)
    finally:
        os.close(leaked)
    assert json.loads(line) == [0, 1, 2, 3]  # 3: the listing's own


async def test_a_line_over_the_limit_is_one_error_in_its_place_however_it_arrives(caplog):
    code = ("import sys, time\nfor _ in range(5): sys.stdout.write('x' * 1000); sys.stdout.flush(); time.sleep(0.05)\n"
            f"sys.stdout.write('\\n' + {PING!r} + '\\n'); sys.stdout.flush(); sys.stdin.read()")
    async with pipes(code, line_limit=1024) as (read, write, process):
        first = await asyncio.wait_for(read.receive(), 10)
        assert isinstance(first, ValueError) and "more than 1024 bytes" in str(first)
        second = await asyncio.wait_for(read.receive(), 10)
        assert isinstance(second, SessionMessage) and second.message.id == 7, second
    # said in the log too: the call it answered waits for its timeout, and the operator should know why
    assert [r.getMessage() for r in caplog.records if "more than 1024 bytes" in r.getMessage()], caplog.text


async def test_a_line_that_is_no_json_rpc_is_an_error_logged_in_one_line(caplog):
    code = f"print('hello there'); print({PING!r}, flush=True); import sys; sys.stdin.read()"
    async with pipes(code) as (read, write, process):
        assert isinstance(await asyncio.wait_for(read.receive(), 10), ValueError)
        assert isinstance(await asyncio.wait_for(read.receive(), 10), SessionMessage)
    logged = [r for r in caplog.records if "Failed to parse JSONRPC" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is None and "\n" not in logged[0].getMessage()


async def test_a_server_flooding_its_stdout_is_held_back_while_nothing_is_taken():
    code = (f"import sys\nfor i in range(200000): sys.stdout.write({PING!r} + '\\n')\n"
            "sys.stdout.flush(); sys.stderr.write('all written\\n'); sys.stdin.read()")
    async with pipes(code) as (read, write, process):
        await asyncio.sleep(1.5)
        held = sum(len(line) for line in read._lines if isinstance(line, bytes))
        assert held < 1024 * 1024, held  # a read's worth past BACKLOG messages, not the 8 MB written
        for _ in range(5000):
            assert isinstance(await asyncio.wait_for(read.receive(), 10), SessionMessage)
        assert sum(len(line) for line in read._lines if isinstance(line, bytes)) < 1024 * 1024


async def test_requests_to_a_server_that_does_not_read_wait_once_the_high_water_mark_is_reached():
    async with pipes("import time; time.sleep(60)", stdin_grace=0.1, term_grace=0.5) as (read, write, process):
        sends = [asyncio.ensure_future(write.send(REQUEST)) for _ in range(200)]  # 800 KB, all at once
        await asyncio.sleep(1.0)
        waiting = sum(1 for send in sends if not send.done())
        assert waiting > 150, waiting
        assert write._transport.get_write_buffer_size() <= WRITE_HIGH + 8192
        # a notification (a cancelled call's notifications/cancelled) does not wait behind them: its
        # call's worker is not done with the cancel until it is written (attack pass 66)
        await asyncio.wait_for(write.send(NOTE), 1)
        for send in sends:
            send.cancel()


async def test_a_server_that_closes_its_stdout_and_lives_on_ends_the_stream():
    code = "import os, time; os.close(1); time.sleep(60)"
    async with pipes(code, stdin_grace=0.1, term_grace=0.5) as (read, write, process):
        await asyncio.wait_for(read.ended.wait(), 10)
        with pytest.raises(anyio.EndOfStream):
            await read.receive()
        assert process.poll() is None


async def test_a_server_that_closes_its_stdin_makes_sends_fail_and_the_session_end():
    code = "import os, time; os.close(0); time.sleep(60)"
    async with pipes(code, stdin_grace=0.1, term_grace=0.5) as (read, write, process):
        with pytest.raises(anyio.BrokenResourceError):
            for _ in range(200):  # the broken pipe is seen at a write, or just after
                await write.send(NOTE)
                await asyncio.sleep(0.01)
        await asyncio.wait_for(read.ended.wait(), 10)  # calls waiting for answers fail now, not at a ping
        assert read.why_ended == "closed its stdin"  # what the bridge says as it goes (not "its stdout")


async def test_a_server_gone_makes_a_send_fail_as_a_closed_connection():
    async with pipes("pass") as (read, write, process):
        with pytest.raises(anyio.EndOfStream):
            await asyncio.wait_for(read.receive(), 10)  # its stdout ended
        with pytest.raises(anyio.BrokenResourceError):
            for _ in range(200):
                await write.send(NOTE)
                await asyncio.sleep(0.01)


async def test_a_server_that_exits_when_its_stdin_closes_is_stopped_at_once():
    started = time.monotonic()
    async with pipes("import sys; sys.stdin.read()", stdin_grace=5, term_grace=5) as (read, write, process):
        pass
    assert process.returncode == 0 and time.monotonic() - started < 3


SPAWN_DEAF_CHILD = ("import signal, subprocess, sys, time;"
                    "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
                    "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)']);")


async def test_a_server_deaf_to_stdin_and_sigterm_is_killed_with_its_group():
    code = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN);" + SPAWN_DEAF_CHILD + "time.sleep(60)"
    started = time.monotonic()
    async with pipes(code, stdin_grace=0.2, term_grace=0.3) as (read, write, process):
        child = await _child_of(process.pid)
    assert process.returncode == -9 and time.monotonic() - started < 5
    await _gone(child)


async def test_a_server_that_dies_of_sigterm_does_not_leave_its_group_behind():
    code = SPAWN_DEAF_CHILD + "time.sleep(60)"  # the server itself dies of SIGTERM; its child does not
    async with pipes(code, stdin_grace=0.2, term_grace=0.5) as (read, write, process):
        child = await _child_of(process.pid)
    assert process.returncode == -15
    await _gone(child)


async def test_the_server_is_stopped_to_the_end_however_often_the_stop_is_cancelled():
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    entered = asyncio.Event()
    held: list = []

    async def hold() -> None:
        async with pipes(code, stdin_grace=0.3, term_grace=0.3) as (read, write, process):
            held.append(process)
            entered.set()
            await asyncio.sleep(60)

    task = asyncio.ensure_future(hold())
    await entered.wait()
    for _ in range(3):  # into the stop, then while it waits
        task.cancel()
        await asyncio.sleep(0.1)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert held[0].returncode == -9


async def _child_of(pid: int) -> int:
    for _ in range(100):
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = f.read().split()
        except OSError:
            children = []
        if children:
            return int(children[0])
        await asyncio.sleep(0.05)
    raise AssertionError("the server started no child")


async def _gone(pid: int) -> None:
    for _ in range(100):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except OSError:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the server's child {pid} outlived the server's stop")
