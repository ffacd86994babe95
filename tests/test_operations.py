"""Operating a running host from outside: status, reload, SIGHUP, chaos, and a SIGKILLed host."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from .conftest import GREETER, plugin, worker_processes
from .test_cli import REPO, assert_one_line_error, qanot_host


class RunningHost:
    """`qanot-host run` in the background, ready when its 'ready:' line is logged."""

    def __init__(self, config: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "qanot_host", "run", "--config", config],
                                     stderr=subprocess.PIPE, text=True, cwd=REPO)
        self.wait_for("ready:")

    def wait_for(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError(f"host exited before logging {text!r}")
            if text in line:
                return line
        raise AssertionError(f"no {text!r} within {timeout} s")

    def workers(self, include_template: bool = False) -> list[psutil.Process]:
        return worker_processes(self.proc.pid, include_template)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stderr.close()


@pytest.fixture
def running():
    hosts = []

    def start(config: str) -> RunningHost:
        hosts.append(RunningHost(config))
        return hosts[-1]

    yield start
    for host in hosts:
        host.close()


def test_status_and_reload_against_a_running_host(write_config, running):
    config = write_config([GREETER, plugin("init_style")])
    host = running(config)
    proc = qanot_host("status", "--config", config)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split()[:5] == ["PLUGIN", "STATE", "PID", "UPTIME", "RESTARTS"]
    assert [r.split()[:2] for r in rows] == [["greeter", "ready"], ["init_style", "ready"]]
    pids = {p.pid for p in host.workers()}
    assert {int(r.split()[2]) for r in rows} == pids
    as_json = json.loads(qanot_host("status", "--config", config, "--json").stdout)
    assert [(row["plugin"], row["state"]) for row in as_json] == [("greeter", "ready"), ("init_style", "ready")]
    assert {row["pid"] for row in as_json} == pids

    data = json.loads(Path(config).read_text())
    data["plugins"] = [GREETER, plugin("echo")]
    Path(config).write_text(json.dumps(data))
    proc = qanot_host("reload", "--config", config)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["added: echo", "removed: init_style", "restarted: -", "unchanged: greeter"]
    rows = qanot_host("status", "--config", config).stdout.splitlines()[1:]
    assert [r.split()[:2] for r in rows] == [["greeter", "ready"], ["echo", "ready"]]


def test_sighup_reloads_and_a_broken_config_keeps_the_old_one(write_config, running):
    config = write_config([GREETER])
    host = running(config)
    data = json.loads(Path(config).read_text())
    data["plugins"].append(plugin("echo"))
    Path(config).write_text(json.dumps(data))
    host.proc.send_signal(signal.SIGHUP)
    host.wait_for("reloaded")
    Path(config).write_text("{broken")
    host.proc.send_signal(signal.SIGHUP)
    assert "not valid JSON" in host.wait_for("reload refused")
    assert len(host.workers()) == 2
    host.proc.send_signal(signal.SIGTERM)
    assert host.proc.wait(timeout=15) == 0


def test_status_without_a_running_host_is_one_line(write_config):
    assert_one_line_error(qanot_host("status", "--config", write_config([GREETER])), "no running qanot-host answers")


def test_a_second_host_on_the_same_state_dir_is_refused(write_config, running):
    config = write_config([GREETER])
    running(config)
    assert_one_line_error(qanot_host("run", "--config", config), "another qanot-host is running")


def test_workers_exit_when_the_host_is_sigkilled(write_config, running):
    host = running(write_config([GREETER, plugin("init_style"), plugin("echo")]))
    workers = host.workers(include_template=True)
    assert len(workers) == 7  # the template, and each plugin's worker and its namespace's init
    host.proc.kill()
    host.proc.wait()
    deadline = time.monotonic() + 5.0  # they go at once (PDEATHSIG); a loaded machine may take a moment
    while time.monotonic() < deadline and any(_running(w) for w in workers):
        time.sleep(0.01)
    # Exited workers may linger as zombies of whoever adopted them; none may still run.
    assert not [w for w in workers if _running(w)]


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_chaos_command_reports_and_passes(write_config):
    config = write_config([GREETER, plugin("echo"), plugin("calc"), plugin("init_style")])
    proc = qanot_host("chaos", "--config", config, "--duration", "3", "--kill-every", "0.1", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    report = dict(line.rsplit(None, 1) for line in lines[:-1] if not line.startswith("recovery"))
    assert report["hung"] == "0" and report["leaked processes"] == "0" and report["leaked fds"] == "0", report
    assert lines[-1] == "PASS"
    assert int(report["workers killed"]) >= 10
