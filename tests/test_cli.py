"""The qanot-host command as a user runs it: real processes, exit codes, one-line errors."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qanot_host import Host
from qanot_host.control import ControlServer

from .conftest import GREETER, grant_write, plugin

REPO = Path(__file__).resolve().parent.parent


def qanot_host(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qanot_host", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("qanot-host: error: ")
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_call_prints_the_result(write_config):
    proc = qanot_host("call", "--config", write_config([GREETER]), "greet", '{"name": "Tashkent"}')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Salom, Tashkent!\n"
    assert proc.stderr == ""


def test_call_errors_are_one_line(write_config):
    config = write_config([GREETER, plugin("setup_fails")])
    assert_one_line_error(qanot_host("call", "--config", config, "greeter_fail"),
                          "plugin greeter: tool greeter_fail failed: ValueError")
    assert_one_line_error(qanot_host("call", "--config", config, "greet", "{}"),
                          "Missing required parameter: name")
    assert_one_line_error(qanot_host("call", "--config", config, "nope"),
                          "Unknown tool: nope", "setup_fails: setup() failed")
    assert_one_line_error(qanot_host("call", "--config", config, "greet", "{bad json"),
                          "params: not valid JSON")
    assert_one_line_error(qanot_host("call", "--config", config, "greet", "[1]"),
                          "params: must hold a JSON object, not an array")


async def test_call_redacts_credentials_in_a_plugins_error_as_execute_does(write_config):
    """The newcomer: `call` printed password=hunter2 from a tool's error, which execute() and
    `qanot-host mcp` redact; the same, standalone and through a running host's control socket."""
    config = write_config([GREETER])
    params = json.dumps({"why": "nope, password=hunter2 at /srv/app/x.py"})
    standalone = qanot_host("call", "--standalone", "--config", config, "greeter_fail", params)
    async with Host(config) as host:
        control = ControlServer(host)
        await control.start()
        try:
            running = await asyncio.to_thread(qanot_host, "call", "--config", config, "greeter_fail", params)
        finally:
            await control.close()
    for proc in (standalone, running):
        assert_one_line_error(proc, "ValueError: nope, [credential redacted] at /srv/app/x.py")
        assert "hunter2" not in proc.stderr


