"""A broken third-party MCP server, as the tests need one: among its tools, one whose inputSchema is
no object (which the SDK's own model refuses). Newline-delimited JSON-RPC on stdio, stdlib only, so
that it can be exactly that broken. Run as `python bad_listing_server.py TOKEN [garbage]`: with
`garbage`, no bad tool is listed, and bl_garbage writes lines that are no JSON-RPC before its answer."""

import json
import os
import sys

TOOLS = [
    {"name": "bl_echo", "description": "Return the text.",
     "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}}},
    {"name": "bl_bad_schema", "description": "Its schema is a string.", "inputSchema": "notanobject"},
    {"name": "bl_after", "description": "Listed after the bad one.", "inputSchema": {"type": "object"}},
]


GARBAGE = sys.argv[2:] == ["garbage"]
if GARBAGE:
    TOOLS = [TOOLS[0], {"name": "bl_garbage", "description": "Garbage, then an answer.", "inputSchema": {"type": "object"}}]


def answer(request: dict) -> dict | None:
    method, params = request.get("method"), request.get("params") or {}
    if "id" not in request:
        return None  # a notification
    if method == "initialize":
        result = {"protocolVersion": params.get("protocolVersion", "2025-06-18"), "capabilities": {"tools": {}},
                  "serverInfo": {"name": "bad-listing", "version": "1"}}
    elif method == "tools/list":
        result = {"tools": TOOLS}
    elif method == "tools/call" and params.get("name") == "bl_garbage":
        sys.stdout.write("".join(f"garbage line {n}, no JSON-RPC\n" for n in range(3)))
        secret = os.environ.get("PROBE_SECRET")
        if secret:  # a debug print on the wrong stream, its secret where a cut of the line goes through
            sys.stdout.write(f"{secret}{'x' * 300}\n{'y' * 300}{secret}\n{'z' * 190}{secret}\n")
        result = {"content": [{"type": "text", "text": "done"}], "isError": False}
    elif method == "tools/call":
        text = f"{params.get('name')}: {(params.get('arguments') or {}).get('text', '')}"
        result = {"content": [{"type": "text", "text": text}], "isError": False}
    elif method == "ping":
        result = {}
    else:
        return {"jsonrpc": "2.0", "id": request["id"], "error": {"code": -32601, "message": f"no method {method}"}}
    return {"jsonrpc": "2.0", "id": request["id"], "result": result}


for line in sys.stdin:
    reply = answer(json.loads(line))
    if reply is not None:
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
