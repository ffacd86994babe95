"""Qanot's `mcp_servers` entries, run as plugins: each server a worker of its own name.

Qanot connects to each MCP server in its own process (qanot/mcp_client.py): a crashed server is
never restarted, a hung one hangs its calls, and a stdio server runs with the agent's full rights.
Here each entry becomes one more plugin, whose code is the built-in bridge (qanot_worker/mcp_bridge)
and whose config is the entry: the same supervision, limits and sandbox as any plugin, with
`host.plugins.NAME` (NAME being the server's name) for its grants and settings. A stdio server is
the bridge's child, inside the worker's sandbox, and may execute its command (and the interpreter
that command names) and nothing else; a remote one (`sse`, `http`) is reached from a worker granted
that one address, and is itself beyond any sandbox.

This module reads the entries (config.py calls it), and at each start resolves what the bridge is
given: the command's path, the programs it may run, the environment with its `${VAR}`s and
SecretRefs filled in (and a Redactor for those values).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import shutil
import struct
from dataclasses import dataclass
from importlib import metadata
from typing import Any
from urllib.parse import unquote, urlsplit

import msgspec

from .errors import ConfigError
from .plugin_secrets import Redactor, is_secret_ref, is_text, resolve_config_secrets
from .safe_files import open_regular_file
from .settings import Config, McpServer, NetworkGrant, PluginEntry, PluginSettings

__all__ = ["read_mcp_servers", "add_mcp_servers", "mcp_server", "bridge_config", "ungranted_args", "Programs",
           "program_plan", "install_stamp", "mcp_tool_name", "server_warnings",
           "BRIDGE_REQUIREMENT"]

# Runners that fetch a package and run it at each start (Qanot's own example uses `npx -y`): in the
# sandbox there is no network to fetch with, unless granted, and nothing written may be executed.
FETCHING_RUNNERS = {"npx", "pnpx", "bunx", "uvx", "pipx"}

log = logging.getLogger("qanot_host.config")

ENTRY_KEYS = {"name", "transport", "type", "command", "args", "env", "url", "headers", "enabled"}
STDIO_ONLY, REMOTE_ONLY = ("args", "env"), ("url", "headers")  # a command on a remote entry is an error
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
SERVER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _bridge_requirement() -> str:
    """The SDK the bridge runs on, in the server's own environment: the host's own version when it
    has one (so uv's cache most likely holds it), else the series the bridge is written for."""
    try:
        version = metadata.version("mcp")
    except metadata.PackageNotFoundError:
        return "mcp>=2.3,<3"
    return f"mcp=={version}" if version.split(".")[0] == "2" else "mcp>=2.3,<3"


BRIDGE_REQUIREMENT = _bridge_requirement()


def read_mcp_servers(data: dict, path: str) -> None:
    """Check config.json's "mcp_servers" (before it is converted): each a JSON object with a usable
    name; unknown keys are warned about and dropped, as a plugin entry's are."""
    servers = data.get("mcp_servers")
    if servers is None:
        return
    if not isinstance(servers, list):
        raise ConfigError(f"{path}: mcp_servers: a list of servers, not {type(servers).__name__}")
    for index, server in enumerate(servers):
        where = f"{path}: mcp_servers[{index}]"
        if not isinstance(server, dict):
            raise ConfigError(f"{where}: an object with name and command (or url), not {type(server).__name__}")
        if "type" in server:  # as Claude's and VS Code's configs write it
            kind = server.pop("type")
            if "transport" in server and server["transport"] != kind:
                raise ConfigError(f"{where}: transport {server['transport']!r} and type {kind!r} disagree")
            server["transport"] = kind
        for key in sorted(set(server) - ENTRY_KEYS):
            log.warning("%s.%s: unknown key, ignored (an MCP server has name, transport, command, args, env, "
                        "url, headers, enabled; a stdio server runs in its own data directory)", where, key)
            server.pop(key)
        if server.get("transport") == "streamable_http":
            server["transport"] = "http"
        stdio = server.get("transport", "stdio") == "stdio"
        for key in sorted(set(server) & set(REMOTE_ONLY if stdio else STDIO_ONLY)):
            log.warning("%s.%s: ignored: a %s server has no %s", where, key,
                        "stdio" if stdio else str(server.get("transport")), key)


def add_mcp_servers(config: Config) -> None:
    """Each enabled server as a plugin entry of its name (after the plugins: as in Qanot, a plugin's
    tool keeps its name and the server's takes mcp_{server}_{tool}); remote servers granted their
    one address. ConfigError naming the entry and key for anything unusable."""
    taken = {entry.name for entry in config.plugins}
    for index, server in enumerate(config.mcp_servers):
        where = f"{config.path}: mcp_servers[{index}]"
        if not SERVER_NAME.fullmatch(server.name):
            raise ConfigError(f"{where}.name: {server.name!r}: letters, digits, '_', '.' and '-' (at most 64, not "
                              "starting with a symbol): it names the server's worker, its data and its tools")
        if server.name in taken:
            raise ConfigError(f"{where}.name: {server.name!r} is already the name of a plugin or of another "
                              "MCP server")
        taken.add(server.name)
        if server.remote:
            _check_remote(server, where)
            config.host.plugins[server.name] = _grant_address(config.settings_for(server.name), server.url)
        elif not server.command.strip():
            raise ConfigError(f"{where}.command: a stdio server needs the command that starts it")
        for key, table in (("env", server.env), ("headers", server.headers)):
            for name, value in table.items():
                if not isinstance(value, str) and not is_secret_ref(value):
                    raise ConfigError(f'{where}.{key}.{name}: a string (may hold ${{VAR}}) or a SecretRef '
                                      '({"env": "VAR"} or {"file": "/path"})')
        # the entry as the plugin's config: a change to it restarts the server at reload, and keys its tool cache
        config.plugins.append(PluginEntry(server.name, server.enabled, msgspec.to_builtins(server)))


def _check_remote(server: McpServer, where: str) -> None:
    try:
        parts = urlsplit(server.url)
        parts.port  # noqa: B018 - raises on a port that is no port
    except ValueError as exc:
        raise ConfigError(f"{where}.url: {server.url!r} is not a usable URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}.url: a {server.transport} server needs an http:// or https:// URL, "
                          f"not {server.url!r}")
    if server.command:
        raise ConfigError(f"{where}.command: a {server.transport} server is reached at its url; a command "
                          "belongs to a stdio server")


def _address(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _grant_address(settings: PluginSettings, url: str) -> PluginSettings:
    """The remote server's host:port added to whatever network the operator granted."""
    grant = settings.permissions
    if grant.network is True:
        return settings
    network = grant.network if isinstance(grant.network, NetworkGrant) else None
    hosts = [*(network.hosts if network else []), _address(url)]
    widened = NetworkGrant(ports=list(network.ports) if network else [], hosts=hosts)
    return msgspec.structs.replace(settings, permissions=msgspec.structs.replace(grant, network=widened))


def mcp_server(config: Config, name: str) -> tuple[int, McpServer] | None:
    for index, server in enumerate(config.mcp_servers):
        if server.name == name:
            return index, server
    return None


# ---- at each start -------------------------------------------------------------------------------

@dataclass
class Programs:
    """What a stdio server's worker may execute (Landlock's execute right: its command, the
    interpreter a script names, their ELF loader) and must see to run them (their installations)."""

    command: str  # the absolute path the bridge runs
    executable: list[str]
    readable: list[str]
    hops: list[str]  # every path on the way to each program, links included (a root of its own needs them)


def bridge_config(config: Config, name: str) -> tuple[dict[str, Any], Redactor, Programs | None]:
    """What the bridge's setup() is given for server NAME, with every ${VAR} and SecretRef in env and
    headers resolved; a Redactor for those values; the stdio server's programs. ValueError (naming
    the entry and key) if something cannot be resolved."""
    index, server = mcp_server(config, name)  # type: ignore[misc]
    where = f"{config.path}: mcp_servers[{index}]"
    env, redact_env = _resolve_table(server.env, f"{where}.env")
    headers, redact_headers = _resolve_table(server.headers, f"{where}.headers")
    settings = config.host
    bridged: dict[str, Any] = {
        "server": name, "transport": server.transport, "args": list(server.args), "url": server.url,
        "headers": headers, "ping_interval": settings.ping_interval, "ping_timeout": settings.ping_timeout,
        "connect_timeout": settings.setup_timeout, "close_timeout": settings.teardown_timeout}
    programs = None
    if not server.remote:
        search, programs = _stdio_programs(config, where, server.command, env.get("PATH"))
        command_dir = os.path.dirname(programs.command)
        env = {"LANG": "C.UTF-8", **env,  # the PATH it was looked for on (as checked), its own directory first
               "PATH": f"{command_dir}:{search}" if command_dir not in search.split(":") else search}
        bridged["command"] = programs.command
    bridged["env"] = env
    # the values the bridge takes out of the stderr it quotes: each ${VAR}'s own too, not only whole
    # values (a password inside a DSN leaked up to the line's cut: attack pass 60)
    bridged["secrets"] = dict(redact_env)
    secrets = {f"mcp_servers[{index}].{table}.{key}": value
               for table, found in (("env", redact_env), ("headers", redact_headers)) for key, value in found.items()}
    secrets.update(_url_secrets(server.url or "", f"mcp_servers[{index}].url"))
    return bridged, Redactor(secrets), programs


def _url_secrets(url: str, key: str) -> dict[str, str]:
    """What in a remote server's url may be a credential, as written and decoded: the userinfo (a
    password, or a token given as the user name) and the values, with a `key=` or bare, of its query
    (`?key=...`, as hosted SSE servers take it), fragment and path parameters. Errors quote the url
    (attack passes 61, 63, 64)."""
    parts = urlsplit(url)
    user, password = parts.username or "", parts.password or ""
    written = [password] + ([user] if len(user) >= 16 else [])  # a user name that long is a token
    # key=value pairs of the query, the fragment (#access_token=...) and the path's parameters (;sig=...)
    pairs = [parts.query, parts.fragment, *[segment.split(";", 1)[1] for segment in parts.path.split("/")
                                            if ";" in segment]]
    written += [value for text in pairs for piece in re.split(r"[&;]", text)  # `key=value`, or a bare
                for value in [piece.split("=", 1)[-1]] if len(unquote(value)) >= 8]  # value (`#TOKEN`)
    found = {*written, *(unquote(value) for value in written)}
    return {(key if n == 0 else f"{key} {n}"): value for n, value in enumerate(sorted(found - {""}))}


def shown_url(url: str) -> str:
    """A remote server's url as `check` prints it: scheme, host, port and path; never a user name,
    password, query, fragment or path parameter, where credentials go (attack pass 63)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    path = "/".join(segment.split(";", 1)[0] for segment in parts.path.split("/"))
    return f"{parts.scheme}://{netloc}{path}" + ("?..." if parts.query or parts.fragment else "")


def _stdio_programs(config: Config, where: str, command: str, path: str | None) -> tuple[str, Programs]:
    """(the PATH the command is looked for on, its programs), none of them where a plugin may write."""
    writable = _writable_places(config)
    search = _search_path(path or DEFAULT_PATH, writable, f"{where}.env.PATH")
    programs = program_plan(command, search, os.path.dirname(config.path), f"{where}.command")
    for place in [*programs.hops, *programs.executable, *programs.readable]:
        _refuse_writable(place, writable, f"{where}.command")
    from .config import within
    for root in programs.readable:  # and no place to write within what it loads: a venv's site-packages
        real = os.path.realpath(root)  # granted to a plugin let it replace a module the server imports,
        for key, place in writable:  # and read the server's secrets from inside it (attack pass 58)
            if within(place, real):
                raise ValueError(f"{where}.command: its installation {root} holds {place} ({key}), where "
                                 "plugins may write: a plugin could change the code this server loads. Grant "
                                 "a directory outside it")
    return search, programs


def ungranted_args(config: Config, name: str, programs: Programs) -> list[str]:
    """The server's arguments that name a path of this machine its sandbox does not hold (the
    filesystem server's directory without a grant): one line each, saying what to grant. A server
    that cannot see its directory says only EACCES or ENOENT, and restarts."""
    found = mcp_server(config, name)
    if found is None:
        return []
    index, server = found
    grant = config.settings_for(name).permissions
    from .config import within  # config.py reads mcp_servers through this module
    held = [os.path.realpath(place) for place in [
        *(grant.filesystem.read + grant.filesystem.write if grant.filesystem else []),
        *programs.readable, *(os.path.dirname(hop) for hop in programs.hops),
        "/usr", "/lib", "/lib64", "/etc/ssl", "/dev", "/proc"]]  # its /tmp is its own, not this one
    problems = []
    for position, arg in enumerate(server.args):
        if not arg.startswith("/") or not os.path.exists(arg) or grant.subprocess and arg.startswith("/usr/"):
            continue
        real = os.path.realpath(arg)
        if not any(within(real, place) for place in held):
            problems.append(f"{config.path}: mcp_servers[{index}].args[{position}]: {arg} is not in the server's "
                            f"sandbox: grant it in host.plugins.{name}.permissions.filesystem.read (or write)")
    return problems


def install_stamp(config: Config, name: str) -> str:
    """What a stdio server's installation looks like now (its programs, the files its args name,
    the directories it is installed in and what they hold one level down, a virtual environment's
    site-packages): an upgrade in place changes it, so a lazy server's cached tool list is not
    taken for the new one's. "" for a remote server, or one whose command cannot be resolved."""
    found = mcp_server(config, name)
    if found is None or found[1].remote:
        return ""
    index, server = found
    where = f"{config.path}: mcp_servers[{index}]"
    try:  # its PATH only: the other values (secrets among them) are the start's to resolve
        env, _ = _resolve_table({key: value for key, value in server.env.items() if key == "PATH"}, f"{where}.env")
        _, programs = _stdio_programs(config, where, server.command, env.get("PATH"))
    except ValueError:
        return ""
    paths = [*programs.executable, *(arg for arg in server.args if os.path.isabs(arg) and os.path.isfile(arg))]
    for root in programs.readable:
        paths.append(root)
        if os.path.isdir(root):
            try:
                paths += sorted(entry.path for entry in os.scandir(root))
            except OSError:
                pass
            paths += glob.glob(os.path.join(glob.escape(root), "lib", "python*", "site-packages"))
    stamps = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        stamps.append(f"{path}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(stamps).encode()).hexdigest()[:16]


def _writable_places(config: Config) -> list[tuple[str, str]]:
    """(config key, path) of every place a plugin (or a server) may write."""
    places = [(f"host.plugins.{name}.permissions.filesystem.write", path)
              for name, settings in config.host.plugins.items() if settings.permissions.filesystem
              for path in settings.permissions.filesystem.write]
    places += [("workspace_dir", config.workspace_dir), ("host.state_dir", config.host.state_dir)]
    return [(key, os.path.realpath(path)) for key, path in places]  # compared as the kernel finds them


def _refuse_writable(path: str, writable: list[tuple[str, str]], where: str) -> None:
    """A server's programs (and where they are looked for) must not lie where a plugin, or a server,
    may write: that one could change the code that runs with this server's grants, or plant a
    program whose #! line has the host bind what it names."""
    # where it leads, and where it is (a link in a writable place could be changed to lead elsewhere)
    for real in {os.path.realpath(path), os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))}:
        _refuse_place(path, real, writable, where)


