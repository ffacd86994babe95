"""A plugin's disk: its ext4 image on a loop device, mounted once as a detached mount.

The launcher (the worker template, or a spawned worker's parent) keeps the detached mount's
descriptor for as long as it lives; each worker puts a copy of it at its data directory
(namespaces.py). Nothing is mounted in the host's namespace, so nothing is left behind: when the
launcher and its workers are gone, the last reference goes, the kernel unmounts the file system and
the loop device, set to clear itself, detaches. The file system's size is the plugin's disk
ceiling, kernel-enforced (ENOSPC), instead of a poll that a fast writer outruns.

One image must never be mounted twice at once (two ext4 instances on one file corrupt it). The loop
device is given an open file of the image on which an exclusive flock() is taken: the lock goes with
that open file, which the loop device holds until it detaches, so whoever attaches the image next
(another host on the same state_dir, a standalone call, this launcher again) waits until the last
attachment is really gone, however it ended. An image attached by a host without the lock is waited
for as it was before: a scan of the loop devices, once per launcher.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import struct
import time

from . import linux

__all__ = ["attach_disk", "DiskError", "DiskBusy"]

LOOP_CTL_GET_FREE, LOOP_CONFIGURE = 0x4C82, 0x4C0A
LO_FLAGS_AUTOCLEAR = 4
LOOP_ATTEMPTS = 20  # free devices taken by someone else between asking and configuring
LOOP_INFO64_SIZE = 232
LO_FLAGS_OFFSET = 52  # in struct loop_info64, after five u64 and three u32
SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 430, 431, 432
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 0, 1, 6
FSMOUNT_CLOEXEC = 1
MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 0x2, 0x4, 0x8
AT_EMPTY_PATH = 0x1000
BUSY_WAIT_SECONDS = 3.0


# Failures another try may cure (the kernel short of memory a moment): the worker does not start
# this time, and its restart policy tries again, as for an image still attached elsewhere.
TRANSIENT = frozenset({errno.EBUSY, errno.ENOMEM, errno.EAGAIN, errno.EINTR})


class _MachineCannot(OSError):
    """A step that fails on a machine that cannot attach disks at all, whatever the image: the loop
    devices (none, or no right to them: a container), LOOP_CONFIGURE (Linux 5.8), ext4 itself."""


class DiskError(Exception):
    """The disk could not be attached; the message says why. Where the machine cannot attach disks
    at all (`unsupported`), the worker runs on a plain directory and reports the disk-quota layer
    missing, as where the host makes no images; otherwise it does not start: its files are on that
    disk, and without it nothing would bound what it writes to the host's."""

    def __init__(self, message: str, unsupported: bool = False) -> None:
        super().__init__(message)
        self.unsupported = unsupported

    def setting(self) -> str:
        """What the worker is told of its disk (protocol.DISK_KEY): "error:" a missing layer, "failed:"
        a refusal."""
        return f"{'error' if self.unsupported else 'failed'}:{self}"


class DiskBusy(DiskError):
    """The image is attached elsewhere still: the worker does not start (without its disk, its
    files would be elsewhere, and it would have no ceiling)."""


def attach_disk(image: str, uid: int) -> int:
    """A detached mount of `image`, its root owned by `uid`; the caller keeps the descriptor.
    Which step failed decides what the failure is (an errno alone does not: EINVAL is an old
    kernel's answer to LOOP_CONFIGURE and ext4's to an image that is no file system)."""
    try:
        _wait_until_free(image)
        loop = _attach_loop(image)
        try:
            mount_fd = _mount_ext4(f"/dev/loop{loop[0]}")
        finally:
            os.close(loop[1])  # the mount holds the device now; autoclear detaches it after
        if uid >= 0:
            try:
                # The root directory only, through the mount itself: never a walk of what the plugin wrote.
                _fchown_empty_path(mount_fd, uid)
            except OSError:
                os.close(mount_fd)  # else the template would keep it, and the image, for good
                raise
        return mount_fd
    except _MachineCannot as exc:
        raise DiskError(f"cannot attach {image}: this machine cannot attach disks: {exc.strerror or exc}",
                        unsupported=True) from None
    except OSError as exc:
        kind = DiskBusy if exc.errno in TRANSIENT else DiskError
        raise kind(f"cannot attach {image}: {exc.strerror or exc}") from None


