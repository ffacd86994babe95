"""The public surface is what each package means to export, and nothing breaks the split."""

from __future__ import annotations

import os

import pytest
import ast
from pathlib import Path

import qanot_host
import qanot_worker

ROOT = Path(__file__).resolve().parent.parent


def test_exports_resolve():
    for module in (qanot_host, qanot_worker):
        for name in module.__all__:
            assert getattr(module, name) is not None


def test_the_public_surface_is_exactly_this():
    """Adding a name to the surface is a decision: this test is where it is made."""
    assert set(qanot_host.__all__) == {
        "Host", "PluginState", "PluginSupervisor", "ToolRegistry", "Config", "load_config", "__version__",
        "QanotHostError", "ConfigError", "ToolNotFound", "InvalidParams", "PluginError", "PluginUnavailable",
        "PluginStartError", "DependencyError", "ProtocolMismatch", "WorkerCrashed", "WorkerKilled", "WorkerTimeout",
        "CallTimedOut", "ProtocolViolation", "ToolFailed"}
    assert set(qanot_worker.__all__) == {"PROTOCOL_VERSION"}


def test_host_plugins_holds_an_exported_type():
    """What Host.plugins gives a caller is public (PluginSupervisor, its state a PluginState)."""
    source = Path(qanot_host.host.__file__).read_text()
    assert "self.plugins: dict[str, PluginSupervisor] = {}" in source
    assert qanot_host.PluginSupervisor is qanot_host.supervisor.PluginSupervisor
    assert qanot_host.PluginState is qanot_host.supervisor.PluginState


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
    """One seam: the wire protocol (a package) is the only thing both sides import (a remote launcher, or MCP
    servers as workers, need nothing else of the worker's in the host)."""
    import subprocess
    import sys
    code = ("import sys, qanot_host, qanot_host.cli, qanot_host.qanot_loader, qanot_host.check, qanot_host.chaos; "
            "print(sorted(m for m in sys.modules if m.startswith('qanot_worker')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = eval(done.stdout)  # noqa: S307 - our own child's repr of a list of names
    assert "qanot_worker.protocol" in loaded
    assert [m for m in loaded if m != "qanot_worker" and not m.startswith("qanot_worker.protocol")] == [], loaded


EAGER_CHECK = r"""
import asyncio, contextvars, importlib.util, sys
# the module alone (the package needs msgspec, which another Python may not have)
spec = importlib.util.spec_from_file_location("eager", sys.argv[1] + "/qanot_worker/eager.py")
eager = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eager)
EagerStarter, NATIVE = eager.EagerStarter, eager.NATIVE
var = contextvars.ContextVar("var", default="unset")
log = []

async def quick():
    log.append(("quick", var.get()))
    var.set("quick-set")

async def waits():
    first = asyncio.current_task()
    var.set("waits-set")
    async with asyncio.timeout(0.05):
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            log.append(("timed out", asyncio.current_task() is first, var.get()))
            raise

async def cancelled_in_its_await(name):
    try:
        await asyncio.sleep(1)
    except asyncio.CancelledError:
        log.append(("cancelled in its await", name))
        raise

async def from_a_callback(coro):
    # as the worker does it: from the transport's callback, where no task is running
    loop = asyncio.get_running_loop()
    started = loop.create_future()
    loop.call_soon(lambda: started.set_result(starter.start(coro)))
    return await started

async def main():
    global starter
    starter = EagerStarter(asyncio.get_running_loop())
    assert await from_a_callback(quick()) is None and log == [("quick", "unset")], log  # ran at once
    task = await from_a_callback(waits())
    assert isinstance(task, asyncio.Task), task
    try:
        await task
    except TimeoutError:
        pass
    assert log[-1] == ("timed out", True, "waits-set"), log
    assert await from_a_callback(quick()) is None and log[-1] == ("quick", "unset"), log  # its own context
    # Two calls that wait, read together, the second cancelled at once (its Cancel in the same
    # read): the second's task has not run a step yet when it is cancelled. Its handler must still
    # see the cancel at its await, not be dropped half run (attack pass 65).
    loop = asyncio.get_running_loop()
    held = loop.create_future()
    def read_together():
        first = starter.start(cancelled_in_its_await("first"))
        second = starter.start(cancelled_in_its_await("second"))
        second.cancel()
        held.set_result((first, second))
    loop.call_soon(read_together)
    first, second = await held
    await asyncio.gather(second, return_exceptions=True)
    assert log[-1] == ("cancelled in its await", "second"), log
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    print("native" if NATIVE else "lent task")

asyncio.run(main())
"""


@pytest.mark.parametrize("python", ["python3.11", "python3.12", "python3.13"])
def test_eager_first_steps_keep_task_semantics_on_every_python(python):
    """eager.py lends a task through asyncio's private _enter_task on 3.11 and uses Task(eager_start=True)
    from 3.12: both must give a handler its one task, its timeouts and its own context."""
    import shutil
    import subprocess
    from pathlib import Path
    import glob
    found = [shutil.which(python), *sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/*/bin/{python}")))]
    usable = [path for path in found if path and subprocess.run([path, "-c", "pass"], capture_output=True).returncode == 0]
    if not usable:
        pytest.skip(f"{python} is not installed here")
    interpreter = usable[0]
    root = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run([interpreter, "-I", "-c", EAGER_CHECK, root], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("lent task" if python == "python3.11" else "native")


def test_the_readme_stands_alone():
    """Every repository path the README names exists in a clone, and it links nothing outside it."""
    import re
    text = (ROOT / "README.md").read_text()
    named = {path.split(":")[0] for path in re.findall(r"`((?:qanot_host|qanot_worker|examples|benchmarks|tests|"
                                                       r"plugins|\.ci)/[^` ]*)`", text)}
    missing = [path for path in named if not re.search(r"[A-Z]{3,}", path) and not (ROOT / path).exists()]
    assert named and not missing, missing
    assert not re.search(r"\]\((?!https?://)[^)]*\.\./", text) and "../shared" not in text
    assert (ROOT / "LICENSE").exists() and (ROOT / "CHANGELOG.md").exists()
