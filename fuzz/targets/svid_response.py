"""What the agent streams for a pod, rendered into a volume's files.

Input: one byte choosing the volume's attributes (see ``SPECS``), two bytes (big endian)
giving the length of a serialized ``SubscribeToX509SVIDsResponse``, that message, and the
rest: a serialized ``SubscribeToX509BundlesResponse``. Bytes that are not those messages are
``undecodable`` (the gRPC layer never hands them to the driver).

Promise: ``x509_from_response``, ``bundles_from_response`` and ``render_files`` either produce
valid files (see ``_files.check_files``) or raise :class:`RenderError`; nothing else.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from trio_spirecsi._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as di
from trio_spirecsi.attributes import VolumeSpec, parse_volume_context
from trio_spirecsi.errors import RenderError
from trio_spirecsi.render import render_files
from trio_spirecsi.spire.responses import bundles_from_response, x509_from_response

from ._files import check_files

_POD = {
    "csi.storage.k8s.io/pod.name": "web-0",
    "csi.storage.k8s.io/pod.namespace": "default",
    "csi.storage.k8s.io/pod.uid": "0b1c2d3e-0000-4000-8000-000000000000",
    "csi.storage.k8s.io/serviceAccount.name": "web",
    "csi.storage.k8s.io/ephemeral": "true",
}


def _spec(**attributes: str) -> VolumeSpec:
    context = dict(_POD)
    context.update({f"csi.spire.io/{k.replace('_', '-')}": v for k, v in attributes.items()})
    return parse_volume_context(context)


SPECS = (
    _spec(),
    _spec(all_svids="true", federated_bundles="files"),
    _spec(layout="spiffe-fs", federated_bundles="files"),
    _spec(svid_hint="internal", federated_bundles="merged", intermediates_in_bundle="true"),
    _spec(key_format="traditional", fs_group="1000"),
)


def split(data: bytes) -> tuple[int, bytes, bytes] | None:
    if len(data) < 3:
        return None
    size = int.from_bytes(data[1:3], "big")
    return data[0] % len(SPECS), data[3 : 3 + size], data[3 + size :]


def join(spec: int, svids: bytes, bundles: bytes) -> bytes:
    """The input that :func:`split` takes apart (for writing seeds)."""
    return bytes([spec]) + len(svids).to_bytes(2, "big") + svids + bundles


def test_one_input(data: bytes) -> str:
    parts = split(data)
    if parts is None:
        return "undecodable"
    index, svid_bytes, bundle_bytes = parts
    try:
        svids = di.SubscribeToX509SVIDsResponse.FromString(svid_bytes)
        bundles = di.SubscribeToX509BundlesResponse.FromString(bundle_bytes)
    except DecodeError:
        return "undecodable"
    spec = SPECS[index]
    try:
        update = x509_from_response(svids)
        files = render_files(spec, update, bundles_from_response(bundles))
    except RenderError as exc:
        if not exc.message:
            raise AssertionError("a RenderError without a message") from exc
        return "rejected"
    check_files(spec, files)
    return "rendered"
