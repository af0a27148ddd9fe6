"""Rendering what the agent sends into a volume's files.

Certificates come from a small CA built here with ``cryptography`` (ECDSA P-256, RSA and
Ed25519 keys), shaped like SPIRE's: CA certificates with their trust domain's SPIFFE ID,
leaves with exactly one URI SAN. Files are checked the way their consumers read them:
PEM parsing, and Python's ``ssl`` module loading the certificate with its key.
"""

from __future__ import annotations

import base64
import datetime
import json
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_spirecsi._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as di
from trio_spirecsi._proto.spire.api.types import types_pb2
from trio_spirecsi.attributes import (
    VolumeSpec,
    file_name_problem,
    parse_volume_context,
)
from trio_spirecsi.errors import InvalidArgument, RenderError
from trio_spirecsi.render import render_files, select_svids, svid_labels
from trio_spirecsi.spiffe import SpiffeIdError, normalise_trust_domain
from trio_spirecsi.spire.responses import (
    X509SVID,
    X509Update,
    bundles_from_response,
    jwt_bundles_from_response,
    split_der,
    x509_from_response,
)
from trio_spirecsi.storage.writer import FileContent

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
DER = serialization.Encoding.DER
PEM = serialization.Encoding.PEM
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
POD = {
    "csi.storage.k8s.io/pod.name": "web-0",
    "csi.storage.k8s.io/pod.namespace": "default",
    "csi.storage.k8s.io/pod.uid": "0b5e7a8c-5f3c-4a55-9d1e-3c1f0a4e2b11",
    "csi.storage.k8s.io/serviceAccount.name": "web",
    "csi.storage.k8s.io/ephemeral": "true",
}
TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzcGlmZmU6Ly9leGFtcGxlLm9yZy93ZWIifQ.c2lnbmF0dXJl"
JWKS = b'{"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "x": "AA", "y": "AA"}]}'


# A small CA -----------------------------------------------------------------------


@cache
def pooled_key(kind: str, n: int) -> PrivateKey:
    """Keys are slow to make (RSA): a few per kind, shared by every test."""
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ed25519.Ed25519PrivateKey.generate()


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(DER)


def spki(key: object) -> bytes:
    assert isinstance(
        key, PrivateKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
    )
    public = key.public_key() if isinstance(key, PrivateKey) else key
    return public.public_bytes(DER, SPKI)


@dataclass(frozen=True)
class Issuer:
    key: PrivateKey
    cert: x509.Certificate


def _sign(builder: x509.CertificateBuilder, issuer_key: PrivateKey) -> x509.Certificate:
    algorithm = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(issuer_key, algorithm)


def _builder(
    subject: str, issuer: x509.Name | None, key: PrivateKey, uri: str
) -> x509.CertificateBuilder:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(minutes=5))
        .not_valid_after(NOW + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), False)
    )


def _ca_extensions(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    return builder.add_extension(
        x509.BasicConstraints(ca=True, path_length=None), True
    ).add_extension(
        x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
    )


@cache
def root(trust_domain: str, generation: int = 0) -> Issuer:
    key = pooled_key("ec", 100 + generation)
    builder = _builder(f"{trust_domain} root {generation}", None, key, f"spiffe://{trust_domain}")
    return Issuer(key, _sign(_ca_extensions(builder), key))


@cache
def intermediate(trust_domain: str, depth: int) -> Issuer:
    """An intermediate ``depth`` levels below the root (1 = signed by the root)."""
    parent = root(trust_domain) if depth == 1 else intermediate(trust_domain, depth - 1)
    key = pooled_key("ec", 200 + depth)
    builder = _builder(
        f"{trust_domain} intermediate {depth}", parent.cert.subject, key, f"spiffe://{trust_domain}"
    )
    return Issuer(key, _sign(_ca_extensions(builder), parent.key))


@cache
def leaf(
    spiffe_id: str, key: PrivateKey, *, depth: int = 0, uris: tuple[str, ...] | None = None
) -> tuple[bytes, ...]:
    """A chain for ``spiffe_id``, leaf first, with ``depth`` intermediates (the same
    chain for the same arguments, so that generated examples replay exactly)."""
    trust_domain = spiffe_id.removeprefix("spiffe://").partition("/")[0]
    issuer = intermediate(trust_domain, depth) if depth else root(trust_domain)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "workload")]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(minutes=5))
        .not_valid_after(NOW + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.KeyUsage(True, False, True, False, True, False, False, False, False), True
        )
    )
    names = [x509.UniformResourceIdentifier(u) for u in (uris if uris is not None else [spiffe_id])]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
    cert = _sign(builder, issuer.key)
    chain = [der(cert)]
    for level in range(depth, 0, -1):
        chain.append(der(intermediate(trust_domain, level).cert))
    return tuple(chain)


