"""Faults of a node's disk, for tests that inject them: a folder made read-only, a tmpfs
filled to its last byte. Both are undone on exit, and both check that the fault holds (a
write really fails) before the test goes on."""

from __future__ import annotations

import contextlib
import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostile.node import MIB


@contextlib.contextmanager
def read_only(volume_dir: Path) -> Iterator[None]:
    """``volume_dir`` bind-mounted read-only onto itself (writes fail EROFS) until exit.
    Mounts inside it come along as they are (a writable one stays writable)."""
    subprocess.run(["mount", "--rbind", str(volume_dir), str(volume_dir)], check=True)
    try:
        subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(volume_dir), str(volume_dir)], check=True
        )
        probe = volume_dir / ".probe"
        with pytest.raises(OSError) as info:
            probe.write_bytes(b"")
        assert info.value.errno == errno.EROFS
        yield
    finally:
        subprocess.run(["umount", "-R", str(volume_dir)], check=True)


@contextlib.contextmanager
def full(state_dir: Path) -> Iterator[None]:
    """The tmpfs holding ``state_dir`` filled to the last byte until exit."""
    filler = state_dir / ".fill"
    chunk = bytes(MIB)
    try:
        with open(filler, "wb", buffering=0) as f:
            with contextlib.suppress(OSError):
                while True:
                    f.write(chunk)
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 512)
        with pytest.raises(OSError) as info:
            (state_dir / ".probe").write_bytes(b"x" * 4096)
        assert info.value.errno == errno.ENOSPC
        yield
    finally:
        filler.unlink(missing_ok=True)
        (state_dir / ".probe").unlink(missing_ok=True)
