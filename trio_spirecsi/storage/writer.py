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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _set_owner_mode(path: Path, gid: int | None) -> None:
    """0755 without a group; 0750 owned by group ``gid`` with one (chown before chmod)."""
    os.chown(path, -1, os.getegid() if gid is None else gid, follow_symlinks=False)
    os.chmod(path, 0o755 if gid is None else 0o750)


def _current(data_dir: Path) -> str | None:
    try:
        target = os.readlink(data_dir / DATA_LINK)
    except FileNotFoundError:
        return None
    return target if (data_dir / target).is_dir() else None


def _remove(path: Path) -> None:
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _is_socket(path: Path) -> bool:
    """A unix socket beside the files belongs to a server (the Workload API), not to us."""
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _remove_stale(data_dir: Path, keep: str | None) -> None:
    """Drop temp links and every generation folder that ``..data`` does not point at."""
    for name in os.listdir(data_dir):
        if name.startswith("..") and name not in (DATA_LINK, keep):
            _remove(data_dir / name)


def _unchanged(
    generation: Path, files: Mapping[str, FileContent], gid: int | None, label: str | None
) -> bool:
    want_gid = os.getegid() if gid is None else gid
    try:
        if label is not None and _get_label(generation) != label:
            return False
        if set(os.listdir(generation)) != set(files) or os.stat(generation).st_gid != want_gid:
            return False
        for name, content in files.items():
            st = os.lstat(generation / name)
            if not stat.S_ISREG(st.st_mode) or stat.S_IMODE(st.st_mode) != content.mode:
                return False
            if st.st_gid != want_gid or (generation / name).read_bytes() != content.data:
                return False
    except FileNotFoundError:
        return False
    return True


SELINUX_XATTR = "security.selinux"


def _label(path: Path | int, label: str | None) -> None:
    """Give a file, folder or symlink the SELinux context ``label`` (no-op without one)."""
    if label is not None:
        if isinstance(path, int):
            os.setxattr(path, SELINUX_XATTR, label.encode())
        else:
            os.setxattr(path, SELINUX_XATTR, label.encode(), follow_symlinks=False)


def _get_label(path: Path) -> str | None:
    try:
        return os.getxattr(path, SELINUX_XATTR, follow_symlinks=False).decode()
    except OSError:
        return None


def _write_generation(
    data_dir: Path, files: Mapping[str, FileContent], gid: int | None, label: str | None
) -> str:
    """A new generation folder holding exactly ``files``; on any failure (a full disk, no
    descriptors) it is removed again, so a failed write leaves no half-written folder."""
    stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime())
    folder = Path(tempfile.mkdtemp(prefix=f"..{stamp}.", dir=data_dir))
    try:
        _fill_generation(folder, files, gid, label)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder.name


def _fill_generation(
    folder: Path, files: Mapping[str, FileContent], gid: int | None, label: str | None
) -> None:
    for name, content in files.items():
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(folder / name, flags, 0o600)
        try:
            view = memoryview(content.data)
            while view:
                view = view[os.write(fd, view) :]
            if gid is not None:
                os.fchown(fd, -1, gid)
            os.fchmod(fd, content.mode)
            _label(fd, label)
            os.fsync(fd)
        finally:
            os.close(fd)
    _set_owner_mode(folder, gid)
    _label(folder, label)
    _fsync_dir(folder)


def _replace_symlink(data_dir: Path, name: str, target: str, label: str | None) -> None:
    tmp = data_dir / _LINK_TMP
    _remove(tmp)
    os.symlink(target, tmp)
    _label(tmp, label)
    path = data_dir / name
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    os.rename(tmp, path)


def write_atomically(
    data_dir: Path,
    files: Mapping[str, FileContent],
    *,
    gid: int | None,
    selinux_context: str | None = None,
) -> None:
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
    """
    _check(files)
    try:
        _write(data_dir, files, gid, selinux_context)
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        where = f" ({exc.filename})" if exc.filename and exc.filename != str(data_dir) else ""
        reason = exc.strerror or str(exc)
        raise StorageError(exc.errno or errno.EIO, f"writing {data_dir}: {reason}{where}") from exc


def _write(
    data_dir: Path, files: Mapping[str, FileContent], gid: int | None, selinux_context: str | None
) -> None:
    try:
        os.mkdir(data_dir, 0o700)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(data_dir).st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(data_dir)) from None
    _set_owner_mode(data_dir, gid)
    _label(data_dir, selinux_context)
    current = _current(data_dir)
    _remove_stale(data_dir, keep=current)
    if current is None or not _unchanged(data_dir / current, files, gid, selinux_context):
        current = _write_generation(data_dir, files, gid, selinux_context)
        os.symlink(current, data_dir / _DATA_TMP)
        _label(data_dir / _DATA_TMP, selinux_context)
        os.rename(data_dir / _DATA_TMP, data_dir / DATA_LINK)
        _fsync_dir(data_dir)
    for name in files:
        link = f"{DATA_LINK}/{name}"
        try:
            if os.readlink(data_dir / name) == link:
                continue
        except OSError:
            pass
        _replace_symlink(data_dir, name, link, selinux_context)
    for name in os.listdir(data_dir):
        if not name.startswith("..") and name not in files and not _is_socket(data_dir / name):
            _remove(data_dir / name)
    _remove_stale(data_dir, keep=current)
    _fsync_dir(data_dir)