def _refuse_place(path: str, real: str, writable: list[tuple[str, str]], where: str) -> None:
    from .config import within  # config.py reads mcp_servers through this module
    for key, place in writable:
        if within(real, place):
            raise ValueError(f"{where}: {path} lies in {place} ({key}), where plugins may write: a plugin "
                             "could change what this server runs. Install the server elsewhere")


def _search_path(path: str, writable: list[tuple[str, str]], where: str) -> str:
    """The PATH a command is looked for on: absolute entries only (an empty one would be the host's
    own working directory), none where a plugin may write."""
    entries = [entry for entry in path.split(":") if entry.startswith("/")]
    for entry in entries:
        _refuse_writable(entry, writable, where)
    return ":".join(entries)


def _resolve_table(table: dict[str, Any], where: str) -> tuple[dict[str, str], dict[str, str]]:
    """(the table with ${VAR}s and SecretRefs resolved from the host's environment and files, the
    resolved secret values by key). An unset variable fails the start, naming the key."""
    refs = {key: value for key, value in table.items() if is_secret_ref(value)}
    resolved, _ = resolve_config_secrets(refs, where)
    secrets = dict(resolved)
    out: dict[str, str] = {}
    for key, value in table.items():
        if key in resolved:
            out[key] = resolved[key]
            continue
        text = str(value)
        names = PLACEHOLDER.findall(text)
        for var in names:
            if not os.environ.get(var):
                raise ValueError(f"{where}.{key}: the environment variable {var!r} it names (${{{var}}}) is not "
                                 "set (or empty) in the host's environment")
            if not is_text(os.environ[var]):
                raise ValueError(f"{where}.{key}: the environment variable {var!r} it names (${{{var}}}) holds "
                                 "bytes that are not UTF-8")
        out[key] = PLACEHOLDER.sub(lambda m: os.environ[m.group(1)], text)
        if names:  # the whole value, and each variable's on its own (a token, a DSN's password)
            secrets[key] = out[key]
            secrets.update({f"{key} ${{{var}}}": os.environ[var] for var in names})
    return out, secrets


