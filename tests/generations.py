"""Reading a volume's files the way a pod does: one whole generation at a time."""

from __future__ import annotations

import os
from pathlib import Path

from trio_spirecsi.storage.writer import DATA_LINK


def read_current(data_dir: Path) -> dict[str, bytes]:
    """The files of the generation ``..data`` points at, all from that one generation.

    Raises FileNotFoundError when nothing was ever written.
    """
    for _ in range(1000):
        try:
            generation = os.readlink(data_dir / DATA_LINK)
            fd = os.open(data_dir / generation, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            if os.path.lexists(data_dir / DATA_LINK):
                continue
            raise
        try:
            result = {}
            for name in os.listdir(fd):
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                with os.fdopen(os.open(name, flags, dir_fd=fd), "rb") as fh:
                    result[name] = fh.read()
        except FileNotFoundError:
            continue
        finally:
            os.close(fd)
        # A generation is removed only after ..data moved away from it: if ..data still
        # points at it, nothing was removed while we read.
        if os.readlink(data_dir / DATA_LINK) == generation:
            return result
    raise TimeoutError(f"{data_dir}: the files changed on every one of 1000 reads")
