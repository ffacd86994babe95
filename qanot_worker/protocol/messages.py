"""Every message of the wire protocol, as tagged msgspec Structs, and the limits they carry.

A frame of the wrong shape fails in msgspec's decoder with an error that says what was expected;
a list or map longer than its bound fails at its header, before one element is read.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

import msgspec

__all__ = [
    "PROTOCOL_VERSION", "MAX_SCHEMA_BYTES", "MAX_SCHEMAS_TOTAL", "MAX_TOOLS", "COOKIE_KEY", "COOKIE_VALUE",
    "SANDBOX_KEY", "PLUGIN_KEY", "SPAWN_KEY", "DISK_KEY", "EXIT_MCP_SERVER_GONE", "MCP_RESULT", "HOOK_NAMES",
    "MAX_MCP_BLOCKS", "McpResource", "McpBlock", "McpResult", "McpText",
    "Hello", "Load", "Loaded", "MountOp", "SandboxSpec", "Setup", "GetTools", "ToolSpec", "ToolList", "Call", "Result",
    "Failure", "Cancel", "Ping", "Pong", "Teardown", "Done", "Denied", "HostMessage", "WorkerMessage",
    "MAX_DENIED_DESTINATIONS", "MAX_DENIED_COUNT",
    "FailureKind", "Spawn", "ReleaseDisk", "TemplateRequest", "Spawned", "Exited", "TemplateReady", "TemplateMessage",
    "Extensions", "CommandSpec",
    "Hook", "HookResult", "RunCommand", "decode_hook_value", "MAX_ITEMS", "MAX_KEYS", "MAX_TEMPLATE_VARS",
    "MAX_HOOK_VALUE", "Scalar", "Fields", "Items",
]

PROTOCOL_VERSION = 6
# How a launcher hands a worker what it needs before the first frame, in its environment.
# The cookie is not a secret: it only stops someone from running a worker by hand and wondering
# why it hangs.
COOKIE_KEY = "QANOT_WORKER_COOKIE"
COOKIE_VALUE = "d1b4a8a0f3c94e39a7e1"
SANDBOX_KEY = "QANOT_WORKER_SANDBOX"  # the sandbox to enter: JSON of SandboxSpec
PLUGIN_KEY = "QANOT_WORKER_PLUGIN"  # the plugin's name, for its messages
SPAWN_KEY = "QANOT_WORKER_SPAWN"  # the "spawn" launcher's request: JSON of Spawn
# "fd:N" (a detached mount to put at the data directory), "error:why" (no disk on this machine: a
# missing layer), "failed:why" (its disk would not attach: it does not start) or "off" (disk_mb 0)
DISK_KEY = "QANOT_WORKER_DISK"
# An MCP server's worker exits with this when its server is gone (exited, hung, its connection
# lost): a crash to the host, which then tells callers that it was the server (3, an exception out
# of any worker's loop, said nothing of the kind; a tester of 11-27 saw only "exit code 3")
EXIT_MCP_SERVER_GONE = 75
# An MCP server's result with more than text in it (an image, a resource), as its worker's Result:
# this, then McpResult as JSON. The host reads it only from an MCP server's worker (any plugin's
# result may start so: attack pass 54), and only as McpResult: typed, so a forged one cannot become
# millions of objects in the host. No text a server returns starts with it: the worker sends such a
# text in this form too.
MCP_RESULT = "\x00qanot-host:mcp-result\x00"
MAX_MCP_BLOCKS = 64
MAX_SCHEMA_BYTES = 64 * 1024  # one tool's parameters schema, encoded
# all of one plugin's schemas, encoded (Qanot's largest plugin: ~40 KiB); decoded, 256 KiB of tiny
# containers can still take ~18 MB of the host's memory while the worker lives
MAX_SCHEMAS_TOTAL = 256 * 1024
MAX_TOOLS = 256  # tools one plugin may offer (Qanot's largest plugin has 34)
# What a worker's messages may hold. A worker is not trusted, and one byte of msgpack can become a
# whole Python object in the host (an empty list, ~70 bytes): a 60 MB frame of nested lists once
# took the host to 4 GB. So nothing a worker sends is decoded as Any: every list and map is
# bounded (msgspec checks a length at its header, before one element is read), values are typed
# scalars, and what must stay free-form (a schema, a hook's value) stays encoded (msgspec.Raw)
# until the host has looked at its size.
MAX_ITEMS = 64  # sandbox layers, warnings, hooks, WAL patterns, prompt sections, cron jobs, commands, problems
MAX_KEYS = 32  # keys of one prompt section or cron job
MAX_TEMPLATE_VARS = 256
MAX_HOOK_VALUE = 64 * 1024  # a hook's or command's value that is a list or a dict, encoded (a string may be longer)

Scalar = Union[str, int, float, bool, None]


def _at_most(n: int) -> msgspec.Meta:
    return msgspec.Meta(max_length=n)


Items = Annotated[list[str], _at_most(MAX_ITEMS)]
Fields = Annotated[dict[str, Scalar], _at_most(MAX_KEYS)]


class FailureKind:
    """Why a request failed inside the worker; the host maps each to an error type."""

    LOAD = "load"  # plugin.py missing, import error, no Plugin class
    SETUP = "setup"  # setup() raised
    BAD_TOOLS = "bad_tools"  # get_tools() did not return a list of ToolDef
    TOOL = "tool"  # a handler raised
    BAD_RESULT = "bad_result"  # a handler returned something that is not a str
    UNKNOWN_TOOL = "unknown_tool"
    CANCELLED = "cancelled"
    TOO_LARGE = "too_large"  # the reply would exceed the maximum frame size
    HOOK = "hook"  # a hook or a command handler raised, or returned what JSON cannot hold
    PROTOCOL = "protocol"  # the request made no sense at this point


# ---- worker -> host -------------------------------------------------------------------------------

class Hello(msgspec.Struct, tag=True, array_like=True):
    """The worker's first frame, and its sandbox report: sent before any plugin code is imported, so
    nothing a plugin does can change what it says."""

    protocol: int
    pid: int
    egress_fd: int = -1  # the worker's seccomp listener for connect(): the host takes it before Load
    sandbox_layers: Items = []  # the layers the worker put itself in
    sandbox_warnings: Items = []  # ...and the ones it could not
    sandbox_ms: float = 0.0  # what entering the sandbox cost the worker


# Qanot's hooks, by the names Loaded.hooks gives them (plugin_api.HOOKS, the worker's): the host keeps
# no other name a worker sends there
HOOK_NAMES = ("on_pre_turn", "on_post_turn", "on_tool_use", "on_error", "on_startup", "on_shutdown", "on_compaction")


class Loaded(msgspec.Struct, tag=True, array_like=True):
    id: int
    name: str
    description: str
    version: str
    tools_md: str
    soul_append: str
    hooks: Items = []  # the hooks the plugin overrides (Qanot's HookRegistry registers only those)


class ToolSpec(msgspec.Struct, array_like=True):
    name: str
    description: str
    # Left encoded: the host looks at its size before it decodes a byte of it (one byte of msgpack
    # can become a whole Python list: a small frame must not become gigabytes in the host).
    parameters: msgspec.Raw

    @staticmethod
    def encode_parameters(parameters: dict[str, Any]) -> msgspec.Raw:
        return msgspec.Raw(msgspec.msgpack.encode(parameters))


class CommandSpec(msgspec.Struct, array_like=True):
    """One of get_commands(): its handler stays in the worker (RunCommand calls it by index)."""

    command: str
    description: str = ""


class Extensions(msgspec.Struct, array_like=True):
    """What the plugin's extension points returned, read once after get_tools() as Qanot reads them."""

    wal_patterns: Annotated[list[tuple[str, str, bool]], _at_most(MAX_ITEMS)] = []
    prompt_sections: Annotated[list[Fields], _at_most(MAX_ITEMS)] = []
    template_dir: str | None = None
    cron_jobs: Annotated[list[Fields], _at_most(MAX_ITEMS)] = []
    commands: Annotated[list[CommandSpec], _at_most(MAX_ITEMS)] = []
    template_vars: Annotated[dict[str, str], _at_most(MAX_TEMPLATE_VARS)] = {}
    problems: Items = []  # what could not be carried: an extension point raised, or returned odd values


