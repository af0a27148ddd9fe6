"""Per-volume state on disk: ``<state_dir>/<volume folder>/metadata.json`` beside ``data/``.

The metadata is what a restarted driver needs to resume a volume without the API server. It is
replaced atomically (temp file, fsync, rename, fsync of the folder), so after a crash a folder
holds either the previous complete record, the new one, or none (an orphan of a publish that
never finished).
"""

from __future__ import annotations

import dataclasses
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trio_spirecsi.log import event
from trio_spirecsi.storage.errors import StorageError
from trio_spirecsi.storage.mount import mount_table

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
DATA_DIR = "data"
CORRUPT_DIR = ".corrupt"
_TMP_PREFIX = f".{METADATA_FILE}."
_TMP_SUFFIX = ".tmp"
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
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
        """The record as UTF-8 JSON; raises MetadataError unless it reads back equal."""
        try:
            text = json.dumps(dataclasses.asdict(self), sort_keys=True, indent=2, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise MetadataError(f"volume {self.volume_id!r} is not serializable: {exc}") from exc
        data = text.encode() + b"\n"
        if VolumeMetadata.from_json(data) != self:
            raise MetadataError(f"volume {self.volume_id!r} does not survive a JSON round trip")
        return data

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


@dataclass(frozen=True)
class LoadResult:
    """What :meth:`MetadataStore.load_all` found; folders in each list are sorted by name."""

    valid: list[VolumeMetadata]
    corrupt: list[Path]
    orphans: list[Path]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """One folder per volume under ``state_dir`` (created 0700 if missing)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(os.path.abspath(state_dir))
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        _mkdir_private(self.state_dir)

    def volume_dir(self, volume_id: str) -> Path:
        """The volume's folder, named by :func:`folder_name`."""
        return self.state_dir / folder_name(volume_id)

    def data_dir(self, volume_id: str) -> Path:
        """Where the volume's files are written; the source of its bind mount."""
        return self.volume_dir(volume_id) / DATA_DIR

    def write(self, md: VolumeMetadata) -> Path:
        """Create the volume folder (0700) if needed and replace its metadata atomically."""
        payload = md.to_json()
        folder = self.volume_dir(md.volume_id)
        created = _mkdir_private(folder)
        tmp = folder / f"{_TMP_PREFIX}{secrets.token_hex(8)}{_TMP_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        try:
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, folder / METADATA_FILE)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(folder)
        if created:
            _fsync_dir(self.state_dir)
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
        """
        valid: list[VolumeMetadata] = []
        corrupt: list[Path] = []
        orphans: list[Path] = []
        for name in sorted(os.listdir(self.state_dir)):
            folder = self.state_dir / name
            if name == CORRUPT_DIR or not stat.S_ISDIR(os.lstat(folder).st_mode):
                continue
            for leftover in os.listdir(folder):
                if leftover.startswith(_TMP_PREFIX) and leftover.endswith(_TMP_SUFFIX):
                    (folder / leftover).unlink(missing_ok=True)
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

    def set_aside(self, path: Path) -> Path:
        """Move a volume folder to ``<state_dir>/.corrupt/<name>-<UTC time>``; return the new
        path. Nothing inside is changed, so keys keep their modes; the folder is 0700."""
        path = self._child(path)
        corrupt = self.state_dir / CORRUPT_DIR
        _mkdir_private(corrupt)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = corrupt / f"{path.name}-{stamp}"
        n = 1
        while os.path.lexists(dest):
            dest = corrupt / f"{path.name}-{stamp}-{n}"
            n += 1
        os.rename(path, dest)
        if not dest.is_symlink():
            os.chmod(dest, 0o700)
        _fsync_dir(corrupt)
        _fsync_dir(self.state_dir)
        return dest

    def remove(self, volume_id: str) -> None:
        """Delete the volume's folder; idempotent. See :meth:`remove_folder`."""
        self.remove_folder(self.volume_dir(volume_id))

    def remove_folder(self, path: Path) -> None:
        """Delete a volume folder (e.g. an orphan from :meth:`load_all`); missing is fine.

        Never follows a symlink (a symlinked folder is unlinked, not its target). Raises
        StorageError, deleting nothing, while anything is mounted inside the folder or a
        folder inside it is still the source of a bind mount: deleting would remove files a
        pod still sees.
        """
        path = self._child(path)
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
        _fsync_dir(self.state_dir)

    def _child(self, path: Path) -> Path:
        path = Path(os.path.abspath(path))
        if path.parent != self.state_dir or path.name in (CORRUPT_DIR, "..", "."):
            raise StorageError(errno.EINVAL, f"{path} is not a volume folder of {self.state_dir}")
        return path


def _read_nofollow(folder: Path) -> bytes:
    fd = os.open(folder / METADATA_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def _mounted_from(folder: Path) -> str | None:
    """Why ``folder`` must not be deleted: a mount inside it, or a bind mount of a folder
    inside it elsewhere (found by device and inode). None when it is safe."""
    real = Path(os.path.realpath(folder))
    dev = os.lstat(real).st_dev
    inodes: set[int] = set()
    for top, dirs, _files in os.walk(real):
        for name in [".", *dirs]:
            inodes.add(os.lstat(os.path.join(top, name)).st_ino)
    for entry in mount_table():
        if entry.mount_point == real or entry.mount_point.is_relative_to(real):
            return f"{entry.mount_point} is a mount point"
        if entry.device != (os.major(dev), os.minor(dev)):
            continue
        try:
            st = os.stat(entry.mount_point)
        except OSError:
            continue
        if st.st_dev == dev and st.st_ino in inodes:
            return f"it is mounted at {entry.mount_point}"
    return None