def pkcs8(key: PrivateKey) -> bytes:
    return key.private_bytes(DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def svid_message(
    spiffe_id: str,
    chain: Sequence[bytes],
    key_der: bytes,
    *,
    hint: str = "",
) -> di.X509SVIDWithKey:
    trust_domain, _, path = spiffe_id.removeprefix("spiffe://").partition("/")
    return di.X509SVIDWithKey(
        x509_svid=types_pb2.X509SVID(
            cert_chain=list(chain),
            id=types_pb2.SPIFFEID(trust_domain=trust_domain, path="/" + path if path else ""),
            expires_at=int((NOW + datetime.timedelta(hours=1)).timestamp()),
            hint=hint,
        ),
        x509_svid_key=key_der,
    )


def make_svid(
    spiffe_id: str = "spiffe://example.org/ns/default/sa/web",
    *,
    kind: str = "ec",
    n: int = 0,
    depth: int = 0,
    hint: str = "",
) -> X509SVID:
    key = pooled_key(kind, n)
    update = x509_from_response(
        di.SubscribeToX509SVIDsResponse(
            x509_svids=[
                svid_message(spiffe_id, leaf(spiffe_id, key, depth=depth), pkcs8(key), hint=hint)
            ]
        )
    )
    return update.svids[0]


def bundles(*trust_domains: str) -> dict[str, tuple[bytes, ...]]:
    return {td: (der(root(td).cert),) for td in trust_domains}


def spec_of(**attributes: str) -> VolumeSpec:
    group = attributes.pop("volume_mount_group", "")
    return parse_volume_context(
        {**POD, **{f"csi.spire.io/{k.replace('_', '-')}": v for k, v in attributes.items()}},
        volume_mount_group=group,
    )


def certs_in(data: bytes) -> tuple[bytes, ...]:
    return tuple(der(c) for c in x509.load_pem_x509_certificates(data))


def key_in(data: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    assert isinstance(key, PrivateKey)
    return key


# Trust domains and DER ------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_name", "expected"),
    [
        ("example.org", "example.org"),
        ("spiffe://example.org", "example.org"),
        ("spiffe://partner-1.example_2.org", "partner-1.example_2.org"),
    ],
)
def test_trust_domain_names_are_normalised(given_name: str, expected: str) -> None:
    assert normalise_trust_domain(given_name) == expected


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "spiffe://",
        "Example.org",
        "spiffe://example.org/",
        "example.org/path",
        "a b",
        "https://example.org",
        ".hidden",
        "x" * 256,
        "spiffe://spiffe://example.org",
    ],
)
def test_garbage_trust_domains_are_refused(garbage: str) -> None:
    with pytest.raises(SpiffeIdError):
        normalise_trust_domain(garbage)


def test_split_der_returns_each_certificate_of_a_concatenation() -> None:
    certs = (der(root("example.org").cert), der(intermediate("example.org", 1).cert))
    assert split_der(b"".join(certs)) == certs
    assert split_der(b"") == ()
    with pytest.raises(RenderError):
        split_der(b"".join(certs)[:-1])
    with pytest.raises(RenderError):
        split_der(b"\x04\x01x")


@given(st.binary(max_size=300))
def test_split_der_either_partitions_the_input_or_refuses_it(data: bytes) -> None:
    try:
        parts = split_der(data)
    except RenderError:
        return
    assert b"".join(parts) == data
    assert all(p[0] == 0x30 for p in parts)


# SVID responses -------------------------------------------------------------------


def test_a_valid_response_becomes_an_update() -> None:
    key = pooled_key("ec", 0)
    sid = "spiffe://example.org/ns/default/sa/web"
    chain = leaf(sid, key, depth=1)
    update = x509_from_response(
        di.SubscribeToX509SVIDsResponse(
            x509_svids=[svid_message(sid, chain, pkcs8(key), hint="internal")],
            federates_with=["spiffe://partner.example", "other.example", "partner.example"],
        )
    )
    (svid,) = update.svids
    assert svid.spiffe_id == sid
    assert svid.cert_chain == chain
    assert svid.hint == "internal"
    assert svid.trust_domain == "example.org"
    leaf_cert = x509.load_der_x509_certificate(chain[0])
    assert svid.expires_at == int(leaf_cert.not_valid_after_utc.timestamp())
    assert svid.not_before == int(leaf_cert.not_valid_before_utc.timestamp())
    assert spki(serialization.load_der_private_key(svid.key_pkcs8_der, None)) == spki(key)
    assert update.federates_with == ("other.example", "partner.example")


def test_zero_svids_is_an_empty_update_not_an_error() -> None:
    assert x509_from_response(di.SubscribeToX509SVIDsResponse()).svids == ()


def test_the_svid_repr_never_shows_the_key() -> None:
    svid = make_svid()
    assert svid.key_pkcs8_der.hex() not in repr(svid)
    assert "key_pkcs8_der" not in repr(svid)


def _one(message: di.X509SVIDWithKey) -> di.SubscribeToX509SVIDsResponse:
    return di.SubscribeToX509SVIDsResponse(x509_svids=[message])


SID = "spiffe://example.org/ns/default/sa/web"