def _wait_until_free(image: str) -> None:
    """An image still attached (by a worker or template of a host that is ending) must not be
    mounted a second time. Which images back a loop device is read once per process: a scan per
    attach cost 10 ms with 500 loop devices, and made 500 plugins start three times slower. Only an
    image attached then is waited for here (by a host without the lock); the image's lock waits
    for every attachment made since."""
    global _busy_at_start
    st = os.stat(image)
    identity = (st.st_dev, st.st_ino)
    if _busy_at_start is None:
        _busy_at_start = set(_backing_identities())
    if identity not in _busy_at_start:
        return
    deadline = time.monotonic() + BUSY_WAIT_SECONDS
    while identity in _backing_identities():
        if time.monotonic() > deadline:
            raise OSError(errno.EBUSY, "attached elsewhere (another host on this state_dir, or a standalone "
                                       "call, or a worker that has not ended), and still attached (device busy)")
        time.sleep(0.01)
    _busy_at_start.discard(identity)


_busy_at_start: set[tuple[int, int]] | None = None


def _backing_identities() -> list[tuple[int, int]]:
    """(device, inode) of the file behind each attached loop device."""
    found = []
    for path in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(path) as f:
                backing = f.read().strip().removesuffix(" (deleted)")
            st = os.stat(backing)
        except OSError:
            continue
        found.append((st.st_dev, st.st_ino))
    return found


def _attach_loop(image: str) -> tuple[int, int]:
    """A loop device backed by `image`. LOOP_CTL_GET_FREE hands the same free device to everyone who
    asks at that moment (two workers starting at once, on this host or another): whoever configures
    it second gets EBUSY, and asks again, as losetup does."""
    backing = os.open(image, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        _lock(backing)
        for attempt in range(LOOP_ATTEMPTS):
            number, device = _free_loop()
            try:
                info = bytearray(LOOP_INFO64_SIZE)
                struct.pack_into("=I", info, LO_FLAGS_OFFSET, LO_FLAGS_AUTOCLEAR)
                fcntl.ioctl(device, LOOP_CONFIGURE, struct.pack("=II", backing, 0) + bytes(info) + bytes(64))
                return number, device
            except OSError as exc:
                os.close(device)
                if exc.errno in (errno.EINVAL, errno.ENOTTY):  # a kernel before 5.8: no LOOP_CONFIGURE
                    raise _MachineCannot(exc.errno, f"LOOP_CONFIGURE: {exc.strerror}") from None
                if exc.errno != errno.EBUSY or attempt == LOOP_ATTEMPTS - 1:
                    raise
            except BaseException:
                os.close(device)
                raise
        raise AssertionError("unreachable")
    finally:
        os.close(backing)


def _lock(backing: int) -> None:
    """The image's exclusive lock, held by the open file the loop device is about to take."""
    deadline = time.monotonic() + BUSY_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(backing, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise OSError(errno.EBUSY, "attached elsewhere (another host on this state_dir, or a standalone "
                                           "call), and still attached (device busy)") from None
            time.sleep(0.01)


def _free_loop() -> tuple[int, int]:
    try:
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
        finally:
            os.close(control)
        return number, os.open(f"/dev/loop{number}", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in TRANSIENT:
            raise
        raise _MachineCannot(exc.errno, f"loop devices: {exc.strerror}") from None


def _mount_ext4(device: str) -> int:
    try:
        fs = linux.check(linux.libc.syscall(SYS_FSOPEN, b"ext4", FSMOUNT_CLOEXEC), "fsopen ext4")
    except OSError as exc:  # no ext4 in this kernel, no new mount API, or no right to mount
        raise _MachineCannot(exc.errno, str(exc)) from None
    try:
        linux.check(linux.libc.syscall(SYS_FSCONFIG, fs, FSCONFIG_SET_STRING, b"source", device.encode(), 0),
                    "fsconfig source")
        # No background zeroing of inode tables: the image stays as sparse as what was written.
        linux.check(linux.libc.syscall(SYS_FSCONFIG, fs, FSCONFIG_SET_FLAG, b"noinit_itable", None, 0),
                    "fsconfig noinit_itable")
        linux.check(linux.libc.syscall(SYS_FSCONFIG, fs, FSCONFIG_CMD_CREATE, None, None, 0), "fsconfig create")
        return linux.check(linux.libc.syscall(SYS_FSMOUNT, fs, FSMOUNT_CLOEXEC,
                                              MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC), "fsmount")
    finally:
        os.close(fs)


def _fchown_empty_path(fd: int, uid: int) -> None:
    linux.check(linux.libc.fchownat(fd, b"", uid, uid, AT_EMPTY_PATH), "chown of the disk's root")
