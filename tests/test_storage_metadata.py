"""The metadata format and the per-volume folders of the state directory."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.harness import detach_mounts_under
from trio_spirecsi.storage import (
    FileContent,
    LinuxMounter,
    LoadResult,
    MetadataError,
    MetadataStore,
    StorageError,
    TargetDir,
    VolumeMetadata,
    open_target,
    write_atomically,
)
from trio_spirecsi.storage.metadata import folder_name
from trio_spirecsi.storage.mount import mount_table

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
    with pytest.raises(StorageError) as info:
        store.write(_md(node_id="node-b"))
    assert info.value.errno == errno.ENOSPC
    assert str(store.volume_dir(KUBELET_ID)) in str(info.value)
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


def _files_under(root: Path) -> list[Path]:
    """Every file and symlink below ``root`` (symlinks not followed)."""
    found = []
    for top, dirs, names in os.walk(root):
        found += [Path(top) / n for n in names]
        found += [Path(top) / d for d in dirs if (Path(top) / d).is_symlink()]
    return found


def _keys_under(root: Path) -> list[Path]:
    return [
        path
        for path in _files_under(root)
        if not path.is_symlink() and b"PRIVATE KEY" in path.read_bytes()
    ]


def _volume_with_secrets(store: MetadataStore, name: str, outside: Path) -> Path:
    """A volume folder with everything secret a volume can hold, and a link to a key outside."""
    folder = _corrupt(store, name, b"garbage")
    files = {
        "svid.pem": FileContent(b"-----BEGIN CERTIFICATE-----\n", 0o644),
        "svid_key.pem": FileContent(b"-----BEGIN PRIVATE KEY-----\nsecret\n", 0o600),
        "svid_bundle.pem": FileContent(b"-----BEGIN CERTIFICATE-----\n", 0o644),
        "credentials.p12": FileContent(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n", 0o600),
        "jwt_svid.token": FileContent(b"eyJhbGciOiJFUzI1NiJ9.e30.c2ln", 0o600),
    }
    write_atomically(folder / "data", files, gid=None)
    write_atomically(
        folder / "data",
        {**files, "svid_key.pem": FileContent(b"-----BEGIN EC PRIVATE KEY-----\nrotated\n", 0o600)},
        gid=None,
    )
    (folder / "data" / "..2000_01_01_00_00_00.1").mkdir()  # a half-written generation
    (folder / "data" / "..2000_01_01_00_00_00.1" / "svid_key.pem").write_bytes(
        b"-----BEGIN PRIVATE KEY-----\npartial"
    )
    (folder / "stray_key.pem").write_bytes(b"-----BEGIN RSA PRIVATE KEY-----\n")
    (folder / "link-out").symlink_to(outside)
    return folder


def test_set_aside_keeps_the_metadata_and_a_note_and_no_key(
    store: MetadataStore, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.pem"
    outside.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot the store's\n")
    folder = _volume_with_secrets(store, "vol-c", outside)

    moved = store.set_aside(folder, "metadata.json is corrupt: not JSON")

    assert not os.path.lexists(folder)
    assert moved.parent == store.state_dir / ".corrupt"
    assert re.fullmatch(r"vol-c-\d{8}T\d{6}Z", moved.name)
    assert sorted(os.listdir(moved)) == ["metadata.json", "set-aside.json"]
    assert (moved / "metadata.json").read_bytes() == b"garbage"
    note = json.loads((moved / "set-aside.json").read_bytes())
    assert note["folder"] == "vol-c"
    assert note["reason"] == "metadata.json is corrupt: not JSON"
    assert note["metadata_kept"] is True
    assert note["deleted"] == ["data", "link-out", "stray_key.pem"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", note["set_aside_at"])
    assert _keys_under(store.state_dir) == []
    for path in (moved, moved.parent, moved / "metadata.json", moved / "set-aside.json"):
        assert stat.S_IMODE(os.lstat(path).st_mode) & 0o077 == 0, path
    assert outside.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert store.load_all() == LoadResult(valid=[], corrupt=[], orphans=[])


def test_a_metadata_file_holding_a_key_is_not_kept(store: MetadataStore) -> None:
    folder = _corrupt(store, "vol-k", b'{"oops": "-----BEGIN PRIVATE KEY-----"}')

    moved = store.set_aside(folder)

    assert os.listdir(moved) == ["set-aside.json"]
    assert json.loads((moved / "set-aside.json").read_bytes())["metadata_kept"] is False
    assert _keys_under(store.state_dir) == []


def test_a_symlinked_metadata_file_is_not_kept(store: MetadataStore, tmp_path: Path) -> None:
    (tmp_path / "elsewhere.json").write_text("{}")
    folder = store.state_dir / "vol-l"
    folder.mkdir()
    (folder / "metadata.json").symlink_to(tmp_path / "elsewhere.json")

    moved = store.set_aside(folder)

    assert os.listdir(moved) == ["set-aside.json"]
    assert (tmp_path / "elsewhere.json").read_text() == "{}"


def test_corrupt_keeps_only_the_newest_entries(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "state", keep_corrupt=3)
    moved = [store.set_aside(_corrupt(store, f"vol-{n}", b"x"), f"round {n}") for n in range(5)]

    kept = sorted((store.state_dir / ".corrupt").iterdir())
    assert kept == sorted(moved[2:])
    reasons = {json.loads((p / "set-aside.json").read_bytes())["reason"] for p in kept}
    assert reasons == {"round 2", "round 3", "round 4"}


def test_keep_corrupt_must_not_be_negative(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_corrupt"):
        MetadataStore(tmp_path / "state", keep_corrupt=-1)


def test_start_deletes_keys_an_older_driver_left_in_corrupt(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "state")
    old = store.state_dir / ".corrupt" / "vol-old-20250101T000000Z"
    old.mkdir(parents=True)
    key = {"svid_key.pem": FileContent(b"-----BEGIN PRIVATE KEY-----", 0o600)}
    write_atomically(old / "data", key, gid=None)
    (old / "metadata.json").write_bytes(b"{}")
    clean = store.set_aside(_corrupt(store, "vol-new", b"new"))
    clean_before = {p: os.lstat(p).st_mtime_ns for p in _files_under(clean)}

    result = store.load_all()

    assert result == LoadResult(valid=[], corrupt=[], orphans=[])
    assert os.listdir(old) == ["metadata.json"]
    assert _keys_under(store.state_dir) == []
    assert {p: os.lstat(p).st_mtime_ns for p in _files_under(clean)} == clean_before


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
    yield LinuxMounter()
    detach_mounts_under(tmp_path)


def _pod_target(tmp_path: Path) -> TargetDir:
    kubelet = tmp_path / "kubelet"
    parent = kubelet / "pods" / "uid" / "volumes" / "kubernetes.io~csi" / "spiffe"
    parent.mkdir(parents=True, exist_ok=True)
    return open_target(kubelet, parent / "mount")


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
    subprocess.run(["mount", "--bind", str(elsewhere), str(inner)], check=True)

    with pytest.raises(StorageError) as info:
        store.remove(KUBELET_ID)

    assert info.value.errno == errno.EBUSY
    assert "mount point" in str(info.value)
    assert (folder / "metadata.json").exists()
    assert (elsewhere / "precious").read_text() == "keep"
    detach_mounts_under(inner)
    store.remove(KUBELET_ID)
    assert not folder.exists()


def test_remove_refuses_while_the_data_is_bind_mounted_into_a_pod(
    store: MetadataStore, mounter: LinuxMounter, tmp_path: Path
) -> None:
    folder = store.write(_md())
    write_atomically(folder / "data", {"svid.pem": FileContent(b"c", 0o644)}, gid=None)
    with _pod_target(tmp_path) as target:
        mounter.bind_readonly(folder / "data", target)

        with pytest.raises(StorageError, match=re.escape(f"mounted at {target.path}")):
            store.remove(KUBELET_ID)

        assert (target.path / "svid.pem").read_bytes() == b"c"
        assert mounter.unmount(target, folder / "data").removed == 1
    store.remove(KUBELET_ID)
    assert not folder.exists()


def test_remove_refuses_while_the_pods_mount_is_hidden_under_another(
    store: MetadataStore, mounter: LinuxMounter, tmp_path: Path
) -> None:
    folder = store.write(_md())
    write_atomically(folder / "data", {"svid.pem": FileContent(b"c", 0o644)}, gid=None)
    (tmp_path / "cover").mkdir()
    with _pod_target(tmp_path) as target:
        mounter.bind_readonly(folder / "data", target)
        subprocess.run(["mount", "--bind", str(tmp_path / "cover"), str(target.path)], check=True)

        with pytest.raises(StorageError, match="mounted at"):
            store.remove(KUBELET_ID)
    assert (folder / "data" / "svid.pem").read_bytes() == b"c"


def test_set_aside_refuses_while_a_mount_is_inside_and_changes_nothing(
    store: MetadataStore, mounter: LinuxMounter, tmp_path: Path
) -> None:
    folder = _volume_with_secrets(store, "vol-m", tmp_path / "nowhere")
    inner = folder / "data" / "inner"
    inner.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "precious").write_text("keep")
    subprocess.run(["mount", "--bind", str(tmp_path / "elsewhere"), str(inner)], check=True)
    before = sorted(_files_under(folder))

    with pytest.raises(StorageError) as info:
        store.set_aside(folder)

    assert info.value.errno == errno.EBUSY
    assert f"{inner} is a mount point inside it" in str(info.value)
    assert sorted(_files_under(folder)) == before
    assert not (store.state_dir / ".corrupt").exists()
    assert (tmp_path / "elsewhere" / "precious").read_text() == "keep"


def test_set_aside_of_data_a_pod_still_sees_deletes_the_keys_and_unpublish_still_unmounts(
    store: MetadataStore, mounter: LinuxMounter, tmp_path: Path
) -> None:
    folder = _volume_with_secrets(store, KUBELET_ID, tmp_path / "nowhere")
    with _pod_target(tmp_path) as target:
        mounter.bind_readonly(folder / "data", target)
        assert b"PRIVATE KEY" in (target.path / "svid_key.pem").read_bytes()

        moved = store.set_aside(folder, "resume failed")

        assert os.listdir(target.path) == []
        assert _keys_under(store.state_dir) == []
        note = json.loads((moved / "set-aside.json").read_bytes())
        assert note["was_mounted_at"] == [str(target.path)]
        result = mounter.unmount(target, store.data_dir(KUBELET_ID))
        assert (result.removed, result.clean) == (1, True)
    assert not any(m.mount_point.is_relative_to(tmp_path) for m in mount_table())
