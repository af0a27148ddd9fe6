"""Real bind mounts, inside the session's private mount namespace (see conftest.py)."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_spirecsi.storage import (
    FakeMounter,
    FileContent,
    LinuxMounter,
    MetadataStore,
    MountError,
    VolumeMetadata,
    write_atomically,
)
from trio_spirecsi.storage.mount import MS_REMOUNT, mount_table

NOBODY = 65534


@pytest.fixture
def mounter(private_mount_ns: None, tmp_path: Path) -> Iterator[LinuxMounter]:
    m = LinuxMounter()
    yield m
    for entry in reversed(mount_table()):
        if entry.mount_point.is_relative_to(tmp_path.resolve()):
            m.unmount(entry.mount_point)


def _source_and_target(base: Path) -> tuple[Path, Path]:
    source, target = base / "source", base / "target"
    source.mkdir()
    target.mkdir()
    (source / "svid.pem").write_bytes(b"certificate\n")
    return source, target


def _options(target: Path) -> set[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    (line,) = [ln for ln in lines if ln.split(" ")[4] == str(target)]
    return set(line.split(" ")[5].split(","))


def test_bind_readonly_shows_the_source_files_at_the_target(
    mounter: LinuxMounter, tmp_path: Path
) -> None:
    source, target = _source_and_target(tmp_path)
    assert not mounter.is_mounted(target)

    mounter.bind_readonly(source, target)

    assert mounter.is_mounted(target)
    assert not mounter.is_mounted(source)
    assert (target / "svid.pem").read_bytes() == b"certificate\n"
    (source / "svid.pem").write_bytes(b"renewed\n")
    assert (target / "svid.pem").read_bytes() == b"renewed\n"
    assert {"ro", "nosuid", "nodev", "noexec"} <= _options(target)


def test_writing_through_the_target_fails_with_erofs_even_as_root(
    mounter: LinuxMounter, tmp_path: Path
) -> None:
    source, target = _source_and_target(tmp_path)
    mounter.bind_readonly(source, target)

    for attempt in (
        lambda: (target / "new.pem").write_bytes(b"x"),
        lambda: (target / "svid.pem").write_bytes(b"x"),
        lambda: (target / "svid.pem").unlink(),
        lambda: (target / "svid.pem").chmod(0o777),
    ):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS
    assert (source / "svid.pem").read_bytes() == b"certificate\n"
    assert sorted(os.listdir(source)) == ["svid.pem"]


def test_programs_in_the_volume_cannot_be_executed(mounter: LinuxMounter, tmp_path: Path) -> None:
    source, target = _source_and_target(tmp_path)
    (source / "program").write_text("#!/bin/sh\nexit 0\n")
    (source / "program").chmod(0o755)
    mounter.bind_readonly(source, target)

    assert subprocess.run([source / "program"], check=False).returncode == 0
    with pytest.raises(PermissionError):
        subprocess.run([target / "program"], check=False)


def test_unmount_is_idempotent(mounter: LinuxMounter, tmp_path: Path) -> None:
    source, target = _source_and_target(tmp_path)
    mounter.bind_readonly(source, target)

    mounter.unmount(target)
    assert not mounter.is_mounted(target)
    assert os.listdir(target) == []
    mounter.unmount(target)
    assert not mounter.is_mounted(target)


def test_unmount_of_a_never_mounted_or_missing_target_succeeds(
    mounter: LinuxMounter, tmp_path: Path
) -> None:
    mounter.unmount(tmp_path)
    mounter.unmount(tmp_path / "does-not-exist")
    assert not mounter.is_mounted(tmp_path / "does-not-exist")


def test_unmount_removes_stacked_mounts(mounter: LinuxMounter, tmp_path: Path) -> None:
    source, target = _source_and_target(tmp_path)
    mounter.bind_readonly(source, target)
    mounter.bind_readonly(source, target)
    assert sum(m.mount_point == target for m in mount_table()) == 2

    mounter.unmount(target)

    assert not mounter.is_mounted(target)
    assert os.listdir(target) == []


@pytest.mark.parametrize("name", ["with space", "tab\there", "back\\slash", "new\nline"])
def test_paths_with_characters_that_mountinfo_escapes(
    mounter: LinuxMounter, tmp_path: Path, name: str
) -> None:
    base = tmp_path / name
    base.mkdir()
    source, target = _source_and_target(base)
    mounter.bind_readonly(source, target)

    assert mounter.is_mounted(target)
    assert (target / "svid.pem").read_bytes() == b"certificate\n"
    mounter.unmount(target)
    assert not mounter.is_mounted(target)


def test_is_mounted_resolves_symlinks_to_the_target(mounter: LinuxMounter, tmp_path: Path) -> None:
    source, target = _source_and_target(tmp_path)
    (tmp_path / "link").symlink_to(target)
    mounter.bind_readonly(source, tmp_path / "link")

    assert mounter.is_mounted(target)
    assert mounter.is_mounted(tmp_path / "link")


def test_bind_of_a_missing_source_fails_with_errno_and_paths(
    mounter: LinuxMounter, tmp_path: Path
) -> None:
    target = tmp_path / "target"
    target.mkdir()

    with pytest.raises(MountError) as info:
        mounter.bind_readonly(tmp_path / "missing", target)

    assert info.value.errno == errno.ENOENT
    assert str(tmp_path / "missing") in str(info.value)
    assert str(target) in str(info.value)
    assert not mounter.is_mounted(target)


class _RemountFails(LinuxMounter):
    def _mount(self, source: bytes | None, target: Path, flags: int, data: bytes | None) -> int:
        if flags & MS_REMOUNT:
            return errno.EPERM
        return super()._mount(source, target, flags, data)


def test_a_failed_readonly_remount_undoes_the_bind(mounter: LinuxMounter, tmp_path: Path) -> None:
    source, target = _source_and_target(tmp_path)

    with pytest.raises(MountError) as info:
        _RemountFails().bind_readonly(source, target)

    assert info.value.errno == errno.EPERM
    assert "read-only remount" in str(info.value)
    assert not mounter.is_mounted(target)
    assert os.listdir(target) == []


def test_busy_target_is_detached_lazily(
    mounter: LinuxMounter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source, target = _source_and_target(tmp_path)
    mounter.bind_readonly(source, target)
    holder = subprocess.Popen(["sleep", "600"], cwd=target)
    try:
        with caplog.at_level(logging.WARNING):
            mounter.unmount(target)
        assert not mounter.is_mounted(target)
        assert "unmount_busy_detaching" in caplog.messages
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()


def _read_as(path: Path, uid: int, gid: int) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["cat", str(path)], user=uid, group=gid, extra_groups=[], capture_output=True
    )


def test_pods_read_through_the_target_while_the_state_folder_stays_private(
    mounter: LinuxMounter, public_tmp: Path
) -> None:
    store = MetadataStore(public_tmp / "state")
    md = VolumeMetadata("csi-1", str(public_tmp / "target"), {}, "", "node-a", 1.0)
    store.write(md)
    files = {
        "svid.pem": FileContent(b"certificate\n", 0o644),
        "svid_key.pem": FileContent(b"key\n", 0o600),
    }
    write_atomically(store.data_dir("csi-1"), files, gid=None)
    target = public_tmp / "target"
    target.mkdir()

    mounter.bind_readonly(store.data_dir("csi-1"), target)
    try:
        assert _read_as(target / "svid.pem", NOBODY, NOBODY).stdout == b"certificate\n"
        assert _read_as(target / "svid_key.pem", NOBODY, NOBODY).returncode != 0
        direct = _read_as(store.data_dir("csi-1") / "svid.pem", NOBODY, NOBODY)
        assert b"Permission denied" in direct.stderr
    finally:
        mounter.unmount(target)


def test_fs_group_members_read_the_key_and_others_do_not(
    mounter: LinuxMounter, public_tmp: Path
) -> None:
    data, target = public_tmp / "data", public_tmp / "target"
    target.mkdir()
    files = {
        "svid.pem": FileContent(b"certificate\n", 0o644),
        "svid_key.pem": FileContent(b"key\n", 0o640),
    }
    write_atomically(data, files, gid=1234)

    mounter.bind_readonly(data, target)
    try:
        assert _read_as(target / "svid_key.pem", 4321, 1234).stdout == b"key\n"
        assert _read_as(target / "svid.pem", 4321, 1234).stdout == b"certificate\n"
        assert _read_as(target / "svid_key.pem", 4321, 999).returncode != 0
        assert _read_as(target / "svid.pem", 4321, 999).returncode != 0
    finally:
        mounter.unmount(target)


def test_fake_mounter_keeps_the_same_contract(tmp_path: Path) -> None:
    source, target = _source_and_target(tmp_path)
    fake = FakeMounter()

    fake.bind_readonly(source, target)
    assert fake.is_mounted(target) and not fake.is_mounted(source)
    fake.unmount(target)
    fake.unmount(target)
    assert not fake.is_mounted(target)

    with pytest.raises(MountError) as info:
        fake.bind_readonly(tmp_path / "missing", target)
    assert info.value.errno == errno.ENOENT

    fake.errors["bind_readonly"] = errno.EPERM
    with pytest.raises(MountError):
        fake.bind_readonly(source, target)
    assert not fake.is_mounted(target)
    fake.bind_readonly(source, target)
    assert fake.mounts == {target: source}


def test_mount_table_decodes_octal_escapes(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_bytes(
        b"36 35 98:0 /src\\040dir /mnt/a\\040b\\011c rw,noatime master:1 - ext3 /dev/root rw\n"
        b"37 35 0:23 / /run rw - tmpfs tmpfs rw\n"
    )

    table = mount_table(info)

    assert [m.mount_point for m in table] == [Path("/mnt/a b\tc"), Path("/run")]
    assert table[0].root == Path("/src dir")
    assert table[0].device == (98, 0)