def _bad_responses() -> dict[str, tuple[di.SubscribeToX509SVIDsResponse, str]]:
    key = pooled_key("ec", 0)
    other = pooled_key("ec", 1)
    chain = leaf(SID, key)
    return {
        "key of another certificate": (
            _one(svid_message(SID, chain, pkcs8(other))),
            "does not belong to the leaf",
        ),
        "key of another algorithm": (
            _one(svid_message(SID, chain, pkcs8(pooled_key("ed25519", 0)))),
            "does not belong to the leaf",
        ),
        "SAN differs from the id": (
            _one(svid_message("spiffe://example.org/ns/default/sa/db", chain, pkcs8(key))),
            "not for the SPIFFE ID",
        ),
        "two URI SANs": (
            _one(svid_message(SID, leaf(SID, key, uris=(SID, SID + "/b")), pkcs8(key))),
            "2 URI SANs",
        ),
        "no SAN": (_one(svid_message(SID, leaf(SID, key, uris=()), pkcs8(key))), "0 URI SANs"),
        "garbage certificate": (
            _one(svid_message(SID, [b"\x30\x03\x02\x01\x01"], pkcs8(key))),
            "not a DER X.509 certificate",
        ),
        "garbage intermediate": (
            _one(svid_message(SID, [chain[0], b"nonsense"], pkcs8(key))),
            "certificate 2",
        ),
        "no certificates": (_one(svid_message(SID, [], pkcs8(key))), "no certificates"),
        "garbage key": (_one(svid_message(SID, chain, b"\x30\x00")), "not a PKCS#8"),
        "empty key": (_one(svid_message(SID, chain, b"")), "not a PKCS#8"),
        "no id": (
            _one(
                di.X509SVIDWithKey(
                    x509_svid=types_pb2.X509SVID(cert_chain=list(chain)), x509_svid_key=pkcs8(key)
                )
            ),
            "no valid SPIFFE ID",
        ),
        "path without slash": (
            _one(
                di.X509SVIDWithKey(
                    x509_svid=types_pb2.X509SVID(
                        cert_chain=list(chain),
                        id=types_pb2.SPIFFEID(trust_domain="example.org", path="ns"),
                    ),
                    x509_svid_key=pkcs8(key),
                )
            ),
            "does not start with '/'",
        ),
        "bad federated trust domain": (
            di.SubscribeToX509SVIDsResponse(
                x509_svids=[svid_message(SID, chain, pkcs8(key))], federates_with=["Bad Domain"]
            ),
            "not a trust domain name",
        ),
    }


@pytest.mark.parametrize("case", sorted(_bad_responses()))
def test_unusable_svids_are_refused_with_a_message_without_key_material(case: str) -> None:
    response, expected = _bad_responses()[case]
    with pytest.raises(RenderError) as info:
        x509_from_response(response)
    assert expected in info.value.message
    for item in response.x509_svids:
        key = bytes(item.x509_svid_key)
        if len(key) > 8:
            assert key.hex() not in info.value.message
            assert base64.b64encode(key).decode()[:40] not in info.value.message


def test_one_bad_svid_refuses_the_whole_response() -> None:
    key = pooled_key("ec", 0)
    good = svid_message(SID, leaf(SID, key), pkcs8(key))
    bad = svid_message(SID, leaf(SID, key), pkcs8(pooled_key("ec", 1)))
    with pytest.raises(RenderError, match="SVID 2"):
        x509_from_response(di.SubscribeToX509SVIDsResponse(x509_svids=[good, bad]))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_as_a_response_give_an_update_or_a_render_error(data: bytes) -> None:
    try:
        response = di.SubscribeToX509SVIDsResponse.FromString(data)
    except DecodeError:
        return
    try:
        update = x509_from_response(response)
    except RenderError as exc:
        assert exc.message
    else:
        assert len(update.svids) == len(response.x509_svids)


@st.composite
def random_responses(draw: st.DrawFn) -> di.SubscribeToX509SVIDsResponse:
    """Well-formed messages whose contents mix real pieces with arbitrary ones."""
    key = pooled_key(draw(st.sampled_from(["ec", "rsa", "ed25519"])), draw(st.integers(0, 1)))
    real_chain = list(leaf(SID, pooled_key("ec", 0), depth=draw(st.integers(0, 2))))
    items = []
    for _ in range(draw(st.integers(0, 3))):
        chain = draw(
            st.one_of(
                st.just(real_chain),
                st.lists(st.binary(max_size=64), max_size=3),
                st.lists(st.sampled_from(real_chain) | st.binary(max_size=8), max_size=3),
            )
        )
        key_der = draw(st.sampled_from([pkcs8(key), pkcs8(pooled_key("ec", 0)), b""]) | st.binary())
        trust_domain = draw(
            st.sampled_from(["example.org", "spiffe://example.org", ""]) | st.text()
        )
        path = draw(st.sampled_from(["/ns/default/sa/web", "", "/"]) | st.text())
        items.append(
            di.X509SVIDWithKey(
                x509_svid=types_pb2.X509SVID(
                    cert_chain=chain,
                    id=types_pb2.SPIFFEID(trust_domain=trust_domain, path=path),
                    expires_at=draw(st.integers(-(2**63), 2**63 - 1)),
                    hint=draw(st.text(max_size=10)),
                ),
                x509_svid_key=key_der,
            )
        )
    federates_with = draw(st.lists(st.sampled_from(["partner.example"]) | st.text(), max_size=3))
    return di.SubscribeToX509SVIDsResponse(x509_svids=items, federates_with=federates_with)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_responses())
