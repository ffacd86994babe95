"""Shared helpers: config files in tmp_path that point at the fixture plugins in tests/plugins."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import zipfile
from pathlib import Path

import psutil
import pytest
import uvloop

FIXTURE_PLUGINS = Path(__file__).parent / "plugins"


def pytest_asyncio_loop_factories(config, item):
    # The host runs on uvloop in production; test it there.
    return {"uvloop": uvloop.new_event_loop}


def plugin(name: str, enabled: bool = True, **config) -> dict:
    return {"name": name, "enabled": enabled, "config": config}


@pytest.fixture
def write_config(tmp_path: Path):
    """write_config([plugin(...), ...], host={...}) -> path of a config.json using the fixtures."""

    def write(plugins: list[dict], host: dict | None = None, **top) -> str:
        data = {"plugins": plugins, "plugins_dir": top.pop("plugins_dir", str(FIXTURE_PLUGINS)),
                "workspace_dir": str(tmp_path / "workspace"),
                "host": {"state_dir": str(tmp_path / "state"), **(host or {})}, **top}
        path = tmp_path / "config.json"
        path.write_text(json.dumps(data))
        return str(path)

    return write


GREETER = plugin("greeter", greeting_style="warm")


def check_report(config_path: str, warnings: bool = False) -> str:
    """What `qanot-host check` finds (its errors, and its warnings if asked), as one text."""
    from qanot_host.check import check_config
    from qanot_host.config import load_config
    config = load_config(config_path)
    raw = json.loads(Path(config_path).read_text())
    report = check_config(config, raw["plugins"])
    return "\n".join(report.errors + (report.warnings if warnings else []))


def make_wheel(directory: Path, name: str, version: str, body: str = "") -> Path:
    """A minimal, valid pure-Python wheel, so dependency tests need no network."""
    module = name.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": f"__version__ = {version!r}\n{body}",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: qanot-host-tests\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    wheel = directory / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
    return wheel


async def wait_until(predicate, timeout: float = 10.0, what: str = "condition"):
    """Poll `predicate` until true, failing the test after `timeout` seconds (never a bare sleep)."""
    import asyncio
    import time
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def gone(process: psutil.Process | int) -> bool:
    """The process has ended (a zombie not yet reaped counts): it may end between any two looks."""
    try:
        process = process if isinstance(process, psutil.Process) else psutil.Process(process)
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def worker_processes(root: int | None = None, include_template: bool = False):
    """Live (non-zombie) descendants of `root` (default: this process), without the worker
    template and the workers' init processes (PID 1 of each worker's namespace) unless asked, and
    never the short-lived reader of plugins' code (static.py's scanner, a child of the host)."""
    top = psutil.Process(root)
    templates = set()
    for child in top.children():
        try:
            if "serve_template" in " ".join(child.cmdline()):
                templates.add(child.pid)  # its forked workers share its command line
        except psutil.NoSuchProcess:
            pass
    found = []
    for proc in top.children(recursive=True):
        try:
            # by its name once it has set it, by its command line before (and not once exiting)
            if proc.name() == "qanot:scan" or "scan_here" in " ".join(proc.cmdline()):
                continue
            helper = proc.pid in templates or proc.name().startswith("qanot:init:")
            if proc.status() == psutil.STATUS_ZOMBIE or (helper and not include_template):
                continue
        except psutil.NoSuchProcess:
            continue
        found.append(proc)
    return found


def grant_write(plugin_name: str, path) -> dict:
    """host settings granting one plugin write access to `path` (the sandbox denies it otherwise).
    The worker runs as a uid of its own, so the directory must be writable by it too."""
    import os
    os.chmod(path, 0o777)
    return {"plugins": {plugin_name: {"permissions": {"filesystem": {"write": [str(path)]}}}}}


def machine_address() -> str:
    """An address of this machine's own that is not loopback (a `ports` grant reaches neither)."""
    import socket
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))  # no packet is sent: this only picks a route
        address = probe.getsockname()[0]
    except OSError:
        address = "127.0.0.1"
    finally:
        probe.close()
    if address.startswith("127."):
        import pytest
        pytest.skip("this machine has no address but loopback")
    return address


class OutsideHost:
    """A machine of its own for network tests: a network namespace joined to the host's by a veth
    pair, at an address that is not the host's. What listens there is "any host" to a plugin's
    `ports` grant, which never reaches the host's own addresses."""

    def __init__(self) -> None:
        import subprocess
        tag = os.getpid() % 10000
        self.name = f"qhtest{tag}"
        subnet = f"198.18.{tag % 250}"
        self.address, self._host_side = f"{subnet}.2", f"{subnet}.1"
        inside, outside = f"qhi{tag}", f"qho{tag}"
        commands = [["ip", "netns", "add", self.name],
                    ["ip", "link", "add", outside, "type", "veth", "peer", "name", inside, "netns", self.name],
                    ["ip", "addr", "add", f"{self._host_side}/24", "dev", outside], ["ip", "link", "set", outside, "up"],
                    ["ip", "-n", self.name, "addr", "add", f"{self.address}/24", "dev", inside],
                    ["ip", "-n", self.name, "link", "set", inside, "up"], ["ip", "-n", self.name, "link", "set", "lo", "up"]]
        for command in commands:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                self.close()
                raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")

    def listen(self, kind: int | None = None, port: int = 0):
        """A listening TCP socket (or a bound one of `kind`) at this host's address, on `port` (0: any)."""
        import ctypes
        import socket
        import threading
        made: list = []

        def inside() -> None:  # a network namespace is a thread's own: only this thread moves
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/run/netns/{self.name}") as ns:
                if libc.setns(ns.fileno(), 0x40000000) != 0:  # CLONE_NEWNET
                    made.append(OSError(ctypes.get_errno(), "setns"))
                    return
            sock = socket.socket(socket.AF_INET, kind or socket.SOCK_STREAM)
            sock.bind((self.address, port))
            if kind is None:
                sock.listen()
            made.append(sock)

        thread = threading.Thread(target=inside)
        thread.start()
        thread.join()
        if isinstance(made[0], Exception):
            raise made[0]
        return made[0]

    def close(self) -> None:
        import subprocess
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


@pytest.fixture
def outside_host():
    import shutil
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("an outside host needs root and iproute2 (ip)")
    host = OutsideHost()
    try:
        yield host
    finally:
        host.close()
