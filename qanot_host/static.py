"""What can be learnt of a plugin's code without running it: it is compiled and its syntax tree read,
never executed (the host imports no plugin code, ever).

- a syntax error, with file and line;
- whether it defines (or imports) a Plugin subclass at all;
- the tool names it declares as literals (`@tool(name="...")`, `ToolDef("...", ...)`), which lets
  `check` spot a tool_timeouts entry naming no tool, and a call to a disabled plugin's tool say so.
"""

from __future__ import annotations

import ast
import errno
import os

from .manifest import MAX_SOURCE
from .safe_files import read_regular_file

__all__ = ["code_problem", "declared_tools", "MAX_SCANNED_FILES", "MAX_SCANNED_BYTES"]

# What declared_tools reads at most: a plugin's code is the plugin's, and its syntax tree takes the
# host's memory (about 100 times the source), so a plugin that ships megabytes of it gets no scan.
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