def test_mixed_real_and_arbitrary_contents_give_an_update_or_a_render_error(
    response: di.SubscribeToX509SVIDsResponse,
) -> None:
    try:
        update = x509_from_response(response)
    except RenderError as exc:
        assert exc.message
        return
    for svid in update.svids:
        assert svid.cert_chain
        leaf_cert = x509.load_der_x509_certificate(svid.cert_chain[0])
        private = serialization.load_der_private_key(svid.key_pkcs8_der, None)
        assert spki(leaf_cert.public_key()) == spki(private)


@st.composite
def mutated_responses(draw: st.DrawFn) -> bytes:
    """A valid serialized response with a few bytes changed, cut or inserted."""
    kind = draw(st.sampled_from(["ec", "rsa", "ed25519"]))
    key = pooled_key(kind, 0)
    depth = draw(st.integers(0, 2))
    message = di.SubscribeToX509SVIDsResponse(
        x509_svids=[svid_message(SID, leaf(SID, key, depth=depth), pkcs8(key))],
        federates_with=["spiffe://partner.example"],
    ).SerializeToString()
    data = bytearray(message)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        if not data:
            break
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_responses())
def test_corrupted_responses_give_an_update_or_a_render_error(data: bytes) -> None:
    try:
        response = di.SubscribeToX509SVIDsResponse.FromString(data)
    except DecodeError:
        return
    try:
        update = x509_from_response(response)
    except RenderError:
        return
    for svid in update.svids:
        leaf_cert = x509.load_der_x509_certificate(svid.cert_chain[0])
        private = serialization.load_der_private_key(svid.key_pkcs8_der, None)
        assert spki(leaf_cert.public_key()) == spki(private)


# Bundle responses -----------------------------------------------------------------


def test_x509_bundles_are_keyed_by_normalised_trust_domain() -> None:
    own = (der(root("example.org").cert), der(root("example.org", 1).cert))
    partner = (der(root("partner.example").cert),)
    result = bundles_from_response(
        di.SubscribeToX509BundlesResponse(
            ca_certificates={"spiffe://example.org": b"".join(own), "partner.example": partner[0]}
        )
    )
    assert result == {"example.org": own, "partner.example": partner}


@pytest.mark.parametrize(
    ("ca_certificates", "expected"),
    [
        ({"spiffe://example.org": b"", "example.org": b""}, "no certificates"),
        ({"example.org": b"\x30\x03\x02\x01\x01"}, "certificate 1"),
        ({"example.org": b"garbage"}, "not a sequence of DER certificates"),
        ({"Example.ORG": b""}, "not a trust domain name"),
    ],
)
def test_malformed_x509_bundles_are_refused(
    ca_certificates: dict[str, bytes], expected: str
) -> None:
    with pytest.raises(RenderError, match=expected):
        bundles_from_response(di.SubscribeToX509BundlesResponse(ca_certificates=ca_certificates))


def test_a_trust_domain_sent_in_both_forms_is_refused() -> None:
    cert = der(root("example.org").cert)
    with pytest.raises(RenderError, match="two bundles"):
        bundles_from_response(
            di.SubscribeToX509BundlesResponse(
                ca_certificates={"spiffe://example.org": cert, "example.org": cert}
            )
        )


def test_jwt_bundles_must_be_jwks_documents() -> None:
    assert jwt_bundles_from_response(
        di.SubscribeToJWTBundlesResponse(bundles={"spiffe://example.org": JWKS})
    ) == {"example.org": JWKS}
    for bad in (b"", b"{", b"[]", b'{"keys": {}}', b'{"keys": [1]}', b"[" * 100000):
        with pytest.raises(RenderError):
            jwt_bundles_from_response(
                di.SubscribeToJWTBundlesResponse(bundles={"example.org": bad})
            )


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=1000))
def test_arbitrary_bundle_responses_give_bundles_or_a_render_error(data: bytes) -> None:
    for message_type in (di.SubscribeToX509BundlesResponse, di.SubscribeToJWTBundlesResponse):
        try:
            response = message_type.FromString(data)
        except DecodeError:
            continue
        try:
            if isinstance(response, di.SubscribeToX509BundlesResponse):
                bundles_from_response(response)
            else:
                jwt_bundles_from_response(response)
        except RenderError:
            pass


# Selecting SVIDs ------------------------------------------------------------------

WEB = "spiffe://example.org/ns/default/sa/web"
DB = "spiffe://example.org/ns/default/sa/db"


def _two() -> X509Update:
    return X509Update((make_svid(WEB, hint="external"), make_svid(DB, n=1, hint="internal")))


def test_without_a_selection_the_first_svid_is_written() -> None:
    update = _two()
    assert select_svids(spec_of(), update) == (update.svids[0],)


