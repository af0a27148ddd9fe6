"""What the SPIRE agent sends, parsed and validated: the one door agent data comes in by.

Every Delegated Identity response goes through here before anything else sees it: a chain
that does not parse, a leaf whose SPIFFE ID differs from the one the agent named, a key that
does not belong to the leaf, a bundle that is not DER certificates or a JWKS document is a
:class:`RenderError` naming what is wrong, never a value. No message built here contains
key material or tokens.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from .._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as di
from .._proto.spire.api.types import types_pb2
from ..errors import RenderError
from ..spiffe import SpiffeIdError, normalise_trust_domain, trust_domain_of
from ..spiffe import spiffe_id as make_spiffe_id

CRYPTO_ERRORS = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    x509.InvalidVersion,  # an Exception, not a ValueError: a certificate claiming v2
)


@dataclass(frozen=True)
class X509SVID:
    """One X.509-SVID, validated: the chain parses, the leaf's only URI SAN is
    ``spiffe_id`` and the key belongs to the leaf."""

    spiffe_id: str
    cert_chain: tuple[bytes, ...]
    """DER certificates, leaf first."""
    key_pkcs8_der: bytes = field(repr=False)
    expires_at: int
    """The leaf's notAfter, unix seconds."""
    hint: str = ""
    not_before: int | None = None
    """The leaf's notBefore, unix seconds (read with the rest at validation; None in an
    SVID built by hand)."""

    @property
    def trust_domain(self) -> str:
        return trust_domain_of(self.spiffe_id)


@dataclass(frozen=True)
class X509Update:
    """One SubscribeToX509SVIDs response: the pod's SVIDs (possibly none) and the trust
    domains they federate with (normalised names, sorted, no duplicates)."""

    svids: tuple[X509SVID, ...]
    federates_with: tuple[str, ...] = ()


# Agent responses -----------------------------------------------------------------


def _trust_domain(name: str) -> str:
    try:
        return normalise_trust_domain(name)
    except SpiffeIdError as exc:
        raise RenderError(exc.message) from None


def split_der(data: bytes) -> tuple[bytes, ...]:
    """Split concatenated DER structures (how the agent sends a bundle) into each one."""
    parts: list[bytes] = []
    at = 0
    while at < len(data):
        if data[at] != 0x30 or at + 1 >= len(data):
            raise RenderError("not a sequence of DER certificates")
        first = data[at + 1]
        if first < 0x80:
            header, length = 2, first
        else:
            size = first & 0x7F
            if size == 0 or size > 4 or at + 2 + size > len(data):
                raise RenderError("not a sequence of DER certificates (bad length)")
            header, length = 2 + size, int.from_bytes(data[at + 2 : at + 2 + size], "big")
        end = at + header + length
        if end > len(data):
            raise RenderError("not a sequence of DER certificates (truncated)")
        parts.append(data[at:end])
        at = end
    return tuple(parts)


def x509_from_response(resp: di.SubscribeToX509SVIDsResponse) -> X509Update:
    """Validate every SVID of a response; zero SVIDs is a valid (empty) update."""
    svids = tuple(_svid_of(index, item) for index, item in enumerate(resp.x509_svids))
    federates_with = tuple(sorted({_trust_domain(td) for td in resp.federates_with}))
    return X509Update(svids, federates_with)


def _svid_of(index: int, item: di.X509SVIDWithKey) -> X509SVID:
    """Validated SVIDs are cached by their bytes: an agent sends the same SVID to every pod
    of a registration entry, so a rotation is validated once, not once per volume, and the
    volumes share one copy in memory."""
    try:
        return _validated(item.SerializeToString(deterministic=True))
    except RenderError:
        return _svid(index, item)  # the same error, naming this SVID's position


@functools.lru_cache(maxsize=1024)
def _validated(serialized: bytes) -> X509SVID:
    return _svid(0, di.X509SVIDWithKey.FromString(serialized))


