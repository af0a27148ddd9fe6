"""JWT-SVID validation against JWT bundles (JWKS): pure functions.

The checks follow what a SPIRE agent does for ValidateJWTSVID: a compact JWS whose header
names a supported algorithm and a key ID; a ``sub`` claim that is a SPIFFE ID; the key with
that ID in the JWKS of the subject's trust domain verifies the signature; ``exp`` present and
not passed (``nbf``, when present, reached); the expected audience in ``aud``. Every failure
is a :class:`JwtSvidError` whose message says what is wrong and never contains the token.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ..spiffe import spiffe_id_problem

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_CURVES: Mapping[str, tuple[type[ec.EllipticCurve], int]] = {
    "P-256": (ec.SECP256R1, 32),
    "P-384": (ec.SECP384R1, 48),
    "P-521": (ec.SECP521R1, 66),
}


@dataclass(frozen=True)
class _Algorithm:
    family: Literal["EC", "RSA", "PSS"]
    hash: type[hashes.HashAlgorithm]
    curve: str = ""


ALGORITHMS: Mapping[str, _Algorithm] = MappingProxyType(
    {
        "ES256": _Algorithm("EC", hashes.SHA256, "P-256"),
        "ES384": _Algorithm("EC", hashes.SHA384, "P-384"),
        "ES512": _Algorithm("EC", hashes.SHA512, "P-521"),
        "RS256": _Algorithm("RSA", hashes.SHA256),
        "RS384": _Algorithm("RSA", hashes.SHA384),
        "RS512": _Algorithm("RSA", hashes.SHA512),
        "PS256": _Algorithm("PSS", hashes.SHA256),
        "PS384": _Algorithm("PSS", hashes.SHA384),
        "PS512": _Algorithm("PSS", hashes.SHA512),
    }
)
"""The JWS algorithms a JWT-SVID may be signed with (those SPIRE accepts)."""

_PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class JwtSvidError(Exception):
    """The token is not a valid JWT-SVID for the audience; ``message`` says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class ValidJwtSvid:
    """A JWT-SVID whose signature, expiry and audience have been checked."""

    spiffe_id: str
    claims: Mapping[str, Any]
    """Every claim of the token, as decoded from its JSON payload."""


def validate_jwt_svid(
    token: str, audience: str, jwt_bundles: Mapping[str, bytes], *, now: float
) -> ValidJwtSvid:
    """Check ``token`` against ``jwt_bundles`` (trust domain name -> JWKS JSON) at ``now``.

    Only the bundles given are trusted: the caller decides which trust domains a workload
    may validate tokens of. Raises :class:`JwtSvidError` for any invalid token.
    """
    if not audience:
        raise JwtSvidError("audience must be specified")
    parts = token.split(".")
    if len(parts) != 3:
        raise JwtSvidError("the token is not a compact JWS (three dot-separated parts)")
    header = _json_object(parts[0], "header")
    claims = _json_object(parts[1], "payload")
    signature = _b64url(parts[2], "signature")

    alg = header.get("alg")
    if alg is None:
        raise JwtSvidError("token header missing alg")
    if not isinstance(alg, str) or alg not in ALGORITHMS:
        raise JwtSvidError(
            f"unsupported token signature algorithm {str(alg)[:20]!r}: use one of "
            + ", ".join(ALGORITHMS)
        )
    typ = header.get("typ")
    if typ is not None and typ not in ("JWT", "JOSE"):
        raise JwtSvidError(f"token header typ {str(typ)[:20]!r} is not JWT or JOSE")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise JwtSvidError("token header missing key id")

    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise JwtSvidError("token has no subject claim")
    problem = spiffe_id_problem(subject)
    if problem is not None:
        raise JwtSvidError(f"token has an invalid subject claim: {problem}")
    trust_domain = subject[len("spiffe://") :].partition("/")[0]
    jwks = jwt_bundles.get(trust_domain)
    if jwks is None:
        raise JwtSvidError(f"no keys found for trust domain {trust_domain!r}")
    key = _find_key(jwks, kid, trust_domain)

    signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
    _verify(ALGORITHMS[alg], alg, key, kid, signing_input, signature)

    expires_at = _time_claim(claims, "exp")
    if expires_at is None:
        raise JwtSvidError("token missing exp claim")
    if now >= expires_at:
        raise JwtSvidError("token has expired")
    not_before = _time_claim(claims, "nbf")
    if not_before is not None and now < not_before:
        raise JwtSvidError("token is not valid yet")
    audiences = _audiences(claims.get("aud"))
    if audience not in audiences:
        raise JwtSvidError(
            f"expected audience in {sorted(audiences)!r} (audience={audience!r})"[:500]
        )
    return ValidJwtSvid(subject, MappingProxyType(claims))


