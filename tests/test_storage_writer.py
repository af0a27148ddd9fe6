"""The atomic writer: layout, modes and ownership, concurrent readers, crashes at any step."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.generations import read_current
from trio_spirecsi.storage import FileContent, StorageError, write_atomically
from trio_spirecsi.storage import writer as writer_module
from trio_spirecsi.storage.writer import Layout

Files = Mapping[str, FileContent]

CERT_AND_KEY = {
    "svid.pem": FileContent(b"-----BEGIN CERTIFICATE-----\n", 0o644),
    "svid_key.pem": FileContent(b"-----BEGIN PRIVATE KEY-----\n", 0o600),
}


def assert_exactly(data_dir: Path, files: Files, gid: int | None) -> None:
    """``data_dir`` holds ``files`` and nothing else: one generation, links through ..data."""
    assert read_current(data_dir) == {name: c.data for name, c in files.items()}
    generation = os.readlink(data_dir / "..data")
    assert set(os.listdir(data_dir)) == {*files, "..data", generation}
    want_gid = os.getegid() if gid is None else gid
    folder_mode = 0o755 if gid is None else 0o750
    for folder in (data_dir, data_dir / generation):
        st_folder = os.lstat(folder)
        assert (stat.S_IMODE(st_folder.st_mode), st_folder.st_gid) == (folder_mode, want_gid)
    for name, content in files.items():
        assert os.readlink(data_dir / name) == f"..data/{name}"
        assert (data_dir / name).read_bytes() == content.data
        st_file = os.lstat(data_dir / generation / name)
        assert stat.S_ISREG(st_file.st_mode)
        assert stat.S_IMODE(st_file.st_mode) == content.mode
        assert (st_file.st_uid, st_file.st_gid) == (os.geteuid(), want_gid)


def test_files_are_visible_through_data_links(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_atomically(data, CERT_AND_KEY, gid=None)

    assert_exactly(data, CERT_AND_KEY, None)
    assert os.readlink(data / "..data").startswith("..")


def test_a_new_set_replaces_the_old_one_entirely(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_atomically(data, CERT_AND_KEY, gid=None)
    first = os.readlink(data / "..data")
    new = {
        "svid.pem": FileContent(b"renewed\n", 0o644),
        "bundle.pem": FileContent(b"bundle\n", 0o644),
    }

    write_atomically(data, new, gid=None)

    assert_exactly(data, new, None)
    assert not (data / "svid_key.pem").exists()
    assert not os.path.lexists(data / first)


def test_without_group_the_key_stays_0600_owned_by_root(root: None, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_atomically(data, CERT_AND_KEY, gid=None)

    key = os.stat(data / "svid_key.pem")
    assert stat.S_IMODE(key.st_mode) == 0o600
    assert (key.st_uid, key.st_gid) == (0, 0)
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o755
    assert_exactly(data, CERT_AND_KEY, None)


def test_with_a_group_files_and_folders_belong_to_it(root: None, tmp_path: Path) -> None:
    data = tmp_path / "data"
    files = {**CERT_AND_KEY, "svid_key.pem": FileContent(b"key", 0o640)}
    write_atomically(data, files, gid=1234)

    key = os.stat(data / "svid_key.pem")
    assert (stat.S_IMODE(key.st_mode), key.st_uid, key.st_gid) == (0o640, 0, 1234)
    folder = os.stat(data)
    assert (stat.S_IMODE(folder.st_mode), folder.st_gid) == (0o750, 1234)
    assert_exactly(data, files, 1234)


@pytest.mark.parametrize("gid", [None, 1234])
def test_the_key_is_never_world_readable(root: None, tmp_path: Path, gid: int | None) -> None:
    data = tmp_path / "data"
    for mode in (0o600, 0o640):
        files = {**CERT_AND_KEY, "svid_key.pem": FileContent(b"key", mode)}
        write_atomically(data, files, gid=gid)
        generation = data / os.readlink(data / "..data")
        assert os.stat(generation / "svid_key.pem").st_mode & 0o007 == 0
        assert os.stat(data / "svid_key.pem").st_mode & 0o007 == 0


def test_writing_the_same_set_again_swaps_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_atomically(data, CERT_AND_KEY, gid=None)
    generation = os.readlink(data / "..data")

    write_atomically(data, dict(CERT_AND_KEY), gid=None)
    assert os.readlink(data / "..data") == generation

    changed = {**CERT_AND_KEY, "svid_key.pem": FileContent(b"-----BEGIN PRIVATE KEY-----\n", 0o640)}
    write_atomically(data, changed, gid=None)
    assert os.readlink(data / "..data") != generation
    assert_exactly(data, changed, None)


@pytest.mark.parametrize("name", ["", "a/b", "..data", "..hidden", ".", "nul\0"])
def test_names_that_could_escape_or_collide_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="invalid file name"):
        write_atomically(tmp_path / "data", {name: FileContent(b"x", 0o644)}, gid=None)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("mode", [0o4755, 0o1777, -1])
def test_modes_beyond_permission_bits_are_refused(tmp_path: Path, mode: int) -> None:
    with pytest.raises(ValueError, match="invalid mode"):
        write_atomically(tmp_path / "data", {"a": FileContent(b"x", mode)}, gid=None)


def test_nothing_written_yet_reads_as_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_current(tmp_path)


def test_the_parent_folder_must_exist(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as info:
        write_atomically(tmp_path / "missing" / "data", CERT_AND_KEY, gid=None)
    assert info.value.errno == errno.ENOENT
    assert str(tmp_path / "missing" / "data") in str(info.value)


def test_a_full_filesystem_is_a_storage_error_naming_the_folder(tmpfs: Path) -> None:
    small = tmpfs / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(small)], check=True)
    try:
        big = {"svid.pem": FileContent(b"x" * 65536, 0o644)}
        with pytest.raises(StorageError) as info:
            write_atomically(small / "data", big, gid=None)
        assert info.value.errno == errno.ENOSPC
        assert str(small / "data") in str(info.value)
    finally:
        subprocess.run(["umount", "--lazy", str(small)], check=True)


def test_works_on_tmpfs_like_production(tmpfs: Path) -> None:
    write_atomically(tmpfs / "data", CERT_AND_KEY, gid=None)
    write_atomically(tmpfs / "data", {"svid.pem": FileContent(b"2", 0o644)}, gid=None)
    assert_exactly(tmpfs / "data", {"svid.pem": FileContent(b"2", 0o644)}, None)


def _pair(generation: int) -> dict[str, FileContent]:
    body = f"generation {generation}\n".encode()
    return {
        "svid.pem": FileContent(body * 200, 0o644),
        "svid_key.pem": FileContent(body, 0o600),
    }


def _generation_of(cert: bytes) -> int:
    """The generation a complete certificate file belongs to; a torn file is an error."""
    (line,) = set(cert.splitlines(keepends=True))
    assert cert == line * 200, "truncated or mixed file"
    return int(line.split()[1])


@pytest.mark.parametrize("rewrite", [False, True])
def test_a_concurrent_reader_always_sees_a_matching_cert_and_key(
    tmp_path: Path, rewrite: bool
) -> None:
    """``rewrite``: each write hands the previous one's layout on, as a volume does."""
    data = tmp_path / "data"
    layout = write_atomically(data, _pair(0), gid=None)
    stop = threading.Event()
    seen: list[int] = []
    failures: list[BaseException] = []
    transient = 0

    def reader() -> None:
        nonlocal transient
        try:
            while not stop.is_set():
                current = read_current(data)
                cert_gen = _generation_of(current["svid.pem"])
                key_gen = int(current["svid_key.pem"].split()[1])
                assert cert_gen == key_gen, f"cert {cert_gen} beside key {key_gen}"
                assert not seen or seen[-1] <= cert_gen, "went back in time"
                seen.append(cert_gen)
                try:
                    one = (data / "svid.pem").read_bytes()
                except FileNotFoundError:
                    transient += 1  # old generation removed between lookup and open
                    continue
                assert _generation_of(one) >= cert_gen
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    generation = 0
    deadline = time.monotonic() + 60
    try:
        while len(set(seen)) < 200 and not failures and time.monotonic() < deadline:
            generation += 1
            after = layout if rewrite else None
            layout = write_atomically(data, _pair(generation), gid=None, after=after)
    finally:
        stop.set()
        thread.join(timeout=60)

    assert not failures, failures[0]
    assert len(set(seen)) >= 200, f"reader saw {len(set(seen))} generations in {generation}"
    assert_exactly(data, _pair(generation), None)


