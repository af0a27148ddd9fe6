"""The storage layer's failures: typed, each with a message that names the path and the reason.

Both are ``OSError`` subclasses (``errno`` is the kernel's, or the one that fits best), so
callers that already catch ``OSError`` keep working; nothing in :mod:`trio_spirecsi.storage`
lets a bare ``OSError`` escape for an expected failure.
"""

from __future__ import annotations

import os


class StorageError(OSError):
    """The store or a path walk refused or failed an operation (the message says why)."""


class MountError(OSError):
    """A mount or unmount failed; ``errno`` is the kernel's, the message names the paths."""

    def __init__(self, err: int, what: str) -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")


__all__ = ["MountError", "StorageError"]
