"""The worker's import root: the only packages of the host's that a worker can import.

A worker runs with `python -I -S`, so the host's site-packages is not on its path. This directory
holds symlinks to exactly what the worker needs (qanot_worker, msgspec, uvloop) and to the `qanot`
shim that gives plugins `qanot.plugins.base`. Nothing else of the host's leaks through.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

__all__ = ["worker_import_root", "RUNTIME_PACKAGES"]

RUNTIME_PACKAGES = ("msgspec", "uvloop")


def _package_dirs() -> dict[str, str]:
    worker_spec = importlib.util.find_spec("qanot_worker")  # found, not imported
    if worker_spec is None or worker_spec.origin is None:
        raise ImportError("the qanot_worker package is not installed beside qanot_host")
    worker_pkg = Path(worker_spec.origin).parent
    dirs = {"qanot_worker": str(worker_pkg), "qanot": str(worker_pkg / "_shim" / "qanot")}
    for name in RUNTIME_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations and spec.origin:
            dirs[name] = str(Path(spec.origin).parent)
    return dirs


def worker_import_root(state_dir: str) -> str:
    """Create (once per set of package locations) and return the import root directory."""
    dirs = _package_dirs()
    key = hashlib.sha256(repr(sorted(dirs.items())).encode()).hexdigest()[:12]
    root = os.path.join(state_dir, "runtime", key)
    if os.path.isdir(root):
        return root
    scratch = f"{root}.{os.getpid()}"
    os.makedirs(scratch, exist_ok=True)
    for name, target in dirs.items():
        link = os.path.join(scratch, name)
        if not os.path.lexists(link):
            os.symlink(target, link)
    try:
        os.rename(scratch, root)
    except OSError:  # another host made it first; theirs is identical
        for name in dirs:
            os.unlink(os.path.join(scratch, name))
        os.rmdir(scratch)
    return root
