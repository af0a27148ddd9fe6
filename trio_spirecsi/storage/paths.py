"""Target paths under the kubelet folder, resolved without following any symlink, then held.

The kubelet names a target by path (``<kubelet-dir>/pods/<uid>/volumes/kubernetes.io~csi/
<name>/mount``), and the folders on that path can change while a publish waits for its first
SVID. :func:`open_target` walks the path one component at a time from the kubelet folder, each
opened with ``O_PATH|O_NOFOLLOW|O_DIRECTORY`` relative to the one before, refusing ``..``,
symlinks and anything outside the kubelet folder, and keeps the target's parent open. Creating
the target, mounting on it, unmounting and removing it all go through that descriptor, never
through the path again: a folder swapped for a symlink after the check redirects nothing.

Publish and resume use the same function, so a target recorded in ``metadata.json`` is checked
by exactly the rules a kubelet request is.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from trio_spirecsi.errors import InvalidArgument
from trio_spirecsi.storage.errors import StorageError

DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
TARGET_MODE = 0o750
_MAX_DEPTH = 4096


class TargetParentMissing(InvalidArgument):
    """A folder on the way to the target does not exist. At publish the kubelet has not made the
    target's parent; for a resumed volume the kubelet removed the pod while the driver was away.
    """


class PathRefused(Exception):
    """:func:`walk` stopped at component ``index`` (-1: the starting folder) for ``reason``."""

    def __init__(self, index: int, err: int, reason: str) -> None:
        super().__init__(index, err, reason)
        self.index = index
        self.errno = err
        self.reason = reason


def split_absolute(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The components of an absolute path; ``.`` and repeated slashes are dropped.

    Raises ValueError (with the reason) for a relative path, a NUL character or ``..``: a
    ``..`` is refused rather than resolved, since resolving it lexically is wrong after a
    symlink and resolving it on disk is what this module avoids.
    """
    text = os.fspath(path)
    if not text.startswith("/"):
        raise ValueError(f"{text!r} must be an absolute path")
    if "\0" in text:
        raise ValueError(f"{text!r} must not contain NUL characters")
    parts = tuple(part for part in text.split("/") if part not in ("", "."))
    if ".." in parts:
        raise ValueError(f"{text!r} must not contain '..'")
    return parts


def _reason(dirfd: int, name: str, exc: OSError) -> str:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        try:
            mode = os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode
        except OSError:
            return "is not a folder"
        return "is a symlink" if stat.S_ISLNK(mode) else "is not a folder"
    if exc.errno == errno.ENOENT:
        return "does not exist"
    return exc.strerror or os.strerror(exc.errno or 0)


def walk(dirfd: int, parts: Sequence[str]) -> int:
    """A new ``O_PATH`` descriptor of ``dirfd/parts[0]/parts[1]/...`` (the caller closes it).

    Each component is opened ``O_NOFOLLOW|O_DIRECTORY`` relative to the previous descriptor,
    so no symlink is followed anywhere on the way. Raises :class:`PathRefused` naming the
    component that failed and why ("is a symlink", "is not a folder", "does not exist").
    """
    try:
        fd = os.open(".", DIR_FLAGS, dir_fd=dirfd)
    except OSError as exc:
        raise PathRefused(-1, exc.errno or errno.EIO, _reason(dirfd, ".", exc)) from None
    try:
        for index, part in enumerate(parts):
            try:
                inner = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise PathRefused(index, exc.errno or errno.EIO, _reason(fd, part, exc)) from None
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def _below(kubelet_dir: Path, parts: tuple[str, ...]) -> tuple[int, tuple[str, ...]] | None:
    """How many leading components name the kubelet folder, and the rest (at least one).
    The folder may be spelled as configured or as its real path."""
    for spell in (os.path.abspath, os.path.realpath):  # resolved only when the first fails
        root = split_absolute(spell(kubelet_dir))
        if len(parts) > len(root) and parts[: len(root)] == root:
            return len(root), parts[len(root) :]
    return None


