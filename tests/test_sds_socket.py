"""Envoy SDS v3 on the per-pod socket, end to end: the real daemon and dev agent, a published
volume's socket reached through the pod's read-only mount, and grpcio (C-core, the gRPC
Envoy's own client is closest to) as the client, with the project's compiled SDS protos."""

from __future__ import annotations

import queue
import shutil
import socket as sock
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import struct_pb2

from tests.harness import Node, eventually, open_node
from tests.test_tls_consumer import Seen, TlsFiles, handshake
from tests.test_workload_api import accepting, mount_path
from trio_spirecsi._proto.envoy.config.core.v3 import base_pb2
from trio_spirecsi._proto.envoy.extensions.transport_sockets.tls.v3 import (
    secret_pb2,
    tls_spiffe_validator_config_pb2,
)
from trio_spirecsi._proto.envoy.service.discovery.v3 import discovery_pb2 as discovery
from trio_spirecsi._proto.google.rpc import status_pb2
from trio_spirecsi.daemon import Daemon
from trio_spirecsi.devagent.agent import DevAgent
from trio_spirecsi.devagent.entries import Entry
from trio_spirecsi.grpc import methods
from trio_spirecsi.sds import SECRET_TYPE_URL, SPIFFE_VALIDATOR_NAME
from trio_spirecsi.spire.responses import split_der

SOCKET_ATTRS = {"csi.spire.io/workload-api": "true", "csi.spire.io/workload-api-socket": "socket"}
WAIT = 20.0
QUIET = 1.0
"""How long a stream must stay silent to show it does not answer (an ACK, a NACK)."""


def node_of(major: int, minor: int, **metadata: Any) -> base_pb2.Node:
    node = base_pb2.Node(id="sidecar~10.0.0.1~web-0.shop~shop.svc.cluster.local", cluster="web")
    node.user_agent_name = "envoy"
    node.user_agent_build_version.version.major_number = major
    node.user_agent_build_version.version.minor_number = minor
    if metadata:
        node.metadata.CopyFrom(struct_pb2.Struct())
        node.metadata.update(metadata)
    return node


V18 = node_of(1, 30)
V17 = node_of(1, 17)


def request(
    *names: str, node: base_pb2.Node | None = V18, **fields: Any
) -> discovery.DiscoveryRequest:
    req = discovery.DiscoveryRequest(resource_names=list(names), type_url=SECRET_TYPE_URL, **fields)
    if node is not None:
        req.node.CopyFrom(node)
    return req


def secrets(response: discovery.DiscoveryResponse) -> dict[str, secret_pb2.Secret]:
    found = {}
    for resource in response.resources:
        assert resource.type_url == SECRET_TYPE_URL
        secret = secret_pb2.Secret()
        assert resource.Unpack(secret)
        found[secret.name] = secret
    assert len(found) == len(response.resources), "two resources with one name"
    return found


def spiffe_domains(secret: secret_pb2.Secret) -> dict[str, bytes]:
    """Trust domain -> PEM of a SPIFFE validator validation context."""
    custom = secret.validation_context.custom_validator_config
    assert custom.name == SPIFFE_VALIDATOR_NAME
    config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig()
    assert custom.typed_config.Unpack(config)
    assert not secret.validation_context.HasField("trusted_ca")
    return {td.name: td.trust_bundle.inline_bytes for td in config.trust_domains}


def ders(pem: bytes) -> list[bytes]:
    return [
        c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(pem)
    ]


class Client:
    """A grpcio channel to a pod's socket (grpcio is synchronous: calls run in threads)."""

    def __init__(self, socket: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket}")

    async def fetch(self, req: discovery.DiscoveryRequest) -> discovery.DiscoveryResponse:
        call = self.channel.unary_unary(
            methods.FETCH_SECRETS.path,
            request_serializer=discovery.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery.DiscoveryResponse.FromString,
        )
        response: discovery.DiscoveryResponse = await trio.to_thread.run_sync(
            lambda: call(req, timeout=WAIT)
        )
        return response

    def stream(self) -> Stream:
        return Stream(self.channel)

    def close(self) -> None:
        self.channel.close()