class _Crash(Exception):
    """Stands for the process dying at this point."""


class _CrashingOs:
    """``os`` for the writer module, dying before its ``countdown``-th mutating call."""

    STEPS = frozenset({"mkdir", "open", "write", "fchown", "fchmod", "fsync", "chown", "chmod"})
    STEPS |= {"symlink", "rename", "unlink"}

    def __init__(self, countdown: int) -> None:
        self.countdown = countdown

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        if name not in self.STEPS:
            return real

        def step(*args: Any, **kwargs: Any) -> Any:
            self.countdown -= 1
            if self.countdown == 0:
                raise _Crash(name)
            return real(*args, **kwargs)

        return step


def _crashing_write(
    data_dir: Path, files: Files, gid: int | None, at: int, after: Layout | None = None
) -> bool:
    """Run write_atomically dying at step ``at``; True if it crashed."""
    with mock.patch.object(writer_module, "os", _CrashingOs(at)):
        try:
            write_atomically(data_dir, files, gid=gid, after=after)
        except _Crash:
            return True
    return False


@pytest.mark.parametrize("gid", [None, 1234])
def test_every_crash_point_of_a_write_is_repaired_by_retrying_it(
    root: None, tmp_path: Path, gid: int | None
) -> None:
    new = {
        "svid.pem": FileContent(b"renewed", 0o644),
        "svid_key.pem": FileContent(b"new key", 0o640),
        "svid_bundle.pem": FileContent(b"bundle", 0o644),
    }
    old_bytes = {name: c.data for name, c in CERT_AND_KEY.items()}
    new_bytes = {name: c.data for name, c in new.items()}
    at = 0
    while True:
        at += 1
        data = tmp_path / f"crash-at-{at}"
        write_atomically(data, CERT_AND_KEY, gid=gid)
        if not _crashing_write(data, new, gid, at):
            break
        assert read_current(data) in (old_bytes, new_bytes), f"crash at step {at}"
        write_atomically(data, new, gid=gid)
        assert_exactly(data, new, gid)
        write_atomically(data, CERT_AND_KEY, gid=gid)
        assert_exactly(data, CERT_AND_KEY, gid)
    assert at > 20, "the write has fewer steps than a write of three files must have"


