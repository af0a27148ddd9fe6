"""Atomic replacement of a whole set of files, the way the kubelet writes Secret volumes.

Layout of ``data_dir``::

    ..2026_11_27_06_55_22.1a2b3c4d/   one generation: the real files
    ..data -> ..2026_11_27_06_55_22.1a2b3c4d
    svid.pem -> ..data/svid.pem      visible names, all through ..data

A new generation is written in full into a fresh folder, then ``..data`` is switched to it
with one rename. A reader that resolves ``..data`` once (opens it as a directory) reads one
generation only: never a key from one SVID beside the certificate of another. A file opened
through a visible name is always complete; an open that races the removal of the previous
generation can fail with ENOENT, and a retry finds the new one (as with Secret volumes).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from trio_spirecsi.storage.errors import StorageError

DATA_LINK = "..data"
_DATA_TMP = "..data_tmp"
_LINK_TMP = "..link_tmp"


@dataclass(frozen=True, slots=True)
class Layout:
    """What one successful :func:`write_atomically` left in its folder: the generation
    ``..data`` points at and the names of its files, with their owner and label. Handed
    back to the next write of the same folder (``after=``), it lets that write skip
    checking and repairing the folder."""

    generation: str
    names: frozenset[str]
    gid: int | None
    label: str | None


@dataclass(frozen=True)
class FileContent:
    """One file of a volume: its bytes and its permission bits (e.g. 0o600 for a key)."""

    data: bytes
    mode: int


def _check(files: Mapping[str, FileContent]) -> None:
    for name, content in files.items():
        if not name or "/" in name or "\0" in name or name.startswith("..") or name == ".":
            raise ValueError(f"invalid file name {name!r}: plain names only, not starting '..'")
        if not 0 <= content.mode <= 0o777:
            raise ValueError(f"invalid mode {content.mode:#o} for {name!r}: permission bits only")


def _set_owner_mode(path: str | int, gid: int | None) -> None:
    """0755 without a group; 0750 owned by group ``gid`` with one (chown before chmod)."""
    if isinstance(path, int):
        os.fchown(path, -1, os.getegid() if gid is None else gid)
        os.fchmod(path, 0o755 if gid is None else 0o750)
    else:
        os.chown(path, -1, os.getegid() if gid is None else gid, follow_symlinks=False)
        os.chmod(path, 0o755 if gid is None else 0o750)


def _current(data_dir: str) -> str | None:
    try:
        target = os.readlink(os.path.join(data_dir, DATA_LINK))
    except FileNotFoundError:
        return None
    return target if os.path.isdir(os.path.join(data_dir, target)) else None


def _remove(path: str) -> None:
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _is_socket(path: str) -> bool:
    """A unix socket beside the files belongs to a server (the Workload API), not to us."""
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _remove_stale(data_dir: str, keep: str | None) -> None:
    """Drop temp links and every generation folder that ``..data`` does not point at."""
    for name in os.listdir(data_dir):
        if name.startswith("..") and name not in (DATA_LINK, keep):
            _remove(os.path.join(data_dir, name))


def _unchanged(
    generation: str, files: Mapping[str, FileContent], gid: int | None, label: str | None
) -> bool:
    want_gid = os.getegid() if gid is None else gid
    try:
        if label is not None and _get_label(generation) != label:
            return False
        if set(os.listdir(generation)) != set(files) or os.stat(generation).st_gid != want_gid:
            return False
        for name, content in files.items():
            path = os.path.join(generation, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != content.mode:
                return False
            if st.st_gid != want_gid:
                return False
            with open(path, "rb") as fh:
                if fh.read() != content.data:
                    return False
    except FileNotFoundError:
        return False
    return True


SELINUX_XATTR = "security.selinux"


def _label(path: str | int, label: str | None) -> None:
    """Give a file, folder or symlink the SELinux context ``label`` (no-op without one)."""
    if label is not None:
        if isinstance(path, int):
            os.setxattr(path, SELINUX_XATTR, label.encode())
        else:
            os.setxattr(path, SELINUX_XATTR, label.encode(), follow_symlinks=False)


def _get_label(path: str) -> str | None:
    try:
        return os.getxattr(path, SELINUX_XATTR, follow_symlinks=False).decode()
    except OSError:
        return None


def _fsync_dir(path: str | int) -> None:
    if isinstance(path, int):
        os.fsync(path)
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_generation(
    data_dir: str,
    files: Mapping[str, FileContent],
    gid: int | None,
    label: str | None,
    fsync: bool,
) -> str:
    """A new generation folder holding exactly ``files``; on any failure (a full disk, no
    descriptors) it is removed again, so a failed write leaves no half-written folder."""
    stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime())
    folder = tempfile.mkdtemp(prefix=f"..{stamp}.", dir=data_dir)
    try:
        _fill_generation(folder, files, gid, label, fsync)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return os.path.basename(folder)


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _fill_generation(
    folder: str,
    files: Mapping[str, FileContent],
    gid: int | None,
    label: str | None,
    fsync: bool,
) -> None:
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for name, content in files.items():
            fd = os.open(name, _CREATE, 0o600, dir_fd=dir_fd)
            try:
                view = memoryview(content.data)
                while view:
                    view = view[os.write(fd, view) :]
                if gid is not None:
                    os.fchown(fd, -1, gid)
                os.fchmod(fd, content.mode)
                _label(fd, label)
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        _set_owner_mode(dir_fd, gid)
        _label(dir_fd, label)
        if fsync:
            _fsync_dir(dir_fd)
    finally:
        os.close(dir_fd)


def _replace_symlink(data_dir: str, name: str, target: str, label: str | None) -> None:
    tmp = os.path.join(data_dir, _LINK_TMP)
    _remove(tmp)
    os.symlink(target, tmp)
    _label(tmp, label)
    path = os.path.join(data_dir, name)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    os.rename(tmp, path)


def write_atomically(
    data_dir: Path | str,
    files: Mapping[str, FileContent],
    *,
    gid: int | None,
    selinux_context: str | None = None,
    fsync: bool = True,
    after: Layout | None = None,
) -> Layout:
    """Replace the whole content of ``data_dir`` with ``files``; readers see old or new, no mix.

    With ``selinux_context`` every file, folder and link is labelled with it before it
    becomes visible, so containers may read them on SELinux-enforcing nodes (a bind mount
    cannot relabel: the kernel ignores ``context=`` on bind mounts).

    With ``gid``, files and folders belong to that group (folders 0750); without, folders are
    0755 and files keep exactly their ``mode``. Safe to call again after a crash at any point:
    leftovers of the interrupted write are removed and exactly ``files`` remain. When the
    current generation already holds exactly ``files`` nothing is swapped, so consumers that
    watch the files do not reload for nothing. Unix sockets in ``data_dir`` (a server's, such
    as the volume's Workload API socket) are left in place. The parent of ``data_dir`` must
    exist. Failures (ENOSPC, EROFS, a missing parent) raise StorageError naming the path;
    invalid names or modes raise ValueError before anything is written.

    ``fsync=False`` leaves out every fsync: for a folder on tmpfs, where they change nothing
    (see :mod:`.sync`). The order of the writes, and so what a reader or a restarted driver
    sees after a crash of the driver, is the same.

    ``after``: what the previous write of this folder returned, when it succeeded and
    nothing else has written to the folder since (a volume rewriting its own files: a
    rotation). If the new files have the same names, owner and label, the write then only
    adds the new generation, swaps ``..data`` and removes the previous generation (about
    half the system calls); the files must differ from that write's, since nothing is
    compared. After any failure, pass None again: the next write checks and repairs the
    whole folder.
    """
    _check(files)
    path = os.fspath(data_dir)
    try:
        if (
            after is not None
            and after.names == files.keys()
            and after.gid == gid
            and after.label == selinux_context
        ):
            generation = _rewrite(path, files, gid, selinux_context, fsync, after)
        else:
            generation = _write(path, files, gid, selinux_context, fsync)
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        where = f" ({exc.filename})" if exc.filename and exc.filename != str(data_dir) else ""
        reason = exc.strerror or str(exc)
        raise StorageError(exc.errno or errno.EIO, f"writing {data_dir}: {reason}{where}") from exc
    names = frozenset(files)
    names = _NAME_SETS.setdefault(names, names) if len(_NAME_SETS) < 64 else names
    return Layout(generation, names, gid, selinux_context)


# The few sets of file names volumes use, shared: thousands of volumes hold one each.
_NAME_SETS: dict[frozenset[str], frozenset[str]] = {}


def _swap_in(
    data_dir: str,
    files: Mapping[str, FileContent],
    gid: int | None,
    selinux_context: str | None,
    fsync: bool,
) -> str:
    """Write ``files`` as a new generation and point ``..data`` at it with one rename."""
    current = _write_generation(data_dir, files, gid, selinux_context, fsync)
    link_tmp = os.path.join(data_dir, _DATA_TMP)
    os.symlink(current, link_tmp)
    _label(link_tmp, selinux_context)
    os.rename(link_tmp, os.path.join(data_dir, DATA_LINK))
    if fsync:
        _fsync_dir(data_dir)
    return current


def _rewrite(
    data_dir: str,
    files: Mapping[str, FileContent],
    gid: int | None,
    selinux_context: str | None,
    fsync: bool,
    after: Layout,
) -> str:
    """A write whose folder holds exactly what ``after`` says: the visible names already
    point through ``..data``, nothing stale is left, the folder's owner and label are set.
    Same order as :func:`_write`: new generation, ``..data`` swapped, previous one removed."""
    current = _swap_in(data_dir, files, gid, selinux_context, fsync)
    previous = os.path.join(data_dir, after.generation)
    try:
        for name in after.names:
            os.unlink(os.path.join(previous, name))
        os.rmdir(previous)
    except OSError:
        _remove(previous)  # not as it was left: remove whatever it holds
    if fsync:
        _fsync_dir(data_dir)
    return current


def _write(
    data_dir: str,
    files: Mapping[str, FileContent],
    gid: int | None,
    selinux_context: str | None,
    fsync: bool,
) -> str:
    try:
        os.mkdir(data_dir, 0o700)
        created = True
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(data_dir).st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", data_dir) from None
        created = False
    _set_owner_mode(data_dir, gid)
    _label(data_dir, selinux_context)
    if created:
        return _write_new(data_dir, files, gid, selinux_context, fsync)
    current = _current(data_dir)
    _remove_stale(data_dir, keep=current)
    generation = None if current is None else os.path.join(data_dir, current)
    if generation is None or not _unchanged(generation, files, gid, selinux_context):
        current = _swap_in(data_dir, files, gid, selinux_context, fsync)
    for name in files:
        link = f"{DATA_LINK}/{name}"
        try:
            if os.readlink(os.path.join(data_dir, name)) == link:
                continue
        except OSError:
            pass
        _replace_symlink(data_dir, name, link, selinux_context)
    for name in os.listdir(data_dir):
        path = os.path.join(data_dir, name)
        if not name.startswith("..") and name not in files and not _is_socket(path):
            _remove(path)
    _remove_stale(data_dir, keep=current)
    if fsync:
        _fsync_dir(data_dir)
    assert current is not None  # the generation found unchanged, or the one just written
    return current


def _write_new(
    data_dir: str,
    files: Mapping[str, FileContent],
    gid: int | None,
    selinux_context: str | None,
    fsync: bool,
) -> str:
    """The first write into ``data_dir``, which this call created (so it is empty): the
    generation, then ``..data`` and the visible names, in the same order as any write."""
    current = _write_generation(data_dir, files, gid, selinux_context, fsync)
    for name, target in ((DATA_LINK, current), *((n, f"{DATA_LINK}/{n}") for n in files)):
        path = os.path.join(data_dir, name)
        os.symlink(target, path)
        _label(path, selinux_context)
    if fsync:
        _fsync_dir(data_dir)
    return current
