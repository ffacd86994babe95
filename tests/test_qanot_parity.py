"""What Qanot's plugins rely on beyond the base class, from a real sandboxed worker: the `qanot`
package a worker sees, `plugins.<name>` imports, SecretRefs the host resolves and keeps out of its
output, a place in the workspace, lenient plugin.json and required_config, duplicate tool names."""

from __future__ import annotations

import json
import logging
import os
import zipfile

import pytest

from qanot_host.host import Host
from qanot_host.supervisor import PluginState

from .conftest import GREETER, check_report, plugin

STYLE = "qanot_style"


def style(**config) -> dict:
    return plugin(STYLE, token="t0ken-plain", region="uz", **config)


async def test_the_worker_sees_qanot_2_0_4_as_a_shim_even_with_real_qanot_installed(write_config):
    pytest.importorskip("qanot", reason="the test extra installs the real qanot==2.0.4 in the host's environment")
    async with Host(write_config([style()])) as host:
        info = json.loads(await host.registry.execute("qs_info", {}))
    assert info["qanot_version"] == "2.0.4"
    assert "_shim" in info["qanot_file"] or "runtime" in info["qanot_file"], info["qanot_file"]
    assert "site-packages" not in info["qanot_file"]
    assert info["module"] == "plugins.qanot_style.impl"
    assert info["manifest_version"] == "7"  # Qanot's PluginManifest.from_file, str()-ing a number
    assert (info["resolved_plain"], info["resolved_none"]) == ("plain", "")
    assert info["read_check"] == "System directory blocked: /etc"


async def test_a_plugin_imports_itself_as_plugins_name_and_nothing_else_of_plugins(write_config):
    async with Host(write_config([style(), GREETER])) as host:
        run = host.registry.execute
        assert await run("qs_import", {"module": "plugins.qanot_style.impl"}) == "imported plugins.qanot_style.impl"
        other = await run("qs_import", {"module": "plugins.greeter"})
        assert other.startswith("ModuleNotFoundError") and "can import only itself" in other
        assert (await run("qs_import", {"module": "plugins.greeter.helpers"})).startswith("ModuleNotFoundError")


async def test_duplicate_tool_names_keep_the_later_one_as_qanot_does(write_config, caplog):
    async with Host(write_config([style()])) as host:
        assert await host.registry.execute("qs_twice", {}) == "second"
        assert host.registry.get("qs_twice").description == "second"
    assert any("names tool 'qs_twice' twice" in r.getMessage() for r in caplog.records)


async def test_missing_required_config_warns_and_loads_as_qanot_does_unless_strict(write_config, caplog):
    config = write_config([plugin(STYLE, token="x")])
    async with Host(config) as host:
        assert host.plugins[STYLE].state == PluginState.READY
    warning = [r.getMessage() for r in caplog.records if "required_config" in r.getMessage()]
    assert warning and "region" in warning[0] and "plugin.json" in warning[0]
    assert any("version: expected text, got a number; read as '7'" in r.getMessage() for r in caplog.records)
    assert "required_config: missing from the plugin's config in config.json: region" in check_report(config, warnings=True)
    strict = write_config([plugin(STYLE, token="x")], host={"strict_required_config": True})
    async with Host(strict) as host:
        assert host.plugins[STYLE].state == PluginState.FAILED
        assert "region (host.strict_required_config refuses it)" in host.plugins[STYLE].error


# ---- secrets ------------------------------------------------------------------------------------------

SECRET = "s3cr3t-Value-9f2"


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "secrets" / "token"
    path.parent.mkdir()
    path.write_text(SECRET + "\n")
    path.chmod(0o600)
    return path


