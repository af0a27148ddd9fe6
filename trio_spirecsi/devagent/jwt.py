"""JWT-SVID signing (ES256) and the JWKS a SPIRE agent hands out for it.

Tokens are compact JWS (RFC 7515) with the ECDSA signature as raw r||s
(RFC 7518 section 3.4), which is what JWT libraries, py-spiffe and Go's
go-jose expect; the JWKS has the shape SPIRE's bundle marshalling produces
for the Delegated Identity API (standard JWKS, only ``use: jwt-svid`` keys).
"""

from __future__ import annotations

import base64
import json
import secrets
import string
import time
from collections.abc import Sequence
from typing import NamedTuple

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

_KID_ALPHABET = string.ascii_letters + string.digits


def b64url(data: bytes) -> str:
    """Base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


class SignedJwt(NamedTuple):
    token: str
    issued_at: int
    expires_at: int


class JwtSigner:
    """One ES256 signing key and its key ID, as one trust domain's JWT authority."""

    def __init__(
        self, key: ec.EllipticCurvePrivateKey | None = None, kid: str | None = None
    ) -> None:
        self._key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
        if not isinstance(self._key.curve, ec.SECP256R1):
            raise ValueError("a JWT signing key must be on P-256 for ES256")
        self.kid = (
            kid if kid is not None else "".join(secrets.choice(_KID_ALPHABET) for _ in range(32))
        )

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def private_key_pem(self) -> bytes:
        """PKCS#8 PEM of the signing key (for saving a CA to disk; never log it)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(
        self, subject: str, audiences: Sequence[str], ttl: int, *, now: float | None = None
    ) -> SignedJwt:
        """A JWT-SVID for ``subject`` valid ``ttl`` seconds from ``now`` (default: the clock)."""
        if not audiences:
            raise ValueError("a JWT-SVID needs at least one audience")
        if ttl <= 0:
            raise ValueError(f"JWT-SVID ttl must be positive, got {ttl}")
        issued_at = int(time.time() if now is None else now)
        expires_at = issued_at + ttl
        header = {"alg": "ES256", "kid": self.kid, "typ": "JWT"}
        claims = {"aud": list(audiences), "exp": expires_at, "iat": issued_at, "sub": subject}
        signing_input = f"{b64url(_json(header))}.{b64url(_json(claims))}".encode("ascii")
        r, s = decode_dss_signature(self._key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return SignedJwt(
            f"{signing_input.decode('ascii')}.{b64url(signature)}", issued_at, expires_at
        )

    def jwk(self) -> dict[str, str]:
        numbers = self.public_key.public_numbers()
        return {
            "kty": "EC",
            "crv": "P-256",
            "x": b64url(numbers.x.to_bytes(32, "big")),
            "y": b64url(numbers.y.to_bytes(32, "big")),
            "kid": self.kid,
            "use": "jwt-svid",
        }


def jwks(signers: Sequence[JwtSigner]) -> bytes:
    """The JWKS document (JSON bytes) listing every signer's public key."""
    return _json({"keys": [s.jwk() for s in signers]})
