"""Every way a plugin, a worker or the user's input can fail, as types.

::

    QanotHostError
    ├── ConfigError                 config.json or a plugin.json is unusable (names file and key)
    ├── ToolNotFound                no tool of that name is registered
    ├── InvalidParams               params failed the tool's JSON Schema, checked in the host
    ├── RemoteFailure               a worker's Failure reply, inside the host only (becomes one below)
    └── PluginError                 something went wrong with one plugin (carries .plugin)
        ├── PluginUnavailable       the plugin is not running (failed to start, stopped, failed)
        ├── PluginStartError        spawn, handshake, import, setup() or get_tools() failed
        │   ├── DependencyError     uv could not build the plugin's environment
        │   └── ProtocolMismatch    the worker speaks another protocol version
        ├── WorkerCrashed           the worker process died (carries exit code or signal)
        ├── WorkerTimeout           a call, setup() or teardown() ran past its deadline
        ├── ProtocolViolation       the worker sent a frame the host cannot accept
        │   └── ClosedMidFrame      ...or closed its pipe inside one, and lived on
        └── ToolFailed              the tool's handler raised or returned a non-string

Inside the host these are raised; `ToolRegistry.execute()` turns them into Qanot's
``{"error": "..."}`` string at the edge, and the CLI into one line on stderr.
"""

from __future__ import annotations

import signal

__all__ = [
    "QanotHostError", "ConfigError", "ToolNotFound", "InvalidParams", "PluginError",
    "PluginUnavailable", "PluginStartError", "DependencyError", "ProtocolMismatch", "WorkerCrashed",
    "WorkerTimeout", "CallTimedOut", "ProtocolViolation", "ToolFailed", "RemoteFailure", "ClosedMidFrame",
    "describe_exit",
]


class QanotHostError(Exception):
    """Base of every error qanot-host raises on purpose."""


class ConfigError(QanotHostError):
    pass


class ToolNotFound(QanotHostError):
    def __init__(self, name: str, why: str = "") -> None:
        super().__init__(f"Unknown tool: {name}" + (f" ({why})" if why else ""))
        self.tool = name


class InvalidParams(QanotHostError):
    def __init__(self, tool: str, problems: list[str]) -> None:
        super().__init__(f"Invalid parameters for tool {tool}: {'; '.join(problems)}")
        self.tool = tool
        self.problems = problems


class PluginError(QanotHostError):
    def __init__(self, plugin: str, message: str) -> None:
        super().__init__(f"plugin {plugin}: {message}")
        self.plugin = plugin
        self.detail = message


class PluginUnavailable(PluginError):
    pass


class PluginStartError(PluginError):
    pass


class StartRefused(PluginStartError):
    """The host would not start it as configured (an unset variable, a command not found): trying
    again cannot help until the configuration changes."""


class PlaceFull(StartRefused):
    """Its place in the workspace is over its ceiling: no start of it can succeed until files are
    removed there (then a reload starts it again)."""


class DependencyError(PluginStartError):
    pass


class ProtocolMismatch(PluginStartError):
    pass


class WorkerCrashed(PluginError):
    def __init__(self, plugin: str, returncode: int | None, context: str = "") -> None:
        how = describe_exit(returncode)
        super().__init__(plugin, f"worker crashed ({how}){context}")
        self.returncode = returncode


class WorkerKilled(WorkerCrashed):
    """A call lost because the host killed its worker for another call's sake (one that did not stop
    when cancelled): the call itself neither crashed nor timed out, and its caller is told whose
    fault it was (the newcomer of 11-27 was told only the other tool's timeout)."""

    def __init__(self, plugin: str, tool: str, why: str) -> None:
        PluginError.__init__(self, plugin, f"worker killed during tool {tool}: {why}")
        self.returncode = -9


class WorkerTimeout(PluginError):
    pass


class CallTimedOut(WorkerTimeout):
    """A tool call's own timeout ran out (not a worker killed for another reason meanwhile)."""


class CallStuck(WorkerTimeout):
    """A call that did not stop within cancel_grace of being cancelled: its worker is killed, and
    the other calls in flight there end as WorkerKilled."""


class ProtocolViolation(PluginError):
    pass


class ClosedMidFrame(ProtocolViolation):
    """The worker's pipe ended inside a frame. A worker killed while writing does that too, so it
    counts as a violation only if the worker lives on without its pipe."""


class ToolFailed(PluginError):
    def __init__(self, plugin: str, tool: str, message: str) -> None:
        super().__init__(plugin, f"tool {tool} failed: {message}")
        self.tool = tool
        self.message = message


def describe_exit(returncode: int | None) -> str:
    """'killed by SIGKILL', 'exit code 3', or 'exit status unknown' for a process not yet reaped."""
    if returncode is None:
        return "exit status unknown"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class RemoteFailure(QanotHostError):
    """The worker answered a request with Failure; the caller knows what it asked (and which plugin)
    and turns it into one of the errors above, saying so."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