class ToolList(msgspec.Struct, tag=True, array_like=True):
    id: int
    tools: Annotated[list[ToolSpec], _at_most(MAX_TOOLS)]
    extensions: Extensions = msgspec.field(default_factory=Extensions)


class HookResult(msgspec.Struct, tag=True, array_like=True):
    """A hook's or a command's return value (None, or what JSON can hold), left encoded: the host
    decodes a list or a dict only up to MAX_HOOK_VALUE bytes (see decode_hook_value)."""

    id: int
    value: msgspec.Raw = msgspec.Raw(b"\xc0")  # msgpack nil

    @staticmethod
    def encode_value(value: Any) -> msgspec.Raw:
        return msgspec.Raw(msgspec.msgpack.encode(value))



class Result(msgspec.Struct, tag=True, array_like=True):
    id: int
    value: str


class Failure(msgspec.Struct, tag=True, array_like=True):
    id: int
    kind: str
    message: str


class Pong(msgspec.Struct, tag=True, array_like=True):
    id: int


class Done(msgspec.Struct, tag=True, array_like=True):
    id: int


MAX_DENIED_DESTINATIONS = 8
# connects one report may count: far more than a worker's check refuses in its 0.1 s (a forged count
# of 2**40 a frame made a plugin's metrics say 6.5e14: attack pass 59); more is a lying worker
MAX_DENIED_COUNT = 100_000


