"""fsync where it makes writes durable (a disk), none where it cannot (tmpfs)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import open_node, read_identity
from trio_spirecsi.storage import FileContent, MetadataStore, write_atomically
from trio_spirecsi.storage.metadata import VolumeMetadata
from trio_spirecsi.storage.sync import TMPFS_MAGIC, filesystem_type, fsync_needed

MEMORY_ONLY = ("tmpfs", "ramfs")
FILES = {
    "svid.pem": FileContent(b"cert", 0o644),
    "svid_key.pem": FileContent(b"key", 0o600),
}


def mounted_type(path: Path) -> str:
    """The filesystem type mountinfo shows for the mount ``path`` is on (not statfs)."""
    best, kind = "", ""
    real = os.path.realpath(path)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        head, _, tail = line.partition(" - ")
        point = head.split(" ")[4].encode().decode("unicode_escape")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, tail.split(" ")[0]
    return kind


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A folder on a filesystem that keeps data across a reboot."""
    if mounted_type(tmp_path) in MEMORY_ONLY:
        pytest.fail(f"{tmp_path} is on {mounted_type(tmp_path)}: run with TMPDIR on a disk")
    return tmp_path


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every descriptor fsync is called on, in order."""
    calls: list[int] = []
    real: Callable[[int], None] = os.fsync

    def counted(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counted)
    return calls


def _md(volume_id: str = "csi-1") -> VolumeMetadata:
    return VolumeMetadata(volume_id, "/var/lib/kubelet/pods/u/mount", {}, "", "node", 1.0)


def test_tmpfs_is_told_from_a_disk_filesystem(tmpfs: Path, disk: Path) -> None:
    assert filesystem_type(tmpfs) == TMPFS_MAGIC
    assert not fsync_needed(tmpfs)
    assert fsync_needed(disk)
    assert filesystem_type(disk / "missing") is None
    assert fsync_needed(disk / "missing")  # unknown: keep fsync


def test_on_tmpfs_metadata_and_files_are_written_without_fsync(
    tmpfs: Path, fsyncs: list[int]
) -> None:
    store = MetadataStore(tmpfs / "state")
    assert store.fsync is False
    store.write(_md())
    write_atomically(store.data_dir("csi-1"), FILES, gid=None, fsync=store.fsync)
    write_atomically(
        store.data_dir("csi-1"), {"a": FileContent(b"2", 0o644)}, gid=None, fsync=False
    )
    store.remove("csi-1")
    assert fsyncs == []
    # The choice is the caller's: asked to, the writer fsyncs on tmpfs too.
    write_atomically(tmpfs / "other", FILES, gid=None)
    assert len(fsyncs) == len(FILES) + 2


def test_on_a_disk_every_file_and_folder_is_fsynced(disk: Path, fsyncs: list[int]) -> None:
    store = MetadataStore(disk / "state")
    assert store.fsync is True
    store.write(_md())
    # The record, its folder and (new folder) the state folder.
    assert len(fsyncs) == 3
    fsyncs.clear()
    write_atomically(store.data_dir("csi-1"), FILES, gid=None, fsync=store.fsync)
    # Each file, the generation folder, the data folder.
    assert len(fsyncs) == len(FILES) + 2
    fsyncs.clear()
    write_atomically(store.data_dir("csi-1"), {"a": FileContent(b"2", 0o644)}, gid=None)
    assert len(fsyncs) >= 3
    fsyncs.clear()
    store.remove("csi-1")
    assert len(fsyncs) == 1


@pytest.mark.parametrize("where", ["tmpfs", "disk"])
async def test_the_driver_fsyncs_a_volume_only_when_its_state_folder_is_on_a_disk(
    where: str, request: pytest.FixtureRequest, fsyncs: list[int]
) -> None:
    base: Path = request.getfixturevalue(where)
    async with open_node(base / "node") as node:
        await node.start_driver(state_dir=base / "state")
        pod = node.pod()
        fsyncs.clear()
        _volume_id, target = await node.publish(pod)
        assert read_identity(target).key_matches
        if where == "tmpfs":
            assert fsyncs == []
        else:
            # metadata (record, folder, state folder) and files (each, generation, folder)
            assert len(fsyncs) >= 3 + 3 + 2
