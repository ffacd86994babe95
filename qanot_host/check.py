"""`qanot-host check`: every problem in config.json and the plugins' plugin.json, without running
any plugin code."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .config import directory_problems
from .discovery import find_plugin, manifest_problems, manifest_warnings, searched_paths, shadowed
from .environments import MAX_REQUIREMENTS, find_uv, requirement_problem
from .mcp_servers import bridge_config, mcp_server, mcp_tool_name, server_warnings, shown_url
from .plugin_secrets import resolve_config_secrets
from .registry import tool_name_problem
from .probe import probe_layers
from .sandbox_spec import withheld_permissions
from .settings import Config, PluginEntry
from .static import SCAN_MEMORY, scan_plugins
from .uids import UidMap, writable_by

__all__ = ["CheckReport", "check_config"]

KNOWN_ENTRY_KEYS = {"name", "enabled", "config"}
SCAN_TIMEOUT = 30.0  # reading one plugin's code (in a child process of bounded memory)


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: int = 0


def check_config(config: Config, raw_entries: list[object]) -> CheckReport:
    """raw_entries: config.json's "plugins" list as parsed JSON, to spot keys Qanot would ignore."""
    report = CheckReport()
    report.errors.extend(directory_problems(config, create=False))
    _report_layers(config, report)
    if config.host.wheel_dir is not None and not os.path.isdir(config.host.wheel_dir):
        report.errors.append(f"{config.path}: host.wheel_dir: {config.host.wheel_dir} is not a directory")
    if config.host.sandbox.identity and os.geteuid() == 0:  # the state_dir's uid table, once
        uid_problem = UidMap(config.host.state_dir, config.host.sandbox.uid_base).problem()
        if uid_problem:
            report.errors.append(uid_problem)
    enabled = {e.name for e in config.plugins if e.enabled}
    for index, entry in enumerate(config.plugins):
        raw = raw_entries[index] if index < len(raw_entries) else {}
        for key in sorted(set(raw) - KNOWN_ENTRY_KEYS) if isinstance(raw, dict) else ():
            report.warnings.append(f"{config.path}: plugins[{index}].{key}: unknown key, ignored")
        _check_plugin(config, index, entry, enabled, report)
    return report


def _check_plugin(config: Config, index: int, entry: PluginEntry, enabled: set[str], report: CheckReport) -> None:
    report.checked += 1
    problems = report.errors if entry.enabled else report.warnings
    if mcp_server(config, entry.name) is not None:
        _check_mcp_server(config, entry, problems, report)
        return
    label = f"plugin {entry.name}" + ("" if entry.enabled else " (disabled)")
    source = find_plugin(entry.name, config)
    if source is None:
        problems.append(f"{label}: not found: no {searched_paths(entry.name, config)}")
        return
    if source.problem:
        problems.append(f"{label}: {source.problem}")
        return
    for hidden in shadowed(source, config):
        report.warnings.append(f"{label}: {hidden} is never run: {source.directory}, earlier on the search path "
                               "(built-in plugins come first), has that name; give yours a name of its own")
    try:  # what `run` would resolve: here, in check's own environment (a service's may differ)
        resolve_config_secrets(entry.config, f"{config.path}: plugins[{index}].config")
    except ValueError as exc:
        report.warnings.append(f"{label}: {exc}: a start here would fail")
    problems.extend(f"{label}: {problem}" for problem in manifest_problems(source, entry, config))
    report.warnings.extend(f"{label}: {warning}" for warning in manifest_warnings(source, entry, config))
    manifest_path = os.path.join(source.directory, "plugin.json")
    for dep in source.manifest.plugin_deps:
        if dep not in enabled:
            problems.append(f"{label}: {manifest_path}: plugin_deps: {dep!r} is not an enabled plugin")
    if len(source.manifest.dependencies) > MAX_REQUIREMENTS:
        problems.append(f"{label}: {manifest_path}: dependencies: {len(source.manifest.dependencies)} given; "
                        f"at most {MAX_REQUIREMENTS} are taken")
    for index, req in enumerate(source.manifest.dependencies[:MAX_REQUIREMENTS]):
        problem = requirement_problem(req)
        if problem:
            problems.append(f"{label}: {manifest_path}: dependencies[{index}]: {problem}")
    if source.manifest.dependencies and find_uv() is None:
        problems.append(f"{label}: needs dependencies but uv is not installed")
    withheld = withheld_permissions(source.manifest.permissions, config.settings_for(entry.name).permissions)
    if withheld:
        report.warnings.append(f"{label}: plugin.json asks for {', '.join(withheld)}, not granted in "
                               f"config.json (host.plugins.{entry.name}.permissions): withheld")
    scanned = scan_plugins({entry.name: (source.directory, source.entry_file)}, SCAN_TIMEOUT).get(entry.name)
    if scanned is None:
        report.warnings.append(f"{label}: {source.entry_file}: its code is too large or too complex to read "
                               f"without running it (in {SCAN_TIMEOUT:g} s and {SCAN_MEMORY >> 20} MB): not checked")
    elif scanned["problem"]:
        problems.append(f"{label}: {scanned['problem']}")
    declared = set(scanned["tools"]) if scanned and scanned["tools"] is not None else None
    _check_settings(config, entry.name, declared, label, problems, report)


