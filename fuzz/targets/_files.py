"""What every set of rendered files must satisfy, whatever the agent sent."""

from __future__ import annotations

import re
from collections.abc import Mapping

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trio_spirecsi.attributes import CREDENTIAL_BUNDLE_FILE, VolumeSpec, file_name_problem
from trio_spirecsi.storage.writer import FileContent

_PEM = re.compile(rb"-----BEGIN ([A-Z ]+)-----\r?\n.*?-----END \1-----\r?\n", re.DOTALL)
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _blocks(name: str, data: bytes) -> list[tuple[bytes, bytes]]:
    blocks = [(m.group(1), m.group(0)) for m in _PEM.finditer(data)]
    if b"".join(b for _, b in blocks) != data:
        raise AssertionError(f"{name} is not a sequence of PEM blocks")
    return blocks


def check_files(spec: VolumeSpec, files: Mapping[str, FileContent]) -> None:
    """Names are plain file names, modes permission bits, every PEM block parses, and each
    private key belongs to the first certificate written beside it."""
    for name, content in files.items():
        problem = file_name_problem(name)
        if problem is not None:
            raise AssertionError(f"rendered an impossible file name: {problem}")
        if not 0 <= content.mode <= 0o777 or content.mode & 0o111:
            raise AssertionError(f"{name} has mode {content.mode:o}")
        if name.endswith(".token") or name == spec.jwt_bundle_file:
            continue
        for label, block in _blocks(name, content.data):
            if label == b"CERTIFICATE":
                x509.load_pem_x509_certificate(block)
            elif label.endswith(b"PRIVATE KEY"):
                serialization.load_pem_private_key(block, None)
                if content.mode != spec.key_file_mode:
                    raise AssertionError(f"{name} holds a key but has mode {content.mode:o}")
            else:
                raise AssertionError(f"{name} holds a PEM block {label!r}")
    if spec.layout == "default":
        _same_key(files[spec.svid_key_file].data, files[spec.svid_file].data)
    else:
        credential = files[CREDENTIAL_BUNDLE_FILE].data
        _same_key(credential, credential)


def _same_key(key_pem: bytes, chain_pem: bytes) -> None:
    key = serialization.load_pem_private_key(key_pem, None)
    leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    if key.public_key().public_bytes(*_SPKI) != leaf.public_key().public_bytes(*_SPKI):
        raise AssertionError("a key was written beside a certificate it does not belong to")
