"""The per-pod Workload API socket end to end: the real daemon, the dev agent, real bind
mounts, and py-spiffe (a Workload API client this project did not write) connecting
through the pod's read-only mount."""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket as sock
import stat
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from google.protobuf import json_format
from spiffe import JwtSvid, SpiffeId, TrustDomain, WorkloadApiClient
from spiffe.errors import ArgumentError
from spiffe.workloadapi.errors import (
    FetchJwtSvidError,
    FetchX509SvidError,
    ValidateJwtSvidError,
)

from benchmarks.workload_api import workload_api_latency
from tests.h2_raw import FRAME_SIZE_ERROR, RawPeer, deflate_bomb, grpc_message, request_headers
from tests.harness import Node, eventually, mount_count, open_node, read_identity
from trio_spirecsi._proto.spiffe.workload import workload_pb2 as wl
from trio_spirecsi.devagent.agent import DevAgent
from trio_spirecsi.devagent.entries import Entry
from trio_spirecsi.grpc import Channel, Method, RpcError, StatusCode, methods, open_channel
from trio_spirecsi.grpc.methods import Req, Resp
from trio_spirecsi.spire.responses import split_der

T = TypeVar("T")
WORKLOAD_API = {"csi.spire.io/workload-api": "true"}
HEADER = {"workload.spiffe.io": "true"}


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with open_node(tmp_path / "node") as node:
        await node.start_driver()
        yield node