def _svid(index: int, item: di.X509SVIDWithKey) -> X509SVID:
    svid = item.x509_svid
    where = f"SVID {index + 1}"
    try:
        spiffe_id = make_spiffe_id(svid.id.trust_domain, svid.id.path)
    except SpiffeIdError as exc:
        raise RenderError(f"{where} has no valid SPIFFE ID: {exc.message}") from None
    where = f"SVID {index + 1} ({spiffe_id})"
    if not svid.cert_chain:
        raise RenderError(f"{where} has no certificates")
    chain = tuple(bytes(der) for der in svid.cert_chain)
    certs = [parse_certificate(der, f"{where}: certificate {n + 1}") for n, der in enumerate(chain)]
    leaf = certs[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    except CRYPTO_ERRORS:
        raise RenderError(f"{where}: the leaf certificate's extensions do not parse") from None
    if len(uris) != 1:
        raise RenderError(
            f"{where}: the leaf certificate has {len(uris)} URI SANs; an X.509-SVID has "
            "exactly one, its SPIFFE ID"
        )
    if uris[0] != spiffe_id:
        raise RenderError(
            f"{where}: the leaf certificate is for {uris[0][:200]!r}, not for the SPIFFE ID "
            "the agent named"
        )
    try:
        key = serialization.load_der_private_key(bytes(item.x509_svid_key), password=None)
        key_pkcs8 = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # The same algorithm, parameters and public value: what equal SPKI encodings mean,
        # compared without encoding either (half the cost).
        matches = key.public_key() == leaf.public_key()
    except CRYPTO_ERRORS:
        raise RenderError(f"{where}: the private key is not a PKCS#8 DER key") from None
    if not matches:
        raise RenderError(f"{where}: the private key does not belong to the leaf certificate")
    try:
        expires_at = int(leaf.not_valid_after_utc.timestamp())
        not_before = int(leaf.not_valid_before_utc.timestamp())
    except CRYPTO_ERRORS:
        raise RenderError(f"{where}: the leaf certificate has no valid validity period") from None
    return X509SVID(spiffe_id, chain, key_pkcs8, expires_at, svid.hint, not_before)


def parse_certificate(der: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except CRYPTO_ERRORS:
        raise RenderError(f"{what} is not a DER X.509 certificate") from None


def bundles_from_response(
    resp: di.SubscribeToX509BundlesResponse,
) -> dict[str, tuple[bytes, ...]]:
    """Trust domain name -> its CA certificates (DER), each certificate parsed."""
    bundles: dict[str, tuple[bytes, ...]] = {}
    for raw in sorted(resp.ca_certificates):
        trust_domain = _bundle_key(raw, bundles)
        certs = split_der(bytes(resp.ca_certificates[raw]))
        if not certs:
            raise RenderError(f"the X.509 bundle of {trust_domain} has no certificates")
        for n, der in enumerate(certs):
            parse_certificate(der, f"the X.509 bundle of {trust_domain}: certificate {n + 1}")
        bundles[trust_domain] = certs
    return bundles


def jwt_bundles_from_response(resp: di.SubscribeToJWTBundlesResponse) -> dict[str, bytes]:
    """Trust domain name -> its JWKS document (JSON with a ``keys`` list), as sent."""
    bundles: dict[str, bytes] = {}
    for raw in sorted(resp.bundles):
        trust_domain = _bundle_key(raw, bundles)
        data = bytes(resp.bundles[raw])
        parse_jwks(data, trust_domain)
        bundles[trust_domain] = data
    return bundles


def _bundle_key(raw: str, seen: Mapping[str, object]) -> str:
    trust_domain = _trust_domain(raw)
    if trust_domain in seen:
        raise RenderError(f"the agent sent two bundles for trust domain {trust_domain}")
    return trust_domain


def parse_jwks(data: bytes, trust_domain: str) -> dict[str, object]:
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        raise RenderError(f"the JWT bundle of {trust_domain} is not JSON") from None
    if (
        not isinstance(document, dict)
        or not isinstance(document.get("keys"), list)
        or not all(isinstance(k, dict) for k in document["keys"])
    ):
        raise RenderError(
            f"the JWT bundle of {trust_domain} is not a JWKS document (an object with a "
            "'keys' list of objects)"
        )
    return document


@dataclass(frozen=True, slots=True)
class JwtSvid:
    """One JWT-SVID from FetchJWTSVIDs, its SPIFFE ID validated. ``token`` is secret: it
    is never part of a message or a log line (hence not in the repr)."""

    spiffe_id: str
    token: str = field(repr=False)
    hint: str
    issued_at: float
    expires_at: float


def jwt_svids_from_response(resp: di.FetchJWTSVIDsResponse) -> tuple[JwtSvid, ...]:
    """The response's JWT-SVIDs; one whose SPIFFE ID is not valid is a RenderError."""
    return tuple(_jwt_svid(index, svid) for index, svid in enumerate(resp.svids))


def _jwt_svid(index: int, svid: types_pb2.JWTSVID) -> JwtSvid:
    try:
        spiffe_id = make_spiffe_id(svid.id.trust_domain, svid.id.path)
    except SpiffeIdError as exc:
        raise RenderError(f"JWT-SVID {index + 1} has no valid SPIFFE ID: {exc.message}") from None
    return JwtSvid(spiffe_id, svid.token, svid.hint, float(svid.issued_at), float(svid.expires_at))


B = TypeVar("B")


@dataclass(frozen=True)
class BundleSet(Generic[B]):
    """The agent's latest full set of bundles, keyed by bare trust domain name; ``version``
    grows with every update. X.509: DER certificates; JWT: the JWKS document as sent."""

    version: int = 0
    bundles: Mapping[str, B] = field(default_factory=dict)


X509Bundles = BundleSet[tuple[bytes, ...]]
JwtBundles = BundleSet[bytes]
