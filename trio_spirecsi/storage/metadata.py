"""Per-volume state on disk: ``<state_dir>/<volume folder>/metadata.json`` beside ``data/``.

The metadata is what a restarted driver needs to resume a volume without the API server. It is
replaced atomically (temp file, fsync, rename, fsync of the folder), so after a crash a folder
holds either the previous complete record, the new one, or none (an orphan of a publish that
never finished). On tmpfs, where nothing outlives the machine and the page cache outlives the
driver, the fsyncs are skipped (:mod:`.sync`); the temp file and rename stay.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trio_spirecsi.log import event
from trio_spirecsi.storage.errors import StorageError
from trio_spirecsi.storage.mount import MountInfo, fs_location, mount_table
from trio_spirecsi.storage.sync import fsync_dir, fsync_needed

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
DATA_DIR = "data"
CORRUPT_DIR = ".corrupt"
NOTE_FILE = "set-aside.json"
DEFAULT_KEEP_CORRUPT = 32
_KEY_MARK = b"PRIVATE KEY"
_MAX_REASON = 2000
_TMP_PREFIX = f".{METADATA_FILE}."
_TMP_SUFFIX = ".tmp"
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
_MAX_DEPTH = 64
_FIELDS = {
    "volume_id": str,
    "target_path": str,
    "spec": dict,
    "volume_mount_group": str,
    "node_id": str,
    "created_at": float,
    "version": int,
}


class MetadataError(ValueError):
    """A metadata record is malformed; the message says what is wrong."""


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise MetadataError("duplicate key in a JSON object")
    return doc


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise MetadataError(f"number out of range: {text[:20]}")
    return value


def _no_constant(name: str) -> Any:
    raise MetadataError(f"{name} is not valid JSON")


@dataclass(frozen=True)
class VolumeMetadata:
    """Everything needed to resume one published volume. ``spec`` is the canonical form of the
    volume attributes (JSON values only), stored as is."""

    volume_id: str
    target_path: str
    spec: dict[str, Any] = field(hash=False)
    volume_mount_group: str
    node_id: str
    created_at: float
    version: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        """The record as UTF-8 JSON (one line); raises MetadataError unless it reads back equal.

        What :meth:`from_json` accepts is checked on the values themselves, so the text is
        produced once and never parsed again here.
        """
        problem = self._json_problem()
        if problem is not None:
            raise MetadataError(
                f"volume {self.volume_id!r:.80} does not survive a JSON round trip: {problem}"
            )
        doc = {name: getattr(self, name) for name in _FIELDS}
        try:
            text = json.dumps(doc, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise MetadataError(f"volume {self.volume_id!r} is not serializable: {exc}") from exc
        return text.encode() + b"\n"

    def _json_problem(self) -> str | None:
        """Why :meth:`from_json` would not give this record back, or None."""
        for name in ("volume_id", "target_path", "node_id", "volume_mount_group"):
            value = getattr(self, name)
            if type(value) is not str:
                return f"{name} is not a str"
            if not value and name != "volume_mount_group":
                return f"{name} is empty"
        created = self.created_at
        if type(created) is int:
            try:
                if float(created) != created:
                    return "created_at does not fit a float"
            except OverflowError:
                return "created_at is out of range"
        elif type(created) is not float or not math.isfinite(created):
            return "created_at is not a finite number"
        if type(self.version) is not int or self.version != FORMAT_VERSION:
            return f"version {self.version!r:.20} is not {FORMAT_VERSION}"
        if type(self.spec) is not dict:
            return "spec is not a dict"
        return _json_value_problem(self.spec, 0)

    @classmethod
    def from_json(cls, data: bytes) -> VolumeMetadata:
        """Parse a record; anything malformed raises MetadataError (and nothing else)."""
        try:
            doc = json.loads(
                data.decode("utf-8"),
                object_pairs_hook=_reject_duplicates,
                parse_float=_finite,
                parse_constant=_no_constant,
            )
        except MetadataError:
            raise
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise MetadataError(f"not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise MetadataError("not a JSON object")
        version = doc.get("version")
        if type(version) is not int or version != FORMAT_VERSION:
            raise MetadataError(f"unsupported format version {version!r:.20}")
        if doc.keys() != _FIELDS.keys():
            missing = sorted(_FIELDS.keys() - doc.keys())
            unknown = sorted(doc.keys() - _FIELDS.keys())
            raise MetadataError(f"missing fields {missing}, unknown fields {unknown!r:.200}")
        for name, kind in _FIELDS.items():
            value = doc[name]
            if kind is float and type(value) is int:
                try:
                    doc[name] = value = float(value)
                except OverflowError:
                    raise MetadataError(f"{name} is out of range") from None
            if type(value) is not kind:
                raise MetadataError(f"{name} must be {kind.__name__}, not {type(value).__name__}")
        for name in ("volume_id", "target_path", "node_id"):
            if not doc[name]:
                raise MetadataError(f"{name} is empty")
        return cls(**doc)


def _json_value_problem(value: Any, depth: int) -> str | None:
    """Why ``value`` would not read back equal from JSON (a tuple, a set, a non-str key, NaN,
    bytes, an int too long, nesting too deep), or None."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return None
    if kind is int:
        if value.bit_length() > 10_000:  # beyond Python's int/str digit limit?
            try:
                str(value)
            except ValueError:
                return "an integer is too long"
        return None
    if kind is float:
        return None if math.isfinite(value) else "a number is not finite"
    if depth >= _MAX_DEPTH:
        return "spec is nested too deep"
    if kind is list:
        for item in value:
            problem = _json_value_problem(item, depth + 1)
            if problem is not None:
                return problem
        return None
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                return "a key is not a str"
            problem = _json_value_problem(item, depth + 1)
            if problem is not None:
                return problem
        return None
    return f"a {kind.__name__} is not a JSON value"


