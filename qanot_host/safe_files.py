"""Reading a file that someone other than the host may control: a plugin's plugin.json and code, the
workspace files plugins' places sit beside, an operator's secret file.

One way to do it, because each way of getting it wrong has been tried on us: a symlink at the end
is refused (O_NOFOLLOW), so is anything but a regular file (a FIFO would block, a device never
end: O_NONBLOCK opens it without waiting), and no more than `limit` bytes are ever read.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = ["read_regular_file", "open_regular_file"]


def open_regular_file(path: str, dir_fd: int | None = None) -> tuple[int, os.stat_result]:
    """A descriptor of the file and its stat, for a caller that streams it. OSError with a reason a
    person can act on: ELOOP (a symlink), ENOENT, EINVAL ("not a regular file")."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def read_regular_file(path: str, limit: int, dir_fd: int | None = None) -> bytes:
    """The file's bytes. OSError with a reason a person can act on: ELOOP (a symlink), ENOENT,
    EINVAL ("not a regular file"), EFBIG (over `limit`)."""
    fd, info = open_regular_file(path, dir_fd)
    try:
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"{info.st_size} bytes, over the {limit} read")
        data = os.read(fd, limit + 1)
        if len(data) > limit:  # it grew meanwhile
            raise OSError(errno.EFBIG, f"over the {limit} bytes read")
        return data
    finally:
        os.close(fd)
