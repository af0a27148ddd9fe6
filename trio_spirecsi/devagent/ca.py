"""A trust domain's certificate authority, shaped like a SPIRE server CA.

Certificates follow the X.509-SVID specification (see shared wire facts): the
root (and optional intermediate) carry the trust domain's SPIFFE ID as URI SAN,
CA=true and keyCertSign+cRLSign; leaves carry exactly one URI SAN, CA=false,
digitalSignature and no signing usages, so py-spiffe, Go's go-spiffe, Envoy and
OpenSSL accept them. The same object holds the trust domain's JWT signing key.

Every validity period is read from one clock, ``now`` (unix seconds, ``time.time`` unless
given), so tests can issue SVIDs whose lifetimes follow a fake wall clock.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..spiffe import (
    normalise_trust_domain,
    trust_domain_id,
    workload_id_parts,
)
from .jwt import JwtSigner, SignedJwt, jwks

KeyType = Literal["ec-p256", "rsa-2048"]
KEY_TYPES: tuple[str, ...] = get_args(KeyType)

DEFAULT_CA_TTL = 365 * 24 * 3600
BACKDATE = 30
"""Seconds a certificate's notBefore lies in the past, for peers whose clocks lag a little."""

_ROOT_FILES = ("root.crt.pem", "root.key.pem")
_INTERMEDIATE_FILES = ("intermediate.crt.pem", "intermediate.key.pem")
_JWT_FILES = ("jwt.key.pem", "jwt.kid")

_SigningKey = ec.EllipticCurvePrivateKey


class CAError(Exception):
    """A CA could not be loaded (missing, unreadable or inconsistent files)."""


@dataclass(frozen=True)
class X509Svid:
    """An issued X.509-SVID. ``cert_chain`` is DER, leaf first; times are unix seconds."""

    spiffe_id: str
    cert_chain: tuple[bytes, ...]
    key_pkcs8_der: bytes = field(repr=False)
    issued_at: int
    expires_at: int
    serial: int


@dataclass(frozen=True)
class _Signer:
    key: _SigningKey
    cert: x509.Certificate


Clock = Callable[[], float]
"""Unix seconds now: ``time.time``, or a fake clock in tests."""


def _utc(clock: Clock) -> datetime.datetime:
    """The clock's current time, whole seconds (as certificates hold it)."""
    return datetime.datetime.fromtimestamp(int(clock()), datetime.UTC)


def _ski(key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key)


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _ca_certificate(
    trust_domain: str,
    label: str,
    key: _SigningKey,
    issuer: _Signer | None,
    not_after: datetime.datetime,
    now: datetime.datetime,
) -> x509.Certificate:
    serial = x509.random_serial_number()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} {label}"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, str(serial)),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(seconds=BACKDATE))
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(ca=True, path_length=None if issuer is None else 0),
            critical=True,
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(_ski(key.public_key()), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(trust_domain_id(trust_domain))]
            ),
            critical=False,
        )
    )
    if issuer is not None:
        builder = builder.add_extension(_aki(issuer.cert), critical=False)
        return builder.sign(issuer.key, hashes.SHA256())
    own = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
    return builder.add_extension(own, critical=False).sign(key, hashes.SHA256())


