"""Dependencies that ship only a source distribution: built into a wheel by a sandboxed build job,
never by the host itself, and cached per plugin."""

from __future__ import annotations

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
def source_only(tmp_path, setuptools_wheel, listener):
    """A wheel_dir holding setuptools' wheel and qhtest-source as an sdist only, whose setup.py
    tries to write outside, read a root-only file and connect to `listener`."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    os.link(setuptools_wheel, wheels / setuptools_wheel.name)
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


async def test_a_failing_build_fails_that_plugin_only_and_says_why(write_config, tmp_path, setuptools_wheel):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    os.link(setuptools_wheel, wheels / setuptools_wheel.name)
    make_sdist(wheels, "raise SystemExit('this package cannot be built here')\n")
    config = write_config([plugin("dep_source"), plugin("greeter")], host={"wheel_dir": str(wheels)})
    async with Host(config) as host:
        failed = host.plugins["dep_source"]
        assert failed.state == PluginState.FAILED
        assert "building qhtest_source-1.0.tar.gz from source failed" in failed.error
        assert "this package cannot be built here" in failed.error
        assert host.plugins["greeter"].state == PluginState.READY


async def test_build_requirements_come_as_wheels_and_are_checked(write_config, tmp_path, setuptools_wheel):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    os.link(setuptools_wheel, wheels / setuptools_wheel.name)
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
