"""The dev agent on a real unix socket, spoken to by grpcio: a gRPC peer we did not write."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Generic

import grpc
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import JwtBundle, JwtSvid, TrustDomain
from spiffe import X509Svid as SpiffeX509Svid
from spiffe.utils.certificate_utils import parse_der_certificates

from trio_spirecsi._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as di
from trio_spirecsi._proto.spire.api.types import types_pb2
from trio_spirecsi.devagent.agent import DevAgent
from trio_spirecsi.devagent.entries import Entry
from trio_spirecsi.grpc import methods
from trio_spirecsi.grpc.methods import Method, Req, Resp

WAIT = 20.0
"""Generous bound for anything the agent should do promptly (the machine is shared)."""

SHOP_WEB = "spiffe://example.org/ns/shop/sa/web"


def pod(
    ns: str = "shop", sa: str = "web", name: str = "web-0", uid: str = "uid-0"
) -> list[types_pb2.Selector]:
    return [
        types_pb2.Selector(type="k8s", value=v)
        for v in (f"ns:{ns}", f"sa:{sa}", f"pod-name:{name}", f"pod-uid:{uid}", "node-name:n1")
    ]


def svids_request(selectors: list[types_pb2.Selector]) -> di.SubscribeToX509SVIDsRequest:
    return di.SubscribeToX509SVIDsRequest(selectors=selectors)


class Stream(Generic[Resp]):
    """A grpcio server-streaming call, read from Trio without blocking the loop."""

    def __init__(self, call: Any) -> None:
        self.call = call

    async def next(self) -> Resp:
        with trio.fail_after(WAIT):
            response: Resp = await trio.to_thread.run_sync(next, self.call, abandon_on_cancel=True)
            return response

    async def error(self) -> grpc.RpcError:
        """The status the stream ends with (it must end with an error)."""
        with pytest.raises(grpc.RpcError) as info:
            await self.next()
        return info.value

    def cancel(self) -> None:
        self.call.cancel()


class Peer:
    def __init__(self, socket: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket}")

    def stream(self, method: Method[Req, Resp], request: Req) -> Stream[Resp]:
        call = self.channel.unary_stream(
            method.path,
            request_serializer=method.request_type.SerializeToString,
            response_deserializer=method.response_type.FromString,
        )
        return Stream(call(request))

    async def unary(self, method: Method[Req, Resp], request: Req) -> Resp:
        call = self.channel.unary_unary(
            method.path,
            request_serializer=method.request_type.SerializeToString,
            response_deserializer=method.response_type.FromString,
        )
        response: Resp = await trio.to_thread.run_sync(
            lambda: call(request, timeout=WAIT), abandon_on_cancel=True
        )
        return response

    async def unary_error(self, method: Method[Req, Resp], request: Req) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            await self.unary(method, request)
        return info.value

    def svids(self, selectors: list[types_pb2.Selector]) -> Stream[di.SubscribeToX509SVIDsResponse]:
        return self.stream(methods.SUBSCRIBE_TO_X509_SVIDS, svids_request(selectors))

    def x509_bundles(self) -> Stream[di.SubscribeToX509BundlesResponse]:
        return self.stream(methods.SUBSCRIBE_TO_X509_BUNDLES, di.SubscribeToX509BundlesRequest())

    def jwt_bundles(self) -> Stream[di.SubscribeToJWTBundlesResponse]:
        return self.stream(methods.SUBSCRIBE_TO_JWT_BUNDLES, di.SubscribeToJWTBundlesRequest())


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short folder for sockets (unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="devagent-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def serving(agent: DevAgent, sock_dir: Path) -> AsyncIterator[Peer]:
    socket = sock_dir / "admin.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.serve, str(socket))
        peer = Peer(socket)
        try:
            yield peer
        finally:
            peer.channel.close()
            nursery.cancel_scope.cancel()


async def eventually(check: Callable[[], bool], what: str) -> None:
    """Bounded wait for state the agent exposes only as properties."""
    with trio.move_on_after(WAIT):
        while not check():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting for: {what}")


def leaf(svid: di.X509SVIDWithKey) -> x509.Certificate:
    return x509.load_der_x509_certificate(svid.x509_svid.cert_chain[0])


def split(blob: bytes) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER) for c in parse_der_certificates(blob)]


# SubscribeToX509SVIDs -------------------------------------------------------------


async def test_unmatched_selectors_get_a_zero_svid_response_at_once(sock_dir: Path) -> None:
    agent = DevAgent("example.org")
    async with serving(agent, sock_dir) as peer:
        lonely = [types_pb2.Selector(type="k8s", value="ns:shop")]
        stream = peer.svids(lonely)
        first = await stream.next()
        assert list(first.x509_svids) == []
        assert agent.open_svid_subscriptions == [frozenset({("k8s", "ns:shop")})]
        assert agent.subscribe_count == 1


async def test_svid_stream_sends_the_svid_then_a_new_one_after_rotate(sock_dir: Path) -> None:
    agent = DevAgent("example.org", svid_ttl=600)
    async with serving(agent, sock_dir) as peer:
        stream = peer.svids(pod())
        first = await stream.next()
        [svid] = first.x509_svids
        assert (svid.x509_svid.id.trust_domain, svid.x509_svid.id.path) == (
            "example.org",
            "/ns/shop/sa/web",
        )
        cert = leaf(svid)
        assert svid.x509_svid.expires_at == int(cert.not_valid_after_utc.timestamp())
        key = serialization.load_der_private_key(svid.x509_svid_key, None)
        assert key.public_key() == cert.public_key()
        parsed = SpiffeX509Svid.parse_raw(b"".join(svid.x509_svid.cert_chain), svid.x509_svid_key)
        assert str(parsed.spiffe_id) == SHOP_WEB
        assert list(first.federates_with) == []
        assert agent.expected_spiffe_id([(s.type, s.value) for s in pod()]) == SHOP_WEB

        agent.rotate()
        [rotated] = (await stream.next()).x509_svids
        assert leaf(rotated).serial_number != cert.serial_number
        assert rotated.x509_svid_key != svid.x509_svid_key
        assert rotated.x509_svid.id == svid.x509_svid.id


async def test_a_gradual_rotation_reaches_every_subscriber(sock_dir: Path) -> None:
    agent = DevAgent("example.org")
    async with serving(agent, sock_dir) as peer:
        streams = [peer.svids(pod(name=f"web-{i}", uid=f"uid-{i}")) for i in range(5)]
        firsts = {leaf((await s.next()).x509_svids[0]).serial_number for s in streams}
        with pytest.raises(ValueError, match="per_turn must be 1 or more, not 0"):
            await agent.rotate_gradually(per_turn=0)
        await agent.rotate_gradually(per_turn=2)
        rotated = {leaf((await s.next()).x509_svids[0]).serial_number for s in streams}
        assert len(rotated) == 1
        assert rotated.isdisjoint(firsts)


async def test_pods_of_one_service_account_share_one_svid_and_its_rotations(
    sock_dir: Path,
) -> None:
    agent = DevAgent("example.org")
    async with serving(agent, sock_dir) as peer:
        streams = [peer.svids(pod(name=f"web-{i}", uid=f"uid-{i}")) for i in range(3)]
        firsts = [(await s.next()).x509_svids[0] for s in streams]
        assert len({f.x509_svid.cert_chain[0] for f in firsts}) == 1
        assert len(agent.cached_svids(SHOP_WEB)) == 1
        other = peer.svids(pod(sa="db", uid="uid-9"))
        [db] = (await other.next()).x509_svids
        assert db.x509_svid.id.path == "/ns/shop/sa/db"

        agent.rotate()
        rotated = [(await s.next()).x509_svids[0] for s in streams]
        assert len({r.x509_svid.cert_chain[0] for r in rotated}) == 1
        assert rotated[0].x509_svid.cert_chain[0] != firsts[0].x509_svid.cert_chain[0]
        assert len(agent.open_svid_subscriptions) == 4


async def test_rotating_one_spiffe_id_leaves_the_others_svids_alone(sock_dir: Path) -> None:
    agent = DevAgent("example.org")
    async with serving(agent, sock_dir) as peer:
        web = peer.svids(pod(uid="web"))
        db = peer.svids(pod(sa="db", uid="db"))
        [web_first] = (await web.next()).x509_svids
        [db_first] = (await db.next()).x509_svids
        agent.rotate(SHOP_WEB)
        [web_rotated] = (await web.next()).x509_svids
        assert leaf(web_rotated).serial_number != leaf(web_first).serial_number
        assert [s.serial for s in agent.cached_svids("spiffe://example.org/ns/shop/sa/db")] == [
            leaf(db_first).serial_number
        ]


async def test_cancelling_the_grpcio_stream_removes_the_subscription(sock_dir: Path) -> None:
    agent = DevAgent("example.org")
    async with serving(agent, sock_dir) as peer:
        keep = peer.svids(pod(uid="keep"))
        gone = peer.svids(pod(uid="gone"))
        await keep.next()
        await gone.next()
        assert len(agent.open_svid_subscriptions) == 2
        gone.cancel()
        await eventually(lambda: len(agent.open_svid_subscriptions) == 1, "one stream closed")
        [remaining] = agent.open_svid_subscriptions
        assert ("k8s", "pod-uid:keep") in remaining
        assert (await gone.error()).code() == grpc.StatusCode.CANCELLED


async def test_revoke_sends_zero_svids_and_restore_a_fresh_svid(sock_dir: Path) -> None:
    agent = DevAgent("example.org")
    async with serving(agent, sock_dir) as peer:
        stream = peer.svids(pod())
        [before] = (await stream.next()).x509_svids
        agent.revoke(SHOP_WEB)
        assert list((await stream.next()).x509_svids) == []
        assert agent.expected_spiffe_id([("k8s", "ns:shop"), ("k8s", "sa:web")]) is None
        agent.restore(SHOP_WEB)
        [after] = (await stream.next()).x509_svids
        assert after.x509_svid.id == before.x509_svid.id
        assert leaf(after).serial_number != leaf(before).serial_number


async def test_selectors_and_pid_are_mutually_exclusive(sock_dir: Path) -> None:
    agent = DevAgent("example.org")
    async with serving(agent, sock_dir) as peer:
        both = peer.stream(
            methods.SUBSCRIBE_TO_X509_SVIDS, di.SubscribeToX509SVIDsRequest(selectors=pod(), pid=7)
        )
        error = await both.error()
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not both" in error.details()
        neither = peer.stream(methods.SUBSCRIBE_TO_X509_SVIDS, di.SubscribeToX509SVIDsRequest())
        assert (await neither.error()).code() == grpc.StatusCode.INVALID_ARGUMENT
        by_pid = peer.stream(methods.SUBSCRIBE_TO_X509_SVIDS, di.SubscribeToX509SVIDsRequest(pid=7))
        error = await by_pid.error()
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "does not attest processes" in error.details()
        empty_type = peer.svids([types_pb2.Selector(type="", value="ns:x")])
        assert (await empty_type.error()).code() == grpc.StatusCode.INVALID_ARGUMENT
        assert agent.open_svid_subscriptions == []


async def test_rotation_timer_reissues_each_svid_at_half_its_life(sock_dir: Path) -> None:
    agent = DevAgent("example.org", svid_ttl=2, template="spiffe://{td}/pod/{pod_uid}")
    async with serving(agent, sock_dir) as peer:
        streams = [peer.svids(pod(uid=f"u{i}")) for i in range(3)]
        firsts = [(await s.next()).x509_svids[0] for s in streams]
        for stream, first in zip(streams, firsts, strict=True):
            [second] = (await stream.next()).x509_svids
            assert second.x509_svid.id == first.x509_svid.id
            assert leaf(second).serial_number != leaf(first).serial_number
            assert second.x509_svid.expires_at >= first.x509_svid.expires_at
        # An SVID nobody subscribes to any more leaves the cache at its next due time.
        streams[0].cancel()
        await eventually(lambda: not agent.cached_svids("spiffe://example.org/pod/u0"), "dropped")
        assert agent.cached_svids("spiffe://example.org/pod/u1")


async def test_entry_changes_reach_open_streams(sock_dir: Path) -> None:
    agent = DevAgent("example.org", federated_trust_domains=["partner.example"])
    async with serving(agent, sock_dir) as peer:
        stream = peer.svids(pod())
        [svid] = (await stream.next()).x509_svids
        assert svid.x509_svid.hint == ""
        selectors = frozenset({("k8s", "sa:web")})
        agent.set_entries(
            [
                Entry("spiffe://example.org/web", selectors, hint="external",
                      federates_with=("partner.example", "unknown.example")),
                Entry("spiffe://example.org/other", frozenset({("k8s", "sa:other")})),
                Entry("spiffe://example.org/any", frozenset({("k8s", "node-name:n1")})),
            ]
        )  # fmt: skip
        update = await stream.next()
        assert [(s.x509_svid.id.path, s.x509_svid.hint) for s in update.x509_svids] == [
            ("/web", "external"),
            ("/any", ""),
        ]
        # Only trust domains whose bundles the agent has, as trust domain SPIFFE IDs.
        assert list(update.federates_with) == ["spiffe://partner.example"]


async def test_template_entries_federate_as_federations_come_and_go(sock_dir: Path) -> None:
    agent = DevAgent(
        "example.org", federated_trust_domains=["partner.example"], federate_template=True
    )
    async with serving(agent, sock_dir) as peer:
        svids = peer.svids(pod())
        bundles = peer.x509_bundles()
        first = await svids.next()
        assert list(first.federates_with) == ["spiffe://partner.example"]
        assert set((await bundles.next()).ca_certificates) == {
            "spiffe://example.org",
            "spiffe://partner.example",
        }
        agent.add_federation("spiffe://third.example")
        second = await svids.next()
        assert list(second.federates_with) == ["spiffe://partner.example", "spiffe://third.example"]
        # The SVID itself is unchanged: federation is not a reason to re-issue.
        assert second.x509_svids[0].x509_svid.cert_chain == first.x509_svids[0].x509_svid.cert_chain
        third_bundle = (await bundles.next()).ca_certificates["spiffe://third.example"]
        assert third_bundle == agent.federated_ca("third.example").bundle_der
        agent.remove_federation("partner.example")
        assert list((await svids.next()).federates_with) == ["spiffe://third.example"]
        assert set((await bundles.next()).ca_certificates) == {
            "spiffe://example.org",
            "spiffe://third.example",
        }


async def test_intermediate_ca_chains_reach_the_client(sock_dir: Path) -> None:
    agent = DevAgent("example.org", intermediate=True, key_type="rsa-2048")
    async with serving(agent, sock_dir) as peer:
        [svid] = (await peer.svids(pod()).next()).x509_svids
        assert len(svid.x509_svid.cert_chain) == 2
        assert split(agent.current_bundle_der) == [agent.ca.root_der]
        parsed = SpiffeX509Svid.parse_raw(b"".join(svid.x509_svid.cert_chain), svid.x509_svid_key)
        assert len(parsed.cert_chain) == 2


# Bundles ------------------------------------------------------------------------


async def test_bundle_stream_keys_are_trust_domain_ids_and_follow_rotate_ca(
    sock_dir: Path,
) -> None:
    agent = DevAgent("example.org", federated_trust_domains=["partner.example"])
    async with serving(agent, sock_dir) as peer:
        bundles = peer.x509_bundles()
        svids = peer.svids(pod())
        first = dict((await bundles.next()).ca_certificates)
        assert first == {
            "spiffe://example.org": agent.current_bundle_der,
            "spiffe://partner.example": agent.federated_ca("partner.example").bundle_der,
        }
        assert agent.open_bundle_subscriptions == 1
        [old_svid] = (await svids.next()).x509_svids

        agent.rotate_ca()
        second = dict((await bundles.next()).ca_certificates)
        assert second["spiffe://example.org"] != first["spiffe://example.org"]
        assert second["spiffe://example.org"] == agent.current_bundle_der
        assert second["spiffe://partner.example"] == first["spiffe://partner.example"]
        [new_svid] = (await svids.next()).x509_svids
        root = x509.load_der_x509_certificate(second["spiffe://example.org"])
        leaf(new_svid).verify_directly_issued_by(root)
        assert leaf(old_svid).issuer != leaf(new_svid).issuer


async def test_extra_bundle_ca_changes_the_bundle_but_not_the_svids(sock_dir: Path) -> None:
    agent = DevAgent("example.org")
    async with serving(agent, sock_dir) as peer:
        bundles = peer.x509_bundles()
        svids = peer.svids(pod())
        await bundles.next()
        [before] = (await svids.next()).x509_svids
        extra = agent.add_bundle_ca()
        local = (await bundles.next()).ca_certificates["spiffe://example.org"]
        assert split(local) == [agent.ca.root_der, extra]
        # Had the bundle change touched the SVID stream, the next message would carry the
        # old SVID; it carries the rotated one.
        agent.rotate()
        [after] = (await svids.next()).x509_svids
        assert leaf(after).serial_number != leaf(before).serial_number
        agent.set_bundle_extra([])
        assert split((await bundles.next()).ca_certificates["spiffe://example.org"]) == [
            agent.ca.root_der
        ]


async def test_rotate_ca_keeping_the_old_root_trusts_both(sock_dir: Path) -> None:
    agent = DevAgent("example.org")
    async with serving(agent, sock_dir) as peer:
        bundles = peer.x509_bundles()
        old_root = agent.ca.root_der
        assert split((await bundles.next()).ca_certificates["spiffe://example.org"]) == [old_root]
        agent.rotate_ca(keep_old=True)
        local = (await bundles.next()).ca_certificates["spiffe://example.org"]
        assert split(local) == [agent.ca.root_der, old_root]


async def test_jwt_bundle_stream_sends_jwks_per_trust_domain(sock_dir: Path) -> None:
    agent = DevAgent("example.org", federated_trust_domains=["partner.example"])
    async with serving(agent, sock_dir) as peer:
        stream = peer.jwt_bundles()
        first = dict((await stream.next()).bundles)
        assert set(first) == {"spiffe://example.org", "spiffe://partner.example"}
        for td, jwks in first.items():
            bundle = JwtBundle.parse(TrustDomain(td.removeprefix("spiffe://")), jwks)
            assert len(bundle.jwt_authorities) == 1
        assert agent.open_jwt_bundle_subscriptions == 1
        agent.rotate_ca()
        second = dict((await stream.next()).bundles)
        assert second["spiffe://example.org"] != first["spiffe://example.org"]
        assert second["spiffe://partner.example"] == first["spiffe://partner.example"]


# FetchJWTSVIDs ----------------------------------------------------------------------


async def test_fetch_jwt_svids_errors_and_success(sock_dir: Path) -> None:
    agent = DevAgent("example.org", jwt_ttl=120)
    async with serving(agent, sock_dir) as peer:
        no_audience = await peer.unary_error(
            methods.FETCH_JWT_SVIDS, di.FetchJWTSVIDsRequest(selectors=pod())
        )
        assert no_audience.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "audience" in no_audience.details()
        nobody = await peer.unary_error(
            methods.FETCH_JWT_SVIDS,
            di.FetchJWTSVIDsRequest(
                audience=["vault"], selectors=[types_pb2.Selector(type="k8s", value="ns:x")]
            ),
        )
        assert nobody.code() == grpc.StatusCode.PERMISSION_DENIED
        assert nobody.details() == "no identity issued"
        by_pid = await peer.unary_error(
            methods.FETCH_JWT_SVIDS, di.FetchJWTSVIDsRequest(audience=["vault"], pid=1)
        )
        assert by_pid.code() == grpc.StatusCode.INVALID_ARGUMENT

        response = await peer.unary(
            methods.FETCH_JWT_SVIDS,
            di.FetchJWTSVIDsRequest(audience=["vault", "db"], selectors=pod()),
        )
        [svid] = response.svids
        assert (svid.id.trust_domain, svid.id.path) == ("example.org", "/ns/shop/sa/web")
        assert svid.expires_at - svid.issued_at == 120
        jwks = dict((await peer.jwt_bundles().next()).bundles)["spiffe://example.org"]
        bundle = JwtBundle.parse(TrustDomain("example.org"), jwks)
        validated = JwtSvid.parse_and_validate(svid.token, bundle, {"vault"})
        assert str(validated.spiffe_id) == SHOP_WEB
        assert validated.expiry == svid.expires_at

        agent.revoke(SHOP_WEB)
        revoked = await peer.unary_error(
            methods.FETCH_JWT_SVIDS, di.FetchJWTSVIDsRequest(audience=["vault"], selectors=pod())
        )
        assert revoked.code() == grpc.StatusCode.PERMISSION_DENIED


# Authorisation ------------------------------------------------------------------------


async def test_callers_outside_authorized_uids_are_refused_on_every_rpc(sock_dir: Path) -> None:
    agent = DevAgent("example.org", authorized_uids={os.getuid() + 4242})
    async with serving(agent, sock_dir) as peer:
        errors = [
            await peer.svids(pod()).error(),
            await peer.x509_bundles().error(),
            await peer.jwt_bundles().error(),
            await peer.unary_error(methods.FETCH_JWT_SVIDS, di.FetchJWTSVIDsRequest()),
        ]
        for error in errors:
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert error.details() == "caller not configured as an authorized delegate"
        assert agent.open_svid_subscriptions == []
        assert agent.subscribe_count == 0


async def test_an_authorized_uid_is_served(sock_dir: Path) -> None:
    agent = DevAgent("example.org", authorized_uids={os.getuid()})
    async with serving(agent, sock_dir) as peer:
        [svid] = (await peer.svids(pod()).next()).x509_svids
        assert svid.x509_svid.id.path == "/ns/shop/sa/web"


# Lifecycle ------------------------------------------------------------------------------


async def test_serving_again_keeps_the_ca_and_cached_svids(sock_dir: Path) -> None:
    agent = DevAgent("example.org")
    async with serving(agent, sock_dir) as peer:
        [first] = (await peer.svids(pod()).next()).x509_svids
    assert not (sock_dir / "admin.sock").exists()
    assert agent.open_svid_subscriptions == []
    async with serving(agent, sock_dir) as peer:
        [again] = (await peer.svids(pod()).next()).x509_svids
        assert again.x509_svid.cert_chain == first.x509_svid.cert_chain
        assert agent.subscribe_count == 2


async def test_data_dir_keeps_the_trust_bundle_across_agents(
    sock_dir: Path, tmp_path: Path
) -> None:
    first = DevAgent("example.org", data_dir=tmp_path, federated_trust_domains=["partner.example"])
    second = DevAgent("example.org", data_dir=tmp_path, federated_trust_domains=["partner.example"])
    assert second.x509_bundles() == first.x509_bundles()
    assert second.jwt_bundles() == first.jwt_bundles()
    first.rotate_ca()
    third = DevAgent("example.org", data_dir=tmp_path)
    assert third.current_bundle_der == first.current_bundle_der != second.current_bundle_der
    async with serving(third, sock_dir) as peer:
        [svid] = (await peer.svids(pod()).next()).x509_svids
        leaf(svid).verify_directly_issued_by(first.ca.root_certificate)


async def test_a_garbled_svid_carries_no_usable_key_until_ungarbled(sock_dir: Path) -> None:
    agent = DevAgent("example.org")
    async with serving(agent, sock_dir) as peer:
        stream = peer.svids(pod())
        [first] = (await stream.next()).x509_svids
        agent.garble(SHOP_WEB)
        [garbled] = (await stream.next()).x509_svids
        assert garbled.x509_svid.cert_chain == first.x509_svid.cert_chain
        with pytest.raises(ValueError):
            serialization.load_der_private_key(garbled.x509_svid_key, None)
        agent.ungarble(SHOP_WEB)
        [back] = (await stream.next()).x509_svids
        assert back.x509_svid_key == first.x509_svid_key
