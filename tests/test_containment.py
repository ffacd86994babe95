"""The containment suite: every way out an independent attacker found in the first sandbox, and more
against the layers that closed them, each run from a real sandboxed worker (tests/plugins/attacker)
as root with default settings. A test fails if the attack works."""

from __future__ import annotations

import asyncio
import glob
import errno
import fcntl
import json
import os
import shutil
import resource
import signal
import site
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest

from qanot_host import ConfigError, Host, PluginState
from qanot_host.config import load_config

from .conftest import FIXTURE_PLUGINS, GREETER, grant_write, machine_address, plugin, wait_until

REPO = Path(__file__).resolve().parent.parent
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the namespaced sandbox needs root")
pytestmark = needs_root


async def attack(host: Host, attack_name: str, plugin_name: str = "attacker", /, **params) -> str:
    sup = host.plugins[plugin_name]
    assert sup.state == PluginState.READY, sup.error
    try:
        result = await sup.call(f"attack_{attack_name}", params)
    except Exception as exc:  # a typed failure of the call is containment too; the test reads it
        result = f"{type(exc).__name__}: {exc}"
    assert "ESCAPED" not in result, result
    return result


def attackers(tmp_path: Path, *names: str) -> str:
    """Copies of the attacker plugin under other names, for attacks between plugins."""
    root = tmp_path / "attackers"
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(FIXTURE_PLUGINS / "attacker" / "plugin.py", root / name / "plugin.py")
    return str(root)


async def restart(host: Host, name: str) -> None:
    sup = host.plugins[name]
    pid = sup.worker.pid
    os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: sup.state == PluginState.READY and sup.worker.pid != pid, 10, f"{name} restarted")


# ---- 1. root never follows a path a plugin can write --------------------------------------------

@pytest.mark.parametrize("disk_mb", [0, 64])
async def test_swapping_a_directory_for_a_symlink_gains_nothing(write_config, tmp_path, disk_mb):
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir(mode=0o700)
    secret = secret_dir / "shadow"
    secret.write_text("root only")
    secret.chmod(0o600)
    config = write_config([plugin("attacker", secret_dir=str(secret_dir))], host={
        "restart": {"backoff_initial": 0, "max_restarts": 100}, "limits": {"disk_mb": disk_mb}})
    async with Host(config) as host:
        for _ in range(6):  # the race runs in a thread while the host starts the next worker
            assert await attack(host, "swap_race") == "racing"
            await restart(host, "attacker")
    for path, mode in ((secret, 0o600), (secret_dir, 0o700)):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 0, mode), path


# ---- 2. one plugin's malformed schema ------------------------------------------------------------

async def test_a_malformed_schema_refuses_that_tool_only(write_config, caplog):
    async with Host(write_config([plugin("bad_schema"), GREETER])) as host:
        assert host.plugins["bad_schema"].state == PluginState.READY
        assert host.plugins["greeter"].state == PluginState.READY
        assert await host.registry.execute("schema_fine", {"a": "x"}) == "fine"
        assert await host.registry.execute("greet", {"name": "x"}) == "Salom, x!"
        refused = host.status()[0]["refused_tools"]
        assert sorted(refused) == ["schema_properties_list", "schema_property_str", "schema_required_int",
                                   "schema_too_deep"]
        json.dumps(host.registry.get_definitions())
    messages = [r.getMessage() for r in caplog.records]
    assert any("tool 'schema_required_int' is not registered: its parameters.required must be a list" in m
               for m in messages)
    assert any("'schema_too_deep' is not registered: its parameters" in m and "nested deeper than 32" in m
               for m in messages)


# ---- 3. unix sockets outside, and descriptors between plugins ------------------------------------

async def test_unix_sockets_outside_do_not_exist_for_a_plugin(write_config, tmp_path):
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram.bind(str(tmp_path / "d.sock"))
    dgram.setblocking(False)
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.bind(str(tmp_path / "s.sock"))
    stream.listen()
    stream.setblocking(False)
    os.chmod(tmp_path / "d.sock", 0o777)
    os.chmod(tmp_path / "s.sock", 0o777)
    config = write_config([plugin("attacker", dgram_socket=str(tmp_path / "d.sock"),
                                  stream_socket=str(tmp_path / "s.sock"))])
    try:
        async with Host(config) as host:
            result = await attack(host, "unix_sendto")
        assert "sendto: No such file or directory" in result and "connect: No such file or directory" in result
        with pytest.raises(BlockingIOError):
            dgram.recv(100)
        with pytest.raises(BlockingIOError):
            stream.accept()
    finally:
        dgram.close()
        stream.close()


@pytest.mark.parametrize("network", [False, True])
async def test_no_descriptor_passes_between_two_plugins(write_config, tmp_path, network):
    grant = {"permissions": {"network": True}} if network else {}
    config = write_config([plugin("a1"), plugin("a2")], plugins_dir=attackers(tmp_path, "a1", "a2"),
                          host={"plugins": {"a1": grant, "a2": grant}})
    async with Host(config) as host:
        listening = asyncio.ensure_future(attack(host, "fd_listen", "a1", name="qanot-pass", wait=2))
        await asyncio.sleep(0.3)
        sent = await attack(host, "fd_send", "a2", name="qanot-pass")
        received = await listening
    # each plugin has its own network namespace, or (with network) Landlock keeps abstract sockets apart
    assert sent.startswith("contained: sendmsg: "), sent
    assert received == "contained: nothing arrived"


# ---- 4. SysV IPC ---------------------------------------------------------------------------------

def host_sysv_keys() -> set[int]:
    keys = set()
    for kind in ("msg", "sem", "shm"):
        for line in Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]:
            keys.add(int(line.split()[0]))
    return keys


async def test_sysv_ipc_is_private_to_the_plugin_and_under_its_memory_ceiling(write_config):
    config = write_config([plugin("attacker"), GREETER], host={
        "plugins": {"attacker": {"limits": {"memory_mb": 200}}}, "restart": {"backoff_initial": 0}})
    async with Host(config) as host:
        made = await attack(host, "sysv", key=0x51A7)
        assert "msgget -1" not in made and "shmget -1" not in made, made  # it may make them: in its own namespace
        assert 0x51A7 not in host_sysv_keys()
        tcp = os.path.join(host._factory.cgroups._group("memory", "attacker"), "memory.kmem.tcp.limit_in_bytes")
        if os.path.exists(tcp):  # cgroup v1: its sockets' buffers are counted, and capped, too
            assert int(Path(tcp).read_text()) == 200 * 2**20
        result = await attack(host, "sysv", key=0x51A8, mb=2048)
        assert "worker crashed (killed by SIGKILL): out of memory, over its memory_mb=200" in result, result
        assert await host.registry.execute("greet", {"name": "x"}) == "Salom, x!"
    assert not {0x51A7, 0x51A8, 0x51A9} & host_sysv_keys()


# ---- 5. nothing outlives the host ------------------------------------------------------------------

HOST_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, {repo!r})
    from qanot_host import Host

    async def main():
        host = Host({config!r})
        await host.start()
        for plugin in ("a1", "a2"):
            sup = host.plugins[plugin]
            print(await sup.call("attack_daemon", {{}}), flush=True)
        print(await host.plugins["a1"].call("attack_block_loop", {{}}), flush=True)
        print("ready", flush=True)
        if {graceful!r}:
            await asyncio.sleep(0.5)
            await host.stop()
            print("stopped", flush=True)
            return
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


def host_processes(host_pid: int) -> list[psutil.Process]:
    """Every process in the cgroups of the host `host_pid` (its workers, their inits, and whatever they
    started, daemons that left the process tree included), and nobody else's: tests run side by side."""
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            with open(f"/proc/{proc.pid}/cgroup") as f:
                if f"/qanot-host-{host_pid}/" in f.read():
                    found.append(proc)
        except OSError:
            pass
    return found


def alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("graceful", [False, True])
async def test_nothing_started_by_a_plugin_outlives_its_host(write_config, tmp_path, graceful):
    grant = {"permissions": {"subprocess": True}}
    config = write_config([plugin("a1"), plugin("a2")], plugins_dir=attackers(tmp_path, "a1", "a2"),
                          host={"plugins": {"a1": grant, "a2": grant}})
    script = HOST_SCRIPT.format(repo=str(REPO), config=config, graceful=graceful)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline().strip() for _ in range(4)]
        assert lines == ["daemon started", "daemon started", "blocking soon", "ready"], lines
        ours = host_processes(proc.pid)
        names = sorted(p.info["name"] for p in ours)
        ours += psutil.Process(proc.pid).children(recursive=True)  # the template too
        assert names.count("qanot-daemon") == 2 and "qanot:a1" in names and "qanot:a2" in names, names
        if graceful:
            assert proc.stdout.readline().strip() == "stopped"
        else:
            await asyncio.sleep(0.3)  # the blocking handler is in time.sleep by now
            proc.kill()
        gone_at = time.monotonic() + 5.0  # at once (PDEATHSIG, the cgroup); a loaded machine may lag
        while time.monotonic() < gone_at and any(alive(p) for p in ours):
            await asyncio.sleep(0.02)
        assert not [p for p in ours if alive(p)], [(p.pid, p.info["name"]) for p in ours if alive(p)]
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    # and the cgroups go with them (the template removes them when the host dies)
    pattern = f"qanot-host-{proc.pid}"
    await wait_until(lambda: not [d for d in glob.glob("/sys/fs/cgroup/**/" + pattern, recursive=True)], 5,
                     "the host's cgroups removed")


async def test_a_host_at_start_removes_cgroups_left_by_hosts_that_are_gone(write_config):
    stale = "/sys/fs/cgroup/pids/qanot-host-999999999"
    os.makedirs(os.path.join(stale, "someplugin"), exist_ok=True)
    async with Host(write_config([GREETER])):
        assert not os.path.exists(stale)


# ---- 6. a ports grant carries TCP to those ports, nothing else ---------------------------------------

async def test_a_ports_grant_carries_tcp_to_its_ports_and_nothing_else(write_config, outside_host, caplog):
    granted = outside_host.listen()  # another machine: what a ports grant (any host) is for
    port = granted.getsockname()[1]
    own = socket.socket()  # a service of the host's own, on all its addresses
    own.bind(("0.0.0.0", 0))
    own.listen()
    own.setblocking(False)
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen()
    other.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    listen_port = free.getsockname()[1]
    free.close()
    config = write_config([plugin("attacker", granted_port=port, other_port=other.getsockname()[1],
                                  udp_port=udp.getsockname()[1], listen_port=listen_port,
                                  address=outside_host.address, own_address=machine_address(),
                                  own_port=own.getsockname()[1])],
                          host={"plugins": {"attacker": {"permissions": {"network": {
                              "ports": [port, own.getsockname()[1]]}}}}})
    try:
        async with Host(config) as host:
            assert "egress-filter" in host.status()[0]["sandbox"]
            result = await attack(host, "net_around")
            assert "granted port: connected" in result and "proto 262 connect" in result, result
            assert "granted port on the host's own address: " in result, result
            assert "listen on a host-made socket: Operation not permitted" in result, result
            assert "sndbuf after asking for 64 MiB: " in result and "67108864" not in result, result
            granted.settimeout(5)
            received = []
            for _ in range(2):  # the hijack attempt's connection, then the real one
                conn, _ = granted.accept()
                received.append(conn.recv(100))
                conn.close()
            assert b"hello granted\n" in received, received
            with pytest.raises(BlockingIOError):
                udp.recv(100)
            for listener in (other, own):
                with pytest.raises(BlockingIOError):
                    listener.accept()
            with pytest.raises(ConnectionRefusedError):  # its MPTCP listener is in its own network
                socket.create_connection(("127.0.0.1", listen_port), timeout=2).close()
            assert host.status()[0]["egress"]["denied"] >= 2, (result, host.status()[0]["egress"])
        # the denial of the host's own address on a granted port says why ("not among its grant",
        # beside "any host:P" in the grant, puzzled a tester)
        own_port = own.getsockname()[1]
        assert f":{own_port} denied: an address of this host's own (or link-local, or unspecified), which a " \
               f"\"ports\" grant (any host:{own_port}) never reaches" in caplog.text, caplog.text[-3000:]
    finally:
        for s in (granted, other, udp, own):
            s.close()