@dataclass(frozen=True)
class LoadResult:
    """What :meth:`MetadataStore.load_all` found; folders in each list are sorted by name."""

    valid: list[VolumeMetadata]
    corrupt: list[Path]
    orphans: list[Path]


def _mkdir_private(path: Path) -> bool:
    """Create ``path`` 0700; False if it already was a folder."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise StorageError(errno.ENOTDIR, f"{path} exists and is not a folder") from None
        return False
    os.chmod(path, 0o700)
    return True


def folder_name(volume_id: str) -> str:
    """The volume id when it is a safe file name (kubelet's ``csi-<sha256>`` ids are), else
    ``v-<sha256 of the id>``. Ids starting with ``v-`` are always hashed, so two ids never
    share a folder, and no name starts with a dot."""
    if _SAFE_NAME.fullmatch(volume_id) and not volume_id.startswith((".", "v-")):
        return volume_id
    return "v-" + hashlib.sha256(volume_id.encode("utf-8", "surrogatepass")).hexdigest()


class MetadataStore:
    """One folder per volume under ``state_dir`` (created 0700 if missing).

    ``state_dir`` is resolved once, here (symlinks in the configured path are the operator's);
    nothing below it is ever followed. ``keep_corrupt`` bounds how many set-aside folders
    ``.corrupt/`` keeps (the newest), so a crash loop cannot fill the tmpfs.

    ``fsync`` says whether writes are made durable with fsync; by default they are, unless the
    state folder is on tmpfs or ramfs (decided once, here). Volume files written below it
    should follow the same choice (``write_atomically(..., fsync=store.fsync)``).
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        keep_corrupt: int = DEFAULT_KEEP_CORRUPT,
        fsync: bool | None = None,
    ) -> None:
        if keep_corrupt < 0:
            raise ValueError(f"keep_corrupt must be 0 or more, not {keep_corrupt}")
        self.keep_corrupt = keep_corrupt
        self.state_dir = Path(os.path.realpath(state_dir))
        with _storage_errors(f"creating the state folder {self.state_dir}"):
            self.state_dir.parent.mkdir(parents=True, exist_ok=True)
            _mkdir_private(self.state_dir)
        self.fsync = fsync_needed(self.state_dir) if fsync is None else fsync

    def _sync_dir(self, path: Path) -> None:
        if self.fsync:
            fsync_dir(path)

    def volume_dir(self, volume_id: str) -> Path:
        """The volume's folder, named by :func:`folder_name`."""
        return self.state_dir / folder_name(volume_id)

    def data_dir(self, volume_id: str) -> Path:
        """Where the volume's files are written; the source of its bind mount."""
        return self.volume_dir(volume_id) / DATA_DIR

    def write(self, md: VolumeMetadata) -> Path:
        """Create the volume folder (0700) if needed and replace its metadata atomically.
        Raises StorageError (ENOSPC, EROFS, ...) naming the folder."""
        payload = md.to_json()
        folder = self.volume_dir(md.volume_id)
        with _storage_errors(f"writing the metadata of volume {md.volume_id!r:.80} in {folder}"):
            created = _mkdir_private(folder)
            tmp = folder / f"{_TMP_PREFIX}{secrets.token_hex(8)}{_TMP_SUFFIX}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o600)
            try:
                try:
                    _write_all(fd, payload)
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, folder / METADATA_FILE)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            self._sync_dir(folder)
            if created:
                self._sync_dir(self.state_dir)
        return folder

    def read(self, volume_id: str) -> VolumeMetadata | None:
        """The volume's metadata, None if it has none; MetadataError if it is corrupt."""
        try:
            return VolumeMetadata.from_json(_read_nofollow(self.volume_dir(volume_id)))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise MetadataError(f"unreadable: {exc}") from exc

    def load_all(self) -> LoadResult:
        """Sort every volume folder into valid, corrupt and orphan; drop metadata temp files.

        A record whose volume id does not map to the folder it is in counts as corrupt.
        Also tidies ``.corrupt/``: deletes anything but metadata and notes left there by an
        older driver (which kept whole folders, keys included) and keeps the newest
        ``keep_corrupt`` entries; problems there are logged, never raised.
        """
        self._tidy_corrupt()
        valid: list[VolumeMetadata] = []
        corrupt: list[Path] = []
        orphans: list[Path] = []
        with _storage_errors(f"reading the state folder {self.state_dir}"):
            names = sorted(os.listdir(self.state_dir))
        for name in names:
            folder = self.state_dir / name
            try:
                if name == CORRUPT_DIR or not stat.S_ISDIR(os.lstat(folder).st_mode):
                    continue
                for leftover in os.listdir(folder):
                    if leftover.startswith(_TMP_PREFIX) and leftover.endswith(_TMP_SUFFIX):
                        (folder / leftover).unlink(missing_ok=True)
            except FileNotFoundError:
                continue
            except OSError as exc:
                event(log, logging.WARNING, "metadata_corrupt", folder=str(folder), error=exc)
                corrupt.append(folder)
                continue
            try:
                md = VolumeMetadata.from_json(_read_nofollow(folder))
                if self.volume_dir(md.volume_id) != folder:
                    raise MetadataError(f"volume id {md.volume_id!r:.80} belongs elsewhere")
            except FileNotFoundError:
                orphans.append(folder)
            except (OSError, MetadataError) as exc:
                event(log, logging.WARNING, "metadata_corrupt", folder=str(folder), error=exc)
                corrupt.append(folder)
            else:
                valid.append(md)
        return LoadResult(valid=valid, corrupt=corrupt, orphans=orphans)

    def set_aside(self, path: Path, reason: str = "") -> Path:
        """Set aside a volume folder the driver cannot serve, keeping what a person needs to see
        why and nothing secret; return the new entry, ``.corrupt/<name>-<UTC time>``.

        The entry gets the folder's ``metadata.json`` (unless it is not a plain file or holds a
        private key) and ``set-aside.json`` (``reason``, the time, what was deleted). Everything
        else (``data/`` with every generation, key, bundle, token and socket) is deleted where
        it is, before anything moves, so no key ever enters ``.corrupt``; then the folder is
        removed. Only the newest ``keep_corrupt`` entries are kept.

        Files a pod still sees through a bind mount of ``data/`` are deleted too (the pod's
        mount then shows an empty folder); the unmount at unpublish still recognises that
        mount as the driver's, by the deleted folder's place in mountinfo.

        Raises StorageError, changing nothing, if something is mounted inside the folder
        (deleting would reach into another filesystem) or it is not a folder; if a deletion
        fails midway, StorageError names what is left, and nothing was moved.
        """
        path = self._child(path)
        try:
            mode = os.lstat(path).st_mode
        except OSError as exc:
            raise StorageError(exc.errno, f"cannot set {path} aside: {exc.strerror}") from None
        if not stat.S_ISDIR(mode):
            raise StorageError(errno.ENOTDIR, f"cannot set {path} aside: it is not a folder")
        table = mount_table()
        inside = _mounts_inside(path, table)
        if inside:
            raise StorageError(
                errno.EBUSY,
                f"refusing to set {path} aside: {inside[0]} is a mount point inside it; "
                "nothing was changed (unmount it, then restart the driver)",
            )
        pods = _bound_elsewhere(path, table)
        keep, deleted = _scrub(path, f"setting {path} aside", fsync=self.fsync)
        corrupt = self.state_dir / CORRUPT_DIR
        with _storage_errors(f"setting {path} aside (its keys are already deleted)"):
            _mkdir_private(corrupt)
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            dest = corrupt / f"{path.name}-{stamp}"
            n = 1
            while os.path.lexists(dest):
                dest = corrupt / f"{path.name}-{stamp}-{n}"
                n += 1
            os.mkdir(dest, 0o700)
            note = {
                "folder": path.name,
                "reason": reason[:_MAX_REASON],
                "set_aside_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "metadata_kept": keep,
                "deleted": deleted,
                "was_mounted_at": [str(p) for p in pods],
            }
            _write_new(dest / NOTE_FILE, json.dumps(note, indent=2).encode() + b"\n", self.fsync)
            if keep:
                os.rename(path / METADATA_FILE, dest / METADATA_FILE)
                os.chmod(dest / METADATA_FILE, 0o600)
            os.rmdir(path)
            os.chmod(dest, 0o700)
            self._sync_dir(dest)
            self._sync_dir(corrupt)
            self._sync_dir(self.state_dir)
        if pods:
            event(
                log,
                logging.WARNING,
                "set_aside_while_mounted",
                folder=str(path),
                mounted_at=",".join(map(str, pods)),
            )
        self._cap_corrupt()
        return dest

    def _tidy_corrupt(self) -> None:
        corrupt = self.state_dir / CORRUPT_DIR
        try:
            names = os.listdir(corrupt)
        except FileNotFoundError:
            return
        except OSError as exc:
            event(log, logging.WARNING, "corrupt_tidy_failed", folder=str(corrupt), error=exc)
            return
        table: list[MountInfo] | None = None
        for name in names:
            entry = corrupt / name
            try:
                if not stat.S_ISDIR(os.lstat(entry).st_mode):
                    continue
                if _only_notes(entry):
                    continue
                table = mount_table() if table is None else table
                inside = _mounts_inside(entry, table)
                if inside:
                    raise StorageError(errno.EBUSY, f"{inside[0]} is a mount point inside it")
                _keep, deleted = _scrub(
                    entry, f"tidying {entry}", keep_names={NOTE_FILE}, fsync=self.fsync
                )
            except OSError as exc:
                event(log, logging.WARNING, "corrupt_tidy_failed", folder=str(entry), error=exc)
            else:
                event(log, logging.INFO, "corrupt_scrubbed", folder=str(entry), deleted=deleted)
        self._cap_corrupt()

    def _cap_corrupt(self) -> None:
        """Delete the oldest entries of ``.corrupt`` beyond ``keep_corrupt`` (by change time:
        an entry's last change is when it was set aside)."""
        corrupt = self.state_dir / CORRUPT_DIR
        try:
            names = os.listdir(corrupt)
        except OSError:
            return
        if len(names) <= self.keep_corrupt:
            return
        aged = []
        for name in names:
            try:
                aged.append((os.lstat(corrupt / name).st_ctime_ns, name))
            except FileNotFoundError:
                continue
        aged.sort()
        table = mount_table()
        for _ctime, name in aged[: max(len(aged) - self.keep_corrupt, 0)]:
            entry = corrupt / name
            try:
                inside = _mounts_inside(entry, table)
                if inside:
                    raise StorageError(errno.EBUSY, f"{inside[0]} is a mount point inside it")
                with _storage_errors(f"deleting {entry}"):
                    if stat.S_ISDIR(os.lstat(entry).st_mode):
                        shutil.rmtree(entry)
                    else:
                        os.unlink(entry)
            except OSError as exc:
                event(log, logging.WARNING, "corrupt_prune_failed", folder=str(entry), error=exc)
            else:
                event(log, logging.INFO, "corrupt_pruned", folder=str(entry))

    def remove(self, volume_id: str) -> None:
        """Delete the volume's folder; idempotent. See :meth:`remove_folder`."""
        # Its name comes from folder_name: a child of the state folder by construction.
        self._remove(self.volume_dir(volume_id))

    def remove_folder(self, path: Path) -> None:
        """Delete a volume folder (e.g. an orphan from :meth:`load_all`); missing is fine.

        Never follows a symlink (a symlinked folder is unlinked, not its target). Raises
        StorageError, deleting nothing, while anything is mounted inside the folder or a
        folder inside it is still the source of a bind mount: deleting would remove files a
        pod still sees. Other failures raise StorageError naming the path.
        """
        self._remove(self._child(path))

    def _remove(self, path: Path) -> None:
        try:
            os.lstat(path)
        except FileNotFoundError:
            return  # the usual case (a new volume): nothing to describe or sync
        except OSError:
            pass  # reported below
        with _storage_errors(f"removing {path}"):
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                return
            if not stat.S_ISDIR(mode):
                os.unlink(path)
            else:
                busy = _mounted_from(path)
                if busy is not None:
                    raise StorageError(errno.EBUSY, f"refusing to remove {path}: {busy}")
                shutil.rmtree(path)
            self._sync_dir(self.state_dir)

    def removal_blocker(self, volume_id: str, *, target: Path | None = None) -> str | None:
        """Why the volume's folder could not be removed once its mount at ``target`` is gone
        (a mount inside it, its data mounted elsewhere), or None. Lets unpublish refuse
        before it stops or unmounts anything, instead of failing halfway."""
        folder = self.volume_dir(volume_id)
        if not folder.is_dir():
            return None
        expected = Path(os.path.realpath(target)) if target is not None else None
        busy = _mounted_from(folder, expected)
        return f"cannot remove {folder}: {busy}" if busy is not None else None

    def _child(self, path: Path) -> Path:
        path = Path(os.path.abspath(path))
        if path.parent != self.state_dir or path.name in (CORRUPT_DIR, "..", "."):
            raise StorageError(errno.EINVAL, f"{path} is not a volume folder of {self.state_dir}")
        return path


