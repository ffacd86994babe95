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

from qanot_worker.mcp_bridge.stdio_pipes import BACKLOG, WRITE_HIGH, server_pipes  # noqa: E402

PING = json.dumps({"jsonrpc": "2.0", "id": 7, "result": {}})


def pipes(code: str, **settings):
    return server_pipes(sys.executable, ["-c", code], {}, os.getcwd(), 2, **settings)


async def test_a_line_over_the_limit_is_an_error_in_its_place_and_the_next_line_arrives():
    code = f"import sys; sys.stdout.write('x' * 5000 + '\\n' + {PING!r} + '\\n'); sys.stdout.flush(); sys.stdin.read()"
    async with pipes(code, line_limit=1024) as (read, write, process):
        first = await asyncio.wait_for(read.receive(), 10)
        assert isinstance(first, ValueError) and "more than 1024 bytes" in str(first)
        second = await asyncio.wait_for(read.receive(), 10)
        assert isinstance(second, SessionMessage) and second.message.id == 7


async def test_a_line_that_is_no_json_rpc_is_an_error_logged_in_one_line(caplog):
    code = f"print('hello there'); print({PING!r}, flush=True); import sys; sys.stdin.read()"
    async with pipes(code) as (read, write, process):
        assert isinstance(await asyncio.wait_for(read.receive(), 10), ValueError)
        assert isinstance(await asyncio.wait_for(read.receive(), 10), SessionMessage)
    logged = [r for r in caplog.records if "Failed to parse JSONRPC" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is None


async def test_a_server_flooding_its_stdout_is_held_back_while_nothing_is_taken():
    code = f"import sys\nfor i in range(100000): print({PING!r}, flush=True)\nsys.stdin.read()"
    async with pipes(code) as (read, write, process):
        await asyncio.sleep(1.0)
        assert len(read._items) <= BACKLOG  # the pump waits; the rest stays in the pipe
        taken = 0
        while taken < 1000:
            assert isinstance(await asyncio.wait_for(read.receive(), 10), SessionMessage)
            taken += 1
        assert len(read._items) <= BACKLOG


async def test_a_send_to_a_server_that_does_not_read_waits_past_the_high_water_mark():
    message = SessionMessage(types.JSONRPCNotification(jsonrpc="2.0", method="x", params={"pad": "y" * 4096}))
    async with pipes("import time; time.sleep(60)", stdin_grace=0.1, term_grace=0.5) as (read, write, process):
        sent = 0
        with pytest.raises(asyncio.TimeoutError):
            while True:
                await asyncio.wait_for(write.send(message), 2)
                sent += 1
                assert sent * 4096 < 64 * 1024 * 1024, "sends never waited"
        assert process.stdin.transport.get_write_buffer_size() <= WRITE_HIGH + 8192


async def test_a_server_gone_makes_a_send_fail_as_a_closed_connection():
    async with pipes("pass") as (read, write, process):
        with pytest.raises(anyio.EndOfStream):
            await asyncio.wait_for(read.receive(), 10)  # its stdout ended
        await asyncio.wait_for(process.wait(), 10)
        message = SessionMessage(types.JSONRPCNotification(jsonrpc="2.0", method="x"))
        with pytest.raises(anyio.BrokenResourceError):
            for _ in range(100):  # the closed pipe is seen at the first write or the next
                await write.send(message)
                await asyncio.sleep(0.01)


async def test_a_server_that_exits_when_its_stdin_closes_is_stopped_at_once():
    started = time.monotonic()
    async with pipes("import sys; sys.stdin.read()", stdin_grace=5, term_grace=5) as (read, write, process):
        pass
    assert process.returncode == 0 and time.monotonic() - started < 3


async def test_a_server_deaf_to_stdin_and_sigterm_is_killed_with_its_group():
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)']);"
            "time.sleep(60)")
    started = time.monotonic()
    async with pipes(code, stdin_grace=0.2, term_grace=0.3) as (read, write, process):
        await asyncio.sleep(0.5)  # its child started
        child = _child_of(process.pid)
    elapsed = time.monotonic() - started
    assert process.returncode == -9 and elapsed < 5
    assert child is not None
    for _ in range(100):
        if not _alive(child):
            break
        await asyncio.sleep(0.05)
    assert not _alive(child), "the server's child outlived the SIGKILL of its group"


def _child_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
