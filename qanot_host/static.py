"""What can be learnt of a plugin's code without running it: it is compiled and its syntax tree read,
never executed (the host imports no plugin code, ever).

- a syntax error, with file and line;
- whether it defines (or imports) a Plugin subclass at all;
- the tool names it declares as literals (`@tool(name="...")`, `ToolDef("...", ...)`), which lets
  `check` spot a tool_timeouts entry naming no tool, and a call to a disabled plugin's tool say so.
"""

from __future__ import annotations

import ast
import asyncio
import errno
import json
import os
import subprocess
import sys
from typing import Any, Iterator

from .manifest import MAX_SOURCE
from .safe_files import read_regular_file

__all__ = ["code_problem", "declared_tools", "scan_plugins", "scan_plugins_async", "MAX_SCANNED_FILES",
           "MAX_SCANNED_BYTES"]

# What declared_tools reads at most: a plugin's code is the plugin's, and a plugin that ships
# megabytes of it gets no scan.
MAX_SCANNED_FILES = 32
MAX_SCANNED_BYTES = 2 * 1024 * 1024


def _tree(entry_file: str) -> ast.Module:
    return ast.parse(read_regular_file(entry_file, MAX_SOURCE), filename=entry_file)


def code_problem(entry_file: str) -> str | None:
    """Why the plugin surely cannot load (a syntax error, no Plugin subclass), or None."""
    try:
        tree = _tree(entry_file)
        compile(tree, entry_file, "exec")
    except SyntaxError as exc:
        return f"syntax error in {exc.filename or entry_file} line {exc.lineno}: {exc.msg}"
    except (OSError, ValueError) as exc:
        return f"{entry_file} cannot be read: {exc}"
    except (RecursionError, MemoryError):
        return f"{entry_file} is nested too deeply (or is too large) to be read without running it"
    if _has_plugin_class(tree):
        return None
    return f"{entry_file} defines no Plugin subclass (expected class QanotPlugin(Plugin))"


