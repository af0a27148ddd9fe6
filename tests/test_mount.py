"""Real bind mounts, inside the session's private mount namespace (see conftest.py)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import detach_mounts_under
from trio_spirecsi.errors import InvalidArgument
from trio_spirecsi.storage import (
    FileContent,
    LinuxMounter,
    MetadataStore,
    MountError,
    TargetDir,
    VolumeMetadata,
    open_target,
    write_atomically,
)
from trio_spirecsi.storage.mount import MS_BIND, MS_REMOUNT, MountApi, fs_location, mount_table

NOBODY = 65534
VOLUME = Path("pods/1234/volumes/kubernetes.io~csi/spiffe")


@dataclass(frozen=True)
class Layout:
    """A kubelet folder with one pod volume's parent folder, and a data folder to mount."""

    base: Path
    kubelet: Path
    source: Path
    target: Path

    def open(self) -> TargetDir:
        return open_target(self.kubelet, self.target)


def _layout(base: Path) -> Layout:
    kubelet = base / "kubelet"
    (kubelet / VOLUME).mkdir(parents=True)
    source = base / "state" / "vol" / "data"
    source.mkdir(parents=True)
    (source / "svid.pem").write_bytes(b"certificate\n")
    return Layout(base, kubelet, source, kubelet / VOLUME / "mount")


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return _layout(tmp_path)


@pytest.fixture(params=["new", "classic"])
def mounter(
    request: pytest.FixtureRequest, private_mount_ns: None, tmp_path: Path
) -> Iterator[LinuxMounter]:
    api: MountApi = request.param
    yield LinuxMounter(api)
    detach_mounts_under(tmp_path)


def _at(point: Path) -> list[str]:
    """The roots of the mounts at ``point``, lowest first."""
    return [str(m.root) for m in mount_table() if m.mount_point == point]


def _options(target: Path) -> set[str]:
    (entry,) = [
        line
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split(" ")[4] == str(target)
    ]
    return set(entry.split(" ")[5].split(","))


def _foreign_bind(source: Path, target: Path) -> None:
    """A mount that is not the driver's (another tool's, or an attacker's)."""
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)


def _foreign(base: Path) -> Path:
    folder = base / "foreign"
    folder.mkdir()
    (folder / "theirs").write_text("not ours")
    return folder


# Mounting -------------------------------------------------------------------------------


def test_bind_readonly_shows_the_source_files_at_a_new_target(
    mounter: LinuxMounter, layout: Layout
) -> None:
    with layout.open() as target:
        assert not mounter.is_mounted(target, layout.source)
        mounter.bind_readonly(layout.source, target)
        assert mounter.is_mounted(target, layout.source)
        assert not mounter.is_mounted(target, layout.source.parent)

    assert (layout.target / "svid.pem").read_bytes() == b"certificate\n"
    (layout.source / "svid.pem").write_bytes(b"renewed\n")
    assert (layout.target / "svid.pem").read_bytes() == b"renewed\n"
    assert {"ro", "nosuid", "nodev", "noexec"} <= _options(layout.target)
    assert _at(layout.target) == [str(layout.source)]
    detach_mounts_under(layout.target)
    assert stat.S_IMODE(os.lstat(layout.target).st_mode) == 0o750  # made by the mounter


def test_writing_through_the_target_fails_with_erofs_even_as_root(
    mounter: LinuxMounter, layout: Layout
) -> None:
    with layout.open() as target:
        mounter.bind_readonly(layout.source, target)

    target_dir = layout.target
    for attempt in (
        lambda: (target_dir / "new.pem").write_bytes(b"x"),
        lambda: (target_dir / "svid.pem").write_bytes(b"x"),
        lambda: (target_dir / "svid.pem").unlink(),
        lambda: (target_dir / "svid.pem").chmod(0o777),
        lambda: (target_dir / "folder").mkdir(),
    ):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS
    assert (layout.source / "svid.pem").read_bytes() == b"certificate\n"
    assert sorted(os.listdir(layout.source)) == ["svid.pem"]


def test_programs_in_the_volume_cannot_be_executed(mounter: LinuxMounter, layout: Layout) -> None:
    program = layout.source / "program"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    with layout.open() as target:
        mounter.bind_readonly(layout.source, target)

    assert subprocess.run([program], check=False).returncode == 0
    with pytest.raises(PermissionError):
        subprocess.run([layout.target / "program"], check=False)


