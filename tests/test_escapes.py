"""The escape suite: each hostile plugin in tests/plugins/escape_* tries one way out of its sandbox.
Each must be contained with a clear error, and afterwards the host and a neighbour plugin must
still work. The attacks use raw libc calls where Python's own checks could be bypassed, so what
is tested is the kernel layer, not only the friendly error."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from qanot_host import Host, PluginState
from qanot_host.control import ControlServer

from .conftest import GREETER, plugin

# Outside the plugin's grant, the host's files do not exist for it: its root holds only what the
# plan bound there.
ABSENT = "No such file or directory"
CONTAINED = {
    "read_host_config": "the host's own files (its config.json, its state_dir) are no plugin's",
    "proc_environ": ABSENT,
    "write_outside": "denied by the sandbox: writing",  # the host's tmp_path: not the plugin's own /tmp
    "symlink": "needs the 'filesystem' permission (config.json: host.plugins.escape_symlink.permissions)",
    "hardlink": "link failed:",
    "connect_localhost": "needs the 'network' permission",
    "bind_port": "needs the 'network' permission",
    "fork_bomb": "contained after",
    "memory_bomb": "MemoryError",
    "cpu_spin": "timed out after 0.5 s",
    "run_shell": "needs the 'subprocess' permission",
    "ptrace_parent": "ptrace: Operation not permitted",
    "kill_parent": "No such process",  # the host is outside the worker's PID namespace
    "import_host_package": "No module named 'pytest'",
    "startup_tricks": "none of the host's start-up tricks reached the worker",
    "inherited_fd": "no descriptor but its pipes and its own files",
    "setuid": "NoNewPrivs: 1",
    "mount": "mount: Operation not permitted",
    "dev_mem": ABSENT,
    "huge_file": "File too large",
    "protocol_garbage": "bad frame from the worker",
    "other_plugin_data": "the host's own files (its config.json, its state_dir) are no plugin's",
    "control_socket": "Operation not permitted",  # seccomp: no socket(AF_UNIX); the host refuses workers too
    "aio": "io_setup: Operation not permitted",  # fs.aio-max-nr is one count for the whole machine
    "lease": "F_SETLEASE: Operation not permitted",  # others' open() would wait 45 s, root's included
    "hugetlb": "mmap(MAP_HUGETLB): Operation not permitted",  # the machine's pool, no cgroup of its
    "splice": "splice: Operation not permitted",  # what a pipe holds so is charged to no cgroup
    "zerocopy": "TCP_ZEROCOPY_RECEIVE: Operation not permitted",  # received pages mapped, in no cgroup
    "disk_stats": "no device's figures are visible",  # others' disks, how full and how busy
    "secretmem": "a secret memfd was refused (Operation not permitted)",  # splits the machine's direct map until reboot
}


@pytest.fixture
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server.getsockname()[1]
    server.close()


@pytest.mark.parametrize("name", sorted(CONTAINED))
async def test_escape_is_contained(write_config, tmp_path, listener, monkeypatch, name):
    for var, value in {"PYTHONPATH": str(tmp_path), "LD_PRELOAD": "", "QANOT_ESCAPE_SECRET": "s3cret",
                       "PYTHONSTARTUP": str(tmp_path / "startup.py")}.items():
        monkeypatch.setenv(var, value)
    config = write_config([plugin(f"escape_{name}", port=listener, host_pid=os.getpid()), GREETER], host={
        "cancel_grace": 0.3, "restart": {"backoff_initial": 0},
        "sandbox": {"rlimits": {"data": 1 << 30, "fsize": 16 << 20, "nofile": 256, "core": 0}},
        "plugins": {f"escape_{name}": {"tool_timeouts": {f"escape_{name}": 0.5 if name == "cpu_spin" else 10}}}})
    async with Host(config) as host:
        control = ControlServer(host)
        await control.start()
        try:
            escaper = host.plugins[f"escape_{name}"]
            assert escaper.state == PluginState.READY, escaper.error
            result = await asyncio.wait_for(host.registry.execute(f"escape_{name}", {}), 20)
            assert "ESCAPED" not in result, result
            expected = CONTAINED[name].format(name=name)
            assert expected in result, result
            # the host and the neighbour plugin are untouched
            assert await host.registry.execute("greet", {"name": "ok"}) == "Salom, ok!"
            for _ in range(500):
                if escaper.state == PluginState.READY:
                    break
                await asyncio.sleep(0.01)
            assert escaper.state == PluginState.READY
        finally:
            await control.close()
    assert not list(Path(tmp_path).glob("pwned-*"))


def test_every_escape_plugin_is_in_the_table():
    plugins = {p.name.removeprefix("escape_") for p in (Path(__file__).parent / "plugins").glob("escape_*")}
    assert plugins == set(CONTAINED) and len(plugins) >= 20


async def test_control_socket_refuses_workers_even_without_seccomp(write_config, tmp_path):
    """The second line of defence: with seccomp off, a worker that reaches the socket is refused."""
    config = write_config([plugin("escape_control_socket")], host={"sandbox": {"enabled": False}})
    async with Host(config) as host:
        control = ControlServer(host)
        await control.start()
        try:
            result = await host.registry.execute("escape_control_socket", {})
        finally:
            await control.close()
    assert "the host closed the control connection" in result


@pytest.mark.parametrize("under", ["/var/tmp", "/tmp"])
async def test_reading_the_hosts_config_is_not_said_to_need_a_grant(write_config, tmp_path, under):
    """The host's config.json and state_dir can never be granted (a config that grants them is
    refused), yet a plugin reading config.json was told it "needs the 'filesystem' permission
    (config.json: host.plugins.X.permissions)" (newcomer pass 56): it is told they are the host's."""
    import json
    import shutil
    import tempfile
    from qanot_host import ToolFailed
    # under /tmp too, where the host's paths are bound on the worker's own /tmp (attack pass 60: there,
    # the host's files were said to need a grant)
    place = Path(tempfile.mkdtemp(dir=under))
    try:
        config = json.loads(Path(write_config([plugin("escape_read_host_config"),
                                               plugin("wants_everything")])).read_text())
        (place / "workspace").mkdir()
        config["workspace_dir"] = str(place / "workspace")
        config["host"]["state_dir"] = str(place / "state")
        (place / "config.json").write_text(json.dumps(config))
        async with Host(str(place / "config.json")) as host:
            with pytest.raises(ToolFailed) as denied:
                await host.registry.invoke("escape_read_host_config", {})
            with pytest.raises(ToolFailed) as in_state:  # what lies in state_dir, not only its name
                await host.registry.invoke("wants_read", {"path": str(place / "state" / "uids.json")})
        assert f"denied by the sandbox: reading {place / 'config.json'}: the host's own files (its config.json, its " \
               "state_dir) are no plugin's, whatever it is granted" in str(denied.value)
        assert "the host's own files" in str(in_state.value), str(in_state.value)
        assert "needs the 'filesystem' permission" not in str(denied.value) + str(in_state.value)
    finally:
        shutil.rmtree(place, ignore_errors=True)