# ---- 9 and 10. the host's files and other plugins' ----------------------------------------------------

async def test_the_hosts_packages_cannot_be_imported_or_listed(write_config):
    dirs = sorted({*site.getsitepackages(), str(REPO), str(Path(psutil.__file__).parent.parent)})
    async with Host(write_config([plugin("attacker", host_site_dirs=dirs)])) as host:
        result = await attack(host, "host_packages")
        assert result.startswith("contained: no host package importable"), result
        result = await attack(host, "hidden_neighbours")
        assert result.startswith("contained: "), result


def test_a_host_in_a_virtual_environment_hides_its_base_interpreters_packages_too(tmp_path, monkeypatch):
    """The fifteenth attacker's F3: a host run from a venv laid an empty directory over the venv's
    site-packages only; the base interpreter's lib (bound whole, it holds the standard library) still
    held its site-packages, so a plugin imported flask and boto3 from there."""
    import sysconfig
    from qanot_host import sandbox_spec
    venv = tmp_path / "venv"
    (venv / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(sys, "exec_prefix", str(venv))
    monkeypatch.setattr(site, "PREFIXES", [str(venv), str(venv)])
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "-packages" not in p])
    hidden = sandbox_spec.host_site_dirs.__wrapped__()
    base = os.path.realpath(sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
                            ["purelib"])
    assert os.path.isdir(base) and base in hidden, hidden
    assert str(venv / "lib" / "python3.11" / "site-packages") in hidden


async def test_other_plugins_files_cannot_be_seen_or_watched(write_config, tmp_path):
    other = tmp_path / "state" / "data" / "greeter"
    paths = [str(other), str(other / "notes.txt"), str(FIXTURE_PLUGINS / "greeter"), str(tmp_path / "config.json")]
    async with Host(write_config([GREETER, plugin("attacker", other_paths=paths)])) as host:
        assert other.is_dir()
        result = await attack(host, "observe")
    assert result.count("stat") == result.count("No such file or directory") == len(paths), result
    assert result.count("inotify_add_watch: ENOENT") == len(paths), result


# ---- 11. the egress listener cannot be wedged -------------------------------------------------------

async def test_a_malformed_connect_gets_einval_and_the_next_works(write_config):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    config = write_config([plugin("attacker", granted_port=port)], host={
        "plugins": {"attacker": {"permissions": {"network": {"hosts": [f"127.0.0.1:{port}"]}}}}})
    try:
        async with Host(config) as host:
            result = await asyncio.wait_for(attack(host, "short_sockaddr"), 10)
        assert result.startswith("contained: connect with 4 bytes: EINVAL after 0.0"), result
    finally:
        server.close()


# ---- 12. default ceilings ------------------------------------------------------------------------------

async def test_default_ceilings_hold_without_any_limits_configured(write_config, caplog):
    config = write_config([plugin("attacker"), GREETER], host={"restart": {"backoff_initial": 0}})
    async with Host(config) as host:
        layers = host.status()[0]["sandbox"]
        assert {"memory-cgroup", "cpu-cgroup", "pids-cgroup", "disk-quota"} <= set(layers)
        assert 990 <= json.loads(await attack(host, "statvfs"))["total_mb"] <= 1024  # the default disk_mb
        result = await attack(host, "eat_memory", mb=3072)
        assert "out of memory, over its memory_mb=1024" in result, result
        await wait_until(lambda: host.plugins["attacker"].state == PluginState.READY, 10, "restart")
        began = time.monotonic()
        assert await attack(host, "flood_stderr", lines=100_000) == "flooded"
        assert await host.registry.execute("greet", {"name": "x"}) == "Salom, x!"
        elapsed = time.monotonic() - began
    flood = [r for r in caplog.records if "flood xxx" in r.getMessage()]
    assert len(flood) <= 50 * 10 + 50 * (elapsed + 1)  # log_lines_per_second=50 after a burst of 10 s
    assert any("lines of output not logged: over log_lines_per_second=50" in r.getMessage() for r in caplog.records)


async def test_lines_not_logged_are_counted_aloud_while_the_plugin_lives(write_config, caplog):
    """Attack pass 51: 20,000 lines at once were said as "1 lines of output not logged", the rest only
    when the worker ended, 67 s later."""
    config = write_config([plugin("attacker")], host={"limits": {"log_lines_per_second": 50}})
    async with Host(config) as host:
        assert await attack(host, "flood_stderr", lines=20_000) == "flooded"

        def counted() -> int:
            return sum(int(r.getMessage().split("] ")[1].split()[0]) for r in caplog.records
                       if "lines of output not logged" in r.getMessage())
        await wait_until(lambda: counted() > 10_000, 15, "the lines not logged, counted")
        assert host.plugins["attacker"].worker.exited.done() is False  # said while it lives


async def test_logging_past_the_output_rate_never_blocks_the_worker(write_config):
    """A tool failing thousands of times a second had each traceback logged to a stderr the host
    reads at log_lines_per_second: the worker's event loop blocked in write(2), missed its pings and
    was killed as unresponsive. Records that do not fit now are counted and dropped: 100 MB of
    records take the time logging takes, not the 30 s the host needs to read them, and the worker
    answers throughout."""
    config = write_config([plugin("attacker"), GREETER], host={"plugins": {"attacker": {
        "tool_timeouts": {"attack_flood_log": 20}}}})
    async with Host(config) as host:
        pid = host.plugins["attacker"].worker.pid
        result = await attack(host, "flood_log", lines=100_000)
        assert result.startswith("logged in"), result
        assert float(result.split()[2]) < 10, result
        assert json.loads(await attack(host, "statvfs"))["total_mb"] > 0
        assert host.plugins["attacker"].worker.pid == pid  # never taken for unresponsive


async def test_blank_lines_count_toward_the_output_rate(write_config):
    """Attack pass 40: a blank line cost no token, so 64 KiB reads of nothing but newlines kept the
    host splitting 65 536 lines a read on its loop as fast as the plugin wrote (loop lag p99 8.5 to
    82 ms). They cost what a line costs now, and lines past what may be logged are not split: the
    host reads a pipeful each time a line may be logged, and the plugin waits on its own writes
    (here past its call's timeout)."""
    config = write_config([plugin("attacker")], host={"plugins": {"attacker": {
        "tool_timeouts": {"attack_flood_stderr": 3}}}})
    async with Host(config) as host:
        result = await attack(host, "flood_stderr", lines=80_000_000, blank=True)  # 80 MB of newlines
    assert "timed out after 3 s" in result, result


@pytest.mark.parametrize("kind", ["short", "blank"])
async def test_a_flood_of_short_lines_is_not_split_past_what_may_be_logged(write_config, monkeypatch, kind):
    """Attack pass 62: 64 KiB of "x\\n" a read was split into 32 768 lines, each looked at, whenever
    one line could be logged: one plugin took half to three quarters of a core of the host's, two a
    whole core. A read is split into no more lines than may be logged; the rest are counted."""
    from qanot_host import output
    looked = [0]
    original = output._prepare

    def prepare(limit, line):
        looked[0] += 1
        return original(limit, line)

    monkeypatch.setattr(output, "_prepare", prepare)
    config = write_config([plugin("attacker")], host={"limits": {"log_lines_per_second": 50}, "plugins": {
        "attacker": {"tool_timeouts": {"attack_flood_stderr": 3}}}})
    async with Host(config) as host:
        result = await attack(host, "flood_stderr", lines=50_000_000, **{kind: True})  # 100 MB
        assert "timed out after 3 s" in result, result
    assert looked[0] < 5_000, looked[0]  # the burst (500), then 50 a second: millions, split whole


def _reads() -> int:
    """This process's read system calls so far."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("syscr:")).split()[1])


@pytest.mark.parametrize("how", [{}, {"piece": 1000}, {"piece": 1}, {"piece": 60_000, "ended": True}],
                         ids=["64 KiB pieces", "1000-byte pieces", "1-byte pieces", "60 KB lines"])
async def test_a_long_line_is_read_no_faster_than_the_output_rate(write_config, how):
    """Attack pass 61: the rest of a line too long to log was read and dropped at whatever speed the
    plugin wrote it, costing nothing: one plugin writing 64 KiB blocks with no newline took 69% of a
    core of the host's (16% with the plugin's own CPU capped at 5%); and (the review after it) in
    pieces under a KiB each read cost nothing still, and a line that ended was charged for its logged
    head only. Each KiB read, or part of one, costs what a line costs now, so the host stops reading
    and the plugin's writes wait."""
    config = write_config([plugin("attacker")], host={"limits": {"log_lines_per_second": 50}})
    async with Host(config) as host:
        began, reads = time.thread_time(), _reads()  # the host's loop runs on this thread
        result = await attack(host, "flood_endless", seconds=2, **how)
        spent, reads = time.thread_time() - began, _reads() - reads
        assert await host.registry.execute("attack_identity", {}), "the plugin answers on"
    written = int(result.split()[1])
    # 50 lines a second, a 10 s burst: ~0.6 MB taken, and what the host's stream buffers (128 KiB; 2 MiB
    # before attack pass 63): 0.7-1.1 MB; before, GBs, 14 MB and 8 MB
    assert written < 2 * 2**20, result
    # and 1-byte pieces were each a read, free until a line's 68 KiB cut, 2 MiB read ahead of the pump:
    # a core-second a stream (attack pass 63); the host's loop spent 0.04-0.14 s of these 2 s here
    assert spent < 0.5, spent
    # nor read it in many small reads: 1-byte pieces were a read each, 4 200 a second a stream (attack
    # pass 64): 9 353 reads in these 2 s before, ~650 now (the burst's 500, then 50 a second)
    assert reads < 2_000, reads


async def test_the_disk_ceiling_is_the_kernels(write_config):
    config = write_config([plugin("attacker")], host={"limits": {"disk_mb": 64}})
    async with Host(config) as host:
        result = await attack(host, "fill_disk", mb=4096)
    assert result.startswith("contained: No space left on device after"), result
    assert int(result.split("after ")[1].split()[0]) <= 64


async def test_each_disk_is_a_copy_of_its_own_and_the_empty_one_stays_empty(write_config):
    """New disks are sparse copies of one empty file system per size (mkfs.ext4 runs once): what
    one plugin writes is in its copy only, and the next plugin's disk starts empty."""
    config = write_config([plugin("attacker"), GREETER], host={"limits": {"disk_mb": 64}})
    async with Host(config) as host:
        disks = Path(host.config.host.state_dir) / "disks"
        template = disks / "templates" / f"empty-{64 * 2**20}.img"
        empty = template.read_bytes()
        result = await attack(host, "fill_disk", mb=4096)
        assert result.startswith("contained: No space left on device after"), result
        assert template.read_bytes() == empty
        assert (disks / "attacker.img").stat().st_blocks > 20 * (disks / "greeter.img").stat().st_blocks


async def test_a_reload_grows_a_raised_disk_and_lets_a_removed_plugins_disk_go(write_config, caplog):
    """Attack pass 33: a disk_mb raised by a reload was ignored without a word (the fork server kept
    the disk attached), a lowered one too, and a plugin removed by a reload kept its loop device
    until the host stopped. Now the reload lets those disks go: the raised one is grown, and said."""
    config = write_config([plugin("attacker"), GREETER], host={"limits": {"disk_mb": 64}})

    def write(plugins, disk_mb):
        data = json.loads(Path(config).read_text())
        data["plugins"], data["host"]["limits"]["disk_mb"] = plugins, disk_mb
        Path(config).write_text(json.dumps(data))

    async with Host(config) as host:
        disks = Path(host.config.host.state_dir) / "disks"
        assert 40 <= json.loads(await attack(host, "statvfs"))["total_mb"] <= 64
        assert _attached(disks / "greeter.img")
        write([plugin("attacker")], 128)  # greeter removed, the disk raised
        await host.reload()
        assert 100 <= json.loads(await attack(host, "statvfs"))["total_mb"] <= 128
        await wait_until(lambda: not _attached(disks / "greeter.img"), 5, "the removed plugin's disk to go")
        write([plugin("attacker")], 32)  # lowered: kept, and said
        await host.reload()
        assert 100 <= json.loads(await attack(host, "statvfs"))["total_mb"] <= 128
    assert "plugin attacker: its disk stays 128 MB though disk_mb is 32: a disk is never shrunk" in caplog.text