async def test_a_standalone_call_beside_a_running_host_serving_metrics(write_config, monkeypatch):
    """The newcomer of pass 56: a standalone call beside a running host of the config failed on the
    metrics port that host serves (a one-shot host serves none), and said nothing of the disks it
    would wait for until it had (it says so first now). Errors about the operator's own config are
    whole, not "[path redacted]" as Qanot's model reads them."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.delenv("QH_UNSET_SECRET", raising=False)
    config = write_config([GREETER, plugin("needs_config", api_key={"env": "QH_UNSET_SECRET"})],
                          host={"metrics": f"127.0.0.1:{port}", "limits": {"disk_mb": 0}})
    async with Host(config) as host:
        control = ControlServer(host)
        await control.start()
        try:
            standalone = await asyncio.to_thread(qanot_host, "call", "--standalone", "--config", config, "greet",
                                                 '{"name": "x"}')
            through = await asyncio.to_thread(qanot_host, "call", "--config", config, "needs_config_ping", "{}")
        finally:
            await control.close()
    assert standalone.returncode == 0, standalone.stderr
    assert standalone.stdout == "Salom, x!\n" and standalone.stderr == ""
    assert_one_line_error(through, f"{config}: plugins[1].config['api_key']")
    assert "[path redacted]" not in through.stderr


def test_bad_config_is_one_line(tmp_path):
    missing = qanot_host("call", "--config", str(tmp_path / "nope.json"), "greet")
    assert_one_line_error(missing, "nope.json: cannot be read")
    broken = tmp_path / "config.json"
    broken.write_text('{"plugins": [{"name": "greeter", "enabled": "yes"}]}')
    for command in ("run", "tools", "check"):
        assert_one_line_error(qanot_host(command, "--config", str(broken)),
                              "config.json: plugins[0].enabled: Expected `bool`, got `str`")


def test_tools_lists_name_plugin_description(write_config):
    proc = qanot_host("tools", "--config", write_config([GREETER, plugin("init_style")]))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["TOOL", "PLUGIN", "DESCRIPTION"]
    assert any(line.split()[:2] == ["greet", "greeter"] and line.endswith("Greet someone.") for line in lines)
    assert any(line.split()[:3] == ["init_style_ping", "init_style", "pong"] for line in lines)
    as_json = json.loads(qanot_host("tools", "--json", "--config", write_config([GREETER])).stdout)
    assert {"name": "greet_sync", "description": "A plain function as handler.",
            "input_schema": {"type": "object", "properties": {}}, "plugin": "greeter"} in as_json


def test_run_serves_until_sigterm_then_tears_down(write_config, tmp_path):
    (tmp_path / "out").mkdir()
    marker = tmp_path / "out" / "teardown.txt"
    config = write_config([plugin("greeter", greeting_style="x", teardown_marker=str(marker))],
                          host=grant_write("greeter", tmp_path / "out"))
    proc = subprocess.Popen([sys.executable, "-m", "qanot_host", "run", "--config", config],
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        seen = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            seen.append(line)
            if "ready: 1 of 1 plugins" in line:
                break
        else:
            pytest.fail("no ready line: " + "".join(seen))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert marker.read_text() == "teardown ran"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_run_exits_zero_on_signal_during_start(write_config, sig):
    config = write_config([GREETER])
    proc = subprocess.Popen([sys.executable, "-m", "qanot_host", "run", "--config", config],
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        # Signal handlers are in place once this line is logged; the workers are still starting.
        while "starting 1 plugin from" not in (line := proc.stderr.readline()):
            assert line, "run exited before starting"
        proc.send_signal(sig)
        assert proc.wait(timeout=15) == 0
        assert "ready:" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


def test_check_reports_every_problem_without_running_plugin_code(write_config, tmp_path):
    config = write_config([
        plugin("import_error"),  # would raise if imported: check must not import it
        plugin("needs_config"), plugin("needs_newer"), plugin("orphan_dep"), plugin("missing_one"),
        plugin("broken_manifest"), plugin("missing_disabled", enabled=False),
        {"name": "greeter", "enabled": True, "config": {"greeting_style": "x"}, "enabeld": False},
        plugin("syntax_error"), plugin("no_class"),
    ], host={"plugins": {"greeter": {"tool_timeouts": {"greet": 5, "no_such_tool": 5}, "permissions": {
        "filesystem": {"read": [str(tmp_path / "absent")], "write": [str(tmp_path / "locked")]}}}}})
    (tmp_path / "locked").mkdir(mode=0o755)  # root's, not writable by the plugin's uid
    proc = qanot_host("check", "--config", config)
    assert proc.returncode == 1
    out = proc.stdout
    assert "import-time failure" not in out  # read, never run
    assert "error: plugin import_error: " in out and "import_error/plugin.py defines no Plugin subclass" in out
    assert "error: plugin syntax_error: syntax error in " in out and "syntax_error/plugin.py line " in out
    assert "error: plugin no_class: " in out and "no_class/plugin.py defines no Plugin subclass" in out
    assert "warning: plugin greeter: " in out and "host.plugins.greeter.tool_timeouts: no_such_tool: no such " \
        "tool in the plugin's code" in out
    assert f"permissions.filesystem.read[0]: {tmp_path / 'absent'} does not exist" in out
    assert f"permissions.filesystem.write[0]: {tmp_path / 'locked'} is not writable by the plugin's uid" in out
    # Qanot loads a plugin without its required_config (with a warning), and so does the host
    assert "warning: plugin needs_config: " in out and \
        "required_config: missing from the plugin's config in config.json: api_key, region" in out
    assert "needs Qanot plugin API 99.0.0, this host implements 2.0.4" in out
    assert "plugin_deps: 'not_configured' is not an enabled plugin" in out
    assert "error: plugin missing_one: not found: no " in out
    assert "error: plugin broken_manifest: " in out and "broken_manifest/plugin.json: not valid JSON" in out
    assert "warning: plugin missing_disabled (disabled): not found" in out
    assert "warning: " in out and "plugins[7].enabeld: unknown key, ignored" in out
    assert out.strip().splitlines()[-1].endswith("10 plugins checked, 9 errors, 4 warnings")


def test_check_passes_on_the_example_config():
    proc = qanot_host("check", "--config", str(REPO / "examples" / "config.json"))
    assert proc.returncode == 0, proc.stdout
    assert "0 errors" in proc.stdout


def test_version_params_from_a_file_or_stdin_and_check_as_json(tmp_path):
    import qanot_host as package
    version = qanot_host("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"qanot-host {package.__version__}"
    # 200 KB of params: over the kernel's limit for one argument, fine from a file or stdin
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"text": "x" * 200_000}))
    # a copy of the example: a host run on examples/config.json itself left examples/workspace/echo
    # to the tests' uids, and the README's first command then failed under any other uid_base
    example = tmp_path / "example" / "config.json"
    example.parent.mkdir()
    example.write_text((REPO / "examples" / "config.json").read_text())
    config = str(example)
    left_before = (REPO / "examples" / "workspace").exists()
    proc = qanot_host("call", "--config", config, "echo", f"@{params}")
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"text": "x" * 200_000}, proc.stderr
    piped = subprocess.run([sys.executable, "-m", "qanot_host", "call", "--config", config, "echo",
                            "-"], input='{"a": 1}', capture_output=True, text=True, timeout=60, cwd=REPO)
    assert piped.returncode == 0 and json.loads(piped.stdout) == {"a": 1}, piped.stderr
    assert_one_line_error(qanot_host("call", "--config", config, "echo", "@/nonexistent/params"),
                          "params: /nonexistent/params: No such file or directory")
    assert (REPO / "examples" / "workspace").exists() == left_before  # nothing of the tests' in the example
    report = json.loads(qanot_host("check", "--config", "examples/config.json", "--json").stdout)
    assert report["checked"] == 3 and report["errors"] == []


def test_check_says_which_layers_the_config_turns_off(write_config):
    """identity false keeps workers at uid 0 (the sixth attacker's way in): check says so, strict makes it an error."""
    config = write_config([plugin("echo")], host={"sandbox": {"identity": False}})
    report = qanot_host("check", "--config", config).stdout
    assert "warning: sandbox layer identity: off: host.sandbox.identity is false" in report, report
    strict = write_config([plugin("echo")], host={"sandbox": {"identity": False, "strict": True}})
    proc = qanot_host("check", "--config", strict)
    assert proc.returncode != 0 and "error: sandbox layer identity: off" in proc.stdout, proc.stdout


def test_check_warns_of_what_run_would_fail_or_quietly_turn_off(write_config):
    """Attack pass 49: memory_mb 0 (no memory ceiling), a backoff_initial over backoff_max and a
    SecretRef naming an unset variable all passed check without a word."""
    from .conftest import check_report
    entry = {"name": "echo", "enabled": True, "config": {"token": {"env": "QANOT_TEST_NOT_SET"},
                                                         "key": {"file": "/nonexistent/qanot-key"}}}
    config = write_config([entry], host={"limits": {"memory_mb": 0},
                                         "restart": {"backoff_initial": 100, "backoff_max": 1}})
    report = check_report(config, warnings=True)
    assert "plugin echo: limits.memory_mb is 0" in report and "its memory has no ceiling" in report, report
    assert "restart.backoff_initial (100 s) is over restart.backoff_max (1 s)" in report, report
    assert "plugins[0].config['token']: the environment variable 'QANOT_TEST_NOT_SET' it names is not set" in report
    assert "plugins[0].config['key']: " in report and "/nonexistent/qanot-key" in report, report  # each one, not the first
    from qanot_host.registry import redact_credentials  # as status shows it: the key named, not redacted
    assert "config['token']: the environment variable" in redact_credentials(report)
    assert check_report(config) == ""  # warnings, not errors: a service's environment may differ


def test_call_escapes_a_results_control_characters_on_a_terminal_only(write_config):
    """Attack pass 49: a result's ESC sequences reached the operator's terminal as they were."""
    import os
    import pty
    config = write_config([GREETER])
    hostile = json.dumps({"name": "\x1b]0;owned\x07\x1b[31mred\rover"})
    main, side = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "qanot_host", "call", "--config", config, "--standalone",
                               "greet", hostile], stdout=side, stderr=subprocess.PIPE, timeout=60, cwd=REPO)
        os.close(side)
        shown = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(main)
    assert proc.returncode == 0, proc.stderr
    assert b"\x1b" not in shown and b"\x07" not in shown, shown
    assert b"\\x1b]0;owned\\x07\\x1b[31mred\\x0dover" in shown, shown
    piped = qanot_host("call", "--config", config, "--standalone", "greet", hostile)
    assert "\x1b]0;owned\x07\x1b[31mred" in piped.stdout, piped.stdout  # a pipe gets the result as it is