@pytest.mark.parametrize("name", ["with space", "tab\there", "back\\slash", "new\nline"])
def test_paths_with_characters_that_mountinfo_escapes(
    mounter: LinuxMounter, tmp_path: Path, name: str
) -> None:
    base = tmp_path / name
    base.mkdir()
    layout = _layout(base)
    with layout.open() as target:
        mounter.bind_readonly(layout.source, target)
        assert mounter.is_mounted(target, layout.source)
        (entry,) = [m for m in mount_table() if m.mount_point == layout.target]
        assert fs_location(layout.source) == (entry.device, entry.root)
        assert (layout.target / "svid.pem").read_bytes() == b"certificate\n"

        assert mounter.unmount(target, layout.source).removed == 1
        assert not mounter.is_mounted(target, layout.source)
    assert _at(layout.target) == []


def test_a_symlink_as_the_target_is_refused_and_nothing_is_mounted(
    mounter: LinuxMounter, layout: Layout
) -> None:
    elsewhere = layout.base / "elsewhere"
    elsewhere.mkdir()
    layout.target.symlink_to(elsewhere)

    with pytest.raises(InvalidArgument, match="is a symlink"):
        layout.open()

    assert _at(elsewhere) == []
    assert os.listdir(elsewhere) == []


def _swap(layout: Layout, which: str) -> tuple[Path, Path]:
    """Move a folder on the target's path away and put a symlink to an outside folder in its
    place; return the outside folder and where the target's parent went."""
    outside = layout.base / "outside"
    outside.mkdir()
    swapped = layout.kubelet / (VOLUME if which == "parent" else Path("pods/1234"))
    moved = swapped.with_name("moved")
    swapped.rename(moved)
    swapped.symlink_to(outside)
    return outside, moved / VOLUME.relative_to(swapped.relative_to(layout.kubelet))


def _nothing_mounted_in(folder: Path) -> bool:
    return os.listdir(folder) == [] and not any(
        m.mount_point.is_relative_to(folder) for m in mount_table()
    )


@pytest.mark.parametrize("which", ["parent", "pod"])
def test_a_folder_swapped_for_a_symlink_after_the_check_is_refused(
    mounter: LinuxMounter, layout: Layout, which: str
) -> None:
    """The attack on publish: the target is checked, then (while publish waits for the first
    SVID) a folder on its path is moved away and replaced by a symlink to another place."""
    with layout.open() as target:
        outside, held = _swap(layout, which)
        with pytest.raises(InvalidArgument, match="is a symlink") as info:
            mounter.bind_readonly(layout.source, target)

    assert str(layout.target) in info.value.message
    assert _nothing_mounted_in(outside)
    assert not any(m.mount_point.is_relative_to(layout.kubelet) for m in mount_table())
    assert not os.path.lexists(held / "mount")


class _SwapsJustBeforeMounting(LinuxMounter):
    """Swaps the folder after every check, right before the mount syscall: the last window."""

    def __init__(self, api: MountApi, swap: Callable[[], object]) -> None:
        super().__init__(api)
        self._swap = swap

    def _open_tree(self, dirfd: int, flags: int) -> int:
        self._swap()
        return super()._open_tree(dirfd, flags)

    def _mount(self, source: bytes | None, target: bytes, flags: int) -> int:
        if flags == MS_BIND:
            self._swap()
        return super()._mount(source, target, flags)


@pytest.mark.parametrize("which", ["parent", "pod"])
@pytest.mark.parametrize("api", ["new", "classic"])
def test_a_swap_in_the_last_instant_still_mounts_only_where_the_handle_points(
    private_mount_ns: None, layout: Layout, which: str, api: MountApi
) -> None:
    swapped: list[tuple[Path, Path]] = []
    mounter = _SwapsJustBeforeMounting(api, lambda: swapped.append(_swap(layout, which)))
    try:
        with layout.open() as target:
            mounter.bind_readonly(layout.source, target)

        ((outside, held),) = swapped
        assert _nothing_mounted_in(outside)
        assert _at(held / "mount") == [str(layout.source)]
        assert {"ro", "nosuid", "nodev", "noexec"} <= _options(held / "mount")
        assert (held / "mount" / "svid.pem").read_bytes() == b"certificate\n"
    finally:
        detach_mounts_under(layout.base)


