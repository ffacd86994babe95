"""The public surface is what each package means to export, and nothing breaks the split."""

from __future__ import annotations

import ast
from pathlib import Path

import qanot_host
import qanot_worker

ROOT = Path(__file__).resolve().parent.parent


def test_exports_resolve():
    for module in (qanot_host, qanot_worker):
        for name in module.__all__:
            assert getattr(module, name) is not None


def test_host_api_names():
    assert {"Host", "ToolRegistry", "QanotHostError", "WorkerCrashed", "WorkerTimeout",
            "ToolFailed", "ConfigError"} <= set(qanot_host.__all__)


def imported_modules(package: str, leave_out: tuple[str, ...] = ()) -> set[str]:
    names = set()
    for path in (ROOT / package).rglob("*.py"):
        if path.name in leave_out:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    return names


def test_worker_never_imports_the_supervisor():
    assert not any(name.split(".")[0] == "qanot_host" for name in imported_modules("qanot_worker"))


def test_host_never_imports_plugin_code():
    """The Qanot drop-in (qanot_loader.py) imports Qanot's own code, in Qanot's process; nothing of
    the host imports the drop-in or Qanot."""
    assert not any(name.split(".")[0] in ("qanot", "plugins")
                   for name in imported_modules("qanot_host", leave_out=("qanot_loader.py",)))
    assert not any(name.endswith("qanot_loader") for name in imported_modules("qanot_host"))


def test_the_host_imports_nothing_of_the_worker_but_the_protocol():
    """One seam: the wire protocol is the only module both sides import (a remote launcher, or MCP
    servers as workers, need nothing else of the worker's in the host)."""
    import subprocess
    import sys
    code = ("import sys, qanot_host, qanot_host.cli, qanot_host.qanot_loader, qanot_host.check, qanot_host.chaos; "
            "print(sorted(m for m in sys.modules if m.startswith('qanot_worker')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['qanot_worker', 'qanot_worker.protocol']", done.stdout
