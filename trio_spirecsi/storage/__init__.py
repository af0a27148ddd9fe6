"""Volume state on disk: metadata per volume, atomically written files, read-only mounts, and
kubelet target paths resolved without following symlinks.

Plain synchronous functions: fast syscalls on tmpfs, called directly from the Trio thread.
"""

from trio_spirecsi.storage.errors import MountError, StorageError
from trio_spirecsi.storage.metadata import (
    LoadResult,
    MetadataError,
    MetadataStore,
    VolumeMetadata,
)
from trio_spirecsi.storage.mount import LinuxMounter, Mounter, UnmountResult
from trio_spirecsi.storage.paths import TargetDir, TargetParentMissing, open_target
from trio_spirecsi.storage.writer import FileContent, write_atomically

__all__ = [
    "FileContent",
    "LinuxMounter",
    "LoadResult",
    "MetadataError",
    "MetadataStore",
    "MountError",
    "Mounter",
    "StorageError",
    "TargetDir",
    "TargetParentMissing",
    "UnmountResult",
    "VolumeMetadata",
    "open_target",
    "write_atomically",
]