def _check_mcp_server(config: Config, entry: PluginEntry, problems: list[str], report: CheckReport) -> None:
    """What the server's worker would be given, resolved now: its command and the programs it may
    execute (a stdio server), or the one address it may reach (a remote one, itself unsandboxed)."""
    index, server = mcp_server(config, entry.name)  # type: ignore[misc]
    label = f"MCP server {entry.name}" + ("" if entry.enabled else " (disabled)")
    if find_uv() is None:
        problems.append(f"{label}: its worker needs the MCP SDK in an environment of its own, and uv is not "
                        "installed")
    try:
        _, _, programs = bridge_config(config, entry.name)
    except ValueError as exc:
        problems.append(f"{label}: {exc}")
        return
    if tool_name_problem(mcp_tool_name(entry.name, "t")):
        report.warnings.append(f"{label}: a tool of it whose name another plugin has would be registered as "
                               f"mcp_{entry.name}_TOOL, which Qanot cannot call, so such a tool is not registered; "
                               "a server name of letters, digits and _ avoids it")
    if programs is not None:
        report.warnings.extend(f"{label}: {problem}" for problem in server_warnings(config, entry.name, programs))
        runs = "any program of its root (permissions.subprocess)" \
            if config.settings_for(entry.name).permissions.subprocess else ", ".join(programs.executable)
        report.notes.append(f"{label}: runs {programs.command} {' '.join(server.args)}".rstrip()
                            + f" in its worker's sandbox; it may execute {runs}")
    else:
        report.warnings.append(f"{label}: {server.transport} at {shown_url(server.url)}: a remote server, which no "
                               "sandbox of this host covers; its worker may reach that address only")
    _check_settings(config, entry.name, None, label, problems, report)


def _check_settings(config: Config, name: str, declared: set[str] | None, label: str,
                    problems: list[str], report: CheckReport) -> None:
    """host.plugins.NAME: granted paths that are not there, or not writable by the plugin's uid, and
    tool_timeouts naming no tool the plugin declares."""
    settings = config.settings_for(name)
    key = f"{config.path}: host.plugins.{name}"
    grant = settings.permissions.filesystem
    uid = UidMap(config.host.state_dir, config.host.sandbox.uid_base).peek(name) \
        if config.host.sandbox.identity and os.geteuid() == 0 else os.geteuid()
    for index, path in enumerate(grant.read if grant else []):
        if not os.path.exists(path):
            problems.append(f"{label}: {key}.permissions.filesystem.read[{index}]: {path} does not exist")
    for index, path in enumerate(grant.write if grant else []):
        where = f"{label}: {key}.permissions.filesystem.write[{index}]: {path}"
        if not os.path.isdir(path):
            problems.append(f"{where} is not a directory")
        elif not writable_by(path, uid):
            problems.append(f"{where} is not writable by the plugin's uid {uid} (chown or chmod it)")
    if config.host.sandbox.enabled and not config.limits_for(name).memory_mb:
        report.warnings.append(f"{label}: limits.memory_mb is 0 (host.limits or host.plugins.{name}.limits): its "
                               "memory has no ceiling")
    restart = config.restart_for(name)
    if restart.backoff_initial > restart.backoff_max:
        report.warnings.append(f"{label}: restart.backoff_initial ({restart.backoff_initial:g} s) is over "
                               f"restart.backoff_max ({restart.backoff_max:g} s): every restart waits "
                               f"backoff_max")
    if settings.tool_timeouts:
        unknown = sorted(set(settings.tool_timeouts) - declared) if declared is not None else []
        if unknown and declared is not None:
            report.warnings.append(f"{label}: {key}.tool_timeouts: {', '.join(unknown)}: no such tool in the "
                                   f"plugin's code (it declares {', '.join(sorted(declared)) or 'none'})")


def _report_layers(config: Config, report: CheckReport) -> None:
    settings = config.host.sandbox
    if not settings.enabled:
        report.warnings.append(f"{config.path}: host.sandbox.enabled is false: plugins run without a sandbox")
        return
    switched_off = {"identity": "host.sandbox.identity is false: workers keep uid 0, the host's own (their "
                                "capabilities are dropped); for testing only",
                    **{name: "host.sandbox.namespaces is false: Landlock alone decides which host paths workers "
                             "may touch" for name in ("pid-namespace", "mount-namespace", "ipc-namespace",
                                                      "uts-namespace", "disk-quota")}}
    for layer, available, why in probe_layers(config.host.state_dir):
        off = not settings.identity if layer == "identity" else layer in switched_off and not settings.namespaces
        if off:
            (report.errors if settings.strict else report.warnings).append(
                f"sandbox layer {layer}: off: {switched_off[layer]}"
                + (" (host.sandbox.strict refuses every plugin)" if settings.strict else ""))
            continue
        if available:
            report.notes.append(f"sandbox layer {layer}: available{f' ({why})' if why else ''}")
        else:
            (report.errors if settings.strict else report.warnings).append(
                f"sandbox layer {layer}: not available here: {why}"
                + (" (host.sandbox.strict refuses every plugin)" if settings.strict else ""))
