"""`qanot.fs_safe` inside a worker (see qanot_worker/fs_safe.py)."""

from qanot_worker.fs_safe import (SafeWriteError, is_path_within_root, safe_write_file,  # noqa: F401
                                  validate_read_path, validate_write_path)