def test_svid_hint_and_spiffe_id_select_and_must_both_match() -> None:
    update = _two()
    assert select_svids(spec_of(svid_hint="internal"), update)[0].spiffe_id == DB
    assert select_svids(spec_of(spiffe_id=DB), update)[0].hint == "internal"
    assert select_svids(spec_of(spiffe_id=DB, svid_hint="internal"), update)[0].spiffe_id == DB
    with pytest.raises(RenderError) as info:
        select_svids(spec_of(spiffe_id=DB, svid_hint="external"), update)
    assert "hint 'external' and SPIFFE ID " + DB in info.value.message
    assert WEB in info.value.message and "'internal'" in info.value.message


def test_no_svid_at_all_is_a_render_error() -> None:
    with pytest.raises(RenderError, match="no SVID"):
        render_files(spec_of(), X509Update(()), bundles("example.org"))


def test_all_svids_puts_the_selected_one_first() -> None:
    update = _two()
    chosen = select_svids(spec_of(all_svids="true", svid_hint="internal"), update)
    assert [s.spiffe_id for s in chosen] == [DB, WEB]


def test_labels_are_hints_when_usable_else_indices() -> None:
    a, b = make_svid(WEB, hint="external"), make_svid(DB, n=1, hint="internal")
    assert svid_labels([a, b]) == ("external", "internal")
    assert svid_labels([a, replace(b, hint="external")]) == ("0", "1")
    assert svid_labels([a, replace(b, hint="")]) == ("0", "1")
    assert svid_labels([a, replace(b, hint="../x")]) == ("0", "1")
    assert svid_labels([a, replace(b, hint=".x")]) == ("0", "1")


# Rendering ------------------------------------------------------------------------


def test_default_files_are_chain_key_and_own_bundle() -> None:
    svid = make_svid(depth=1)
    files = render_files(
        spec_of(),
        X509Update((svid,), ("partner.example",)),
        bundles("example.org", "partner.example"),
    )
    assert sorted(files) == ["svid.pem", "svid_bundle.pem", "svid_key.pem"]
    assert certs_in(files["svid.pem"].data) == svid.cert_chain
    assert files["svid_key.pem"].data.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert spki(key_in(files["svid_key.pem"].data)) == spki(
        x509.load_der_x509_certificate(svid.cert_chain[0]).public_key()
    )
    assert certs_in(files["svid_bundle.pem"].data) == (der(root("example.org").cert),)
    assert files["svid.pem"].mode == 0o644
    assert files["svid_bundle.pem"].mode == 0o644
    assert files["svid_key.pem"].mode == 0o600


def test_python_ssl_loads_the_certificate_with_its_key(tmp_path: Path) -> None:
    for kind in ("ec", "rsa", "ed25519"):
        for key_format in ("pkcs8", "traditional"):
            if kind == "ed25519" and key_format == "traditional":
                continue
            files = render_files(
                spec_of(key_format=key_format),
                X509Update((make_svid(kind=kind, depth=2),)),
                bundles("example.org"),
            )
            for name, content in files.items():
                (tmp_path / name).write_bytes(content.data)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.load_cert_chain(tmp_path / "svid.pem", tmp_path / "svid_key.pem")
            context.load_verify_locations(tmp_path / "svid_bundle.pem")
            assert len(context.get_ca_certs()) == 1


def test_fs_group_makes_the_key_group_readable() -> None:
    files = render_files(
        spec_of(volume_mount_group="1234"), X509Update((make_svid(),)), bundles("example.org")
    )
    assert files["svid_key.pem"].mode == 0o640
    assert files["svid.pem"].mode == 0o644
    custom = render_files(
        spec_of(cert_file_mode="0640", key_file_mode="0400"),
        X509Update((make_svid(),)),
        bundles("example.org"),
    )
    assert (custom["svid.pem"].mode, custom["svid_key.pem"].mode) == (0o640, 0o400)


def test_file_names_come_from_the_attributes() -> None:
    files = render_files(
        spec_of(svid_file="tls.crt", svid_key_file="tls.key", bundle_file="ca.crt"),
        X509Update((make_svid(),)),
        bundles("example.org"),
    )
    assert sorted(files) == ["ca.crt", "tls.crt", "tls.key"]


@pytest.mark.parametrize(
    ("kind", "header"),
    [("ec", b"-----BEGIN EC PRIVATE KEY-----\n"), ("rsa", b"-----BEGIN RSA PRIVATE KEY-----\n")],
)
def test_traditional_key_format_is_sec1_or_pkcs1(kind: str, header: bytes) -> None:
    svid = make_svid(kind=kind)
    files = render_files(
        spec_of(key_format="traditional"), X509Update((svid,)), bundles("example.org")
    )
    assert files["svid_key.pem"].data.startswith(header)
    assert spki(key_in(files["svid_key.pem"].data)) == spki(
        serialization.load_der_private_key(svid.key_pkcs8_der, None)
    )


def test_traditional_key_format_is_refused_for_ed25519() -> None:
    with pytest.raises(RenderError, match="key-format pkcs8"):
        render_files(
            spec_of(key_format="traditional"),
            X509Update((make_svid(kind="ed25519"),)),
            bundles("example.org"),
        )


def test_missing_own_trust_bundle_is_a_render_error() -> None:
    with pytest.raises(RenderError, match=re.escape("trust bundle of example.org")):
        render_files(spec_of(), X509Update((make_svid(),)), bundles("partner.example"))