def test_a_reader_that_goes_away_gets_no_traceback():
    """The newcomer's `qanot-host completion zsh | head -5` printed a BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "qanot_host", "completion", "bash"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before it writes: what head does once it has its lines
    assert proc.wait(timeout=60) == 128 + signal.SIGPIPE
    assert proc.stderr.read() == b""
    proc.stderr.close()


async def test_a_plugins_schema_text_in_an_error_is_sanitised_and_one_line(write_config):
    """Attack pass 24: a parameter name from a plugin's schema came back in "Missing required
    parameter" unsanitised through execute(), and through `call` with its newline (a forged line)."""
    config = write_config([plugin("odd_required")])
    async with Host(config) as host:
        answer = json.loads(await host.registry.execute("odd_tool", {}))["error"]
    assert answer.startswith("Invalid parameters: Missing required parameter") and "hunter2" not in answer, answer
    assert "/srv/app" not in answer, answer
    assert_one_line_error(qanot_host("call", "--config", config, "odd_tool"), "Missing required parameter")
    assert "hunter2" not in qanot_host("call", "--config", config, "odd_tool").stderr



@pytest.mark.parametrize("command", [["status"], ["reload"], ["restart", "greeter"], ["logs", "greeter"],
                                     ["call", "greet", '{"name": "x"}'], ["tools"]])
