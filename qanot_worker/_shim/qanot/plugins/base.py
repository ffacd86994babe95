"""`from qanot.plugins.base import Plugin, ToolDef, tool` resolves here inside a worker."""

from qanot_worker.plugin_api import *  # noqa: F401,F403
from qanot_worker.plugin_api import __all__  # noqa: F401