def test_intermediates_in_bundle_appends_the_chain_without_the_leaf() -> None:
    svid = make_svid(depth=2)
    files = render_files(
        spec_of(intermediates_in_bundle="true"), X509Update((svid,)), bundles("example.org")
    )
    assert certs_in(files["svid_bundle.pem"].data) == (
        der(root("example.org").cert),
        *svid.cert_chain[1:],
    )


def _federated(mode: str, federates_with: tuple[str, ...], **more: str) -> dict[str, FileContent]:
    return render_files(
        spec_of(federated_bundles=mode, **more),
        X509Update((make_svid(),), federates_with),
        bundles("example.org", "partner.example", "other.example", "unrelated.example"),
    )


def test_federated_bundles_none_writes_only_the_own_bundle() -> None:
    files = _federated("none", ("partner.example",))
    assert sorted(files) == ["svid.pem", "svid_bundle.pem", "svid_key.pem"]


def test_federated_bundles_files_writes_one_file_per_federated_trust_domain() -> None:
    files = _federated("files", ("other.example", "partner.example", "missing.example"))
    assert sorted(files) == [
        "other.example.pem",
        "partner.example.pem",
        "svid.pem",
        "svid_bundle.pem",
        "svid_key.pem",
    ]
    assert certs_in(files["partner.example.pem"].data) == (der(root("partner.example").cert),)
    assert certs_in(files["svid_bundle.pem"].data) == (der(root("example.org").cert),)
    gone = _federated("files", ("other.example",))
    assert "partner.example.pem" not in gone


def test_federated_bundles_merged_appends_them_to_the_bundle_file() -> None:
    files = _federated("merged", ("partner.example",))
    assert sorted(files) == ["svid.pem", "svid_bundle.pem", "svid_key.pem"]
    assert certs_in(files["svid_bundle.pem"].data) == (
        der(root("example.org").cert),
        der(root("partner.example").cert),
    )


def test_spiffe_fs_layout_writes_a_credential_bundle_and_trust_bundles() -> None:
    svid = make_svid(depth=1)
    files = render_files(
        spec_of(layout="spiffe-fs", federated_bundles="files"),
        X509Update((svid,), ("partner.example",)),
        bundles("example.org", "partner.example", "unrelated.example"),
    )
    assert sorted(files) == [
        "credential-bundle.pem",
        "example.org.spiffe-trust-bundle.pem",
        "partner.example.spiffe-trust-bundle.pem",
    ]
    credential = files["credential-bundle.pem"]
    assert credential.data.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert credential.mode == 0o600
    assert certs_in(credential.data) == svid.cert_chain
    assert spki(key_in(credential.data)) == spki(
        x509.load_der_x509_certificate(svid.cert_chain[0]).public_key()
    )
    assert certs_in(files["example.org.spiffe-trust-bundle.pem"].data) == (
        der(root("example.org").cert),
    )
    own_only = render_files(
        spec_of(layout="spiffe-fs"),
        X509Update((svid,), ("partner.example",)),
        bundles("example.org", "partner.example"),
    )
    assert sorted(own_only) == ["credential-bundle.pem", "example.org.spiffe-trust-bundle.pem"]


def test_all_svids_writes_one_labelled_set_per_svid() -> None:
    update = _two()
    files = render_files(spec_of(all_svids="true"), update, bundles("example.org"))
    assert sorted(files) == [
        "svid-external.pem",
        "svid-internal.pem",
        "svid.pem",
        "svid_bundle-external.pem",
        "svid_bundle-internal.pem",
        "svid_bundle.pem",
        "svid_key-external.pem",
        "svid_key-internal.pem",
        "svid_key.pem",
    ]
    assert certs_in(files["svid-internal.pem"].data) == update.svids[1].cert_chain
    assert files["svid.pem"] == files["svid-external.pem"]
    unlabeled = X509Update(tuple(replace(s, hint="") for s in update.svids))
    indexed = render_files(
        spec_of(all_svids="true", layout="spiffe-fs"), unlabeled, bundles("example.org")
    )
    assert sorted(indexed) == [
        "credential-bundle-0.pem",
        "credential-bundle-1.pem",
        "credential-bundle.pem",
        "example.org.spiffe-trust-bundle.pem",
    ]


def test_jwt_tokens_one_file_per_audience_set() -> None:
    one = render_files(
        spec_of(jwt_audiences="api"),
        X509Update((make_svid(),)),
        bundles("example.org"),
        jwt_tokens={("api",): TOKEN},
    )
    assert one["jwt_svid.token"] == FileContent(TOKEN.encode(), 0o600)
    several = render_files(
        spec_of(jwt_audiences="api,db;billing", jwt_svid_file="token.jwt"),
        X509Update((make_svid(),)),
        bundles("example.org"),
        jwt_tokens={("api", "db"): TOKEN, ("billing",): TOKEN + "x"},
    )
    assert several["token-0.jwt"].data == TOKEN.encode()
    assert several["token-1.jwt"].data == (TOKEN + "x").encode()
    with pytest.raises(RenderError, match="audiences billing"):
        render_files(
            spec_of(jwt_audiences="api,db;billing"),
            X509Update((make_svid(),)),
            bundles("example.org"),
            jwt_tokens={("api", "db"): TOKEN},
        )


