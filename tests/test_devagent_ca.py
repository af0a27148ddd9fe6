"""The dev agent's CA: what it issues must pass the X.509-SVID rules and real verifiers."""

from __future__ import annotations

import base64
import json
import os
import ssl
import stat
import subprocess
import time
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID
from spiffe import JwtBundle, JwtSvid, TrustDomain, X509Bundle
from spiffe import X509Svid as SpiffeX509Svid
from spiffe.bundle.jwt_bundle.errors import AuthorityNotFoundError
from spiffe.svid.errors import InvalidTokenError
from spiffe.utils.certificate_utils import parse_der_certificates

from trio_spirecsi.devagent.ca import BACKDATE, CAError, CertificateAuthority, X509Svid
from trio_spirecsi.devagent.jwt import JwtSigner, jwks

WEB = "spiffe://example.org/ns/shop/sa/web"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority("example.org")


_E = TypeVar("_E", bound=x509.ExtensionType)


def _ext(cert: x509.Certificate, kind: type[_E]) -> x509.Extension[_E]:
    return cert.extensions.get_extension_for_class(kind)


def _certs(svid: X509Svid) -> list[x509.Certificate]:
    return [x509.load_der_x509_certificate(der) for der in svid.cert_chain]


def _uris(cert: x509.Certificate) -> list[str]:
    return _ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )


def _verify_chain(bundle_der: bytes, svid: X509Svid) -> None:
    roots = parse_der_certificates(bundle_der)
    leaf, *intermediates = _certs(svid)
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(roots))
        .extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=verification.ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )
    verifier.verify(leaf, intermediates)


