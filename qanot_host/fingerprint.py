"""A plugin directory's fingerprint: what `reload` compares to restart a plugin whose code or
plugin.json changed, not only its config entry.

The content of every file counts (a file copied over with its old mtime still changes the hash),
up to a budget; past it, the rest count by size and modification time, so a plugin that ships a
large dataset does not make every reload read it. Bytecode caches never count.
"""

from __future__ import annotations

import hashlib
import os
import stat

__all__ = ["plugin_fingerprint"]

MAX_FILES = 5000
MAX_HASHED_BYTES = 32 * 2**20


def plugin_fingerprint(directory: str) -> str:
    digest = hashlib.sha256()
    budget = MAX_HASHED_BYTES
    files = 0
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(names):
            files += 1
            if files > MAX_FILES:
                digest.update(b"...more files")
                return digest.hexdigest()
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            digest.update(os.path.relpath(path, directory).encode(errors="surrogateescape") + b"\0")
            if not stat.S_ISREG(st.st_mode) or st.st_size > budget:  # links, FIFOs: never opened
                digest.update(f"{st.st_mode}:{st.st_size}:{st.st_mtime_ns}\0".encode())
                continue
            budget -= st.st_size
            try:
                with open(path, "rb") as f:
                    digest.update(hashlib.sha256(f.read()).digest())
            except OSError:
                digest.update(b"unreadable\0")
    return digest.hexdigest()
