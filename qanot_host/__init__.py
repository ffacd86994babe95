"""qanot-host: run Qanot plugins, unchanged, each in its own sandboxed worker process.

The public surface is what this module exports; everything else is internal and may change.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    """`__version__`, read from the installed package's metadata when asked (importlib.metadata is 35
    ms of every command's start otherwise)."""
    if name != "__version__":
        raise AttributeError(f"module 'qanot_host' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("qanot-host")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


from .config import load_config  # noqa: E402
from .errors import (CallTimedOut, ConfigError, DependencyError, InvalidParams, PluginError,  # noqa: E402
                     PluginStartError, PluginUnavailable, ProtocolMismatch, ProtocolViolation, QanotHostError,
                     ToolFailed, ToolNotFound, WorkerCrashed, WorkerKilled, WorkerTimeout)
from .host import Host, PluginState, PluginSupervisor  # noqa: E402
from .registry import ToolRegistry  # noqa: E402
from .settings import Config  # noqa: E402

__all__ = [
    "Host", "PluginState", "PluginSupervisor", "ToolRegistry", "Config", "load_config", "QanotHostError", "ConfigError",
    "ToolNotFound", "InvalidParams", "PluginError", "PluginUnavailable", "PluginStartError",
    "DependencyError", "ProtocolMismatch", "WorkerCrashed", "WorkerKilled", "WorkerTimeout", "CallTimedOut",
    "ProtocolViolation",
    "ToolFailed", "__version__",
]
