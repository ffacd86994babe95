"""The worker's `qanot.plugins.base` against Qanot 2.0.4's own (installed from PyPI for the tests):
each expectation runs against both, so a difference shows up as a failure naming the one that differs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import qanot_worker
import qanot_worker.plugin_api as ours
from qanot_host.schema import compile_validator

real = pytest.importorskip("qanot.plugins.base", reason="the test extra installs qanot==2.0.4")
SHIM = Path(qanot_worker.__file__).parent / "_shim" / "qanot"


@pytest.fixture(params=["qanot-host", "qanot-2.0.4"])
def api(request):
    return ours if request.param == "qanot-host" else real


def test_document_examples_of_validate_tool_params(api):
    schema = {"type": "object", "required": ["city"],
              "properties": {"city": {"type": "string"}, "units": {"type": "string"}}}
    assert api.validate_tool_params({"city": "Tashkent", "units": 42}, schema) == [
        "Parameter 'units' expected string, got int"]
    assert api.validate_tool_params({}, schema) == ["Missing required parameter: city"]
    assert api.validate_tool_params({"city": "Samarkand"}, schema) == []


@pytest.mark.parametrize("kind, good, bad", [
    ("integer", 3, True), ("integer", 3, 2.5), ("number", 2.5, False), ("boolean", True, 1),
    ("array", [1], {"a": 1}), ("object", {}, []), ("string", "", None), ("array", [], (1,)),
])
def test_basic_type_matching(api, kind, good, bad):
    schema = {"properties": {"x": {"type": kind}}}
    assert api.validate_tool_params({"x": good}, schema) == []
    assert api.validate_tool_params({"x": bad}, schema) == [
        f"Parameter 'x' expected {kind}, got {type(bad).__name__}"]


@pytest.mark.parametrize("params, schema, errors", [
    ([], {}, ["Parameters must be a dict, got list"]),
    ({}, "schema", ["Schema must be a dict, got str"]),
    ({"a": 1}, {"properties": ["a"]}, []),
    ({}, {"required": "a"}, []),
    ({}, {"required": ["a", 5, None, "b", "a"]},
     ["Missing required parameter: a", "Missing required parameter: b", "Missing required parameter: a"]),
    ({"a": None}, {"required": ["a"]}, []),
    ({"a": 1, "b": "x"}, {"properties": {"a": "integer", "b": {"type": ""}}}, []),
    ({"a": 1, "extra": 2}, {"properties": {"a": {"type": "null"}}, "additionalProperties": False}, []),
    ({"b": 1, "a": "x"}, {"required": ["c"], "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}},
     ["Missing required parameter: c", "Parameter 'b' expected string, got int",
      "Parameter 'a' expected integer, got str"]),
])
def test_malformed_schemas_and_odd_params_as_qanot(api, params, schema, errors):
    assert api.validate_tool_params(params, schema) == errors


def test_a_list_of_types_is_where_qanot_raises_and_the_worker_checks():
    schema = {"properties": {"x": {"type": ["integer", "null"]}}}
    with pytest.raises(TypeError):
        real.validate_tool_params({"x": 1}, schema)
    assert ours.validate_tool_params({"x": 1}, schema) == []
    assert ours.validate_tool_params({"x": "a"}, schema) == ["Parameter 'x' expected integer or null, got str"]


@pytest.mark.parametrize("params", [
    {"city": "Tashkent", "units": 42}, {}, {"city": "x"}, {"city": None, "days": True}, {"days": 3, "city": "y"},
    [], {"city": "x", "tags": ["a"], "extra": object()}, {"city": 1.5, "n": False},
])
def test_host_validator_agrees_with_qanot(params):
    schema = {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "units": {"type": "string"}, "n": {"type": "number"},
        "tags": {"type": "array"}, "any": {}}}
    assert compile_validator(schema)(params) == real.validate_tool_params(params, schema)


def test_tool_decorator_and_tooldef_fields(api):
    @api.tool("t", "d")
    async def handler(params):
        return "x"

    assert handler._tool_def == {"name": "t", "description": "d",
                                 "parameters": {"type": "object", "properties": {}}}
    assert api.tool("t", "d", {})(lambda p: p)._tool_def["parameters"] == {}
    definition = api.ToolDef("t", "d", {}, handler)  # positional, as Qanot's plugins build them
    assert (definition.name, definition.handler) == ("t", handler)
    with pytest.raises(TypeError):
        api.ToolDef(name="t", description="d", parameters={})


def test_plugin_is_abstract_with_qanot_defaults(api):
    with pytest.raises(TypeError, match="abstract"):
        api.Plugin()

    class Bare(api.Plugin):
        def get_tools(self):
            return []

    plugin = Bare()
    assert (plugin.name, plugin.description, plugin.version, plugin.tools_md, plugin.soul_append) == (
        "", "", "0.1.0", "", "")
    assert (plugin.get_wal_patterns(), plugin.get_prompt_sections(), plugin.get_template_dir(),
            plugin.get_cron_jobs(), plugin.get_commands(), plugin.get_template_vars()) == ([], [], None, [], [], {})
    import asyncio
    run = asyncio.run
    assert run(plugin.setup({})) is None and run(plugin.teardown()) is None
    assert run(plugin.on_pre_turn("u", "m")) is None and run(plugin.on_post_turn("u", "m", "r")) is None
    assert run(plugin.on_tool_use("u", "t", {}, "r")) is None and run(plugin.on_error("t", ValueError())) is None
    assert run(plugin.on_startup()) is None and run(plugin.on_shutdown()) is None
    assert run(plugin.on_compaction("u", 10, 5)) is None


def test_collect_tools_finds_what_qanots_finds(api):
    class Marked:
        _tool_def = {"name": "callable_object", "description": "", "parameters": {}}

        def __call__(self, params):
            return "x"

    class Tools(api.Plugin):
        def __init__(self):
            @api.tool("instance_attribute", "on the instance")
            async def loose(params):
                return "x"
            self.loose = loose
            self.obj = Marked()
            self.not_callable = type("N", (), {"_tool_def": {}})()

        def get_tools(self):
            return self._collect_tools()

        @property
        def broken(self):
            raise RuntimeError("a raising property does no harm")

        @api.tool("zeta_tool", "named last, found first")
        async def aaa(self, params):
            return "a"

        @staticmethod
        @api.tool("static_tool", "a staticmethod")
        async def static(params):
            return "s"

        @api.tool("alpha_tool", "named first, found last")
        async def zzz(self, params):
            return "z"

    names = [t.name for t in Tools().get_tools()]
    assert names == ["zeta_tool", "instance_attribute", "callable_object", "static_tool", "alpha_tool"]


def test_manifest_is_qanots_dataclass_with_permissions_as_extra(api, tmp_path):
    assert [f for f in api.PluginManifest.__dataclass_fields__][:10] == [
        "name", "version", "description", "author", "dependencies", "plugin_deps", "required_config",
        "min_qanot_version", "homepage", "license"]
    assert api.PluginManifest("w", "1.0").version == "1.0"
    assert api.PluginManifest.default("w") == api.PluginManifest(name="w")
    directory = tmp_path / "weather"
    directory.mkdir()
    path = directory / "plugin.json"
    data = {"name": "weather", "version": 2, "description": "d", "author": None, "dependencies": ["aiohttp>=3.9"],
            "plugin_deps": "x", "required_config": [1, None], "min_qanot_version": "2.0.0", "license": "Apache-2.0"}
    path.write_text(json.dumps(data))
    manifest = api.PluginManifest.from_file(path)
    assert (manifest.name, manifest.version, manifest.author, manifest.dependencies, manifest.plugin_deps,
            manifest.required_config, manifest.license) == (
        "weather", "2", "", ["aiohttp>=3.9"], [], ["1", "None"], "Apache-2.0")
    for broken in ("{not json", "[]", '{"name": null}'):
        path.write_text(broken)
        assert api.PluginManifest.from_file(path).name == "weather"
    if api is ours:
        path.write_text(json.dumps({"permissions": ["network"]}))
        assert api.PluginManifest.from_file(path).permissions == ["network"]


def _public_names(path: Path) -> set[str]:
    spec = importlib.util.spec_from_file_location("star_import_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not hasattr(module, "__all__")
    return {name for name in vars(module) if not name.startswith("_")}


def test_star_import_gives_qanots_names_and_version():
    import qanot
    assert _public_names(SHIM / "plugins" / "base.py") == {n for n in vars(real) if not n.startswith("_")}
    assert ours.QANOT_VERSION == qanot.__version__ == "2.0.4"


def test_extension_points_are_bounded_before_they_cross_the_wire():
    """What a plugin's extension points return is cut to what the host decodes without risk (the third
    attacker's F1: free-form values once let one frame become gigabytes in the host), each cut said."""
    import msgspec

    from qanot_worker import protocol as p
    from qanot_worker.extensions import read_extensions

    class Greedy(ours.Plugin):
        def get_tools(self):
            return []

        def get_prompt_sections(self):
            return [{"name": "nested", "content": {"a": [[]]}}, *({"name": f"s{i}", "content": "x"} for i in range(99))]

        def get_cron_jobs(self):
            return [{f"k{i}": "v" for i in range(p.MAX_KEYS + 1)}, {"name": "ok", "schedule": "* * * * *"}]

        def get_template_vars(self):
            return {f"{{v{i}}}": str(i) for i in range(p.MAX_TEMPLATE_VARS + 10)}

        def get_commands(self):
            return [{"command": f"c{i}", "handler": print} for i in range(p.MAX_ITEMS + 1)]

    extensions, handlers = read_extensions(Greedy())
    assert len(extensions.prompt_sections) == p.MAX_ITEMS and extensions.prompt_sections[0]["name"] == "s0"
    assert extensions.cron_jobs == [{"name": "ok", "schedule": "* * * * *"}]
    assert len(extensions.template_vars) == p.MAX_TEMPLATE_VARS
    assert len(extensions.commands) == len(handlers) == p.MAX_ITEMS
    said = "\n".join(extensions.problems)
    assert "get_prompt_sections()[0]" in said and f"the first {p.MAX_ITEMS} are taken" in said
    assert "get_cron_jobs()[0]" in said and "get_template_vars() returned" in said and "get_commands() returned" in said
    # and the host decodes it as it came
    wire = msgspec.msgpack.encode(p.ToolList(1, [], extensions))
    assert msgspec.msgpack.decode(wire, type=p.WorkerMessage).extensions == extensions