@contextmanager
def _storage_errors(what: str) -> Iterator[None]:
    """Turn an OSError into a StorageError that says what was being done, and on which path."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        reason = exc.strerror or str(exc)
        raise StorageError(exc.errno or errno.EIO, f"{what}: {reason}{where}") from exc


def _write_all(fd: int, payload: bytes) -> None:
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view) :]


def _write_new(path: Path, payload: bytes, fsync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, payload)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _read_nofollow(folder: Path) -> bytes:
    fd = os.open(folder / METADATA_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def _holds_key(path: Path) -> bool:
    """Whether a file may hold a private key (unreadable counts as yes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            return _KEY_MARK in fh.read()
    except OSError:
        return True


def _only_notes(entry: Path) -> bool:
    """Whether a ``.corrupt`` entry holds nothing but a plain metadata file and a note."""
    for item in os.scandir(entry):
        if item.name not in (METADATA_FILE, NOTE_FILE) or not item.is_file(follow_symlinks=False):
            return False
        if item.name == METADATA_FILE and _holds_key(Path(item.path)):
            return False
    return True


def _scrub(
    folder: Path,
    what: str,
    keep_names: frozenset[str] | set[str] = frozenset(),
    *,
    fsync: bool = True,
) -> tuple[bool, list[str]]:
    """Delete everything in ``folder`` except a plain ``metadata.json`` without a private key
    (and ``keep_names``); whether that metadata is kept, and the names deleted. Symlinks are
    deleted, never followed."""
    keep = False
    deleted: list[str] = []
    with _storage_errors(f"{what}: deleting its files failed, the folder stays where it is"):
        for item in sorted(os.scandir(folder), key=lambda e: e.name):
            plain = item.is_file(follow_symlinks=False)
            if item.name == METADATA_FILE and plain and not _holds_key(Path(item.path)):
                keep = True
                continue
            if item.name in keep_names and plain:
                continue
            if item.is_dir(follow_symlinks=False):
                shutil.rmtree(item.path)
            else:
                os.unlink(item.path)
            deleted.append(item.name)
        if fsync:
            fsync_dir(folder)
    return keep, deleted


def _mounts_inside(folder: Path, table: Sequence[MountInfo]) -> list[Path]:
    """Mount points at or below ``folder``."""
    return [m.mount_point for m in table if m.mount_point.is_relative_to(folder)]


def _bound_elsewhere(folder: Path, table: Sequence[MountInfo]) -> list[Path]:
    """Where ``folder`` or a folder inside it is the source of a bind mount (by device and
    mountinfo root, so a mount hidden under another one counts too)."""
    location = fs_location(folder, table)
    if location is None:
        return []
    device, root = location
    return [
        m.mount_point
        for m in table
        if m.device == device
        and m.root.is_relative_to(root)
        and not m.mount_point.is_relative_to(folder)
    ]


def _mounted_from(folder: Path, expected: Path | None = None) -> str | None:
    """Why ``folder`` must not be deleted: a mount inside it, or a bind mount of a folder
    inside it elsewhere (other than at ``expected``, the target about to be unmounted). None
    when it is safe."""
    table = mount_table()
    inside = _mounts_inside(folder, table)
    if inside:
        return f"{inside[0]} is a mount point"
    elsewhere = [p for p in _bound_elsewhere(folder, table) if p != expected]
    if elsewhere:
        return f"it is mounted at {elsewhere[0]}"
    return None
