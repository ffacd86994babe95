"""A worker that lies: random bytes, huge length prefixes, truncated frames, wrong message types,
unknown and duplicate request ids. The host survives, kills and replaces it, and stays small."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgspec
import psutil
import pytest
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
        env = dict(spec.env, FAKE_THEN=self.then)
        if len(self.payload) > 64 * 1024:  # too large for the environment
            env["FAKE_PAYLOAD_FILE"] = self.payload_file(spec)
        else:
            env["FAKE_PAYLOAD"] = self.payload.hex()
        if self.protocol is not None:
            env["FAKE_PROTOCOL"] = str(self.protocol)
        return boot[:at] + [FAKE] + boot[at + 2:], env

    def payload_file(self, spec: LaunchSpec) -> str:
        path = Path(spec.import_root).parent / "fake-payload"
        if not path.exists():
            path.write_bytes(self.payload)
        return str(path)


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
        # an error naming the plugin; or "x", the first of reply_twice's two replies (the second kills it)
        assert result == "x" or json.loads(result)["error"].startswith("plugin echo: "), result
        deadline = asyncio.get_running_loop().time() + 5
        while not (sup.worker.pid != first and sup.state == PluginState.READY):
            assert asyncio.get_running_loop().time() < deadline, (sup.state, sup.last_exit, result)
            await asyncio.sleep(0.01)
        assert sup.restarts == 1


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
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


def _array32(count: int, element: bytes) -> bytes:
    return b"\xdd" + count.to_bytes(4, "big") + element * count


def _message(tag: str, *fields: bytes) -> bytes:
    body = bytes([0x90 + 1 + len(fields)]) + msgspec.msgpack.encode(tag) + b"".join(fields)
    return len(body).to_bytes(4, "big") + body


UNSENT = msgspec.msgpack.encode(987654)  # an id the host never used: the frame is refused, after decoding
# One byte of msgpack each: an empty list (~70 bytes as a Python list), an empty map, an empty string.
AMPLIFIERS = {
    "a hook's value of 40M empty lists": _message("HookResult", UNSENT, _array32(40_000_000, b"\x90")),
    "20M prompt sections": _message("ToolList", UNSENT, b"\x90", b"\x92\x90" + _array32(20_000_000, b"\x80")),
    "40M tools": _message("ToolList", UNSENT, _array32(40_000_000, b"\x90")),
    "40M hooks": _message("Loaded", UNSENT, *(msgspec.msgpack.encode(s) for s in "nvdts"), _array32(40_000_000, b"\xa0")),
    "40M sandbox layers": _message("Hello", msgspec.msgpack.encode(p.PROTOCOL_VERSION), UNSENT, b"\xff",
                                   _array32(40_000_000, b"\xa0")),
}


def _peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident size


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


@pytest.mark.parametrize("shape", list(AMPLIFIERS))
def test_a_frame_of_tiny_containers_does_not_become_gigabytes_in_the_host(tmp_path, shape):
    """The third attacker's F1: one 40 MB frame of empty lists took the host to 4.2 GB and held its
    loop for 22 s while msgspec built them. Every container a worker sends is bounded at its header,
    and free-form values stay encoded."""
    path = Path(config_for(tmp_path))
    config = json.loads(path.read_text())
    config["host"]["max_frame_bytes"] = 64 * 2**20
    path.write_text(json.dumps(config))
    payload = AMPLIFIERS[shape]
    _peak_rss_reset()
    before = psutil.Process().memory_info().rss
    eventloop.run(scenario(str(path), payload, "sleep"))
    growth = _peak_rss() - before
    # the frame itself is buffered (40 MB, maybe twice while it is cut out); what it decodes to is not
    assert growth < 200 * 2**20, f"{shape}: host peak RSS grew {growth / 2**20:.0f} MB"


async def test_a_pipe_closed_inside_a_frame_is_a_violation_only_if_the_worker_lives_on(tmp_path):
    """A worker SIGKILLed while writing leaves half a frame too: that is a crash (chaos saw it so).
    One that closes its pipe inside a frame and stays alive is a liar, killed and reported as such."""
    half = unknown_id[:-2]
    async with Host(config_for(tmp_path), launcher=HostileLauncher(half, then="close")) as host:
        sup = host.plugins["echo"]
        first = sup.worker.pid
        result = await asyncio.wait_for(host.registry.execute("fake_tool", {}), 5)
        assert "closed its pipe in the middle of a frame" in result, result
        deadline = asyncio.get_running_loop().time() + 5
        while sup.worker.pid == first:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        assert "middle of a frame" in sup.last_exit, sup.last_exit


UNASKED_FLOODS = [
    # Pong frames with id 0, as fast as the pipe took them: the host took each for the answer to a
    # ping not sent, and spent a whole core on them while the plugin stayed ready under cpu_max 0.05
    # (attack pass 52). A reply to no request ends it.
    ("forged_pongs", "bad frame from the worker: a reply to request 0, which was never sent"),
    # reports of denied connects (p.Denied): a worker sends one per 0.1 s at most; a flood is a lying
    # worker, ended as the Pong flood is, not a loop spent counting them
    ("forged_denials", "reports of denied connects faster than 20 a second for a minute"),
]


@pytest.mark.parametrize("tool, said", UNASKED_FLOODS, ids=["pongs", "denial reports"])
async def test_a_flood_of_frames_no_request_asked_for_ends_the_worker(write_config, caplog, tool, said):
    """Plugin code writes frames of its own into the protocol pipe, as fast as it takes them."""
    from .conftest import GREETER, wait_until
    config = write_config([plugin("forged_frames"), GREETER], host={"restart": {"backoff_initial": 0}})
    async with Host(config) as host:
        sup = host.plugins["forged_frames"]
        first = sup.worker.pid
        result = await asyncio.wait_for(host.registry.execute(tool, {}), 10)
        assert "ESCAPED" not in result and json.loads(result)["error"].startswith("plugin forged_frames: "), result
        await wait_until(lambda: sup.state == PluginState.READY and sup.worker.pid != first, 10, "the restart")
        assert said in caplog.text, caplog.text[-2000:]
        assert await host.registry.execute("greet", {"name": "x"}) == "Salom, x!"


async def test_reports_of_denied_connects_are_no_sign_of_life(write_config):
    """A thread writing reports of denied connects while the worker's loop was blocked kept it from
    ever being pinged (attack pass 59): only other frames count as life; it is pinged and killed."""
    from .conftest import GREETER, wait_until
    config = write_config([plugin("forged_frames"), GREETER], host={
        "ping_interval": 1, "ping_timeout": 1, "restart": {"backoff_initial": 0}})
    async with Host(config) as host:
        sup = host.plugins["forged_frames"]
        first = sup.worker.pid
        assert await host.registry.execute("forged_alive", {}) == "blocking"
        await wait_until(lambda: sup.worker is not None and sup.worker.pid != first, 15, "the blocked worker replaced")
        assert "unresponsive" in sup.last_exit, sup.last_exit


async def test_a_frame_that_never_ends_does_not_keep_a_worker_from_its_pings(tmp_path):
    """Bytes of a frame that never ends, one every 50 ms, counted as signs of life: the worker was
    never pinged, stayed ready for minutes, and the host held the frame's buffer (attack pass 52).
    Only whole frames count: it is pinged, cannot answer inside its endless frame, and is killed."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "plugins": [plugin("echo")], "workspace_dir": str(tmp_path / "ws"),
        "host": {"state_dir": str(tmp_path / "state"), "call_timeout": 30, "ping_interval": 0.3,
                 "ping_timeout": 0.5, "restart": {"max_restarts": 1, "backoff_initial": 0}}}))
    begun = (1 << 20).to_bytes(4, "big") + b"\x00" * 1000  # a frame of 1 MiB, 1000 bytes of it sent
    async with Host(str(path), launcher=HostileLauncher(begun, "trickle")) as host:
        sup = host.plugins["echo"]
        first = sup.worker.pid
        result = json.loads(await asyncio.wait_for(host.registry.execute("fake_tool", {}), 10))
        assert "unresponsive: no answer to a ping within 0.5 s" in result["error"], result
        assert sup.worker.pid != first or sup.state is not PluginState.READY


async def test_a_call_reusing_the_id_of_one_in_flight_is_refused_by_the_worker(write_config):
    """The other way round: a host (or whatever holds its pipe) that sends a Call under the id of one
    still running is answered with a protocol failure, not a second run under that id."""
    from qanot_host.errors import ToolFailed
    async with Host(write_config([plugin("misbehave")])) as host:
        channel = host.plugins["misbehave"].worker._channel
        reply = channel.call("mb_sleep", {"seconds": 1}, 10)
        channel._post(p.Call(max(channel._pending), "mb_ok", {}))
        with pytest.raises(ToolFailed, match="duplicate request id"):
            await reply
