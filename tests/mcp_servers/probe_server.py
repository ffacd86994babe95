"""An MCP server for the tests, on the official SDK: what a third-party server may do, well or badly.

Run as `python probe_server.py TOKEN [--http PORT]` (TOKEN marks its command line, so a test can
find it among all processes). Marks (a cancelled call) go to $PROBE_MARKS, a directory the test grants.
"""

import asyncio
import glob
import os
import shutil
import socket
import subprocess
import sys
import time

from mcp.server.mcpserver import Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("probe")
STDOUT = os.readlink("/proc/self/fd/1")  # the SDK moves it to another descriptor
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000")  # a PNG's first bytes


@server.tool()
def echo(text: str) -> str:
    """Return the text."""
    return text


@server.tool()
def env_value(name: str) -> str:
    """The server's environment variable NAME ('' if unset)."""
    return os.environ.get(name, "")


@server.tool()
def whoami() -> str:
    """uid, and the process's cwd."""
    return f"uid={os.getuid()} cwd={os.getcwd()}"


@server.tool()
async def slow(seconds: float, tag: str = "") -> str:
    """Sleep; a cancelled sleep leaves a mark named TAG."""
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        if tag and os.environ.get("PROBE_MARKS"):
            with open(os.path.join(os.environ["PROBE_MARKS"], tag + ".cancelled"), "w") as f:
                f.write("cancelled")
        raise
    return "slept"


@server.tool()
async def freeze(seconds: float) -> str:
    """Block the server's whole event loop (a hung server: no pings answered either; a plain def
    would run in a thread of its own)."""
    time.sleep(seconds)
    return "thawed"


@server.tool()
def blob(mb: int) -> str:
    """A large answer (MB megabytes): it takes the client a while to read."""
    return "x" * (mb << 20)


@server.tool()
def crash() -> str:
    """Die mid-call."""
    os._exit(9)


@server.tool()
def hang_up() -> str:
    """Close stdout, and every copy of it the SDK holds (each becomes /dev/null), and live on: the
    client hears nothing more, ever."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == STDOUT:
                os.dup2(devnull, int(fd))
        except OSError:
            pass
    return "no one hears this"


@server.tool()
def fail(message: str) -> str:
    """A tool error (an isError result)."""
    raise ToolError(message)


@server.tool()
def run(program: str, via_loader: bool = False, copy_first: bool = False, into: str = "",
        memfd: bool = False) -> str:
    """Execute another program: directly, or through the ELF loader (which maps a program it only
    has to read), or a copy of it made first in a writable directory (INTO, else its own data
    directory), or its bytes written into a memfd and run from there."""
    if memfd:
        try:
            fd = os.memfd_create("program", 0)
            with open(program, "rb") as f:
                os.write(fd, f.read())
            command = [f"/proc/self/fd/{fd}", "--version"]
            if via_loader:
                command = [_loader(), *command]
            done = subprocess.run(command, pass_fds=(fd,), capture_output=True, text=True, timeout=10)
        except OSError as exc:
            return f"refused: {type(exc).__name__}: {exc}"
        return f"ran: exit {done.returncode}: {done.stdout.strip()[:200]}"
    if copy_first:
        target = os.path.join(into or os.getcwd(), "copied-program")
        shutil.copyfile(program, target)
        os.chmod(target, 0o755)
        program = target
    command = [program, "--version"]
    if via_loader:
        command = [_loader(), *command]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except OSError as exc:
        return f"refused: {type(exc).__name__}: {exc}"
    return f"ran: exit {done.returncode}: {done.stdout.strip()[:200]} {done.stderr.strip()[:200]}"


def _loader() -> str:
    return (glob.glob("/lib64/ld-linux-*.so*") + glob.glob("/usr/lib/*-linux-gnu/ld-linux-*.so*"))[0]


@server.tool()
def picture(caption: str, big: int = 0) -> list:
    """A caption, a small PNG and an embedded resource: a result with more than text in it; with
    `big`, also an image and a text of that many bytes."""
    from mcp import types
    blocks = [caption, Image(data=PNG, format="png"),
              types.EmbeddedResource(type="resource", resource=types.TextResourceContents(
                  uri="file:///probe/note.txt", mime_type="text/plain", text="a note"))]
    if big:
        blocks += [Image(data=PNG + b"\0" * big, format="png"), "t" * big]
    return blocks


@server.tool()
def say(text: str) -> str:
    """Print the text on stderr (the host's log)."""
    print(text, file=sys.stderr, flush=True)
    return "said"


@server.tool()
def read(path: str) -> str:
    """Read a file."""
    try:
        with open(path) as f:
            return "read: " + f.read()
    except OSError as exc:
        return f"refused: {type(exc).__name__}: {exc}"


@server.tool()
def connect(host: str, port: int) -> str:
    """Open a TCP connection."""
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        return f"refused: {type(exc).__name__}: {exc}"
    return "connected"


for extra in filter(None, os.environ.get("PROBE_EXTRA_TOOL", "").split(",")):  # tools of any name, more echoes
    server.tool(name=extra)(echo)


if __name__ == "__main__":
    if "--http" in sys.argv:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[sys.argv.index("--http") + 1]))
    else:
        server.run()