def program_plan(command: str, search: str, base: str, where: str) -> Programs:
    """The command found as a shell would (on the server's PATH, or a path taken from config.json's
    directory), and everything its exec needs: for a script, the interpreter on its #! line (through
    /usr/bin/env too), and for each binary the ELF loader it names."""
    found = _which(command, search, base)
    if found is None:
        raise ValueError(f"{where}: {command!r} is not an executable file" + (
            f" on the server's PATH ({search})" if "/" not in command else ""))
    executable: list[str] = []
    named: list[str] = []  # each program as it is named (by config.json, a #! line, an ELF header)
    chain = [found]
    while chain and len(executable) < 8:
        path = chain.pop(0)
        named.append(path)
        real = os.path.realpath(path)
        if real in executable:
            continue
        executable.append(real)
        interpreter = _shebang(real)
        if interpreter:
            program, argument = interpreter
            chain.append(program)
            if os.path.basename(program) == "env" and argument:
                target = _which(argument, search, base)
                if target is None:
                    raise ValueError(f"{where}: {found} runs {argument!r} (its #! line), which is not on the "
                                     f"server's PATH ({search})")
                chain.append(target)
        loader = _elf_interpreter(real)
        if loader:
            chain.append(loader)
    hops = [hop for path in named for hop in _link_hops(path)]
    readable = sorted({root for path in hops for root in _installation(path)})
    return Programs(found, executable, readable, sorted(set(hops)))


