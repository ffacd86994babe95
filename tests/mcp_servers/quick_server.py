"""An MCP stdio server on the standard library alone, answering every call in the order received,
on its one thread: at once (calls cancelled within milliseconds cross its answers on the wire), or,
run as `quick_server.py TOKEN MS`, MS milliseconds a call, reading its next request only then (a
server that handles one request at a time, requests waiting in its stdin). Its tool `hang` hangs
its one thread for good, while another writes answers to requests nobody sent, five a second."""

import json
import sys
import threading
import time

PAUSE = int(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0

TOOLS = [{"name": "quick", "description": "Answers at once.", "inputSchema": {"type": "object", "properties": {}}},
         {"name": "hang", "description": "Hangs the server.", "inputSchema": {"type": "object", "properties": {}}}]
LOCK = threading.Lock()


def chatter() -> None:
    for n in range(10**9):
        send({"jsonrpc": "2.0", "id": 10**6 + n, "result": {}})
        time.sleep(0.2)


def send(message: dict) -> None:
    with LOCK:
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
        if method == "tools/call" and message["params"]["name"] == "hang":
            threading.Thread(target=chatter, daemon=True).start()
            time.sleep(10**9)
        if method == "tools/call":
            time.sleep(PAUSE)
        result = {"content": [{"type": "text", "text": "done"}], "isError": False} if method == "tools/call" else {}
        send({"jsonrpc": "2.0", "id": ident, "result": result})
    elif method == "notifications/cancelled":
        print("cancelled", json.dumps(message.get("params")), file=sys.stderr, flush=True)
