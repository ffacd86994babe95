"""The `qanot-host` command: run, call, tools, check, status, reload, restart, logs, chaos, completion.

A user's mistake ends in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import msgspec

from .chaos import run_chaos
from .check import check_config
from .config import load_config
from .control import NoRunningHost, control_request, follow_logs, host_holds, socket_path
from .errors import ConfigError, QanotHostError, ToolNotFound
from .host import Host
from .supervisor import SERVING_STATES
from .json_objects import parse_json_object
from .completion import completion_script
from .log_setup import configure_logging
from .output import for_terminal, printable
from .registry import call_error
from .loop import run as run_event_loop
from .safe_files import read_regular_file
from .serve import serve

__all__ = ["main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `qanot-host ... | head`: the reader went; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor at the exit's flush
        return 128 + signal.SIGPIPE


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "completion":
        print(completion_script(_parser(), args.shell))
        return EXIT_OK
    level = args.log_level or ("INFO" if args.command in ("run", "mcp") else "CRITICAL")
    try:
        configure_logging(level, args.log_format, args.log_file)
    except OSError as exc:
        print(f"qanot-host: error: --log-file {args.log_file}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    command = COMMANDS[args.command]
    try:
        return run_event_loop(command(args) if args.command in ("run", "mcp") else _interruptible(command, args))
    except QanotHostError as exc:  # one line, whatever a plugin's text in it holds (newlines, escapes)
        print(f"qanot-host: error: {printable(str(exc), 1 << 16)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


async def _interruptible(command, args: argparse.Namespace) -> int:
    """SIGTERM or SIGINT cancel the command, so whatever it started is stopped properly (teardown,
    workers, cgroups), then it exits as a signalled command does (128 + the signal's number)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def stop(sig: int) -> None:
        received.append(sig)
        task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await command(args)
    except asyncio.CancelledError:
        if received:
            return 128 + received[0]
        raise
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


class _Version(argparse.Action):
    """--version, read from the package's metadata only when asked."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        from . import __version__
        print(f"qanot-host {__version__}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qanot-host", description="Run Qanot plugins, each in its "
                                     "own sandboxed worker process.")
    parser.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--config", default="config.json", help="path to config.json")
        cmd.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                         type=str.upper, help="log to stderr at this level")
        cmd.add_argument("--log-format", choices=["text", "json"], default="text",
                         help="text (default), or one JSON object a line: time, level, logger, plugin, pid, event")
        cmd.add_argument("--log-file", help="log to this file as well, rotated at 10 MB (5 kept)")
        return cmd

    command("run", "start every enabled plugin and serve until SIGTERM or SIGINT")
    mcp = command("mcp", "serve every plugin's tools to MCP clients (stdio by default), until the client "
                         "leaves or SIGTERM")
    mcp.add_argument("--http", metavar="HOST:PORT", help="streamable HTTP at http://HOST:PORT/mcp instead of stdio")
    mcp.add_argument("--token-env", metavar="VAR", help="with --http: require `Authorization: Bearer` this "
                                                       "variable's value")
    mcp.add_argument("--token-file", metavar="PATH", help="with --http: require `Authorization: Bearer` this "
                                                         "file's content")
    mcp.add_argument("--allow-host", metavar="NAME", action="append", default=[],
                     help="with --http: a host name clients reach it by, beside its addresses and the machine's "
                          "own name (a Host header naming anything else is refused: DNS rebinding); repeatable")
    call = command("call", "call one tool through the running host of that config, or a host of its own; "
                           "print its result")
    call.add_argument("tool")
    call.add_argument("params", nargs="?", default="{}",
                      help="a JSON object (default {}); @FILE reads it from FILE, - from stdin")
    call.add_argument("--standalone", action="store_true",
                      help="start a host of its own even when one runs for this config")
    tools = command("tools", "list every tool: name, plugin, description (of the running host of that config, "
                             "if one runs)")
    tools.add_argument("--json", action="store_true", help="print the definitions as JSON")
    tools.add_argument("--standalone", action="store_true",
                       help="start a host of its own even when one runs for this config")
    check = command("check", "validate config.json and every plugin.json without running plugin code")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    status = command("status", "show each plugin of a running host: state, pid, restarts, RSS, CPU, calls")
    status.add_argument("--json", action="store_true", help="print every plugin's status as JSON")
    command("reload", "make a running host read config.json again (as SIGHUP does)")
    restart = command("restart", "restart one plugin of a running host (its calls in flight finish first)")
    restart.add_argument("plugin")
    logs = command("logs", "a plugin's recent output, from the running host")
    logs.add_argument("plugin")
    logs.add_argument("-f", "--follow", action="store_true", help="then each new line, until interrupted")
    logs.add_argument("-n", "--lines", type=int, default=100, help="how many recent lines (default 100)")
    completion = sub.add_parser("completion", help="print a shell completion script: "
                                "eval \"$(qanot-host completion bash)\"")
    completion.add_argument("shell", choices=["bash", "zsh"])
    chaos = command("chaos", "drive concurrent calls while SIGKILLing random workers; report")
    chaos.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    chaos.add_argument("--kill-every", type=float, default=0.1, help="seconds between kills (default 0.1)")
    chaos.add_argument("--concurrency", type=int, default=32, help="calls in flight (default 32)")
    chaos.add_argument("--calls", type=int, help="stop after this many calls")
    chaos.add_argument("--keep-restart-policy", action="store_true",
                       help="use config.json's restart intensity instead of lifting it")
    return parser


async def _call(args: argparse.Namespace) -> int:
    params = _parse_params(await asyncio.to_thread(_params_text, args.params))
    running = None if args.standalone else await _running_host(args.config)
    if running is not None:  # counted there, and no start-up here
        reply = await control_request(running, "call", timeout=None, tool=args.tool, params=params)
        _print_result(reply["result"])
        return EXIT_OK
    host, beside = _one_shot_host(args.config)
    async with host:
        try:
            result = await host.registry.invoke(args.tool, params)
        except ToolNotFound as exc:
            await host.tool_index_ready()  # made in the background: it may say why by now
            missing = ToolNotFound(exc.tool, host.registry.explain_missing(exc.tool, whole=True))
            if "(" in str(missing) or not host.not_ready():
                raise call_error(missing, beside) from None  # the registry knew why (a disabled or failed plugin's)
            raise call_error(QanotHostError(f"{missing} (plugins that failed to start: {host.not_ready()})"),
                             beside) from None
        except QanotHostError as exc:
            raise call_error(exc, beside) from None
    _print_result(result)
    return EXIT_OK


def _one_shot_host(config_path: str) -> tuple[Host, str]:
    """A host of its own for one call or one listing, and what to add to its error beside a running
    host of the same state_dir. It serves no metrics (a running host of the config serves its port:
    the newcomer of pass 56's standalone call failed on that alone). Beside a running host, each
    plugin that host started waits 3 s for its disk and does not start here: an error says so."""
    config = load_config(config_path)
    config = msgspec.structs.replace(config, host=msgspec.structs.replace(config.host, metrics=None))
    beside = ""
    if host_holds(config.host.state_dir):
        beside = (f"a qanot-host holds state_dir {config.host.state_dir}: the plugins it has started cannot start "
                  "beside it (their disks are attached there); without --standalone the call goes through it")
    return Host(config), beside


def _print_result(result: str) -> None:
    """The result as it is, for a pipe or a file; on a terminal, with its control characters escaped."""
    if sys.stdout.isatty():
        result = for_terminal(result)
    sys.stdout.write(result if result.endswith("\n") else result + "\n")


MAX_PARAMS_FILE = 64 * 1024 * 1024  # as much as one frame to a worker can carry
PING_SECONDS = 5.0  # a running host answers a ping at once; one that does not is stopped or wedged


async def _running_host(config_path: str) -> str | None:
    """The control socket of a host running with this very config.json, if one answers."""
    try:
        config = load_config(config_path)
    except ConfigError:
        return None  # the standalone host says what is wrong with it
    path = socket_path(config.host.state_dir)
    try:
        reply = await control_request(path, "ping", timeout=PING_SECONDS)
    except NoRunningHost:  # no socket, or one left behind: nobody listens there
        if host_holds(config.host.state_dir):  # a host stopping (its disks attached still), or starting
            raise QanotHostError(f"a qanot-host holds state_dir {config.host.state_dir} but does not answer at "
                                 f"{path}: it is starting or stopping (or runs without its control socket: its log "
                                 "says why); nothing was sent (--standalone runs a host of its own beside "
                                 "it)") from None
        return None
    # A host that is there but busy, slow or running another config is reported (QanotHostError),
    # never worked around with a standalone host beside it on the same state_dir.
    running = str(reply.get("config"))
    if os.path.realpath(running) != os.path.realpath(config.path):  # one config, named through a symlink: the same
        raise QanotHostError(f"the host at {path} runs {running}, not {config.path}, on the same state_dir: nothing "
                             "was sent (--standalone runs a host of its own beside it)")
    return path


def _params_text(argument: str) -> str:
    """The params as given: inline, `@FILE` or `-` (stdin): 200 KB inline is over the kernel's limit
    for one argument."""
    if argument == "-":
        return sys.stdin.read(MAX_PARAMS_FILE + 1)
    if argument.startswith("@"):
        try:
            data = read_regular_file(argument[1:], MAX_PARAMS_FILE)
        except OSError as exc:
            raise QanotHostError(f"params: {argument[1:]}: {exc.strerror or exc}") from None
        return data.decode("utf-8", errors="replace")
    return argument


def _parse_params(text: str) -> dict:
    try:
        return parse_json_object(text, "params")
    except ValueError as exc:
        raise QanotHostError(str(exc)) from None


async def _tools(args: argparse.Namespace) -> int:
    running = None if args.standalone else await _running_host(args.config)
    beside = ""
    if running is not None:  # the running host's tools, as they are now; nothing starts here
        reply = await control_request(running, "tools")
        tools, failed = reply["tools"], reply["failed"]
    else:
        host, beside = _one_shot_host(args.config)
        async with host:
            tools = host.tool_definitions()
            failed = host.not_ready()
    if args.json:
        print(json.dumps(tools, ensure_ascii=False, indent=2))
    else:
        rows = [(t["name"], t["plugin"] or "-", (t["description"].strip().splitlines() or [""])[0]) for t in tools]
        widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(("TOOL", "PLUGIN"))]
        print(f"{'TOOL':<{widths[0]}}  {'PLUGIN':<{widths[1]}}  DESCRIPTION")
        for name, plugin, description in rows:
            print(f"{name:<{widths[0]}}  {plugin:<{widths[1]}}  {description}")
    if failed:
        print(f"qanot-host: error: plugins that failed to start: {failed}" + (f"; {beside}" if beside else ""),
              file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


async def _check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    raw_entries = json.loads(await asyncio.to_thread(Path(args.config).read_bytes)).get("plugins", [])
    report = check_config(config, raw_entries)
    if args.json:
        print(json.dumps({"config": config.path, "checked": report.checked, "errors": report.errors,
                          "warnings": report.warnings, "notes": report.notes}, ensure_ascii=False, indent=2))
        return EXIT_ERROR if report.errors else EXIT_OK
    for line in report.errors:
        print(f"error: {line}")
    for line in report.warnings:
        print(f"warning: {line}")
    for line in report.notes:
        print(f"note: {line}")
    print(f"{config.path}: {report.checked} plugins checked, {len(report.errors)} errors, "
          f"{len(report.warnings)} warnings")
    return EXIT_ERROR if report.errors else EXIT_OK


async def _answering(config_path: str) -> str:
    """The control socket of the host of this config, once it has answered a ping (5 s at most): a
    stopped (SIGSTOP) or wedged host is said at once, not after a command's own timeout, or never
    (reload and restart wait as long as their work takes). Attack pass 48."""
    path = socket_path(load_config(config_path).host.state_dir)
    await control_request(path, "ping", timeout=PING_SECONDS)
    return path


async def _status(args: argparse.Namespace) -> int:
    reply = await control_request(await _answering(args.config), "status")
    if args.json:
        print(json.dumps(reply["plugins"], ensure_ascii=False, indent=2))
        return EXIT_OK
    columns = ("plugin", "state", "pid", "uptime", "restarts", "rss_mb", "cpu_s", "calls", "errors",
               "timeouts", "egress", "sandbox", "last_exit", "kind", "error")
    # ERROR is the last column and mostly empty: left blank, not "-", so that a row ends with its kind
    rows = [[_cell(_status_cell(row, c)) if c != "error" else row.get("error") or "" for c in columns]
            for row in reply["plugins"]]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


LAST_EXIT_CHARS = 40  # in the table; `status --json` has it whole


def _status_cell(row: dict, column: str) -> object:
    """The table's short form of a row's value; `status --json` has them whole (the layers' names)."""
    if column == "sandbox":  # 17 names made the table 200 characters wide: counted, and what is missing
        layers, missing = row["sandbox"], row.get("sandbox_missing") or []
        return (f"{len(layers)} layers" + (f", {len(missing)} missing" if missing else "")) if layers else None
    if column == "uptime":
        return _duration(row["uptime"]) if row["uptime"] else None
    if column == "last_exit":  # a whole sentence made each row 250 characters wide (newcomer pass 56)
        text = row.get("last_exit") or ""
        return text if len(text) <= LAST_EXIT_CHARS else text[:LAST_EXIT_CHARS - 3] + "..."
    if column == "pid" and not row["pid"] and row.get("stopping_pid"):  # an idle stop's teardown() runs
        return f"{row['stopping_pid']} (stopping)"
    if column == "egress":  # connections allowed/denied, where the network is narrowed to hosts
        return f"{row['egress']['allowed']}/{row['egress']['denied']}" if row.get("egress") else None
    return row.get(column)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


def _cell(value: object) -> str:
    return "-" if value in (None, "") else str(value)


async def _reload(args: argparse.Namespace) -> int:
    try:
        path = await _answering(args.config)
    except ConfigError as exc:  # refused here, before any host hears of it: it runs on as it was
        raise ConfigError(f"{exc}; nothing was sent: a running host keeps the config it runs") from None
    reply = await control_request(path, "reload", timeout=None)  # as long as it takes
    summary, errors = reply["reload"], reply.get("errors", {})
    for key, names in summary.items():
        if key != "failed":
            print(f"{key}: {', '.join(names) or '-'}")
    for name in summary.get("failed", []):  # on stdout with the rest, and the exit status says so
        print(f"failed: {name}: {errors.get(name) or 'see status'}")
    return EXIT_ERROR if summary.get("failed") else EXIT_OK


async def _restart(args: argparse.Namespace) -> int:
    reply = await control_request(await _answering(args.config), "restart", timeout=None, plugin=args.plugin)
    status = reply["status"]
    print(f"{status['plugin']}: {status['state']}" + (f", pid {status['pid']}" if status["pid"] else "")
          + (f": {status['error']}" if status["error"] else ""))
    return EXIT_OK if status["state"] in SERVING_STATES else EXIT_ERROR


async def _logs(args: argparse.Namespace) -> int:
    path = await _answering(args.config)
    if args.follow:
        async for line in follow_logs(path, args.plugin, args.lines):
            _print_log_line(line)
        return EXIT_OK
    for line in (await control_request(path, "logs", plugin=args.plugin, lines=args.lines))["lines"]:
        _print_log_line(line)
    return EXIT_OK


def _print_log_line(line: list) -> None:
    when, stream, text = line
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
    print(f"{stamp} {stream} {text}", flush=True)


async def _chaos(args: argparse.Namespace) -> int:
    report = await run_chaos(args.config, args.duration, args.kill_every, args.concurrency, args.calls,
                             args.keep_restart_policy)
    print(report.render())
    return EXIT_OK if report.passed() else EXIT_ERROR


async def _mcp(args: argparse.Namespace) -> int:
    try:
        from .mcp_server import McpFront, listen
    except ImportError as exc:
        raise QanotHostError(f"qanot-host mcp needs the MCP SDK ({exc.name} is missing): "
                             "pip install 'qanot-host[mcp]'") from None
    if args.http is None:
        if args.token_env or args.token_file or args.allow_host:
            raise QanotHostError("--token-env, --token-file and --allow-host go with --http (stdio has no "
                                 "tokens or hosts)")
        return await serve(args.config, McpFront, lambda front: front.serve_stdio())
    token = _token(args)
    for name in args.allow_host:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", name):
            raise QanotHostError(f"--allow-host {name!r}: give a host name, such as qanot.internal (no port, "
                                 "no scheme)")
    try:
        listener = listen(args.http)  # before any plugin starts: a taken port is this command's error
    except ValueError as exc:
        raise QanotHostError(str(exc)) from None
    try:
        return await serve(args.config, McpFront, lambda front: front.serve_http(listener, token, args.allow_host))
    finally:
        listener.close()


def _token(args: argparse.Namespace) -> str | None:
    if args.token_env:
        value = os.environ.get(args.token_env, "")
        if not value:
            raise QanotHostError(f"--token-env {args.token_env}: the variable is not set, or empty")
        return value
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                value = f.read().strip()
        except OSError as exc:
            raise QanotHostError(f"--token-file {args.token_file}: {exc.strerror or exc}") from None
        if not value:
            raise QanotHostError(f"--token-file {args.token_file}: the file is empty")
        return value
    return None


COMMANDS = {"run": lambda args: serve(args.config), "mcp": _mcp, "call": _call, "tools": _tools, "check": _check,
            "status": _status, "reload": _reload, "restart": _restart, "logs": _logs, "chaos": _chaos}