def test_a_malformed_token_is_refused_without_showing_it() -> None:
    secret = "not a token " + TOKEN
    with pytest.raises(RenderError) as info:
        render_files(
            spec_of(jwt_audiences="api"),
            X509Update((make_svid(),)),
            bundles("example.org"),
            jwt_tokens={("api",): secret},
        )
    assert TOKEN not in info.value.message


def test_jwt_bundle_file_maps_trust_domains_to_jwks() -> None:
    partner = b'{"keys": []}'
    jwt_bundles = {"example.org": JWKS, "partner.example": partner, "unrelated.example": partner}
    update = X509Update((make_svid(),), ("partner.example",))
    own = render_files(
        spec_of(jwt_bundle_file="jwks.json"),
        update,
        bundles("example.org"),
        jwt_bundles=jwt_bundles,
    )
    assert json.loads(own["jwks.json"].data) == {"example.org": json.loads(JWKS)}
    assert own["jwks.json"].mode == 0o644
    federated = render_files(
        spec_of(jwt_bundle_file="jwks.json", federated_bundles="files"),
        update,
        bundles("example.org", "partner.example"),
        jwt_bundles=jwt_bundles,
    )
    assert json.loads(federated["jwks.json"].data) == {
        "example.org": json.loads(JWKS),
        "partner.example": {"keys": []},
    }
    with pytest.raises(RenderError, match=re.escape("JWT bundle of example.org")):
        render_files(spec_of(jwt_bundle_file="jwks.json"), update, bundles("example.org"))
    assert "jwks.json" not in render_files(spec_of(), update, bundles("example.org"))


def test_a_file_name_collision_at_render_time_is_a_render_error() -> None:
    with pytest.raises(RenderError, match=re.escape("partner.example.pem")):
        render_files(
            spec_of(federated_bundles="files", bundle_file="partner.example.pem"),
            X509Update((make_svid(),), ("partner.example",)),
            bundles("example.org", "partner.example"),
        )


def test_rendering_is_deterministic() -> None:
    args = (spec_of(federated_bundles="merged"), X509Update((make_svid(),), ("partner.example",)))
    first = render_files(*args, bundles("example.org", "partner.example"))
    again = render_files(*args, dict(reversed(bundles("example.org", "partner.example").items())))
    assert first == again


# Properties -----------------------------------------------------------------------

TRUST_DOMAINS = ("example.org", "partner.example", "other.example")


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[VolumeSpec, X509Update, dict[str, tuple[bytes, ...]]]:
    layout = draw(st.sampled_from(["default", "spiffe-fs"]))
    attributes: dict[str, str] = {"layout": layout}
    if layout == "default":
        attributes["key_format"] = draw(st.sampled_from(["pkcs8", "traditional"]))
        attributes["federated_bundles"] = draw(st.sampled_from(["none", "files", "merged"]))
    else:
        attributes["federated_bundles"] = draw(st.sampled_from(["none", "files"]))
    attributes["intermediates_in_bundle"] = draw(st.sampled_from(["true", "false"]))
    attributes["all_svids"] = draw(st.sampled_from(["true", "false"]))
    if draw(st.booleans()):
        attributes["volume_mount_group"] = str(draw(st.integers(0, 65535)))
    kinds = ["ec", "rsa"] + ([] if attributes.get("key_format") == "traditional" else ["ed25519"])
    count = draw(st.integers(1, 3))
    svids = []
    for n in range(count):
        td = draw(st.sampled_from(TRUST_DOMAINS[:2]))
        svids.append(
            make_svid(
                f"spiffe://{td}/workload/{n}",
                kind=draw(st.sampled_from(kinds)),
                n=draw(st.integers(0, 1)),
                depth=draw(st.integers(0, 2)),
                hint=draw(st.sampled_from(["", "a", "b", "x.y", "../z"])),
            )
        )
    federates = tuple(sorted(draw(st.sets(st.sampled_from(TRUST_DOMAINS)))))
    present = bundles(*TRUST_DOMAINS)
    return spec_of(**attributes), X509Update(tuple(svids), federates), present


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_properties_of_rendered_files(
    scenario: tuple[VolumeSpec, X509Update, Mapping[str, tuple[bytes, ...]]],
) -> None:
    spec, update, x509_bundles = scenario
    files = render_files(spec, update, x509_bundles)
    primary = select_svids(spec, update)[0]

    for name, content in files.items():
        assert file_name_problem(name) is None
        assert content.mode in (spec.cert_file_mode, spec.key_file_mode)

    if spec.layout == "default":
        cert_file, key_file = files[spec.svid_file], files[spec.svid_key_file]
        chain = certs_in(cert_file.data)
        key = key_in(key_file.data)
        assert cert_file.mode == spec.cert_file_mode
        assert key_file.mode == spec.key_file_mode
        assert (key_file.mode & 0o070 != 0) == (spec.gid is not None)
    else:
        credential = files["credential-bundle.pem"]
        assert credential.data.startswith(b"-----BEGIN PRIVATE KEY-----\n")
        chain, key = certs_in(credential.data), key_in(credential.data)
    # The key file always matches the certificate file, and it is the selected SVID's.
    assert chain == primary.cert_chain
    assert spki(key) == spki(x509.load_der_x509_certificate(chain[0]).public_key())

    own = primary.trust_domain
    expected_bundle = list(x509_bundles[own])
    if spec.intermediates_in_bundle:
        expected_bundle += [c for c in primary.cert_chain[1:] if c not in expected_bundle]
    federated = [td for td in update.federates_with if td != own]
    if spec.layout == "default":
        if spec.federated_bundles == "merged":
            expected_bundle += [c for td in federated for c in x509_bundles[td]]
        # The bundle file parses to exactly the trust domain's certificates (plus what
        # the attributes add), in order.
        assert list(certs_in(files[spec.bundle_file].data)) == expected_bundle
        extra = {n for n in files if n.endswith(".pem") and n.removesuffix(".pem") in TRUST_DOMAINS}
        wanted = set(federated) if spec.federated_bundles == "files" else set()
        assert extra == {td + ".pem" for td in wanted}
    else:
        trust_files = {
            n.removesuffix(".spiffe-trust-bundle.pem")
            for n in files
            if n.endswith(".spiffe-trust-bundle.pem")
        }
        written = select_svids(spec, update)
        wanted = {s.trust_domain for s in written}
        if spec.federated_bundles == "files":
            wanted |= set(federated)
        assert trust_files == wanted
        own_file = files[own + ".spiffe-trust-bundle.pem"]
        assert set(certs_in(own_file.data)) >= set(x509_bundles[own])

    if spec.all_svids:
        labels = svid_labels(update.svids)
        for svid, label in zip(update.svids, labels, strict=True):
            name = (
                f"svid-{label}.pem"
                if spec.layout == "default"
                else f"credential-bundle-{label}.pem"
            )
            assert certs_in(files[name].data) == svid.cert_chain