def _has_plugin_class(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and (node.name == "QanotPlugin" or any(
                _name(base).endswith("Plugin") for base in node.bases)):
            return True
        if isinstance(node, ast.ImportFrom) and any(alias.name.endswith("Plugin") and alias.name != "Plugin"
                                                    for alias in node.names):
            return True  # a package's __init__.py that imports its plugin class from a module of its own
    return False


def declared_tools(plugin_dir: str, entry_file: str) -> set[str] | None:
    """Tool names written as literals in the plugin's modules; None where some tool name is not a
    literal (computed), or the code is more than MAX_SCANNED_FILES files or MAX_SCANNED_BYTES, so
    that the set cannot be taken as complete. Slow on large code: call it off the event loop."""
    names: set[str] = set()
    complete = True
    try:
        siblings = sorted(f for f in os.listdir(plugin_dir) if f.endswith(".py"))
    except OSError:
        return None
    files = [entry_file] + [os.path.join(plugin_dir, f) for f in siblings if os.path.join(plugin_dir, f) != entry_file]
    if len(files) > MAX_SCANNED_FILES:
        return None
    budget = MAX_SCANNED_BYTES
    for path in files:
        try:
            source = read_regular_file(path, budget)
            budget -= len(source)
            if budget <= 0:
                return None
            tree = ast.parse(source, filename=path)
        except OSError as exc:
            if exc.errno in (errno.EFBIG, errno.EINVAL):  # over what is left of the budget, or not a regular file
                return None
            continue
        except (SyntaxError, ValueError):
            continue
        except (RecursionError, MemoryError):
            return None
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            callee = _name(node.func)
            if callee not in ("tool", "ToolDef"):
                continue
            value = next((k.value for k in node.keywords if k.arg == "name"), None)
            if value is None and node.args:
                value = node.args[0]
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                names.add(value.value)
            elif value is not None:
                complete = False
    return names if complete else None


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


# The scan runs in a child process: a syntax tree takes several hundred times its source in memory
# (an attacker's 2 MB of `x=a,a,a,...` took the host to 1.2 GB, and 10 s), which must not be the
# host's. The child has SCAN_MEMORY of address space and `timeout` seconds; what it cannot finish
# is simply not known. It reads the smallest plugins first and says each one's answer on a line of its
# own as soon as it has it: a plugin whose code takes the child's whole time (or memory) costs only
# its own answer, never the others' (a loaded machine once lost every plugin's behind one such).
SCAN_MEMORY = 1024 * 1024 * 1024
_SCANNER = """
import ctypes, json, resource, sys
ctypes.CDLL(None).prctl(15, b"qanot:scan", 0, 0, 0)  # PR_SET_NAME: what ps and the host's tests see
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), int(sys.argv[2])))
sys.path.insert(0, sys.argv[1])
# static.py and the three small modules it needs, not the whole package (its __init__ imports the
# host: 190 ms of CPU at every host start and reload, for nothing)
import types
package = types.ModuleType("qanot_host")
package.__path__ = [sys.argv[1] + "/qanot_host"]
sys.modules["qanot_host"] = package
from qanot_host.static import scan_here
for answer in scan_here(json.loads(sys.stdin.read())):
    print(json.dumps(answer), flush=True)
"""


def scan_plugins(jobs: dict[str, tuple[str, str]], timeout: float) -> dict[str, dict[str, Any]]:
    """For each plugin name, (its directory, its entry file): {"problem": code_problem(...), "tools":
    sorted declared_tools(...) or None}, computed in a child process. A plugin missing from the
    answer could not be scanned within the child's memory or time."""
    if not jobs:
        return {}
    try:
        done = subprocess.run(_scanner_argv(), input=json.dumps(jobs).encode(), capture_output=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return _answers(exc.stdout or b"")  # what the child had said by then
    except OSError:
        return {}
    return _answers(done.stdout)


async def scan_plugins_async(jobs: dict[str, tuple[str, str]], timeout: float) -> dict[str, dict[str, Any]]:
    """scan_plugins for the host's event loop: cancelled (the host stopping), the child goes too."""
    if not jobs:
        return {}
    try:
        proc = await asyncio.create_subprocess_exec(
            *_scanner_argv(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
    except OSError:
        return {}
    out = bytearray()

    async def read_all() -> None:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(jobs).encode())
        proc.stdin.close()
        while chunk := await proc.stdout.read(1 << 16):
            out.extend(chunk)
        await proc.wait()

    try:
        await asyncio.wait_for(read_all(), timeout)
    except BaseException as exc:  # out of time, or cancelled (the host stopping)
        if proc.returncode is None:
            proc.kill()
        await asyncio.shield(proc.wait())
        if not isinstance(exc, (asyncio.TimeoutError, OSError)):
            raise
    return _answers(bytes(out))  # what the child had said by then


def _scanner_argv() -> list[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [sys.executable, "-I", "-c", _SCANNER, root, str(SCAN_MEMORY)]


def _answers(stdout: bytes) -> dict[str, dict[str, Any]]:
    """The child's whole lines, one plugin's [name, answer] each; a cut last line is no answer."""
    answers: dict[str, dict[str, Any]] = {}
    for line in stdout.decode(errors="replace").splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            name, answer = json.loads(line)
        except ValueError:
            continue
        if isinstance(name, str) and isinstance(answer, dict):
            answers[name] = answer
    return answers


def scan_here(jobs: dict[str, list[str]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """scan_plugins' work, in the child, smallest code first: one plugin's MemoryError or
    RecursionError is its own, and so is most of the time it takes."""
    for name, (plugin_dir, entry_file) in sorted(jobs.items(), key=lambda job: _code_size(*job[1])):
        try:
            tools = declared_tools(plugin_dir, entry_file)
            yield name, {"problem": code_problem(entry_file), "tools": sorted(tools) if tools is not None else None}
        except (MemoryError, RecursionError):
            continue


def _code_size(plugin_dir: str, entry_file: str) -> int:
    """The bytes of Python the scan would read (what its time goes with)."""
    size = 0
    try:
        with os.scandir(plugin_dir) as entries:
            for entry in entries:
                if entry.name.endswith(".py") and entry.is_file(follow_symlinks=False):
                    size += entry.stat(follow_symlinks=False).st_size
    except OSError:
        pass
    if os.path.dirname(entry_file) != plugin_dir.rstrip("/"):
        try:
            size += os.stat(entry_file).st_size
        except OSError:
            pass
    return size
