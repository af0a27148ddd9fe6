"""Whether ``fsync`` buys anything in a folder, decided once per store.

The state folder belongs on tmpfs (``/run``): there every file lives in the page cache only,
which a crashed or killed driver does not take with it, and which a crashed machine loses
entirely (kubelet then starts the pods again). ``fsync`` on tmpfs returns at once and adds
nothing but syscalls to every publish. On a disk the crash guarantees of the metadata and of
the atomic file swap need it, so it is kept there, and wherever the filesystem's type cannot
be told.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
_MEMORY_ONLY = frozenset({TMPFS_MAGIC, RAMFS_MAGIC})
_STATFS_SIZE = 256  # struct statfs is 120 bytes on 64-bit Linux; room to spare


def filesystem_type(path: str | os.PathLike[str]) -> int | None:
    """statfs(2)'s ``f_type`` for the filesystem ``path`` is on; None if it cannot be read."""
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(_STATFS_SIZE)
    if libc.statfs(os.fsencode(path), buffer) != 0:
        return None
    # f_type is the first member, a long (__fsword_t) but on s390x; a misread there only
    # keeps fsync on (no magic matches).
    return ctypes.c_ulong.from_buffer(buffer).value & 0xFFFFFFFF


def fsync_needed(path: str | os.PathLike[str]) -> bool:
    """False when ``path`` is on tmpfs or ramfs (memory only), True otherwise."""
    return filesystem_type(path) not in _MEMORY_ONLY


def fsync_dir(path: Path | str) -> None:
    """Make a folder's entries (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["RAMFS_MAGIC", "TMPFS_MAGIC", "filesystem_type", "fsync_dir", "fsync_needed"]
