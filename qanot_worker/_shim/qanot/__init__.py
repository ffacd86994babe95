"""Stand-in for the `qanot` distribution, on a worker's sys.path only (never installed).

As in Qanot, `qanot.Plugin`, `qanot.tool` and `qanot.ToolDef` are the plugin API's; the agent's own
names (Config, providers) do not exist in a worker.
"""

from qanot_worker.plugin_api import QANOT_VERSION as __version__  # noqa: F401
from qanot_worker.plugin_api import Plugin, ToolDef, tool  # noqa: F401