async def test_an_idle_plugin_holds_no_disk_and_finds_its_files_again(write_config):
    """An idle-stopped worker's disk stayed attached by the fork server for the host's life (a loop
    device, a mount and a journal thread for each plugin once used): it is let go at the idle stop,
    attached again at the next call, with what the plugin wrote."""
    config = write_config([plugin("attacker")], host={"limits": {"disk_mb": 64}, "idle_timeout": 0.5})
    async with Host(config) as host:
        image = Path(host.config.host.state_dir) / "disks" / "attacker.img"
        assert await attack(host, "fallocate", where=".", mb=30) == "allocated 30 MB"
        assert _attached(image)
        attacker = host.plugins["attacker"]
        await wait_until(lambda: attacker.state == PluginState.IDLE, 10, "the idle stop")
        await wait_until(lambda: not _attached(image), 10, "the idle plugin's disk to go")
        result = await attacker.call("attack_fill_disk", {"mb": 4096})  # its next call starts a worker
        assert result.startswith("contained: No space left on device after"), result
        assert int(result.split("after ")[1].split()[0]) <= 64 - 30  # the 30 MB are still there
        assert _attached(image)


async def test_a_failed_plugin_holds_no_disk(write_config):
    """A plugin that failed at its start (its setup() raising, its code not loading), or whose
    restarts were given up, kept its disk's loop device and mount until the host stopped (newcomer
    pass 56): it holds nothing until a reload tries it again, and a reload that does finds its disk."""
    config = write_config([plugin("setup_fails"), plugin("syntax_error"), plugin("misbehave"), GREETER],
                          host={"limits": {"disk_mb": 64}, "restart": {"max_restarts": 0}})
    async with Host(config) as host:
        disks = Path(host.config.host.state_dir) / "disks"
        assert host.plugins["setup_fails"].state == PluginState.FAILED
        assert host.plugins["syntax_error"].state == PluginState.FAILED
        for name in ("setup_fails", "syntax_error"):
            await wait_until(lambda name=name: not _attached(disks / f"{name}.img"), 10, f"{name}'s disk to go")
        assert _attached(disks / "misbehave.img") and _attached(disks / "greeter.img")
        await host.registry.execute("mb_crash", {"how": "exit"})
        await wait_until(lambda: host.plugins["misbehave"].state == PluginState.FAILED, 10, "misbehave given up")
        await wait_until(lambda: not _attached(disks / "misbehave.img"), 10, "misbehave's disk to go")
        assert _attached(disks / "greeter.img")
        await host.reload()
        assert host.plugins["misbehave"].state == PluginState.READY
        assert (await host.registry.execute("mb_ok", {})).startswith("ok ")
        assert _attached(disks / "misbehave.img")


async def test_a_disk_is_never_attached_twice_by_two_hosts(write_config):
    """Attack pass 37 (high): a template read which images were attached once, at its first disk; a
    standalone call beside a running host attached a lazy plugin's disk the host had not attached
    yet, and the host's first call to it attached it again: two ext4 instances on one image, which
    e2fsck then found corrupt. The image's lock now goes with the loop device that holds it."""
    # echo, eager, has the host's launcher attach a disk (and look at the others) before the standalone
    config = write_config([plugin("echo"), GREETER], host={"limits": {"disk_mb": 16}, "plugins": {
        "greeter": {"activation": "lazy"}}})
    async with Host(config):
        pass  # greeter's tools are cached: the next host does not start it (nor attach its disk)
    async with Host(config) as host:
        image = Path(host.config.host.state_dir) / "disks" / "greeter.img"
        assert _attachments(image) == 0
        standalone = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "qanot_host", "call", "--standalone", "--config", config, "greeter_sleep",
            '{"seconds": 4}', stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        await wait_until(lambda: _attachments(image) == 1, 30, "the standalone host's disk")
        most = 1

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, _attachments(image))
                await asyncio.sleep(0.005)
        watching = asyncio.ensure_future(watch())
        try:
            # its lazy worker waits 3 s for the disk, then does not start (attack pass 39: it ran
            # without its disk, its files elsewhere, no ceiling)
            refused = json.loads(await host.registry.execute("greet", {"name": "x"}))["error"]
            assert "attached elsewhere" in refused and "does not start without its disk" in refused
            out, err = await standalone.communicate()
            assert standalone.returncode == 0 and out.decode().strip() == "slept 4", err.decode()
            assert await host.registry.execute("greet", {"name": "x"}) == "Salom, x!"  # free again
            assert "disk-quota" in host.plugins["greeter"].worker.report.sandbox_layers
            await asyncio.sleep(0.5)
        finally:
            watching.cancel()
        assert most == 1


def test_a_disk_the_host_could_not_make_is_refused_in_the_config_naming_its_key(tmp_path):
    """Attack pass 46: a disk_mb of 99999999999 (or 2-8 MB: no room for the journal) passed check,
    and at the start the image could not be made; a plugin name of 252 bytes made an image name
    over 255. Each ran its plugin without a disk, on the host's own, with no ceiling."""
    from qanot_host.config import parse_config
    for raw, fragment in [
        ({"host": {"limits": {"disk_mb": 99999999999}}}, "host.limits.disk_mb: Expected `int` <= 16777215"),
        ({"host": {"plugins": {"a": {"limits": {"disk_mb": 8}}}}},
         "host.plugins.a.limits: disk_mb: 8 MB is too small for a disk"),
        ({"plugins": [{"name": "a" * 201}]}, "plugins[0].name: a name of 201 bytes"),
    ]:
        data = {"plugins": [{"name": "a"}], **raw}
        with pytest.raises(ConfigError) as caught:
            parse_config(json.dumps(data), str(tmp_path / "config.json"))
        assert fragment in str(caught.value), caught.value
    parse_config(json.dumps({"plugins": [{"name": "a" * 200}], "host": {"limits": {"disk_mb": 16}}}),
                 str(tmp_path / "config.json"))


async def test_a_plugin_whose_disk_cannot_be_made_or_attached_does_not_start_without_it(write_config):
    """Attack pass 46: a disk that could not be made, or attached, left the plugin on a plain
    directory of the host's disk, with no ceiling, said only in a warning (and its files on the
    disk out of sight). Now that plugin fails to start, saying why; the others do not notice."""
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control") or not shutil.which("mkfs.ext4"):
        pytest.skip("disks need root, loop devices and mkfs.ext4")
    config = write_config([plugin("attacker"), plugin("echo"), GREETER], host={"limits": {"disk_mb": 16}, "plugins": {
        "echo": {"limits": {"disk_mb": 32}}}})
    disks = Path(load_config(config).host.state_dir) / "disks"
    (disks / "templates" / f"empty-{32 * 2**20}.img").mkdir(parents=True)  # echo's image cannot be made
    with open(disks / "attacker.img", "wb") as image:  # attacker's is no file system: it will not mount
        image.truncate(16 * 2**20)
    async with Host(config) as host:
        attacker, echo = host.plugins["attacker"], host.plugins["echo"]
        await wait_until(lambda: attacker.state == echo.state == PluginState.FAILED, 30, "both to fail")
        assert "its disk could not be attached" in attacker.error and "does not start without it" in attacker.error
        assert "its disk (32 MB, limits.disk_mb) could not be made" in echo.error, echo.error
        assert "does not start without it" in echo.error
        assert host.plugins["greeter"].state == PluginState.READY
        assert "disk-quota" in host.plugins["greeter"].worker.report.sandbox_layers


def test_a_disk_failing_on_its_own_is_a_refusal_and_a_machine_without_disks_a_missing_layer(tmp_path):
    """Which attach failures refuse the plugin: its own image's (no file system on it), not a
    machine's that cannot attach disks at all (no right to loop devices or mounts: a container),
    where every plugin runs on a plain directory and the disk-quota layer is reported missing."""
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("attaching loop devices needs root and /dev/loop-control")
    import tempfile
    place = Path(tempfile.mkdtemp(dir="/var/tmp"))  # where nobody may reach the image: its step is the loop devices
    os.chmod(place, 0o755)
    image = place / "garbage.img"
    with open(image, "wb") as f:
        f.truncate(16 * 2**20)
    os.chmod(image, 0o666)
    code = textwrap.dedent(f"""
        import os, sys
        from qanot_worker.disk import DiskError, attach_disk
        if sys.argv[1] == "nobody":
            os.setgroups([]); os.setgid(65534); os.setuid(65534)
        try:
            attach_disk({str(image)!r}, 0)
        except DiskError as exc:
            print(exc.setting())
        """)
    outcomes = {who: subprocess.run([sys.executable, "-c", code, who], capture_output=True, text=True, timeout=30,
                                    cwd=REPO, check=True).stdout.strip() for who in ("root", "nobody")}
    shutil.rmtree(place)
    assert outcomes["root"].startswith("failed:cannot attach"), outcomes  # ext4 refuses it: this image
    assert outcomes["nobody"].startswith("error:cannot attach"), outcomes  # no right to loop devices: the machine
    assert "this machine cannot attach disks: loop devices: Permission denied" in outcomes["nobody"], outcomes


def _attachments(image: Path) -> int:
    st = image.stat()
    count = 0
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            other = os.stat(Path(backing).read_text().strip().removesuffix(" (deleted)"))
        except OSError:
            continue
        count += (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)
    return count


def _attached(image: Path) -> bool:
    st = image.stat()
    for backing in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            other = os.stat(Path(backing).read_text().strip().removesuffix(" (deleted)"))
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


# ---- further attacks, on the layers that closed the ones above --------------------------------------

FURTHER = {
    # its init's root and namespaces are the host's: it is not there (hidepid)
    "init_proc": "/proc/1/root/etc/hostname: ENOENT",
    "namespaces": "unshare(USER): EPERM",
    "devices": "loop0: ENOENT",
    "write_readonly": "EROFS",
    "proc_sys": "/proc/sysrq-trigger: E",
    "sockets": "unix: EPERM",
    "tmpfs": "/tmp: No space left on device after 6",
    "rename_data": "rename: Permission denied",
    "trace_init": "ptrace(ATTACH, 1): EPERM; process_vm_readv(1): EPERM; pidfd_open(1): EPERM",
}


@pytest.mark.parametrize("name", sorted(FURTHER))
async def test_further_attack_is_contained(write_config, name):
    async with Host(write_config([plugin("attacker"), GREETER])) as host:
        result = await attack(host, name)
        assert result.startswith("contained: ") and FURTHER[name] in result, result
        assert await host.registry.execute("greet", {"name": "x"}) == "Salom, x!"


async def test_signals_reach_nothing_outside_the_plugins_namespace(write_config, tmp_path):
    config = write_config([plugin("attacker", host_pids=[os.getpid(), 1]), GREETER],
                          host={"plugins": {"attacker": {"permissions": {"subprocess": True}}}})
    async with Host(config) as host:
        template = next(iter(host._factory.launcher.helper_pids()))
        greeter = host.plugins["greeter"].worker.pid
        result = await attack(host, "signals")
        assert "kill(1, SIGKILL): " in result and "kill(-1, SIGKILL): " in result, result
        assert psutil.pid_exists(template) and psutil.pid_exists(greeter)
        assert await host.registry.execute("greet", {"name": "x"}) == "Salom, x!"


async def test_the_worker_is_nobody_in_a_world_of_its_own(write_config):
    async with Host(write_config([plugin("attacker"), GREETER])) as host:
        me = json.loads(await attack(host, "identity"))
        greeter_uid = psutil.Process(host.plugins["greeter"].worker.pid).uids().real
        uid_base = host.config.host.sandbox.uid_base  # QANOT_HOST_UID_BASE's, where it is set
    assert uid_base <= me["uid"] < uid_base + 4000 and me["uid"] != greeter_uid
    assert me["CapEff"] == me["CapPrm"] == "0000000000000000"
    assert (me["NoNewPrivs"], me["Seccomp"], me["pid"], me["procs"]) == ("1", "2", 2, [2])  # its init: hidden
    # the system's programs, read-only; no more (but the top directory of this checkout, which holds the
    # plugin's own directory and the worker runtime, when the checkout is under one of those probed)
    checkout_top = "/" + str(REPO).split("/")[1]
    assert [d for d in me["exists"] if d != checkout_top] == ["/usr/bin/python3"], me["exists"]


