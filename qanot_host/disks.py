"""Each plugin's disk: an ext4 image of `limits.disk_mb` in STATE_DIR/disks, made by the host.

The image is sparse (it takes the space its files take) and its file system's size is the plugin's
disk ceiling. The host only makes and grows images; it never mounts them in its own namespace and
never reads what a plugin wrote: the worker's launcher attaches the image (qanot_worker/disk.py).
Where this machine cannot make or attach images at all (no mkfs.ext4, no loop devices, not root), a
plugin's data directory is a plain directory and the disk-quota layer is reported missing; where it
can, a plugin whose own image cannot be made or attached does not start (worker_factory.py, the
worker's sandbox): it never runs on the host's disk, with no ceiling, in its disk's place.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import glob
import logging
import os
import shutil
import time

from .children import die_with_host

__all__ = ["DiskImages"]

log = logging.getLogger("qanot_host.disks")

DETACH_WAIT_SECONDS = 3.0  # for the loop device of a disk its launcher let go to detach
# No resize inode: its reserved descriptor blocks (for growing while mounted, which the host never
# does: it grows an image offline, resize2fs -f) were 500 of a 1 GB image's 650 KB of metadata, and
# every plugin's first start wrote them out: 1.3 ms of CPU a plugin, 0.3 without.
MKFS_OPTIONS = ["-q", "-F", "-m", "0", "-J", "size=4", "-O", "^resize_inode",
                "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"]


class DiskImages:
    def __init__(self, state_dir: str) -> None:
        self._dir = os.path.join(state_dir, "disks")
        self._mkfs: str | None = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/sbin:/usr/sbin")
        self._resize = shutil.which("resize2fs") or shutil.which("resize2fs", path="/sbin:/usr/sbin")
        self._making: dict[int, asyncio.Lock] = {}  # size -> its template is being made
        self._said: dict[str, int] = {}  # plugin -> the disk_mb it was last warned of
        self.problem = ""
        if self._mkfs is None:
            self.problem = "mkfs.ext4 is not installed (e2fsprogs)"
        elif os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
            self.problem = "attaching a disk image needs root and loop devices (/dev/loop-control)"

    @property
    def available(self) -> bool:
        return not self.problem

    async def image(self, plugin: str, size_mb: int) -> tuple[str, str]:
        """(path of the plugin's image, "") made, or grown to size_mb while nothing has it attached;
        ("", why not) if there is none."""
        if not self.available:
            return "", self.problem
        os.makedirs(self._dir, mode=0o700, exist_ok=True)
        path = self.path(plugin)
        size = size_mb * 2**20
        try:
            if not os.path.exists(path):
                await self._make(path, size)
            elif os.path.getsize(path) != size:
                await self._resized(plugin, path, size)
        except OSError as exc:
            return "", f"cannot make {path}: {exc.strerror or exc}"
        return path, ""

    def path(self, plugin: str) -> str:
        return os.path.join(self._dir, f"{plugin}.img")

    async def _resized(self, plugin: str, path: str, size: int) -> None:
        """disk_mb is not the image's size: grown if it is larger, said if not (never shrunk)."""
        current = os.path.getsize(path)
        if current > size:
            if self._said.get(plugin) != size:
                self._said[plugin] = size
                log.warning("plugin %s: its disk stays %d MB though disk_mb is %d: a disk is never shrunk (what "
                            "is on it would be lost); to start afresh, stop the host and remove %s",
                            plugin, current // 2**20, size // 2**20, path)
            return
        # The image's lock (qanot_worker/disk.py): held by a loop device backed by it, and by this
        # host while it grows the image, so that nothing attaches it meanwhile.
        lock = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            deadline = time.monotonic() + DETACH_WAIT_SECONDS
            locked = _try_lock(lock)
            while not locked and time.monotonic() < deadline:  # a reload's last worker is ending
                await asyncio.sleep(0.02)
                locked = _try_lock(lock)
            # (a scan of every loop device, off the loop: one attached by a host without the lock)
            if not locked or await asyncio.to_thread(_attached, path):
                if self._said.get(plugin) != size:
                    self._said[plugin] = size
                    log.warning("plugin %s: disk_mb is %d MB, but its disk (%d MB) is still attached by a worker "
                                "that has not ended: it is grown at its next start", plugin, size // 2**20,
                                current // 2**20)
                return
            await self._grow(path, size)
        finally:
            os.close(lock)

    async def _make(self, path: str, size: int) -> None:
        """A copy of an empty file system of that size, made by mkfs.ext4 once per size: a sparse copy
        of its few hundred KB of metadata costs a millisecond, a run of mkfs.ext4 15 ms of CPU (500
        plugins on a fresh state_dir: 8 s of two cores)."""
        template = await self._template(size)
        scratch = f"{path}.making-{os.getpid()}"
        try:
            await asyncio.to_thread(_sparse_copy, template, scratch, size)
            os.rename(scratch, path)
        finally:
            if os.path.exists(scratch):
                os.unlink(scratch)
        log.info("made a disk of %d MB for the plugin at %s", size // 2**20, path)

    async def _template(self, size: int) -> str:
        # in a directory of its own: no plugin's image (NAME.img beside it) can be one
        template = os.path.join(self._dir, "templates", f"empty-{size}.img")
        async with self._making.setdefault(size, asyncio.Lock()):
            if not os.path.exists(template):
                os.makedirs(os.path.dirname(template), mode=0o700, exist_ok=True)
                scratch = f"{template}.making-{os.getpid()}"
                fd = os.open(scratch, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
                try:
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
                try:
                    await _run([self._mkfs or "mkfs.ext4", *MKFS_OPTIONS, scratch])
                    os.rename(scratch, template)
                finally:
                    if os.path.exists(scratch):
                        os.unlink(scratch)
        return template

    async def _grow(self, path: str, size: int) -> None:
        if self._resize is None:
            log.warning("%s is smaller than its disk_mb and resize2fs is not installed: kept as it is", path)
            return
        os.truncate(path, size)
        await _run([self._resize, "-f", path])
        log.info("grew %s to %d MB", path, size // 2**20)


def _sparse_copy(source: str, target: str, size: int) -> None:
    """`source`'s data extents into a new sparse file of `size` bytes (holes stay holes)."""
    with open(source, "rb") as src, open(target, "xb") as dst:
        os.fchmod(dst.fileno(), 0o600)
        os.ftruncate(dst.fileno(), size)
        end_of_file = os.fstat(src.fileno()).st_size
        offset = 0
        while offset < end_of_file:
            try:
                start = os.lseek(src.fileno(), offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after offset
                    break
                raise
            stop = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            while start < stop:
                copied = os.copy_file_range(src.fileno(), dst.fileno(), stop - start, start, start)
                if copied <= 0:
                    raise OSError(errno.EIO, f"copying {source} stopped at {start}")
                start += copied
            offset = stop


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _attached(path: str) -> bool:
    """Is a loop device (a launcher's, maybe a dying host's) backed by this image?"""
    identity = os.stat(path)
    for backing_file in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(backing_file) as f:
                st = os.stat(f.read().strip().removesuffix(" (deleted)"))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (identity.st_dev, identity.st_ino):
            return True
    return False


async def _run(argv: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, preexec_fn=die_with_host())
    output, _ = await proc.communicate()
    if proc.returncode != 0:
        raise OSError(0, f"{os.path.basename(argv[0])} failed: {' '.join(output.decode(errors='replace').split())}")
