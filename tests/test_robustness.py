"""Whatever a caller gets wrong is one clear error, decided in the host, and nothing else breaks: no
call by anyone makes a healthy worker restart, and a caller's retry loop cannot starve the host."""

from __future__ import annotations

import asyncio
import glob
import json
import math
import os
import signal
import string
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qanot_host import Host, InvalidParams, PluginState, ToolFailed
from qanot_host.errors import ConfigError
from qanot_host.schema import MAX_PARAMS_DEPTH, compile_params_check, compile_validator, json_problem

from .conftest import GREETER, check_report, gone, grant_write, plugin, wait_until, worker_processes
from .test_hostile import HostileLauncher


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"x": value}
    return value


BAD_PARAMS = [
    ({"o": object()}, "params.o: a object is not JSON"),
    ({"n": 2**70}, "params.n: integer 1180591620717411303424 does not fit in 64 bits"),
    ({"s": "\ud800"}, "params.s: '\\ud800' holds a lone surrogate, which is not valid UTF-8"),
    ({1: "a"}, "params: key 1 is not a string"),
    ({"f": math.nan}, "params.f: nan is not a JSON number"),
    ({"b": b"bytes"}, "params.b: a bytes is not JSON"),
    ({"deep": nested(3000)}, f"nested deeper than {MAX_PARAMS_DEPTH} levels"),
    (None, "Parameters must be an object, got null"),
    (["a"], "Parameters must be an object, got array"),
]


@pytest.fixture
async def echo_host(write_config):
    async with Host(write_config([plugin("echo"), plugin("misbehave")], host={"max_frame_bytes": 1 << 16})) as host:
        yield host


def unchanged(host: Host, name: str, pid: int) -> bool:
    sup = host.plugins[name]
    return sup.state == PluginState.READY and sup.worker.pid == pid and sup.restarts == 0


@pytest.mark.parametrize("params, message", BAD_PARAMS, ids=[m[:30] for _, m in BAD_PARAMS])
async def test_params_that_cannot_cross_the_wire_are_invalid_params(echo_host, params, message):
    host = echo_host
    pid = host.plugins["echo"].worker.pid
    result = json.loads(await host.registry.execute("echo", params))
    if isinstance(params, dict):  # Qanot's execute() words
        assert result["error"].startswith("Invalid parameters: ") and message in result["error"], result
    else:
        assert result == {"error": "Tool input must be a JSON object"}
    with pytest.raises(InvalidParams, match="tool echo") as raised:
        await host.registry.invoke("echo", params)
    assert message in str(raised.value)
    assert await host.registry.execute("echo", {"ok": 1}) == '{"ok": 1}'
    assert unchanged(host, "echo", pid)


async def test_params_over_max_frame_bytes_are_invalid_params(echo_host):
    host = echo_host
    pid = host.plugins["echo"].worker.pid
    result = json.loads(await host.registry.execute("echo", {"big": "x" * 100_000}))
    assert "Invalid parameters: params are too large" in result["error"]
    assert "host.max_frame_bytes" in result["error"]
    # nothing of the refused call is left in flight (a drain, the host's stop, would wait on it)
    assert host.plugins["echo"].in_flight == 0 and host.plugins["echo"].idle.is_set()
    assert await host.registry.execute("echo", {"ok": 1}) == '{"ok": 1}'
    assert unchanged(host, "echo", pid)


async def test_a_result_that_cannot_be_sent_fails_that_call_only(echo_host):
    host = echo_host
    pid = host.plugins["misbehave"].worker.pid
    with pytest.raises(ToolFailed, match="cannot be sent to the host: UnicodeEncodeError"):
        await host.registry.invoke("mb_bad_string", {})
    assert (await host.registry.execute("mb_ok", {})).startswith("ok ")
    assert unchanged(host, "misbehave", pid)


