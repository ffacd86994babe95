"""Contender (d): the same tools as a stdio server built with the official MCP Python SDK."""

import os
import sys

from mcp.server import MCPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workload import blob, echo  # noqa: E402

server = MCPServer("bench", log_level="WARNING")


@server.tool(name="bench_echo")
def bench_echo(text: str = "", n: int = 0) -> str:
    return echo({"text": text, "n": n})


@server.tool(name="bench_blob")
def bench_blob(size: int) -> str:
    return blob(size)


server.run("stdio")