class Denied(msgspec.Struct, tag=True, array_like=True):
    """Connects the worker's own check refused (a network narrowed to hosts: the audit hook says
    what to grant before the host is asked), since the last such report, and the first few
    destinations among them ("host:port"): no request asks for it. A worker sends one at most every
    DENIED_REPORT_SECONDS; the host counts them as the denials it makes itself."""
    count: Annotated[int, msgspec.Meta(ge=1, le=MAX_DENIED_COUNT)]
    destinations: Annotated[list[Annotated[str, msgspec.Meta(max_length=300)]], _at_most(MAX_DENIED_DESTINATIONS)]


# ---- host -> worker -------------------------------------------------------------------------------

class MountOp(msgspec.Struct, array_like=True, frozen=True):
    """One step in building a worker's root file system (qanot_worker/namespaces.py runs them in order).

    kinds: "ro" and "rw" bind `source` at `target` (what may run is Landlock's to say); "tmpfs"
    mounts an empty one of `size` bytes; "hide" lays a read-only empty tmpfs over `target`; "proc";
    "devices" makes /dev (null, zero, full, random, urandom, a private /dev/shm of `size` bytes);
    "file" writes `text` to `target`; "symlink" points `target` at `text`; "data" is the plugin's data
    directory: its disk when the launcher attached one, else `source` bound read-write.
    """

    kind: str
    target: str
    source: str = ""
    size: int = 0
    text: str = ""


class SandboxSpec(msgspec.Struct):
    """What the worker may touch; handed to the worker at start (JSON in its environment), which
    enters the sandbox before it creates its event loop, long before it imports the plugin."""

    read_paths: list[str] = []  # Landlock rules, as the paths look from inside the worker's root
    write_paths: list[str] = []
    # Of write_paths, those others read too (the workspace place): no symlink may be made there, nor
    # anything renamed or linked in from elsewhere (the agent, as root, would follow a link the
    # plugin left, to /etc/shadow say).
    link_free_paths: list[str] = []
    exec_paths: list[str] = []  # read and execute (only with the subprocess permission)
    # The worker's own root, built from these steps on a tmpfs mounted at root_dir (an empty
    # directory of the host's); [] where the host cannot give mount namespaces.
    mounts: list[MountOp] = []
    no_namespaces: str = ""  # why the worker has no namespaces of its own (no mounts), in the host's words
    root_dir: str = ""
    cwd: str = ""  # inside the new root: the data directory
    network: bool = False
    # with network: the host makes each TCP connection (qanot_host/egress.py) to these ports on any
    # host and to these (host, port) pairs; the worker stays in an empty network namespace. Both
    # empty with network: the host's network, unfiltered.
    tcp_ports: list[int] = []
    tcp_hosts: list[tuple[str, int]] = []
    subprocess: bool = False
    # the host's own files (config.json, state_dir), as the host names them: no grant reaches them,
    # so a denial there says so rather than which permission to grant
    host_private: list[str] = []
    rlimits: dict[str, int] = {}
    # the cgroups the launcher put the worker in: layer name (pids-cgroup, ...) -> its cgroup.procs
    cgroups: dict[str, str] = {}
    uid: int = -1  # drop to this user and group (when started as root); -1: keep
    gid: int = -1
    strict: bool = False  # refuse to start rather than run with a layer missing

    @property
    def egress_filtered(self) -> bool:
        return self.network and bool(self.tcp_ports or self.tcp_hosts)


class Load(msgspec.Struct, tag=True, array_like=True):
    id: int
    plugin_name: str
    plugin_file: str  # plugin.py, or __init__.py when plugin.py is missing
    plugin_dir: str
    site_dirs: list[str]  # the plugin's own environment, added with site.addsitedir


class Setup(msgspec.Struct, tag=True, array_like=True):
    id: int
    config: dict[str, Any]


class GetTools(msgspec.Struct, tag=True, array_like=True):
    id: int


