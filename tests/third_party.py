"""Real third-party MCP servers for the tests, installed once per machine from PyPI and npm.

Kept under /var/tmp (not a test's tmp_path: the servers run as plugins' uids, which need to reach
them, and installing for every test would take minutes), one directory per pinned version; several
test processes wait for the one that installs.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest

CACHE = Path("/var/tmp/qanot-host-test-servers")
MCP_SERVER_TIME = "mcp-server-time==2026.10.19"  # brings the SDK (mcp 2.x) the probe server runs on
FILESYSTEM_SERVER = "@modelcontextprotocol/server-filesystem@2026.8.31"
PROBE_SERVER = Path(__file__).resolve().parent / "mcp_servers" / "probe_server.py"


def _installed(name: str, install) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    os.chmod(CACHE, 0o755)
    place = CACHE / name
    with open(CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (place / ".complete").exists():
            shutil.rmtree(place, ignore_errors=True)
            place.mkdir()
            install(place)
            subprocess.run(["chmod", "-R", "a+rX", str(place)], check=True)
            (place / ".complete").touch()
    return place


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")


def python_servers() -> Path:
    """A virtual environment with mcp-server-time (and so the MCP SDK, for probe_server.py)."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.fail("uv is needed to install mcp-server-time (pip install uv)")

    def install(place: Path) -> None:
        _run([uv, "venv", "-q", str(place / "venv")])
        _run([uv, "pip", "install", "-q", "--python", str(place / "venv" / "bin" / "python"), MCP_SERVER_TIME])
    return _installed("python-" + MCP_SERVER_TIME.replace("==", "-"), install) / "venv"


def filesystem_server() -> Path:
    """The npm filesystem server's command (node_modules/.bin/mcp-server-filesystem)."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.fail("node and npm are needed for @modelcontextprotocol/server-filesystem (.ci/run installs them)")

    def install(place: Path) -> None:
        _run([npm, "install", "--prefix", str(place), "--no-audit", "--no-fund", "--silent", FILESYSTEM_SERVER])
    return _installed("npm-" + FILESYSTEM_SERVER.replace("/", "_").replace("@", ""), install) \
        / "node_modules" / ".bin" / "mcp-server-filesystem"


def probe_script(script: str = "probe_server.py") -> str:
    """A test server of tests/mcp_servers (probe_server.py by default) where a plugin's uid can read
    it (the repository may be in a private home): its directory is what a config grants the server
    to read."""
    source = PROBE_SERVER.parent / script
    place = CACHE / "probe"
    place.mkdir(parents=True, exist_ok=True)
    os.chmod(CACHE, 0o755)
    os.chmod(place, 0o755)
    target = place / script
    if target.exists() and target.read_bytes() == source.read_bytes():
        return str(target)  # unchanged: a server's installation stamp (and its cached tools) stays as it was
    scratch = place / f"{script}.{os.getpid()}"
    shutil.copyfile(source, scratch)
    os.chmod(scratch, 0o644)
    os.replace(scratch, target)
    return str(target)