@pytest.mark.parametrize("gid", [None, 1234])
def test_every_crash_point_of_a_rewrite_is_repaired_by_a_whole_write(
    root: None, tmp_path: Path, gid: int | None
) -> None:
    """A rewrite after the previous write's layout dies at each of its steps in turn: old
    or new files are seen, and the next write, given no layout (as after any failure),
    leaves exactly the new ones."""
    new = {
        name: FileContent(b"renewed " + name.encode(), c.mode) for name, c in CERT_AND_KEY.items()
    }
    old_bytes = {name: c.data for name, c in CERT_AND_KEY.items()}
    new_bytes = {name: c.data for name, c in new.items()}
    at = 0
    while True:
        at += 1
        data = tmp_path / f"crash-at-{at}"
        layout = write_atomically(data, CERT_AND_KEY, gid=gid)
        if not _crashing_write(data, new, gid, at, after=layout):
            assert_exactly(data, new, gid)
            break
        assert read_current(data) in (old_bytes, new_bytes), f"crash at step {at}"
        write_atomically(data, new, gid=gid)
        assert_exactly(data, new, gid)
    assert at > 10, "a rewrite of two files has fewer steps than it must have"


def test_a_rewrite_leaves_exactly_the_new_files_and_says_where(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = write_atomically(data, CERT_AND_KEY, gid=None)
    assert first.generation == os.readlink(data / "..data")
    new = {name: FileContent(b"renewed", c.mode) for name, c in CERT_AND_KEY.items()}

    second = write_atomically(data, new, gid=None, after=first)

    assert_exactly(data, new, None)
    assert second.generation == os.readlink(data / "..data") != first.generation
    assert not os.path.lexists(data / first.generation)


def test_a_rewrite_with_other_names_checks_and_repairs_the_whole_folder(tmp_path: Path) -> None:
    """The layout says two files; three are written (a JWT added), and a stray file left
    in the folder by someone else is removed: the whole write runs."""
    data = tmp_path / "data"
    layout = write_atomically(data, CERT_AND_KEY, gid=None)
    (data / "stray").write_bytes(b"x")
    new = {**CERT_AND_KEY, "jwt.token": FileContent(b"token", 0o600)}

    write_atomically(data, new, gid=None, after=layout)

    assert_exactly(data, new, None)


def test_a_rewrite_whose_previous_generation_was_changed_still_removes_it(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    layout = write_atomically(data, CERT_AND_KEY, gid=None)
    (data / layout.generation / "extra").write_bytes(b"x")
    new = {name: FileContent(b"renewed", c.mode) for name, c in CERT_AND_KEY.items()}

    write_atomically(data, new, gid=None, after=layout)

    assert_exactly(data, new, None)


names = st.sampled_from(["svid.pem", "svid_key.pem", "svid_bundle.pem", "jwt.token", ".x"])
file_sets = st.dictionaries(
    names,
    st.builds(FileContent, st.binary(max_size=64), st.sampled_from([0o600, 0o640, 0o644])),
    max_size=4,
)
steps = st.lists(
    st.tuples(file_sets, st.sampled_from([None, 1234]), st.none() | st.integers(1, 60)),
    min_size=1,
    max_size=6,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps, final=file_sets)
def test_a_crash_at_any_step_leaves_old_or_new_and_the_next_write_repairs(
    steps: list[tuple[dict[str, FileContent], int | None, int | None]],
    final: dict[str, FileContent],
) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root to change file groups", pytrace=False)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        previous: dict[str, bytes] | None = None
        for files, gid, crash_at in steps:
            expected = {name: c.data for name, c in files.items()}
            if crash_at is not None and _crashing_write(data, files, gid, crash_at):
                try:
                    seen = read_current(data)
                except FileNotFoundError:
                    assert previous is None
                    continue
                assert seen in (previous, expected)
                previous = seen
            else:
                write_atomically(data, files, gid=gid)
                assert_exactly(data, files, gid)
                previous = expected
        write_atomically(data, final, gid=None)
        assert_exactly(data, final, None)


class _DiesAfterSwap:
    """``os`` for the writer module, dying at the first rename after ``..data`` was swapped."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    @staticmethod
    def rename(src: Path, dst: Path) -> None:
        if Path(dst).name != "..data":
            raise _Crash("rename")
        os.rename(src, dst)


def test_a_crash_right_after_the_swap_is_repaired_by_the_next_write(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_atomically(data, CERT_AND_KEY, gid=None)
    new = {"svid_bundle.pem": FileContent(b"bundle", 0o644)}

    with mock.patch.object(writer_module, "os", _DiesAfterSwap()), pytest.raises(_Crash):
        write_atomically(data, new, gid=None)

    assert read_current(data) == {"svid_bundle.pem": b"bundle"}
    assert not (data / "svid_bundle.pem").exists()
    with pytest.raises(FileNotFoundError):
        (data / "svid.pem").read_bytes()
    assert len([n for n in os.listdir(data) if n.startswith("..")]) > 2

    write_atomically(data, new, gid=None)
    assert_exactly(data, new, None)


def test_selinux_context_labels_everything_before_it_becomes_visible(tmp_path: Path) -> None:
    label = "system_u:object_r:container_file_t:s0"
    data = tmp_path / "data"
    files = {"svid.pem": FileContent(b"cert", 0o644), "svid_key.pem": FileContent(b"k", 0o600)}
    write_atomically(data, files, gid=None, selinux_context=label)

    generation = data / os.readlink(data / "..data")
    labelled = [data, generation, *(generation / n for n in files), *(data / n for n in files)]
    for path in labelled:
        assert os.getxattr(path, "security.selinux", follow_symlinks=False) == label.encode()

    # A driver restarted with another context relabels on its next write.
    other = "system_u:object_r:container_file_t:s0:c1,c2"
    write_atomically(data, files, gid=None, selinux_context=other)
    generation = data / os.readlink(data / "..data")
    assert os.getxattr(generation / "svid.pem", "security.selinux") == other.encode()
    assert read_current(data) == {n: c.data for n, c in files.items()}


@pytest.fixture
def small_tmpfs(private_mount_ns: None, tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a state directory that can fill up."""
    path = tmp_path / "small"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


@pytest.mark.parametrize("rewrite", [False, True])
def test_a_full_disk_keeps_the_previous_files_and_leaves_no_half_generation(
    small_tmpfs: Path, rewrite: bool
) -> None:
    """``rewrite``: the failing write is handed the previous write's layout (a rotation)."""
    tmpfs = small_tmpfs
    data = tmpfs / "data"
    old = {"svid.pem": FileContent(b"old cert", 0o644), "svid_key.pem": FileContent(b"k", 0o600)}
    layout = write_atomically(data, old, gid=None)
    generations = {n for n in os.listdir(data) if n.startswith("..") and n != "..data"}
    filler = tmpfs / "filler"
    with open(filler, "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 65536)
    big = {
        "svid.pem": FileContent(b"n" * 1_000_000, 0o644),
        "svid_key.pem": FileContent(b"k", 0o600),
    }
    with pytest.raises(OSError) as info:
        write_atomically(data, big, gid=None, after=layout if rewrite else None)
    assert info.value.errno == errno.ENOSPC
    assert read_current(data) == {"svid.pem": b"old cert", "svid_key.pem": b"k"}
    assert {n for n in os.listdir(data) if n.startswith("..") and n != "..data"} == generations
    filler.unlink()
    write_atomically(data, big, gid=None)
    assert read_current(data)["svid.pem"] == b"n" * 1_000_000
