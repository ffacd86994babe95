"""`qanot.secrets` inside a worker (see qanot_worker/secret_refs.py)."""

from qanot_worker.secret_refs import read_secret_file as _read_secret_file  # noqa: F401
from qanot_worker.secret_refs import resolve_config_secrets, resolve_secret  # noqa: F401