def assert_devices_work_and_nothing_more(seen: dict) -> None:
    devices = {name: ["crw-rw-rw-", 1, minor] for name, minor in
               (("null", 3), ("zero", 5), ("full", 7), ("random", 8), ("urandom", 9))}
    links = {name: "lrwxrwxrwx" for name in ("fd", "stdin", "stdout", "stderr")}
    assert seen["dev"] == {**devices, **links, "shm": "drwxrwxrwt"}, seen["dev"]
    assert seen["done"].pop("chmod null") in ("EROFS", "EPERM")  # a node made read-only / the host's, root's
    assert seen["done"] == {"write null": 100, "write full": "ENOSPC", "read zero": "000000", "read urandom": 16,
                            "exec zero": "EPERM", "mknod": "EPERM", "create": "EACCES"}


async def test_the_workers_dev_holds_its_five_devices_working_and_nothing_it_can_change(write_config):
    async with Host(write_config([plugin("attacker")])) as host:
        assert_devices_work_and_nothing_more(json.loads((await attack(host, "dev_nodes")).removeprefix("contained: ")))


HOST_WITHOUT_MKNOD = r"""
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
from qanot_host import Host
async def main():
    async with Host(sys.argv[2]) as host:
        print(await host.registry.execute("attack_dev_nodes", {}))
        print(json.dumps(host.plugins["attacker"].worker.report.sandbox_warnings))
asyncio.run(main())
"""


async def test_nothing_in_the_workers_root_is_the_hosts_dev_null_to_watch(write_config):
    """inotify on a node shared with the host tells of every open and write of it, the host's and every
    plugin's: proc's masked files were the host's /dev/null, bound (review 68)."""
    async with Host(write_config([plugin("attacker")])) as host:
        watching = asyncio.ensure_future(attack(host, "watch_shared_nodes", seconds=1.5))
        await asyncio.sleep(0.5)
        for _ in range(20):
            with open("/dev/null", "w") as null:
                null.write("x")
        seen = json.loads((await watching).removeprefix("contained: "))
    assert seen == {"/dev/null": 0, "/proc/diskstats": 0, "/proc/partitions": 0}


async def test_a_root_host_without_cap_mknod_binds_the_hosts_devices_instead(write_config):
    """The devices are made with mknod; root in a container may lack CAP_MKNOD: the same /dev, bound."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    config = write_config([plugin("attacker")])
    proc = await asyncio.create_subprocess_exec("setpriv", "--bounding-set", "-mknod", sys.executable, "-c",
                                                HOST_WITHOUT_MKNOD, str(REPO), config,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    result, warnings = out.decode().strip().splitlines()
    assert_devices_work_and_nothing_more(json.loads(result.removeprefix("contained: ")))
    assert ("its /dev holds the host's device nodes, bound (mknod: Operation not permitted): inotify on them sees "
            "every process's opens and writes of them") in json.loads(warnings)


# Calls the filter lets through, and what the kernel answers them with these arguments: a jump of the
# filter landing one instruction off would refuse them, or let a denied one through.
ALLOWED_ANSWERS = {3: "EBADF", 32: "EBADF", 39: "ok", 74: "EBADF", 81: "EBADF"}  # close, dup, getpid, fsync, fchdir
# Named here, not taken from the deny-list: what a worker reached through them (attack pass 68). ustat:
# another plugin's disk by device number, how full, live; open_tree_attr: the mount API's latest.
MACHINE_WIDE = {136: "ustat", 139: "sysfs", 467: "open_tree_attr"}
RAW_CALLS_LEFT_OUT = {57, 58}  # fork and vfork: let through, vfork would run on the worker's own stack


@pytest.mark.parametrize("subprocess", [False, True], ids=["no-subprocess", "subprocess"])
async def test_every_call_on_the_deny_list_is_refused_from_a_worker(write_config, subprocess):
    from qanot_worker import seccomp
    denied = {**seccomp.DENY, **(seccomp.DENY_WITH_SUBPROCESS if subprocess else seccomp.DENY_WITHOUT_SUBPROCESS)}
    numbers = sorted(set(denied.values()) - RAW_CALLS_LEFT_OUT)
    grant = {"plugins": {"attacker": {"permissions": {"subprocess": True}}}} if subprocess else {}
    async with Host(write_config([plugin("attacker"), GREETER], host=grant)) as host:
        result = await attack(host, "syscalls", numbers=[*numbers, *ALLOWED_ANSWERS, seccomp.CLONE3, seccomp.OPENAT2,
                                                         *MACHINE_WIDE])
        answers = {int(number): answer for number, answer in json.loads(result.removeprefix("contained: ")).items()}
        assert await host.registry.execute("greet", {"name": "x"}) == "Salom, x!"
    assert {number: answers[number] for number in numbers if answers[number] != "EPERM"} == {}
    assert {number: answers[number] for number in ALLOWED_ANSWERS} == ALLOWED_ANSWERS
    assert (answers[seccomp.CLONE3], answers[seccomp.OPENAT2]) == ("ENOSYS", "ENOSYS")
    assert {number: answers[number] for number in MACHINE_WIDE} == dict.fromkeys(MACHINE_WIDE, "EPERM")


# ---- the second independent pass: what got through the namespaced sandbox ------------------------

@pytest.fixture
def two_servers():
    """A granted service and a secret one, both on loopback."""
    servers = []
    for _ in range(2):
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        server.setblocking(False)
        servers.append(server)
    yield [s.getsockname()[1] for s in servers], servers
    for server in servers:
        server.close()


@pytest.mark.parametrize("attack_name", ["egress_swap", "family_flip"])
async def test_the_egress_gate_never_hands_a_decision_back_to_the_kernel(write_config, two_servers, attack_name):
    (granted, secret), servers = two_servers
    # the attack's 2000 connects block the worker's loop: on a loaded machine, longer than a ping may wait
    config = write_config([plugin("attacker", granted_port=granted, secret_port=secret)], host={
        "ping_interval": 300, "call_timeout": 120,
        "plugins": {"attacker": {"permissions": {"network": {"hosts": [f"127.0.0.1:{granted}"]}}}}})
    async with Host(config) as host:
        result = await attack(host, attack_name, attempts=2000)
        assert result.startswith("contained: 2000 "), result
        if attack_name == "egress_swap":
            assert "bind: Permission denied" in result  # Landlock: no TCP bind when the host connects
    with pytest.raises(BlockingIOError):
        servers[1].accept()  # the secret service saw nothing


def test_a_grant_inside_a_directory_a_plugin_may_write_is_refused(tmp_path):
    from qanot_host import ConfigError
    from qanot_host.config import parse_config
    share = str(tmp_path / "share")
    for plugins, fragment in [
        ({"a": {"write": [share], "read": [share + "/models/v1"]}},
         f"host.plugins.a.permissions.filesystem.read[0]: {share}/models/v1 is inside {share}, which plugin a may write"),
        ({"a": {"write": [share]}, "b": {"read": [share + "/inbox"]}},
         f"host.plugins.b.permissions.filesystem.read[0]: {share}/inbox is inside {share}, which plugin a may write"),
        ({"a": {"read": [str(tmp_path)]}}, "overlap: a plugin may not be granted the host's own files"),
    ]:
        raw = {"plugins": [{"name": n} for n in plugins], "host": {"state_dir": str(tmp_path / "state"), "plugins": {
            n: {"permissions": {"filesystem": g}} for n, g in plugins.items()}}}
        with pytest.raises(ConfigError) as caught:
            parse_config(json.dumps(raw), str(tmp_path / "config.json"))
        assert fragment in str(caught.value), caught.value


def test_a_workspace_dir_that_overlaps_the_hosts_own_files_or_plugins_code_is_refused(tmp_path):
    """Each plugin may write workspace_dir/NAME: with workspace_dir the state_dir, a plugin named `envs`
    owned the host's dependency environments and planted code in another plugin's (attack pass 49)."""
    from qanot_host import ConfigError
    from qanot_host.config import parse_config
    state, plugins = tmp_path / "state", tmp_path / "plugins"
    (tmp_path / "alias").symlink_to(state)
    for workspace, also, fragment in [
        (state, {}, f"workspace_dir: {state} and host.state_dir ({state}) overlap"),
        (state / "ws", {}, f"workspace_dir: {state}/ws and host.state_dir ({state}) overlap"),
        (tmp_path, {}, f"workspace_dir: {tmp_path} and host.state_dir ({state}) overlap"),
        (tmp_path / "alias", {}, f"workspace_dir: {tmp_path}/alias and host.state_dir ({state}) overlap"),
        (tmp_path / "shared", {"plugins_dir": str(tmp_path / "shared" / "plugins")},
         f"workspace_dir: {tmp_path}/shared and plugins_dir ({tmp_path}/shared/plugins) overlap"),
        (plugins / "ws", {}, f"workspace_dir: {plugins}/ws and plugins_dir ({plugins}) overlap"),
        (tmp_path / "ws", {"host": {"state_dir": str(tmp_path / "ws" / "state")}},  # a plugin named state
         f"workspace_dir: {tmp_path}/ws and host.state_dir ({tmp_path}/ws/state) overlap"),
    ]:
        raw = {"plugins": [{"name": "envs"}], "plugins_dir": str(plugins), "workspace_dir": str(workspace),
               "host": {"state_dir": str(state)}}
        raw.update(also)
        with pytest.raises(ConfigError) as caught:
            parse_config(json.dumps(raw), str(tmp_path / "config.json"))
        assert fragment in str(caught.value), caught.value
    for workspace, state_dir in ((tmp_path / "workspace", state),  # apart: fine
                                 (tmp_path / "ws", tmp_path / "ws" / ".qanot-host")):  # no plugin's place has a dot
        raw = {"plugins": [], "plugins_dir": str(plugins), "workspace_dir": str(workspace),
               "host": {"state_dir": str(state_dir)}}
        parse_config(json.dumps(raw), str(tmp_path / "config.json"))


def test_grants_are_checked_with_links_followed_and_against_places_and_the_hosts_code(tmp_path):
    """Attack pass 50: with plugins_dir named through a symlink, a write grant of its real path passed
    and one plugin rewrote another's plugin.py; read grants of another plugin's place, of the whole
    workspace_dir and of plugins_dir passed; write grants of the host's own packages passed."""
    import site
    from qanot_host import ConfigError
    from qanot_host.config import parse_config
    real = tmp_path / "real-plugins"
    real.mkdir()
    (tmp_path / "plugins").symlink_to(real)
    workspace = tmp_path / "workspace"
    for kind, path, fragment in [
        ("write", real, "a plugin may not be granted plugins' code"),
        ("read", real / "victim", "a plugin may not be granted plugins' code"),
        ("read", workspace / "victim", "plugin victim's own place in the workspace, overlap"),
        ("read", workspace, "plugin victim's own place in the workspace, overlap"),
        ("write", workspace / "spy" / "sub", "inside " + str(workspace / "spy") + ", its own place"),
        ("write", site.getsitepackages()[0], "a plugin may not write code or settings the host and every worker run"),
        ("write", sys.prefix, "a plugin may not write code or settings the host and every worker run"),
        ("write", "/usr/lib", "a plugin may not write code or settings the host and every worker run"),
    ]:
        raw = {"plugins": [{"name": "spy"}, {"name": "victim"}], "plugins_dir": str(tmp_path / "plugins"),
               "workspace_dir": str(workspace), "host": {"state_dir": str(tmp_path / "state"), "plugins": {
                   "spy": {"permissions": {"filesystem": {kind: [str(path)]}}}}}}
        with pytest.raises(ConfigError) as caught:
            parse_config(json.dumps(raw), str(tmp_path / "config.json"))
        assert f"host.plugins.spy.permissions.filesystem.{kind}[0]: " in str(caught.value), caught.value
        assert fragment in str(caught.value), (path, caught.value)
    if site.ENABLE_USER_SITE:  # the host imports from it at every start: the review
        raw = {"plugins": [{"name": "spy"}], "workspace_dir": str(workspace), "host": {
            "state_dir": str(tmp_path / "state"), "plugins": {"spy": {"permissions": {"filesystem": {
                "write": [site.getusersitepackages()]}}}}}}
        with pytest.raises(ConfigError, match="a plugin may not write code or settings"):
            parse_config(json.dumps(raw), str(tmp_path / "config.json"))
    # elsewhere, its own place, or beside qanot-host's package (a checkout's other directories): fine
    beside = Path(__file__).resolve().parent.parent / "not-code"
    raw = {"plugins": [{"name": "spy"}, {"name": "victim"}], "plugins_dir": str(tmp_path / "plugins"),
           "workspace_dir": str(workspace), "host": {"state_dir": str(tmp_path / "state"), "plugins": {
               "spy": {"permissions": {"filesystem": {"read": [str(tmp_path / "shared")],
                                                      "write": [str(workspace / "spy"), str(beside)]}}}}}}
    parse_config(json.dumps(raw), str(tmp_path / "config.json"))


