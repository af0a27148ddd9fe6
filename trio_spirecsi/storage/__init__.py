"""Volume state on disk: metadata per volume, atomically written files, read-only mounts.

Plain synchronous functions: fast syscalls on tmpfs, called directly from the Trio thread.
"""

from trio_spirecsi.storage.metadata import (
    LoadResult,
    MetadataError,
    MetadataStore,
    StorageError,
    VolumeMetadata,
)
from trio_spirecsi.storage.mount import FakeMounter, LinuxMounter, Mounter, MountError
from trio_spirecsi.storage.writer import FileContent, write_atomically

__all__ = [
    "FakeMounter",
    "FileContent",
    "LinuxMounter",
    "LoadResult",
    "MetadataError",
    "MetadataStore",
    "MountError",
    "Mounter",
    "StorageError",
    "VolumeMetadata",
    "write_atomically",
]
