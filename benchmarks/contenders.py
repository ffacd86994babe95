"""The contenders: the same echo, run the ways a user might pick instead of qanot-host, and
qanot-host itself. Each has start(workers), call(i), blob(), pids() and stop()."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import re
import sys
from pathlib import Path

import msgspec
import psutil

from typing import TYPE_CHECKING

from workload import blob, echo
from qanot_host import Host

if TYPE_CHECKING:
    from mcp.client.stdio import StdioServerParameters

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PARAMS = {"text": "hello", "n": 1}
BLOB = 10 * 1024 * 1024


class InProcess:
    label = "a in-process"

    async def start(self, workers: int = 1) -> None:
        sys.path.insert(0, str(REPO / "qanot_worker" / "_shim"))
        import importlib.util
        spec = importlib.util.spec_from_file_location("bench_plugin", HERE / "plugins" / "bench" / "plugin.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.plugin = module.QanotPlugin()

    async def call(self, i: int = 0) -> str:
        return await self.plugin.echo(PARAMS)

    async def blob(self) -> str:
        return await self.plugin.blob({"size": BLOB})

    async def stop(self) -> None:
        pass

    def pids(self) -> list[int]:
        return []


class BarePipe:
    label = "b bare pipe"

    async def start(self, workers: int = 1) -> None:
        self.channels = [await _BareChannel.open() for _ in range(workers)]

    async def call(self, i: int = 0) -> str:
        return await self.channels[i % len(self.channels)].request("echo", PARAMS)

    async def blob(self) -> str:
        return await self.channels[0].request("blob", BLOB)

    async def stop(self) -> None:
        for channel in self.channels:
            await channel.close()

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.channels]


class _BareChannel(asyncio.Protocol):
    @classmethod
    async def open(cls) -> "_BareChannel":
        self = cls()
        self.buf, self.pending, self.ids = bytearray(), {}, 0
        self.enc, self.dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
        loop = asyncio.get_running_loop()
        child_reads, parent_writes = os.pipe()
        parent_reads, child_writes = os.pipe()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "bare_echo.py"), str(child_reads), str(child_writes),
            pass_fds=(child_reads, child_writes))
        os.close(child_reads)
        os.close(child_writes)
        self.out, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(parent_writes, "wb", buffering=0))
        self.transport, _ = await loop.connect_read_pipe(lambda: self, os.fdopen(parent_reads, "rb", buffering=0))
        await self.request("echo", {})
        return self

    def request(self, kind: str, arg) -> asyncio.Future:
        self.ids += 1
        future = asyncio.get_running_loop().create_future()
        self.pending[self.ids] = future
        payload = self.enc.encode([self.ids, kind, arg])
        self.out.write(len(payload).to_bytes(4, "big") + payload)
        return future

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 4:
            size = int.from_bytes(self.buf[:4], "big")
            if len(self.buf) < 4 + size:
                break
            rid, result = self.dec.decode(self.buf[4:4 + size])
            del self.buf[:4 + size]
            self.pending.pop(rid).set_result(result)

    async def close(self) -> None:
        self.out.close()
        self.transport.close()
        await self.proc.wait()


class MultiprocessingPool:
    label = "c mp.Pool"

    async def start(self, workers: int = 1) -> None:
        self.pool = multiprocessing.get_context("spawn").Pool(workers)
        await self.call()

    def _submit(self, fn, arg) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pool.apply_async(fn, (arg,), callback=lambda r: loop.call_soon_threadsafe(future.set_result, r))
        return future

    async def call(self, i: int = 0) -> str:
        return await self._submit(echo, PARAMS)

    async def blob(self) -> str:
        return await self._submit(blob, BLOB)

    async def stop(self) -> None:
        self.pool.terminate()
        self.pool.join()

    def pids(self) -> list[int]:
        return [p.pid for p in self.pool._pool]


class ProcessPool:
    label = "c ProcessPoolExecutor"

    async def start(self, workers: int = 1) -> None:
        self.executor = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"))
        await self.call()

    async def call(self, i: int = 0) -> str:
        return await asyncio.get_running_loop().run_in_executor(self.executor, echo, PARAMS)

    async def blob(self) -> str:
        return await asyncio.get_running_loop().run_in_executor(self.executor, blob, BLOB)

    async def stop(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def pids(self) -> list[int]:
        return list(self.executor._processes)


class Mcp:
    label = "d MCP stdio"

    async def start(self, workers: int = 1) -> None:
        from contextlib import AsyncExitStack

        from mcp.client.session import ClientSession
        from mcp.client.stdio import stdio_client
        self.stack = AsyncExitStack()
        await self.stack.__aenter__()
        self.sessions = []
        for _ in range(workers):
            params = self.server()
            errlog = self.stack.enter_context(open(os.devnull, "w"))  # noqa: ASYNC230 - /dev/null never blocks
            read, write = await self.stack.enter_async_context(stdio_client(params, errlog=errlog))
            session = await self.stack.enter_async_context(ClientSession(read, write))
            await session.initialize()
            await session.list_tools()
            self.sessions.append(session)

    def server(self) -> StdioServerParameters:
        from mcp.client.stdio import StdioServerParameters
        return StdioServerParameters(command=sys.executable, args=[str(HERE / "mcp_echo_server.py")])

    async def call(self, i: int = 0) -> str:
        result = await self.sessions[i % len(self.sessions)].call_tool("bench_echo", PARAMS)
        return result.content[0].text

    async def blob(self) -> str:
        result = await self.sessions[0].call_tool("bench_blob", {"size": BLOB})
        return result.content[0].text

    async def stop(self) -> None:
        await self.stack.aclose()

    def pids(self) -> list[int]:
        return [c.pid for c in psutil.Process().children() if "mcp_echo_server" in " ".join(c.cmdline())]


class McpHost(Mcp):
    """(f) qanot-host's own MCP front (`qanot-host mcp`, stdio) before the bench plugin's sandboxed
    worker: what supervision and the sandbox add to an MCP call, beside d."""

    label = "f qanot-host mcp"

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch / "mcp"

    def server(self) -> StdioServerParameters:
        """A host of its own per session: two hosts never share a state_dir."""
        import tempfile

        from mcp.client.stdio import StdioServerParameters
        self.scratch.mkdir(parents=True, exist_ok=True)
        config = write_config(Path(tempfile.mkdtemp(dir=self.scratch)), ["bench"])
        return StdioServerParameters(command=sys.executable, args=["-m", "qanot_host", "mcp", "--config", config,
                                                                   "--log-level", "ERROR"], cwd=str(HERE.parent))

    def pids(self) -> list[int]:
        return [c.pid for c in psutil.Process().children() if "qanot_host mcp" in " ".join(c.cmdline())]


class QanotHost:
    label = "e qanot-host"

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch

    async def start(self, workers: int = 1) -> None:
        names = ["bench"] + [f"bench{i}" for i in range(1, workers)]
        self.host = Host(write_config(self.scratch, names))
        await self.host.start()
        self.tools = [f"{n}_echo" if n != "bench" else "bench_echo" for n in names]

    async def call(self, i: int = 0) -> str:
        return await self.host.registry.execute(self.tools[i % len(self.tools)], PARAMS)

    async def blob(self) -> str:
        # invoke(): the result whole (execute() cuts it to 8000 characters, as Qanot's agent does)
        return await self.host.registry.invoke("bench_blob", {"size": BLOB})

    async def stop(self) -> None:
        await self.host.stop()

    def pids(self) -> list[int]:
        return [s.worker.pid for s in self.host.plugins.values()]

    def init_pids(self) -> list[int]:
        return [pid for pid in plugin_pids(self.host) if pid not in self.pids()]


class McpServerHost(QanotHost):
    """(g) d's own server, run by qanot-host as an `mcp_servers` entry (a sandboxed, supervised child
    of the bridge worker) and called through ToolRegistry.execute(): what the host adds to calling
    that server directly with the SDK's client (d)."""

    label = "g MCP server via qanot-host"

    async def start(self, workers: int = 1) -> None:
        python = server_python(self.scratch)
        names = [f"mcpbench{i}" for i in range(workers)]
        place = self.scratch / "mcp-servers"
        place.mkdir(parents=True, exist_ok=True)
        for directory in (self.scratch, place):
            os.chmod(directory, 0o755)
        for name in ("mcp_echo_server.py", "workload.py"):  # where the servers' uids may read them
            (place / name).write_text((HERE / name).read_text())
            os.chmod(place / name, 0o644)
        config = self.scratch / f"mcp-config-{workers}.json"
        config.write_text(json.dumps({
            "plugins": [], "plugins_dir": str(self.scratch / "plugins"),
            "workspace_dir": str(self.scratch / "workspace"),
            "mcp_servers": [{"name": n, "command": python, "args": [str(place / "mcp_echo_server.py")]} for n in names],
            "host": {"state_dir": str(self.scratch / "mcp-state"),
                     "plugins": {n: {"permissions": {"filesystem": {"read": [str(place)]}}} for n in names}}}))
        self.host = Host(str(config))
        await self.host.start()
        # the first server keeps the tool's name; the others' are mcp_{server}_{tool}, as in Qanot
        self.tools = ["bench_echo"] + [f"mcp_{n}_bench_echo" for n in names[1:]]

    def pids(self) -> list[int]:
        return [s.worker.pid for s in self.host.plugins.values()] + [
            c.pid for s in self.host.plugins.values() for c in psutil.Process(s.worker.pid).children(recursive=True)]

    def init_pids(self) -> list[int]:
        return []