def test_a_grant_written_with_a_leading_double_slash_is_the_same_path(tmp_path):
    """The review of 11-27: normpath keeps a leading '//', and //PLUGINS_DIR passed as another path."""
    from qanot_host import ConfigError
    from qanot_host.config import parse_config
    for kind, path, fragment in [("write", f"/{tmp_path}/plugins", "a plugin may not be granted plugins' code"),
                                 ("read", f"//{tmp_path}/state", "a plugin may not be granted the host's own files")]:
        raw = {"plugins": [{"name": "a"}], "plugins_dir": str(tmp_path / "plugins"),
               "workspace_dir": str(tmp_path / "workspace"), "host": {"state_dir": str(tmp_path / "state"), "plugins": {
                   "a": {"permissions": {"filesystem": {kind: [path]}}}}}}
        with pytest.raises(ConfigError) as caught:
            parse_config(json.dumps(raw), str(tmp_path / "config.json"))
        assert fragment in str(caught.value), caught.value


def test_the_hosts_proc_sys_and_dev_are_never_granted(tmp_path):
    """Attack pass 49: a read grant of /proc was bound over the worker's own and showed the plugin every
    process of the machine and its command line. Nor a device node (attack pass 51: /dev/ttyS0 passed
    check and then failed the plugin's start)."""
    from qanot_host import ConfigError
    from qanot_host.config import parse_config
    (tmp_path / "proc-link").symlink_to("/proc")
    for kind, path, fragment in [("read", "/proc", "the host's /proc and /sys are never a plugin's"),
                                 ("read", "/proc/1", "/proc/1 is not granted"),
                                 ("read", str(tmp_path / "proc-link"), "the host's /proc and /sys"),
                                 ("read", "/sys/fs/cgroup", "the host's /proc and /sys"),
                                 ("write", "/dev", "the host's /dev and its device nodes are never a plugin's"),
                                 ("read", "/dev/ttyS0", "the host's /dev and its device nodes"),
                                 ("write", "/dev/shm", "/dev/shm is not granted")]:
        raw = {"plugins": [{"name": "a"}], "host": {"state_dir": str(tmp_path / "state"), "plugins": {
            "a": {"permissions": {"filesystem": {kind: [path]}}}}}}
        with pytest.raises(ConfigError) as caught:
            parse_config(json.dumps(raw), str(tmp_path / "config.json"))
        assert f"host.plugins.a.permissions.filesystem.{kind}[0]: " in str(caught.value), caught.value
        assert fragment in str(caught.value), caught.value
    if os.geteuid() == 0:  # a bind mount of state_dir, or of a directory in it, elsewhere is that directory
        root = tmp_path / "host"
        state = root / "state"  # not made yet: reached through a bind mount of the directory above
        (root / "workspace").mkdir(parents=True)
        mounts = []
        try:
            for name, source in (("alias-root", root), ("alias-ws", root / "workspace")):
                (tmp_path / name).mkdir()
                subprocess.run(["mount", "--bind", str(source), str(tmp_path / name)], check=True)
                mounts.append(tmp_path / name)
            for grant, fragment in [
                (tmp_path / "alias-root" / "state" / "runtime", "a plugin may not be granted the host's own files"),
                (tmp_path / "alias-root" / "state" / "data", "a plugin may not be granted the host's own files"),
                (tmp_path / "alias-ws" / "b", "plugin b's own place in the workspace, overlap"),  # made at b's start
            ]:
                raw = {"plugins": [{"name": "a"}, {"name": "b"}], "workspace_dir": str(root / "workspace"),
                       "host": {"state_dir": str(state), "plugins": {
                           "a": {"permissions": {"filesystem": {"read": [str(grant)]}}}}}}
                with pytest.raises(ConfigError) as caught:
                    parse_config(json.dumps(raw), str(tmp_path / "config.json"))
                assert fragment in str(caught.value), (grant, caught.value)
        finally:
            for mount in reversed(mounts):
                subprocess.run(["umount", str(mount)], check=True)
    # config.json is the host's own (model keys; its grants, rewritten, at a reload): the review
    (tmp_path / "etc").mkdir()
    for kind, grant in (("read", tmp_path / "etc" / "config.json"), ("write", tmp_path / "etc")):
        raw = {"plugins": [{"name": "a"}], "host": {"state_dir": str(tmp_path / "state"), "plugins": {
            "a": {"permissions": {"filesystem": {kind: [str(grant)]}}}}}}
        with pytest.raises(ConfigError, match=r"and config.json \("):
            parse_config(json.dumps(raw), str(tmp_path / "etc" / "config.json"))