async def test_subclasses_of_dict_and_str_are_taken_as_qanot_takes_them(echo_host):
    """Attack pass 43: Qanot's execute() asks isinstance(input_data, dict), so an OrderedDict is a
    JSON object to it; here it was "Tool input must be a JSON object" (and "got object" from
    invoke()). A plugin's str subclass is a str result (msgpack could not encode it)."""
    host = echo_host
    pid = host.plugins["echo"].worker.pid
    assert await host.registry.execute("echo", OrderedDict(a=1)) == await host.registry.execute("echo", {"a": 1})
    assert await host.registry.invoke("echo", OrderedDict(a=1)) == await host.registry.invoke("echo", {"a": 1})
    assert await host.registry.execute("mb_fancy_string", {}) == "a str subclass"
    assert unchanged(host, "echo", pid)


async def test_a_frame_nested_deeper_than_the_decoder_accepts_is_a_protocol_violation(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"plugins": [{"name": "echo"}], "workspace_dir": str(tmp_path / "ws"),
                                  "host": {"state_dir": str(tmp_path / "state"), "restart": {"policy": "never"}}}))
    class DeepLauncher(HostileLauncher):
        def command(self, spec, env_fd):
            argv, env = super().command(spec, env_fd)
            return argv, dict(env, FAKE_DEEP_TOOLS="200000")

    began = time.monotonic()
    async with Host(str(config), launcher=DeepLauncher(b"")) as host:
        assert host.plugins["echo"].state == PluginState.FAILED
        assert "bad frame from the worker: nested deeper than the decoder accepts" in host.plugins["echo"].error
    assert time.monotonic() - began < 5  # refused at once, not after a ping timeout


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text() | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=6) | st.integers(0, 3), children, max_size=4),
    max_leaves=20)


SCHEMAS = [{}, {"type": "object", "properties": {"text": {"type": "string"}, "n": {"type": "integer"}}},
           {"type": "object", "properties": {"n": {"type": "number"}, "f": {"type": "boolean"}, "x": {"type": "null"},
                                             "l": {"type": "array"}, "o": {"type": "object"}, "u": {"type": "nonsense"},
                                             "m": {"type": ["integer", "null"]}}, "required": ["n"]},
           {"type": "object", "properties": {"x": {"type": ["null"]}, "text": {"type": ["string"]}}}]


plain_values = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats()
                | st.text(alphabet=string.printable, max_size=5) | st.lists(st.integers(), max_size=2)
                | st.dictionaries(st.text(alphabet=string.ascii_letters, max_size=2), st.integers(), max_size=2))
schema_keys = st.sampled_from(["text", "n", "f", "x", "l", "o", "u", "m"])


@settings(max_examples=800, deadline=None)
@given(params=st.dictionaries(schema_keys, plain_values, max_size=5)
       | st.dictionaries(schema_keys | st.text(max_size=8) | st.integers(0, 3), json_values, max_size=5),
       schema=st.sampled_from(SCHEMAS))
@example(params={"n": 2**64}, schema=SCHEMAS[1])  # each way out of the one pass, surely tried
@example(params={"n": -(2**63) - 1}, schema=SCHEMAS[2])
@example(params={"n": math.nan}, schema=SCHEMAS[2])
@example(params={"n": 1.0, "f": math.inf}, schema=SCHEMAS[2])
@example(params={"text": 1}, schema=SCHEMAS[1])
@example(params={"f": True}, schema=SCHEMAS[2])
@example(params={"n": 1, "s": "\ud800"}, schema=SCHEMAS[2])
@example(params={"n": 1, 2: "a"}, schema=SCHEMAS[2])
@example(params={"x": 1}, schema=SCHEMAS[3])  # a list of one type is JSON Schema's: ["null"] takes None only
def test_the_call_paths_one_pass_check_agrees_with_the_whole_walk_and_the_schema(params, schema):
    """A plugin tool's check passes a flat object of plain values in one loop and hands anything
    else to the full walk and the schema's validator: it must refuse exactly what those refuse,
    with the same words, in the same order."""
    validate = compile_validator(schema)
    problem = json_problem(params, "params", max_depth=MAX_PARAMS_DEPTH)
    check, whole = compile_params_check(schema, validate)
    assert check(params) == whole(params) == ([problem] if problem else validate(params))