def _new_leaf_key(key_type: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")


class CertificateAuthority:
    """One trust domain's X.509 CA (root, optionally an intermediate) and JWT key.

    Construct to generate fresh keys; :meth:`load` a saved one. Leaves are signed
    by the intermediate when there is one (their chain is then [leaf,
    intermediate]); the bundle holds the root only. ``now`` is the clock every
    certificate and token is dated by.
    """

    def __init__(
        self,
        trust_domain: str,
        *,
        intermediate: bool = False,
        ttl: int = DEFAULT_CA_TTL,
        now: Clock = time.time,
    ) -> None:
        self.trust_domain = normalise_trust_domain(trust_domain)
        self._clock = now
        issued = _utc(now)
        not_after = issued + datetime.timedelta(seconds=ttl)
        root_key = ec.generate_private_key(ec.SECP256R1())
        self._root = _Signer(
            root_key,
            _ca_certificate(self.trust_domain, "root", root_key, None, not_after, issued),
        )
        self._intermediate: _Signer | None = None
        if intermediate:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _ca_certificate(
                self.trust_domain, "intermediate", key, self._root, not_after, issued
            )
            self._intermediate = _Signer(key, cert)
        self._jwt = JwtSigner()

    # Properties ------------------------------------------------------------

    @property
    def id(self) -> str:
        """The trust domain's SPIFFE ID, e.g. ``spiffe://example.org``."""
        return trust_domain_id(self.trust_domain)

    @property
    def root_certificate(self) -> x509.Certificate:
        return self._root.cert

    @property
    def root_der(self) -> bytes:
        return self._root.cert.public_bytes(serialization.Encoding.DER)

    @property
    def intermediate_der(self) -> bytes | None:
        if self._intermediate is None:
            return None
        return self._intermediate.cert.public_bytes(serialization.Encoding.DER)

    @property
    def bundle_der(self) -> bytes:
        """The trust bundle as concatenated DER: the root certificate."""
        return self.root_der

    @property
    def not_after(self) -> int:
        return int(self._signer.cert.not_valid_after_utc.timestamp())

    @property
    def jwt_kid(self) -> str:
        return self._jwt.kid

    @property
    def jwt_public_key(self) -> ec.EllipticCurvePublicKey:
        return self._jwt.public_key

    @property
    def _signer(self) -> _Signer:
        return self._intermediate or self._root

    # Issuing ---------------------------------------------------------------

    def issue_x509_svid(self, spiffe_id: str, ttl: int, key_type: str = "ec-p256") -> X509Svid:
        """A fresh key and leaf for ``spiffe_id`` (in this trust domain), valid ``ttl`` seconds.

        The lifetime is cut to the CA's own expiry, as SPIRE does.
        """
        trust_domain, _ = workload_id_parts(spiffe_id)
        if trust_domain != self.trust_domain:
            raise ValueError(
                f"{spiffe_id} is not in trust domain {self.trust_domain}: this CA cannot sign it"
            )
        if ttl <= 0:
            raise ValueError(f"SVID ttl must be positive, got {ttl}")
        key = _new_leaf_key(key_type)
        signer = self._signer
        now = _utc(self._clock)
        not_after = min(now + datetime.timedelta(seconds=ttl), signer.cert.not_valid_after_utc)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE"),
                    ]
                )
            )
            .issuer_name(signer.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(seconds=BACKDATE))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(_ski(key.public_key()), critical=False)
            .add_extension(_aki(signer.cert), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                critical=False,
            )
            .sign(signer.key, hashes.SHA256())
        )
        chain = [cert.public_bytes(serialization.Encoding.DER)]
        if self._intermediate is not None:
            chain.append(self._intermediate.cert.public_bytes(serialization.Encoding.DER))
        return X509Svid(
            spiffe_id=spiffe_id,
            cert_chain=tuple(chain),
            key_pkcs8_der=key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            issued_at=int(now.timestamp()),
            expires_at=int(not_after.timestamp()),
            serial=serial,
        )

    def sign_jwt(self, spiffe_id: str, audiences: Sequence[str], ttl: int) -> SignedJwt:
        """A JWT-SVID ``(token, issued_at, expires_at)`` for ``spiffe_id`` in this trust domain."""
        trust_domain, _ = workload_id_parts(spiffe_id)
        if trust_domain != self.trust_domain:
            raise ValueError(f"{spiffe_id} is not in trust domain {self.trust_domain}")
        return self._jwt.sign(spiffe_id, audiences, ttl, now=self._clock())

    def jwks(self) -> bytes:
        """The trust domain's JWT bundle (JWKS JSON)."""
        return jwks([self._jwt])

    # Persistence -----------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the CA to ``directory`` (created 0700); key files are 0600, written atomically."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write(folder / "trust_domain", self.trust_domain.encode() + b"\n", 0o644)
        pairs = [(_ROOT_FILES, self._root)]
        if self._intermediate is not None:
            pairs.append((_INTERMEDIATE_FILES, self._intermediate))
        else:
            for name in _INTERMEDIATE_FILES:
                (folder / name).unlink(missing_ok=True)
        for (cert_name, key_name), signer in pairs:
            _write(folder / cert_name, signer.cert.public_bytes(serialization.Encoding.PEM), 0o644)
            _write(folder / key_name, _key_pem(signer.key), 0o600)
        _write(folder / _JWT_FILES[0], self._jwt.private_key_pem(), 0o600)
        _write(folder / _JWT_FILES[1], self._jwt.kid.encode() + b"\n", 0o644)

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], *, now: Clock = time.time
    ) -> CertificateAuthority:
        """The CA saved in ``directory``; CAError says which file is missing or wrong."""
        folder = Path(directory)
        try:
            trust_domain = normalise_trust_domain(_read(folder / "trust_domain").decode().strip())
        except ValueError as exc:
            raise CAError(f"{folder / 'trust_domain'}: {exc}") from None
        ca = cls.__new__(cls)
        ca.trust_domain = trust_domain
        ca._clock = now
        ca._root = _load_signer(folder, _ROOT_FILES)
        ca._intermediate = None
        if (folder / _INTERMEDIATE_FILES[0]).exists():
            ca._intermediate = _load_signer(folder, _INTERMEDIATE_FILES)
        jwt_key = _load_key(folder / _JWT_FILES[0])
        kid = _read(folder / _JWT_FILES[1]).decode().strip()
        if not kid:
            raise CAError(f"{folder / _JWT_FILES[1]}: empty key ID")
        try:
            ca._jwt = JwtSigner(jwt_key, kid)
        except ValueError as exc:
            raise CAError(f"{folder / _JWT_FILES[0]}: {exc}") from None
        for signer in (ca._root, ca._intermediate):
            if signer is None:
                continue
            san = signer.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            if san.value.get_values_for_type(x509.UniformResourceIdentifier) != [ca.id]:
                raise CAError(f"{folder}: a CA certificate is not for {ca.id}")
        return ca


def _key_pem(key: _SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CAError(f"cannot read {path}: {exc.strerror or exc}") from None


def _load_key(path: Path) -> _SigningKey:
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except ValueError:
        raise CAError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError(f"{path}: expected an EC private key")
    return key


def _load_signer(folder: Path, names: tuple[str, str]) -> _Signer:
    cert_path, key_path = folder / names[0], folder / names[1]
    try:
        cert = x509.load_pem_x509_certificate(_read(cert_path))
    except ValueError:
        raise CAError(f"{cert_path}: not a PEM certificate") from None
    key = _load_key(key_path)
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(
        serialization.Encoding.DER, public
    ) != cert.public_key().public_bytes(serialization.Encoding.DER, public):
        raise CAError(f"{key_path} does not belong to {cert_path}")
    return _Signer(key, cert)