class Stream:
    """One StreamSecrets stream, as Envoy holds it: requests in, responses out."""

    _END = object()

    def __init__(self, channel: grpc.Channel) -> None:
        self._requests: queue.Queue[discovery.DiscoveryRequest | None] = queue.Queue()
        self._responses: queue.Queue[Any] = queue.Queue()
        call = channel.stream_stream(
            methods.STREAM_SECRETS.path,
            request_serializer=discovery.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery.DiscoveryResponse.FromString,
        )
        self._call = call(iter(self._requests.get, None))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for response in self._call:
                self._responses.put(response)
            self._responses.put(self._END)
        except grpc.RpcError as exc:
            self._responses.put(exc)

    def send(self, req: discovery.DiscoveryRequest) -> None:
        self._requests.put(req)

    async def next(self) -> discovery.DiscoveryResponse:
        item = await trio.to_thread.run_sync(lambda: self._responses.get(timeout=WAIT))
        if isinstance(item, BaseException):
            raise item
        assert item is not self._END, "the stream ended"
        assert isinstance(item, discovery.DiscoveryResponse)
        return item

    async def ended(self) -> grpc.RpcError | None:
        """How the stream ended: None for OK, the error otherwise."""
        while True:
            item = await trio.to_thread.run_sync(lambda: self._responses.get(timeout=WAIT))
            if item is self._END:
                return None
            if isinstance(item, grpc.RpcError):
                return item

    async def silent(self) -> bool:
        """True if nothing arrives for QUIET seconds."""
        await trio.sleep(QUIET)
        return self._responses.empty()

    async def ack(self, response: discovery.DiscoveryResponse, *names: str) -> None:
        """Acknowledge ``response`` as Envoy does with set_node_on_first_message_only."""
        self.send(
            request(
                *names, node=None, version_info=response.version_info, response_nonce=response.nonce
            )
        )

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()


@pytest.fixture
def pods() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="sds-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with open_node(tmp_path / "node") as node:
        await node.start_driver()
        yield node


async def publish(
    node: Node, pods: Path, name: str = "web-0", sa: str = "web"
) -> tuple[Path, Path]:
    """Publish a pod's volume as Istio mounts it; (target, the pod's socket)."""
    pod = node.pod(name, "shop", sa)
    _, target = await node.publish(pod, attributes=SOCKET_ATTRS)
    socket = mount_path(pods, name, target) / "socket"
    # The socket accepts as soon as publish returns: before the pod's containers start.
    assert accepting(socket)()
    return target, socket


def daemon(node: Node) -> Daemon:
    assert node.daemon is not None
    return node.daemon


# FetchSecrets: the resolution table ---------------------------------------------------------


