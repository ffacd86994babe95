"""Qanot's plugin API as the document describes it (pure functions: no worker needed)."""

from __future__ import annotations

import json

import pytest

from qanot_worker.plugin_api import (QANOT_API_VERSION, ManifestError, Plugin, PluginManifest, ToolDef,
                                     load_manifest, parse_version, tool, validate_tool_params)


def test_document_examples_of_validate_tool_params():
    schema = {"type": "object", "required": ["city"],
              "properties": {"city": {"type": "string"}, "units": {"type": "string"}}}
    assert validate_tool_params({"city": "Tashkent", "units": 42}, schema) == [
        "Parameter 'units' expected string, got int"]
    assert validate_tool_params({}, schema) == ["Missing required parameter: city"]
    assert validate_tool_params({"city": "Samarkand"}, schema) == []


@pytest.mark.parametrize("kind, good, bad", [
    ("integer", 3, True), ("integer", 3, 2.5), ("number", 2.5, False), ("boolean", True, 1),
    ("array", [1], {"a": 1}), ("object", {}, []), ("string", "", None),
])
def test_basic_type_matching(kind, good, bad):
    schema = {"properties": {"x": {"type": kind}}}
    assert validate_tool_params({"x": good}, schema) == []
    assert validate_tool_params({"x": bad}, schema) == [
        f"Parameter 'x' expected {kind}, got {type(bad).__name__}"]


def test_plugin_defaults_and_collect_tools():
    class Weather(Plugin):
        name = "weather"

        @tool(name="weather_get", description="now", parameters={"type": "object", "properties": {"c": {}}})
        async def get(self, params):
            return "sunny"

        @tool(name="weather_default", description="default params")
        async def default(self, params):
            return "x"

    plugin = Weather()
    assert (plugin.version, plugin.tools_md, plugin.soul_append, plugin.description) == ("0.1.0", "", "", "")
    tools = {t.name: t for t in plugin.get_tools()}
    assert set(tools) == {"weather_get", "weather_default"}
    assert isinstance(tools["weather_get"], ToolDef)
    assert tools["weather_default"].parameters == {"type": "object", "properties": {}}
    assert tools["weather_get"].handler.__self__ is plugin


def test_manifest_defaults_from_the_directory_name(tmp_path):
    directory = tmp_path / "weather"
    directory.mkdir()
    manifest, warnings = load_manifest(str(directory))
    assert warnings == []
    assert manifest == PluginManifest(name="weather", version="0.1.0", license="MIT")


def test_manifest_fields_as_documented(tmp_path):
    directory = tmp_path / "w"
    directory.mkdir()
    data = {"name": "weather", "version": "1.0.0", "description": "d", "author": "a",
            "dependencies": ["aiohttp>=3.9"], "plugin_deps": ["cloud_reporter"], "required_config": ["api_key"],
            "min_qanot_version": "2.0.0", "homepage": "https://example.com", "license": "Apache-2.0"}
    (directory / "plugin.json").write_text(json.dumps(data))
    manifest, warnings = load_manifest(str(directory))
    assert warnings == []
    for key, value in data.items():
        assert getattr(manifest, key) == value


@pytest.mark.parametrize("content, why", [
    ("{not json", "is not valid JSON"),
    ("[]", "must hold a JSON object"),
    ('{"dependencies": "aiohttp"}', "dependencies: Expected `array`, got `str`"),
    ('{"min_qanot_version": "soon"}', "min_qanot_version: not a version"),
])
def test_broken_manifest_falls_back_with_a_warning_naming_the_file(tmp_path, content, why):
    directory = tmp_path / "weather"
    directory.mkdir()
    (directory / "plugin.json").write_text(content)
    manifest, warnings = load_manifest(str(directory))
    assert manifest == PluginManifest(name="weather")
    [warning] = warnings
    assert warning.startswith(str(directory / "plugin.json") + ": ") and why in warning
    with pytest.raises(ManifestError, match="plugin.json: "):
        load_manifest(str(directory), strict=True)


def test_versions_compare_numerically():
    assert parse_version("2.10.0") > parse_version("2.9.1")
    assert parse_version("v2.0.0rc1") == (2, 0, 0)
    assert parse_version(QANOT_API_VERSION) >= parse_version("2.0.0")
    with pytest.raises(ValueError):
        parse_version("two")


@pytest.mark.parametrize("params", [
    {"city": "Tashkent", "units": 42}, {}, {"city": "x"}, {"city": None, "days": True}, {"days": 3, "city": "y"},
    [], {"city": "x", "tags": ["a"], "extra": object()},
])
def test_compiled_validator_agrees_with_validate_tool_params(params):
    from qanot_worker.plugin_api import compile_validator
    schema = {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "units": {"type": "string"}, "days": {"type": ["integer", "null"]},
        "tags": {"type": "array"}, "any": {}}}
    assert compile_validator(schema)(params) == validate_tool_params(params, schema)