@pytest.fixture
def pods() -> Iterator[Path]:
    """Where pods see their volumes (their mountPath): a unix socket path has at most 107
    bytes, and the kubelet's target paths under tmp_path are longer, as on a real node."""
    folder = Path(tempfile.mkdtemp(prefix="wl-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def mount_path(pods: Path, name: str, target: Path) -> Path:
    """The pod's mountPath for the volume at ``target``: everything below it is read
    through the kubelet's read-only bind mount."""
    view = pods / name
    view.symlink_to(target)
    return view


def accepting(socket: Path) -> Callable[[], bool]:
    """True once a server listens on ``socket`` (its file appears a moment before)."""

    def check() -> bool:
        probe = sock.socket(sock.AF_UNIX, sock.SOCK_STREAM)
        try:
            probe.connect(str(socket))
        except OSError:
            return False
        finally:
            probe.close()
        return True

    return check


async def first_response(
    channel: Channel, method: Method[Req, Resp], request: Req, timeout: float | None = None
) -> Resp:
    """The first message of a Workload API stream, the security header sent."""
    async with channel.stream(method, request, metadata=HEADER, timeout=timeout) as stream:
        return await stream.__anext__()


async def spiffe(socket: Path, call: Callable[[WorkloadApiClient], T]) -> T:
    """Run one py-spiffe call (synchronous) in a worker thread."""

    def run() -> T:
        with WorkloadApiClient(socket_path=f"unix://{socket}", default_timeout=20) as client:
            return call(client)

    return await trio.to_thread.run_sync(run)


def der_key(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


async def publish_with_socket(
    node: Node, pods: Path, name: str = "web-0", namespace: str = "default", sa: str = "web"
) -> tuple[str, Path, Path]:
    """Publish a pod's volume with the Workload API; (volume ID, target, pod's socket)."""
    pod = node.pod(name, namespace, sa)
    volume_id, target = await node.publish(pod, attributes=WORKLOAD_API)
    socket = mount_path(pods, name, target) / "agent.sock"
    await eventually(accepting(socket), "the Workload API socket in the mount")
    return volume_id, target, socket


async def test_py_spiffe_fetches_the_pods_x509_svid_and_bundles_through_the_mount(
    node: Node, pods: Path
) -> None:
    _, target, socket = await publish_with_socket(node, pods, namespace="shop", sa="web")

    svid = await spiffe(socket, lambda c: c.fetch_x509_svid())
    files = read_identity(target)
    assert str(svid.spiffe_id) == "spiffe://example.org/ns/shop/sa/web"
    assert svid.leaf.serial_number == files.serial
    assert der_key(svid.private_key) == der_key(svid.leaf)

    bundles = await spiffe(socket, lambda c: c.fetch_x509_bundles())
    own = bundles.get_bundle_for_trust_domain(TrustDomain("example.org"))
    assert own is not None
    assert {c.public_bytes(serialization.Encoding.DER) for c in own.x509_authorities} == set(
        split_der(node.agent.current_bundle_der)
    )
    context = await spiffe(socket, lambda c: c.fetch_x509_context())
    assert [str(s.spiffe_id) for s in context.x509_svids] == [str(svid.spiffe_id)]

    # The pod connects although its mount is read-only, and the files are all still there.
    assert stat.S_ISSOCK(os.lstat(socket).st_mode)
    with pytest.raises(OSError) as info:
        (target / "svid.pem").write_text("tampered")
    assert info.value.errno == errno.EROFS
    assert sorted(p.name for p in target.iterdir() if not p.name.startswith("..")) == [
        "agent.sock",
        "svid.pem",
        "svid_bundle.pem",
        "svid_key.pem",
    ]
    # No fsGroup: the pod's user is unknown, only this pod's mount reaches the socket.
    assert stat.S_IMODE(os.lstat(socket).st_mode) == 0o666


async def test_socket_belongs_to_the_pods_fs_group(node: Node, pods: Path) -> None:
    pod = node.pod()
    _, target = await node.publish(pod, attributes=WORKLOAD_API, fs_group="4321")
    socket = target / "agent.sock"
    await eventually(
        lambda: socket.exists() and os.lstat(socket).st_gid == 4321, "the socket in the group"
    )
    st = os.lstat(socket)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 4321, 0o660)


async def test_socket_name_comes_from_the_attribute(node: Node, pods: Path) -> None:
    pod = node.pod()
    attributes = {**WORKLOAD_API, "csi.spire.io/workload-api-socket": "spire-agent.sock"}
    _, target = await node.publish(pod, attributes=attributes)
    socket = mount_path(pods, "web", target) / "spire-agent.sock"
    await eventually(accepting(socket), "the renamed socket")
    assert not (target / "agent.sock").exists()
    svid = await spiffe(socket, lambda c: c.fetch_x509_svid())
    assert str(svid.spiffe_id) == node.expected_id(pod)


async def test_volume_without_the_attribute_has_no_socket(node: Node) -> None:
    _, target = await node.publish(node.pod())
    assert not any(stat.S_ISSOCK(os.lstat(p).st_mode) for p in target.iterdir())


async def test_py_spiffe_fetches_and_validates_a_jwt_svid(node: Node, pods: Path) -> None:
    pod = node.pod("api-0", "shop", "api")
    _, _, socket = await publish_with_socket(node, pods, "api-0", "shop", "api")

    jwt = await spiffe(socket, lambda c: c.fetch_jwt_svid({"orders", "billing"}))
    assert str(jwt.spiffe_id) == node.expected_id(pod)
    assert jwt.audience == {"orders", "billing"}

    validated = await spiffe(socket, lambda c: c.validate_jwt_svid(jwt.token, "orders"))
    assert str(validated.spiffe_id) == node.expected_id(pod)
    with pytest.raises(ValidateJwtSvidError) as info:
        await spiffe(socket, lambda c: c.validate_jwt_svid(jwt.token, "inventory"))
    assert "INVALID_ARGUMENT" in str(info.value)
    assert "audience" in str(info.value)

    jwt_bundles = await spiffe(socket, lambda c: c.fetch_jwt_bundles())
    bundle = jwt_bundles.get_bundle_for_trust_domain(TrustDomain("example.org"))
    assert bundle is not None
    assert bundle.get_jwt_authority(node.agent.ca.jwt_kid) is not None
    # The bundle py-spiffe got verifies the token it got: all from this pod's socket.
    checked = await trio.to_thread.run_sync(
        lambda: JwtSvid.parse_and_validate(jwt.token, bundle, {"billing"})
    )
    assert str(checked.spiffe_id) == node.expected_id(pod)


async def test_validate_returns_the_spiffe_id_and_the_claims(node: Node, pods: Path) -> None:
    pod = node.pod()
    _, _, socket = await publish_with_socket(node, pods)
    async with open_channel(str(socket)) as channel:
        fetched = await channel.unary(
            methods.FETCH_JWT_SVID, wl.JWTSVIDRequest(audience=["db"]), metadata=HEADER
        )
        token = fetched.svids[0].svid
        answer = await channel.unary(
            methods.VALIDATE_JWT_SVID,
            wl.ValidateJWTSVIDRequest(audience="db", svid=token),
            metadata=HEADER,
        )
        assert answer.spiffe_id == node.expected_id(pod)
        claims = json_format.MessageToDict(answer.claims)
        assert claims["sub"] == node.expected_id(pod)
        assert claims["aud"] == ["db"]
        assert claims["exp"] > time.time()

        tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        with pytest.raises(RpcError) as info:
            await channel.unary(
                methods.VALIDATE_JWT_SVID,
                wl.ValidateJWTSVIDRequest(audience="db", svid=tampered),
                metadata=HEADER,
            )
        assert info.value.code == StatusCode.INVALID_ARGUMENT
        assert info.value.message == "token signature is invalid"


async def test_calls_without_the_security_header_are_refused(node: Node, pods: Path) -> None:
    _, _, socket = await publish_with_socket(node, pods)
    async with open_channel(str(socket)) as channel:
        with pytest.raises(RpcError) as info:
            async with channel.stream(methods.FETCH_X509_SVID, wl.X509SVIDRequest()) as stream:
                await stream.__anext__()
        assert info.value.code == StatusCode.INVALID_ARGUMENT
        assert info.value.message == "security header missing from request"
        for header in ({}, {"workload.spiffe.io": "false"}):
            with pytest.raises(RpcError) as info:
                await channel.unary(
                    methods.FETCH_JWT_SVID, wl.JWTSVIDRequest(audience=["a"]), metadata=header
                )
            assert info.value.code == StatusCode.INVALID_ARGUMENT
        with pytest.raises(RpcError) as info:
            await channel.unary(methods.FETCH_JWT_SVID, wl.JWTSVIDRequest(), metadata=HEADER)
        assert (info.value.code, info.value.message) == (
            StatusCode.INVALID_ARGUMENT,
            "audience must be specified",
        )


async def test_rotation_reaches_a_streaming_client_and_the_files(node: Node, pods: Path) -> None:
    _, target, socket = await publish_with_socket(node, pods)
    serials: list[int] = []
    errors: list[Exception] = []
    lock = threading.Lock()

    def on_success(context: Any) -> None:
        with lock:
            serials.append(context.default_svid.leaf.serial_number)

    client = WorkloadApiClient(socket_path=f"unix://{socket}")
    handler = client.stream_x509_contexts(on_success, errors.append, retry_connect=False)
    try:
        await eventually(lambda: len(serials) == 1, "the first X.509 context")
        assert serials[0] == read_identity(target).serial
        node.agent.rotate()
        await eventually(lambda: len(serials) == 2, "the rotated X.509 context")
        assert serials[1] != serials[0]
        await eventually(lambda: read_identity(target).serial == serials[1], "rotated files")
        # Rewriting the files left the socket in place.
        assert stat.S_ISSOCK(os.lstat(socket).st_mode)
        again = await spiffe(socket, lambda c: c.fetch_x509_svid())
        assert again.leaf.serial_number == serials[1]
        assert errors == []
    finally:
        handler.cancel()
        await trio.to_thread.run_sync(client.close)


async def test_each_pods_socket_serves_only_that_pods_identity(node: Node, pods: Path) -> None:
    web, db = node.pod("web-0", "shop", "web"), node.pod("db-0", "shop", "db")
    _, web_target, web_socket = await publish_with_socket(node, pods, "web-0", "shop", "web")
    _, db_target, db_socket = await publish_with_socket(node, pods, "db-0", "shop", "db")
    assert node.expected_id(web) != node.expected_id(db)

    for pod, target, socket in ((web, web_target, web_socket), (db, db_target, db_socket)):
        svids = await spiffe(socket, lambda c: c.fetch_x509_svids())
        assert [str(s.spiffe_id) for s in svids] == [node.expected_id(pod)]
        assert svids[0].leaf.serial_number == read_identity(target).serial
        jwt = await spiffe(socket, lambda c: c.fetch_jwt_svid({"x"}))
        assert str(jwt.spiffe_id) == node.expected_id(pod)

    # Asking one pod's socket for the other pod's identity gives nothing.
    other = SpiffeId(node.expected_id(db))
    with pytest.raises(FetchJwtSvidError) as info:
        await spiffe(web_socket, lambda c: c.fetch_jwt_svid({"x"}, subject=other))
    assert "no identity issued" in str(info.value)
    assert "PERMISSION_DENIED" in str(info.value)


async def test_spiffe_id_selects_among_the_pods_svids(tmp_path: Path, pods: Path) -> None:
    entries = [
        Entry("spiffe://example.org/web", frozenset({("k8s", "sa:web")}), hint="web"),
        Entry("spiffe://example.org/shop", frozenset({("k8s", "ns:shop")}), hint="shop"),
    ]
    async with open_node(tmp_path / "node", DevAgent(entries=entries)) as node:
        await node.start_driver()
        pod = node.pod("web-0", "shop", "web")
        # The files hold the SVID with hint "shop": so is the socket's default SVID.
        attributes = {**WORKLOAD_API, "csi.spire.io/svid-hint": "shop"}
        _, target = await node.publish(pod, attributes=attributes)
        socket = mount_path(pods, "web-0", target) / "agent.sock"
        await eventually(accepting(socket), "the socket")

        svids = await spiffe(socket, lambda c: c.fetch_x509_svids())
        assert [str(s.spiffe_id) for s in svids] == [
            "spiffe://example.org/shop",
            "spiffe://example.org/web",
        ]
        assert read_identity(target).spiffe_id == "spiffe://example.org/shop"

        default = await spiffe(socket, lambda c: c.fetch_jwt_svid({"a"}))
        assert str(default.spiffe_id) == "spiffe://example.org/shop"
        chosen = await spiffe(
            socket, lambda c: c.fetch_jwt_svid({"a"}, subject=SpiffeId("spiffe://example.org/web"))
        )
        assert str(chosen.spiffe_id) == "spiffe://example.org/web"
        every = await spiffe(socket, lambda c: c.fetch_jwt_svids({"a"}))
        assert sorted(str(s.spiffe_id) for s in every) == [
            "spiffe://example.org/shop",
            "spiffe://example.org/web",
        ]


async def test_federated_bundles_are_limited_to_what_the_svid_federates_with(
    tmp_path: Path, pods: Path
) -> None:
    entry = Entry(
        "spiffe://example.org/web",
        frozenset({("k8s", "sa:web")}),
        federates_with=("partner.org",),
    )
    agent = DevAgent(entries=[entry], federated_trust_domains=["partner.org", "other.org"])
    async with open_node(tmp_path / "node", agent) as node:
        await node.start_driver()
        _, _, socket = await publish_with_socket(node, pods)

        context = await spiffe(socket, lambda c: c.fetch_x509_context())
        domains = {str(b.trust_domain) for b in context.x509_bundle_set.bundles}
        assert domains == {"example.org", "partner.org"}
        partner = context.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain("partner.org"))
        assert partner is not None
        assert {c.public_bytes(serialization.Encoding.DER) for c in partner.x509_authorities} == {
            agent.federated_ca("partner.org").root_der
        }
        bundles = await spiffe(socket, lambda c: c.fetch_x509_bundles())
        assert {str(b.trust_domain) for b in bundles.bundles} == {"example.org", "partner.org"}
        jwt_bundles = await spiffe(socket, lambda c: c.fetch_jwt_bundles())
        assert {str(b.trust_domain) for b in jwt_bundles.bundles} == {
            "example.org",
            "partner.org",
        }

        # The wire keys are trust domain SPIFFE IDs, as the specification says.
        async with (
            open_channel(str(socket)) as channel,
            channel.stream(
                methods.FETCH_X509_SVID, wl.X509SVIDRequest(), metadata=HEADER
            ) as stream,
        ):
            response = await stream.__anext__()
        assert list(response.federated_bundles) == ["spiffe://partner.org"]
        assert response.svids[0].bundle == node.agent.current_bundle_der


async def test_unpublish_ends_open_streams_and_removes_the_socket(node: Node, pods: Path) -> None:
    volume_id, target, socket = await publish_with_socket(node, pods)
    received: list[int] = []
    errors: list[Exception] = []
    client = WorkloadApiClient(socket_path=f"unix://{socket}")
    handler = client.stream_x509_contexts(
        lambda c: received.append(1), errors.append, retry_connect=False
    )
    try:
        await eventually(lambda: received == [1], "the stream's first response")
        async with (
            open_channel(str(socket)) as channel,
            channel.stream(
                methods.FETCH_JWT_BUNDLES, wl.JWTBundlesRequest(), metadata=HEADER
            ) as stream,
        ):
            await stream.__anext__()
            await node.client.unpublish(volume_id, str(target))
            with pytest.raises(RpcError) as info, trio.fail_after(20):
                await stream.__anext__()
            assert info.value.code == StatusCode.UNAVAILABLE
        await eventually(lambda: len(errors) == 1, "py-spiffe's stream ending")
    finally:
        handler.cancel()
        await trio.to_thread.run_sync(client.close)
    assert mount_count(target) == 0
    assert not socket.exists()
    with pytest.raises(ArgumentError):
        WorkloadApiClient(socket_path=f"unix://{socket}")


async def test_a_restarted_driver_replaces_the_stale_socket(tmp_path: Path, pods: Path) -> None:
    async with open_node(tmp_path / "node") as node:
        proc = node.spawn_driver()
        await node.wait_for_socket(proc)
        pod = node.pod()
        _, target, socket = await publish_with_socket(node, pods)
        before = await spiffe(socket, lambda c: c.fetch_x509_svid())

        proc.kill()
        proc.wait()
        assert stat.S_ISSOCK(os.lstat(socket).st_mode)  # left behind, nobody listening
        with pytest.raises(FetchX509SvidError):
            await spiffe(socket, lambda c: c.fetch_x509_svid(timeout=5))

        await node.start_driver()
        after = await fetch_when_served(socket)
        assert str(after.spiffe_id) == str(before.spiffe_id) == node.expected_id(pod)
        assert mount_count(target) == 1


async def test_lost_entitlement_is_permission_denied(node: Node, pods: Path) -> None:
    pod = node.pod()
    _, target, socket = await publish_with_socket(node, pods)
    async with open_channel(str(socket)) as channel:
        async with channel.stream(
            methods.FETCH_X509_SVID, wl.X509SVIDRequest(), metadata=HEADER
        ) as stream:
            await stream.__anext__()
            node.agent.revoke(node.expected_id(pod))
            with pytest.raises(RpcError) as info, trio.fail_after(30):
                await stream.__anext__()
        assert (info.value.code, info.value.message) == (
            StatusCode.PERMISSION_DENIED,
            "no identity issued",
        )
        with pytest.raises(RpcError) as info:
            await first_response(channel, methods.FETCH_X509_BUNDLES, wl.X509BundlesRequest())
        assert info.value.code == StatusCode.PERMISSION_DENIED
        with pytest.raises(RpcError) as info:
            await first_response(channel, methods.FETCH_JWT_BUNDLES, wl.JWTBundlesRequest())
        assert info.value.code == StatusCode.PERMISSION_DENIED
        with pytest.raises(RpcError) as info:
            await channel.unary(
                methods.FETCH_JWT_SVID, wl.JWTSVIDRequest(audience=["a"]), metadata=HEADER
            )
        assert info.value.code == StatusCode.PERMISSION_DENIED
    # The files keep the last SVID (as documented); the socket refuses to hand it out.
    assert read_identity(target).spiffe_id == node.expected_id(pod)

    node.agent.restore(node.expected_id(pod))
    svid = await fetch_when_served(socket)
    assert str(svid.spiffe_id) == node.expected_id(pod)


async def fetch_when_served(socket: Path) -> Any:
    with trio.fail_after(30):
        while True:
            try:
                return await spiffe(socket, lambda c: c.fetch_x509_svid(timeout=5))
            except FetchX509SvidError:
                await trio.sleep(0.2)


async def test_agent_outage_serves_the_last_svid_until_it_expires(
    tmp_path: Path, pods: Path
) -> None:
    async with open_node(tmp_path / "node", DevAgent(svid_ttl=8)) as node:
        await node.start_driver()
        _, target, socket = await publish_with_socket(node, pods)
        await node.stop_agent()
        files = read_identity(target)

        svid = await spiffe(socket, lambda c: c.fetch_x509_svid())
        assert svid.leaf.serial_number == files.serial
        expires_at = svid.leaf.not_valid_after_utc.timestamp()

        await eventually(lambda: time.time() > expires_at + 0.5, "the SVID to expire", 30)
        async with open_channel(str(socket)) as channel:
            with pytest.raises(RpcError) as info:
                async with channel.stream(
                    methods.FETCH_X509_SVID, wl.X509SVIDRequest(), metadata=HEADER, timeout=2
                ) as stream:
                    await stream.__anext__()
            assert info.value.code == StatusCode.DEADLINE_EXCEEDED


async def test_open_streams_get_a_full_response_on_every_bundle_change(
    node: Node, pods: Path
) -> None:
    _, _, socket = await publish_with_socket(node, pods)
    async with (
        open_channel(str(socket)) as channel,
        channel.stream(
            methods.FETCH_X509_BUNDLES, wl.X509BundlesRequest(), metadata=HEADER
        ) as bundles,
        channel.stream(methods.FETCH_X509_SVID, wl.X509SVIDRequest(), metadata=HEADER) as svids,
    ):
        first = await bundles.__anext__()
        first_svid = await svids.__anext__()
        assert split_der(first.bundles["spiffe://example.org"]) == split_der(
            node.agent.current_bundle_der
        )
        extra = node.agent.add_bundle_ca()
        with trio.fail_after(20):
            second = await bundles.__anext__()
            second_svid = await svids.__anext__()
        assert extra in split_der(second.bundles["spiffe://example.org"])
        assert extra in split_der(second_svid.svids[0].bundle)
        assert second_svid.svids[0].x509_svid == first_svid.svids[0].x509_svid
        assert second_svid.svids[0].x509_svid_key == first_svid.svids[0].x509_svid_key


async def test_a_resumed_volume_waits_for_the_agent_then_answers(
    tmp_path: Path, pods: Path
) -> None:
    async with open_node(tmp_path / "node") as node:
        await node.start_driver()
        pod = node.pod()
        _, _, socket = await publish_with_socket(node, pods)
        await node.stop_driver()
        assert not socket.exists()  # a stopped driver serves nothing
        await node.stop_agent()

        await node.start_driver()
        await eventually(accepting(socket), "the socket served again on resume")
        async with open_channel(str(socket)) as channel:
            with pytest.raises(RpcError) as info:
                async with channel.stream(
                    methods.FETCH_X509_SVID, wl.X509SVIDRequest(), metadata=HEADER, timeout=1
                ) as stream:
                    await stream.__anext__()
            assert info.value.code == StatusCode.DEADLINE_EXCEEDED  # waiting, not failing
            async with channel.stream(
                methods.FETCH_X509_SVID, wl.X509SVIDRequest(), metadata=HEADER
            ) as stream:
                await node.start_agent()
                with trio.fail_after(30):
                    response = await stream.__anext__()
        assert [s.spiffe_id for s in response.svids] == [node.expected_id(pod)]


async def test_latency_benchmark_measures_each_call_and_cleans_up(node: Node) -> None:
    rotations: list[int] = []

    async def rotate() -> None:
        rotations.append(1)
        node.agent.rotate("spiffe://example.org/ns/bench/sa/socket")

    rows = await workload_api_latency(
        node.client, node.kubelet_dir, calls=5, rotate=rotate, rotations=3
    )
    assert [name.split(",")[0] for name, _ in rows] == [
        "Workload API FetchX509SVID",
        "Workload API FetchJWTSVID",
        "Workload API ValidateJWTSVID",
        "SDS first StreamSecrets response",
        "SDS push after a rotation",
    ]
    assert len(rotations) == 3
    assert all(re.fullmatch(r"\d+\.\d\d ms / \d+\.\d\d ms", value) for _, value in rows)
    assert node.volume_folders() == []


async def test_a_hostile_pod_loses_its_own_connections_and_nothing_else(
    node: Node, pods: Path
) -> None:
    """The driver serves every pod on the node: one pod's bad bytes end only its connection."""
    _, _, socket = await publish_with_socket(node, pods, name="evil-0", sa="evil")
    _, _, other = await publish_with_socket(node, pods, name="web-0", sa="web")
    path = methods.FETCH_JWT_SVID.path
    workload = ("workload.spiffe.io", "true")

    headers = await RawPeer.connect(str(socket))  # a header value that is not UTF-8
    await headers.start_client()
    await headers.call(1, path, b"", workload, ("x-evil", b"\xff\xfe\xfd"))
    bad_header = await headers.status(1)

    bomb = await RawPeer.connect(str(socket))  # 64 MiB of zeros in 64 KiB of deflate
    await bomb.start_client()
    packed = deflate_bomb(64 * 1024 * 1024)
    await bomb.send(
        bomb.headers(1, request_headers(path, workload, ("grpc-encoding", "deflate"))),
        *bomb.data_frames(1, grpc_message(packed, compressed=True), end_stream=True),
    )
    bombed = await bomb.status(1)

    oversized = await RawPeer.connect(str(socket))  # a frame beyond every limit
    await oversized.start_client()
    await oversized.send(b"\x7f\xff\xff\x00\x00\x00\x00\x00\x01")
    goaway = await oversized.goaway()

    assert bad_header["grpc-status"] == str(StatusCode.INTERNAL.value)
    assert bombed["grpc-status"] == str(StatusCode.RESOURCE_EXHAUSTED.value)
    assert goaway.error_code == FRAME_SIZE_ERROR
    assert await node.client.probe()
    for served in (socket, other):
        svid = await spiffe(served, lambda c: c.fetch_x509_svid())
        assert str(svid.spiffe_id).startswith("spiffe://example.org/ns/default/sa/")
