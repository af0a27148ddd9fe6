"""Write the seed corpus of every fuzz target into fuzz/corpus/<target>/.

Run from the repository root: ``python -m fuzz.make_seeds``. The seeds are committed; run this
only to add kinds of input (it overwrites the files it writes and leaves every other file, such
as kept crash inputs, alone). Certificates and keys come from a throwaway dev-agent CA.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from trio_spirecsi._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as di
from trio_spirecsi._proto.spire.api.types import types_pb2
from trio_spirecsi.csi.client import Pod, publish_request, volume_context
from trio_spirecsi.devagent.ca import CertificateAuthority
from trio_spirecsi.storage.metadata import VolumeMetadata

from .targets import CORPUS
from .targets.svid_response import join

POD = Pod("web-0", "default", "0b1c2d3e-0000-4000-8000-000000000000", "web")
POD_LINES = "".join(f"{k}={v}\n" for k, v in volume_context(POD).items())
TEN_YEARS = 10 * 365 * 24 * 3600


def attributes() -> dict[str, bytes]:
    def seed(group: str, *extra: str) -> bytes:
        return (group + "\n" + POD_LINES + "".join(f"{e}\n" for e in extra)).rstrip().encode()

    return {
        "defaults": seed(""),
        "fs-group": seed("1000"),
        "renamed": seed(
            "",
            "csi.spire.io/svid-file=tls.crt",
            "csi.spire.io/svid-key-file=tls.key",
            "csi.spire.io/bundle-file=ca.crt",
        ),
        "spiffe-fs": seed(
            "", "csi.spire.io/layout=spiffe-fs", "csi.spire.io/federated-bundles=files"
        ),
        "jwt": seed(
            "",
            "csi.spire.io/jwt-audiences=api,db;web",
            "csi.spire.io/jwt-bundle-file=jwks.json",
        ),
        "all-svids": seed("", "csi.spire.io/all-svids=true", "csi.spire.io/svid-hint=internal"),
        "modes": seed(
            "",
            "csi.spire.io/fs-group=2000",
            "csi.spire.io/cert-file-mode=0640",
            "csi.spire.io/key-file-mode=0640",
            "csi.spire.io/key-format=traditional",
        ),
        "workload-api": seed(
            "",
            "csi.spire.io/workload-api=true",
            "csi.spire.io/spiffe-id=spiffe://example.org/ns/default/sa/web",
        ),
        "misspelt": seed("", "csi.spire.io/svid-flie=x.pem"),
        "no-pod-uid": ("\n" + POD_LINES.replace("pod.uid", "pod.uuid")).encode(),
    }


def metadata() -> dict[str, bytes]:
    record = VolumeMetadata(
        volume_id="csi-" + "ab" * 32,
        target_path=f"/var/lib/kubelet/pods/{POD.uid}/volumes/kubernetes.io~csi/spiffe/mount",
        spec={"volume_context": volume_context(POD, {"csi.spire.io/svid-file": "tls.crt"})},
        volume_mount_group="1000",
        node_id="node-a",
        created_at=1790000000.25,
    )
    valid = record.to_json()
    odd = VolumeMetadata(
        volume_id="volume 7/odd \u00e9",
        target_path="/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/a b/mount",
        spec={"volume_context": {}, "nested": [1, 2.5, None, True, {"k": "v"}]},
        volume_mount_group="",
        node_id="node-\u00e9",
        created_at=0.0,
    ).to_json()
    return {
        "valid": valid,
        "odd": odd,
        "truncated": valid[: len(valid) // 2],
        "version-2": valid.replace(b'"version": 1', b'"version": 2'),
        "duplicate-key": valid.replace(b'"node_id": "node-a"', b'"node_id": "a", "node_id": "b"'),
    }


def _svid(
    ca: CertificateAuthority, path: str, hint: str = "", key_type: str = "ec-p256"
) -> di.X509SVIDWithKey:
    svid = ca.issue_x509_svid(f"{ca.id}{path}", TEN_YEARS, key_type)
    return di.X509SVIDWithKey(
        x509_svid=types_pb2.X509SVID(
            cert_chain=list(svid.cert_chain),
            id=types_pb2.SPIFFEID(trust_domain=ca.trust_domain, path=path),
            expires_at=svid.expires_at,
            hint=hint,
        ),
        x509_svid_key=svid.key_pkcs8_der,
    )


def svid_response() -> dict[str, bytes]:
    ca = CertificateAuthority("example.org", ttl=TEN_YEARS)
    chained = CertificateAuthority("example.org", intermediate=True, ttl=TEN_YEARS)
    partner = CertificateAuthority("partner.example", ttl=TEN_YEARS)
    path = "/ns/default/sa/web"

    def bundles(*cas: CertificateAuthority) -> bytes:
        message = di.SubscribeToX509BundlesResponse(
            ca_certificates={c.id: c.bundle_der for c in cas}
        )
        return message.SerializeToString()

    def svids(*items: di.X509SVIDWithKey, federates: tuple[str, ...] = ()) -> bytes:
        message = di.SubscribeToX509SVIDsResponse(x509_svids=list(items), federates_with=federates)
        return message.SerializeToString()

    two = svids(
        _svid(ca, path, "internal"),
        _svid(ca, "/ns/default/sa/web-ext", "external"),
        federates=(partner.id,),
    )
    return {
        "one-svid": join(0, svids(_svid(ca, path)), bundles(ca)),
        "all-svids": join(1, two, bundles(ca, partner)),
        "spiffe-fs": join(2, svids(_svid(ca, path), federates=(partner.id,)), bundles(ca, partner)),
        "intermediate-merged": join(
            3,
            svids(_svid(chained, path, "internal"), federates=(partner.id,)),
            bundles(chained, partner),
        ),
        "rsa-traditional": join(4, svids(_svid(ca, path, key_type="rsa-2048")), bundles(ca)),
        "no-svid": join(0, svids(), bundles(ca)),
        "no-bundle": join(0, svids(_svid(ca, path)), bundles(partner)),
    }


def bundle_response() -> dict[str, bytes]:
    ca = CertificateAuthority("example.org", ttl=TEN_YEARS)
    partner = CertificateAuthority("partner.example", ttl=TEN_YEARS)
    other = CertificateAuthority("other.example", ttl=TEN_YEARS)
    x509_all = di.SubscribeToX509BundlesResponse(
        ca_certificates={c.id: c.bundle_der for c in (ca, partner, other)}
    )
    x509_own = di.SubscribeToX509BundlesResponse(
        ca_certificates={ca.id: ca.bundle_der + partner.bundle_der}
    )
    jwt = di.SubscribeToJWTBundlesResponse(bundles={c.id: c.jwks() for c in (ca, partner)})
    return {
        "x509-federated": b"\x00" + x509_all.SerializeToString(),
        "x509-two-roots": b"\x00" + x509_own.SerializeToString(),
        "jwt": b"\x01" + jwt.SerializeToString(),
    }


def publish_request_seeds() -> dict[str, bytes]:
    target = f"/var/lib/kubelet/pods/{POD.uid}/volumes/kubernetes.io~csi/spiffe/mount"
    context = volume_context(POD)
    valid = publish_request("csi-" + "cd" * 32, target, context)
    grouped = publish_request("csi-" + "ef" * 32, target, context, fs_group="1000")
    writable = publish_request("csi-1", target, context, readonly=False)
    outside = publish_request("csi-2", "/etc/passwd-dir/mount", context)
    block = publish_request("csi-3", target, context)
    block.volume_capability.block.SetInParent()
    return {
        "valid": valid.SerializeToString(),
        "fs-group": grouped.SerializeToString(),
        "writable": writable.SerializeToString(),
        "outside-kubelet": outside.SerializeToString(),
        "block": block.SerializeToString(),
    }


def grpc_server() -> dict[str, bytes]:
    from hpack import Encoder

    def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
        head = len(payload).to_bytes(3, "big") + bytes([kind, flags])
        return head + stream.to_bytes(4, "big") + payload

    def message(data: bytes, compressed: bool = False) -> bytes:
        return bytes([compressed]) + len(data).to_bytes(4, "big") + data

    def request(stream: int, *extra: tuple[str, str], end_headers: bool = True) -> bytes:
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/SpiffeWorkloadAPI/FetchJWTSVID"),
            (":authority", "localhost"),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
            ("workload.spiffe.io", "true"),
            *extra,
        ]
        block = Encoder().encode(headers)  # each seed is its own connection
        return frame(0x1, 0x4 if end_headers else 0, stream, block)

    start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(0x4, 0, 0)
    body = b"\x12\x03api"  # JWTSVIDRequest(audience=["api"])
    packed = zlib.compress(body)
    bomb = zlib.compress(bytes(1 << 20))
    seeds = {
        "unary": start + request(1) + frame(0x0, 0x1, 1, message(body)),
        "deflate": start
        + request(1, ("grpc-encoding", "deflate"))
        + frame(0x0, 0x1, 1, message(packed, compressed=True)),
        "bomb": start
        + request(1, ("grpc-encoding", "gzip"))
        + frame(0x0, 0x1, 1, message(bomb, compressed=True)),
        "stream-of-messages": start
        + request(1)
        + frame(0x0, 0, 1, message(body) * 3)
        + frame(0x6, 0, 0, bytes(8))
        + frame(0x8, 0, 0, (1000).to_bytes(4, "big"))
        + frame(0x0, 0x1, 1, message(body)),
        "reset": start + request(1) + frame(0x3, 0, 1, (8).to_bytes(4, "big")),
        "not-http2": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    }
    block = request(3)[9:]
    seeds["continuation"] = start + frame(0x1, 0, 3, block[:2]) + frame(0x9, 0x4, 3, block[2:])
    return seeds


def main() -> None:
    makers = {
        "attributes": attributes,
        "metadata": metadata,
        "svid_response": svid_response,
        "bundle_response": bundle_response,
        "publish_request": publish_request_seeds,
        "grpc_server": grpc_server,
    }
    for target, make in makers.items():
        folder = Path(CORPUS) / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in make().items():
            (folder / name).write_bytes(data)
        print(f"{target}: {len(list(folder.iterdir()))} seeds in {folder}")


if __name__ == "__main__":
    main()
