"""Read-only bind mounts of a volume's data folder onto a held kubelet target, and their removal.

Everything goes through descriptors, never through a path resolved again: the source is opened
with no symlink followed in any component, the target through the parent folder that
:func:`~trio_spirecsi.storage.paths.open_target` holds. With the new mount API (Linux 5.12+:
open_tree, mount_setattr, move_mount) the mount is read-only, nosuid, nodev and noexec before
it becomes visible; older kernels get MS_BIND then MS_REMOUNT|MS_RDONLY, the remount through a
descriptor of the new mount.

Unmounting removes only the driver's own mounts: a mount at the target is ours when its root
is the volume's data folder (same device and inode, or same device and mountinfo ``root``,
which also recognises a data folder deleted while mounted). Synchronous syscalls: callers in
Trio run them directly, they are fast.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, Protocol

from trio_spirecsi.log import event
from trio_spirecsi.storage.errors import MountError
from trio_spirecsi.storage.paths import PathRefused, TargetDir, split_absolute, walk

log = logging.getLogger(__name__)

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# The new mount API: one syscall numbering on every architecture but alpha.
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 0x1
AT_EMPTY_PATH = 0x1000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8

_READONLY_REMOUNT = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
_READONLY_ATTRS = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC
_MAX_LAYERS = 32
_DELETED = b"//deleted"
MOUNTINFO = Path("/proc/self/mountinfo")

MountApi = Literal["auto", "new", "classic"]


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _unescape(field: bytes) -> bytes:
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo: the filesystem's device, the mounted path inside that
    filesystem (``root``; a bind mount's source, ``root_deleted`` when that folder has been
    deleted since), where it is mounted, its id and the id of the mount it sits on."""

    device: tuple[int, int]
    root: Path
    mount_point: Path
    mount_id: int = 0
    parent_id: int = 0
    root_deleted: bool = False


def mount_table(mountinfo: Path = MOUNTINFO) -> list[MountInfo]:
    """The mounts of this process' namespace, in mountinfo order (octal escapes decoded)."""
    table = []
    for line in mountinfo.read_bytes().splitlines():
        fields = line.split(b" ")
        if len(fields) < 5:
            continue
        major, _, minor = fields[2].partition(b":")
        root = _unescape(fields[3])
        deleted = root.endswith(_DELETED)
        table.append(
            MountInfo(
                device=(int(major), int(minor)),
                root=Path(os.fsdecode(root[: -len(_DELETED)] if deleted else root) or "/"),
                mount_point=Path(os.fsdecode(_unescape(fields[4]))),
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                root_deleted=deleted,
            )
        )
    return table


