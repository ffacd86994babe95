"""config.json: Qanot's keys, as Qanot reads them, plus qanot-host's own settings under "host".

Qanot's config.json holds much more than plugins (models, bots, ...): unknown top-level keys are
left alone. Inside "host" every key is ours, so an unknown one there is a typo and is refused.
Relative paths are taken from the directory that holds config.json.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Annotated, Any, Literal

import msgspec

from .errors import ConfigError
from .schema import json_problem

__all__ = ["Config", "PluginEntry", "HostSettings", "PluginSettings", "RestartSettings", "Limits", "DEFAULT_LIMITS",
           "directory_problems",
           "load_config", "parse_config"]

log = logging.getLogger("qanot_host.config")

Seconds = Annotated[float, msgspec.Meta(gt=0)]


class PluginEntry(msgspec.Struct):
    """One item of Qanot's "plugins" list."""

    name: str
    enabled: bool = True
    config: dict[str, Any] = {}


class RestartSettings(msgspec.Struct, forbid_unknown_fields=True):
    """Defaults from Erlang/OTP supervisors and jupyter_client's restarter (see restarter.py)."""

    policy: Literal["permanent", "transient", "never"] = "permanent"
    max_restarts: Annotated[int, msgspec.Meta(ge=0)] = 5
    window: Seconds = 60.0
    backoff_initial: Annotated[float, msgspec.Meta(ge=0)] = 0.5
    backoff_max: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    stable_after: Annotated[float, msgspec.Meta(ge=0)] = 10.0


class Limits(msgspec.Struct, forbid_unknown_fields=True):
    """Ceilings for a plugin. Each key left out takes the host's value, else the default below.

    max_rss_mb, max_cpu_seconds and max_calls recycle a worker (watched with psutil), and so does
    workspace_mb (its place in the workspace, measured by the host: it is on the host's disk); the others
    are the kernel's to enforce, every worker under them from its first instruction: memory_mb
    (memory cgroup; 0 turns it off), disk_mb (the data directory's file system; 0: a plain
    directory, no ceiling), tmp_mb (/tmp and
    /dev/shm, in memory), cpu_weight (its share of the CPU against other plugins, 100 by default)
    and cpu_max (at most that many cores), and log_lines_per_second of its stdout and stderr in
    the host's log (the rest counted, not logged).
    """

    max_rss_mb: Annotated[float, msgspec.Meta(gt=0)] | None = None
    max_cpu_seconds: Seconds | None = None
    max_calls: Annotated[int, msgspec.Meta(gt=0)] | None = None
    memory_mb: Annotated[int, msgspec.Meta(ge=0)] | None = None
    disk_mb: Annotated[int, msgspec.Meta(ge=0)] | None = None
    workspace_mb: Annotated[int, msgspec.Meta(ge=0)] | None = None
    tmp_mb: Annotated[int, msgspec.Meta(ge=1)] | None = None
    cpu_weight: Annotated[int, msgspec.Meta(ge=1, le=10000)] | None = None
    cpu_max: Annotated[float, msgspec.Meta(gt=0)] | None = None
    log_lines_per_second: Annotated[float, msgspec.Meta(gt=0)] | None = None

    def over(self, base: "Limits") -> "Limits":
        """These limits, with what they leave out taken from `base`."""
        return Limits(**{name: getattr(self, name) if getattr(self, name) is not None else getattr(base, name)
                         for name in self.__struct_fields__})


DEFAULT_LIMITS = Limits(memory_mb=1024, disk_mb=1024, workspace_mb=256, tmp_mb=64, cpu_weight=100,
                        log_lines_per_second=50)


class NetworkGrant(msgspec.Struct, forbid_unknown_fields=True):
    """network (or database) narrowed: {"ports": [443]} reaches any host on those TCP ports;
    {"hosts": ["api.example.com:443"]} only those hosts (each name, IPv4 or [IPv6] with its port)."""

    ports: list[Annotated[int, msgspec.Meta(ge=1, le=65535)]] = []
    hosts: list[str] = []

    def __post_init__(self) -> None:
        if not self.ports and not self.hosts:
            raise ValueError('grants nothing: give "ports", "hosts", or true for any host and port')
        self.pairs()  # raises on the first malformed entry

    def pairs(self) -> list[tuple[str, int]]:
        return [split_host_port(entry, f"hosts[{i}]") for i, entry in enumerate(self.hosts)]


def split_host_port(entry: str, where: str) -> tuple[str, int]:
    """"api.example.com:443", "10.0.0.5:5432" or "[::1]:8080" -> (host, port)."""
    host, sep, port = entry.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # an IPv6 address must be written in brackets
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535 or any(
            c.isspace() or c in "/@?#" for c in host):
        raise ValueError(f'{where}: {entry!r} is not "host:port" (a name, IPv4 address or '
                         f'[IPv6] address, then a TCP port 1-65535)')
    return host.lower(), int(port)


