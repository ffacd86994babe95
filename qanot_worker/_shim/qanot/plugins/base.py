"""`from qanot.plugins.base import Plugin, ToolDef, tool` resolves here inside a worker.

Like Qanot's module it has no `__all__`, so a star import gives the same names Qanot's gives: the
API itself and the module-level imports it is written with.
"""

from __future__ import annotations

import json  # noqa: F401
import logging  # noqa: F401
from abc import ABC, abstractmethod  # noqa: F401
from dataclasses import dataclass, field  # noqa: F401
from pathlib import Path  # noqa: F401
from typing import Any, Awaitable, Callable  # noqa: F401

from qanot_worker.plugin_api import Plugin, PluginManifest, ToolDef, logger, tool, validate_tool_params  # noqa: F401
