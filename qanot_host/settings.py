"""The shape of config.json, as msgspec Structs: Qanot's keys (plugins, plugins_dir,
workspace_dir) and qanot-host's own under "host", each with its default.

Inside "host" every key is ours, so every Struct there forbids unknown fields: a typo is refused
with its path. Reading and checking a file is config.py's.
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any, Literal

import msgspec

__all__ = ["Config", "PluginEntry", "HostSettings", "PluginSettings", "RestartSettings", "Limits", "DEFAULT_LIMITS",
           "SandboxSettings", "Permissions", "McpServer", "NetworkGrant", "FilesystemGrant", "Rlimits",
           "split_host_port", "AGENT_WORKSPACE_ENTRIES", "agents_own_name"]

Seconds = Annotated[float, msgspec.Meta(gt=0)]
MAX_SECONDS = 1e12  # a tool_timeouts value beyond (an int of 400 digits) is no float, and no timeout


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


# A disk is an ext4 image: under 16 MB its 4 MB journal does not fit (mkfs.ext4 refuses), and a file
# on an ext4 host stops one block short of 16 TiB. Outside these, a plugin's disk could not be made
# at its start: refused in the config instead, where the key is named.
MIN_DISK_MB, MAX_DISK_MB = 16, 16 * 2**20 - 1


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
    disk_mb: Annotated[int, msgspec.Meta(ge=0, le=MAX_DISK_MB)] | None = None
    workspace_mb: Annotated[int, msgspec.Meta(ge=0)] | None = None
    tmp_mb: Annotated[int, msgspec.Meta(ge=1)] | None = None
    cpu_weight: Annotated[int, msgspec.Meta(ge=1, le=10000)] | None = None
    cpu_max: Annotated[float, msgspec.Meta(gt=0)] | None = None
    log_lines_per_second: Annotated[float, msgspec.Meta(gt=0)] | None = None

    def __post_init__(self) -> None:
        if self.disk_mb is not None and 0 < self.disk_mb < MIN_DISK_MB:
            raise ValueError(f"disk_mb: {self.disk_mb} MB is too small for a disk (an ext4 file system with its "
                             f"journal needs {MIN_DISK_MB}); 0 for none")

    def over(self, base: "Limits") -> "Limits":
        """These limits, with what they leave out taken from `base`."""
        return Limits(**{name: getattr(self, name) if getattr(self, name) is not None else getattr(base, name)
                         for name in self.__struct_fields__})


# What the agent keeps in its own workspace (Qanot 2.0.4: what it reads back into its prompt, runs as
# skills, or keeps as its state), and the host's TOOLS.md and SOUL.md. workspace_dir/NAME is made the
# plugin's own, so a plugin of one of these names would be given the agent's: a plugin named skills
# could plant a skill that Qanot runs unsandboxed, one named memory rewrite the agent's memory.
AGENT_WORKSPACE_ENTRIES = frozenset(name.casefold() for name in (
    "agents", "backups", "generated", "memories", "memory", "notes", "screenshots", "skills", "souls", "templates",
    "uploads", "users", "workspace",
    "AGENTS.md", "BOOTSTRAP.md", "HEARTBEAT.md", "IDENTITY.md", "MEMORY.md", "SESSION-STATE.md", "SOUL.md",
    "TOOLS.md", "USER.md", "costs.json", "config.json", "proactive-outbox.md", "rag.db", "working-buffer.md"))

def agents_own_name(name: str) -> bool:
    """A name in workspace_dir that is, or may be, the agent's: one of AGENT_WORKSPACE_ENTRIES, in any
    case, or any name with a dot in it, as every file there has (the host's own .qanot-host.lock,
    Qanot's NAME_TOOLS.md for each plugin, SKILL.md, rag.db-wal): a plugin's place of that name
    would stand where the agent or the host puts a file."""
    return name.casefold() in AGENT_WORKSPACE_ENTRIES or "." in name


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

    def environment(self) -> dict[str, str]:
        """The granted env_vars the host has, with its values: what the plugin's worker is given."""
        return {name: os.environ[name] for name in self.env_vars if name in os.environ}


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


# "eager": a worker from the host's start. "lazy": its tools registered from the cached tool list of
# its last start, its worker started by its first call.
Activation = Literal["eager", "lazy"]


class PluginSettings(msgspec.Struct, forbid_unknown_fields=True):
    """host.plugins.NAME: how qanot-host runs one plugin (Qanot has no such key)."""

    permissions: Permissions = msgspec.field(default_factory=Permissions)
    call_timeout: Seconds | None = None
    # seconds > 0 each, checked below: msgspec's own error says `tool_timeouts[...]`, not which tool
    tool_timeouts: dict[str, Any] = {}
    restart: RestartSettings | None = None
    limits: Limits | None = None
    # workspace_dir/NAME, made by the host and writable by the plugin (Qanot plugins keep their
    # files under workspace_dir); false: the plugin gets no place in the workspace. Unset: a place,
    # unless NAME is one of the agent's own there (Config.has_place).
    workspace: bool | None = None
    # None: the host's (host.activation, host.idle_timeout)
    activation: Activation | None = None
    idle_timeout: Seconds | None = None

    def __post_init__(self) -> None:
        for tool, seconds in self.tool_timeouts.items():
            if type(seconds) not in (int, float) or not 0 < seconds < MAX_SECONDS:
                raise ValueError(f"tool_timeouts: {tool}: expected seconds > 0 (and under {MAX_SECONDS:g}), got "
                                 f"{json.dumps(seconds)[:80]}")
            self.tool_timeouts[tool] = float(seconds)


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
    # "127.0.0.1:9464": Prometheus metrics, /healthz and /readyz there (off when absent)
    metrics: str | None = None
    # /readyz answers 200 once this many enabled plugins are ready (absent: all of them)
    ready_quorum: Annotated[int, msgspec.Meta(ge=0)] | None = None
    # Every plugin's, unless host.plugins.NAME says otherwise; idle_timeout: a worker without a
    # call for that long is stopped (teardown() first) until the next call (absent: never).
    activation: Activation = "eager"
    idle_timeout: Seconds | None = None


Transport = Literal["stdio", "sse", "http", "streamable-http"]


class McpServer(msgspec.Struct):
    """One item of Qanot's "mcp_servers" list (Qanot reads name, command, args, env)."""

    name: str
    command: str = ""
    args: list[str] = []
    env: dict[str, Any] = {}  # each value a string (with ${VAR}s) or a SecretRef
    transport: Transport = "stdio"
    url: str = ""
    headers: dict[str, Any] = {}  # remote: sent with every request; values as env's
    enabled: bool = True

    @property
    def remote(self) -> bool:
        return self.transport != "stdio"


class Config(msgspec.Struct):
    plugins: list[PluginEntry] = []
    plugins_dir: str = "/data/plugins"
    workspace_dir: str = "/data/workspace"
    host: HostSettings = msgspec.field(default_factory=HostSettings)
    # Qanot's MCP servers; each also in `plugins` (after the plugins), as a plugin of its name
    mcp_servers: list[McpServer] = []
    # Where this config came from; not a config.json key.
    path: str = ""

    def settings_for(self, plugin: str) -> PluginSettings:
        return self.host.plugins.get(plugin) or PluginSettings()

    def has_place(self, plugin: str) -> bool:
        """Does the plugin get workspace_dir/NAME? Not by default where NAME may be the agent's own
        (agents_own_name), and config.py refuses asking for it there."""
        asked = self.settings_for(plugin).workspace
        return asked if asked is not None else not agents_own_name(plugin)

    def call_timeout(self, plugin: str, tool: str | None = None) -> float:
        """Per tool, else per plugin, else the host default (tool None: the plugin's own, as its
        hooks and commands take)."""
        settings = self.settings_for(plugin)
        own = settings.tool_timeouts.get(tool) if tool is not None else None
        return own or settings.call_timeout or self.host.call_timeout

    def restart_for(self, plugin: str) -> RestartSettings:
        return self.settings_for(plugin).restart or self.host.restart

    def activation_for(self, plugin: str) -> Activation:
        return self.settings_for(plugin).activation or self.host.activation

    def idle_timeout_for(self, plugin: str) -> float | None:
        return self.settings_for(plugin).idle_timeout or self.host.idle_timeout

    def limits_for(self, plugin: str) -> Limits:
        """The plugin's own limits, then the host's, then DEFAULT_LIMITS."""
        own = self.settings_for(plugin).limits or Limits()
        return own.over(self.host.limits.over(DEFAULT_LIMITS))