class FilesystemGrant(msgspec.Struct, forbid_unknown_fields=True):
    read: list[str] = []
    write: list[str] = []


class Permissions(msgspec.Struct, forbid_unknown_fields=True):
    """What the operator grants one plugin; what is enforced is this, not what plugin.json asks."""

    network: bool | NetworkGrant = False
    database: bool | NetworkGrant = False  # a database is reached over TCP: the same as network
    filesystem: FilesystemGrant | None = None
    subprocess: bool = False
    env_vars: list[str] = []

    def granted(self) -> set[str]:
        names = {n for n in ("network", "database", "subprocess") if getattr(self, n)}
        if self.filesystem and (self.filesystem.read or self.filesystem.write):
            names.add("filesystem")
        if self.env_vars:
            names.add("env_vars")
        return names


Rlimit = Annotated[int, msgspec.Meta(ge=0)] | None


class Rlimits(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """host.sandbox.rlimits: soft and hard limit together (only ever lowered), per resource."""

    nofile: Rlimit = 1024
    fsize: Rlimit = 1 << 30
    core: Rlimit = 0
    data: Rlimit = None
    nproc: Rlimit = None
    cpu: Rlimit = None

    def as_dict(self) -> dict[str, int]:
        return {name: value for name in self.__struct_fields__ if (value := getattr(self, name)) is not None}



class SandboxSettings(msgspec.Struct, forbid_unknown_fields=True):
    """host.sandbox: the kernel layers every worker puts itself in (see qanot_worker/sandbox.py)."""

    enabled: bool = True
    strict: bool = False  # refuse to start a plugin unless every layer is active
    namespaces: bool = True  # as root: PID, mount, IPC and UTS namespaces and a root of its own
    pids_max: Annotated[int, msgspec.Meta(ge=1)] = 64  # processes and threads per plugin (pids cgroup)
    identity: bool = True  # when the host is root, each plugin's worker runs as a uid of its own
    # plugin uids are uid_base + 0..3999: far from the system's and users' (and from systemd's
    # dynamic users, 61184-65519, and the usual subordinate ranges of containers, 100000 up)
    uid_base: Annotated[int, msgspec.Meta(ge=1000, le=2**31 - 5000)] = 2_000_000_000
    rlimits: Rlimits = msgspec.field(default_factory=Rlimits)


class PluginSettings(msgspec.Struct, forbid_unknown_fields=True):
    """host.plugins.NAME: how qanot-host runs one plugin (Qanot has no such key)."""

    permissions: Permissions = msgspec.field(default_factory=Permissions)
    call_timeout: Seconds | None = None
    tool_timeouts: dict[str, Seconds] = {}
    restart: RestartSettings | None = None
    limits: Limits | None = None
    # workspace_dir/NAME, made by the host and writable by the plugin (Qanot plugins keep their
    # files under workspace_dir); false: the plugin gets no place in the workspace.
    workspace: bool = True


class HostSettings(msgspec.Struct, forbid_unknown_fields=True):
    """The "host" key: qanot-host's own settings, every one optional."""

    launcher: Literal["forkserver", "spawn"] = "forkserver"
    state_dir: str = ".qanot-host"
    builtin_plugins_dir: str | None = None
    # Where plugins are looked for, in order (default: the built-in plugins, then plugins_dir).
    search_path: list[str] | None = None
    # A plugin whose required_config keys are missing: by default, as in Qanot, it starts (with a
    # warning) and decides itself what it can do; true refuses it.
    strict_required_config: bool = False
    # Put plugins' tools_md and soul_append into the workspace's TOOLS.md and SOUL.md (false: the
    # Qanot drop-in lets Qanot's own loader code do that, Qanot's way).
    workspace_docs: bool = True
    wheel_dir: str | None = None
    index_url: str | None = None  # the package index for plugins' dependencies (uv's default: PyPI)
    offline: bool = False
    call_timeout: Seconds = 30.0
    handshake_timeout: Seconds = 10.0
    setup_timeout: Seconds = 30.0
    teardown_timeout: Seconds = 3.0
    install_timeout: Seconds = 600.0
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=1024, le=2**31)] = 64 * 1024 * 1024
    ping_interval: Seconds = 10.0
    ping_timeout: Seconds = 3.0
    cancel_grace: Seconds = 3.0
    term_timeout: Seconds = 2.0
    shutdown_deadline: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    limits_interval: Seconds = 1.0
    restart: RestartSettings = msgspec.field(default_factory=RestartSettings)
    limits: Limits = msgspec.field(default_factory=Limits)
    sandbox: SandboxSettings = msgspec.field(default_factory=SandboxSettings)
    plugins: dict[str, PluginSettings] = {}