def _b64url(part: str, what: str) -> bytes:
    if not _B64URL.fullmatch(part) or len(part) % 4 == 1:
        raise JwtSvidError(f"the token {what} is not base64url")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise JwtSvidError(f"the token {what} is not base64url") from None


def _json_object(part: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64url(part, what))
    except (ValueError, RecursionError):
        raise JwtSvidError(f"the token {what} is not JSON") from None
    if not isinstance(value, dict):
        raise JwtSvidError(f"the token {what} is not a JSON object")
    return value


def _time_claim(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise JwtSvidError(f"token claim {name} is not a number of seconds")
    return float(value)


def _audiences(value: object) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, list) and all(isinstance(a, str) for a in value):
        return set(value)
    raise JwtSvidError("token aud claim is missing or not a string or a list of strings")


def _find_key(jwks: bytes, kid: str, trust_domain: str) -> dict[str, Any]:
    try:
        document = json.loads(jwks)
    except (ValueError, RecursionError):
        raise JwtSvidError(f"the JWT bundle of {trust_domain!r} is not JSON") from None
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise JwtSvidError(f"the JWT bundle of {trust_domain!r} is not a JWKS document")
    for jwk in keys:
        if isinstance(jwk, dict) and jwk.get("kid") == kid:
            return jwk
    raise JwtSvidError(f"key id {kid[:100]!r} not found in the JWT bundle of {trust_domain!r}")


def _public_key(jwk: Mapping[str, Any], kid: str) -> _PublicKey:
    def number(name: str) -> int:
        value = jwk.get(name)
        if not isinstance(value, str) or not value:
            raise JwtSvidError(f"key {kid[:100]!r} has no {name!r} parameter")
        return int.from_bytes(_b64url(value, f"key parameter {name!r}"), "big")

    try:
        if jwk.get("kty") == "EC":
            curve = _CURVES.get(jwk.get("crv"))  # type: ignore[arg-type]
            if curve is None:
                raise JwtSvidError(f"key {kid[:100]!r} is on an unsupported curve")
            return ec.EllipticCurvePublicNumbers(number("x"), number("y"), curve[0]()).public_key()
        if jwk.get("kty") == "RSA":
            return rsa.RSAPublicNumbers(number("e"), number("n")).public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise JwtSvidError(f"key {kid[:100]!r} is not a valid public key") from None
    raise JwtSvidError(f"key {kid[:100]!r} has an unsupported key type")


def _verify(
    algorithm: _Algorithm,
    name: str,
    jwk: Mapping[str, Any],
    kid: str,
    signing_input: bytes,
    signature: bytes,
) -> None:
    key = _public_key(jwk, kid)
    mismatch = JwtSvidError(f"key {kid[:100]!r} cannot verify {name} signatures")
    try:
        if algorithm.family == "EC":
            if not isinstance(key, ec.EllipticCurvePublicKey) or jwk.get("crv") != algorithm.curve:
                raise mismatch
            size = _CURVES[algorithm.curve][1]
            if len(signature) != 2 * size:
                raise JwtSvidError("token signature is invalid")
            r = int.from_bytes(signature[:size], "big")
            s = int.from_bytes(signature[size:], "big")
            key.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(algorithm.hash()))
        else:
            if not isinstance(key, rsa.RSAPublicKey):
                raise mismatch
            digest = algorithm.hash()
            scheme: padding.AsymmetricPadding = (
                padding.PKCS1v15()
                if algorithm.family == "RSA"
                else padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
            )
            key.verify(signature, signing_input, scheme, digest)
    except InvalidSignature:
        raise JwtSvidError("token signature is invalid") from None
