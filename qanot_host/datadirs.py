"""The plugins' data directories, made by a host that never follows a path a plugin can write.

STATE_DIR/data is the host's (root's, mode 0711); each STATE_DIR/data/NAME in it is made by the host
and given to the plugin's uid through a descriptor opened without following symlinks. The host never
walks into one, never chowns what is inside and never opens a name in it: a plugin that swaps a
directory for a symlink there (renameat2 RENAME_EXCHANGE, in a loop) finds the host doing nothing it
could redirect. With namespaces (as root) the directory is only a mount point: the plugin's disk is
mounted on it inside the worker's own root, never in the host's namespace.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = ["DataDirs"]


class DataDirs:
    def __init__(self, state_dir: str) -> None:
        self._data = os.path.join(state_dir, "data")
        self.root_dir = os.path.join(state_dir, "root")  # empty: where each worker mounts its own root

    def prepare(self, plugin: str, uid: int, tmp: bool) -> str:
        """Make the plugin's data directory (and, without namespaces, its TMPDIR in it); return it."""
        for path, mode in ((self._data, 0o711), (self.root_dir, 0o700)):
            os.makedirs(path, mode=mode, exist_ok=True)
        fd = _own_directory(self._data, plugin, uid, 0o700)
        try:
            if tmp:
                _make_tmp(fd)
        finally:
            os.close(fd)
        return os.path.join(self._data, plugin)

    @staticmethod
    def prepare_workspace(workspace_dir: str, plugin: str, uid: int) -> str:
        """Make workspace_dir/NAME, the plugin's own place in the workspace (readable by the agent,
        writable by the plugin); return its real path. OSError if NAME there is not a directory
        (a symlink is never followed), or is one the plugin's uid does not own already: the workspace
        is the agent's, and a directory found there (its backups, its users' profiles) is never
        handed to a plugin that happens to bear its name."""
        os.close(_own_directory(workspace_dir, plugin, uid, 0o755, take_existing=False))
        return os.path.join(os.path.realpath(workspace_dir), plugin)