def test_a_folder_moved_out_of_the_kubelet_folder_after_the_check_is_refused(
    mounter: LinuxMounter, layout: Layout
) -> None:
    escaped = layout.base / "escaped"

    with layout.open() as target:
        (layout.kubelet / VOLUME).rename(escaped)
        with pytest.raises(InvalidArgument, match="moved out of the kubelet folder"):
            mounter.bind_readonly(layout.source, target)

    assert os.listdir(escaped) == []
    assert not any(m.mount_point.is_relative_to(layout.base) for m in mount_table())


def test_a_missing_source_fails_with_errno_and_paths_and_creates_nothing(
    mounter: LinuxMounter, layout: Layout
) -> None:
    missing = layout.base / "missing"
    with layout.open() as target, pytest.raises(MountError) as info:
        mounter.bind_readonly(missing, target)

    assert info.value.errno == errno.ENOENT
    assert str(missing) in str(info.value)
    assert str(layout.target) in str(info.value)
    assert not os.path.lexists(layout.target)


def test_a_source_reached_through_a_symlink_is_refused(
    mounter: LinuxMounter, layout: Layout
) -> None:
    link = layout.base / "state-link"
    link.symlink_to(layout.base / "state")

    with layout.open() as target, pytest.raises(MountError) as info:
        mounter.bind_readonly(link / "vol" / "data", target)

    assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert f"{link} is a symlink" in str(info.value)
    assert _at(layout.target) == []
    assert not os.path.lexists(layout.target)


class _RemountFails(LinuxMounter):
    def _mount(self, source: bytes | None, target: bytes, flags: int) -> int:
        if flags & MS_REMOUNT:
            return errno.EPERM
        return super()._mount(source, target, flags)


@pytest.mark.usefixtures("private_mount_ns")
def test_a_failed_readonly_remount_undoes_the_bind(layout: Layout) -> None:
    layout.target.mkdir()

    with layout.open() as target, pytest.raises(MountError) as info:
        _RemountFails("classic").bind_readonly(layout.source, target)

    assert info.value.errno == errno.EPERM
    assert "read-only remount" in str(info.value) and "undone" in str(info.value)
    assert _at(layout.target) == []
    assert os.listdir(layout.target) == []


@pytest.mark.usefixtures("private_mount_ns")
def test_a_target_made_for_a_failed_mount_is_removed_again(layout: Layout) -> None:
    with layout.open() as target, pytest.raises(MountError):
        _RemountFails("classic").bind_readonly(layout.source, target)

    assert not os.path.lexists(layout.target)


class _NoNewMountApi(LinuxMounter):
    def _open_tree(self, dirfd: int, flags: int) -> int:
        return -errno.ENOSYS