def _link_hops(path: str) -> list[str]:
    """The path and each symlink it goes through to the file (a venv's python -> the base's python ->
    python3.11): the worker's root needs every hop where it is, not only the last."""
    hops = [path]
    while os.path.islink(path) and len(hops) < 16:
        path = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
        hops.append(path)
    return hops


def _which(command: str, search: str, base: str) -> str | None:
    if "/" in command:
        path = os.path.normpath(os.path.join(base, os.path.expanduser(command)))
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None
    found = shutil.which(command, path=search)
    return os.path.abspath(found) if found else None


def _head(path: str, size: int, offset: int = 0) -> bytes:
    """Bytes of a regular file, never following a link or waiting on a FIFO (a command may lie
    where someone else can swap it); b"" if it cannot be read so."""
    try:
        fd, _ = open_regular_file(path)
    except OSError:
        return b""
    try:
        return os.pread(fd, size, offset)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _shebang(path: str) -> tuple[str, str] | None:
    """(interpreter, its one argument) of a #! line."""
    head = _head(path, 256)
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].decode("utf-8", "replace").split()
    if not words:
        return None
    argument = next((w for w in words[1:] if not w.startswith("-")), "")
    return words[0], argument


def _elf_interpreter(path: str) -> str | None:
    """PT_INTERP of a 64-bit little-endian ELF file (the dynamic loader the kernel opens to run it)."""
    header = _head(path, 64)
    if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
        return None
    try:
        phoff, = struct.unpack_from("<Q", header, 32)
        phentsize, phnum = struct.unpack_from("<HH", header, 54)
        count = min(phnum, 64)
        table = _head(path, phentsize * count, phoff)
        for i in range(count):
            kind, _, offset, _, _, size = struct.unpack_from("<IIQQQQ", table, i * phentsize)
            if kind == 3:  # PT_INTERP
                return _head(path, min(size, 4096), offset).rstrip(b"\0").decode("utf-8", "replace") or None
    except struct.error:
        return None
    return None