def test_a_hooks_value_is_decoded_by_the_host_only_within_bounds():
    import msgspec

    from qanot_worker import protocol as p

    long_text = "x" * (4 * p.MAX_HOOK_VALUE)  # a string costs what it weighs: any length
    assert p.decode_hook_value(p.HookResult.encode_value(long_text)) == long_text
    assert p.decode_hook_value(p.HookResult.encode_value({"a": [1, None]})) == {"a": [1, None]}
    with pytest.raises(ValueError, match="at most"):
        p.decode_hook_value(msgspec.Raw(b"\xdd" + (10**6).to_bytes(4, "big") + b"\x90" * 10**6))


def test_the_host_keeps_a_bounded_copy_of_extension_values_however_large(caplog):
    """A worker's plugin returned one 60 MB template variable, which the host kept for the worker's
    life (attack pass 52): each string is cut at what its readers take at most, and all of them
    together at 1 MiB, items past it left out; what is within bounds is kept as it came."""
    import msgspec

    from qanot_host.offered import MAX_EXTENSION_STRING, MAX_EXTENSION_TEXT, kept_extensions
    from qanot_worker import protocol as p

    within = p.Extensions(wal_patterns=[("remember (.*)", "fact", True)], template_vars={"{{REGION}}": "uz"},
                          prompt_sections=[{"name": "s", "content": "text", "order": 3}],
                          commands=[p.CommandSpec("c", "does c")], template_dir="/t")
    assert kept_extensions(within, "fine") == within and "fine" not in caplog.text
    hoard = p.Extensions(
        template_vars={"{{BIG}}": "x" * 60_000_000, **{f"{{{{V{i}}}}}": "y" * 100_000 for i in range(200)}},
        prompt_sections=[{"k" * 100_000: "z" * 100_000} for _ in range(64)],
        wal_patterns=[("p" * 1_000_000, "c" * 100_000, False)], template_dir="/" * 100_000,
        commands=[p.CommandSpec("n" * 100_000, "d" * 100_000)])
    kept = kept_extensions(hoard, "hoard")
    assert len(kept.template_vars["{{BIG}}"]) == MAX_EXTENSION_STRING
    text = msgspec.json.encode(kept)
    assert len(text) < MAX_EXTENSION_TEXT + 2 * MAX_EXTENSION_STRING  # the item that crossed the line, and syntax
    assert 0 < len(kept.template_vars) < 201 and kept.prompt_sections == [] and kept.commands == []
    assert "over 1048576 in all: cut" in kept.problems[-1]
    assert "plugin hoard: its extension points returned strings over 65536 characters" in caplog.text
