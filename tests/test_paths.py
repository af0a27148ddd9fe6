"""Target paths under the kubelet folder: checked without following symlinks, then held."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from trio_spirecsi.errors import InvalidArgument
from trio_spirecsi.storage import StorageError, TargetParentMissing, open_target
from trio_spirecsi.storage.paths import split_absolute

VOLUME = Path("pods/1234/volumes/kubernetes.io~csi/spiffe")


@pytest.fixture
def kubelet(tmp_path: Path) -> Path:
    root = tmp_path / "kubelet"
    (root / VOLUME).mkdir(parents=True)
    return root


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_kubelet_target_is_held_and_created_on_demand(kubelet: Path) -> None:
    path = kubelet / VOLUME / "mount"

    with open_target(kubelet, path) as target:
        assert (target.path, target.name, target.field) == (path, "mount", "target_path")
        assert target.open() is None
        assert not path.exists()

        fd = target.open(create=True)
        assert fd is not None
        os.close(fd)
        assert target.created
        st = os.lstat(path)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750

        again = target.open(create=True)
        assert again is not None
        os.close(again)
        assert target.remove()
        assert not path.exists()
        assert not target.remove()


def test_an_existing_target_folder_is_used_as_it_is(kubelet: Path) -> None:
    path = kubelet / VOLUME / "mount"
    path.mkdir(mode=0o700)
    (path / "left").write_text("x")

    with open_target(kubelet, path) as target:
        fd = target.open(create=True)
        assert fd is not None
        os.close(fd)
        assert not target.created
        assert not target.remove()  # not empty
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert (path / "left").read_text() == "x"


def test_a_symlinked_kubelet_folder_may_be_named_either_way(tmp_path: Path, kubelet: Path) -> None:
    link = tmp_path / "var-lib-kubelet"
    link.symlink_to(kubelet)

    for spelled in (link / VOLUME / "mount", kubelet / VOLUME / "mount"):
        with open_target(link, spelled) as target:
            fd = target.open(create=True)
            assert fd is not None
            os.close(fd)
    assert (kubelet / VOLUME / "mount").is_dir()


def test_dots_and_repeated_slashes_are_normalised(kubelet: Path) -> None:
    messy = f"{kubelet}//{VOLUME}/./mount"

    with open_target(kubelet, messy) as target:
        assert target.path == kubelet / VOLUME / "mount"


@pytest.mark.parametrize(
    ("spelled", "complaint"),
    [
        ("relative/mount", "must be an absolute path"),
        ("{kubelet}/pods/../../etc/mount", "must not contain '..'"),
        ("{kubelet}/pods/1234/nul\0/mount", "NUL"),
        ("{kubelet}-other/pods/mount", "is outside the kubelet folder"),
        ("/etc/mount", "is outside the kubelet folder"),
        ("{kubelet}", "is outside the kubelet folder"),
    ],
)
def test_paths_that_are_not_kubelet_targets_are_refused(
    kubelet: Path, spelled: str, complaint: str
) -> None:
    path = spelled.format(kubelet=kubelet)
    before = _fds()

    with pytest.raises(InvalidArgument) as info:
        open_target(kubelet, path, field="target_path")

    assert info.value.field == "target_path"
    assert complaint in info.value.message
    assert repr(path) in info.value.message
    assert _fds() == before


def test_a_symlinked_component_is_refused_even_when_it_stays_inside(kubelet: Path) -> None:
    real = kubelet / "pods-real"
    (kubelet / "pods").rename(real)
    (kubelet / "pods").symlink_to(real)
    path = kubelet / VOLUME / "mount"

    with pytest.raises(InvalidArgument) as info:
        open_target(kubelet, path)

    assert info.value.message == (
        f"{str(path)!r}: component {str(kubelet / 'pods')!r} is a symlink"
    )


@pytest.mark.parametrize("which", ["parent", "pod"])
def test_a_symlink_to_outside_is_refused(tmp_path: Path, kubelet: Path, which: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    swapped = kubelet / VOLUME if which == "parent" else kubelet / "pods" / "1234"
    swapped.rename(swapped.with_name("moved"))
    swapped.symlink_to(outside)

    with pytest.raises(InvalidArgument, match="is a symlink") as info:
        open_target(kubelet, kubelet / VOLUME / "mount", field="metadata target_path")

    assert info.value.field == "metadata target_path"
    assert str(swapped) in info.value.message
    assert os.listdir(outside) == []


def test_a_symlink_as_the_target_itself_is_refused(tmp_path: Path, kubelet: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    path = kubelet / VOLUME / "mount"
    path.symlink_to(tmp_path / "elsewhere")

    with pytest.raises(InvalidArgument) as info:
        open_target(kubelet, path)

    assert info.value.message == f"{str(path)!r} is a symlink; the target must be a folder"


def test_files_where_folders_belong_are_refused(kubelet: Path) -> None:
    (kubelet / VOLUME / "mount").write_text("not a folder")
    with pytest.raises(InvalidArgument, match="is not a folder; the target must be a folder"):
        open_target(kubelet, kubelet / VOLUME / "mount")

    (kubelet / "pods" / "file").write_text("")
    with pytest.raises(InvalidArgument) as info:
        open_target(kubelet, kubelet / "pods" / "file" / "x" / "mount")
    assert f"component {str(kubelet / 'pods' / 'file')!r} is not a folder" in info.value.message


def test_a_missing_parent_is_reported_as_such(kubelet: Path) -> None:
    path = kubelet / "pods" / "gone" / "volumes" / "mount"

    with pytest.raises(TargetParentMissing) as info:
        open_target(kubelet, path)

    assert isinstance(info.value, InvalidArgument)
    assert f"component {str(kubelet / 'pods' / 'gone')!r} does not exist" in info.value.message


def test_a_missing_kubelet_folder_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as info:
        open_target(tmp_path / "nope", tmp_path / "nope" / "pods" / "mount")
    assert "--kubelet-dir" in str(info.value)


def test_the_held_parent_survives_a_swap_for_a_symlink(tmp_path: Path, kubelet: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    parent = kubelet / VOLUME

    with open_target(kubelet, parent / "mount") as target:
        parent.rename(parent.with_name("moved"))
        parent.symlink_to(outside)
        target.check_beneath()
        fd = target.open(create=True)
        assert fd is not None
        os.close(fd)

    assert os.listdir(outside) == []
    assert (parent.with_name("moved") / "mount").is_dir()


def test_a_parent_moved_out_of_the_kubelet_folder_is_noticed(tmp_path: Path, kubelet: Path) -> None:
    parent = kubelet / VOLUME

    with open_target(kubelet, parent / "mount") as target:
        parent.rename(tmp_path / "escaped")
        with pytest.raises(InvalidArgument, match="moved out of the kubelet folder"):
            target.check_beneath()


def test_verify_notices_a_path_that_no_longer_leads_to_the_held_folder(
    tmp_path: Path, kubelet: Path
) -> None:
    parent = kubelet / VOLUME

    with open_target(kubelet, parent / "mount") as target:
        target.verify()
        parent.rename(parent.with_name("moved"))
        parent.mkdir()  # a look-alike folder where the real one was
        with pytest.raises(InvalidArgument, match="its parent folder was replaced"):
            target.verify()
        parent.rmdir()
        parent.symlink_to(parent.with_name("moved"))
        with pytest.raises(InvalidArgument, match="is a symlink"):
            target.verify()


def test_a_removed_parent_is_reported_as_gone(kubelet: Path) -> None:
    parent = kubelet / VOLUME

    with open_target(kubelet, parent / "mount") as target:
        parent.rmdir()
        with pytest.raises(TargetParentMissing):
            target.open(create=True)
        assert target.open() is None


def test_a_closed_handle_cannot_be_used_and_holds_nothing(kubelet: Path) -> None:
    before = _fds()
    target = open_target(kubelet, kubelet / VOLUME / "mount")
    assert len(_fds() - before) == 1
    target.close()
    target.close()

    assert _fds() == before
    with pytest.raises(ValueError, match="closed"):
        target.open()


def test_refusals_leave_no_descriptor_open(tmp_path: Path, kubelet: Path) -> None:
    (kubelet / "pods" / "link").symlink_to(tmp_path)
    before = _fds()
    for path in (
        kubelet / "pods" / "link" / "x" / "mount",
        kubelet / "pods" / "missing" / "mount",
        kubelet / VOLUME / "mount" / "deeper",
    ):
        with pytest.raises(InvalidArgument):
            open_target(kubelet, path)
    assert _fds() == before


@pytest.mark.parametrize(
    ("path", "parts"),
    [("/", ()), ("/a//b/./c/", ("a", "b", "c")), ("/a/.../b", ("a", "...", "b"))],
)
def test_split_absolute(path: str, parts: tuple[str, ...]) -> None:
    assert split_absolute(path) == parts
