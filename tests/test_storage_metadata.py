"""The metadata format and the per-volume folders of the state directory."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_spirecsi.storage import (
    FileContent,
    LinuxMounter,
    MetadataError,
    MetadataStore,
    StorageError,
    VolumeMetadata,
    write_atomically,
)
from trio_spirecsi.storage.metadata import folder_name

KUBELET_ID = "csi-" + "ab" * 32


def _md(volume_id: str = KUBELET_ID, **changes: Any) -> VolumeMetadata:
    fields: dict[str, Any] = {
        "volume_id": volume_id,
        "target_path": f"/var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/{volume_id}/mount",
        "spec": {"pod": {"name": "web", "namespace": "prod"}, "jwt_audiences": ["a", "b"]},
        "volume_mount_group": "1234",
        "node_id": "node-a",
        "created_at": 1764226522.25,
    }
    fields.update(changes)
    return VolumeMetadata(**fields)


def _doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(_md().to_json())
    doc.update(changes)
    return doc


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
metadata = st.builds(
    VolumeMetadata,
    volume_id=st.text(min_size=1),
    target_path=st.text(min_size=1),
    spec=st.dictionaries(st.text(), json_values, max_size=5),
    volume_mount_group=st.text(),
    node_id=st.text(min_size=1),
    created_at=st.floats(allow_nan=False, allow_infinity=False),
)


@given(metadata)
def test_every_record_survives_a_json_round_trip(md: VolumeMetadata) -> None:
    assert VolumeMetadata.from_json(md.to_json()) == md


@settings(max_examples=500)
@given(st.binary())
def test_arbitrary_bytes_raise_only_metadata_error(data: bytes) -> None:
    with contextlib.suppress(MetadataError):
        VolumeMetadata.from_json(data)


@settings(max_examples=300)
@given(json_values)
def test_arbitrary_json_raises_only_metadata_error(doc: Any) -> None:
    with pytest.raises(MetadataError):
        VolumeMetadata.from_json(json.dumps(doc).encode())


@given(st.sampled_from(sorted(_doc())), json_values)
def test_any_field_replaced_by_any_value_is_parsed_or_named(field: str, value: Any) -> None:
    try:
        md = VolumeMetadata.from_json(json.dumps(_doc(**{field: value})).encode())
    except MetadataError as exc:
        assert field in str(exc) or "version" in str(exc)
    else:
        expected = float(value) if field == "created_at" else value
        assert getattr(md, field) == expected


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"[" * 100_000, "not JSON"),
        (json.dumps(_doc(version=2)).encode(), "version 2"),
        (json.dumps(_doc(version="1")).encode(), "version '1'"),
        (json.dumps(_doc(version=True)).encode(), "version True"),
        (json.dumps(_doc(created_at=True)).encode(), "created_at must be float"),
        (json.dumps(_doc(spec=[])).encode(), "spec must be dict"),
        (json.dumps(_doc(volume_id="")).encode(), "volume_id is empty"),
        (json.dumps(_doc(extra=1)).encode(), "unknown fields ['extra']"),
        (json.dumps({k: v for k, v in _doc().items() if k != "node_id"}).encode(), "node_id"),
        (_md().to_json().replace(b"1764226522.25", b"NaN"), "NaN"),
        (_md().to_json().replace(b"1764226522.25", b"1e999"), "out of range"),
        (_md().to_json().replace(b"1764226522.25", b"9" * 400), "created_at is out of range"),
        (_md().to_json().replace(b'"node_id"', b'"node_id": "x", "node_id"'), "duplicate"),
    ],
)
def test_malformed_records_say_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(MetadataError, match=re.escape(message)):
        VolumeMetadata.from_json(data)


@pytest.mark.parametrize(
    "spec",
    [{"a": (1, 2)}, {"a": {1, 2}}, {"a": {1: "int key"}}, {"a": float("nan")}, {"a": b"x"}],
)
def test_a_spec_that_would_not_read_back_equal_is_refused(spec: dict[str, Any]) -> None:
    with pytest.raises(MetadataError):
        _md(spec=spec).to_json()


def test_the_format_is_readable_json_with_a_version() -> None:
    doc = json.loads(_md().to_json())
    assert doc["version"] == 1
    assert doc["spec"]["pod"] == {"name": "web", "namespace": "prod"}
    assert doc["created_at"] == 1764226522.25


@pytest.fixture
def store(tmp_path: Path) -> MetadataStore:
    return MetadataStore(tmp_path / "state")


def test_the_state_dir_is_created_private(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "run" / "state")
    assert stat.S_IMODE(os.stat(store.state_dir).st_mode) == 0o700


def test_an_existing_state_dir_is_used_as_is(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir(mode=0o755)
    (tmp_path / "state" / "keep").write_text("x")
    MetadataStore(tmp_path / "state")
    assert (tmp_path / "state" / "keep").read_text() == "x"


@pytest.mark.parametrize("volume_id", [KUBELET_ID, "vol-1", "a.b_c-D", "x" * 128])
def test_safe_volume_ids_name_their_folder(store: MetadataStore, volume_id: str) -> None:
    assert store.volume_dir(volume_id) == store.state_dir / volume_id


@pytest.mark.parametrize(
    "volume_id", ["../x", "a/b", ".hidden", "..", "", "x" * 129, "v-abc", "é", "a b"]
)
def test_other_volume_ids_are_hashed(store: MetadataStore, volume_id: str) -> None:
    digest = hashlib.sha256(volume_id.encode()).hexdigest()
    assert store.volume_dir(volume_id) == store.state_dir / f"v-{digest}"


@given(st.text(), st.text())
def test_distinct_ids_get_distinct_plain_folder_names(a: str, b: str) -> None:
    for volume_id in (a, b):
        name = folder_name(volume_id)
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,128}", name)
        assert not name.startswith(".")
    assert (folder_name(a) == folder_name(b)) == (a == b)


@given(st.text(alphabet="abv-", max_size=6))
def test_ids_that_look_hashed_cannot_collide(volume_id: str) -> None:
    hashed = folder_name(volume_id)
    assert folder_name(hashed) != hashed or hashed == volume_id


def test_write_creates_a_private_folder_with_the_record(store: MetadataStore) -> None:
    md = _md()
    folder = store.write(md)

    assert folder == store.volume_dir(md.volume_id)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert os.listdir(folder) == ["metadata.json"]
    assert VolumeMetadata.from_json((folder / "metadata.json").read_bytes()) == md
    assert store.read(md.volume_id) == md


def test_write_replaces_the_record(store: MetadataStore) -> None:
    store.write(_md())
    store.write(_md(node_id="node-b"))

    loaded = store.read(KUBELET_ID)
    assert loaded is not None and loaded.node_id == "node-b"
    assert os.listdir(store.volume_dir(KUBELET_ID)) == ["metadata.json"]


def test_a_failed_write_keeps_the_previous_record(
    store: MetadataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.write(_md())

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        store.write(_md(node_id="node-b"))
    monkeypatch.undo()

    assert store.read(KUBELET_ID) == _md()
    assert os.listdir(store.volume_dir(KUBELET_ID)) == ["metadata.json"]


def test_read_of_an_unknown_volume_is_none(store: MetadataStore) -> None:
    assert store.read("unknown") is None


def _corrupt(store: MetadataStore, name: str, content: bytes) -> Path:
    folder = store.state_dir / name
    folder.mkdir(mode=0o700)
    (folder / "metadata.json").write_bytes(content)
    return folder


def test_load_all_sorts_folders_into_valid_corrupt_and_orphans(store: MetadataStore) -> None:
    ids = ["vol-b", "vol-a", "weird/id"]
    for volume_id in ids:
        store.write(_md(volume_id))
    broken = _corrupt(store, "vol-c", b'{"version": 1, "volume_id": ')
    misplaced = _corrupt(store, "vol-d", _md("vol-e").to_json())
    linked = store.state_dir / "vol-f"
    linked.mkdir()
    (linked / "metadata.json").symlink_to(store.volume_dir("vol-a") / "metadata.json")
    orphan = store.state_dir / "vol-g"
    (orphan / "data").mkdir(parents=True)
    (store.state_dir / "stray-file").write_text("x")
    (store.state_dir / ".corrupt").mkdir()

    result = store.load_all()

    assert sorted(md.volume_id for md in result.valid) == sorted(ids)
    assert result.corrupt == [broken, misplaced, linked]
    assert result.orphans == [orphan]


def test_load_all_removes_temp_files_of_an_interrupted_write(store: MetadataStore) -> None:
    folder = store.write(_md())
    (folder / ".metadata.json.0123456789abcdef.tmp").write_bytes(b'{"trunc')
    empty = store.state_dir / "vol-x"
    empty.mkdir()
    (empty / ".metadata.json.feedfacefeedface.tmp").write_bytes(b"")

    result = store.load_all()

    assert [md.volume_id for md in result.valid] == [KUBELET_ID]
    assert result.orphans == [empty]
    assert os.listdir(folder) == ["metadata.json"]
    assert os.listdir(empty) == []


def test_an_empty_state_dir_loads_nothing(store: MetadataStore) -> None:
    result = store.load_all()
    assert (result.valid, result.corrupt, result.orphans) == ([], [], [])


def test_set_aside_keeps_a_corrupt_folder_with_its_modes(store: MetadataStore) -> None:
    folder = _corrupt(store, "vol-c", b"garbage")
    write_atomically(folder / "data", {"svid_key.pem": FileContent(b"key", 0o600)}, gid=None)

    moved = store.set_aside(folder)

    assert not folder.exists()
    assert moved.parent == store.state_dir / ".corrupt"
    assert re.fullmatch(r"vol-c-\d{8}T\d{6}Z", moved.name)
    assert (moved / "metadata.json").read_bytes() == b"garbage"
    assert (moved / "data" / "svid_key.pem").read_bytes() == b"key"
    assert stat.S_IMODE(os.stat(moved / "data" / "svid_key.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(moved).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(moved.parent).st_mode) == 0o700
    assert store.load_all().corrupt == []


def test_setting_aside_the_same_name_twice_keeps_both(store: MetadataStore) -> None:
    first = store.set_aside(_corrupt(store, "vol-c", b"one"))
    second = store.set_aside(_corrupt(store, "vol-c", b"two"))

    assert first != second
    assert (first / "metadata.json").read_bytes() == b"one"
    assert (second / "metadata.json").read_bytes() == b"two"


@pytest.mark.parametrize("path", ["/etc", "state/.corrupt", "state/a/b", "state"])
def test_only_volume_folders_can_be_set_aside_or_removed(tmp_path: Path, path: str) -> None:
    store = MetadataStore(tmp_path / "state")
    (tmp_path / "state" / ".corrupt").mkdir()
    target = tmp_path / path
    target.mkdir(parents=True, exist_ok=True)

    with pytest.raises(StorageError):
        store.set_aside(target)
    with pytest.raises(StorageError):
        store.remove_folder(target)
    assert target.exists()


def test_remove_deletes_the_folder_and_is_idempotent(store: MetadataStore) -> None:
    folder = store.write(_md())
    write_atomically(folder / "data", {"svid.pem": FileContent(b"c", 0o644)}, gid=None)

    store.remove(KUBELET_ID)
    assert not folder.exists()
    store.remove(KUBELET_ID)
    store.remove("never-existed")
    assert os.listdir(store.state_dir) == []


def test_remove_never_follows_symlinks_out_of_the_state_dir(
    store: MetadataStore, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    store.volume_dir("vol-link").symlink_to(outside)
    folder = store.write(_md("vol-inner"))
    (folder / "escape").symlink_to(outside)

    store.remove("vol-link")
    store.remove("vol-inner")

    assert not os.path.lexists(store.volume_dir("vol-link"))
    assert not folder.exists()
    assert (outside / "precious").read_text() == "keep"


def test_an_orphan_can_be_removed_by_path(store: MetadataStore) -> None:
    orphan = store.state_dir / "v-0123"
    (orphan / "data").mkdir(parents=True)

    store.remove_folder(store.load_all().orphans[0])

    assert not orphan.exists()


@pytest.fixture
def mounter(private_mount_ns: None, tmp_path: Path) -> Iterator[LinuxMounter]:
    m = LinuxMounter()
    yield m
    for target in (tmp_path / "target", tmp_path / "state" / KUBELET_ID / "data" / "inner"):
        m.unmount(target)


def test_remove_refuses_while_a_mount_is_inside(
    store: MetadataStore, mounter: LinuxMounter, tmp_path: Path
) -> None:
    folder = store.write(_md())
    write_atomically(folder / "data", {"svid.pem": FileContent(b"c", 0o644)}, gid=None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("keep")
    inner = folder / "data" / "inner"
    inner.mkdir()
    mounter.bind_readonly(elsewhere, inner)

    with pytest.raises(StorageError) as info:
        store.remove(KUBELET_ID)

    assert info.value.errno == errno.EBUSY
    assert "mount point" in str(info.value)
    assert (folder / "metadata.json").exists()
    assert (elsewhere / "precious").read_text() == "keep"
    mounter.unmount(inner)
    store.remove(KUBELET_ID)
    assert not folder.exists()


def test_remove_refuses_while_the_data_is_bind_mounted_into_a_pod(
    store: MetadataStore, mounter: LinuxMounter, tmp_path: Path
) -> None:
    folder = store.write(_md())
    write_atomically(folder / "data", {"svid.pem": FileContent(b"c", 0o644)}, gid=None)
    target = tmp_path / "target"
    target.mkdir()
    mounter.bind_readonly(folder / "data", target)

    with pytest.raises(StorageError, match=re.escape(f"mounted at {target}")):
        store.remove(KUBELET_ID)

    assert (target / "svid.pem").read_bytes() == b"c"
    mounter.unmount(target)
    store.remove(KUBELET_ID)
    assert not folder.exists()
