"""Dependencies that ship only a source distribution: built into a wheel by a sandboxed build job,
never by the host itself, and cached per plugin."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from qanot_host import Host, PluginState

from .conftest import plugin

SETUP = Path(__file__).with_name("sdist_setup.py")


def make_sdist(directory: Path, setup_py: str, name: str = "qhtest_source", version: str = "1.0",
               pyproject: str | None = None) -> Path:
    path = directory / f"{name}-{version}.tar.gz"
    top = f"{name}-{version}"
    files = {f"{top}/setup.py": setup_py,
             f"{top}/PKG-INFO": f"Metadata-Version: 1.0\nName: {name}\nVersion: {version}\n"}
    if pyproject is not None:
        files[f"{top}/pyproject.toml"] = pyproject
    with tarfile.open(path, "w:gz") as archive:
        for member, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(member)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def setuptools_wheel(tmp_path_factory) -> Path:
    """setuptools as a wheel (the build backend's only requirement), fetched once per test run."""
    directory = tmp_path_factory.mktemp("setuptools")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps",
                    "-d", str(directory), "setuptools>=70.1"], check=True)
    return next(directory.glob("setuptools-*.whl"))


@pytest.fixture
def wheels(tmp_path, setuptools_wheel) -> Path:
    """A wheel_dir holding setuptools' wheel, the build backend's one requirement."""
    directory = tmp_path / "wheels"
    directory.mkdir()
    os.link(setuptools_wheel, directory / setuptools_wheel.name)
    return directory