def test_a_host_that_takes_connections_but_never_answers_is_said_within_seconds(write_config, command):
    """Attack pass 48: against a SIGSTOPped host (the kernel still queues its connections), `status`
    waited 60 s, `reload` and `restart` for good. Every command now asks for a ping first."""
    import socket
    from qanot_host.config import load_config
    config = write_config([GREETER])
    state_dir = Path(load_config(config).host.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    stopped = socket.socket(socket.AF_UNIX)
    stopped.bind(str(state_dir / "control.sock"))
    stopped.listen(16)  # connections complete in the kernel's queue; nobody ever reads them
    try:
        began = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "qanot_host", *command, "--config", config],
                              capture_output=True, text=True, timeout=60, cwd=REPO)
        assert time.monotonic() - began < 20
        assert_one_line_error(proc, "did not answer 'ping' within 5 s")
    finally:
        stopped.close()


def test_a_call_while_a_host_stops_is_refused_not_run_beside_it(write_config):
    """Attack pass 48: while a host stopped (its control socket gone, its workers and disks not
    yet), calls started standalone hosts beside it, which failed on "disk attached elsewhere", the
    last 24 s later. The state_dir's lock says a host is still there."""
    import fcntl
    from qanot_host.config import load_config
    config = write_config([GREETER])
    state_dir = Path(load_config(config).host.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "control.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a stopping host holds it
        proc = qanot_host("call", "--config", config, "greet", '{"name": "x"}')
        assert_one_line_error(proc, "but does not answer at", "it is starting or stopping", "nothing was sent")
    proc = qanot_host("call", "--config", config, "greet", '{"name": "x"}')  # gone: a host of its own
    assert proc.returncode == 0 and proc.stdout.strip() == "Salom, x!", proc.stderr


async def test_a_running_host_of_another_config_on_the_state_dir_is_said_not_run_beside(write_config, tmp_path):
    """Review: a host answering with another config's path (the same file through a symlink, or
    another file on the same state_dir) had a standalone host started beside it, on its state_dir."""
    import shutil
    config = write_config([GREETER])
    other = tmp_path / "other.json"
    shutil.copyfile(config, other)
    linked = tmp_path / "linked"
    linked.symlink_to(Path(config).parent)
    async with Host(config) as host:
        control = ControlServer(host)
        await control.start()
        try:
            through_link = await asyncio.to_thread(qanot_host, "call", "--config", str(linked / Path(config).name),
                                                   "greet", '{"name": "x"}')
            elsewhere = await asyncio.to_thread(qanot_host, "call", "--config", str(other), "greet", '{"name": "x"}')
            calls = host.plugins["greeter"].calls
        finally:
            await control.close()
    assert through_link.returncode == 0 and through_link.stdout == "Salom, x!\n", through_link.stderr
    assert calls == 1  # through the running host: the same config, named through a symlink
    assert_one_line_error(elsewhere, f"runs {config}, not {other}, on the same state_dir: nothing was sent")


def test_the_status_table_keeps_a_long_last_exit_short():
    """A whole sentence in LAST_EXIT made each row 250 characters wide (newcomer pass 56): cut in the
    table, whole in `status --json`."""
    from qanot_host.cli import _status_cell
    long = "tool faulty_block did not stop within 3 s of being cancelled (a handler blocking the event loop?); killed"
    assert _status_cell({"last_exit": long}, "last_exit") == long[:37] + "..."
    assert _status_cell({"last_exit": "exit code 7"}, "last_exit") == "exit code 7"


def test_a_secret_the_host_redacted_is_not_redacted_again_into_pieces():
    """`call` printed "api_[credential redacted] config.api_key]" for the host's own "[secret ...]":
    the key=value pass ran over a value redacted already (newcomer pass 58)."""
    from qanot_host.registry import redact_credentials
    assert redact_credentials("failed with api_key=[secret config.api_key] and password=hunter2") == \
        "failed with api_key=[secret config.api_key] and [credential redacted]"