def test_root_is_a_spire_style_ca_for_the_trust_domain(ca: CertificateAuthority) -> None:
    root = ca.root_certificate
    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)
    assert _uris(root) == ["spiffe://example.org"]
    constraints = _ext(root, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = _ext(root, x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    ski = _ext(root, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(root.public_key())
    assert _ext(root, x509.AuthorityKeyIdentifier).value.key_identifier == ski.digest
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert ca.bundle_der == root.public_bytes(serialization.Encoding.DER)
    assert ca.id == "spiffe://example.org"


def test_leaf_follows_every_x509_svid_rule(ca: CertificateAuthority) -> None:
    svid = ca.issue_x509_svid(WEB, ttl=600)
    [leaf] = _certs(svid)
    assert _uris(leaf) == [WEB]
    san = _ext(leaf, x509.SubjectAlternativeName).value
    assert len(list(san)) == 1  # exactly one SAN of any kind
    constraints = _ext(leaf, x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = _ext(leaf, x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert usage.value.key_encipherment and usage.value.key_agreement
    assert not usage.value.key_cert_sign and not usage.value.crl_sign
    eku = _ext(leaf, x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert _ext(leaf, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(
        leaf.public_key()
    )
    root_ski = _ext(ca.root_certificate, x509.SubjectKeyIdentifier).value
    assert _ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier == root_ski.digest
    leaf.verify_directly_issued_by(ca.root_certificate)

    now = time.time()
    assert leaf.not_valid_before_utc.timestamp() <= now - BACKDATE + 5
    assert svid.expires_at == int(leaf.not_valid_after_utc.timestamp())
    assert svid.expires_at - svid.issued_at == 600
    assert svid.serial == leaf.serial_number
    assert svid.spiffe_id == WEB

    key = serialization.load_der_private_key(svid.key_pkcs8_der, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert key.public_key() == leaf.public_key()
    _verify_chain(ca.bundle_der, svid)
    assert "key_pkcs8_der" not in repr(svid)


def test_every_svid_gets_its_own_key_and_serial(ca: CertificateAuthority) -> None:
    first, second = ca.issue_x509_svid(WEB, 600), ca.issue_x509_svid(WEB, 600)
    assert first.serial != second.serial
    assert first.key_pkcs8_der != second.key_pkcs8_der


def test_py_spiffe_accepts_the_svid_and_the_bundle(ca: CertificateAuthority) -> None:
    svid = ca.issue_x509_svid(WEB, 600)
    parsed = SpiffeX509Svid.parse_raw(b"".join(svid.cert_chain), svid.key_pkcs8_der)
    assert str(parsed.spiffe_id) == WEB
    bundle = X509Bundle.parse_raw(TrustDomain("example.org"), ca.bundle_der)
    assert [c.public_bytes(serialization.Encoding.DER) for c in bundle.x509_authorities] == [
        ca.root_der
    ]


def test_rsa_svids_pass_the_same_checks(ca: CertificateAuthority) -> None:
    svid = ca.issue_x509_svid(WEB, 600, key_type="rsa-2048")
    key = serialization.load_der_private_key(svid.key_pkcs8_der, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048
    parsed = SpiffeX509Svid.parse_raw(b"".join(svid.cert_chain), svid.key_pkcs8_der)
    assert str(parsed.spiffe_id) == WEB
    _verify_chain(ca.bundle_der, svid)


def test_intermediate_ca_chains_leaf_to_the_root() -> None:
    ca = CertificateAuthority("example.org", intermediate=True)
    svid = ca.issue_x509_svid(WEB, 600)
    leaf, intermediate = _certs(svid)
    assert svid.cert_chain[1] == ca.intermediate_der
    assert ca.bundle_der == ca.root_der  # the bundle holds the root only
    constraints = _ext(intermediate, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert _ext(intermediate, x509.KeyUsage).value.key_cert_sign
    assert _uris(intermediate) == ["spiffe://example.org"]
    intermediate.verify_directly_issued_by(ca.root_certificate)
    leaf.verify_directly_issued_by(intermediate)
    _verify_chain(ca.bundle_der, svid)
    parsed = SpiffeX509Svid.parse_raw(b"".join(svid.cert_chain), svid.key_pkcs8_der)
    assert len(parsed.cert_chain) == 2


def test_openssl_verifies_the_chain_against_the_bundle(tmp_path: Path) -> None:
    ca = CertificateAuthority("example.org", intermediate=True)
    svid = ca.issue_x509_svid(WEB, 600)
    pem = [
        x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM)
        for d in svid.cert_chain
    ]
    (tmp_path / "leaf.pem").write_bytes(pem[0])
    (tmp_path / "chain.pem").write_bytes(pem[1])
    (tmp_path / "root.pem").write_bytes(
        ca.root_certificate.public_bytes(serialization.Encoding.PEM)
    )
    result = subprocess.run(
        ["openssl", "verify", "-purpose", "sslclient", "-CAfile", "root.pem",
         "-untrusted", "chain.pem", "leaf.pem"],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    other = CertificateAuthority("example.org")
    (tmp_path / "other.pem").write_bytes(
        other.root_certificate.public_bytes(serialization.Encoding.PEM)
    )
    refused = subprocess.run(
        ["openssl", "verify", "-CAfile", "other.pem", "-untrusted", "chain.pem", "leaf.pem"],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert refused.returncode != 0


def _tls_context(
    tmp_path: Path, name: str, svid: X509Svid, bundle: bytes, server: bool
) -> ssl.SSLContext:
    certs = _certs(svid)
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    key = serialization.load_der_private_key(svid.key_pkcs8_der, None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / f"{name}.pem").write_bytes(chain)
    (tmp_path / f"{name}.key").write_bytes(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(tmp_path / f"{name}.pem", tmp_path / f"{name}.key")
    roots = parse_der_certificates(bundle)
    context.load_verify_locations(
        cadata="".join(r.public_bytes(serialization.Encoding.PEM).decode() for r in roots)
    )
    return context


def test_two_svids_complete_a_mutual_tls_handshake(tmp_path: Path) -> None:
    ca = CertificateAuthority("example.org", intermediate=True)
    server_svid = ca.issue_x509_svid("spiffe://example.org/ns/db/sa/postgres", 600)
    client_svid = ca.issue_x509_svid(WEB, 600, key_type="rsa-2048")
    server_ctx = _tls_context(tmp_path, "server", server_svid, ca.bundle_der, server=True)
    client_ctx = _tls_context(tmp_path, "client", client_svid, ca.bundle_der, server=False)
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    done = {"server": False, "client": False}
    for _ in range(20):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values())
    peer = client.getpeercert(binary_form=True)
    assert peer is not None
    assert _uris(x509.load_der_x509_certificate(peer)) == [server_svid.spiffe_id]
    seen_by_server = server.getpeercert(binary_form=True)
    assert seen_by_server is not None
    assert _uris(x509.load_der_x509_certificate(seen_by_server)) == [WEB]


def test_svid_lifetime_never_outlives_the_ca() -> None:
    ca = CertificateAuthority("example.org", ttl=120)
    svid = ca.issue_x509_svid(WEB, ttl=3600)
    assert svid.expires_at <= ca.not_after
    assert svid.expires_at - svid.issued_at <= 120


def test_certificates_and_tokens_are_dated_by_the_cas_clock(tmp_path: Path) -> None:
    """A fake wall clock dates everything the CA issues (whole seconds, as certificates
    hold them), so fast tests can let SVIDs expire without waiting."""
    clock = [2_000_000_000.7]
    ca = CertificateAuthority("example.org", now=lambda: clock[0])
    assert ca.root_certificate.not_valid_before_utc.timestamp() == 2_000_000_000 - BACKDATE
    clock[0] += 500
    svid = ca.issue_x509_svid(WEB, ttl=600)
    leaf = _certs(svid)[0]
    assert (svid.issued_at, svid.expires_at) == (2_000_000_500, 2_000_001_100)
    assert leaf.not_valid_before_utc.timestamp() == 2_000_000_500 - BACKDATE
    assert leaf.not_valid_after_utc.timestamp() == 2_000_001_100
    token, issued_at, expires_at = ca.sign_jwt(WEB, ["api"], 60)
    claims = json.loads(_b64decode(token.split(".")[1]))
    assert (
        (claims["iat"], claims["exp"]) == (issued_at, expires_at) == (2_000_000_500, 2_000_000_560)
    )
    ca.save(tmp_path / "ca")
    loaded = CertificateAuthority.load(tmp_path / "ca", now=lambda: 2_000_100_000.0)
    assert loaded.issue_x509_svid(WEB, ttl=60).issued_at == 2_000_100_000


@pytest.mark.parametrize(
    ("spiffe_id", "fragment"),
    [
        ("spiffe://partner.example/ns/a/sa/b", "not in trust domain example.org"),
        ("spiffe://example.org", "needs a path"),
        ("https://example.org/x", "must start with"),
        ("spiffe://example.org/a//b", "path segments"),
        ("spiffe://Example.org/a", "is not a trust domain name"),
    ],
)
def test_refuses_ids_it_must_not_sign(
    ca: CertificateAuthority, spiffe_id: str, fragment: str
) -> None:
    with pytest.raises(ValueError, match=fragment):
        ca.issue_x509_svid(spiffe_id, 600)


def test_unknown_key_type_is_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(ValueError, match="rsa-2048"):
        ca.issue_x509_svid(WEB, 600, key_type="dsa")


# JWT ----------------------------------------------------------------------------


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _jwks_key(jwks: bytes, kid: str) -> ec.EllipticCurvePublicKey:
    doc = json.loads(jwks)
    [key] = [k for k in doc["keys"] if k["kid"] == kid]
    assert (key["kty"], key["crv"], key["use"]) == ("EC", "P-256", "jwt-svid")
    numbers = ec.EllipticCurvePublicNumbers(
        int.from_bytes(_b64decode(key["x"]), "big"),
        int.from_bytes(_b64decode(key["y"]), "big"),
        ec.SECP256R1(),
    )
    return numbers.public_key()


def test_jwt_svid_verifies_with_the_jwks_key_and_carries_the_claims(
    ca: CertificateAuthority,
) -> None:
    token, issued_at, expires_at = ca.sign_jwt(WEB, ["vault", "db"], ttl=300)
    header_b64, claims_b64, signature_b64 = token.split(".")
    header = json.loads(_b64decode(header_b64))
    assert header == {"alg": "ES256", "kid": ca.jwt_kid, "typ": "JWT"}
    claims = json.loads(_b64decode(claims_b64))
    assert claims == {"sub": WEB, "aud": ["vault", "db"], "iat": issued_at, "exp": expires_at}
    assert expires_at - issued_at == 300
    assert abs(issued_at - time.time()) < 3600

    signature = _b64decode(signature_b64)
    assert len(signature) == 64  # raw r||s, not DER
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    public = _jwks_key(ca.jwks(), ca.jwt_kid)
    signed = f"{header_b64}.{claims_b64}".encode()
    public.verify(der, signed, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        public.verify(der, signed + b"x", ec.ECDSA(hashes.SHA256()))


def test_py_spiffe_validates_the_jwt_with_the_jwt_bundle(ca: CertificateAuthority) -> None:
    token, _, _ = ca.sign_jwt(WEB, ["vault"], ttl=300)
    bundle = JwtBundle.parse(TrustDomain("example.org"), ca.jwks())
    svid = JwtSvid.parse_and_validate(token, bundle, {"vault"})
    assert str(svid.spiffe_id) == WEB
    other = CertificateAuthority("example.org")
    with pytest.raises(AuthorityNotFoundError):
        JwtSvid.parse_and_validate(token, _jwt_bundle(other.jwks()), {"vault"})
    impostor = jwks([JwtSigner(kid=ca.jwt_kid)])  # same key ID, another key
    with pytest.raises(InvalidTokenError, match=r"(?i)signature"):
        JwtSvid.parse_and_validate(token, _jwt_bundle(impostor), {"vault"})
    with pytest.raises(InvalidTokenError):
        JwtSvid.parse_and_validate(token, bundle, {"someone-else"})


def _jwt_bundle(document: bytes) -> JwtBundle:
    return JwtBundle.parse(TrustDomain("example.org"), document)


def test_jwt_needs_an_audience_and_an_own_trust_domain_id(ca: CertificateAuthority) -> None:
    with pytest.raises(ValueError, match="audience"):
        ca.sign_jwt(WEB, [], ttl=300)
    with pytest.raises(ValueError, match="trust domain"):
        ca.sign_jwt("spiffe://partner.example/x", ["a"], ttl=300)


# Persistence --------------------------------------------------------------------


def test_saved_ca_loads_back_with_the_same_keys(tmp_path: Path) -> None:
    ca = CertificateAuthority("example.org", intermediate=True)
    ca.save(tmp_path / "ca")
    for path in (tmp_path / "ca").iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.name.endswith(".key.pem"):
            assert mode == 0o600, path.name
        assert mode & 0o022 == 0, path.name
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    assert not [p for p in (tmp_path / "ca").iterdir() if p.name.startswith(".")]

    loaded = CertificateAuthority.load(tmp_path / "ca")
    assert loaded.trust_domain == "example.org"
    assert loaded.bundle_der == ca.bundle_der
    assert loaded.intermediate_der == ca.intermediate_der
    assert loaded.jwt_kid == ca.jwt_kid
    assert loaded.jwks() == ca.jwks()
    svid = loaded.issue_x509_svid(WEB, 600)
    _verify_chain(ca.bundle_der, svid)  # the old bundle trusts the loaded CA's SVIDs
    token, _, _ = loaded.sign_jwt(WEB, ["a"], 60)
    JwtSvid.parse_and_validate(token, JwtBundle.parse(TrustDomain("example.org"), ca.jwks()), {"a"})


def test_loading_a_missing_or_damaged_ca_says_which_file(tmp_path: Path) -> None:
    with pytest.raises(CAError, match="trust_domain"):
        CertificateAuthority.load(tmp_path / "nothing")
    CertificateAuthority("example.org").save(tmp_path / "a")
    (tmp_path / "a" / "root.key.pem").write_bytes(b"garbage")
    with pytest.raises(CAError, match=r"root\.key\.pem"):
        CertificateAuthority.load(tmp_path / "a")
    CertificateAuthority("example.org").save(tmp_path / "b")
    CertificateAuthority("example.org").save(tmp_path / "c")
    os.replace(tmp_path / "c" / "root.key.pem", tmp_path / "b" / "root.key.pem")
    with pytest.raises(CAError, match="does not belong"):
        CertificateAuthority.load(tmp_path / "b")