async def test_params_of_millions_of_values_are_checked_off_the_event_loop(echo_host):
    """Attack pass 43: the check of a call's params walked them on the host's event loop: 9 million
    floats held it 1.8 s (/healthz answered 503), six such calls 10.75 s. Past CHECK_ON_LOOP_VALUES
    values the walk runs on a thread; what it finds is said with the same words."""
    host = echo_host
    gaps = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticking = asyncio.ensure_future(ticker())
    big = {"x": [1.5] * 3_000_000}
    await asyncio.sleep(0.05)  # the ticker is running
    try:
        with pytest.raises(InvalidParams, match="params are too large"):  # valid, then over max_frame_bytes
            await host.registry.invoke("echo", big)
        bad = {"x": [1.5] * 200_000 + [math.nan]}
        with pytest.raises(InvalidParams, match=r"params.x\[200000\]: nan is not a JSON number"):
            await host.registry.invoke("echo", bad)
        assert "params.x[200000]: nan" in await host.registry.execute("echo", bad)
    finally:
        ticking.cancel()
    assert max(gaps) < 0.3, f"the loop was held {max(gaps):.2f} s"
    assert await host.registry.execute("echo", {"ok": 1}) == '{"ok": 1}'


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(params=st.dictionaries(st.text(max_size=8), json_values, max_size=5) | json_values)
async def test_any_python_value_as_params_is_a_result_or_invalid_params(echo_host, params):
    host = echo_host
    pid = host.plugins["echo"].worker.pid
    try:
        result = await host.registry.invoke("echo", params)
        assert isinstance(result, str)
    except InvalidParams:
        pass
    outcome = await host.registry.execute("echo", params)
    assert not outcome.startswith('{"error"') or outcome.startswith(
        ('{"error": "Invalid parameters: ', '{"error": "Tool input must be a JSON object"}')), outcome
    assert unchanged(host, "echo", pid)


async def test_a_retry_loop_on_a_failed_plugin_neither_starves_nor_grows_the_host(write_config):
    config = write_config([plugin("misbehave"), GREETER], host={"restart": {"max_restarts": 0}})
    async with Host(config) as host:
        await host.registry.execute("mb_crash", {"how": "exit"})  # no restart left: failed, tools kept
        await wait_until(lambda: host.plugins["misbehave"].state == PluginState.FAILED, 10, "failed")
        loop = asyncio.get_running_loop()
        beats: list[float] = []

        async def heartbeat() -> None:
            while True:
                assert await host.registry.execute("greet", {"name": "x"}) == "Salom, x!"
                beats.append(loop.time())
                await asyncio.sleep(0.05)

        async def retry_forever() -> None:
            while True:  # no sleep of its own: execute() must be the checkpoint
                assert "plugin misbehave" in await host.registry.execute("mb_ok", {})

        beating = asyncio.ensure_future(heartbeat())
        rss_before = psutil.Process().memory_info().rss
        retrying = asyncio.ensure_future(retry_forever())
        await asyncio.sleep(3)
        assert not retrying.done(), retrying.exception()
        retrying.cancel()
        beating.cancel()
        await asyncio.gather(retrying, beating, return_exceptions=True)
        grown = (psutil.Process().memory_info().rss - rss_before) / 2**20
    assert len(beats) >= 20, f"the other plugin answered only {len(beats)} times in 3 s"
    gaps = [b - a for a, b in zip(beats, beats[1:], strict=False)]
    assert max(gaps) < 1.0, max(gaps)
    assert grown < 30, f"the host grew {grown:.0f} MB"


# ---- the CLI and configuration: one line naming the file and the key ------------------------------

from .test_cli import REPO, assert_one_line_error, qanot_host  # noqa: E402


@pytest.mark.parametrize("params, fragment", [
    ('{"x": 100000000000000000000000}', "params.x: integer 100000000000000000000000 does not fit in 64 bits"),
    ('{"x": "\\ud800"}', "params.x: '\\ud800' holds a lone surrogate"),
    ('{"x": ' * 100 + "1" + "}" * 100, "nested deeper than 64 levels"),
    ('[' * 30_000 + ']' * 30_000, "params: nested too deeply"),
], ids=["big-int", "surrogate", "100-deep", "30000-deep"])
def test_call_with_params_that_cannot_cross_the_wire_is_one_line(write_config, params, fragment):
    proc = qanot_host("call", "--config", write_config([plugin("echo")]), "echo", params)
    assert_one_line_error(proc, fragment)


