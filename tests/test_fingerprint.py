"""A plugin directory's fingerprint decides whether a reload restarts a plugin and whether a lazy
plugin's cached tools still hold. Attack pass 27: it stopped at the 5000th file, so a plugin that
shipped 5000 small files sorting before plugin.py hid every later edit of its code from both."""

from __future__ import annotations

import logging
import os
import shutil

from qanot_host import Host
from qanot_host import fingerprint as fingerprint_module
from qanot_host.fingerprint import plugin_fingerprint

from .conftest import FIXTURE_PLUGINS, GREETER


def greeter_with_files(tmp_path, files: int):
    plugins_dir = tmp_path / "plugins"
    shutil.copytree(FIXTURE_PLUGINS / "greeter", plugins_dir / "greeter")
    for index in range(files):  # sorted before every file of the plugin's code
        (plugins_dir / "greeter" / f"a{index:05}").write_bytes(b"x")
    return plugins_dir


def edit(code) -> None:
    code.write_text(code.read_text().replace("Salom", "Assalomu alaykum"))


async def test_an_edit_after_five_thousand_files_restarts_the_plugin_at_reload(write_config, tmp_path):
    plugins_dir = greeter_with_files(tmp_path, 5000)
    config = write_config([GREETER], plugins_dir=str(plugins_dir))
    async with Host(config) as host:
        assert (await host.registry.execute("greet", {"name": "x"})).startswith("Salom, x!")
        edit(plugins_dir / "greeter" / "helpers.py")
        assert (await host.reload())["restarted"] == ["greeter"]
        assert (await host.registry.execute("greet", {"name": "x"})).startswith("Assalomu alaykum, x!")


async def test_a_lazy_plugins_cached_tools_do_not_outlive_an_edit_after_five_thousand_files(write_config, tmp_path):
    plugins_dir = greeter_with_files(tmp_path, 5000)
    config = write_config([GREETER], host={"activation": "lazy"}, plugins_dir=str(plugins_dir))
    async with Host(config) as host:
        assert "greeter_sleep" in host.registry.tool_names
    code = plugins_dir / "greeter" / "plugin.py"
    code.write_text(code.read_text().replace('"greeter_sleep"', '"greeter_nap"'))
    async with Host(config) as host:
        assert host.plugins["greeter"].idle_stops == 1  # listed anew, not from the cache
        assert "greeter_nap" in host.registry.tool_names and "greeter_sleep" not in host.registry.tool_names


def test_a_file_past_the_content_budget_still_counts_by_what_no_write_keeps(tmp_path, monkeypatch):
    """Past the budget a file counts by its metadata: an edit that keeps its size and puts its mtime
    back still changes the change time."""
    monkeypatch.setattr(fingerprint_module, "MAX_HASHED_BYTES", 10)
    (tmp_path / "a_small").write_bytes(b"12345")
    big = tmp_path / "b.py"
    big.write_text("VALUE = 1\n")
    before = plugin_fingerprint(str(tmp_path))
    assert plugin_fingerprint(str(tmp_path)) == before  # the same content, the same fingerprint
    times = os.stat(big)
    big.write_text("VALUE = 2\n")
    os.utime(big, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert os.stat(big).st_mtime_ns == times.st_mtime_ns and plugin_fingerprint(str(tmp_path)) != before


def test_content_decides_and_bytecode_caches_and_link_targets_count(tmp_path):
    """Attack pass 29: reload ignored __pycache__ (a planted .pyc runs in place of its source) and what
    a link in the plugin's directory points to."""
    (tmp_path / "plugin.py").write_text("A = 1\n")
    elsewhere = tmp_path.parent / f"{tmp_path.name}-shared.py"
    elsewhere.write_text("B = 1\n")
    (tmp_path / "shared.py").symlink_to(elsewhere)
    before = plugin_fingerprint(str(tmp_path))
    os.utime(tmp_path / "plugin.py")  # touched, not changed
    assert plugin_fingerprint(str(tmp_path)) == before
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "plugin.cpython-311.pyc").write_bytes(b"\0" * 64)
    with_cache = plugin_fingerprint(str(tmp_path))
    assert with_cache != before
    elsewhere.write_text("B = 2\n")
    assert plugin_fingerprint(str(tmp_path)) != with_cache
    after_link = plugin_fingerprint(str(tmp_path))
    (tmp_path / "plugin.py").write_text("A = 2\n")
    assert plugin_fingerprint(str(tmp_path)) != after_link


async def test_a_directory_too_large_to_walk_counts_as_changed_and_says_so(write_config, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(fingerprint_module, "MAX_FILES", 50)
    plugins_dir = greeter_with_files(tmp_path, 60)
    config = write_config([GREETER], plugins_dir=str(plugins_dir))
    async with Host(config) as host:
        with caplog.at_level(logging.WARNING, logger="qanot_host.fingerprint"):
            assert (await host.reload())["restarted"] == ["greeter"]
        assert (await host.registry.execute("greet", {"name": "x"})).startswith("Salom, x!")
    assert f"{plugins_dir / 'greeter'} holds more than 50 files" in caplog.text
