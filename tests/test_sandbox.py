"""The permission model: what config.json grants is what the kernel enforces."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from qanot_host import ConfigError, Host, PluginState
from qanot_host.config import parse_config
from qanot_host.errors import ToolFailed

from .conftest import GREETER, plugin

ALL_LAYERS = {"rlimits", "pid-namespace", "mount-namespace", "ipc-namespace", "uts-namespace", "network-namespace",
              "disk-quota", "identity", "no-new-privileges", "landlock", "seccomp", "pids-cgroup", "memory-cgroup",
              "cpu-cgroup"}
REPO_README = str(Path(__file__).resolve().parent.parent / "README.md")


async def test_every_layer_is_active_here_and_reported(write_config):
    async with Host(write_config([GREETER])) as host:
        [row] = host.status()
        assert set(row["sandbox"]) == ALL_LAYERS
        assert host.plugins["greeter"].worker.report.sandbox_ms > 0  # what it cost is in benchmarks/


async def test_granted_env_vars_and_paths_reach_the_plugin(write_config, tmp_path, monkeypatch):
    secret = tmp_path / "shared" / "readme.txt"
    secret.parent.mkdir()
    secret.write_text("granted")
    (tmp_path / "other.txt").write_text("not granted")
    monkeypatch.setenv("WEATHER_API_KEY", "k-1")
    monkeypatch.setenv("HOST_SECRET", "s-2")
    config = write_config([plugin("wants_everything")], host={"plugins": {"wants_everything": {"permissions": {
        "env_vars": ["WEATHER_API_KEY", "NOT_SET_ANYWHERE"], "filesystem": {"read": [str(secret.parent)]}}}}})
    async with Host(config) as host:
        env = json.loads(await host.registry.execute("wants_env", {}))
        granted = await host.registry.execute("wants_read", {"path": str(secret)})
        absent = json.loads(await host.registry.execute("wants_read", {"path": str(tmp_path / "other.txt")}))
        denied = json.loads(await host.registry.execute("wants_read", {"path": REPO_README}))
        with pytest.raises(ToolFailed) as raised:  # whole: execute() redacts paths as Qanot's does
            await host.registry.invoke("wants_read", {"path": REPO_README})
    assert "WEATHER_API_KEY" in env and "HOST_SECRET" not in env
    assert granted == "granted"
    # not in the plugin's world at all, and under /tmp not the plugin's own /tmp either (where the
    # host's tmp_path is bound, the directories on its way are no place of the plugin's)
    assert "needs the 'filesystem' permission" in absent["error"], absent
    assert "needs the 'filesystem' permission (config.json: host.plugins.wants_everything.permissions)" \
        in denied["error"] and REPO_README not in denied["error"]
    assert f"reading {REPO_README} needs the 'filesystem' permission (config.json: " \
           "host.plugins.wants_everything.permissions)" in str(raised.value)


async def test_a_path_granted_both_read_and_write_is_writable(write_config, tmp_path):
    """Granted in `read` and in `write` (as one would for a server's directory), it was bound
    read-only: writes failed with EROFS, and nothing said why (compat pass 57)."""
    place = tmp_path / "both"
    place.mkdir()
    place.chmod(0o777)
    config = write_config([plugin("wants_everything")], host={"plugins": {"wants_everything": {"permissions": {
        "filesystem": {"read": [str(place)], "write": [str(place)]}}}}})
    async with Host(config) as host:
        assert await host.registry.execute("wants_write", {"path": str(place / "a.txt"), "text": "hi"}) == "written"
        assert await host.registry.execute("wants_read", {"path": str(place / "a.txt")}) == "hi"
    assert (place / "a.txt").read_text() == "hi"


async def test_declared_but_not_granted_starts_and_is_logged(write_config, caplog):
    async with Host(write_config([plugin("wants_everything")])) as host:
        assert host.plugins["wants_everything"].state == PluginState.READY
    assert any("plugin.json asks for network, filesystem, subprocess, env_vars, database, not granted"
               in r.getMessage() for r in caplog.records)


async def test_unknown_permission_name_in_plugin_json_is_refused(write_config):
    config = write_config([plugin("bad_permission"), GREETER])
    async with Host(config) as host:
        assert "permissions: unknown 'root_access' (known: network, filesystem, subprocess, env_vars, " \
               "database)" in host.plugins["bad_permission"].error
        assert host.plugins["greeter"].state == PluginState.READY
    # said once, as an error: not also "asks for root_access, not granted" (a newcomer got both)
    from .conftest import check_report
    report = check_report(config, warnings=True)
    assert "unknown 'root_access'" in report and "asks for network, not granted" in report, report
    assert "root_access, not granted" not in report and "asks for network, root_access" not in report, report


def test_unknown_permission_name_in_config_is_a_config_error(tmp_path):
    raw = json.dumps({"plugins": [{"name": "a"}], "host": {"plugins": {"a": {"permissions": {"internet": True}}}}})
    with pytest.raises(ConfigError, match="Object contains unknown field `internet`"):
        parse_config(raw, str(tmp_path / "c.json"))


async def test_strict_refuses_a_plugin_when_a_layer_is_missing(write_config, monkeypatch):
    import qanot_host.cgroups as cgroups
    monkeypatch.setattr(cgroups, "_hierarchies", lambda require_writable=True: {})
    async with Host(write_config([GREETER], host={"sandbox": {"strict": True}})) as host:
        assert host.plugins["greeter"].state == PluginState.FAILED
        assert "sandbox layer pids-cgroup is not active" in host.plugins["greeter"].error
    async with Host(write_config([GREETER])) as host:  # not strict: runs, and says what is missing
        assert "pids-cgroup" not in host.status()[0]["sandbox"]
        assert host.plugins["greeter"].state == PluginState.READY


@pytest.mark.parametrize("launcher", ["spawn", "forkserver"])
async def test_pids_cgroup_stops_a_fork_bomb_even_with_subprocess_granted(write_config, launcher):
    config = write_config([plugin("escape_fork_bomb"), GREETER], host={
        "launcher": launcher, "sandbox": {"pids_max": 16},
        "plugins": {"escape_fork_bomb": {"permissions": {"subprocess": True}}}})
    async with Host(config) as host:
        result = await host.registry.execute("escape_fork_bomb", {})
        assert result.startswith("contained after"), result
        assert int(result.split()[2]) < 16  # the worker itself counts too
        assert await host.registry.execute("greet", {"name": "x"}) == "Salom, x!"


async def test_each_plugin_runs_as_a_uid_of_its_own(write_config):
    import os

    import psutil
    async with Host(write_config([GREETER, plugin("echo")])) as host:
        uids = {name: psutil.Process(s.worker.pid).uids().real for name, s in host.plugins.items()}
        assert os.geteuid() != 0 or (0 not in uids.values() and len(set(uids.values())) == 2)
        data_dir = os.path.join(host.config.host.state_dir, "data", "greeter")
        assert os.stat(data_dir).st_uid == uids["greeter"]
        # the data directory is the plugin's own: it can write there
        assert await host.registry.execute("greet", {"name": "x"}) == "Salom, x!"


@pytest.mark.parametrize("argv, expected", [
    (["/bin/sh", "-c", "echo hi $((40 + 2))"], "rc=0 out=hi 42"),
    (["sha256sum", "HERE"], "rc=0 out="),  # a program found on PATH, as ffmpeg would be
    (["PYTHON", "-c", "import json; print(json.dumps([1, 2]))"], "rc=0 out=[1, 2]"),  # the interpreter
])
@pytest.mark.parametrize("namespaces", [True, False], ids=["own-root", "landlock-only"])
async def test_the_subprocess_grant_runs_programs_and_nothing_runs_without_it(write_config, tmp_path, argv,
                                                                              expected, namespaces, caplog):
    # Without a root of its own (a host that is not root), the worker runs as the host's user.
    sandbox = {"namespaces": True} if namespaces else {"namespaces": False, "identity": False}
    granted = write_config([plugin("wants_everything")], host={"sandbox": sandbox, "plugins": {
        "wants_everything": {"permissions": {"subprocess": True}}}})
    async with Host(granted) as host:
        result = await host.registry.execute("wants_run", {"argv": argv})
    assert result.startswith(expected), result
    assert "Permission denied" not in result and "Operation not permitted" not in result, result
    if not namespaces:  # the reason is the config's, not a lack of privilege (it said "not root")
        assert "sandbox layer mount-namespace is not active: host.sandbox.namespaces is false" in caplog.text
    async with Host(write_config([plugin("wants_everything")], host={"sandbox": sandbox})) as host:
        refused = await host.registry.execute("wants_run", {"argv": argv})
    assert refused.startswith("PermissionError"), refused


async def test_a_plugin_uid_that_cannot_reach_its_code_is_refused_with_the_reason(write_config, tmp_path):
    """Root, no namespaces: the worker runs as a uid of its own in the host's own directory tree,
    so a directory on the way that only root may search would end in an ImportError nobody understands."""
    if os.geteuid() != 0:
        pytest.skip("plugin uids need a root host")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    shutil.copytree(Path(__file__).parent / "plugins" / "greeter", private / "greeter")
    config = write_config([GREETER], plugins_dir=str(private), host={"sandbox": {"namespaces": False}})
    async with Host(config) as host:
        error = host.plugins["greeter"].error
    assert "is not searchable by others (mode 0o700), and the plugin runs as a uid of its own" in error, error


ATTACH_AT_ONCE = r"""
import multiprocessing, os, sys
sys.path.insert(0, sys.argv[1])
from qanot_worker.disk import _attach_loop

def attach(image, barrier, held, answers):
    barrier.wait()
    try:
        number, device = _attach_loop(image)
        answers.put(("ok", number))
    except OSError as exc:
        answers.put(("failed", str(exc)))
        device = None
    held.wait()  # every device stays attached until all have answered
    if device is not None:
        os.close(device)  # autoclear: unmounted, the device detaches

images = sys.argv[2:]
barrier, held = multiprocessing.Barrier(len(images)), multiprocessing.Barrier(len(images))
answers = multiprocessing.Queue()
procs = [multiprocessing.Process(target=attach, args=(image, barrier, held, answers)) for image in images]
for proc in procs:
    proc.start()
print([answers.get(timeout=30) for _ in procs])
for proc in procs:
    proc.join()
"""


def test_disks_attach_when_many_workers_start_at_once(tmp_path):
    """Found by running the tests four at a time: LOOP_CTL_GET_FREE gives two workers starting at once
    the same free loop device, and the second to configure it failed with EBUSY (its plugin lost its
    disk). Each now asks for another device, as losetup does."""
    import subprocess
    import sys
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("attaching loop devices needs root and /dev/loop-control")
    images = []
    for i in range(12):
        image = tmp_path / f"disk{i}.img"
        image.write_bytes(b"\0" * (1 << 20))
        images.append(str(image))
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", ATTACH_AT_ONCE, str(Path(__file__).parent.parent), *images],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        answers = eval(done.stdout)  # noqa: S307 - our own child's repr of a list of tuples
        assert [kind for kind, _ in answers] == ["ok"] * len(images), answers
        assert len({number for _, number in answers}) == len(images)  # each its own device


async def test_plugins_starting_together_get_their_uids_in_one_write_of_the_table(write_config, monkeypatch):
    """A fresh state_dir: every plugin's uid is chosen at once (the table was rewritten whole once
    per plugin, which made 500 plugins' first start quadratic); the next start writes nothing."""
    import os

    import psutil

    from qanot_host.uids import UidMap
    if os.geteuid() != 0:
        pytest.skip("plugin uids need a root host")
    writes: list[dict] = []
    write = UidMap._write
    monkeypatch.setattr(UidMap, "_write", lambda self, table: (writes.append(dict(table)), write(self, table))[1])
    config = write_config([GREETER, plugin("echo"), plugin("lazy_probe")])
    async with Host(config) as host:
        uids = {name: psutil.Process(s.worker.pid).uids().real for name, s in host.plugins.items()}
    assert len(writes) == 1 and writes[0] == uids and len(set(uids.values())) == 3, (writes, uids)
    async with Host(config) as host:
        assert {name: psutil.Process(s.worker.pid).uids().real for name, s in host.plugins.items()} == uids
    assert len(writes) == 1, writes


async def test_a_write_grant_the_plugins_uid_cannot_write_is_said_at_start_as_check_says_it(write_config, tmp_path,
                                                                                            caplog):
    import os
    if os.geteuid() != 0:
        pytest.skip("plugin uids need a root host")
    roots = tmp_path / "roots_only"
    roots.mkdir(mode=0o755)
    config = write_config([GREETER], host={"plugins": {"greeter": {"permissions": {
        "filesystem": {"write": [str(roots)]}}}}})
    async with Host(config) as host:
        assert host.plugins["greeter"].state.value == "ready"
    assert f"host.plugins.greeter.permissions.filesystem.write[0]: {roots} is not writable by the plugin's uid" \
        in caplog.text


async def test_a_granted_path_that_does_not_exist_is_no_missing_layer(write_config, tmp_path):
    """`status` counted "... is granted but does not exist" among the missing sandbox layers, and
    `sandbox_missing` held the sentence (newcomer pass 58): it is among the other warnings."""
    config = write_config([plugin("wants_everything")], host={"plugins": {"wants_everything": {"permissions": {
        "filesystem": {"read": [str(tmp_path / "not-there")]}}}}})
    async with Host(config) as host:
        row = host.status()[0]
    assert row["sandbox_missing"] == [], row["sandbox_missing"]
    assert any("is granted but does not exist" in warning for warning in row["sandbox_warnings"]), row
