"""Stand-in for the `qanot` distribution, on a worker's sys.path only (never installed)."""

from qanot_worker.plugin_api import QANOT_API_VERSION as __version__  # noqa: F401
