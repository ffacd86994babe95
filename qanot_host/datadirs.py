"""The plugins' data directories, made by a host that never follows a path a plugin can write.

STATE_DIR/data is the host's (root's, mode 0711); each STATE_DIR/data/NAME in it is made by the host
and given to the plugin's uid through a descriptor opened without following symlinks. The host never
walks into one, never chowns what is inside and never opens a name in it: a plugin that swaps a
directory for a symlink there (renameat2 RENAME_EXCHANGE, in a loop) finds the host doing nothing it
could redirect. With namespaces (as root) the directory is only a mount point: the plugin's disk is
mounted on it inside the worker's own root, never in the host's namespace.
"""

from __future__ import annotations

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
        (a symlink is never followed)."""
        os.close(_own_directory(workspace_dir, plugin, uid, 0o755))
        return os.path.join(os.path.realpath(workspace_dir), plugin)


def _own_directory(parent_path: str, name: str, uid: int, mode: int) -> int:
    """parent/name made if absent and opened without following a link; given to uid (if >= 0)."""
    parent = os.open(parent_path, os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.mkdir(name, mode, dir_fd=parent)
        except FileExistsError:
            pass
        fd = os.open(name, os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    finally:
        os.close(parent)
    try:
        if uid >= 0 and os.fstat(fd).st_uid != uid:
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


MAX_WORKSPACE_ENTRIES = 100_000  # files and directories in a plugin's place in the workspace


def workspace_problem(path: str, limit_mb: int) -> str | None:
    """Why the plugin's place in the workspace is over its ceiling (workspace_mb, or more than
    MAX_WORKSPACE_ENTRIES entries), or None. The workspace is on the host's own disk (the agent reads
    it), so the host measures it; 0 turns the check off."""
    if not limit_mb:
        return None
    try:
        used, entries = disk_usage(path, MAX_WORKSPACE_ENTRIES)
    except OSError:
        return None  # gone, or not a directory: prepare_workspace says so at the next start
    if entries >= MAX_WORKSPACE_ENTRIES:
        return f"{path} holds more than {MAX_WORKSPACE_ENTRIES} files and directories"
    if used > limit_mb * 2**20:
        return f"{path} takes {used / 2**20:.0f} MB, over its workspace_mb={limit_mb}"
    return None


def disk_usage(path: str, max_entries: int) -> tuple[int, int]:
    """(bytes on disk, entries) beneath path, counting no further than max_entries. Directories are
    opened by descriptor, each relative to its parent and never through a link: the plugin owns this
    tree and may swap a directory for a link while it is walked."""
    used = entries = 0
    stack = [os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)]
    try:
        while stack and entries < max_entries:
            fd = stack.pop()
            try:
                with os.scandir(fd) as listing:
                    for entry in listing:
                        entries += 1
                        if entries >= max_entries:
                            break
                        try:
                            info = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        used += info.st_blocks * 512
                        if stat.S_ISDIR(info.st_mode):
                            try:
                                stack.append(os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                                     | os.O_CLOEXEC, dir_fd=fd))
                            except OSError:
                                continue  # swapped meanwhile, or gone
            finally:
                os.close(fd)
    finally:
        for fd in stack:
            os.close(fd)
    return used, entries