@pytest.mark.usefixtures("private_mount_ns")
def test_a_kernel_without_the_new_mount_api_gets_the_classic_one(
    layout: Layout, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mounter = _NoNewMountApi("auto")
    try:
        with caplog.at_level(logging.WARNING), layout.open() as target:
            mounter.bind_readonly(layout.source, target)

        assert mounter.api == "classic"
        assert "mount_api_fallback" in caplog.messages
        assert {"ro", "nosuid", "nodev", "noexec"} <= _options(layout.target)
        assert (layout.target / "svid.pem").read_bytes() == b"certificate\n"
    finally:
        detach_mounts_under(tmp_path)


class _SetattrFails(LinuxMounter):
    def _mount_setattr(self, fd: int, attr_set: int) -> int:
        return errno.EPERM


@pytest.mark.usefixtures("private_mount_ns")
def test_a_mount_that_cannot_be_made_readonly_never_becomes_visible(layout: Layout) -> None:
    with layout.open() as target, pytest.raises(MountError) as info:
        _SetattrFails("new").bind_readonly(layout.source, target)

    assert "nothing was mounted" in str(info.value)
    assert _at(layout.target) == []


# Unmounting -----------------------------------------------------------------------------


def test_unmount_is_idempotent(mounter: LinuxMounter, layout: Layout) -> None:
    with layout.open() as target:
        mounter.bind_readonly(layout.source, target)

        first = mounter.unmount(target, layout.source)
        second = mounter.unmount(target, layout.source)

    assert (first.removed, first.clean) == (1, True)
    assert (second.removed, second.clean) == (0, True)
    assert _at(layout.target) == []
    assert os.listdir(layout.target) == []


def test_unmount_of_a_never_mounted_or_missing_target_succeeds(
    mounter: LinuxMounter, layout: Layout
) -> None:
    with layout.open() as target:
        assert mounter.unmount(target, layout.source).clean
        layout.target.mkdir()
        assert mounter.unmount(target, layout.source).clean
        assert mounter.unmount(target, layout.base / "no-such-source").clean


def test_unmount_removes_the_drivers_stacked_mounts(mounter: LinuxMounter, layout: Layout) -> None:
    with layout.open() as target:
        mounter.bind_readonly(layout.source, target)
        mounter.bind_readonly(layout.source, target)
        assert len(_at(layout.target)) == 2

        result = mounter.unmount(target, layout.source)

    assert (result.removed, result.clean) == (2, True)
    assert _at(layout.target) == []


def test_unmount_leaves_a_foreign_mount_at_the_target(
    mounter: LinuxMounter, layout: Layout
) -> None:
    foreign = _foreign(layout.base)
    layout.target.mkdir()
    _foreign_bind(foreign, layout.target)

    with layout.open() as target:
        assert not mounter.is_mounted(target, layout.source)
        result = mounter.unmount(target, layout.source)

    assert result.removed == 0 and result.ours_left == 0
    assert [m.root for m in result.foreign] == [foreign]
    assert _at(layout.target) == [str(foreign)]
    assert (layout.target / "theirs").read_text() == "not ours"


def test_unmount_takes_the_drivers_mount_off_a_foreign_one_below_it(
    mounter: LinuxMounter, layout: Layout
) -> None:
    foreign = _foreign(layout.base)
    layout.target.mkdir()
    _foreign_bind(foreign, layout.target)
    with layout.open() as target:
        mounter.bind_readonly(layout.source, target)

        result = mounter.unmount(target, layout.source)

    assert (result.removed, result.ours_left) == (1, 0)
    assert [m.root for m in result.foreign] == [foreign]
    assert _at(layout.target) == [str(foreign)]


def test_unmount_leaves_the_drivers_mount_under_a_foreign_one_and_says_so(
    mounter: LinuxMounter, layout: Layout, caplog: pytest.LogCaptureFixture
) -> None:
    """Taking ours off from under a foreign mount would take the foreign one too (the kernel
    refuses a plain unmount of a covered mount; a lazy one detaches everything above it): both
    stay, and the result says so."""
    foreign = _foreign(layout.base)
    with layout.open() as target:
        mounter.bind_readonly(layout.source, target)
        _foreign_bind(foreign, layout.target)

        with caplog.at_level(logging.WARNING):
            result = mounter.unmount(target, layout.source)
        assert not mounter.is_mounted(target, layout.source)

    assert (result.removed, result.ours_left, result.clean) == (0, 1, False)
    assert [m.root for m in result.foreign] == [foreign]
    assert _at(layout.target) == [str(layout.source), str(foreign)]
    assert "unmount_left_foreign" in caplog.messages


def test_unmount_recognises_its_mount_after_the_data_folder_was_deleted(
    mounter: LinuxMounter, layout: Layout
) -> None:
    with layout.open() as target:
        mounter.bind_readonly(layout.source, target)
        shutil.rmtree(layout.source)
        assert [m.root_deleted for m in mount_table() if m.mount_point == layout.target] == [True]

        result = mounter.unmount(target, layout.source)

    assert (result.removed, result.clean) == (1, True)
    assert _at(layout.target) == []


def test_a_deleted_folder_of_someone_else_is_not_taken_for_ours(
    mounter: LinuxMounter, layout: Layout
) -> None:
    other = layout.base / "state" / "other"
    other.mkdir()
    layout.target.mkdir()
    _foreign_bind(other, layout.target)
    other.rmdir()

    with layout.open() as target:
        result = mounter.unmount(target, layout.source)

    assert result.removed == 0 and len(result.foreign) == 1
    assert len(_at(layout.target)) == 1


def test_unmount_never_follows_a_target_replaced_by_a_symlink(
    mounter: LinuxMounter, layout: Layout
) -> None:
    elsewhere = layout.base / "elsewhere"
    elsewhere.mkdir()
    mounter.bind_readonly(layout.source, target := layout.open())
    mounter.unmount(target, layout.source)
    layout.target.rmdir()
    layout.target.symlink_to(elsewhere)
    _foreign_bind(layout.source, elsewhere)  # even a bind of our own folder, over there

    with target, pytest.raises(InvalidArgument, match="is a symlink"):
        mounter.unmount(target, layout.source)

    assert _at(elsewhere) == [str(layout.source)]


def test_busy_target_is_detached_lazily(
    mounter: LinuxMounter, layout: Layout, caplog: pytest.LogCaptureFixture
) -> None:
    with layout.open() as target:
        mounter.bind_readonly(layout.source, target)
        holder = subprocess.Popen(["sleep", "600"], cwd=layout.target)
        try:
            with caplog.at_level(logging.WARNING):
                result = mounter.unmount(target, layout.source)
            assert (result.removed, result.clean) == (1, True)
            assert _at(layout.target) == []
            assert "unmount_busy_detaching" in caplog.messages
            assert holder.poll() is None
        finally:
            holder.kill()
            holder.wait()


# Who can read what ----------------------------------------------------------------------


def _read_as(path: Path, uid: int, gid: int) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["cat", str(path)], user=uid, group=gid, extra_groups=[], capture_output=True
    )