async def test_fetch_secrets_resolves_names_as_the_spire_agent_does(node: Node, pods: Path) -> None:
    target, socket = await publish(node, pods)
    client = Client(socket)
    try:
        spiffe_id = "spiffe://example.org/ns/shop/sa/web"
        bundle = split_der(node.agent.current_bundle_der)
        files_chain = ders((target / "svid.pem").read_bytes())

        everything = secrets(await client.fetch(request()))
        assert list(everything) == ["spiffe://example.org", spiffe_id]
        own = spiffe_domains(everything["spiffe://example.org"])
        assert list(own) == ["example.org"]
        assert ders(own["example.org"]) == list(bundle)
        certificate = everything[spiffe_id].tls_certificate
        assert ders(certificate.certificate_chain.inline_bytes) == files_chain
        key = serialization.load_pem_private_key(certificate.private_key.inline_bytes, None)
        assert certificate.private_key.inline_bytes.startswith(b"-----BEGIN PRIVATE KEY-----")
        leaf = x509.load_der_x509_certificate(files_chain[0])
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert key.public_key().public_bytes(*spki) == leaf.public_key().public_bytes(*spki)

        default = secrets(await client.fetch(request("default")))
        assert list(default) == ["default"]
        assert default["default"].tls_certificate == certificate

        rootca = secrets(await client.fetch(request("ROOTCA")))
        assert ders(spiffe_domains(rootca["ROOTCA"])["example.org"]) == list(bundle)
        old = secrets(await client.fetch(request("ROOTCA", node=V17)))
        assert ders(old["ROOTCA"].validation_context.trusted_ca.inline_bytes) == list(bundle)
        opted_out = secrets(
            await client.fetch(
                request("ROOTCA", node=node_of(1, 30, disable_spiffe_cert_validation="true"))
            )
        )
        assert opted_out["ROOTCA"].validation_context.HasField("trusted_ca")
        assert spiffe_domains(secrets(await client.fetch(request("ALL")))["ALL"]).keys() == {
            "example.org"
        }

        response = await client.fetch(request("default"))
        assert (response.version_info, response.nonce, response.type_url) == (
            "",
            "",
            SECRET_TYPE_URL,
        )

        with pytest.raises(grpc.RpcError) as info:
            await client.fetch(request("ALL", node=V17))
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert info.value.details() == 'unable to use "SPIFFE validator" on Envoy below 1.17'
        with pytest.raises(grpc.RpcError) as info:
            await client.fetch(request("spiffe://example.org/WHATEVER"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == (
            "workload is not authorized for the requested identities "
            '["spiffe://example.org/WHATEVER"]'
        )
    finally:
        client.close()


async def test_federated_bundles_only_for_trust_domains_the_svid_federates_with(
    tmp_path: Path, pods: Path
) -> None:
    entry = Entry(
        "spiffe://example.org/web", frozenset({("k8s", "sa:web")}), federates_with=("partner.org",)
    )
    agent = DevAgent(entries=[entry], federated_trust_domains=["partner.org", "other.org"])
    async with open_node(tmp_path / "node", agent) as node:
        await node.start_driver()
        _, socket = await publish(node, pods)
        client = Client(socket)
        try:
            everything = secrets(await client.fetch(request()))
            assert list(everything) == [
                "spiffe://example.org",
                "spiffe://partner.org",
                "spiffe://example.org/web",
            ]
            partner = spiffe_domains(everything["spiffe://partner.org"])["partner.org"]
            assert ders(partner) == [agent.federated_ca("partner.org").root_der]
            all_bundles = spiffe_domains(secrets(await client.fetch(request("ALL")))["ALL"])
            assert list(all_bundles) == ["example.org", "partner.org"]
            with pytest.raises(grpc.RpcError) as info:
                await client.fetch(request("spiffe://other.org"))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            client.close()


async def test_sds_needs_no_security_header_and_delta_is_unimplemented(
    node: Node, pods: Path
) -> None:
    _, socket = await publish(node, pods)
    client = Client(socket)
    try:
        assert secrets(await client.fetch(request("default")))  # grpcio sends no custom header
        call = client.channel.stream_stream(
            methods.DELTA_SECRETS.path,
            request_serializer=discovery.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=discovery.DeltaDiscoveryResponse.FromString,
        )

        def delta() -> grpc.StatusCode:
            try:
                list(call(iter([discovery.DeltaDiscoveryRequest(type_url=SECRET_TYPE_URL)])))
            except grpc.RpcError as exc:
                code: grpc.StatusCode = exc.code()
                assert exc.details() == "Method is not implemented"
                return code
            raise AssertionError("DeltaSecrets answered")

        assert await trio.to_thread.run_sync(delta) == grpc.StatusCode.UNIMPLEMENTED
    finally:
        client.close()


# StreamSecrets --------------------------------------------------------------------------------


async def test_istio_sequence_two_streams_acks_and_a_rotation_pushed_without_spinning(
    node: Node, pods: Path
) -> None:
    target, socket = await publish(node, pods)
    client = Client(socket)
    streams = [client.stream(), client.stream()]
    try:
        certs, roots = streams
        certs.send(request("default"))  # node on the first message of each stream only
        roots.send(request("ROOTCA"))
        first_cert = await certs.next()
        first_root = await roots.next()
        assert first_cert.version_info == "1" and len(first_cert.nonce) == 8
        assert first_root.nonce != first_cert.nonce
        serial = x509.load_pem_x509_certificates(
            secrets(first_cert)["default"].tls_certificate.certificate_chain.inline_bytes
        )[0].serial_number
        await certs.ack(first_cert, "default")
        await roots.ack(first_root, "ROOTCA")
        assert await certs.silent() and await roots.silent(), "an ACK was answered"

        node.agent.rotate()
        pushed = await certs.next()
        assert int(pushed.version_info) > int(first_cert.version_info)
        chain = secrets(pushed)["default"].tls_certificate.certificate_chain.inline_bytes
        rotated = x509.load_pem_x509_certificates(chain)[0]
        assert rotated.serial_number != serial
        await eventually(
            lambda: (
                ders((target / "svid.pem").read_bytes())[0]
                == rotated.public_bytes(serialization.Encoding.DER)
            ),
            "the files hold the pushed certificate",
        )
        await certs.ack(pushed, "default")
        assert await certs.silent(), "the ACK of the push was answered"
        assert daemon(node).metrics.sds_streams_open._value.get() == 2
    finally:
        for stream in streams:
            stream.close()
        client.close()
    await eventually(
        lambda: daemon(node).metrics.sds_streams_open._value.get() == 0, "streams closed"
    )


async def test_a_nack_is_counted_and_never_answered_until_the_next_change(
    node: Node, pods: Path
) -> None:
    _, socket = await publish(node, pods)
    client = Client(socket)
    stream = client.stream()
    try:
        stream.send(request("default"))
        first = await stream.next()
        stream.send(
            request(
                "default",
                node=None,
                version_info="OHNO",
                response_nonce=first.nonce,
                error_detail=status_pb2.Status(code=3, message="OHNO!"),
            )
        )
        assert await stream.silent(), "a NACK was answered with a resend"
        assert daemon(node).metrics.sds_nacks_total._value.get() == 1
        node.agent.rotate()
        pushed = await stream.next()  # the next change is pushed as usual
        assert pushed.version_info != first.version_info
    finally:
        stream.close()
        client.close()


async def test_stale_nonces_are_ignored_and_new_names_answered_at_once(
    node: Node, pods: Path
) -> None:
    _, socket = await publish(node, pods)
    client = Client(socket)
    stream = client.stream()
    try:
        stream.send(request("default"))
        first = await stream.next()
        stream.send(
            request("spiffe://example.org", node=None, version_info="1", response_nonce="FOO")
        )
        assert await stream.silent(), "a request with a stale nonce was answered"
        stream.send(
            request(
                "default",
                "spiffe://example.org",
                node=None,
                version_info=first.version_info,
                response_nonce=first.nonce,
            )
        )
        both = await stream.next()
        assert list(secrets(both)) == ["spiffe://example.org", "default"]
        assert both.version_info == first.version_info  # names changed, content did not
    finally:
        stream.close()
        client.close()


async def test_an_unknown_name_ends_the_stream_invalid_argument(node: Node, pods: Path) -> None:
    _, socket = await publish(node, pods)
    client = Client(socket)
    stream = client.stream()
    try:
        stream.send(request("spiffe://example.org/ns/shop/sa/other"))
        error = await stream.ended()
        assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "workload is not authorized for the requested identities" in error.details()
    finally:
        stream.close()
        client.close()


async def test_streams_end_permission_denied_once_the_agent_stops_issuing(
    node: Node, pods: Path
) -> None:
    _, socket = await publish(node, pods)
    client = Client(socket)
    stream = client.stream()
    try:
        stream.send(request("default"))
        await stream.next()
        node.agent.revoke("spiffe://example.org/ns/shop/sa/web")
        error = await stream.ended()
        assert error is not None and error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error.details() == "no identity issued"
    finally:
        stream.close()
        client.close()


# What Istio and Envoy rely on ------------------------------------------------------------------


async def test_istio_dial_check_then_streams_work(node: Node, pods: Path) -> None:
    """pilot-agent dials the socket with a 1 s deadline (no RPC) and drops the connection."""
    _, socket = await publish(node, pods)

    def dial_check() -> None:
        channel = grpc.insecure_channel(f"unix://{socket}")
        try:
            grpc.channel_ready_future(channel).result(timeout=1)
        finally:
            channel.close()

    for _ in range(5):
        await trio.to_thread.run_sync(dial_check)
    plain = sock.socket(sock.AF_UNIX, sock.SOCK_STREAM)
    plain.connect(str(socket))
    plain.close()  # connect and close at once, no HTTP/2 at all
    client = Client(socket)
    stream = client.stream()
    try:
        stream.send(request("default"))
        assert "default" in secrets(await stream.next())
    finally:
        stream.close()
        client.close()


async def test_mutual_tls_between_two_pods_from_what_sds_returned(
    node: Node, pods: Path, tmp_path: Path
) -> None:
    configs = {}
    for name, sa in (("web-0", "web"), ("db-0", "db")):
        _, socket = await publish(node, pods, name, sa)
        client = Client(socket)
        try:
            got = secrets(
                await client.fetch(
                    request(
                        "default",
                        "ROOTCA",
                        node=node_of(1, 30, disable_spiffe_cert_validation=True),
                    )
                )
            )
        finally:
            client.close()
        folder = tmp_path / name
        folder.mkdir()
        certificate = got["default"].tls_certificate
        (folder / "svid.pem").write_bytes(certificate.certificate_chain.inline_bytes)
        (folder / "svid_key.pem").write_bytes(certificate.private_key.inline_bytes)
        (folder / "svid_bundle.pem").write_bytes(
            got["ROOTCA"].validation_context.trusted_ca.inline_bytes
        )
        configs[sa] = TlsFiles.of(folder)
    server_id = "spiffe://example.org/ns/shop/sa/web"
    client_id = "spiffe://example.org/ns/shop/sa/db"
    server_saw, client_saw = await handshake(configs["web"], configs["db"], server_id, client_id)
    assert isinstance(server_saw, Seen) and server_saw.spiffe_id == client_id, server_saw
    assert isinstance(client_saw, Seen) and client_saw.spiffe_id == server_id, client_saw
