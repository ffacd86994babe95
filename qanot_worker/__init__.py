"""The worker side of qanot-host: loads one plugin and serves it over the protocol.

Never imports the supervisor (`qanot_host`). Plugins see `qanot.plugins.base` (the `plugin_api`
module) through the shim under `_shim/`, which only workers have on their path.
"""

from .protocol import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION"]