class Call(msgspec.Struct, tag=True, array_like=True):
    id: int
    tool: str
    params: dict[str, Any]


class Cancel(msgspec.Struct, tag=True, array_like=True):
    id: int


class Hook(msgspec.Struct, tag=True, array_like=True):
    """Run one of the plugin's hooks (plugin_api.HOOKS) with these keyword arguments."""

    id: int
    name: str
    kwargs: dict[str, Any]


class RunCommand(msgspec.Struct, tag=True, array_like=True):
    """Call the handler of get_commands()[index]."""

    id: int
    index: int
    args: list[Any]
    kwargs: dict[str, Any]


class Ping(msgspec.Struct, tag=True, array_like=True):
    id: int


class Teardown(msgspec.Struct, tag=True, array_like=True):
    id: int


HostMessage = Union[Load, Setup, GetTools, Call, Cancel, Ping, Teardown, Hook, RunCommand]
WorkerMessage = Union[Hello, Loaded, ToolList, Result, Failure, Pong, Done, HookResult, Denied]


# ---- fork server (one SOCK_SEQPACKET message each; Spawn carries four fds by SCM_RIGHTS) ---------

class Spawn(msgspec.Struct, tag=True, array_like=True):
    """host -> template: fork a worker with these fds (protocol read, protocol write, stdout, stderr,
    and its environment: a sealed memfd of JSON that only the worker reads; the template never sees
    a plugin's granted secrets, so no other worker can find them in memory it forked from)."""

    id: int
    plugin: str
    cwd: str
    max_frame: int
    cgroup_procs: list[str] = []  # the template puts the worker here before it answers Spawned
    disk: str = ""  # the plugin's disk image, attached by the template and kept while it lives
    uid: int = -1  # the plugin's uid: owner of its disk's root, and of the worker's init process
    namespaces: bool = False  # a PID namespace of the worker's own, with an init that reaps it


class ReleaseDisk(msgspec.Struct, tag=True, array_like=True):
    """host -> template: a plugin removed (or restarted with a new disk_mb) by a reload: the template
    lets its disk go, which it would otherwise keep attached for the host's life. No answer."""

    image: str


TemplateRequest = Union[Spawn, ReleaseDisk]


class Spawned(msgspec.Struct, tag=True, array_like=True):
    id: int
    pid: int  # 0 when the fork failed; error says why
    error: str = ""


class Exited(msgspec.Struct, tag=True, array_like=True):
    """template -> host: a worker it forked has been reaped."""

    pid: int
    returncode: int  # negative: killed by that signal, as subprocess reports it


class TemplateReady(msgspec.Struct, tag=True, array_like=True):
    pid: int


TemplateMessage = Union[Spawned, Exited, TemplateReady]


_SCALAR = msgspec.msgpack.Decoder(Scalar)


def decode_hook_value(raw: msgspec.Raw | bytes) -> Any:
    """A HookResult's value. A scalar (a string of any length) costs what it weighs; a list or a
    dict is decoded only up to MAX_HOOK_VALUE encoded bytes. Raises ValueError beyond."""
    try:
        return _SCALAR.decode(raw)
    except msgspec.ValidationError:
        pass  # a list or a dict
    if len(raw) > MAX_HOOK_VALUE:
        raise ValueError(f"a list or dict returned by a hook or command is {len(raw)} bytes encoded; "
                         f"at most {MAX_HOOK_VALUE} are taken (a string may be longer)")
    return msgspec.msgpack.decode(raw)


# ---- an MCP server's result, whole (MCP_RESULT) ----------------------------------------------------

class McpResource(msgspec.Struct, rename="camel", omit_defaults=True):
    """An embedded resource's contents: text or a base64 blob."""

    uri: str
    mime_type: str | None = None
    text: str | None = None
    blob: str | None = None


class McpBlock(msgspec.Struct, rename="camel", omit_defaults=True):
    """One content block as MCP writes it, with the fields of its kinds (text, image, audio,
    resource, resource_link); annotations and _meta are not carried."""

    type: str
    text: str | None = None
    data: str | None = None
    mime_type: str | None = None
    uri: str | None = None
    name: str | None = None
    title: str | None = None
    description: str | None = None
    size: int | None = None
    resource: McpResource | None = None


class McpResult(msgspec.Struct):
    text: str  # what Qanot's own MCP client makes of the result: its text parts, binary as its size
    content: Annotated[list[McpBlock], _at_most(MAX_MCP_BLOCKS)] = []


class McpText(msgspec.Struct):
    """What the host reads of an McpResult for Qanot's callers: the text alone, the rest skipped."""

    text: str
