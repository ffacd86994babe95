"""Reading config.json: Qanot's keys, as Qanot reads them, plus qanot-host's own settings under
"host" (their shape: settings.py), checked before anything starts.

Qanot's config.json holds much more than plugins (models, bots, ...): unknown top-level keys are
left alone. Inside "host" every key is ours, so an unknown one there is a typo and is refused.
Relative paths are taken from the directory that holds config.json. Every error names the file and
the key at fault.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import stat
import sys

import msgspec

from .errors import ConfigError
from .json_objects import parse_json_object
from .mcp_servers import add_mcp_servers, read_mcp_servers
from .safe_files import unsafe_directory
from .schema import json_problem
from .settings import Config, PluginSettings, agents_own_name, split_host_port

__all__ = ["load_config", "parse_config", "directory_problems", "own_workspace", "validation_message", "within"]

log = logging.getLogger("qanot_host.config")

MAX_PLUGIN_NAME_BYTES = 200  # a file name holds 255: room for what the host adds (.img, sdist-build:)


def load_config(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None
    return parse_config(raw, path)


UID_BASE_VARIABLE = "QANOT_HOST_UID_BASE"
UID_BASE_MAX = 2**31 - 5000  # settings.py's bound on host.sandbox.uid_base


def parse_config(raw: bytes | str, path: str) -> Config:
    try:
        data = parse_json_object(raw, path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    data.pop("path", None)
    _default_uid_base(data)
    _plugin_entries(data, path)
    read_mcp_servers(data, path)
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {_name_the_plugin(data, validation_message(exc))}") from None
    config.path = path
    if config.host.metrics is not None:  # refused by `check` as by `run` (newcomer pass 58: check passed it)
        try:
            split_host_port(config.host.metrics, "host.metrics")
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    add_mcp_servers(config)  # each server one more plugin, after the plugins
    _check_plugins(config)
    _resolve_paths(config)
    config.path = os.path.abspath(path)
    _check_grants(config)
    return config


def _default_uid_base(data: dict) -> None:
    """QANOT_HOST_UID_BASE: the uid_base of a config.json that sets none, so that configs not one's
    own (the test suite's hundreds, an example) can run beside another host on the machine."""
    value = os.environ.get(UID_BASE_VARIABLE)
    if not value:
        return
    host = data.get("host")
    sandbox = host.get("sandbox") if isinstance(host, dict) else None
    if host is None:
        host = data["host"] = {}
    if sandbox is None and isinstance(host, dict):
        sandbox = host["sandbox"] = {}
    if not isinstance(sandbox, dict) or "uid_base" in sandbox:
        return  # not an object: the config's own error; set: the config's own value
    try:
        uid_base = int(value)
    except ValueError:
        uid_base = -1
    if not 1000 <= uid_base <= UID_BASE_MAX:
        raise ConfigError(f"{UID_BASE_VARIABLE}={value!r} in the environment: not a whole number from 1000 to "
                          f"{UID_BASE_MAX} (the uid_base of configs that set none)")
    sandbox["uid_base"] = uid_base


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
        if len(os.fsencode(entry.name)) > MAX_PLUGIN_NAME_BYTES:
            raise ConfigError(f"{where}: a name of {len(os.fsencode(entry.name))} bytes: the host names files and "
                              f"directories after its plugins (its disk image NAME.img, the sdist-build:NAME job's), "
                              f"and a file name holds 255 bytes; at most {MAX_PLUGIN_NAME_BYTES}")
        if ":" in entry.name:  # the host's own jobs are named NAME:PLUGIN (uid, data, disk, cgroup)
            raise ConfigError(f"{where}: {entry.name!r}: ':' is reserved for the host's own jobs "
                              "(such as sdist-build:PLUGIN); rename the plugin's directory")
        if entry.name in seen:
            raise ConfigError(f"{where}: plugin {entry.name!r} is listed twice")
        if agents_own_name(entry.name) and config.settings_for(entry.name).workspace:
            raise ConfigError(f"{config.path}: host.plugins.{entry.name}.workspace: workspace_dir/{entry.name} is "
                              "the agent's own, or may be (it keeps its state and files there, and reads them back "
                              "into its prompt), never a plugin's place: remove the key (the plugin then has no "
                              "place in the workspace) or rename the plugin's directory")
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
    _forget_the_file_systems()
    # the host's own files: its state, and config.json (model keys; its grants, rewritten, at a reload)
    protected = {"host.state_dir": config.host.state_dir, "config.json": os.path.abspath(config.path)}
    # Where the host writes (workspace_dir) or finds code it runs (plugins, wheels): a plugin that
    # may write one of these, or a directory that holds one, could swap it for a link to anywhere,
    # or change another plugin's code. A grant inside workspace_dir is fine (its own subdirectory).
    builtin = config.host.builtin_plugins_dir or os.path.realpath(os.path.join(os.path.dirname(__file__),
                                                                                 "builtin_plugins"))
    builtin_key = "host.builtin_plugins_dir" if config.host.builtin_plugins_dir else "qanot-host's built-in plugins"
    code = {"plugins_dir": config.plugins_dir, builtin_key: builtin,
            "host.wheel_dir": config.host.wheel_dir,
            **{f"host.search_path[{i}]": path for i, path in enumerate(config.host.search_path or [])}}
    # workspace_dir holds every plugin's own place, workspace_dir/NAME, writable by that plugin: the
    # host's own files or plugins' code there, or workspace_dir in them, would be a plugin's to change
    # (a plugin named `envs` with workspace_dir the state_dir: attack pass 49). Under a name no plugin
    # is ever given as its place (a name with a dot: Qanot's config.json beside the default
    # .qanot-host, say), they are out of every plugin's reach.
    for what, place in {**protected, **code}.items():
        if place is None:
            continue
        inside = _beneath(place, config.workspace_dir)
        if _overlap(config.workspace_dir, place) and not (inside and agents_own_name(inside.split("/")[0])):
            raise ConfigError(f"{config.path}: workspace_dir: {config.workspace_dir} and {what} ({place}) overlap: "
                              "each plugin may write its own directory in workspace_dir (workspace_dir/NAME), so "
                              "it may lie in neither the host's own files nor plugins' code, nor hold them but "
                              "under a name with a dot in it, which no plugin's place has")
    host_code = _host_code()
    for owner, w_index, written in writes:
        key = f"{config.path}: host.plugins.{owner}.permissions.filesystem.write[{w_index}]"
        if _holds(written, config.workspace_dir):
            raise ConfigError(f"{key}: {written} holds workspace_dir ({config.workspace_dir}), where the host "
                              "writes TOOLS.md and SOUL.md: grant a directory inside it instead")
        for what, place in host_code.items():
            if _overlap(place, written):
                raise ConfigError(f"{key}: {written} and {what} ({place}) overlap: a plugin may not write code or "
                                  "settings the host and every worker run (attack pass 50)")
    own = {entry.name: own_workspace(config, entry.name) for entry in config.plugins if config.has_place(entry.name)}
    # which places a path touches, found from the path (a plugin's place is workspace_dir/NAME): a
    # comparison with each place cost 1.3 s for 500 plugins of two grants each
    def places_touched(path: str) -> list[str]:
        names = _places_touched(path, config.workspace_dir)
        return list(own) if names is None else [name for name in names if name in own]
    for owner, w_index, written in writes:
        for name in places_touched(written):
            path = own[name]
            if name != owner and _holds(written, path):
                raise ConfigError(
                    f"{config.path}: host.plugins.{owner}.permissions.filesystem.write[{w_index}]: {written} holds "
                    f"{path}, plugin {name}'s own place in the workspace: {owner} could swap it for a directory "
                    f"of its own. Set host.plugins.{name}.workspace to false, or grant {owner} less")
    by_place: dict[str, list[tuple[str, int | None, str]]] = {}
    for entry in writes:
        for form in {entry[2], _real(entry[2])}:
            by_place.setdefault(form, []).append(entry)

    def writes_holding(path: str) -> list[tuple[str, int | None, str]]:
        """The write grants that hold `path` (it, or a directory above it), as written or links followed."""
        found: dict[int, tuple[str, int | None, str]] = {}
        for form in {path, _real(path)}:
            while True:
                for entry in by_place.get(form, ()):
                    found[id(entry)] = entry
                parent = os.path.dirname(form)
                if parent == form:
                    break
                form = parent
        return list(found.values())
    for name, settings in config.host.plugins.items():
        grant = settings.permissions.filesystem
        if grant is None:
            continue
        for kind, paths in (("read", grant.read), ("write", grant.write)):
            for index, path in enumerate(paths):
                key = f"{config.path}: host.plugins.{name}.permissions.filesystem.{kind}[{index}]"
                system = _system_place(path)
                if system:
                    raise ConfigError(f"{key}: {path} is not granted: {system}")
                # every comparison below follows links too: plugins_dir named through a symlink let a
                # write grant of its real path through, and one plugin rewrote another's code (attack pass 50)
                for what, place in protected.items():
                    if _overlap(place, path):
                        raise ConfigError(f"{key}: {path} and {what} ({place}) overlap: a plugin may not be "
                                          "granted the host's own files")
                for what, place in code.items():
                    if place is not None and _overlap(place, path):
                        raise ConfigError(f"{key}: {path} and {what} ({place}) overlap: a plugin may not be granted "
                                          "plugins' code (its own directory is in its root already)")
                for other in places_touched(path):
                    place = own[other]
                    if other != name and _overlap(place, path):
                        raise ConfigError(f"{key}: {path} and {place}, plugin {other}'s own place in the workspace, "
                                          "overlap: a plugin's place is its own (attack pass 50)")
                    if other == name and _holds(place, path) and not _same(place, path):
                        raise ConfigError(f"{key}: {path} is inside {place}, its own place in the workspace, which "
                                          "it may write: it could turn part of the path into a symlink to anywhere")
                for owner, w_index, written in writes_holding(path):
                    if not _same(path, written):
                        raise ConfigError(
                            f"{key}: {path} is inside {written}, which plugin {owner} may write "
                            f"(host.plugins.{owner}.permissions.filesystem.write[{w_index}]): it could turn part of "
                            "the path into a symlink to anywhere. Grant the outer directory, or one outside it")


def _host_code() -> dict[str, str]:
    """Where the code and settings the host runs, and binds into every worker's root, live: its
    interpreter, standard library and installed packages (qanot_host's own among them), and the
    system's programs, libraries and /etc. A plugin that may write there runs code as the host."""
    import site
    import sysconfig
    here = os.path.dirname(os.path.abspath(__file__))
    places = {"the interpreter's prefix": sys.prefix, "the interpreter's base prefix": sys.base_prefix,
              "the standard library": sysconfig.get_paths()["stdlib"], "qanot-host's own package": here,
              "qanot-host's worker package": os.path.join(os.path.dirname(here), "qanot_worker")}
    packages = [*site.getsitepackages(), *(path for path in sys.path if os.path.basename(path) in
                                           ("site-packages", "dist-packages"))]
    if site.ENABLE_USER_SITE:  # the host imports from it (and runs its .pth files) at every start
        packages.append(site.getusersitepackages())
    places.update({f"site-packages ({path})": path for path in packages})
    places.update({f"the system's {path}": path
                   for path in ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32", "/etc")})
    return places


def _system_place(path: str) -> str | None:
    """Why a grant of the host's own /proc, /sys or /dev (which the worker's root has its own of)
    is refused: bound over the worker's, the host's /proc showed a plugin every process of the
    machine and its command line (attack pass 49)."""
    for real in {path, _real(path)}:
        if within(real, "/proc") or within(real, "/sys"):
            return ("the host's /proc and /sys are never a plugin's (the worker has its own /proc, of its "
                    "PID namespace, and no /sys): they show every process of the machine")
        if within(real, "/dev") or _is_device(real):
            # the worker has its own /dev (null, zero, random, urandom, tty, shm): a device node of the
            # host's cannot be bound into its read-only root, and failed the plugin's start (attack pass 51)
            return ("the host's /dev and its device nodes are never a plugin's (the worker has its own /dev): "
                    "remove the grant")
    return None


def _is_device(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


def own_workspace(config: Config, plugin: str) -> str:
    """workspace_dir/NAME: the plugin's own place in the workspace."""
    return os.path.join(config.workspace_dir, plugin)


def _overlap(one: str, other: str) -> bool:
    """Either holds the other: as written, once links are followed (one may be a link to the other),
    or as places in the file systems they are on (a bind mount of state_dir, or of a directory in it,
    elsewhere is that directory: attack pass 51 and the review after it)."""
    return any(within(a, b) or within(b, a) for a, b in _all_ways(one, other))


@functools.lru_cache(maxsize=65536)
def _real(path: str) -> str:
    return os.path.realpath(path)


@functools.lru_cache(maxsize=65536)
def _in_file_system(path: str) -> tuple[str, str]:
    """(the file system's device, the path within it) of `path`, links followed, whether or not it
    exists yet: from the mount it lies on (/proc/self/mountinfo gives each mount's device and the
    directory of its file system it shows, which a bind mount chooses)."""
    real = _real(path)
    best = ("", "/", "/")  # no mount table: the path as it is
    for point, device, root in _mounts():
        if within(real, point) and len(point) >= len(best[1]):  # the last of one point is on top
            best = (device, point, root)
    device, point, root = best
    rest = os.path.relpath(real, point)
    return device, root if rest == "." else os.path.normpath(os.path.join(root, rest))


@functools.lru_cache(maxsize=1)
def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, device, root) of each mount this process sees, in /proc/self/mountinfo's order."""
    def unescape(field: str) -> str:
        return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    mounts = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 5:
            mounts.append((unescape(fields[4]), fields[2], unescape(fields[3])))
    return mounts


def _forget_the_file_systems() -> None:
    """Each load looks at the file systems anew (a mount or a link may have changed since the last)."""
    for cached in (_real, _in_file_system, _mounts):
        cached.cache_clear()


def _places_touched(path: str, workspace: str) -> set[str] | None:
    """The names under workspace_dir whose places `path` is, lies in or holds: None for all of them
    (it holds workspace_dir); as written, links followed, and in the file system."""
    names: set[str] = set()
    for one, directory in _all_ways(path, workspace):
        if within(directory, one):
            return None
        if within(one, directory):
            names.add(os.path.relpath(one, directory).split("/")[0])
    return names


def _holds(directory: str, path: str) -> bool:
    """`path` is `directory` or lies beneath it, as written or once links are followed."""
    return any(within(b, a) for a, b in _both_ways(directory, path))


def _same(one: str, other: str) -> bool:
    return one == other or _real(one) == _real(other)


def _beneath(path: str, directory: str) -> str:
    """`path` relative to `directory` if it lies strictly beneath it (as written, or links followed:
    both must agree), else ""."""
    found = {os.path.relpath(a, b) if within(a, b) and a != b else "" for a, b in _both_ways(path, directory)}
    return found.pop() if len(found) == 1 else ""


def _both_ways(one: str, other: str) -> tuple[tuple[str, str], tuple[str, str]]:
    return (one, other), (_real(one), _real(other))


def _all_ways(one: str, other: str) -> list[tuple[str, str]]:
    """The two paths as written, with links followed, and, on one file system, as its paths."""
    (device, inside), (other_device, other_inside) = _in_file_system(one), _in_file_system(other)
    return [*_both_ways(one, other), *([(inside, other_inside)] if device == other_device else [])]


def within(path: str, directory: str) -> bool:
    """`path` is `directory` or lies beneath it (compared as written: callers resolve what they must)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _resolve_paths(config: Config) -> None:
    base = os.path.dirname(os.path.abspath(config.path))

    def resolve(value: str) -> str:
        path = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
        # normpath keeps a leading '//' (POSIX lets it mean something else; Linux does not): one
        # '/' then, or //STATE_DIR passed the checks above as a path of its own (the review of 11-27)
        return "/" + path.lstrip("/") if path.startswith("//") else path

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
    """Why state_dir or workspace_dir cannot be used (one line each, naming the file and the key):
    not there and not makeable, not writable, or not the host's alone (safe_files.unsafe_directory);
    `create`: make them (the host at start) rather than only look (check)."""
    problems = []
    for key, path in (("host.state_dir", config.host.state_dir), ("workspace_dir", config.workspace_dir)):
        # the host makes each plugin's place in workspace_dir (its owner changed to the plugin's uid,
        # bound writable into its sandbox): through another user's symlink on the way, /etc/NAME
        # judged before it is made (nothing is made through another user's link) and, when asked to make
        # it, after (a race)
        problem = unsafe_directory(path) or _directory_problem(path, create) or (create and unsafe_directory(path))
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