class TargetDir:
    """A CSI target folder ``path``, its parent held open since :func:`open_target` checked
    every component. The target itself (``name`` in that parent) may not exist yet.

    Everything done to the target goes through the held parent, never through ``path``
    again. Close it (or use it as a context manager) when done: it holds one descriptor.
    ``created`` is True once :meth:`open` made the folder.
    """

    def __init__(
        self,
        path: Path,
        parent_fd: int,
        *,
        field: str,
        kubelet_dir: Path,
        root_id: tuple[int, int],
    ) -> None:
        self.path = path
        self.name = path.name
        self.field = field
        self.kubelet_dir = kubelet_dir
        self.created = False
        self._parent_fd: int | None = parent_fd
        self._root_id = root_id

    @property
    def parent_fd(self) -> int:
        """The held ``O_PATH`` descriptor of the target's parent folder."""
        if self._parent_fd is None:
            raise ValueError(f"the handle of {self.path} is closed")
        return self._parent_fd

    def _refused(self, exc: OSError, what: str) -> InvalidArgument | StorageError:
        reason = _reason(self.parent_fd, self.name, exc)
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return InvalidArgument(
                self.field, f"{str(self.path)!r} {reason}; the target must be a folder"
            )
        return StorageError(exc.errno, f"cannot {what} the target folder {self.path}: {reason}")

    def check_final(self) -> None:
        """Raise InvalidArgument if the target exists and is not a folder (a symlink, a file)."""
        try:
            mode = os.stat(self.name, dir_fd=self.parent_fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._refused(exc, "inspect") from None
        if stat.S_ISLNK(mode):
            raise InvalidArgument(
                self.field, f"{str(self.path)!r} is a symlink; the target must be a folder"
            )
        if not stat.S_ISDIR(mode):
            raise InvalidArgument(
                self.field, f"{str(self.path)!r} is not a folder; the target must be a folder"
            )

    def open(self, *, create: bool = False) -> int | None:
        """A new ``O_PATH`` descriptor of the target folder (the caller closes it); when
        something is mounted on the target, of the topmost mount's root.

        Missing: None, or with ``create``, made mode 0750 first (relative to the held parent).
        A symlink or a file at the target raises InvalidArgument; a parent removed meanwhile
        raises TargetParentMissing; other failures StorageError.
        """
        parent = self.parent_fd
        made = False
        if create:
            try:
                os.mkdir(self.name, TARGET_MODE, dir_fd=parent)
                made = True
            except FileExistsError:
                pass
            except FileNotFoundError:
                raise self._gone() from None
            except OSError as exc:
                raise StorageError(
                    exc.errno, f"cannot create the target folder {self.path}: {exc.strerror}"
                ) from None
        try:
            fd = os.open(self.name, DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                return None
            raise self._gone() from None
        except OSError as exc:
            raise self._refused(exc, "open") from None
        if made:
            self.created = True
            try:
                os.chmod(f"/proc/self/fd/{fd}", TARGET_MODE)  # the umask may have narrowed it
            except OSError as exc:
                os.close(fd)
                raise StorageError(exc.errno, f"chmod {self.path}: {exc.strerror}") from None
        return fd

    def _gone(self) -> TargetParentMissing:
        return TargetParentMissing(
            self.field, f"{str(self.path)!r}: its parent folder was removed (the pod is gone)"
        )

    def check_beneath(self) -> None:
        """Raise InvalidArgument unless the held parent is still inside the kubelet folder.

        A folder can be moved (renamed) after it was opened; this walks ``..`` up from the
        held descriptor, comparing device and inode with the kubelet folder's.
        """
        flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
        try:
            fd = os.open(".", flags, dir_fd=self.parent_fd)
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot check {self.path}: {exc.strerror}") from None
        try:
            for _ in range(_MAX_DEPTH):
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) == self._root_id:
                    return
                up = os.open("..", flags, dir_fd=fd)
                os.close(fd)
                fd = up
                st_up = os.fstat(fd)
                if (st_up.st_dev, st_up.st_ino) == (st.st_dev, st.st_ino):
                    break  # the top of this mount namespace
        except FileNotFoundError:
            raise self._gone() from None
        except OSError as exc:
            raise StorageError(
                exc.errno,
                f"cannot check that {self.path} is inside the kubelet folder: {exc.strerror}",
            ) from None
        finally:
            os.close(fd)
        raise InvalidArgument(
            self.field,
            f"{str(self.path)!r}: its parent folder was moved out of the kubelet folder "
            f"{self.kubelet_dir} after it was checked",
        )

    def verify(self) -> None:
        """Raise InvalidArgument unless the held parent is still inside the kubelet folder and
        ``path`` still leads to it (no folder on the way moved, or replaced by a symlink).

        Called right before mounting: a publish whose target was tampered with while it
        waited fails with a message saying so, instead of mounting where the kubelet will
        not look.
        """
        self.check_beneath()
        fresh = open_target(self.kubelet_dir, self.path, field=self.field)
        try:
            now, held = os.fstat(fresh.parent_fd), os.fstat(self.parent_fd)
        finally:
            fresh.close()
        if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            raise InvalidArgument(
                self.field,
                f"{str(self.path)!r}: its parent folder was replaced after it was checked",
            )

    def remove(self) -> bool:
        """Remove the target folder if it is empty and nothing is mounted on it: True if it
        was removed; False (nothing changed) if missing, not empty, busy or not a folder."""
        try:
            os.rmdir(self.name, dir_fd=self.parent_fd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST, errno.EBUSY):
                return False
            if exc.errno == errno.ENOTDIR:
                return False
            raise StorageError(
                exc.errno, f"cannot remove the target folder {self.path}: {exc.strerror}"
            ) from None
        return True

    def close(self) -> None:
        """Release the held descriptor; idempotent."""
        if self._parent_fd is not None:
            fd, self._parent_fd = self._parent_fd, None
            os.close(fd)

    def __enter__(self) -> TargetDir:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._parent_fd is None else f"parent fd {self._parent_fd}"
        return f"TargetDir({str(self.path)!r}, {state})"


def check_target_path(
    kubelet_dir: Path | str, path: Path | str, *, field: str = "target_path"
) -> Path:
    """The target path as written, if it is absolute, has no ``..`` or NUL and names a
    folder below the kubelet folder; InvalidArgument for ``field`` otherwise. Only the
    spelling is checked here (cheap, for every kubelet call); :func:`open_target` then walks
    the folders without following symlinks before anything is mounted."""
    return _checked(Path(kubelet_dir), path, field)[0]


def _checked(
    kubelet_dir: Path, path: Path | str, field: str
) -> tuple[Path, int, tuple[str, ...], tuple[str, ...]]:
    """(the path, how many components name the kubelet folder, the rest, all components)."""
    try:
        parts = split_absolute(path)
    except ValueError as exc:
        raise InvalidArgument(field, str(exc)) from None
    shown = "/" + "/".join(parts)
    found = _below(kubelet_dir, parts)
    if found is None:
        raise InvalidArgument(
            field,
            f"{shown!r} is outside the kubelet folder {kubelet_dir} (--kubelet-dir); "
            "set --kubelet-dir to the kubelet's root folder",
        )
    skipped, rest = found
    return Path(shown), skipped, rest, parts


def open_target(
    kubelet_dir: Path | str, path: Path | str, *, field: str = "target_path"
) -> TargetDir:
    """Check ``path`` (a CSI target) under ``kubelet_dir`` and hold its parent folder.

    Every component between the kubelet folder and the target's parent must be a real
    folder: ``..``, a symlink, a file, or a path outside the kubelet folder raise
    InvalidArgument for ``field`` with a message naming the path and the component; a missing
    folder raises TargetParentMissing (a subclass). The target itself may be missing; if it
    exists it must be a folder. The kubelet folder itself is opened as configured (symlinks in
    ``--kubelet-dir`` are the operator's); the target may name it by that spelling or by its
    real path. System failures (EMFILE, EACCES) raise StorageError.
    """
    kubelet_dir = Path(kubelet_dir)
    checked, skipped, rest, parts = _checked(kubelet_dir, path, field)
    shown = str(checked)
    try:
        root_fd = os.open(kubelet_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise StorageError(
            exc.errno, f"the kubelet folder {kubelet_dir} (--kubelet-dir): {exc.strerror}"
        ) from None
    try:
        st = os.fstat(root_fd)
        parent_fd = walk(root_fd, rest[:-1])
    except PathRefused as exc:
        component = "/" + "/".join(parts[: skipped + max(exc.index, 0) + 1])
        message = f"{shown!r}: component {component!r} {exc.reason}"
        if exc.errno == errno.ENOENT:
            raise TargetParentMissing(field, message) from None
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENAMETOOLONG):
            raise InvalidArgument(field, message) from None
        raise StorageError(exc.errno, message) from None
    finally:
        os.close(root_fd)
    target = TargetDir(
        Path(shown),
        parent_fd,
        field=field,
        kubelet_dir=kubelet_dir,
        root_id=(st.st_dev, st.st_ino),
    )
    try:
        target.check_final()
    except BaseException:
        target.close()
        raise
    return target


__all__ = [
    "TARGET_MODE",
    "PathRefused",
    "TargetDir",
    "TargetParentMissing",
    "check_target_path",
    "open_target",
    "split_absolute",
    "walk",
]