@pytest.fixture
def listener():
    """A TCP port on 127.0.0.1 that counts connections (a build must not reach it)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1], accepted
    server.close()


@pytest.fixture
def source_only(tmp_path, wheels, listener):
    """A wheel_dir holding setuptools' wheel and qhtest-source as an sdist only, whose setup.py
    tries to write outside, read a root-only file and connect to `listener`."""
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    escape = tmp_path / "escaped"
    setup_py = SETUP.read_text().replace("@ESCAPE@", str(escape)).replace("@SECRET@", str(secret)) \
        .replace("@PORT@", str(listener[0]))
    make_sdist(wheels, setup_py)
    return wheels, escape


async def test_an_sdist_only_dependency_is_built_in_the_sandbox(write_config, source_only, listener, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    wheels, escape = source_only
    config = write_config([plugin("dep_source")], host={"wheel_dir": str(wheels)})
    async with Host(config) as host:
        assert host.plugins["dep_source"].state == PluginState.READY, host.plugins["dep_source"].error
        answer = json.loads(await host.registry.execute("dep_source_build", {}))
    build = answer["build"]
    # the setup.py ran (the module exists and records it), but as a uid of its own, with nothing outside
    assert build["uid"] != 0
    assert build["wrote_outside"] is not True and not escape.exists()
    assert build["secret"] is False
    assert build["connected"] is False and listener[1] == []
    assert answer["file"].startswith(str(tmp_path / "state" / "envs"))
    assert "building qhtest_source-1.0.tar.gz from source, in a sandboxed build job" in caplog.text
    built = list((tmp_path / "state" / "built-wheels" / "dep_source").glob("*.whl"))
    assert [w.name for w in built] == ["qhtest_source-1.0-py3-none-any.whl"]


async def test_a_built_wheel_is_reused_by_the_next_environment(write_config, source_only, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    wheels, _ = source_only
    config = write_config([plugin("dep_source")], host={"wheel_dir": str(wheels)})
    async with Host(config) as host:
        assert host.plugins["dep_source"].state == PluginState.READY, host.plugins["dep_source"].error
    for env in (tmp_path / "state" / "envs").glob("dep_source-*"):  # the environment goes, the wheel stays
        subprocess.run(["rm", "-rf", str(env)], check=True)
    caplog.clear()
    async with Host(config) as host:
        assert host.plugins["dep_source"].state == PluginState.READY, host.plugins["dep_source"].error
        assert json.loads(await host.registry.execute("dep_source_build", {}))["build"]["uid"] != 0
    assert "from source" not in caplog.text


def marked_setup(marker: str) -> str:
    return ("import os\nfrom setuptools import setup\nos.makedirs('qhtest_source', exist_ok=True)\n"
            "with open('qhtest_source/__init__.py', 'w') as f:\n"
            f"    f.write('BUILD = ' + repr({{'uid': os.getuid(), 'marker': {marker!r}}}) + '\\n')\n"
            "setup(name='qhtest-source', version='1.0', packages=['qhtest_source'])\n")


async def test_a_project_built_again_installs_the_new_build_not_uvs_cached_one(write_config, wheels, tmp_path):
    """uv's cache knows a find-links wheel by its directory and file name: the same project built
    again (other code, same name) installed the first build's files, even with built-wheels/ and
    envs/ wiped (attack pass 56). What runs is the wheel the host built last."""
    config = write_config([plugin("dep_source")], host={"wheel_dir": str(wheels)})
    for marker in ("first", "second"):
        make_sdist(wheels, marked_setup(marker))
        for stale in [tmp_path / "state" / "built-wheels", *(tmp_path / "state" / "envs").glob("dep_source-*")]:
            subprocess.run(["rm", "-rf", str(stale)], check=True)
        async with Host(config) as host:
            assert host.plugins["dep_source"].state == PluginState.READY, host.plugins["dep_source"].error
            assert json.loads(await host.registry.execute("dep_source_build", {}))["build"]["marker"] == marker


async def test_a_failing_build_fails_that_plugin_only_and_says_why(write_config, wheels):
    make_sdist(wheels, "raise SystemExit('this package cannot be built here')\n")
    config = write_config([plugin("dep_source"), plugin("greeter")], host={"wheel_dir": str(wheels)})
    async with Host(config) as host:
        failed = host.plugins["dep_source"]
        assert failed.state == PluginState.FAILED
        assert "building qhtest_source-1.0.tar.gz from source failed" in failed.error
        assert "this package cannot be built here" in failed.error
        assert host.plugins["greeter"].state == PluginState.READY


async def test_build_requirements_come_as_wheels_and_are_checked(write_config, wheels):
    make_sdist(wheels, "from setuptools import setup\nsetup()\n",
               pyproject='[build-system]\nrequires = ["setuptools", "https://example.invalid/x.whl"]\n')
    config = write_config([plugin("dep_source")], host={"wheel_dir": str(wheels)})
    async with Host(config) as host:
        error = host.plugins["dep_source"].error
    assert "qhtest_source-1.0.tar.gz: pyproject.toml: build-system.requires[1]" in error
    assert "is not a plain requirement" in error or "direct reference" in error


async def test_no_sdist_anywhere_is_a_clear_error(write_config, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    config = write_config([plugin("dep_source")], host={"wheel_dir": str(wheels)})
    async with Host(config) as host:
        error = host.plugins["dep_source"].error
    assert "no source distribution of it (==1.0) was found in " + str(wheels) in error or \
        "installing dependencies failed" in error, error


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _pypi_reachable(), reason="needs PyPI (pyaes is fetched from it)")
async def test_pyaes_from_pypi_which_ships_no_wheel(write_config, tmp_path):
    """The real case: pyaes 1.6.1 (what Qanot's userbot plugin needs) is an sdist only on PyPI."""
    config = write_config([plugin("dep_pyaes")])
    async with Host(config) as host:
        assert host.plugins["dep_pyaes"].state == PluginState.READY, host.plugins["dep_pyaes"].error
        answer = json.loads(await host.registry.execute("aes_vector", {}))
    assert answer["ciphertext"] == "69c4e0d86a7b0430d8cdb78070b4c55a"
    assert answer["file"].startswith(str(tmp_path / "state" / "envs"))


def test_a_plugin_cannot_take_a_build_jobs_name(write_config):
    from qanot_host.errors import ConfigError
    config = write_config([plugin("sdist-build:dep_source")])
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.name: 'sdist-build:dep_source': ':' is reserved"):
        Host(config)


@pytest.mark.parametrize("kind", ["symlink", "private", "fifo"])
async def test_wheel_dir_gives_only_plain_files_anyone_may_read(write_config, tmp_path, kind):
    """The host copies the sdist where the build job's uid reads it: never a file only root could."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    secret = tmp_path / "root-only"
    secret.write_text("secret")
    secret.chmod(0o600)
    name = wheels / "qhtest_source-1.0.tar.gz"
    if kind == "symlink":
        name.symlink_to(secret)
    elif kind == "private":
        make_sdist(wheels, "from setuptools import setup\nsetup()\n").chmod(0o600)
    else:
        os.mkfifo(name)
    config = write_config([plugin("dep_source")], host={"wheel_dir": str(wheels)})
    async with Host(config) as host:
        error = host.plugins["dep_source"].error
    assert "qhtest_source-1.0.tar.gz" in error and ("every user may read" in error or "could not be fetched" in error)
    assert not any((tmp_path / "state" / "sdists").rglob("*.tar.gz"))


def test_an_index_page_cannot_send_the_host_to_files_or_this_machine():
    from qanot_host.sdists import _allowed_url
    page = "https://pypi.org/simple/x/"
    assert _allowed_url("https://pypi.org/packages/x-1.0.tar.gz", page)
    for url in ("file:///etc/shadow", "http://127.0.0.1:8080/x-1.0.tar.gz", "http://[::1]/x-1.0.tar.gz",
                "http://169.254.169.254/latest/meta-data/x-1.0.tar.gz", "ftp://pypi.org/x-1.0.tar.gz",
                "http://localhost/x-1.0.tar.gz", "http://[::ffff:127.0.0.1]/x-1.0.tar.gz"):
        assert not _allowed_url(url, page), url
    assert _allowed_url("http://127.0.0.1:3141/files/x-1.0.tar.gz", "http://127.0.0.1:3141/simple/x/")


def test_a_trickling_index_meets_the_deadline(tmp_path):
    """An index that sends a byte every half second cannot hold a plugin's start past its deadline."""
    import time

    from qanot_host.sdists import SdistNotFound, find_sdist
    from packaging.specifiers import SpecifierSet
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle():
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 100000\r\n\r\n")
        while not stop.is_set():
            try:
                conn.sendall(b"<")
            except OSError:
                return
            time.sleep(0.5)
        conn.close()

    threading.Thread(target=trickle, daemon=True).start()
    began = time.monotonic()
    try:
        with pytest.raises(SdistNotFound, match="deadline"):
            find_sdist("x", SpecifierSet(), str(tmp_path), wheel_dir=None, offline=False, timeout=2.0,
                       index_url=f"http://127.0.0.1:{server.getsockname()[1]}/simple")
    finally:
        stop.set()
        server.close()
    assert time.monotonic() - began < 5


def test_a_build_jobs_words_forge_no_log_line():
    from qanot_host.errors import DependencyError
    from qanot_host.source_builds import _build_system, _keep_wheel
    answer = json.dumps({"requires": ["x ; \nINFO qanot_host: forged"], "backend": "setuptools.build_meta",
                         "backend_path": []})
    with pytest.raises(DependencyError) as caught:
        _build_system("p", "x-1.0.tar.gz", answer)
    assert "\n" not in caught.value.detail
    answer = json.dumps({"filename": "x-1.0-py3-none-any.whl\nINFO forged", "wheel": ""})
    with pytest.raises(DependencyError) as caught:
        _keep_wheel("p", "x-1.0.tar.gz", answer, "/nonexistent")
    assert "\n" not in caught.value.detail and "not a wheel" in caught.value.detail


async def test_a_wheel_the_operator_adds_later_wins_over_an_old_build(write_config, source_only, tmp_path):
    from .conftest import make_wheel
    wheels, _ = source_only
    config = write_config([plugin("dep_source")], host={"wheel_dir": str(wheels)})
    async with Host(config) as host:
        assert json.loads(await host.registry.execute("dep_source_build", {}))["build"]["uid"] != "operator"
    make_wheel(wheels, "qhtest_source", "1.0", body="BUILD = {'uid': 'operator'}\n")
    for env in (tmp_path / "state" / "envs").glob("dep_source-*"):
        subprocess.run(["rm", "-rf", str(env)], check=True)
    async with Host(config) as host:
        assert json.loads(await host.registry.execute("dep_source_build", {}))["build"]["uid"] == "operator"


async def test_install_timeout_bounds_the_whole_environment_builds_included(write_config, tmp_path, wheels):
    """Two builds of 2 s each under install_timeout 3: each fits, both do not."""
    import time
    for name in ("qhslow_a", "qhslow_b"):
        make_sdist(wheels, f"import time\ntime.sleep(2)\nfrom setuptools import setup\nsetup(name={name!r}, "
                           "version='1.0')\n", name=name)
    plugins_dir = tmp_path / "plugins"
    (plugins_dir / "slow").mkdir(parents=True)
    (plugins_dir / "slow" / "plugin.json").write_text(json.dumps({"dependencies": ["qhslow-a", "qhslow-b"]}))
    (plugins_dir / "slow" / "plugin.py").write_text((Path(__file__).parent / "plugins" / "greeter" / "plugin.py")
                                                    .read_text())
    config = write_config([plugin("slow")], host={"wheel_dir": str(wheels), "install_timeout": 3},
                          plugins_dir=str(plugins_dir))
    began = time.monotonic()
    async with Host(config) as host:
        error = host.plugins["slow"].error
    assert "took longer than install_timeout=3 s" in error or "timed out after" in error, error
    assert time.monotonic() - began < 15


async def test_an_index_cannot_redirect_the_host_to_this_machine(tmp_path):
    """The index (on 127.0.0.1, so its own links are fetched) answers the file with a redirect to
    another service of this machine: refused, that service never asked."""
    import http.server

    from packaging.specifiers import SpecifierSet

    from qanot_host.sdists import SdistNotFound, find_sdist
    hits = []

    class Victim(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"internal")

        def log_message(self, *args):
            pass

    victim = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Victim)
    target = f"http://127.0.0.1:{victim.server_address[1]}/secret.tar.gz"

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/simple/"):
                body = b'<a href="/files/x-1.0.tar.gz">x-1.0.tar.gz</a>'
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_response(302)
                self.send_header("Location", target)
                self.end_headers()

        def log_message(self, *args):
            pass

    index = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    for server in (victim, index):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(SdistNotFound, match="redirects to"):
            await asyncio.to_thread(find_sdist, "x", SpecifierSet(), str(tmp_path), wheel_dir=None, offline=False,
                                    timeout=10, index_url=f"http://127.0.0.1:{index.server_address[1]}/simple")
    finally:
        for server in (victim, index):
            server.shutdown()
            server.server_close()
    assert hits == []
