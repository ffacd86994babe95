"""qanot-host: run Qanot plugins, unchanged, each in its own sandboxed worker process.

The public surface is what this module exports; everything else is internal and may change.
"""

from .config import Config, load_config
from .errors import (ConfigError, DependencyError, InvalidParams, PluginError, PluginStartError,
                     PluginUnavailable, ProtocolMismatch, ProtocolViolation, QanotHostError, ToolFailed,
                     ToolNotFound, WorkerCrashed, WorkerTimeout)
from .host import Host, PluginState
from .registry import ToolRegistry

__all__ = [
    "Host", "PluginState", "ToolRegistry", "Config", "load_config", "QanotHostError", "ConfigError",
    "ToolNotFound", "InvalidParams", "PluginError", "PluginUnavailable", "PluginStartError",
    "DependencyError", "ProtocolMismatch", "WorkerCrashed", "WorkerTimeout", "ProtocolViolation",
    "ToolFailed",
]