def mount_id(fd: int) -> int:
    """The id (mountinfo's first field) of the mount a descriptor is on."""
    try:
        info = os.open(f"/proc/self/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            text = os.read(info, 4096)
        finally:
            os.close(info)
    except OSError as exc:
        raise MountError(exc.errno or errno.EIO, f"reading /proc/self/fdinfo/{fd}") from None
    for line in text.splitlines():
        if line.startswith(b"mnt_id:"):
            return int(line.split()[1])
    raise MountError(errno.ENOSYS, f"/proc/self/fdinfo/{fd} has no mnt_id")


def _open_root() -> int:
    return os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def open_folder(path: Path, what: str) -> int | None:
    """An ``O_PATH`` descriptor of the folder ``path``, following no symlink in any component;
    None if it does not exist. A symlink or file on the way raises MountError naming it."""
    try:
        parts = split_absolute(path)
    except ValueError as exc:
        raise MountError(errno.EINVAL, f"{what}: {exc}") from None
    root = _open_root()
    try:
        return walk(root, parts)
    except PathRefused as exc:
        if exc.errno == errno.ENOENT:
            return None
        component = "/" + "/".join(parts[: max(exc.index, 0) + 1])
        raise MountError(exc.errno, f"{what}: {component} {exc.reason}") from None
    finally:
        os.close(root)


def fs_location(
    path: Path, table: Sequence[MountInfo] | None = None
) -> tuple[tuple[int, int], Path] | None:
    """The filesystem ``path`` is on and where inside it: the ``(device, root)`` a bind mount
    of ``path`` shows in mountinfo. A missing folder is placed by its nearest existing
    ancestor. None when it cannot be placed (a symlink on the way, an unknown mount)."""
    try:
        parts = split_absolute(path)
    except ValueError:
        return None
    missing: tuple[str, ...] = ()
    root = _open_root()
    try:
        try:
            fd = walk(root, parts)
        except PathRefused as exc:
            if exc.errno != errno.ENOENT or exc.index < 0:
                return None
            fd, missing = walk(root, parts[: exc.index]), parts[exc.index :]
    except PathRefused:
        return None
    finally:
        os.close(root)
    try:
        mnt = mount_id(fd)
    finally:
        os.close(fd)
    entry = next((e for e in table or mount_table() if e.mount_id == mnt), None)
    here = PurePosixPath("/", *parts[: len(parts) - len(missing)])
    if entry is None or not here.is_relative_to(entry.mount_point):
        return None
    return entry.device, Path(entry.root, here.relative_to(entry.mount_point), *missing)


@dataclass(frozen=True)
class UnmountResult:
    """What :meth:`Mounter.unmount` did at a target: ``removed`` of the driver's mounts taken
    off; ``foreign`` mounts found there that are not the driver's, left in place (topmost
    first); ``ours_left`` of the driver's mounts still there under a foreign one (left in
    place: taking them off would take the foreign one too)."""

    removed: int = 0
    foreign: tuple[MountInfo, ...] = ()
    ours_left: int = 0

    @property
    def clean(self) -> bool:
        """True when nothing is mounted at the target any more."""
        return not self.foreign and not self.ours_left

    def describe(self) -> str:
        """One line for a log or an error message."""
        found = ", ".join(f"{m.device[0]}:{m.device[1]} {m.root}" for m in self.foreign)
        return (
            f"removed {self.removed} of the driver's mounts; left {len(self.foreign)} foreign "
            f"mount(s) [{found}] and {self.ours_left} of the driver's under them"
        )


class Mounter(Protocol):
    """The three operations the registry needs; an in-memory version only has to key mounts
    by ``target.path`` and check that ``source`` is a folder."""

    def bind_readonly(self, source: Path, target: TargetDir) -> None:
        """Make the folder ``source`` visible read-only (nosuid, nodev, noexec) at ``target``,
        creating the target folder (0750) if missing. Raises MountError (paths and reason);
        InvalidArgument if the target is not a folder, or its path no longer leads to the held
        folder (:meth:`TargetDir.verify`). The mount lands in the held folder, whatever
        happens to the path meanwhile."""

    def unmount(self, target: TargetDir, source: Path) -> UnmountResult:
        """Take the driver's mounts of ``source`` off ``target``, topmost first, never a mount
        that is not a bind of ``source`` (nor one stacked over it). A missing target, or
        nothing mounted, is success; a busy mount is detached lazily. Raises InvalidArgument
        if the target is now a symlink or a file, MountError if the kernel refuses."""

    def is_mounted(self, target: TargetDir, source: Path) -> bool:
        """True when the topmost mount at ``target`` is a bind of ``source``."""


class _Source:
    """The folder whose bind mounts are ours: its inode, and (read lazily) where it is."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        fd = open_folder(path, what)
        self.ident: tuple[int, int] | None = None
        if fd is not None:
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            self.ident = (st.st_dev, st.st_ino)
        self._location: tuple[tuple[int, int], Path] | None = None

    def is_root_of(self, st: os.stat_result) -> bool:
        return self.ident == (st.st_dev, st.st_ino)

    def matches(self, entry: MountInfo, table: Sequence[MountInfo]) -> bool:
        if self._location is None:
            self._location = fs_location(self.path, table)
        return self._location == (entry.device, entry.root)


def _fd_path(fd: int) -> bytes:
    return f"/proc/self/fd/{fd}".encode()


def _layers(top: int, table: Sequence[MountInfo]) -> list[MountInfo]:
    """The mounts stacked at one place, topmost first, starting from mount ``top``."""
    by_id = {entry.mount_id: entry for entry in table}
    layers: list[MountInfo] = []
    layer = by_id.get(top)
    while layer is not None and len(layers) < _MAX_LAYERS:
        layers.append(layer)
        below = by_id.get(layer.parent_id)
        if below is None or below is layer or below.mount_point != layer.mount_point:
            break
        layer = below
    return layers


class LinuxMounter:
    """The kernel's mounts; needs CAP_SYS_ADMIN in the mount namespace.

    ``api``: ``auto`` uses the new mount API and falls back for good to the classic one the
    first time the kernel (or a seccomp filter) refuses it; ``new`` and ``classic`` force one.

    A bind mount shows the source files with their own SELinux labels (the kernel ignores
    ``context=`` on bind mounts), so labelling is the writer's job: see
    ``write_atomically(selinux_context=...)``.
    """

    def __init__(self, api: MountApi = "auto") -> None:
        self.api: MountApi = api
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
        self._libc.syscall.restype = ctypes.c_long

    # Syscalls: 0 (or a descriptor) on success, else the errno (negated for descriptors).

    def _mount(self, source: bytes | None, target: bytes, flags: int) -> int:
        if self._libc.mount(source, target, None, flags, None) == 0:
            return 0
        return ctypes.get_errno()

    def _umount(self, target: bytes, flags: int) -> int:
        if self._libc.umount2(target, flags) == 0:
            return 0
        return ctypes.get_errno()

    def _open_tree(self, dirfd: int, flags: int) -> int:
        fd = self._libc.syscall(
            ctypes.c_long(SYS_OPEN_TREE), ctypes.c_int(dirfd), b"", ctypes.c_uint(flags)
        )
        return int(fd) if fd >= 0 else -ctypes.get_errno()

    def _mount_setattr(self, fd: int, attr_set: int) -> int:
        attr = _MountAttr(attr_set=attr_set)
        result = self._libc.syscall(
            ctypes.c_long(SYS_MOUNT_SETATTR),
            ctypes.c_int(fd),
            b"",
            ctypes.c_uint(AT_EMPTY_PATH),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        return 0 if result == 0 else ctypes.get_errno()

    def _move_mount(self, from_fd: int, to_fd: int) -> int:
        result = self._libc.syscall(
            ctypes.c_long(SYS_MOVE_MOUNT),
            ctypes.c_int(from_fd),
            b"",
            ctypes.c_int(to_fd),
            b"",
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
        )
        return 0 if result == 0 else ctypes.get_errno()

    # Mounting

    def bind_readonly(self, source: Path, target: TargetDir) -> None:
        what = f"bind mount {source} -> {target.path}"
        target.verify()
        src = open_folder(source, what)
        if src is None:
            raise MountError(errno.ENOENT, f"{what}: {source} does not exist")
        try:
            existed = target.created
            dst = target.open(create=True)
            assert dst is not None
            try:
                if self.api == "classic" or not self._bind_new(src, dst, what):
                    self._bind_classic(src, dst, target, what)
            except BaseException:
                os.close(dst)
                if target.created and not existed:
                    target.remove()
                raise
            os.close(dst)
        finally:
            os.close(src)

    def _fall_back(self, err: int, call: str) -> bool:
        """Whether to use the classic API from now on: the kernel lacks ``call`` (or a
        seccomp filter refuses open_tree with EPERM)."""
        unavailable = err == errno.ENOSYS or (call == "open_tree" and err == errno.EPERM)
        if self.api != "auto" or not unavailable:
            return False
        self.api = "classic"
        event(log, logging.WARNING, "mount_api_fallback", refused=call, error=os.strerror(err))
        return True

    def _bind_new(self, src: int, dst: int, what: str) -> bool:
        """open_tree + mount_setattr + move_mount; False if the kernel lacks them."""
        tree = self._open_tree(src, OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH)
        if tree < 0:
            if self._fall_back(-tree, "open_tree"):
                return False
            raise MountError(-tree, what)
        try:
            err = self._mount_setattr(tree, _READONLY_ATTRS)
            if err:
                if self._fall_back(err, "mount_setattr"):
                    return False
                raise MountError(err, f"{what} (making it read-only; nothing was mounted)")
            err = self._move_mount(tree, dst)
            if err:
                raise MountError(err, what)
        finally:
            os.close(tree)
        return True

    def _bind_classic(self, src: int, dst: int, target: TargetDir, what: str) -> None:
        """MS_BIND through both descriptors, then the read-only remount through a descriptor
        of the new mount; a failed remount detaches that mount again."""
        err = self._mount(_fd_path(src), _fd_path(dst), MS_BIND)
        if err:
            raise MountError(err, what)
        top = target.open()
        if top is None:
            raise MountError(errno.ENOENT, f"{what}: the target vanished while mounting")
        try:
            st, src_st = os.fstat(top), os.fstat(src)
            if mount_id(top) == mount_id(dst) or (st.st_dev, st.st_ino) != (
                src_st.st_dev,
                src_st.st_ino,
            ):
                raise MountError(errno.EBUSY, f"{what}: another mount covered it at once")
            err = self._mount(None, _fd_path(top), _READONLY_REMOUNT)
            if err:
                undo = self._umount(_fd_path(top), MNT_DETACH)
                done = "undone" if not undo else f"NOT undone: {os.strerror(undo)}"
                raise MountError(err, f"read-only remount of {target.path} ({what}, {done})")
        finally:
            os.close(top)

    # Unmounting

    def unmount(self, target: TargetDir, source: Path) -> UnmountResult:
        src = _Source(source, f"unmount {target.path}")
        removed = 0
        for _ in range(_MAX_LAYERS):
            fd = target.open()
            if fd is None:
                return UnmountResult(removed=removed)
            try:
                top = mount_id(fd)
                if top == mount_id(target.parent_fd):
                    return UnmountResult(removed=removed)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if not src.is_root_of(st):
                table = mount_table()
                layers = _layers(top, table)
                if not layers:
                    continue  # it went away meanwhile: look again
                ours = [src.matches(layer, table) for layer in layers]
                if not ours[0]:
                    result = UnmountResult(
                        removed=removed,
                        foreign=tuple(m for m, mine in zip(layers, ours, strict=True) if not mine),
                        ours_left=sum(ours),
                    )
                    event(
                        log,
                        logging.WARNING,
                        "unmount_left_foreign",
                        target=str(target.path),
                        result=result.describe(),
                    )
                    return result
            if self._unmount_top(target, top):
                removed += 1
        raise MountError(errno.EBUSY, f"unmount {target.path}: more than {_MAX_LAYERS} layers")

    def _unmount_top(self, target: TargetDir, top: int) -> bool:
        """Take mount ``top`` (ours, topmost at the target) off; False if it had gone."""
        # Through the held parent: a descriptor of the mount itself would keep it busy.
        err = self._umount(
            _fd_path(target.parent_fd) + b"/" + os.fsencode(target.name), UMOUNT_NOFOLLOW
        )
        if err == errno.EINVAL:
            return False
        if err == 0:
            fd = target.open()
            if fd is not None:
                try:
                    if mount_id(fd) == top:
                        raise MountError(
                            errno.EBUSY,
                            f"unmount {target.path}: a mount that appeared over the driver's "
                            "during the unmount was removed in its place",
                        )
                finally:
                    os.close(fd)
            return True
        if err != errno.EBUSY:
            raise MountError(err, f"unmount {target.path}")
        event(log, logging.WARNING, "unmount_busy_detaching", target=str(target.path))
        fd = target.open()
        if fd is None:
            return False
        try:
            if mount_id(fd) != top:
                return False  # the layers changed: the caller looks again
            err = self._umount(_fd_path(fd), MNT_DETACH)
        finally:
            os.close(fd)
        if err:
            raise MountError(err, f"detach {target.path}")
        return True

    def is_mounted(self, target: TargetDir, source: Path) -> bool:
        src = _Source(source, f"check the mount at {target.path}")
        if src.ident is None:
            return False
        fd = target.open()
        if fd is None:
            return False
        try:
            if mount_id(fd) == mount_id(target.parent_fd):
                return False
            return src.is_root_of(os.fstat(fd))
        finally:
            os.close(fd)


__all__ = [
    "LinuxMounter",
    "MountApi",
    "MountError",
    "MountInfo",
    "Mounter",
    "UnmountResult",
    "fs_location",
    "mount_id",
    "mount_table",
    "open_folder",
]
