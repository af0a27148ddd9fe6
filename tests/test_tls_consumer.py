"""Consumers with no SPIFFE library, using only the files of their volumes.

Two pods with different service accounts get their identities from the real daemon and dev
agent; Python's ssl module (OpenSSL) then runs mutual TLS between them, each side checking the
peer's SPIFFE ID, across an SVID rotation and federation changes. A curl job calls a service
with the JWT-SVID from its volume, as examples/curl-jwt-job.yaml does.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.harness import Node, eventually, open_node, read_identity
from trio_spirecsi.devagent.agent import DevAgent
from trio_spirecsi.spire.responses import split_der

PARTNER = "partner.example"
PARTNER_CLIENT = f"spiffe://{PARTNER}/billing"


@dataclass(frozen=True)
class TlsFiles:
    """What a TLS peer is configured with: its certificate chain, key and trust anchors."""

    cert: Path
    key: Path
    bundle: Path

    @classmethod
    def of(cls, folder: Path) -> TlsFiles:
        return cls(folder / "svid.pem", folder / "svid_key.pem", folder / "svid_bundle.pem")


@dataclass(frozen=True)
class Seen:
    """The peer as one side of a handshake saw it."""

    spiffe_id: str
    serial: int


class WrongPeer(Exception):
    pass


def _peer(tls: ssl.SSLSocket, expected: str) -> Seen:
    """Authorize the verified peer by the URI SAN of its certificate (its SPIFFE ID)."""
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [expected]:
        raise WrongPeer(f"peer is {uris}, expected {expected}")
    return Seen(uris[0], cert.serial_number)


def _context(side: ssl._SSLMethod, files: TlsFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(side)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(files.cert, files.key)
    context.load_verify_locations(cafile=files.bundle)
    return context


def serve_one(sock: socket.socket, files: TlsFiles, expected_client: str) -> Seen:
    """A server that loads its files for this connection and requires a client certificate."""
    with sock:
        context = _context(ssl.PROTOCOL_TLS_SERVER, files)
        with context.wrap_socket(sock, server_side=True) as tls:
            peer = _peer(tls, expected_client)
            assert tls.recv(100) == b"ping"
            tls.sendall(f"hello {peer.spiffe_id}".encode())
            return peer


def connect_one(sock: socket.socket, files: TlsFiles, expected_server: str, me: str) -> Seen:
    with sock:
        context = _context(ssl.PROTOCOL_TLS_CLIENT, files)
        with context.wrap_socket(sock, server_side=False) as tls:
            peer = _peer(tls, expected_server)
            tls.sendall(b"ping")
            reply = tls.recv(200)
            if reply != f"hello {me}".encode():
                raise ConnectionError(f"the server answered {reply!r}")
            return peer


Outcome = Seen | BaseException


async def handshake(
    server: TlsFiles, client: TlsFiles, server_id: str, client_id: str
) -> tuple[Outcome, Outcome]:
    """(what the server saw, what the client saw), or the exception each side raised."""
    server_sock, client_sock = socket.socketpair()
    for sock in (server_sock, client_sock):
        sock.settimeout(30)
    results: dict[str, Outcome] = {}

    async def side(name: str, run: Callable[[], Seen]) -> None:
        try:
            results[name] = await trio.to_thread.run_sync(run)
        except Exception as exc:
            results[name] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(side, "server", lambda: serve_one(server_sock, server, client_id))
        nursery.start_soon(
            side, "client", lambda: connect_one(client_sock, client, server_id, client_id)
        )
    return results["server"], results["client"]


async def mutual_tls(server: TlsFiles, client: TlsFiles, server_id: str, client_id: str) -> None:
    """Both sides complete the handshake and see the other's SPIFFE ID and current serial."""
    server_saw, client_saw = await handshake(server, client, server_id, client_id)
    assert isinstance(server_saw, Seen), server_saw
    assert isinstance(client_saw, Seen), client_saw
    assert server_saw == Seen(client_id, _serial(client.cert))
    assert client_saw == Seen(server_id, _serial(server.cert))


def _serial(cert: Path) -> int:
    return x509.load_pem_x509_certificates(cert.read_bytes())[0].serial_number


def _roots(bundle: Path) -> tuple[bytes, ...]:
    return tuple(
        c.public_bytes(serialization.Encoding.DER)
        for c in x509.load_pem_x509_certificates(bundle.read_bytes())
    )


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with open_node(tmp_path / "node", DevAgent(federate_template=True)) as node:
        await node.start_driver()
        yield node


async def test_mutual_tls_between_two_pods_survives_rotation(node: Node) -> None:
    server_pod = node.pod("api-0", "default", "api")
    client_pod = node.pod("web-0", "default", "web")
    _, server_dir = await node.publish(server_pod)
    _, client_dir = await node.publish(client_pod)
    server, client = TlsFiles.of(server_dir), TlsFiles.of(client_dir)
    server_id, client_id = node.expected_id(server_pod), node.expected_id(client_pod)
    assert server_id != client_id

    await mutual_tls(server, client, server_id, client_id)

    # Each side authorizes by SPIFFE ID: a client expecting another service refuses this one.
    _, client_saw = await handshake(
        server, client, "spiffe://example.org/ns/default/sa/db", client_id
    )
    assert isinstance(client_saw, WrongPeer)

    before = {files: _serial(files.cert) for files in (server, client)}
    node.agent.rotate()
    await eventually(
        lambda: all(_serial(files.cert) != old for files, old in before.items()),
        "both SVIDs rotated",
    )
    assert read_identity(server_dir).key_matches
    assert read_identity(client_dir).key_matches
    await mutual_tls(server, client, server_id, client_id)

    # A new CA, the old root kept in the bundle while SVIDs are re-issued (as SPIRE does).
    old_roots = _roots(server.bundle)
    node.agent.rotate_ca(keep_old=True)
    new_roots = split_der(node.agent.current_bundle_der)
    assert new_roots != old_roots

    def on_new_ca(files: TlsFiles) -> bool:
        leaf = x509.load_pem_x509_certificates(files.cert.read_bytes())[0]
        return (
            _roots(files.bundle) == new_roots
            and leaf.issuer == node.agent.ca.root_certificate.subject
            and read_identity(files.cert.parent).key_matches
        )

    await eventually(lambda: on_new_ca(server) and on_new_ca(client), "SVIDs of the new CA")
    await mutual_tls(server, client, server_id, client_id)