async def test_a_grant_through_a_symlink_refuses_the_plugin_never_binds_the_target(write_config, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    config = write_config([plugin("attacker"), GREETER], host={
        "plugins": {"attacker": {"permissions": {"filesystem": {"read": [str(tmp_path / "link")]}}}}})
    async with Host(config) as host:
        sup = host.plugins["attacker"]
        assert sup.state == PluginState.FAILED
        assert "the plugin's root could not be built" in sup.error
        assert "goes through a symbolic link" in sup.error
        assert host.plugins["greeter"].state == PluginState.READY


async def test_a_schema_that_would_decode_to_gigabytes_is_refused_before_decoding(write_config):
    rss_before = psutil.Process().memory_info().rss
    began = time.monotonic()
    async with Host(write_config([plugin("attacker", schema_bomb=4_000_000), GREETER])) as host:
        took = time.monotonic() - began
        assert "attack_schema_bomb" in host.status()[0]["refused_tools"]
        assert await host.registry.execute("greet", {"name": "x"}) == "Salom, x!"
    grown = (psutil.Process().memory_info().rss - rss_before) / 2**20
    assert grown < 100 and took < 10, (grown, took)


async def test_schemas_under_the_per_tool_cap_are_bounded_in_total(write_config):
    rss_before = psutil.Process().memory_info().rss
    async with Host(write_config([plugin("attacker", schema_spread=[200, 60_000]), GREETER])) as host:
        refused = host.status()[0]["refused_tools"]
        assert 190 < len(refused) < 200, len(refused)  # those past the 256 KiB total
        assert await host.registry.execute("spread_0", {}) == "spread"
        assert await host.registry.execute("greet", {"name": "x"}) == "Salom, x!"
    assert (psutil.Process().memory_info().rss - rss_before) / 2**20 < 100


async def test_a_sandbox_report_forged_by_plugin_code_is_not_what_the_host_shows(write_config, caplog):
    async with Host(write_config([plugin("forger"), GREETER])) as host:
        status = {row["plugin"]: row for row in host.status()}
        assert status["forger"]["state"] == "ready"
        assert "FORGED-layer-quantum-shield" not in status["forger"]["sandbox"]
        assert status["forger"]["sandbox"] == status["greeter"]["sandbox"]
    assert not any("\x1b" in r.getMessage() or "plugin bank ready" in r.getMessage() for r in caplog.records)


async def test_an_unknown_tool_never_makes_the_host_parse_plugin_code(write_config, tmp_path):
    extra = tmp_path / "extra"
    (extra / "astbomb").mkdir(parents=True)
    (extra / "astbomb" / "plugin.py").write_text(
        "from qanot.plugins.base import Plugin, tool\n"
        "class QanotPlugin(Plugin):\n"
        "    def get_tools(self):\n        return self._collect_tools()\n"
        "    async def setup(self, config):\n        raise RuntimeError('failing on purpose')\n"
        "    @tool(name='bomb_tool', description='x')\n"
        "    async def bomb(self, params):\n        return 'x'\n")
    for i in range(3):  # megabytes of code whose syntax tree is gigabytes
        (extra / "astbomb" / f"filler{i}.py").write_text("x = (" + "a," * 1_500_000 + ")\n")
    shutil.copytree(FIXTURE_PLUGINS / "greeter", extra / "greeter")
    async with Host(write_config([plugin("astbomb"), GREETER], plugins_dir=str(extra))) as host:
        assert host.plugins["astbomb"].state == PluginState.FAILED
        rss = psutil.Process().memory_info().rss
        loop = asyncio.get_running_loop()
        began = loop.time()
        for _ in range(20):
            assert "Unknown tool" in await host.registry.execute("web_search", {})
        assert loop.time() - began < 20  # no parse in the event loop (a parse of these takes minutes)
        assert (psutil.Process().memory_info().rss - rss) / 2**20 < 50
    report = subprocess.run([sys.executable, "-m", "qanot_host", "check", "--config",
                             write_config([plugin("astbomb")], plugins_dir=str(extra))],
                            capture_output=True, text=True, timeout=120)
    assert "Traceback" not in report.stderr, report.stderr


async def test_interrupted_connects_leave_no_host_sockets_behind(write_config, outside_host):
    silent = outside_host.address.rsplit(".", 1)[0] + ".3"  # on the link, nobody there: connect() hangs
    config = write_config([plugin("attacker"), GREETER], host={"plugins": {"attacker": {"permissions": {
        "network": {"hosts": [f"{silent}:80"]}}}}})
    async with Host(config) as host:
        me = psutil.Process()
        before = me.num_fds()
        result = await attack(host, "interrupted_connects", address=silent, port=80, seconds=3)
        assert result.startswith("contained: "), result
        assert me.num_fds() - before < 100, (me.num_fds(), before)  # not thousands
        await wait_until(lambda: me.num_fds() - before < 10, timeout=5, what="abandoned connects closed")
        assert await host.registry.execute("greet", {"name": "x"}) == "Salom, x!"


async def test_a_bad_address_pointer_is_efault_and_no_traceback_flood(write_config, caplog):
    config = write_config([plugin("attacker")], host={"plugins": {"attacker": {"permissions": {
        "network": {"hosts": ["192.0.2.200:80"]}}}}})
    async with Host(config) as host:
        result = await attack(host, "bad_pointer", times=300)
    assert result == f"contained: errnos [{errno.EFAULT}]", result
    assert sum("Traceback" in (r.exc_text or "") or r.exc_info is not None for r in caplog.records) <= 20


def test_cloud_metadata_and_the_hosts_own_addresses_need_a_literal_grant():
    from qanot_host.egress_policy import EgressPolicy, NameResolver
    policy = EgressPolicy("p", ports=[80], hosts=[("100.100.100.200", 80)], resolver=NameResolver(), nameservers=[])
    allows = lambda address: asyncio.run(policy.allows(address, 80))  # noqa: E731
    assert allows("100.100.100.200")  # named as a literal: the operator meant it
    for address in ("fd00:ec2::254", "168.63.129.16", "169.254.169.254", "127.0.0.1", machine_address()):
        assert not allows(address), address
    assert allows("198.51.100.7")  # any other host: what a ports grant is for


async def test_a_granted_secret_never_reaches_another_plugins_memory(write_config, tmp_path, monkeypatch):
    secret = "sk-live-" + "7f3a" * 170  # 688 characters: above pymalloc's sizes, like a PEM key
    monkeypatch.setenv("VICTIM_API_KEY", secret)
    config = write_config([plugin("victim"), plugin("snoop")], plugins_dir=attackers(tmp_path, "victim", "snoop"),
                          host={"plugins": {"victim": {"permissions": {"env_vars": ["VICTIM_API_KEY"]}}},
                                "restart": {"backoff_initial": 0}})
    async with Host(config) as host:
        pattern = "sk-live-(?:7f3a){25}"  # does not match itself: a search finds the secret or nothing
        own = await host.plugins["victim"].call("attack_scan_memory", {"pattern": pattern})
        assert own.startswith("ESCAPED: found"), own  # the victim has it, of course
        await restart(host, "snoop")  # forked after the victim's start
        result = await attack(host, "scan_memory", "snoop", pattern=pattern)
    assert result == "contained: not in its memory"


async def test_no_plugin_may_be_granted_the_workspace_or_plugins_code(write_config, tmp_path):
    """The host writes in workspace_dir, and runs what is in plugins_dir: a plugin that could write
    either (or a directory holding one) could swap it for a link, or change another plugin's code."""
    (tmp_path / "extra").mkdir()
    (tmp_path / "workspace" / "shared").mkdir(parents=True)
    for grant, what in ((tmp_path / "workspace", "holds workspace_dir"), (tmp_path, "holds workspace_dir"),
                        (tmp_path / "extra", "plugins_dir")):
        config = write_config([plugin("attacker")], plugins_dir=str(tmp_path / "extra"),
                              host=grant_write("attacker", grant))
        with pytest.raises(ConfigError, match=what):
            load_config(config)
    # inside it is fine: only that directory
    load_config(write_config([plugin("attacker")], host=grant_write("attacker", tmp_path / "workspace" / "shared")))


async def test_the_host_follows_no_link_in_the_workspace_and_waits_on_no_lock(write_config, tmp_path, caplog):
    """Whoever else writes in the workspace (another program; no plugin may) plants links where the
    host's files go and holds the host's lock: nothing is followed, and the host starts anyway."""
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("db_password=hunter2")
    secret.chmod(0o600)
    created = tmp_path / "created-by-root"
    for name, target in (("TOOLS.md", secret), (".qanot-host.lock", created), ("SOUL.md", "/dev/zero")):
        (workspace / name).symlink_to(target)
    async with Host(write_config([GREETER])) as host:
        assert host.plugins["greeter"].state == PluginState.READY
    assert not created.exists() and os.path.islink(workspace / "TOOLS.md")  # left alone, not followed
    assert secret.read_text() == "db_password=hunter2" and oct(secret.stat().st_mode & 0o777) == "0o600"
    assert any("is left alone" in r.getMessage() or "Too many levels of symbolic links" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    for name in (".qanot-host.lock", "TOOLS.md", "SOUL.md"):
        (workspace / name).unlink()
    lock = os.open(workspace / ".qanot-host.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # held, and never let go while the host starts
    try:
        began = time.monotonic()
        async with Host(write_config([GREETER])) as host:
            assert host.plugins["greeter"].state == PluginState.READY
        assert time.monotonic() - began < 30
        assert any("locked by someone else" in r.getMessage() for r in caplog.records)
    finally:
        os.close(lock)


@pytest.mark.parametrize("kind", ["fifo", "zero"])
async def test_a_hostile_plugin_json_neither_hangs_nor_fills_the_host(write_config, tmp_path, kind):
    extra = tmp_path / "extra"
    (extra / "odd").mkdir(parents=True)
    (extra / "odd" / "plugin.py").write_text("from qanot.plugins.base import Plugin\nclass QanotPlugin(Plugin):\n"
                                             "    pass\n")
    if kind == "fifo":
        os.mkfifo(extra / "odd" / "plugin.json")
    else:
        (extra / "odd" / "plugin.json").symlink_to("/dev/zero")
    config = write_config([plugin("odd"), plugin("echo")], plugins_dir=str(extra))
    async with Host(config) as host:
        assert host.plugins["odd"].state == PluginState.FAILED
        assert "plugin.json" in host.plugins["odd"].error
        assert host.plugins["echo"].state == PluginState.READY
    proc = subprocess.run([sys.executable, "-m", "qanot_host", "check", "--config", config], capture_output=True,
                          text=True, timeout=30, cwd=REPO)
    assert proc.returncode == 1 and "odd/plugin.json" in proc.stdout


async def test_a_host_that_fails_on_its_way_up_leaves_no_cgroup(write_config, monkeypatch):
    import qanot_host.host as host_module
    original = host_module.Host._start_plugins

    async def start_then_fail(self, names):
        await original(self, names)
        raise RuntimeError("failing on the way up")

    monkeypatch.setattr(host_module.Host, "_start_plugins", start_then_fail)
    host = Host(write_config([GREETER]))
    with pytest.raises(RuntimeError):
        await host.start()
    assert not glob.glob(f"/sys/fs/cgroup/**/qanot-host-{os.getpid()}", recursive=True)
    assert not [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]


async def test_plugin_output_cannot_forge_a_host_log_line(write_config, caplog):
    async with Host(write_config([plugin("attacker")])) as host:
        assert await attack(host, "forge_log") == "printed"
        await wait_until(lambda: any("bank ready" in r.getMessage() for r in caplog.records), 5, "the line")
        error = await host.registry.execute("attack_forge_error", {})
        workspace = host.config.workspace_dir
    line = next(r.getMessage() for r in caplog.records if "bank ready" in r.getMessage())
    assert "\r" not in line and "\x1b" not in line and "\\x0d2026-11-26" in line
    # the third attacker's F4: C1 controls, Unicode line separators and bidi overrides went through
    line = next(r.getMessage() for r in caplog.records if "vault ready" in r.getMessage())
    raw = ("\u0085", "\u009b", "\u2028", "\u202e")
    assert not any(c in line for c in raw) and "\\x852026-11-26" in line and "\\u2028" in line, line
    assert "safe ready" in error and not any(c in error for c in raw), error
    assert not any(c in r.getMessage() for r in caplog.records for c in raw)
    # ...and TOOLS.md got terminal escapes as they were (F5): none now, newlines and tabs kept
    tools_md = (Path(workspace) / "TOOLS.md").read_text()
    assert "red" in tools_md and "evil\ttab" in tools_md
    assert not any(c in tools_md for c in ("\x1b", *raw)), repr(tools_md)


async def test_max_rss_mb_counts_what_the_worker_hides_outside_its_own_rss(write_config):
    config = write_config([plugin("attacker")], host={"limits_interval": 0.2, "plugins": {
        "attacker": {"limits": {"max_rss_mb": 100}}}, "restart": {"backoff_initial": 0}})
    async with Host(config) as host:
        sup = host.plugins["attacker"]
        pid = sup.worker.pid
        assert await attack(host, "hide_memory", mb=300) == "300 MB in a memfd"
        await wait_until(lambda: sup.worker.pid != pid and sup.state == PluginState.READY, 10, "recycled")
        assert "recycled: memory" in sup.last_exit and "over max_rss_mb=100" in sup.last_exit


async def test_the_workspace_has_a_ceiling_too(write_config):
    """The third attacker's F3: workspace_dir/NAME is on the host's own disk, outside the plugin's disk
    image, and took 1.2 GB under disk_mb=1024. The host measures it; over workspace_mb the worker goes,
    and the plugin does not start again until the operator makes room."""
    config = write_config([plugin("attacker"), GREETER], host={
        "limits_interval": 0.2, "restart": {"backoff_initial": 0, "max_restarts": 1},
        "plugins": {"attacker": {"limits": {"workspace_mb": 20}}}})
    async with Host(config) as host:
        place = Path(host.config.workspace_dir) / "attacker"
        # the writes themselves go through (the host measures, the kernel does not stop them)...
        wrote = await host.registry.execute("attack_fill_disk", {"where": str(place), "mb": 60})
        assert "wrote 60 MB" in wrote, wrote
        sup = host.plugins["attacker"]
        await wait_until(lambda: sup.state == PluginState.FAILED, 15, "the plugin to fail")
        assert "over its workspace_mb=20" in sup.error and "remove files" in sup.error, sup.error
        assert "over its workspace_mb=20" in await host.registry.execute("attack_statvfs", {})
        assert await host.registry.execute("greet", {"name": "x"}) == "Salom, x!"
        for path in place.glob("fill-*"):
            path.unlink()
        await host.reload()  # a failed plugin is started again by a reload
        assert host.plugins["attacker"].state == PluginState.READY, host.plugins["attacker"].error


async def test_a_plugin_over_its_workspace_ceiling_gets_no_teardown_to_go_on_writing(write_config):
    """Attack pass 49: found at 655 MB of workspace_mb=256, a plugin whose loop was blocked was asked
    for teardown() and given teardown_timeout (3 s) to answer, writing on: 1.7 GB by its end. Over the
    ceiling, the worker is killed at once."""
    config = write_config([plugin("attacker")], host={
        "limits_interval": 0.2, "teardown_timeout": 15, "restart": {"backoff_initial": 0, "max_restarts": 1},
        "plugins": {"attacker": {"limits": {"workspace_mb": 20}}}})
    async with Host(config) as host:
        place = Path(host.config.workspace_dir) / "attacker"
        sup = host.plugins["attacker"]
        began = time.monotonic()
        assert await host.registry.execute("attack_write_on", {"where": str(place), "mb": 600}) == "writing"
        await wait_until(lambda: sup.state == PluginState.FAILED, 30, "the plugin to fail")
        took = time.monotonic() - began
        written = (place / "fill-on").stat().st_size >> 20
        assert "over its workspace_mb=20" in sup.error, sup.error
        assert took < 12 and written < 400, (took, written)  # 15 s of teardown: all 600 MB


async def test_a_ceiling_passed_while_a_recycle_drains_its_calls_kills_at_once(write_config):
    """The review of 11-27: a max_calls recycle waits for its calls in flight (up to the longest
    call timeout); the workspace was not measured meanwhile, and a kill found due was dropped."""
    config = write_config([plugin("attacker")], host={
        "limits_interval": 0.2, "call_timeout": 60, "restart": {"backoff_initial": 0, "max_restarts": 1},
        "plugins": {"attacker": {"limits": {"workspace_mb": 20, "max_calls": 2}}}})
    async with Host(config) as host:
        place = Path(host.config.workspace_dir) / "attacker"
        sup = host.plugins["attacker"]
        began = time.monotonic()
        assert await host.registry.execute("attack_write_on", {"where": str(place), "mb": 600}) == "writing"
        await asyncio.sleep(0.3)  # its loop blocked now: the next call, its max_calls-th, is never answered
        stuck = asyncio.ensure_future(host.registry.execute("attack_statvfs", {}))
        await wait_until(lambda: sup.state == PluginState.FAILED, 40, "the plugin to fail")
        took = time.monotonic() - began
        written = (place / "fill-on").stat().st_size >> 20
        assert "over its workspace_mb=20" in sup.error, sup.error
        assert took < 20 and written < 400, (took, written)  # the drain alone: 60 s
        assert "error" in await asyncio.wait_for(stuck, 10)


async def test_space_taken_with_next_to_no_cpu_is_still_found(write_config):
    """A walk waits for the plugin to have used 2 ms of CPU since the last (pings alone set one off
    for every idle plugin at every ping), or for 6 ping intervals: 60 MB taken by one fallocate()
    is still found."""
    config = write_config([plugin("attacker")], host={
        "limits_interval": 0.2, "ping_interval": 0.5, "restart": {"backoff_initial": 0, "max_restarts": 1},
        "plugins": {"attacker": {"limits": {"workspace_mb": 20}}}})
    async with Host(config) as host:
        place = Path(host.config.workspace_dir) / "attacker"
        await asyncio.sleep(1)  # its place measured once, empty
        assert await host.registry.execute("attack_fallocate", {"where": str(place), "mb": 60}) == "allocated 60 MB"
        sup = host.plugins["attacker"]
        await wait_until(lambda: sup.state == PluginState.FAILED, 15, "the plugin to fail")
        assert "over its workspace_mb=20" in sup.error, sup.error


def _workspace_on(tmp_path, kind: str, options: str):
    if os.geteuid() != 0:
        pytest.skip(f"mounting a {kind} needs root")
    place = tmp_path / "workspace"
    place.mkdir()
    subprocess.run(["mount", "-t", kind, "-o", options, "qanot-test", str(place)], check=True)
    return place


@pytest.fixture
def quiet_workspace(tmp_path):
    """workspace_dir on a tmpfs of its own, where nothing but the test and its plugins writes."""
    place = _workspace_on(tmp_path, "tmpfs", "size=64m,mode=0755")
    yield place
    subprocess.run(["umount", "-l", str(place)], check=False)


@pytest.fixture
def ramfs_workspace(tmp_path):
    """workspace_dir on a ramfs, whose statfs counts nothing (always 0 blocks)."""
    place = _workspace_on(tmp_path, "ramfs", "mode=0755")
    yield place
    subprocess.run(["umount", "-l", str(place)], check=False)


class Looks(list):
    """The limits watch's looks so far, numbered from 1; `at[n]()` runs right after the n-th."""

    def __init__(self) -> None:
        super().__init__()
        self.at: dict[int, Callable[[], object]] = {}


@pytest.fixture
def looks(monkeypatch) -> Looks:
    """Counts the limits watch's looks (DiskGrowth.look, the first thing each does)."""
    from qanot_host import disk_growth
    counted, original = Looks(), disk_growth.DiskGrowth.look

    def look(self):
        original(self)
        counted.append(len(counted) + 1)
        if len(counted) in counted.at:
            counted.at[len(counted)]()

    monkeypatch.setattr(disk_growth.DiskGrowth, "look", look)
    return counted


@pytest.fixture
def walks(monkeypatch, looks) -> list[tuple[int, str]]:
    """(the look, the plugin) of each walk of a place in the workspace, once it is done."""
    from qanot_host import limits_watch
    walked: list[tuple[int, str]] = []
    original = limits_watch._measure_all

    def measure_all(measure, pids):
        found = original(measure, pids)
        walked.extend((len(looks), name) for name, _, _ in measure)
        return found

    monkeypatch.setattr(limits_watch, "_measure_all", measure_all)
    return walked


async def test_a_plugins_cpu_is_not_read_until_its_workspaces_filesystem_grows(write_config, quiet_workspace,
                                                                               monkeypatch, looks):
    """Whether a place needs walking was decided by reading every plugin's cgroup CPU at every look:
    at 500 idle plugins, half the host's idle CPU. Until the filesystem holding the places has grown
    by the slack since a place's last walk, its plugin's CPU is not read; at the look after it has,
    every plugin's is."""
    from qanot_host.disk_growth import SLACK_BYTES

    grown_after = 25  # between this look and the next:
    looks.at[grown_after] = lambda: (quiet_workspace / "grown").write_bytes(b"x" * 2 * SLACK_BYTES)
    config = write_config([plugin("attacker"), GREETER], host={"limits_interval": 0.1})
    host = Host(config)
    cgroups = host._factory.cgroups
    if not cgroups.available:
        pytest.skip("no cgroups here: no CPU to read")
    reads: list[tuple[int, str]] = []  # (the look, the plugin)
    read_cpu = cgroups.cpu_seconds

    def cpu_seconds(name):
        reads.append((len(looks), name))
        return read_cpu(name)

    monkeypatch.setattr(cgroups, "cpu_seconds", cpu_seconds)
    async with host:
        await wait_until(lambda: len(looks) >= grown_after + 3, 20, "the looks")
        for name in host.plugins:
            assert [n for n, who in reads if who == name and 5 <= n <= grown_after] == [], (name, reads)
            assert (grown_after + 1, name) in reads, (name, reads[-6:])


async def test_a_place_is_walked_again_only_once_its_filesystem_has_grown(write_config, quiet_workspace, looks,
                                                                          walks):
    """Answering pings, each of 500 idle plugins had its place walked every 6 ping intervals (8 walks
    a second) though nothing on the filesystem had grown: not again until it has grown by the slack."""
    from qanot_host.disk_growth import SLACK_BYTES

    grown_after = 40
    # under the slack (the machine's own writes are at least this), then over it
    looks.at[20] = lambda: (quiet_workspace / "small").write_bytes(b"x" * 8192)
    looks.at[grown_after] = lambda: (quiet_workspace / "grown").write_bytes(b"x" * 2 * SLACK_BYTES)
    config = write_config([plugin("attacker"), GREETER], host={"limits_interval": 0.1, "ping_interval": 0.2})
    async with Host(config) as host:
        await wait_until(lambda: len(looks) >= grown_after + 12, 30, "the looks")
        assert {who for _, who in walks} == set(host.plugins), walks  # each found within at the start
    # 3 s of pings, 6 ping intervals being 1.2 s: a walk each, every 1.2 s, before
    assert [(n, who) for n, who in walks if 10 <= n <= grown_after] == [], walks
    assert {who for n, who in walks if grown_after < n <= grown_after + 12} == {"attacker", "greeter"}, walks


async def test_what_a_lazy_plugin_writes_after_its_first_start_is_found_at_the_next_look(write_config,
                                                                                          quiet_workspace, looks):
    """The review of 11-27: a place first known after the host's start (a lazy plugin's, at its first
    call) was not watched until its plugin's turn, up to 10 looks later, where no other place shares
    its filesystem: what it wrote meanwhile went unmeasured."""
    config = ceiling_of_20_mb(write_config, limits_interval=0.2, activation="lazy")
    async with Host(config):
        pass  # its tools listed once (its worker started and stopped): the next host has them cached
    async with Host(config) as host:
        await asyncio.sleep(0.5)
        assert host.plugins["attacker"].state == PluginState.IDLE and host.plugins["attacker"].activations == 0
        await fill_until_failed(host, quiet_workspace / "attacker", looks)  # at its turn: up to 10 looks


def ceiling_of_20_mb(write_config, **host) -> str:
    """A config of the attacker plugin alone, its place's ceiling 20 MB, failed at once when over it."""
    return write_config([plugin("attacker")], host={
        "restart": {"backoff_initial": 0, "max_restarts": 0}, "plugins": {"attacker": {"limits": {"workspace_mb": 20}}},
        **host})


async def fill_until_failed(host: Host, place: Path, looks: list | None = None) -> float:
    """40 MB written into `place` by the attacker plugin; the seconds until its plugin failed for it
    (and, given the list of the limits watch's looks, failed within 3 looks of the write)."""
    sup = host.plugins["attacker"]
    wrote = await host.registry.execute("attack_fill_disk", {"where": str(place), "mb": 40})
    assert "wrote 40 MB" in wrote, wrote
    written, looked = time.monotonic(), len(looks or [])
    await wait_until(lambda: sup.state == PluginState.FAILED, 15, "the plugin to fail")
    assert "over its workspace_mb=20" in sup.error, sup.error
    if looks is not None:
        assert len(looks) <= looked + 3, (looked, len(looks))
    return time.monotonic() - written


async def test_space_written_as_as_much_is_freed_is_found_within_quiet_walk_max(write_config, quiet_workspace,
                                                                                 monkeypatch, walks):
    """Between two looks the filesystem's use is counted net: 40 MB written into a place in the
    interval in which 40 MB were freed beside it leave the filesystem as it was. The place is walked
    again within QUIET_WALK_MAX anyway (here 4 s), as its plugin ran. (Space freed in another
    interval takes nothing off what the filesystem grew by: found at the next look.)"""
    from qanot_host import limits_watch
    monkeypatch.setattr(limits_watch, "QUIET_WALK_MAX", 4.0)
    monkeypatch.setattr(limits_watch, "QUIET_TURN", 1)  # every look its turn (else found at the turn after)
    filler = quiet_workspace / "filler"
    filler.write_bytes(b"x" * (40 << 20))  # before the host: counted in every place's last walk
    async with Host(ceiling_of_20_mb(write_config, limits_interval=3)) as host:
        await wait_until(lambda: walks, 10, "its place walked once, empty")
        filler.unlink()  # and 40 MB written, before the next look, 3 s on
        assert await fill_until_failed(host, quiet_workspace / "attacker") > 4.0  # not at the next look


async def test_space_freed_earlier_hides_nothing_written_later(write_config, quiet_workspace, looks):
    """CI's own tests deleting files beside a plugin's 60 MB hid them from the limits watch, which
    compared the filesystem's net use with the place's last walk: space freed at one look takes
    nothing off what is written at another."""
    filler = quiet_workspace / "filler"
    filler.write_bytes(b"x" * (40 << 20))
    async with Host(ceiling_of_20_mb(write_config, limits_interval=0.2)) as host:
        await wait_until(lambda: len(looks) >= 3, 10, "its place walked once, empty")
        filler.unlink()
        freed = len(looks)
        await wait_until(lambda: len(looks) >= freed + 2, 10, "a look after the free")
        await fill_until_failed(host, quiet_workspace / "attacker", looks)


async def test_a_workspace_whose_filesystem_counts_nothing_is_walked_as_its_plugin_runs(write_config,
                                                                                         ramfs_workspace):
    """Whether a place may have grown is read from its filesystem's statfs only where that counts a
    write as it is made (ext4, XFS, tmpfs): on a ramfs (or a network filesystem) it never changes, and
    40 MB there went unseen until QUIET_WALK_MAX."""
    async with Host(ceiling_of_20_mb(write_config, limits_interval=0.2)) as host:
        await asyncio.sleep(0.5)  # its place walked once, empty
        await fill_until_failed(host, ramfs_workspace / "attacker")


async def test_what_teardown_writes_at_an_idle_stop_is_measured(write_config):
    """Attack pass 62: teardown() at an idle stop took 5 GB of the workspace (workspace_mb=8) with
    fallocate(), and nothing measured it until the next call, 71 s later. Its place is measured once
    the worker is gone: over its ceiling, the plugin fails, saying so."""
    config = write_config([plugin("attacker"), GREETER], host={"limits_interval": 0.2, "plugins": {"attacker": {
        "idle_timeout": 1, "limits": {"workspace_mb": 20}}}})
    async with Host(config) as host:
        sup = host.plugins["attacker"]
        place = Path(host.config.workspace_dir) / "attacker"
        assert await host.registry.execute("attack_fill_at_teardown", {"where": str(place), "mb": 60}) == "armed"
        await wait_until(lambda: sup.state == PluginState.FAILED, 15, "the plugin to fail after its idle stop")
        assert sup.idle_stops == 1 and "over its workspace_mb=20" in sup.error, (sup.idle_stops, sup.error)
        assert host.plugins["greeter"].state == PluginState.READY


async def test_a_lazy_plugin_over_its_ceiling_is_found_without_a_call(write_config):
    """Attack pass 63: a lazy plugin's teardown() at a host's stop left 2 GB in its place (ceiling 8
    MB); the next host, starting it from its cached tools, showed it idle and well until its first
    call. A place this host has not started is measured once, at its plugin's turn."""
    config = ceiling_of_20_mb(write_config, limits_interval=0.1, activation="lazy")
    async with Host(config) as host:
        place = Path(host.config.workspace_dir) / "attacker"
        assert host.plugins["attacker"].state == PluginState.IDLE
    (place / "left-by-teardown").write_bytes(b"x" * (40 << 20))  # as its teardown() at that stop would
    async with Host(config) as host:
        sup = host.plugins["attacker"]
        await wait_until(lambda: sup.state == PluginState.FAILED, 10, "the plugin to fail, with no call")
        assert sup.activations == 0 and "over its workspace_mb=20" in sup.error, sup.error


async def test_an_idle_plugin_whose_place_is_full_fails_at_the_call_that_would_start_it(write_config):
    """Attack pass 64: a call whose start found the place over its ceiling left the plugin `idle` (with
    the error), as if the next call might start it: none can until files are removed, so it fails."""
    config = write_config([plugin("attacker")], host={"limits_interval": 0.1, "plugins": {"attacker": {
        "idle_timeout": 0.5, "limits": {"workspace_mb": 20}}}})
    async with Host(config) as host:
        sup = host.plugins["attacker"]
        await wait_until(lambda: sup.state == PluginState.IDLE, 10, "the idle stop")
        (Path(host.config.workspace_dir) / "attacker" / "filled").write_bytes(b"x" * (40 << 20))
        assert "over its workspace_mb=20" in await host.registry.execute("attack_identity", {})
        assert sup.state == PluginState.FAILED and "over its workspace_mb=20" in sup.error, (sup.state, sup.error)


async def test_reload_says_what_a_plugin_wrote_at_its_listing_start_or_its_removal(write_config, caplog):
    """Attack pass 63: a new lazy plugin whose start to list its tools overfilled its place was not
    among reload's failed ones (exit 0); a plugin removed by a reload left its teardown()'s 3 GB with
    nothing said."""
    host_settings = {"plugins": {"attacker": {"activation": "lazy", "limits": {"workspace_mb": 20}}}}
    async with Host(write_config([GREETER])) as host:
        write_config([GREETER, plugin("attacker", teardown_fill_mb=40)], host=host_settings)
        summary = await host.reload()
        assert summary["added"] == ["attacker"] and summary["failed"] == ["attacker"], summary
        assert "over its workspace_mb=20" in host.plugins["attacker"].error
        for path in (Path(host.config.workspace_dir) / "attacker").iterdir():
            path.unlink()
        write_config([GREETER, plugin("attacker", teardown_fill_mb=40)],
                     host={"plugins": {"attacker": {"limits": {"workspace_mb": 20}}}})
        assert (await host.reload())["restarted"] == ["attacker"]  # eager now: it runs
        assert host.plugins["attacker"].state == PluginState.READY
        write_config([GREETER, plugin("attacker", teardown_fill_mb=40)], host={
            "limits_interval": 0.1, "plugins": {"attacker": {"workspace": False, "limits": {"workspace_mb": 20}}}})
        assert (await host.reload())["restarted"] == ["attacker"]
        assert "plugin attacker, left without one by this reload: its place in the workspace is full" in caplog.text
        pid = host.plugins["attacker"].worker.pid
        await asyncio.sleep(1)  # its worker, with no place, was recycled on for the place it had (attack pass 64)
        assert host.plugins["attacker"].worker.pid == pid and host.plugins["attacker"].restarts == 0
        for path in (Path(host.config.workspace_dir) / "attacker").iterdir():
            path.unlink()
        write_config([GREETER, plugin("attacker", teardown_fill_mb=40)],
                     host={"plugins": {"attacker": {"limits": {"workspace_mb": 20}}}})
        assert (await host.reload())["restarted"] == ["attacker"]
        write_config([GREETER])
        assert (await host.reload())["removed"] == ["attacker"]
    assert "plugin attacker, removed by this reload: its place in the workspace is full" in caplog.text


async def test_unlinked_files_a_plugin_holds_open_count_against_its_workspace(write_config):
    """The fourth attacker's F6: files opened in the workspace, unlinked at once and written while held
    open took 815 MB under workspace_mb=10 (the tree itself stays empty)."""
    config = write_config([plugin("attacker")], host={
        "limits_interval": 0.2, "restart": {"backoff_initial": 0},
        "plugins": {"attacker": {"limits": {"workspace_mb": 20}}}})
    async with Host(config) as host:
        place = Path(host.config.workspace_dir) / "attacker"
        sup = host.plugins["attacker"]
        first = sup.worker.pid
        held = await host.registry.execute("attack_hold_unlinked", {"where": str(place), "files": 3, "mb": 20})
        assert held == "holding 3 unlinked files" and not list(place.iterdir())
        await wait_until(lambda: sup.worker.pid != first and sup.state == PluginState.READY, 15, "a recycle")
        assert "over its workspace_mb=20" in sup.last_exit, sup.last_exit  # the space went with the worker


def test_a_plugins_maps_file_is_read_a_line_at_a_time_and_each_deleted_file_once(tmp_path):
    """The fifteenth attacker's F2: the plugin decides how long /proc/PID/maps is (65,000 mappings of
    a deleted file under a 4 KB path: 270 MB), and the workspace walk read it whole, then split it:
    the host's memory went from 36 to 353 MB. Here 3000 such mappings (12 MB of maps) in this
    process: counted once, and read in far less memory than the file's size."""
    import mmap
    import tracemalloc
    from qanot_host.datadirs import held_unlinked
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    for level in range(14):  # a path of ~3.6 KB: each mapping's line in maps is that long
        name = f"d{level:02d}" + "x" * 250
        os.mkdir(name, dir_fd=directory)
        inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=directory)
        os.close(directory)
        directory = inner
    fd = os.open("f" * 200, os.O_RDWR | os.O_CREAT, 0o600, dir_fd=directory)
    os.unlink("f" * 200, dir_fd=directory)
    os.close(directory)
    maps = []
    try:
        os.ftruncate(fd, 2 * 3000 * mmap.PAGESIZE)
        os.pwrite(fd, b"\1" * mmap.PAGESIZE, 0)
        maps = [mmap.mmap(fd, mmap.PAGESIZE, offset=2 * i * mmap.PAGESIZE, prot=mmap.PROT_READ)
                for i in range(3000)]  # every other page: no two mappings merge
        os.close(fd)
        fd = -1
        with open(f"/proc/{os.getpid()}/maps", "rb") as maps_file:
            size = sum(len(line) for line in maps_file)
        assert size > 10 * 2**20
        tracemalloc.start()
        try:
            held = held_unlinked([os.getpid()], os.stat(tmp_path).st_dev)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert held == mmap.PAGESIZE  # the one page written, once, however often it is mapped
        assert peak < size / 10, (peak, size)
    finally:
        for mapping in maps:
            mapping.close()
        if fd >= 0:
            os.close(fd)


def test_measuring_a_workspace_holds_one_descriptor_per_level(tmp_path):
    """The fourth attacker's F7: the walk opened every subdirectory before closing any, so 1500
    directories ran a host with 1024 descriptors out of them, and what lay in the rest went uncounted.
    Measured here in a process allowed 64 descriptors; and a tree deeper than the walk goes counts as full."""
    import subprocess
    import sys
    wide = tmp_path / "wide"
    for index in range(1500):
        (wide / f"d{index}").mkdir(parents=True)
    for index in range(1470, 1500):
        (wide / f"d{index}" / "blob").write_bytes(b"\1" * 2**20)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)); "
            "from qanot_host.datadirs import disk_usage; print(disk_usage(sys.argv[1], 100000))")
    done = subprocess.run([sys.executable, "-c", code, str(wide)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    used, entries = eval(done.stdout)  # a tuple of two ints, printed by the line above
    assert entries == 1530 and used >= 30 * 2**20, (used, entries)
    deep = tmp_path / "deep"
    (deep / "/".join(["d"] * 70)).mkdir(parents=True)
    from qanot_host.datadirs import MAX_WORKSPACE_ENTRIES, workspace_problem
    assert f"more than {MAX_WORKSPACE_ENTRIES}" in workspace_problem(str(deep), 100)


async def test_reading_a_plugins_code_costs_the_host_nothing(write_config, tmp_path):
    """The fifth attacker's F2: 2 MB of `x=a,a,a,...` beside a plugin took the host to 1.2 GB (2.4 GB
    on a reload) and 10 s at every start, parsing it for the index of declared tools. The parse runs in
    a child process of bounded memory now."""
    extra = tmp_path / "extra"
    shutil.copytree(FIXTURE_PLUGINS / "greeter", extra / "greeter")
    (extra / "greeter" / "junk.py").write_text("x = " + "a," * 300_000 + "a\n")  # ~360 MB parsed in the host
    # a disabled plugin: the index of declared tools is of use, and is made at start and at reload
    config = write_config([GREETER, plugin("echo", enabled=False)], plugins_dir=str(extra))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident size
    before = psutil.Process().memory_info().rss
    async with Host(config) as host:
        await host.tool_index_ready(60)  # on a loaded machine the reader takes its time
        await host.reload()
        await host.tool_index_ready(60)
        assert await host.registry.execute("greet", {"name": "x"}) == "Salom, x!"
        assert "disabled" in await host.registry.execute("echo", {"text": "x"})  # the index was made
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    assert (peak - before) / 2**20 < 150, f"the host's peak grew {(peak - before) / 2**20:.0f} MB"
    report = subprocess.run([sys.executable, "-m", "qanot_host", "check", "--config", config],
                            capture_output=True, text=True, timeout=120)
    assert "Traceback" not in report.stderr and "2 plugins checked" in report.stdout, report.stdout + report.stderr


async def test_a_plugin_whose_code_takes_the_readers_whole_time_costs_only_its_own_answer(tmp_path):
    """CI, on a loaded machine: the index's reader ran out of time on a plugin with a large file, and
    every other plugin's answer was lost with it (the reader said all at its end). It reads the
    smallest first now and says each answer as it has it."""
    from qanot_host.static import scan_plugins, scan_plugins_async
    big = tmp_path / "big"
    shutil.copytree(FIXTURE_PLUGINS / "greeter", big)
    (big / "junk.py").write_text("x = " + "a," * 450_000 + "a\n")  # 2 s to parse here, in ~550 MB
    jobs = {"big": (str(big), str(big / "plugin.py")),
            "echo": (str(REPO / "plugins" / "echo"), str(REPO / "plugins" / "echo" / "plugin.py"))}
    for answers in (scan_plugins(jobs, 1.5), await scan_plugins_async(jobs, 1.5)):
        assert answers["echo"] == {"problem": None, "tools": ["echo"]}, answers


@pytest.mark.parametrize("namespaces", [True, False])
async def test_without_identity_a_root_worker_has_no_privilege_and_strict_refuses_it(write_config, namespaces):
    """The sixth attacker: with identity false the worker kept uid 0 with every capability (fanotify
    froze the host's loop, raw sockets sniffed loopback, prlimit(host, RLIMIT_CPU) had the kernel kill the
    host), no warning said so, and strict did not refuse it."""
    sandbox = {"identity": False, "namespaces": namespaces}
    async with Host(write_config([plugin("root_probe")], host={"sandbox": sandbox})) as host:
        sup = host.plugins["root_probe"]
        assert sup.state == PluginState.READY and "capabilities-dropped" in sup.status()["sandbox"]
        assert "identity" not in sup.status()["sandbox"]
        seen = json.loads(await host.registry.execute("root_probe", {"pid": os.getpid()}))
        assert seen["uid"] == 0 and seen["caps"] == "0000000000000000", seen
        denied = ("fanotify", "raw_socket", "prlimit_other", "setpriority_other", "setpriority_uid", "affinity_other",
                  "setuid_chmod", "setuid_create")  # the last four: the seventh attacker's
        assert {k: seen[k].split(":")[0] for k in denied} == dict.fromkeys(denied, "denied"), seen
        assert seen["prlimit_self"].startswith("ALLOWED") and seen["nice_self"].startswith("ALLOWED"), seen
    assert resource.getrlimit(resource.RLIMIT_CPU)[0] == resource.RLIM_INFINITY  # the host's own, untouched
    async with Host(write_config([plugin("root_probe")], host={"sandbox": {**sandbox, "strict": True}})) as host:
        assert host.plugins["root_probe"].state == PluginState.FAILED
        error = host.plugins["root_probe"].error  # (without namespaces, their layers are refused first)
        assert ("identity is false" if namespaces else "pid-namespace is not active") in error, error


async def test_no_link_can_be_left_where_the_agent_reads(write_config):
    """The seventh attacker left `workspace_dir/NAME/sl -> /etc/shadow`: the agent, as root, reads that
    place. A plugin may make links in its own data directory, none in its workspace place. (A workspace
    outside /tmp, as in production: under /tmp it would lie in the worker's own private /tmp.)"""
    import tempfile
    with tempfile.TemporaryDirectory(dir="/var/tmp") as workspace:
        async with Host(write_config([plugin("attacker")], workspace_dir=workspace)) as host:
            place = str(Path(host.config.workspace_dir) / "attacker")
            said = await host.registry.execute("attack_workspace_link", {"where": place})
        links = [os.path.lexists(os.path.join(place, name)) for name in ("sl", "moved")]
    assert said.startswith("symlink in workspace: EACCES; symlink in data dir: made; rename link in: E"), said
    assert links == [False, False]
