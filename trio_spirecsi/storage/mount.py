"""Read-only bind mounts of a volume's data folder onto the kubelet's target path.

Synchronous syscalls (mount(2), umount2(2) through libc); callers in Trio run them directly,
they are fast. :class:`FakeMounter` keeps the same contract in memory for unit tests.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from trio_spirecsi.log import event
from trio_spirecsi.storage.errors import MountError

log = logging.getLogger(__name__)

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MNT_DETACH = 0x2

_READONLY_REMOUNT = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
_MAX_LAYERS = 32
MOUNTINFO = Path("/proc/self/mountinfo")


class Mounter(Protocol):
    def bind_readonly(self, source: Path, target: Path) -> None:
        """Make ``source`` visible read-only (nosuid, nodev, noexec) at ``target``."""

    def unmount(self, target: Path) -> None:
        """Remove every mount at ``target``; a target that is not mounted or missing is fine."""

    def is_mounted(self, target: Path) -> bool:
        """True when something is mounted exactly at ``target``."""

    def mount_points(self) -> frozenset[Path]:
        """Every mount point (real paths), read once: for checking many targets at a time."""


def _unescape(field: bytes) -> bytes:
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo: the filesystem's device, the mounted path inside that
    filesystem (``root``; a bind mount's source) and where it is mounted."""

    device: tuple[int, int]
    root: Path
    mount_point: Path


def mount_table(mountinfo: Path = MOUNTINFO) -> list[MountInfo]:
    """The mounts of this process' namespace, in mountinfo order (octal escapes decoded)."""
    table = []
    for line in mountinfo.read_bytes().splitlines():
        fields = line.split(b" ")
        if len(fields) < 5:
            continue
        major, _, minor = fields[2].partition(b":")
        table.append(
            MountInfo(
                device=(int(major), int(minor)),
                root=Path(os.fsdecode(_unescape(fields[3]))),
                mount_point=Path(os.fsdecode(_unescape(fields[4]))),
            )
        )
    return table


class LinuxMounter:
    """mount(2) / umount2(2) through libc; needs CAP_SYS_ADMIN in the mount namespace.

    A bind mount shows the source files with their own SELinux labels (the kernel ignores
    ``context=`` on bind mounts), so labelling is the writer's job: see
    ``write_atomically(selinux_context=...)``.
    """

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        self._libc.mount.restype = ctypes.c_int
        self._libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self._libc.umount2.restype = ctypes.c_int

    def _mount(self, source: bytes | None, target: Path, flags: int, data: bytes | None) -> int:
        if self._libc.mount(source, os.fsencode(target), None, flags, data) == 0:
            return 0
        return ctypes.get_errno()

    def _umount(self, target: Path, flags: int) -> int:
        if self._libc.umount2(os.fsencode(target), flags) == 0:
            return 0
        return ctypes.get_errno()

    def bind_readonly(self, source: Path, target: Path) -> None:
        err = self._mount(os.fsencode(source), target, MS_BIND, None)
        if err:
            raise MountError(err, f"bind mount {source} -> {target}")
        err = self._mount(os.fsencode(source), target, _READONLY_REMOUNT, None)
        if err:
            undo = self._umount(target, 0)
            if undo:
                self._umount(target, MNT_DETACH)
            raise MountError(err, f"read-only remount of {target} (bind of {source}, undone)")

    def unmount(self, target: Path) -> None:
        for _ in range(_MAX_LAYERS):
            err = self._umount(target, 0)
            if err in (errno.EINVAL, errno.ENOENT):
                return
            if err == errno.EBUSY:
                event(log, logging.WARNING, "unmount_busy_detaching", target=str(target))
                err = self._umount(target, MNT_DETACH)
            if err:
                raise MountError(err, f"unmount {target}")
        raise MountError(errno.EBUSY, f"unmount {target}: more than {_MAX_LAYERS} mounts stacked")

    def is_mounted(self, target: Path) -> bool:
        try:
            real = Path(os.path.realpath(target, strict=True))
        except OSError:
            return False
        return any(m.mount_point == real for m in mount_table())

    def mount_points(self) -> frozenset[Path]:
        return frozenset(m.mount_point for m in mount_table())


class FakeMounter:
    """In-memory mounter with the same contract, for fast tests of the modules above storage.

    ``mounts`` maps target to source. Put an errno in ``errors[op]`` (``"bind_readonly"`` or
    ``"unmount"``) to make the next call of that operation fail with :class:`MountError`.
    """

    def __init__(self) -> None:
        self.mounts: dict[Path, Path] = {}
        self.errors: dict[str, int] = {}

    def _fail(self, op: str, what: str) -> None:
        err = self.errors.pop(op, 0)
        if err:
            raise MountError(err, what)

    def bind_readonly(self, source: Path, target: Path) -> None:
        self._fail("bind_readonly", f"bind mount {source} -> {target}")
        for path in (source, target):
            if not path.is_dir():
                raise MountError(errno.ENOENT, f"bind mount {source} -> {target}: {path}")
        self.mounts[Path(os.path.abspath(target))] = Path(os.path.abspath(source))

    def unmount(self, target: Path) -> None:
        self._fail("unmount", f"unmount {target}")
        self.mounts.pop(Path(os.path.abspath(target)), None)

    def is_mounted(self, target: Path) -> bool:
        return Path(os.path.abspath(target)) in self.mounts

    def mount_points(self) -> frozenset[Path]:
        return frozenset(self.mounts)
