"""`qanot.fs_safe` as Qanot 2.0.4 has it: checks a plugin may run before it reads or writes a path
the agent gave it, and an atomic write jailed to a root. Pure functions, the same messages.

These are advice for the plugin's own code, not a boundary: in qanot-host what a plugin can touch
is decided by its sandbox, whatever these say.
"""

from __future__ import annotations

import os
import uuid

__all__ = ["SafeWriteError", "is_path_within_root", "validate_read_path", "validate_write_path", "safe_write_file"]

SYSTEM_DIRS = ("/etc", "/usr", "/bin", "/sbin", "/lib", "/lib64", "/boot", "/proc", "/sys", "/dev", "/var/run",
               "/run", "/System", "/Library", "C:\\Windows", "C:\\Program Files")
SENSITIVE_FILES = (".env", "config.json", ".netrc", ".npmrc")
PROTECTED_FILES = ("config.json",)


class SafeWriteError(Exception):
    """A write refused: `reason` says why, `path` is the path as given."""

    def __init__(self, reason: str, path: str):
        self.reason = reason
        self.path = path
        super().__init__(f"Write blocked ({reason}): {path}")


def _is_under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory + os.sep)


def is_path_within_root(root: str, path: str) -> bool:
    """Whether path, symlinks and `..` resolved, is root or inside it."""
    try:
        return _is_under(os.path.realpath(path), os.path.realpath(root))
    except (OSError, ValueError):
        return False


def _common_problem(path: str) -> str | None:
    if not path or not path.strip():
        return "Empty path"
    if "\x00" in path:
        return "Null byte in path"
    return None


def _system_dir(resolved: str) -> str | None:
    for directory in SYSTEM_DIRS:
        if _is_under(resolved, directory):
            return f"System directory blocked: {directory}"
    return None


def validate_read_path(path: str) -> str | None:
    """Why reading path is refused (a system directory, a file of credentials), or None."""
    problem = _common_problem(path)
    if problem:
        return problem
    resolved = os.path.realpath(path)
    problem = _system_dir(resolved)
    if problem:
        return problem
    name = os.path.basename(resolved)
    if name in SENSITIVE_FILES:
        return f"Sensitive file blocked: {name}"
    return None


def validate_write_path(path: str, root: str | None = None) -> str | None:
    """Why writing path is refused (config.json, a system directory, a symlink, outside root), or None."""
    problem = _common_problem(path)
    if problem:
        return problem
    resolved = os.path.realpath(path)
    name = os.path.basename(resolved)
    if name in PROTECTED_FILES:
        return f"Protected file — cannot be modified by agent: {name}"
    problem = _system_dir(resolved)
    if problem:
        return problem
    if os.path.islink(path):
        return "Symlink write blocked"
    if root and not is_path_within_root(root, path):
        return "Path outside workspace root"
    return None


def safe_write_file(path: str, content: str, root: str | None = None) -> str:
    """Write content to path through a temporary file and a rename; returns the resolved path.
    SafeWriteError if validate_write_path refuses it, or if the file ended up outside root."""
    problem = validate_write_path(path, root)
    if problem:
        raise SafeWriteError(problem, path)
    resolved = os.path.realpath(path)
    parent = os.path.dirname(resolved)
    os.makedirs(parent, exist_ok=True)
    scratch = os.path.join(parent, f".{os.path.basename(resolved)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(scratch, "w", encoding="utf-8") as file:
            file.write(content)
        os.replace(scratch, resolved)
    except BaseException:
        try:
            os.unlink(scratch)
        except OSError:
            pass
        raise
    if root and not is_path_within_root(root, resolved):
        try:
            os.unlink(resolved)
        except OSError:
            pass
        raise SafeWriteError("path-mismatch", path)
    return resolved