class Config(msgspec.Struct):
    plugins: list[PluginEntry] = []
    plugins_dir: str = "/data/plugins"
    workspace_dir: str = "/data/workspace"
    host: HostSettings = msgspec.field(default_factory=HostSettings)
    # Where this config came from; not a config.json key.
    path: str = ""

    def settings_for(self, plugin: str) -> PluginSettings:
        return self.host.plugins.get(plugin) or PluginSettings()

    def call_timeout(self, plugin: str, tool: str) -> float:
        """Per tool, else per plugin, else the host default."""
        settings = self.settings_for(plugin)
        return settings.tool_timeouts.get(tool) or settings.call_timeout or self.host.call_timeout

    def restart_for(self, plugin: str) -> RestartSettings:
        return self.settings_for(plugin).restart or self.host.restart

    def limits_for(self, plugin: str) -> Limits:
        """The plugin's own limits, then the host's, then DEFAULT_LIMITS."""
        own = self.settings_for(plugin).limits or Limits()
        return own.over(self.host.limits.over(DEFAULT_LIMITS))


def load_config(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None
    return parse_config(raw, path)


def parse_config(raw: bytes | str, path: str) -> Config:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a configuration") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    data.pop("path", None)
    _plugin_entries(data, path)
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {_name_the_plugin(data, validation_message(exc))}") from None
    config.path = path
    _check_plugins(config)
    _resolve_paths(config)
    config.path = os.path.abspath(path)
    _check_grants(config)
    return config


def _plugin_entries(data: dict, path: str) -> None:
    """Qanot's "plugins" items: a name, or an object. What setup() would get must be plain JSON."""
    entries = data.get("plugins")
    if not isinstance(entries, list):
        return
    for index, entry in enumerate(entries):
        if isinstance(entry, str):
            entries[index] = entry = {"name": entry}
        if not isinstance(entry, dict):
            continue
        for key in sorted(set(entry) - {"name", "enabled", "config"}):
            log.warning("%s: plugins[%d].%s: unknown key, ignored (a plugin entry has name, enabled, config)",
                        path, index, key)
        problem = json_problem(entry.get("config", {}), f"plugins[{index}].config")
        if problem:
            raise ConfigError(f"{path}: {problem}")


def _name_the_plugin(data: dict, message: str) -> str:
    """msgspec writes a dict key as [...]: find which plugin's settings are at fault."""
    if not message.startswith("host.plugins[...]"):
        return message
    plugins = (data.get("host") or {}).get("plugins") or {}
    for name, settings in plugins.items():
        try:
            msgspec.convert(settings, PluginSettings)
        except msgspec.ValidationError:
            return message.replace("host.plugins[...]", f"host.plugins.{name}", 1)
    return message


def _check_plugins(config: Config) -> None:
    seen: set[str] = set()
    for index, entry in enumerate(config.plugins):
        where = f"{config.path}: plugins[{index}].name"
        if not entry.name or entry.name in (".", "..") or "/" in entry.name or "\0" in entry.name:
            raise ConfigError(f"{where}: {entry.name!r} is not a plugin directory name")
        if entry.name in seen:
            raise ConfigError(f"{where}: plugin {entry.name!r} is listed twice")
        seen.add(entry.name)
    for name in config.host.plugins:
        if name not in seen:
            raise ConfigError(f"{config.path}: host.plugins.{name}: no plugin {name!r} in plugins")


def _check_grants(config: Config) -> None:
    """Refuse filesystem grants a plugin could turn against the host or another plugin.

    A granted path inside a directory some plugin may write is not the operator's any more: that
    plugin can rename one of its components and put a symlink there, and the next worker would get
    whatever the link points at (the worker refuses links, but the plan is wrong to begin with).
    A grant covering state_dir would hand out every plugin's data and the host's own files."""
    writes: list[tuple[str, int | None, str]] = [
        (name, i, path) for name, settings in config.host.plugins.items()
        for i, path in enumerate(settings.permissions.filesystem.write if settings.permissions.filesystem else [])]
    protected = {"host.state_dir": config.host.state_dir}
    # Where the host writes (workspace_dir) or finds code it runs (plugins, wheels): a plugin that
    # may write one of these, or a directory that holds one, could swap it for a link to anywhere,
    # or change another plugin's code. A grant inside workspace_dir is fine (its own subdirectory).
    builtin = config.host.builtin_plugins_dir or os.path.realpath(os.path.join(os.path.dirname(__file__),
                                                                                 "builtin_plugins"))
    code = {"plugins_dir": config.plugins_dir, "host.builtin_plugins_dir": builtin,
            "host.wheel_dir": config.host.wheel_dir,
            **{f"host.search_path[{i}]": path for i, path in enumerate(config.host.search_path or [])}}
    for owner, w_index, written in writes:
        key = f"{config.path}: host.plugins.{owner}.permissions.filesystem.write[{w_index}]"
        if _within(config.workspace_dir, written):
            raise ConfigError(f"{key}: {written} holds workspace_dir ({config.workspace_dir}), where the host "
                              "writes TOOLS.md and SOUL.md: grant a directory inside it instead")
        for what, place in code.items():
            if place is not None and (_within(place, written) or _within(written, place)):
                raise ConfigError(f"{key}: {written} and {what} ({place}) overlap: a plugin may not write "
                                  "plugins' code")
    own = [(entry.name, own_workspace(config, entry.name)) for entry in config.plugins
           if config.settings_for(entry.name).workspace]
    for owner, w_index, written in writes:
        for name, path in own:
            if name != owner and _within(path, written):
                raise ConfigError(
                    f"{config.path}: host.plugins.{owner}.permissions.filesystem.write[{w_index}]: {written} holds "
                    f"{path}, plugin {name}'s own place in the workspace: {owner} could swap it for a directory "
                    f"of its own. Set host.plugins.{name}.workspace to false, or grant {owner} less")
    writes += [(name, None, path) for name, path in own]
    for name, settings in config.host.plugins.items():
        grant = settings.permissions.filesystem
        if grant is None:
            continue
        for kind, paths in (("read", grant.read), ("write", grant.write)):
            for index, path in enumerate(paths):
                key = f"{config.path}: host.plugins.{name}.permissions.filesystem.{kind}[{index}]"
                for what, place in protected.items():
                    if _within(place, path) or _within(path, place):
                        raise ConfigError(f"{key}: {path} and {what} ({place}) overlap: a plugin may not be "
                                          "granted the host's own files")
                for owner, w_index, written in writes:
                    if _within(path, written) and path != written:
                        how = f"host.plugins.{owner}.permissions.filesystem.write[{w_index}]" \
                            if w_index is not None else "its own place in the workspace"
                        raise ConfigError(
                            f"{key}: {path} is inside {written}, which plugin {owner} may write ({how}): it could "
                            "turn part of the path into a symlink to anywhere. Grant the outer directory, or one "
                            "outside it")


def own_workspace(config: Config, plugin: str) -> str:
    """workspace_dir/NAME: the plugin's own place in the workspace."""
    return os.path.join(config.workspace_dir, plugin)


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _resolve_paths(config: Config) -> None:
    base = os.path.dirname(os.path.abspath(config.path))

    def resolve(value: str) -> str:
        return os.path.normpath(os.path.join(base, os.path.expanduser(value)))

    config.plugins_dir = resolve(config.plugins_dir)
    config.workspace_dir = resolve(config.workspace_dir)
    config.host.state_dir = resolve(config.host.state_dir)
    if config.host.wheel_dir is not None:
        config.host.wheel_dir = resolve(config.host.wheel_dir)
    if config.host.builtin_plugins_dir is not None:
        config.host.builtin_plugins_dir = resolve(config.host.builtin_plugins_dir)
    if config.host.search_path is not None:
        config.host.search_path = [resolve(path) for path in config.host.search_path]
    for settings in config.host.plugins.values():
        grant = settings.permissions.filesystem
        if grant is not None:
            grant.read = [resolve(path) for path in grant.read]
            grant.write = [resolve(path) for path in grant.write]


def directory_problems(config: Config, create: bool) -> list[str]:
    """Why state_dir or workspace_dir cannot be used (one line each, naming the file and the key);
    `create`: make them (the host at start) rather than only look (check)."""
    problems = []
    for key, path in (("host.state_dir", config.host.state_dir), ("workspace_dir", config.workspace_dir)):
        problem = _directory_problem(path, create)
        if problem:
            problems.append(f"{config.path}: {key}: {path} {problem}")
    return problems


def _directory_problem(path: str, create: bool) -> str | None:
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return "is not a directory" if existing == path else f"cannot be made: {existing} is not a directory"
    if create and existing != path:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            return f"cannot be made: {exc.strerror}"
        existing = path
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" ({existing})"
        return f"is not writable by this user (uid {os.geteuid()}){where}"
    return None


def validation_message(exc: msgspec.ValidationError) -> str:
    """msgspec says 'Expected `array`, got `str` - at `$.dependencies`'; lead with the key instead."""
    text = str(exc)
    message, sep, where = text.rpartition(" - at `")
    if not sep:
        return text
    return f"{where.rstrip('`').removeprefix('$.')}: {message}"