def server_python(scratch: Path) -> str:
    """A virtual environment with the host's MCP SDK (the server's interpreter: the host's own
    packages are not in a worker's root), built once per run by uv from its cache. d's server runs
    on this process's interpreter and packages, so g's does too: the same Python (uv would pick its
    own), and every package at the version installed here (a newer pydantic, say, would make g's
    server another server)."""
    import shutil
    import subprocess
    from importlib.metadata import distributions, version
    venv = scratch / "mcp-venv"
    if not (venv / "bin" / "python").exists():
        uv = shutil.which("uv") or "uv"
        subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
        pins = scratch / "mcp-venv-pins.txt"
        installed: dict[str, str] = {}  # the first of a name is the one imported
        for dist in distributions():
            name = dist.metadata["Name"]
            if name and "+" not in dist.version:
                installed.setdefault(re.sub(r"[-_.]+", "-", name).lower(), dist.version)  # PEP 503's name
        pins.write_text("".join(f"{name}=={v}\n" for name, v in installed.items()))
        subprocess.run([uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"),
                        "--constraint", str(pins), f"mcp=={version('mcp')}"], check=True)
        subprocess.run(["chmod", "-R", "a+rX", str(venv)], check=True)
    return str(venv / "bin" / "python")


def write_config(scratch: Path, names: list[str]) -> str:
    """Plugins named in `names`: 'bench' itself, the others copies with their own tool names."""
    plugins_dir = scratch / "plugins"
    for name in names:
        target = plugins_dir / name
        if name != "bench" and not target.exists():
            target.mkdir(parents=True)
            text = (HERE / "plugins" / "bench" / "plugin.py").read_text()
            (target / "plugin.py").write_text(text.replace('"bench_', f'"{name}_').replace(
                'name = "bench"', f'name = "{name}"'))
    config = scratch / f"config-{len(names)}.json"
    config.write_text(json.dumps({
        "plugins": [{"name": n} for n in names], "plugins_dir": str(plugins_dir),
        "workspace_dir": str(scratch / "workspace"),
        "host": {"state_dir": str(scratch / "state"), "builtin_plugins_dir": str(HERE / "plugins")}}))
    return str(config)


class QanotHostOn:
    """A running host's bench plugin as a contender (for the figures that need a host of their own)."""

    def __init__(self, host: Host) -> None:
        self.host = host

    async def call(self, i: int = 0) -> str:
        return await self.host.registry.execute("bench_echo", PARAMS)


def plugin_pids(host: Host) -> list[int]:
    """Each plugin's processes: the worker and its namespace's init."""
    pids = []
    for supervisor in host.plugins.values():
        worker = supervisor.worker
        if worker is not None and worker.pid:
            pids.append(worker.pid)
            if worker._process is not None and worker._process.pid != worker.pid:
                pids.append(worker._process.pid)
    return pids
