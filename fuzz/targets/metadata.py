"""Metadata records: ``VolumeMetadata.from_json`` on any bytes found in ``metadata.json``.

Promise: a record or :class:`MetadataError` (a corrupt file is set aside, never fatal); an
accepted record is written back (``to_json``) to bytes that read back equal.
"""

from __future__ import annotations

from trio_spirecsi.storage.metadata import MetadataError, VolumeMetadata


def test_one_input(data: bytes) -> str:
    try:
        record = VolumeMetadata.from_json(data)
    except MetadataError:
        return "rejected"
    written = record.to_json()
    if VolumeMetadata.from_json(written) != record:
        raise AssertionError("a record does not read back equal after to_json")
    return "accepted"
