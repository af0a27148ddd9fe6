"""Every volume attribute end to end: published through the CSI socket of the real daemon, the
SPIFFE identity issued by the dev agent over its admin socket, and read back through the pod's
read-only bind mount, as a pod would read it."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tests.harness import Node, eventually, open_node, read_identity
from trio_spirecsi.csi.client import Pod
from trio_spirecsi.devagent.agent import DevAgent
from trio_spirecsi.devagent.entries import Entry
from trio_spirecsi.grpc import RpcError, StatusCode
from trio_spirecsi.spire.responses import split_der

GROUP = 1234
NOBODY = 65534
SHOP_WEB = frozenset({("k8s", "ns:shop"), ("k8s", "sa:web")})
INTERNAL = "spiffe://example.org/shop/internal"
EXTERNAL = "spiffe://example.org/shop/external"
PARTNER = "partner.example"


@asynccontextmanager
async def running(
    root: Path, agent: DevAgent | None = None, **settings: Any
) -> AsyncIterator[Node]:
    async with open_node(root, agent) as node:
        await node.start_driver(**settings)
        yield node


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with running(tmp_path / "node") as node:
        yield node


def attrs(**values: str) -> dict[str, str]:
    """``svid_file="a"`` -> ``{"csi.spire.io/svid-file": "a"}``."""
    return {"csi.spire.io/" + name.replace("_", "-"): value for name, value in values.items()}


def visible(target: Path) -> list[str]:
    return sorted(p.name for p in target.iterdir() if not p.name.startswith("."))


def shop_pod(node: Node, name: str = "web-0") -> Pod:
    return node.pod(name, "shop", "web")


def certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def uri_of(cert: x509.Certificate) -> str:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    (uri,) = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uri


def pem_labels(data: bytes) -> list[bytes]:
    labels: list[bytes] = re.findall(rb"-----BEGIN ([A-Z ]+)-----", data)
    return labels


def spki(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def root_der(agent: DevAgent, trust_domain: str) -> tuple[bytes, ...]:
    if trust_domain == agent.trust_domain:
        return split_der(agent.current_bundle_der)
    return split_der(agent.federated_ca(trust_domain).bundle_der)


# JWT -------------------------------------------------------------------------------------


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def verify_jwt(token: str, jwks: Mapping[str, Any]) -> dict[str, Any]:
    """The claims of an ES256 compact JWT whose signature verifies with a key of ``jwks``."""
    header_b64, claims_b64, signature_b64 = token.split(".")
    header = json.loads(_b64(header_b64))
    assert header["alg"] == "ES256"
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == header["kid"]]
    assert (jwk["kty"], jwk["crv"]) == ("EC", "P-256")
    public = ec.EllipticCurvePublicNumbers(
        int.from_bytes(_b64(jwk["x"]), "big"), int.from_bytes(_b64(jwk["y"]), "big"), ec.SECP256R1()
    ).public_key()
    signature = _b64(signature_b64)
    assert len(signature) == 64
    public.verify(
        encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        ),
        f"{header_b64}.{claims_b64}".encode("ascii"),
        ec.ECDSA(hashes.SHA256()),
    )
    claims: dict[str, Any] = json.loads(_b64(claims_b64))
    return claims


def agent_jwks(agent: DevAgent) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(agent.ca.jwks())
    return document


# As another user ---------------------------------------------------------------------------


async def read_as(path: Path, uid: int, gid: int, groups: Sequence[int] = ()) -> bool:
    """Whether ``cat path`` succeeds for ``uid``/``gid`` with supplementary ``groups`` only."""
    result = await trio.run_process(
        ["cat", str(path)],
        user=uid,
        group=gid,
        extra_groups=list(groups),
        check=False,
        capture_stdout=True,
        capture_stderr=True,
    )
    if result.returncode == 0:
        assert result.stdout == path.read_bytes()
        return True
    assert b"Permission denied" in result.stderr, result.stderr
    return False


# File names ------------------------------------------------------------------------------


async def test_file_names_come_from_the_attributes(node: Node) -> None:
    pod = node.pod()
    _, target = await node.publish(
        pod, attributes=attrs(svid_file="tls.crt", svid_key_file="tls.key", bundle_file="ca.crt")
    )
    assert visible(target) == ["ca.crt", "tls.crt", "tls.key"]
    ident = read_identity(target, "tls.crt", "tls.key", "ca.crt")
    assert ident.spiffe_id == node.expected_id(pod)
    assert ident.key_matches
    assert ident.bundle == split_der(node.agent.current_bundle_der)


# Several SVIDs ------------------------------------------------------------------------------


def two_entries(*, hints: tuple[str, str] = ("internal", "external")) -> DevAgent:
    return DevAgent(
        entries=[
            Entry(INTERNAL, SHOP_WEB, hint=hints[0]),
            Entry(EXTERNAL, SHOP_WEB, hint=hints[1]),
        ]
    )


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        ({}, INTERNAL),
        (attrs(svid_hint="external"), EXTERNAL),
        (attrs(svid_hint="internal"), INTERNAL),
        (attrs(spiffe_id=EXTERNAL), EXTERNAL),
        (attrs(svid_hint="external", spiffe_id=EXTERNAL), EXTERNAL),
    ],
)
async def test_svid_hint_and_spiffe_id_choose_among_several_svids(
    tmp_path: Path, selection: dict[str, str], expected: str
) -> None:
    async with running(tmp_path / "n", two_entries()) as node:
        _, target = await node.publish(shop_pod(node), attributes=selection)
        ident = read_identity(target)
        assert ident.spiffe_id == expected
        assert ident.key_matches
        assert visible(target) == ["svid.pem", "svid_bundle.pem", "svid_key.pem"]


async def test_a_selection_the_agent_cannot_satisfy_fails_listing_what_it_sent(
    tmp_path: Path,
) -> None:
    async with running(tmp_path / "n", two_entries(), publish_timeout=1.0) as node:
        pod = shop_pod(node)
        with pytest.raises(RpcError) as info:
            await node.publish(pod, attributes=attrs(svid_hint="internal", spiffe_id=EXTERNAL))
        assert info.value.code == StatusCode.FAILED_PRECONDITION
        for sent in (f"{INTERNAL} (hint 'internal')", f"{EXTERNAL} (hint 'external')"):
            assert sent in info.value.message
        assert node.volume_folders() == []
        assert node.agent.open_svid_subscriptions == []


@pytest.mark.parametrize(
    ("hints", "selection", "primary", "labels"),
    [
        (("internal", "external"), {}, INTERNAL, {"internal": INTERNAL, "external": EXTERNAL}),
        (
            ("internal", "external"),
            attrs(svid_hint="external"),
            EXTERNAL,
            {"internal": INTERNAL, "external": EXTERNAL},
        ),
        (("", ""), {}, INTERNAL, {"0": INTERNAL, "1": EXTERNAL}),
    ],
)
async def test_all_svids_writes_one_labelled_set_per_svid(
    tmp_path: Path,
    hints: tuple[str, str],
    selection: dict[str, str],
    primary: str,
    labels: dict[str, str],
) -> None:
    async with running(tmp_path / "n", two_entries(hints=hints)) as node:
        _, target = await node.publish(
            shop_pod(node), attributes={**selection, **attrs(all_svids="true")}
        )
        expected = ["svid.pem", "svid_bundle.pem", "svid_key.pem"]
        for label in labels:
            expected += [f"svid-{label}.pem", f"svid_bundle-{label}.pem", f"svid_key-{label}.pem"]
        assert visible(target) == sorted(expected)
        assert read_identity(target).spiffe_id == primary
        bundle = split_der(node.agent.current_bundle_der)
        for label, spiffe_id in labels.items():
            ident = read_identity(
                target, f"svid-{label}.pem", f"svid_key-{label}.pem", f"svid_bundle-{label}.pem"
            )
            assert (ident.spiffe_id, ident.key_matches, ident.bundle) == (spiffe_id, True, bundle)
            assert mode(target / f"svid_key-{label}.pem") == 0o600


@pytest.mark.parametrize("selection", [attrs(svid_hint="external"), attrs(spiffe_id=EXTERNAL)])
async def test_the_jwt_svid_follows_the_svid_selection(
    tmp_path: Path, selection: dict[str, str]
) -> None:
    async with running(tmp_path / "n", two_entries()) as node:
        _, target = await node.publish(
            shop_pod(node), attributes={**selection, **attrs(jwt_audiences="api")}
        )
        assert read_identity(target).spiffe_id == EXTERNAL
        token = (target / "jwt_svid.token").read_text()
        assert verify_jwt(token, agent_jwks(node.agent))["sub"] == EXTERNAL


# Federation ---------------------------------------------------------------------------------


def federating_agent(**options: Any) -> DevAgent:
    """The shop/web workload's entry federates with partner.example only; the agent also
    federates with other.example from the start, which no entry of the workload names."""
    return DevAgent(
        entries=[Entry(INTERNAL, SHOP_WEB, federates_with=(PARTNER,))],
        federated_trust_domains=["other.example"],
        **options,
    )


async def test_federated_bundles_files_follow_the_agents_federation(tmp_path: Path) -> None:
    async with running(tmp_path / "n", federating_agent()) as node:
        agent = node.agent
        _, target = await node.publish(shop_pod(node), attributes=attrs(federated_bundles="files"))
        own = ["svid.pem", "svid_bundle.pem", "svid_key.pem"]
        assert visible(target) == own  # other.example: the agent has it, the entry does not

        agent.add_federation(PARTNER)
        partner_file = target / f"{PARTNER}.pem"
        await eventually(partner_file.exists, "the partner trust domain's bundle file")
        assert visible(target) == sorted([*own, f"{PARTNER}.pem"])
        assert tuple(der(c) for c in certs(partner_file)) == root_der(agent, PARTNER)
        assert read_identity(target).bundle == root_der(agent, "example.org")
        assert mode(partner_file) == 0o644

        agent.remove_federation(PARTNER)
        await eventually(lambda: not partner_file.exists(), "the partner file to disappear")
        assert visible(target) == own

        # Federating again gives partner.example a new CA: the file shows the new root.
        agent.add_federation(PARTNER)
        await eventually(
            lambda: (
                partner_file.exists()
                and tuple(der(c) for c in certs(partner_file)) == root_der(agent, PARTNER)
            ),
            "the new partner root",
        )
        assert read_identity(target).key_matches


async def test_federated_bundles_merged_grows_and_shrinks_the_bundle_file(tmp_path: Path) -> None:
    async with running(tmp_path / "n", federating_agent()) as node:
        agent = node.agent
        _, target = await node.publish(shop_pod(node), attributes=attrs(federated_bundles="merged"))
        own = root_der(agent, "example.org")
        assert read_identity(target).bundle == own

        agent.add_federation(PARTNER)
        merged = own + root_der(agent, PARTNER)
        await eventually(lambda: read_identity(target).bundle == merged, "the merged bundle")
        assert visible(target) == ["svid.pem", "svid_bundle.pem", "svid_key.pem"]

        agent.remove_federation(PARTNER)
        await eventually(lambda: read_identity(target).bundle == own, "the bundle to shrink")


async def test_federated_bundles_none_ignores_federation(tmp_path: Path) -> None:
    async with running(tmp_path / "n", federating_agent()) as node:
        agent = node.agent
        _, plain = await node.publish(shop_pod(node, "plain"))
        _, witness = await node.publish(
            shop_pod(node, "witness"), attributes=attrs(federated_bundles="files")
        )
        agent.add_federation(PARTNER)
        await eventually((witness / f"{PARTNER}.pem").exists, "the driver to have the bundle")
        before = read_identity(plain).serial
        agent.rotate()  # a fresh SVID response, which names partner.example in federates_with
        await eventually(lambda: read_identity(plain).serial != before, "a rotated SVID")
        assert visible(plain) == ["svid.pem", "svid_bundle.pem", "svid_key.pem"]
        assert read_identity(plain).bundle == root_der(agent, "example.org")
        assert agent.open_bundle_subscriptions == 1  # one shared stream for both volumes


async def test_a_bundle_file_name_colliding_with_a_federated_file_is_reported(
    tmp_path: Path,
) -> None:
    agent = federating_agent()
    agent.add_federation(PARTNER)
    async with running(tmp_path / "n", agent, publish_timeout=1.0) as node:
        with pytest.raises(RpcError) as info:
            await node.publish(
                shop_pod(node),
                attributes=attrs(federated_bundles="files", bundle_file=f"{PARTNER}.pem"),
            )
        assert info.value.code == StatusCode.FAILED_PRECONDITION
        assert f"two files of this volume would be named '{PARTNER}.pem'" in info.value.message
        assert node.volume_folders() == []


# Chains, layout and key formats ------------------------------------------------------------


async def test_intermediates_in_bundle(tmp_path: Path) -> None:
    async with running(tmp_path / "n", DevAgent(intermediate=True)) as node:
        agent = node.agent
        intermediate = agent.ca.intermediate_der
        assert intermediate is not None
        _, plain = await node.publish(node.pod("plain"))
        _, extended = await node.publish(
            node.pod("extended"), attributes=attrs(intermediates_in_bundle="true")
        )
        for target, bundle in (
            (plain, (agent.ca.root_der,)),
            (extended, (agent.ca.root_der, intermediate)),
        ):
            chain = certs(target / "svid.pem")
            assert [der(c) for c in chain[1:]] == [intermediate]
            chain[0].verify_directly_issued_by(chain[1])
            assert tuple(der(c) for c in certs(target / "svid_bundle.pem")) == bundle
            root = certs(target / "svid_bundle.pem")[0]
            chain[1].verify_directly_issued_by(root)


async def test_layout_spiffe_fs(tmp_path: Path) -> None:
    agent = federating_agent(intermediate=True)
    async with running(tmp_path / "n", agent) as node:
        pod = shop_pod(node)
        _, target = await node.publish(
            pod,
            attributes=attrs(
                layout="spiffe-fs", federated_bundles="files", intermediates_in_bundle="true"
            ),
        )
        own_file = "example.org.spiffe-trust-bundle.pem"
        assert visible(target) == ["credential-bundle.pem", own_file]

        data = (target / "credential-bundle.pem").read_bytes()
        assert pem_labels(data) == [b"PRIVATE KEY", b"CERTIFICATE", b"CERTIFICATE"]
        key = serialization.load_pem_private_key(data, None)
        leaf, inter = x509.load_pem_x509_certificates(data)
        assert uri_of(leaf) == INTERNAL
        assert spki(key.public_key()) == spki(leaf.public_key())
        leaf.verify_directly_issued_by(inter)
        assert der(inter) == agent.ca.intermediate_der
        assert mode(target / "credential-bundle.pem") == 0o600
        assert [der(c) for c in certs(target / own_file)] == [agent.ca.root_der, der(inter)]
        assert mode(target / own_file) == 0o644

        agent.add_federation(PARTNER)
        partner_file = target / f"{PARTNER}.spiffe-trust-bundle.pem"
        await eventually(partner_file.exists, "the partner trust bundle file")
        assert tuple(der(c) for c in certs(partner_file)) == root_der(agent, PARTNER)
        agent.remove_federation(PARTNER)
        await eventually(lambda: not partner_file.exists(), "the partner file to disappear")
        assert visible(target) == ["credential-bundle.pem", own_file]


@pytest.mark.parametrize(
    ("key_type", "key_format", "label", "key_class"),
    [
        ("ec-p256", None, b"PRIVATE KEY", ec.EllipticCurvePrivateKey),
        ("ec-p256", "traditional", b"EC PRIVATE KEY", ec.EllipticCurvePrivateKey),
        ("rsa-2048", None, b"PRIVATE KEY", rsa.RSAPrivateKey),
        ("rsa-2048", "pkcs8", b"PRIVATE KEY", rsa.RSAPrivateKey),
        ("rsa-2048", "traditional", b"RSA PRIVATE KEY", rsa.RSAPrivateKey),
    ],
)
async def test_key_format(
    tmp_path: Path, key_type: str, key_format: str | None, label: bytes, key_class: type
) -> None:
    async with running(tmp_path / "n", DevAgent(key_type=key_type)) as node:
        selection = attrs(key_format=key_format) if key_format else {}
        _, target = await node.publish(node.pod(), attributes=selection)
        data = (target / "svid_key.pem").read_bytes()
        assert pem_labels(data) == [label]
        key = serialization.load_pem_private_key(data, None)
        assert isinstance(key, key_class)
        assert read_identity(target).key_matches

        before = read_identity(target).serial
        node.agent.rotate()
        await eventually(lambda: read_identity(target).serial != before, "a rotated SVID")
        assert pem_labels((target / "svid_key.pem").read_bytes()) == [label]
        assert read_identity(target).key_matches


# JWT ----------------------------------------------------------------------------------------


async def test_jwt_audiences_writes_a_token_for_the_pod(node: Node) -> None:
    pod = node.pod("api-client", "default", "api-client")
    _, target = await node.publish(pod, attributes=attrs(jwt_audiences="api"))
    assert visible(target) == ["jwt_svid.token", "svid.pem", "svid_bundle.pem", "svid_key.pem"]
    token = (target / "jwt_svid.token").read_text()
    assert "\n" not in token
    claims = verify_jwt(token, agent_jwks(node.agent))
    assert claims["sub"] == node.expected_id(pod) == read_identity(target).spiffe_id
    assert claims["aud"] == ["api"]
    assert claims["exp"] - claims["iat"] == node.agent.jwt_ttl
    assert mode(target / "jwt_svid.token") == 0o600
    assert os.readlink(target / "jwt_svid.token") == "..data/jwt_svid.token"


async def test_the_jwt_svid_is_fetched_with_the_pods_selectors(node: Node) -> None:
    pod = node.pod("batch-7", "jobs", "runner")
    only_this_pod = "spiffe://example.org/jobs/batch-7"
    node.agent.set_entries(
        [
            Entry(
                only_this_pod,
                frozenset(
                    {
                        ("k8s", "ns:jobs"),
                        ("k8s", "sa:runner"),
                        ("k8s", f"pod-uid:{pod.uid}"),
                        ("k8s", "pod-name:batch-7"),
                        ("k8s", "node-name:node-a"),
                    }
                ),
            )
        ]
    )
    _, target = await node.publish(pod, attributes=attrs(jwt_audiences="api"))
    claims = verify_jwt((target / "jwt_svid.token").read_text(), agent_jwks(node.agent))
    assert claims["sub"] == only_this_pod == read_identity(target).spiffe_id


async def test_several_audience_sets_and_a_custom_token_name(node: Node) -> None:
    pod = node.pod()
    _, target = await node.publish(
        pod, attributes=attrs(jwt_audiences="api, db;billing", jwt_svid_file="id.jwt")
    )
    assert visible(target) == [
        "id-0.jwt",
        "id-1.jwt",
        "svid.pem",
        "svid_bundle.pem",
        "svid_key.pem",
    ]
    for name, audiences in (("id-0.jwt", ["api", "db"]), ("id-1.jwt", ["billing"])):
        claims = verify_jwt((target / name).read_text(), agent_jwks(node.agent))
        assert (claims["sub"], claims["aud"]) == (node.expected_id(pod), audiences)


async def test_jwt_svid_is_refreshed_before_it_expires(tmp_path: Path) -> None:
    async with running(tmp_path / "n", DevAgent(jwt_ttl=8)) as node:
        pod = node.pod()
        _, target = await node.publish(pod, attributes=attrs(jwt_audiences="api"))
        token_file = target / "jwt_svid.token"
        first = token_file.read_text()
        old = verify_jwt(first, agent_jwks(node.agent))
        x509_before = read_identity(target).serial

        await eventually(lambda: token_file.read_text() != first, "a refreshed JWT-SVID")
        new = verify_jwt(token_file.read_text(), agent_jwks(node.agent))
        assert (new["sub"], new["aud"]) == (node.expected_id(pod), ["api"])
        assert old["iat"] < new["iat"] < old["exp"]
        assert read_identity(target).serial == x509_before  # the X.509-SVID is untouched


async def test_jwt_bundle_file_holds_the_jwks_per_trust_domain(tmp_path: Path) -> None:
    agent = DevAgent(federate_template=True)
    async with running(tmp_path / "n", agent) as node:
        pod = node.pod()
        _, target = await node.publish(
            pod,
            attributes=attrs(
                jwt_audiences="api", jwt_bundle_file="jwt_bundle.json", federated_bundles="files"
            ),
        )
        bundle_file = target / "jwt_bundle.json"

        def document() -> dict[str, Any]:
            loaded: dict[str, Any] = json.loads(bundle_file.read_bytes())
            return loaded

        assert document() == {"example.org": agent_jwks(agent)}
        assert mode(bundle_file) == 0o644
        claims = verify_jwt((target / "jwt_svid.token").read_text(), document()["example.org"])
        assert claims["sub"] == node.expected_id(pod)

        agent.add_federation(PARTNER)
        partner = json.loads(agent.federated_ca(PARTNER).jwks())
        await eventually(lambda: document().get(PARTNER) == partner, "the partner JWKS")
        assert document()["example.org"] == agent_jwks(agent)
        agent.remove_federation(PARTNER)
        await eventually(lambda: PARTNER not in document(), "the partner JWKS to go")

        _, without = await node.publish(node.pod("other"), attributes=attrs(jwt_audiences="api"))
        assert "jwt_bundle.json" not in visible(without)


# Ownership and modes -------------------------------------------------------------------------


async def assert_group_access(target: Path, gid: int, key_mode: int, cert_mode: int) -> None:
    """Group ``gid`` owns everything; members read the key, other users reach nothing."""
    generation = (target / "..data").resolve()
    for folder in (target, generation):
        st = folder.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o750, gid), folder
    for name, want in (
        ("svid_key.pem", key_mode),
        ("svid.pem", cert_mode),
        ("svid_bundle.pem", cert_mode),
    ):
        st = (target / name).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid, st.st_uid) == (want, gid, os.geteuid())
    key = target / "svid_key.pem"
    assert await read_as(key, NOBODY, gid)
    assert await read_as(key, NOBODY, NOBODY, [gid])
    assert await read_as(target / "svid.pem", NOBODY, gid)
    for name in ("svid_key.pem", "svid.pem", "svid_bundle.pem"):
        assert not await read_as(target / name, NOBODY, NOBODY)


@pytest.mark.parametrize(
    ("attributes", "kubelet_group"),
    [
        (attrs(fs_group=str(GROUP)), ""),
        ({}, str(GROUP)),
        (attrs(fs_group="999"), str(GROUP)),  # the kubelet's fsGroup wins
    ],
    ids=["attribute", "kubelet", "both"],
)
async def test_fs_group_shares_the_key_with_the_group_only(
    root: None, public_tmp: Path, attributes: dict[str, str], kubelet_group: str
) -> None:
    async with running(public_tmp / "n") as node:
        _, target = await node.publish(node.pod(), attributes=attributes, fs_group=kubelet_group)
        await assert_group_access(target, GROUP, 0o640, 0o644)

        before = read_identity(target).serial
        node.agent.rotate()
        await eventually(lambda: read_identity(target).serial != before, "a rotated SVID")
        await assert_group_access(target, GROUP, 0o640, 0o644)


async def test_cert_and_key_file_modes(root: None, public_tmp: Path) -> None:
    async with running(public_tmp / "n") as node:
        _, target = await node.publish(
            node.pod(),
            attributes=attrs(
                cert_file_mode="0640",
                key_file_mode="440",
                jwt_audiences="api",
                jwt_bundle_file="jwt_bundle.json",
            ),
            fs_group=str(GROUP),
        )
        await assert_group_access(target, GROUP, 0o440, 0o640)
        assert mode(target / "jwt_svid.token") == 0o440
        assert mode(target / "jwt_bundle.json") == 0o640
        assert await read_as(target / "jwt_svid.token", NOBODY, GROUP)


async def test_without_a_group_other_users_read_certificates_but_not_the_key(
    root: None, public_tmp: Path
) -> None:
    async with running(public_tmp / "n") as node:
        _, target = await node.publish(node.pod())
        assert mode(target) == 0o755
        assert mode(target / "svid_key.pem") == 0o600
        assert await read_as(target / "svid.pem", NOBODY, NOBODY)
        assert not await read_as(target / "svid_key.pem", NOBODY, NOBODY)


# Refused ----------------------------------------------------------------------------------------

REFUSED: list[tuple[dict[str, str], str, str]] = [
    (attrs(layout="spiffe-fs", svid_file="a.pem"), "svid-file", "spiffe-fs"),
    (attrs(layout="spiffe-fs", bundle_file="ca.pem"), "bundle-file", "spiffe-fs"),
    (attrs(layout="spiffe-fs", key_format="traditional"), "key-format", "PKCS#8"),
    (attrs(layout="spiffe-fs", federated_bundles="merged"), "federated-bundles", "use files"),
    (attrs(layout="flat"), "layout", "default, spiffe-fs"),
    (attrs(federated_bundles="all"), "federated-bundles", "none, files, merged"),
    (attrs(key_format="der"), "key-format", "pkcs8, traditional"),
    (attrs(all_svids="yes"), "all-svids", "true, false"),
    (attrs(intermediates_in_bundle="1"), "intermediates-in-bundle", "true, false"),
    (attrs(key_file_mode="0644"), "key-file-mode", "0600"),
    (attrs(cert_file_mode="0755"), "cert-file-mode", "executable"),
    (attrs(cert_file_mode="rw-r--r--"), "cert-file-mode", "octal"),
    (attrs(fs_group="www-data"), "fs-group", "numeric group ID"),
    (attrs(jwt_audiences="api,,db"), "jwt-audiences", "empty audience"),
    (attrs(jwt_audiences="api;api"), "jwt-audiences", "listed twice"),
    (attrs(svid_file="same.pem", bundle_file="same.pem"), "bundle-file", "svid-file"),
    (attrs(jwt_audiences="api", jwt_svid_file="svid.pem"), "jwt-svid-file", "svid-file"),
    (attrs(jwt_bundle_file="../keys.json"), "jwt-bundle-file", "'/'"),
    (attrs(spiffe_id="example.org/web"), "spiffe-id", "spiffe://"),
    (attrs(svid_hint="a\nb"), "svid-hint", "control character"),
    ({"csi.spire.io/federated-bundle": "files"}, "federated-bundle", "csi.spire.io/layout"),
]


@pytest.mark.parametrize(
    ("attributes", "attribute", "explanation"),
    REFUSED,
    ids=[f"{a}:{e}" for _, a, e in REFUSED],
)
async def test_refused_attributes_name_the_attribute(
    node: Node, attributes: dict[str, str], attribute: str, explanation: str
) -> None:
    with pytest.raises(RpcError) as info:
        await node.publish(node.pod(), attributes=attributes)
    assert info.value.code == StatusCode.INVALID_ARGUMENT
    assert f"volume_context[csi.spire.io/{attribute}]" in info.value.message
    assert explanation in info.value.message
    assert node.volume_folders() == []
    assert node.agent.open_svid_subscriptions == []


async def test_a_bad_kubelet_fs_group_is_refused(node: Node) -> None:
    with pytest.raises(RpcError) as info:
        await node.publish(node.pod(), fs_group="staff")
    assert info.value.code == StatusCode.INVALID_ARGUMENT
    assert "volume_capability.mount.volume_mount_group" in info.value.message
    assert node.volume_folders() == []