def test_a_tool_of_a_disabled_plugin_says_so(write_config):
    config = write_config([plugin("echo"), plugin("misbehave", enabled=False)])
    assert_one_line_error(qanot_host("call", "--config", config, "mb_ok", "{}"),
                          "Unknown tool: mb_ok (its plugin misbehave is disabled in ")


@pytest.mark.parametrize("raw, fragment", [
    ({"plugins": [{"name": "echo", "config": {"k": "\ud800"}}]}, "plugins[0].config.k: '\\ud800' holds a lone surrogate"),
    ({"host": {"sandbox": {"rlimits": {"nofile": -1}}}}, "host.sandbox.rlimits.nofile: Expected `int` >= 0"),
    ({"host": {"state_dir": "/proc/version"}}, "host.state_dir: /proc/version is not a directory"),
    ({"workspace_dir": "/proc/version/ws"}, "workspace_dir: /proc/version/ws cannot be made: /proc/version is not a "
                                           "directory"),
])
def test_configuration_surprises_are_one_line_naming_the_key(tmp_path, raw, fragment):
    path = tmp_path / "config.json"
    data = {"plugins": [{"name": "echo"}], "workspace_dir": str(tmp_path / "ws"),
            "host": {"state_dir": str(tmp_path / "state")}}
    data.update({k: v for k, v in raw.items() if k != "host"})
    data["host"].update(raw.get("host", {}))
    path.write_text(json.dumps(data))
    for command in ("run", "call", "check"):
        args = [command, "--config", str(path)] + (["echo", "{}"] if command == "call" else [])
        proc = qanot_host(*args)
        if command == "check" and proc.returncode == 1 and proc.stdout:
            assert fragment in proc.stdout and "Traceback" not in proc.stdout + proc.stderr
            continue
        assert_one_line_error(proc, str(path), fragment)


def test_a_config_nested_thousands_deep_is_one_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"x": ' * 5000 + "1" + "}" * 5000)
    assert_one_line_error(qanot_host("check", "--config", str(path)), "nested too deeply")


