"""Finding a worker's own pid from the host, below the init of its PID namespace."""

from __future__ import annotations

__all__ = ["find_in_namespace"]


def find_in_namespace(root: int, nspid: int) -> int | None:
    """The descendant of `root` (itself included) whose pid in its own, nested PID namespace is
    `nspid`."""
    queue = [root]
    while queue:
        pid = queue.pop(0)
        ids = _nspids(pid)
        if len(ids) >= 2 and ids[-1] == nspid:
            return pid
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                queue.extend(int(child) for child in f.read().split())
        except OSError:
            pass
    return None


def _nspids(pid: int) -> list[int]:
    # Read as bytes: its Name line is the process's name cut at 15 bytes, which may cut a letter
    # in two (a plugin named погода: UnicodeDecodeError, and the plugin never started).
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except OSError:
        pass
    return []
