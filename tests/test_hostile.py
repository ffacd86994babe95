"""A worker that lies: random bytes, huge length prefixes, truncated frames, wrong message types,
unknown and duplicate request ids. The host survives, kills and replaces it, and stays small."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec
import psutil
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qanot_host import Host, PluginState
from qanot_host.launcher import LaunchSpec, SubprocessLauncher
from qanot_worker import eventloop
from qanot_worker import protocol as p

from .conftest import plugin

FAKE = str(Path(__file__).with_name("fake_worker.py"))


class HostileLauncher(SubprocessLauncher):
    """Runs fake_worker.py instead of the real worker, with the same pipes and argv."""

    def __init__(self, payload: bytes, then: str = "sleep", protocol: int | None = None) -> None:
        self.payload, self.then, self.protocol = payload, then, protocol

    def command(self, spec: LaunchSpec, env_fd: int) -> tuple[list[str], dict[str, str]]:
        boot, _ = super().command(spec, env_fd)
        at = boot.index("-c")
        env = dict(spec.env, FAKE_PAYLOAD=self.payload.hex(), FAKE_THEN=self.then)
        if self.protocol is not None:
            env["FAKE_PROTOCOL"] = str(self.protocol)
        return boot[:at] + [FAKE] + boot[at + 2:], env


def frame(msg) -> bytes:
    return bytes(p.FrameWriter().frame(msg))


ID = b"@ID@"  # fake_worker puts the real call's id here (msgpack-encoded)
wrong_type = frame(p.Call(1, "x", {}))  # a host -> worker message
unknown_id = frame(p.Result(987654, "x"))


def reply_twice() -> bytes:
    # Result(id, "x") with the real id, twice: array_like tagged struct = ["Result", id, "x"]
    body = msgspec.msgpack.encode("Result")
    one = b"\x93" + body + ID + msgspec.msgpack.encode("x")
    single = (len(one) - len(ID) + 1).to_bytes(4, "big") + one  # valid while the id is one byte
    return single * 2


def pong_for_the_call() -> bytes:
    # Pong(id) with the real id: a message a worker may send, but not in reply to a tool call
    one = b"\x92" + msgspec.msgpack.encode("Pong") + ID
    return (len(one) - len(ID) + 1).to_bytes(4, "big") + one


payloads = st.one_of(
    st.binary(min_size=1, max_size=3000),
    st.binary(max_size=64).map(lambda tail: b"\xff\xff\xff\xff" + tail),  # a 4 GiB length prefix
    st.integers(1, len(unknown_id) - 1).map(lambda cut: unknown_id[:cut]),  # truncated frame
    st.just(wrong_type), st.just(unknown_id), st.just(reply_twice()), st.just(pong_for_the_call()),
    st.binary(min_size=1, max_size=200).map(lambda junk: len(junk).to_bytes(4, "big") + junk),
)


def config_for(tmp_path: Path) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "plugins": [plugin("echo")], "workspace_dir": str(tmp_path / "ws"),
        "host": {"state_dir": str(tmp_path / "state"), "call_timeout": 0.5, "cancel_grace": 0.2,
                 "max_frame_bytes": 1 << 20, "restart": {"max_restarts": 1, "backoff_initial": 0}}}))
    return str(path)


async def scenario(config: str, payload: bytes, then: str) -> None:
    async with Host(config, launcher=HostileLauncher(payload, then)) as host:
        sup = host.plugins["echo"]
        assert sup.state == PluginState.READY, sup.error
        first = sup.worker.pid
        result = await asyncio.wait_for(host.registry.execute("fake_tool", {}), 3)
        assert isinstance(result, str)
        deadline = asyncio.get_running_loop().time() + 5
        while not (sup.worker.pid != first and sup.state == PluginState.READY):
            assert asyncio.get_running_loop().time() < deadline, (sup.state, sup.last_exit, result)
            await asyncio.sleep(0.01)
        assert sup.restarts == 1


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=payloads, then=st.sampled_from(["sleep", "exit"]))
@example(payload=pong_for_the_call(), then="sleep")  # the call it answers must not hang
def test_hostile_worker_is_killed_and_replaced(tmp_path, payload, then):
    eventloop.run(scenario(config_for(tmp_path), payload, then))


def test_host_memory_stays_bounded_under_hostile_frames(tmp_path):
    me = psutil.Process()
    before = me.memory_info().rss
    for payload in [b"\xff\xff\xff\xff" * 8, b"\x7f\xff\xff\xff" + b"a" * 1000, wrong_type, unknown_id] * 2:
        eventloop.run(scenario(config_for(tmp_path), payload, "sleep"))
    assert me.memory_info().rss - before < 64 * 2**20


async def test_another_protocol_version_is_fatal_not_restarted(tmp_path):
    async with Host(config_for(tmp_path), launcher=HostileLauncher(b"", protocol=99)) as host:
        sup = host.plugins["echo"]
        assert sup.state == PluginState.FAILED and sup.restarts == 0
        assert sup.error == f"worker speaks protocol 99, the host speaks {p.PROTOCOL_VERSION}"