def test_call_stopped_by_sigterm_tears_down_and_leaves_nothing(write_config, tmp_path):
    (tmp_path / "out").mkdir()
    marker, in_flight = tmp_path / "out" / "teardown.txt", tmp_path / "out" / "call.txt"
    config = write_config([plugin("misbehave", teardown_marker=str(marker), call_marker=str(in_flight))],
                          host=grant_write("misbehave", tmp_path / "out"))
    proc = subprocess.Popen([sys.executable, "-m", "qanot_host", "call", "--config", config, "mb_hang_async", "{}"],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not in_flight.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the call never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 143
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert marker.read_text() == "teardown ran"
    assert not glob.glob(f"/sys/fs/cgroup/*/qanot-host-{proc.pid}")


# ---- failures the host absorbs ------------------------------------------------------------------------

async def test_a_killed_worker_template_is_replaced_and_its_plugins_restart(write_config):
    async with Host(write_config([GREETER, plugin("echo")], host={"restart": {"backoff_initial": 0}})) as host:
        template = next(iter(host._factory.launcher.helper_pids()))
        pids = {name: sup.worker.pid for name, sup in host.plugins.items()}
        os.kill(template, signal.SIGKILL)
        await wait_until(lambda: all(s.state == PluginState.READY and s.worker.pid != pids[n]
                                     for n, s in host.plugins.items()), 15, "both plugins back")
        assert next(iter(host._factory.launcher.helper_pids())) != template
        assert await host.registry.execute("greet", {"name": "x"}) == "Salom, x!"


async def test_a_template_that_cannot_start_fails_each_plugin_not_the_host(write_config, monkeypatch):
    import qanot_host.forkserver as forkserver
    monkeypatch.setattr(forkserver, "TEMPLATE_BOOT", "import sys; sys.exit(3)")
    async with Host(write_config([GREETER, plugin("echo")], host={"restart": {"max_restarts": 0}})) as host:
        for sup in host.plugins.values():
            assert sup.state == PluginState.FAILED
            assert "the worker template did not start" in sup.error
        monkeypatch.undo()
        await host.reload()  # an operator's reload tries again, with a template that starts
        assert all(s.state == PluginState.READY for s in host.plugins.values())


@pytest.fixture
def silent_index():
    """A package index that accepts connections and never answers: an install that never ends."""
    import socket
    import threading
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/simple"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


async def test_stopping_during_an_install_ends_uv_and_leaves_no_partial_environment(write_config, tmp_path,
                                                                                     silent_index):
    extra = tmp_path / "extra"
    (extra / "slow_deps").mkdir(parents=True)
    (extra / "slow_deps" / "plugin.py").write_text("from qanot.plugins.base import Plugin\n"
                                                   "class QanotPlugin(Plugin):\n    pass\n")
    (extra / "slow_deps" / "plugin.json").write_text(json.dumps({"dependencies": ["qhtest-never-there"]}))
    stale = tmp_path / "state" / "envs" / "old-0123456789abcdef.building-999999999"
    stale.mkdir(parents=True)
    config = write_config([plugin("slow_deps")], plugins_dir=str(extra), host={"index_url": silent_index})
    host = Host(config)
    starting = asyncio.ensure_future(host.start())
    await wait_until(lambda: [p for p in psutil.Process().children(recursive=True) if p.name() == "uv"], 20,
                     "uv running")
    assert not stale.exists()  # a partial build of a host that is gone, removed at start
    starting.cancel()
    await asyncio.gather(starting, return_exceptions=True)
    await host.stop()
    await wait_until(lambda: not [p for p in psutil.Process().children(recursive=True)
                                  if p.name() == "uv" and p.status() != psutil.STATUS_ZOMBIE], 5, "uv gone")
    assert not glob.glob(str(tmp_path / "state" / "envs" / "*.building-*"))


async def test_the_worker_template_boots_while_uv_still_installs(write_config, silent_index, tmp_path):
    """An eager plugin's environment and the template its worker forks from are made at once (the
    template's boot no longer follows uv's install), and a host stopped meanwhile leaves neither."""
    extra = tmp_path / "extra"
    (extra / "slow_deps").mkdir(parents=True)
    (extra / "slow_deps" / "plugin.py").write_text("from qanot.plugins.base import Plugin\n"
                                                   "class QanotPlugin(Plugin):\n    pass\n")
    (extra / "slow_deps" / "plugin.json").write_text(json.dumps({"dependencies": ["qhtest-never-there"]}))
    host = Host(write_config([plugin("slow_deps")], plugins_dir=str(extra), host={"index_url": silent_index}))
    starting = asyncio.ensure_future(host.start())
    await wait_until(lambda: host._factory.launcher is not None and host._factory.launcher.helper_pids(), 20,
                     "the template running")
    assert [p for p in psutil.Process().children(recursive=True) if p.name() == "uv"]  # still installing
    assert host.plugins["slow_deps"].state == PluginState.STARTING
    [template] = host._factory.launcher.helper_pids()
    starting.cancel()
    await asyncio.gather(starting, return_exceptions=True)
    await host.stop()
    assert gone(template)


@pytest.mark.parametrize("how", ["another users", "writable by all", "under a directory writable by all",
                                 "through another users symlink"])
async def test_a_state_dir_others_could_write_is_refused(write_config, tmp_path, how):
    """The sixteenth attacker's F4: with a state_dir another user had made in /tmp, they planted
    runtime/KEY/qanot_worker (the key is a hash anyone can compute), and the worker template, root,
    ran their code. Such a state_dir is now the host's one-line error, and check's, and nothing runs."""
    planted = tmp_path / "planted"
    planted.mkdir()
    state = planted / "state"
    if how == "another users":
        state.mkdir()
        os.chown(state, 65534, 65534)
        why = f"{state} belongs to uid 65534"
    elif how == "writable by all":
        state.mkdir()
        os.chmod(state, 0o777)
        why = f"{state} is writable by others (mode 777)"
    elif how == "under a directory writable by all":
        os.chmod(planted, 0o777)  # (no sticky bit: anyone may rename state away and put theirs)
        why = f"{planted} is writable by others (mode 777)"
    else:
        real = tmp_path / "real"
        real.mkdir()
        os.symlink(real, state)
        os.lchown(state, 65534, 65534)
        why = f"{state} is a symlink of uid 65534's"
    config = write_config([GREETER], host={"state_dir": str(state)})
    host = Host(config)
    with pytest.raises(ConfigError) as refused:
        await host.start()
    assert f"host.state_dir: {state} is not safe: {why}" in str(refused.value), str(refused.value)
    assert not host.plugins or all(s.worker is None for s in host.plugins.values())
    done = subprocess.run([sys.executable, "-m", "qanot_host", "check", "--config", config], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and why in done.stdout + done.stderr, done.stdout + done.stderr


def _their_link(tmp_path: Path) -> tuple[Path, Path]:
    """theirs/ws: uid 65534's symlink (in a directory of root's) to an empty directory, the target."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.symlink(target, theirs / "ws")
    os.lchown(theirs / "ws", 65534, 65534)
    return target, theirs


async def test_a_workspace_dir_through_another_users_symlink_is_refused(write_config, tmp_path):
    """The seventeenth attacker's F4: workspace_dir reached through a symlink another user made
    (/var/tmp/theirs/ws -> /etc): the host made each plugin's place there, gave it to the plugin's
    uid and bound it writable into its sandbox, so a plugin named nginx rewrote /etc/nginx. It is
    refused now, as state_dir is, and nothing is made there."""
    target, theirs = _their_link(tmp_path)
    config = write_config([GREETER], workspace_dir=str(theirs / "ws"))
    host = Host(config)
    with pytest.raises(ConfigError) as refused:
        await host.start()
    assert f"workspace_dir: {theirs / 'ws'} is not safe: {theirs / 'ws'} is a symlink of uid 65534's" \
        in str(refused.value), str(refused.value)
    assert list(target.iterdir()) == []
    config = write_config([GREETER], workspace_dir=str(theirs / "ws" / "made" / "by" / "root"))
    with pytest.raises(ConfigError, match="is a symlink of uid 65534's"):
        await Host(config).start()
    assert list(target.iterdir()) == []  # the eighteenth attacker's F4: nothing made before it was judged


def test_a_link_of_roots_that_leads_through_another_users_link_is_refused(tmp_path):
    """The eighteenth attacker's F2: the walk looked at the path as written and at its real path, so
    root's own link (mylink -> theirs/link2/x) hid another user's link (theirs/link2) met only while
    resolving it; they could point it at a directory of theirs at any time."""
    from qanot_host.safe_files import unsafe_directory
    theirs = tmp_path / "theirs"
    theirs.mkdir()  # root's, and not writable by others: only the link in it is theirs
    (tmp_path / "rootdir" / "x").mkdir(parents=True)
    os.symlink(tmp_path / "rootdir", theirs / "link2")
    os.lchown(theirs / "link2", 65534, 65534)
    os.symlink(theirs / "link2" / "x", tmp_path / "mylink")
    assert unsafe_directory(str(tmp_path / "mylink")) == (
        f"is not safe: {theirs / 'link2'} is a symlink of uid 65534's, who could point it anywhere")
    os.symlink("../rootdir/x", tmp_path / "relative")  # root's links all the way: fine
    assert unsafe_directory(str(tmp_path / "relative")) is None
    assert unsafe_directory(str(tmp_path / "relative" / "not-made-yet")) is None


async def test_a_reload_refuses_a_workspace_dir_or_state_dir_a_start_would(write_config, tmp_path):
    """The eighteenth attacker's F1: a reload took a new workspace_dir (through another user's
    symlink: the added plugin's place was made and given away there) and a new state_dir (another
    user's: root truncated a file through their link) that check and a start refuse. The running
    config is kept."""
    import json as json_module
    target, theirs = _their_link(tmp_path)
    config = write_config([GREETER])
    async with Host(config) as host:
        data = json_module.loads(Path(config).read_text())
        data["plugins"].append({"name": "echo"})
        data["workspace_dir"] = str(theirs / "ws")
        Path(config).write_text(json_module.dumps(data))
        with pytest.raises(ConfigError, match=r"workspace_dir: .* is a symlink of uid 65534's"):
            await host.reload()
        data["workspace_dir"] = host.config.workspace_dir
        data["host"]["state_dir"] = str(tmp_path / "another-state")
        Path(config).write_text(json_module.dumps(data))
        with pytest.raises(ConfigError, match="host.state_dir: changed from .*; restart it to use another"):
            await host.reload()
        assert list(host.plugins) == ["greeter"] and list(target.iterdir()) == []
        assert await host.registry.execute("greet", {"name": "x"}) == "Salom, x!"


async def test_a_cancelled_pipe_connect_leaves_no_file_to_close_a_descriptor_twice():
    """A full run failed one test on a ResourceWarning: a worker's output pipe whose connect was
    cancelled (a start cancelled as the host stopped) had its descriptor closed by uvloop while its
    file object, unaware, would close the same number again when collected, by then maybe another
    pipe's. The connect now runs to its end and its transport is closed, once."""
    import gc
    from qanot_host.forkserver import _reader
    loop = asyncio.get_running_loop()
    read_end, write_end = os.pipe()
    try:
        task = asyncio.ensure_future(_reader(loop, read_end))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        gc.collect()  # an unaware file object would warn here (an error in this suite)
        with pytest.raises(OSError):
            os.fstat(read_end)  # closed, once
    finally:
        os.close(write_end)


async def test_run_warns_of_an_unknown_key_in_a_plugin_entry_and_of_timeouts_for_no_tool(write_config, caplog):
    config = write_config([{"name": "greeter", "config": {"greeting_style": "x"}, "enabeld": False}],
                          host={"plugins": {"greeter": {"tool_timeouts": {"no_such_tool": 5}}}})
    async with Host(config) as host:
        assert host.plugins["greeter"].state == PluginState.READY  # "enabeld" is not "enabled"
        assert host.status()[0]["unknown_tool_timeouts"] == ["no_such_tool"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("plugins[0].enabeld: unknown key, ignored" in m for m in messages)
    assert any("tool_timeouts names no_such_tool, which the plugin does not offer" in m for m in messages)


async def test_a_start_cancelled_while_its_pipes_open_still_ends_its_worker(write_config, monkeypatch, caplog):
    """Found running the tests four at a time: a host stopped while a restart was opening the new
    worker's pipes waited 7 s on that worker and logged that it "survived SIGKILL": nothing watched its
    exit yet. Its pipes' file objects were also left to the garbage collector."""
    import qanot_host.worker as worker_module
    real_open = worker_module.WorkerChannel.open
    opening = asyncio.Event()

    async def slow_open(*args, **kwargs):
        opening.set()
        await asyncio.sleep(0.5)  # the window, made wide
        return await real_open(*args, **kwargs)

    monkeypatch.setattr(worker_module.WorkerChannel, "open", slow_open)
    host = Host(write_config([GREETER]))
    starting = asyncio.ensure_future(host.start())
    await asyncio.wait_for(opening.wait(), 30)
    starting.cancel()
    await asyncio.wait_for(asyncio.gather(starting, return_exceptions=True), 30)
    assert "survived SIGKILL" not in caplog.text
    await wait_until(lambda: not worker_processes(include_template=True), 10, "no worker left")


async def test_closing_a_workers_pipes_never_closes_a_descriptor_another_thread_just_opened():
    """uvloop closes a pipe transport's descriptor, then closes the file object it was given too: that
    second close(2) took whatever another thread had opened under the same number meanwhile (a full
    density run lost one of the host's cgroup files after a chain of such closes). The host's pipes go
    to the loop through pipe_file(), which leaves the closing to the loop's transport alone."""
    import threading

    from qanot_host.loop import pipe_file
    stolen: list[int] = []
    done = threading.Event()

    def open_and_check() -> None:  # what the host's threads do: fingerprints, disk images, walks
        while not done.is_set():
            fd = os.open("/dev/null", os.O_RDONLY)
            try:
                before = os.fstat(fd)
                time.sleep(0)
                after = os.fstat(fd)
                if (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino):
                    os.close(fd)
                    continue
            except OSError:
                pass
            stolen.append(fd)  # closed under us (and maybe the number reused): never closed here again

    loop = asyncio.get_running_loop()
    threads = [threading.Thread(target=open_and_check) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        ends = time.monotonic() + 3.0  # the old file objects lost a descriptor within 0.2-0.3 s here
        while time.monotonic() < ends and not stolen:
            r, w = os.pipe()
            reading, _ = await loop.connect_read_pipe(asyncio.Protocol, pipe_file(r, "rb"))
            writing, _ = await loop.connect_write_pipe(asyncio.Protocol, pipe_file(w, "wb"))
            reading.close()
            writing.close()
            await asyncio.sleep(0)
    finally:
        done.set()
        for thread in threads:
            thread.join()
    assert not stolen, f"descriptors of another thread closed under it: {stolen}"


async def test_a_kept_cgroup_descriptor_closed_under_the_host_neither_breaks_its_reads_nor_its_stop(
        write_config, caplog):
    """The host keeps each plugin's cgroup CPU file open. Something else closing that descriptor (a
    double close elsewhere: one once made a full density run's stop fail with EBADF) is logged, the
    file is opened anew, and the host still stops cleanly."""
    host = Host(write_config([GREETER]))
    await host.start()
    try:
        cgroups = host._factory.cgroups
        if "cpuacct" not in cgroups._base:
            pytest.skip("no cgroup v1 cpuacct here")
        assert cgroups.cpu_seconds("greeter") is not None
        os.close(cgroups._open_files["greeter"])  # behind its back
        assert cgroups.cpu_seconds("greeter") is not None  # read from the file opened anew
        os.close(cgroups._open_files["greeter"])  # and again, left for the stop to find
    finally:
        await host.stop()
    assert "was closed by someone else" in caplog.text


async def test_a_host_warns_when_a_plugins_uid_is_another_hosts_process(write_config, tmp_path, caplog):
    """The newcomer's second host gave its calc the uid of another host's calc (the uid table is
    per state_dir), and nothing said so. A start now names the plugin, the uid and the process."""
    # a uid range of its own: the tests beside it run greeter under the default one, as other hosts
    config = write_config([GREETER], host={"sandbox": {"uid_base": 2_100_000_000}})
    async with Host(config):
        pass
    uid = json.loads((tmp_path / "state" / "uids.json").read_text())["greeter"]
    async with Host(config):  # its own workers, at a restart of it, are not another's
        pass
    assert "is also that of process" not in caplog.text
    # another host's process: not a descendant of this one (a child of ours would be this host's)
    other = int(subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], user=uid, group=uid,
                               capture_output=True, text=True, check=True).stdout)
    try:
        async with Host(config) as host:
            assert host.plugins["greeter"].state == PluginState.READY  # a warning, not a refusal
    finally:
        os.kill(other, signal.SIGKILL)
    assert f"plugin greeter: its uid {uid} is also that of process {other} (sleep)" in caplog.text
    assert "host.sandbox.uid_base of its own" in caplog.text


async def test_a_state_dir_whose_uids_are_another_uid_bases_is_refused_not_rebased(write_config, tmp_path):
    """A call from a shell without QANOT_HOST_UID_BASE started a host on the state_dir with the
    default uid_base: every plugin was given a uid anew and its data directory chowned to it, and
    every later start refused its workspace place (newcomer pass 58). It is refused, saying why."""
    config = write_config([GREETER], host={"sandbox": {"uid_base": 2_101_000_000}})
    async with Host(config) as host:
        assert host.plugins["greeter"].state == PluginState.READY
    table = (tmp_path / "state" / "uids.json").read_text()
    data = json.loads(Path(config).read_text())
    data["host"]["sandbox"]["uid_base"] = 2_102_000_000
    Path(config).write_text(json.dumps(data))
    async with Host(config) as host:
        greeter = host.plugins["greeter"]
        assert greeter.state == PluginState.FAILED
        assert "uids.json was made with another uid_base (plugin greeter has uid 21010" in greeter.error
        assert "run with the uid_base it was made with (host.sandbox.uid_base, or QANOT_HOST_UID_BASE)" \
            in greeter.error
    assert (tmp_path / "state" / "uids.json").read_text() == table  # nothing given anew
    assert "uids.json was made with another uid_base" in check_report(config)