def _installation(path: str) -> list[str]:
    """Where a program lives, as far as running it goes: a Python environment (pyvenv.cfg beside its
    bin) whole; a Node package's node_modules whole; a Python installation's lib beside its bin; else
    the program's own file. System trees are the worker's root already."""
    if any(path == tree or path.startswith(tree + "/") for tree in ("/usr", "/bin", "/sbin", "/lib", "/lib64")):
        return []
    parts = path.split("/")
    for depth in range(len(parts) - 1, 0, -1):
        head = "/".join(parts[:depth]) or "/"
        if parts[depth - 1] == "node_modules":
            return [head]
        if os.path.isfile(os.path.join(head, "pyvenv.cfg")):
            return [head]
    directory = os.path.dirname(path)
    if os.path.basename(directory) == "bin":  # a link there may name its neighbour (python -> python3.11)
        lib = os.path.join(os.path.dirname(directory), "lib")
        return [directory, lib] if os.path.isdir(lib) else [directory]
    return [path]


def mcp_tool_name(server: str, tool: str) -> str:
    """Qanot's name for an MCP tool whose own name is taken (qanot/mcp_client.py)."""
    return f"mcp_{server}_{tool}"


def server_warnings(config: Config, name: str, programs: Programs) -> list[str]:
    """What would keep a stdio server from working in its sandbox, as `check` and its first start
    say it: a runner that fetches the package at each start, arguments naming paths not granted."""
    found = mcp_server(config, name)
    runner = os.path.basename(found[1].command) if found is not None else ""
    fetching = [f"{runner} fetches the package and runs it at each start, which its sandbox does not allow (no "
                "network unless granted, and nothing it writes may be executed): install the package once (npm "
                "install --prefix DIR PACKAGE, or a virtual environment) and make command its program"
                ] if runner in FETCHING_RUNNERS else []
    return fetching + _hidden_packages(programs) + ungranted_args(config, name, programs)


def _hidden_packages(programs: Programs) -> list[str]:
    """A server run by the host's own Python (its virtual environment, or its installation) finds
    none of the packages installed there: every worker's root lays an empty directory over the
    host's site-packages. The newcomer of pass 56 read only "No module named 'mcp'", at the start."""
    from .config import within
    from .sandbox_spec import host_site_dirs
    roots = _installation(programs.command)  # as named: a venv's python links to the base's, whose lib is seen too
    hidden = [site_dir for site_dir in host_site_dirs() if any(within(site_dir, root) for root in roots)]
    if not hidden:
        return []
    return [f"{programs.command} is the host's own Python, and the host's installed packages ({hidden[0]}) are "
            "hidden from every worker, its MCP servers too: give the server a virtual environment of its own "
            "(python3 -m venv DIR && DIR/bin/pip install PACKAGE) and make command DIR/bin/python"]
