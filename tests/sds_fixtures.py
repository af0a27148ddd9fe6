"""Shared fixture for the SDS tests: SPIRE's handler_test.go world with real certificates.

Own trust domain ``domain.test``, federated ``otherdomain.test``, one workload
``spiffe://domain.test/workload`` (EC P-256) and its rotation; helpers to build requests
and to decode a response into what Envoy would see, checking every encoding on the way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trio_spirecsi._proto.envoy.config.core.v3 import base_pb2
from trio_spirecsi._proto.envoy.extensions.transport_sockets.tls.v3 import (
    secret_pb2,
    tls_spiffe_validator_config_pb2,
)
from trio_spirecsi._proto.envoy.service.discovery.v3 import discovery_pb2
from trio_spirecsi._proto.google.rpc import status_pb2
from trio_spirecsi.devagent.ca import CertificateAuthority
from trio_spirecsi.sds import (
    SECRET_TYPE_URL,
    SPIFFE_VALIDATOR_NAME,
    SPIFFE_VALIDATOR_TYPE_URL,
    SdsSnapshot,
)
from trio_spirecsi.spire.responses import X509SVID

OWN = CertificateAuthority("domain.test")
FED = CertificateAuthority("otherdomain.test")
WORKLOAD_ID = "spiffe://domain.test/workload"
OWN_ID = "spiffe://domain.test"
FED_ID = "spiffe://otherdomain.test"
BUNDLES: dict[str, tuple[bytes, ...]] = {
    "domain.test": (OWN.root_der,),
    "otherdomain.test": (FED.root_der,),
}


def svid_of(ca: CertificateAuthority, spiffe_id: str, hint: str = "") -> X509SVID:
    issued = ca.issue_x509_svid(spiffe_id, 3600)
    return X509SVID(
        issued.spiffe_id, issued.cert_chain, issued.key_pkcs8_der, issued.expires_at, hint
    )


WORKLOAD1 = svid_of(OWN, WORKLOAD_ID)
WORKLOAD2 = svid_of(OWN, WORKLOAD_ID)
"""The same identity after a rotation: new key, new certificate."""


def snapshot(
    *svids: X509SVID,
    federated: Sequence[str] = ("otherdomain.test",),
    bundles: Mapping[str, tuple[bytes, ...]] = BUNDLES,
) -> SdsSnapshot:
    return SdsSnapshot(svids or (WORKLOAD1,), bundles, "domain.test", tuple(federated))


def node(
    major: int | None = None, minor: int = 0, *, metadata: dict[str, Any] | None = None
) -> base_pb2.Node:
    """An Envoy node; ``major`` given: its build version is major.minor.0."""
    result = base_pb2.Node(id="envoy", cluster="test")
    if major is not None:
        result.user_agent_build_version.version.major_number = major
        result.user_agent_build_version.version.minor_number = minor
    if metadata is not None:
        result.metadata.update(metadata)
    return result


V17 = node(1, 17)
V18 = node(1, 18)


def request(
    *names: str,
    node: base_pb2.Node | None = None,
    version: str = "",
    nonce: str = "",
    error: str | None = None,
    type_url: str = SECRET_TYPE_URL,
) -> discovery_pb2.DiscoveryRequest:
    result = discovery_pb2.DiscoveryRequest(
        resource_names=list(names), version_info=version, response_nonce=nonce, type_url=type_url
    )
    if node is not None:
        result.node.CopyFrom(node)
    if error is not None:
        result.error_detail.CopyFrom(status_pb2.Status(code=13, message=error))
    return result


def metadata_value(value: object) -> dict[str, Any]:
    return {"disable_spiffe_cert_validation": value}


# What Envoy would see ------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One resource as Envoy would apply it: ``kind`` is ``trusted_ca``, ``spiffe`` (the
    SPIFFE validator) or ``cert``; ``what`` the trust domains (in order) or the SPIFFE ID."""

    name: str
    kind: str
    what: tuple[str, ...]


def pem_certificates(data: bytes) -> tuple[bytes, ...]:
    """DER of every PEM certificate in ``data``, checking nothing else is there."""
    certs = x509.load_pem_x509_certificates(data)
    assert data.count(b"-----BEGIN ") == len(certs)
    return tuple(c.public_bytes(serialization.Encoding.DER) for c in certs)


def seen(
    response: discovery_pb2.DiscoveryResponse,
    svids: Sequence[X509SVID] = (WORKLOAD1,),
    bundles: Mapping[str, tuple[bytes, ...]] = BUNDLES,
) -> list[Seen]:
    """Decode every resource, checking that it is a Secret whose PEM parses and matches what
    the snapshot held (the bundle of each trust domain; the SVID's chain and its own key)."""
    by_id = {s.spiffe_id: s for s in reversed(svids)}
    found = []
    for packed in response.resources:
        assert packed.type_url == SECRET_TYPE_URL
        secret = secret_pb2.Secret()
        assert packed.Unpack(secret)
        kind = secret.WhichOneof("type")
        if kind == "tls_certificate":
            found.append(_certificate(secret, by_id))
            continue
        assert kind == "validation_context", kind
        context = secret.validation_context
        if context.HasField("trusted_ca"):
            assert not context.HasField("custom_validator_config")
            assert context.trusted_ca.WhichOneof("specifier") == "inline_bytes"
            certs = pem_certificates(context.trusted_ca.inline_bytes)
            matching = tuple(td for td, bundle in bundles.items() if bundle == certs)
            assert len(matching) == 1, "trusted_ca is not exactly one trust domain's bundle"
            found.append(Seen(secret.name, "trusted_ca", matching))
            continue
        config = context.custom_validator_config
        assert config.name == SPIFFE_VALIDATOR_NAME
        assert config.typed_config.type_url == SPIFFE_VALIDATOR_TYPE_URL
        validator = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig()
        assert config.typed_config.Unpack(validator)
        assert not validator.HasField("trust_bundles")
        for domain in validator.trust_domains:
            assert domain.trust_bundle.WhichOneof("specifier") == "inline_bytes"
            assert pem_certificates(domain.trust_bundle.inline_bytes) == bundles[domain.name]
        found.append(Seen(secret.name, "spiffe", tuple(d.name for d in validator.trust_domains)))
    return found


def _certificate(secret: secret_pb2.Secret, by_id: dict[str, X509SVID]) -> Seen:
    certificate = secret.tls_certificate
    assert [f.name for f, _ in certificate.ListFields()] == ["certificate_chain", "private_key"]
    chain = pem_certificates(certificate.certificate_chain.inline_bytes)
    leaf = x509.load_der_x509_certificate(chain[0])
    uris = leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier)
    assert len(uris) == 1
    svid = by_id[uris[0]]
    assert chain == svid.cert_chain
    key_pem = certificate.private_key.inline_bytes
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert key_pem.count(b"-----BEGIN ") == 1
    key = serialization.load_pem_private_key(key_pem, password=None)
    der = serialization.Encoding.DER
    assert key.private_bytes(
        der, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ) == (svid.key_pkcs8_der)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(der, spki) == leaf.public_key().public_bytes(der, spki)
    return Seen(secret.name, "cert", (uris[0],))