def _own_directory(parent_path: str, name: str, uid: int, mode: int, take_existing: bool = True) -> int:
    """parent/name made if absent and opened without following a link; given to uid (if >= 0). An
    existing one of another owner is taken only if `take_existing` (else OSError EEXIST)."""
    parent = os.open(parent_path, os.O_DIRECTORY | os.O_CLOEXEC)
    made = False
    try:
        try:
            os.mkdir(name, mode, dir_fd=parent)
            made = True
        except FileExistsError:
            pass
        fd = os.open(name, os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    finally:
        os.close(parent)
    try:
        owner = os.fstat(fd).st_uid
        if uid >= 0 and owner != uid and not made and not take_existing:
            raise OSError(errno.EEXIST, f"it exists already and is uid {owner}'s, not the plugin's (uid {uid}): the "
                                        "host hands a plugin only a place it made for it. If it is this plugin's "
                                        f"from before, chown -R {uid}:{uid} it; if it is the agent's, rename the "
                                        "plugin's directory")
        if uid >= 0 and owner != uid:
            os.fchown(fd, uid, uid)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make_tmp(data_fd: int) -> None:
    """TMPDIR for a worker without a private /tmp: made only if absent, never followed."""
    try:
        os.mkdir(".tmp", 0o700, dir_fd=data_fd)
    except FileExistsError:
        return
    tmp = os.open(".tmp", os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=data_fd)
    try:
        st = os.fstat(data_fd)
        if stat.S_ISDIR(os.fstat(tmp).st_mode):
            os.fchown(tmp, st.st_uid, st.st_gid)
    finally:
        os.close(tmp)


MAX_WORKSPACE_ENTRIES = 20_000  # files and directories in a plugin's place in the workspace
MAX_WORKSPACE_DEPTH = 64  # directories within directories there


def workspace_problem(path: str, limit_mb: int, pids: list[int] | None = None) -> str | None:
    """Why the plugin's place in the workspace is over its ceiling (workspace_mb, or more than
    MAX_WORKSPACE_ENTRIES entries, or nested deeper than MAX_WORKSPACE_DEPTH), or None. The workspace
    is on the host's own disk (the agent reads it), so the host measures it: what is in the tree, and
    what the plugin's processes (`pids`) still hold open there after unlinking it. 0 turns it off."""
    if not limit_mb:
        return None
    try:
        used, entries = disk_usage(path, MAX_WORKSPACE_ENTRIES)
        device = os.stat(path, follow_symlinks=False).st_dev
    except OSError:
        return None  # gone, or not a directory: prepare_workspace says so at the next start
    if entries >= MAX_WORKSPACE_ENTRIES:
        return (f"{path} holds more than {MAX_WORKSPACE_ENTRIES} files and directories, or directories "
                f"nested deeper than {MAX_WORKSPACE_DEPTH}")
    used += held_unlinked(pids or [], device)
    if used > limit_mb * 2**20:
        return f"{path} takes {used / 2**20:.0f} MB, over its workspace_mb={limit_mb}"
    return None


def place_full_error(plugin: str, problem: str) -> str:
    """What a plugin over its workspace ceiling is failed with (at a start, or found idle), and how
    the operator brings it back."""
    return (f"its place in the workspace is full: {problem} (remove files from it, or raise "
            f"host.plugins.{plugin}.limits.workspace_mb; then reload)")


def disk_usage(path: str, max_entries: int) -> tuple[int, int]:
    """(bytes on disk, entries) beneath path, counting no further than max_entries (a tree deeper than
    MAX_WORKSPACE_DEPTH counts as max_entries). Each directory is opened relative to its parent,
    never through a link (the plugin owns this tree and may swap a directory for a link while it is
    walked), and only one descriptor per level is open at a time: a plugin's thousands of directories
    must not run the host out of descriptors."""
    totals = [0, 0]
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _walk(fd, totals, max_entries, MAX_WORKSPACE_DEPTH)
    finally:
        os.close(fd)
    return totals[0], totals[1]


def _walk(fd: int, totals: list[int], max_entries: int, depth: int) -> None:
    subdirectories = []
    with os.scandir(fd) as listing:
        for entry in listing:
            totals[1] += 1
            if totals[1] >= max_entries:
                return
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            totals[0] += info.st_blocks * 512
            if stat.S_ISDIR(info.st_mode):
                subdirectories.append(entry.name)
    for name in subdirectories:  # the listing is closed by now
        if depth == 0:
            totals[1] = max_entries
            return
        try:
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                continue  # swapped meanwhile, or gone
            raise
        try:
            _walk(child, totals, max_entries, depth - 1)
        finally:
            os.close(child)
        if totals[1] >= max_entries:
            return


def held_unlinked(pids: list[int], device: int) -> int:
    """Bytes of files on `device` that no name points to any more but the processes hold open or
    mapped: space a plugin keeps after unlinking what it wrote. Only what the kernel already calls
    "(deleted)" is looked at (a worker maps and opens a hundred files that are not): its open files
    by their links, its mappings by a read of /proc/PID/maps, each file once."""
    seen: set[tuple[int, int]] = set()
    used = 0
    for pid in pids:
        for path in [*_deleted_fds(pid), *_deleted_mappings(pid)]:
            try:
                info = os.stat(path)
            except OSError:
                continue
            key = (info.st_dev, info.st_ino)
            if info.st_dev == device and info.st_nlink == 0 and key not in seen and stat.S_ISREG(info.st_mode):
                seen.add(key)
                used += info.st_blocks * 512
    return used


def _deleted_fds(pid: int) -> list[str]:
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return []
    found = []
    for name in names:
        try:
            if os.readlink(f"{base}/{name}").endswith(" (deleted)"):
                found.append(f"{base}/{name}")
        except OSError:
            continue
    return found


def _deleted_mappings(pid: int) -> list[str]:
    """/proc/PID/map_files/START-END of one mapping of each deleted file. The plugin decides how
    long its maps file is (tens of thousands of mappings of a file with a 4 KB path made it 270 MB):
    it is read a line at a time, never whole, and a file mapped many times is looked at once (by the
    device and inode the line names; which device is the workspace's is left to stat(), as some
    filesystems name another one here)."""
    found: dict[tuple[bytes, bytes], str] = {}
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            for line in f:  # "START-END PERMS OFFSET MAJOR:MINOR INODE PATH", the path at most PATH_MAX
                if not line.endswith(b" (deleted)\n"):
                    continue
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and (fields[3], fields[4]) not in found:
                    found[fields[3], fields[4]] = f"/proc/{pid}/map_files/{fields[0].decode()}"
    except OSError:
        pass
    return list(found.values())