ATTRIBUTE_VALUES = {
    "svid-file": ["svid.pem", "partner.example.pem", "x"],
    "bundle-file": ["svid_bundle.pem", "svid-0.pem", "example.org.pem"],
    "svid-hint": ["", "a", "b"],
    "spiffe-id": ["", "spiffe://example.org/workload/0", "spiffe://partner.example/workload/1"],
    "all-svids": ["true", "false"],
    "federated-bundles": ["none", "files", "merged"],
    "intermediates-in-bundle": ["true", "false"],
    "layout": ["default", "spiffe-fs"],
    "key-format": ["pkcs8", "traditional"],
    "jwt-audiences": ["", "api", "api,db;billing"],
    "jwt-bundle-file": ["jwks.json", "partner.example.spiffe-trust-bundle.pem"],
}


Case = tuple[
    VolumeSpec,
    X509Update,
    dict[str, tuple[bytes, ...]],
    dict[tuple[str, ...], str],
    dict[str, bytes],
]


@st.composite
def anything_goes(draw: st.DrawFn) -> Case:
    attributes = draw(
        st.fixed_dictionaries(
            {}, optional={k: st.sampled_from(v) for k, v in ATTRIBUTE_VALUES.items()}
        )
    )
    context = {**POD, **{f"csi.spire.io/{k}": v for k, v in attributes.items()}}
    try:
        spec = parse_volume_context(context)
    except InvalidArgument:
        spec = parse_volume_context(POD)
    svids = tuple(
        make_svid(
            f"spiffe://{draw(st.sampled_from(TRUST_DOMAINS[:2]))}/workload/{n}",
            kind=draw(st.sampled_from(["ec", "rsa", "ed25519"])),
            depth=draw(st.integers(0, 1)),
            hint=draw(st.sampled_from(["", "a", "b"])),
        )
        for n in range(draw(st.integers(0, 3)))
    )
    federates = tuple(sorted(draw(st.sets(st.sampled_from(TRUST_DOMAINS)))))
    x509_bundles = bundles(*draw(st.sets(st.sampled_from(TRUST_DOMAINS))))
    tokens = {
        audiences: draw(st.sampled_from([TOKEN, "", "a b"]) | st.text(max_size=20))
        for audiences in draw(st.sets(st.sampled_from([("api",), ("api", "db"), ("billing",)])))
    }
    jwt_bundles = {
        td: draw(st.sampled_from([JWKS, b"{}", b"nonsense"]))
        for td in draw(st.sets(st.sampled_from(TRUST_DOMAINS)))
    }
    return spec, X509Update(svids, federates), x509_bundles, tokens, jwt_bundles


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(anything_goes())
def test_render_files_returns_valid_files_or_raises_a_render_error(case: Case) -> None:
    spec, update, x509_bundles, tokens, jwt_bundles = case
    try:
        files = render_files(spec, update, x509_bundles, jwt_tokens=tokens, jwt_bundles=jwt_bundles)
    except RenderError as exc:
        assert exc.message
        assert all(t not in exc.message for t in tokens.values() if len(t) > 3)
        return
    assert files
    assert all(file_name_problem(name) is None for name in files)
    assert all(c.mode in (spec.cert_file_mode, spec.key_file_mode) for c in files.values())