async def test_secret_refs_are_resolved_by_the_host_and_never_printed(write_config, secret_file, monkeypatch,
                                                                       caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("QS_REGION_SECRET", "region-from-env")
    config = write_config([plugin(STYLE, token={"file": str(secret_file)}, region={"env": "QS_REGION_SECRET"},
                                  other={"env": "X", "y": 1})])
    async with Host(config) as host:
        info = json.loads(await host.registry.execute("qs_info", {}))
        # strings in setup(); the worker holds neither the variable nor a grant to the file
        assert info["config"]["token"] == SECRET and info["config"]["region"] == "region-from-env"
        assert info["config"]["other"] == {"env": "X", "y": 1}  # not a SecretRef: the plugin's own data
        assert info["env_token"] is None
        leak = await host.registry.execute("qs_leak", {})
        assert SECRET not in leak and "[secret config.token]" in leak
        with pytest.raises(Exception) as raised:
            await host.registry.invoke("qs_leak", {})
        assert SECRET not in str(raised.value)
        status = json.dumps(host.status())
        assert SECRET not in status and "region-from-env" not in status
        await host.stop()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "the token is [secret config.token]" in logged
    assert SECRET not in logged and "region-from-env" not in logged


async def test_a_secret_in_a_setup_error_is_redacted_too(write_config, secret_file, caplog):
    config = write_config([plugin(STYLE, token={"file": str(secret_file)}, region="uz", leak_on_setup=True)])
    async with Host(config) as host:
        error = host.plugins[STYLE].error
    assert "cannot log in with token [secret config.token]" in error and SECRET not in error
    assert SECRET not in "\n".join(r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("ref, why", [
    ({"env": "QS_NEVER_SET_ANYWHERE"}, "the environment variable 'QS_NEVER_SET_ANYWHERE' it names is not set"),
    ({"file": "/nonexistent/secret"}, "Secret file not found: /nonexistent/secret"),
    ({"file": "LINK"}, "Secret file is a symlink (security risk)"),
    ({"env": "QS_NOT_UTF8"}, "the environment variable 'QS_NOT_UTF8' it names holds bytes that are not UTF-8"),
])
async def test_a_secret_that_cannot_be_resolved_fails_that_plugin_naming_the_key(write_config, tmp_path, ref, why,
                                                                                 secret_file, monkeypatch):
    monkeypatch.setenv("QS_NOT_UTF8", "Secret\udcffPassword")  # a byte that is not UTF-8 (attack pass 60)
    if ref.get("file") == "LINK":
        link = tmp_path / "link"
        link.symlink_to(secret_file)
        ref = {"file": str(link)}
    config = write_config([plugin(STYLE, token=ref, region="uz"), GREETER])
    async with Host(config) as host:
        failed = host.plugins[STYLE]
        assert failed.state == PluginState.FAILED
        assert "plugins[0].config['token']: " in failed.error and why in failed.error, failed.error
        assert host.plugins["greeter"].state == PluginState.READY


# ---- the workspace -----------------------------------------------------------------------------------

async def test_a_plugin_writes_its_own_place_in_the_workspace_and_nowhere_else_there(write_config, tmp_path):
    workspace = tmp_path / "workspace"
    async with Host(write_config([style(), GREETER])) as host:
        run = host.registry.execute
        own = await run("qs_write", {"path": "qanot_style/notes/a.txt"})
        assert own == str(workspace / STYLE / "notes" / "a.txt")
        assert (workspace / STYLE / "notes" / "a.txt").read_text() == "written"
        safe = await run("qs_write", {"path": "qanot_style/b.txt", "safe": True})
        assert safe == str(workspace / STYLE / "b.txt")
        for outside in ("SOUL.md", "greeter/x.txt", "x.txt"):
            result = await run("qs_write", {"path": outside})
            assert result.startswith(("PermissionError", "OSError", "FileNotFoundError")), (outside, result)
        assert not (workspace / "x.txt").exists() and not (workspace / "greeter" / "x.txt").exists()
        assert (workspace / "greeter").is_dir()  # made for every plugin by the host


async def test_workspace_false_gives_no_place_and_a_grant_over_another_plugins_place_is_refused(write_config,
                                                                                                tmp_path):
    config = write_config([style()], host={"plugins": {STYLE: {"workspace": False}}})
    async with Host(config) as host:
        result = await host.registry.execute("qs_write", {"path": "qanot_style/a.txt"})
        assert not result.startswith("/"), result
    assert not (tmp_path / "workspace" / STYLE).exists()
    from qanot_host.config import load_config
    from qanot_host.errors import ConfigError
    (tmp_path / "workspace" / STYLE).mkdir()
    greedy = write_config([style(), GREETER], host={"plugins": {"greeter": {"permissions": {
        "filesystem": {"write": [str(tmp_path / "workspace" / STYLE)]}}}}})
    with pytest.raises(ConfigError, match="plugin qanot_style's own place in the workspace"):
        load_config(greedy)


# ---- packaging -----------------------------------------------------------------------------------------

def test_the_wheel_ships_the_builtin_plugins_and_the_worker_shim(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), root], capture_output=True, text=True, timeout=300)
    if built.returncode != 0 and "bdist_wheel" in built.stderr:
        built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), root],
                               capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("qanot_host-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("qanot_host/builtin_plugins/echo/plugin.py", "qanot_host/builtin_plugins/weather/plugin.json",
                 "qanot_worker/_shim/qanot/plugins/base.py", "qanot_worker/_shim/qanot/secrets.py",
                 "qanot_worker/_shim/qanot/fs_safe.py"):
        assert name in names, name
    # Installed from the wheel (not this checkout), the example config finds its built-in plugins.
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"plugins": ["echo", "calc"], "workspace_dir": str(tmp_path / "ws"),
                                  "host": {"state_dir": str(tmp_path / "state")}}))
    env = {**os.environ, "PYTHONPATH": str(unpacked)}
    listed = subprocess.run([sys.executable, "-c", "import qanot_host, sys; print(qanot_host.__file__); "
                             "from qanot_host.cli import main; sys.argv[1:] = ['tools', '--config', sys.argv[1]]; "
                             "main()", str(config)], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith(str(unpacked)), listed.stdout
    assert "echo" in listed.stdout and "calc" in listed.stdout
