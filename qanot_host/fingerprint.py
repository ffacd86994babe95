"""A plugin directory's fingerprint: what `reload` compares to restart a plugin whose code or
plugin.json changed, not only its config entry, and what keys a lazy plugin's cached tools.

Every file counts. The smallest are hashed by content first, up to budgets (a file copied over
with its old mtime still changes the hash, and code is small); the rest, a large dataset, count by
their metadata, change time included, which no write can leave as it was. So no edit goes unseen,
and a plugin that ships a dataset does not make every reload read it. A directory of more files than
MAX_FILES is not walked to the end: its fingerprint is new each time (it counts as changed at every
reload, and a lazy one lists its tools at every start), and a warning says so. Bytecode caches
count too (Python may load a .pyc in place of its source), and a link counts by what it points to.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import uuid

__all__ = ["plugin_fingerprint"]

log = logging.getLogger(__name__)

MAX_FILES = 20_000  # walked: ~0.3 s here (in a thread); a reload fingerprints every plugin
MAX_HASHED_FILES = 5000  # each opened, read and hashed: ~0.13 s here for 5000 small files
MAX_HASHED_BYTES = 32 * 2**20


def plugin_fingerprint(directory: str) -> str:
    entries = _entries(directory)
    if entries is None:
        log.warning("%s holds more than %d files: its content cannot be fingerprinted, so it counts as "
                    "changed at every reload and a lazy plugin's tools are listed at every start",
                    directory, MAX_FILES)
        return f"unfingerprinted:{uuid.uuid4().hex}"
    hashed = _contents(directory, entries)
    digest = hashlib.sha256()
    for relative, st in entries:
        digest.update(relative.encode(errors="surrogateescape") + b"\0")
        content = hashed.get(relative)
        if stat.S_ISDIR(st.st_mode):
            digest.update(b"directory\0")  # its times change with any bytecode cache written beneath
        elif content is not None:
            digest.update(f"{stat.S_IMODE(st.st_mode)}:".encode() + content)
        else:
            digest.update(_metadata(st))
            if stat.S_ISLNK(st.st_mode):
                digest.update(_link_target(os.path.join(directory, relative)))
    return digest.hexdigest()


def _entries(directory: str) -> list[tuple[str, os.stat_result]] | None:
    """(path relative to directory, lstat) of every file and directory beneath it, in a fixed
    order; None past MAX_FILES."""
    found: list[tuple[str, os.stat_result]] = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(dirs)
        for name in [*dirs, *sorted(names)]:
            if len(found) >= MAX_FILES:
                return None
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            found.append((os.path.relpath(path, directory), st))
    return found


def _contents(directory: str, entries: list[tuple[str, os.stat_result]]) -> dict[str, bytes]:
    """Content hashes of the regular files, smallest first, while the budgets last."""
    budget = MAX_HASHED_BYTES
    hashed: dict[str, bytes] = {}
    for relative, st in sorted((e for e in entries if stat.S_ISREG(e[1].st_mode)), key=lambda e: e[1].st_size):
        if st.st_size > budget or len(hashed) >= MAX_HASHED_FILES:
            break
        budget -= st.st_size
        try:  # never through a link, never blocking on a FIFO put where the file was
            fd = os.open(os.path.join(directory, relative), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue  # counted by its metadata
        with open(fd, "rb") as f:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                hashed[relative] = hashlib.sha256(f.read(st.st_size + 1)).digest()
    return hashed


def _link_target(path: str) -> bytes:
    """Where a link points, and what is there now: an edit of a file it names elsewhere counts."""
    try:
        target = os.readlink(path).encode(errors="surrogateescape")
    except OSError:
        return b"\0"
    try:
        st = os.stat(path)
    except OSError:
        return target + b"\0dangling\0"
    return target + b"\0" + _metadata(st)


def _metadata(st: os.stat_result) -> bytes:
    """What stands for a file not hashed: no write leaves its change time as it was."""
    return f"{st.st_mode}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}\0".encode()
