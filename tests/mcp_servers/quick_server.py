"""An MCP stdio server on the standard library alone, answering every call at once, in the order
received, on its one thread: calls cancelled within milliseconds cross its answers on the wire."""

import json
import sys

TOOLS = [{"name": "quick", "description": "Answers at once.", "inputSchema": {"type": "object", "properties": {}}}]


def send(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


for line in sys.stdin:
    message = json.loads(line)
    method, ident = message.get("method"), message.get("id")
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": ident, "result": {
            "protocolVersion": message["params"]["protocolVersion"], "capabilities": {"tools": {}},
            "serverInfo": {"name": "quick", "version": "1"}}})
    elif method == "tools/list":
        send({"jsonrpc": "2.0", "id": ident, "result": {"tools": TOOLS}})
    elif method in ("ping", "tools/call"):
        result = {"content": [{"type": "text", "text": "done"}], "isError": False} if method == "tools/call" else {}
        send({"jsonrpc": "2.0", "id": ident, "result": result})
    elif method == "notifications/cancelled":
        print("cancelled", json.dumps(message.get("params")), file=sys.stderr, flush=True)