@pytest.mark.usefixtures("private_mount_ns")
def test_pods_read_through_the_target_while_the_state_folder_stays_private(
    public_tmp: Path,
) -> None:
    store = MetadataStore(public_tmp / "state")
    kubelet = public_tmp / "kubelet"
    (kubelet / VOLUME).mkdir(parents=True)
    target_path = kubelet / VOLUME / "mount"
    store.write(VolumeMetadata("csi-1", str(target_path), {}, "", "node-a", 1.0))
    files = {
        "svid.pem": FileContent(b"certificate\n", 0o644),
        "svid_key.pem": FileContent(b"key\n", 0o600),
    }
    write_atomically(store.data_dir("csi-1"), files, gid=None)
    mounter = LinuxMounter()

    with open_target(kubelet, target_path) as target:
        mounter.bind_readonly(store.data_dir("csi-1"), target)
        try:
            assert _read_as(target_path / "svid.pem", NOBODY, NOBODY).stdout == b"certificate\n"
            assert _read_as(target_path / "svid_key.pem", NOBODY, NOBODY).returncode != 0
            direct = _read_as(store.data_dir("csi-1") / "svid.pem", NOBODY, NOBODY)
            assert b"Permission denied" in direct.stderr
        finally:
            assert mounter.unmount(target, store.data_dir("csi-1")).removed == 1


@pytest.mark.usefixtures("private_mount_ns")
def test_fs_group_members_read_the_key_and_others_do_not(public_tmp: Path) -> None:
    layout = Layout(public_tmp, public_tmp, public_tmp / "data", public_tmp / "target")
    files = {
        "svid.pem": FileContent(b"certificate\n", 0o644),
        "svid_key.pem": FileContent(b"key\n", 0o640),
    }
    write_atomically(layout.source, files, gid=1234)
    mounter = LinuxMounter()

    with layout.open() as target:
        mounter.bind_readonly(layout.source, target)
        try:
            key, cert = layout.target / "svid_key.pem", layout.target / "svid.pem"
            assert _read_as(key, 4321, 1234).stdout == b"key\n"
            assert _read_as(cert, 4321, 1234).stdout == b"certificate\n"
            assert _read_as(key, 4321, 999).returncode != 0
            assert _read_as(cert, 4321, 999).returncode != 0
        finally:
            assert mounter.unmount(target, layout.source).removed == 1


# The mount table ------------------------------------------------------------------------


def test_mount_table_decodes_octal_escapes_ids_and_deleted_roots(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_bytes(
        b"36 35 98:0 /src\\040dir /mnt/a\\040b\\011c rw,noatime master:1 - ext3 /dev/root rw\n"
        b"37 35 0:23 / /run rw - tmpfs tmpfs rw\n"
        b"38 37 0:23 /state/v/data//deleted /pod rw - tmpfs tmpfs rw\n"
    )

    table = mount_table(info)

    assert [m.mount_point for m in table] == [Path("/mnt/a b\tc"), Path("/run"), Path("/pod")]
    assert table[0].root == Path("/src dir")
    assert table[0].device == (98, 0)
    assert [(m.mount_id, m.parent_id) for m in table] == [(36, 35), (37, 35), (38, 37)]
    assert [m.root_deleted for m in table] == [False, False, True]
    assert table[2].root == Path("/state/v/data")