async def test_mutual_tls_follows_federation_changes(node: Node, tmp_path: Path) -> None:
    agent = node.agent
    server_pod = node.pod("api-0", "default", "api")
    client_pod = node.pod("web-0", "default", "web")
    _, server_dir = await node.publish(
        server_pod, attributes={"csi.spire.io/federated-bundles": "merged"}
    )
    _, client_dir = await node.publish(client_pod)
    server, client = TlsFiles.of(server_dir), TlsFiles.of(client_dir)
    server_id, client_id = node.expected_id(server_pod), node.expected_id(client_pod)
    await mutual_tls(server, client, server_id, client_id)
    own_roots = _roots(server.bundle)

    agent.add_federation(PARTNER)
    partner_roots = split_der(agent.federated_ca(PARTNER).bundle_der)
    await eventually(
        lambda: _roots(server.bundle) == own_roots + partner_roots, "the merged partner root"
    )
    # A workload of the partner trust domain, trusting example.org through a bundle it got
    # from example.org (here: the client pod's bundle file).
    svid = agent.federated_ca(PARTNER).issue_x509_svid(PARTNER_CLIENT, 600)
    folder = tmp_path / "partner"
    folder.mkdir()
    (folder / "svid.pem").write_bytes(
        b"".join(
            x509.load_der_x509_certificate(c).public_bytes(serialization.Encoding.PEM)
            for c in svid.cert_chain
        )
    )
    (folder / "svid_key.pem").write_bytes(
        serialization.load_der_private_key(svid.key_pkcs8_der, None).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    partner = TlsFiles(folder / "svid.pem", folder / "svid_key.pem", client.bundle)

    await mutual_tls(server, partner, server_id, PARTNER_CLIENT)
    await mutual_tls(server, client, server_id, client_id)

    agent.remove_federation(PARTNER)
    await eventually(lambda: _roots(server.bundle) == own_roots, "the partner root removed")
    server_saw, _ = await handshake(server, partner, server_id, PARTNER_CLIENT)
    assert isinstance(server_saw, ssl.SSLCertVerificationError), server_saw
    await mutual_tls(server, client, server_id, client_id)


# curl with a JWT-SVID ----------------------------------------------------------------------


class _WhoAmI(BaseHTTPRequestHandler):
    """Answers with the SPIFFE ID of a valid bearer JWT-SVID for audience ``api``, checked
    against the JWT bundle file of the server's own volume; 401 otherwise."""

    jwt_bundle: Path

    def do_GET(self) -> None:
        status, body = 401, b"unauthorized\n"
        header = self.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            token = header.removeprefix("Bearer ")
            subject = jwt.decode(token, options={"verify_signature": False})["sub"]
            trust_domain = subject.removeprefix("spiffe://").partition("/")[0]
            keys = json.loads(self.jwt_bundle.read_bytes())[trust_domain]
            kid = jwt.get_unverified_header(token)["kid"]
            key = jwt.PyJWKSet.from_dict(keys)[kid].key
            try:
                claims = jwt.decode(token, key, algorithms=["ES256"], audience="api")
                status, body = 200, f"{claims['sub']}\n".encode()
            except jwt.InvalidTokenError:
                pass
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


async def test_curl_calls_a_service_with_the_jwt_svid_from_its_volume(
    root: None, public_tmp: Path
) -> None:
    async with open_node(public_tmp / "node") as node:
        await node.start_driver()
        api_pod = node.pod("api-0", "default", "api")
        job_pod = node.pod("call-api-x7k2p", "default", "api-client")
        _, api_dir = await node.publish(
            api_pod, attributes={"csi.spire.io/jwt-bundle-file": "jwt_bundle.json"}
        )
        # As in examples/curl-jwt-job.yaml: runAsUser 100, runAsGroup/fsGroup 101.
        _, job_dir = await node.publish(
            job_pod,
            attributes={
                "csi.spire.io/jwt-audiences": "api",
                "csi.spire.io/jwt-svid-file": "jwt_svid.token",
            },
            fs_group="101",
        )
        handler = type("WhoAmI", (_WhoAmI,), {"jwt_bundle": api_dir / "jwt_bundle.json"})
        server = HTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/v1/whoami"
            script = (
                "curl --fail-with-body --silent --show-error "
                f'--header "Authorization: Bearer $(cat {job_dir}/jwt_svid.token)" {url}'
            )
            result = await trio.run_process(
                ["sh", "-c", script],
                user=100,
                group=101,
                extra_groups=[],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert (result.returncode, result.stderr) == (0, b"")
            assert result.stdout.decode() == node.expected_id(job_pod) + "\n"

            # Without the token the service refuses the job.
            refused = await trio.run_process(
                ["curl", "--fail-with-body", "--silent", url],
                user=100,
                group=101,
                extra_groups=[],
                capture_stdout=True,
                check=False,
            )
            assert (refused.returncode, refused.stdout) == (22, b"unauthorized\n")
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=30)
