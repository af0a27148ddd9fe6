"""JWT-SVID validation for ValidateJWTSVID, checked against tokens signed by PyJWT (an
implementation this project did not write) and by the dev agent."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from trio_spirecsi.devagent.ca import CertificateAuthority
from trio_spirecsi.workloadapi import JwtSvidError, validate_jwt_svid

NOW = 1_900_000_000.0
WEB = "spiffe://example.org/ns/shop/sa/web"

_EC: dict[str, Callable[[], ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}
_KEYS: dict[str, Any] = {}


def signing_key(alg: str) -> Any:
    """One key per algorithm family and curve, made once (RSA key generation is slow)."""
    name = alg if alg in _EC else "RSA"
    if name not in _KEYS:
        _KEYS[name] = (
            ec.generate_private_key(_EC[alg]())
            if alg in _EC
            else rsa.generate_private_key(public_exponent=65537, key_size=2048)
        )
    return _KEYS[name]


def jwks(*entries: tuple[str, Any]) -> bytes:
    keys = []
    for kid, key in entries:
        public = key.public_key()
        algorithm = ECAlgorithm if isinstance(public, ec.EllipticCurvePublicKey) else RSAAlgorithm
        jwk = json.loads(algorithm.to_jwk(public))
        keys.append({**jwk, "kid": kid, "use": "jwt-svid"})
    return json.dumps({"keys": keys}).encode()


def token(alg: str = "ES256", kid: str = "k1", key: Any = None, **claims: Any) -> str:
    payload: dict[str, Any] = {"sub": WEB, "aud": ["orders"], "exp": NOW + 300, "iat": NOW}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return pyjwt.encode(
        payload, key or signing_key(alg), algorithm=alg, headers={"kid": kid, "typ": "JWT"}
    )


def bundles(alg: str = "ES256", kid: str = "k1") -> Mapping[str, bytes]:
    return {"example.org": jwks((kid, signing_key(alg)))}


def refused(
    tok: str, audience: str = "orders", jwt_bundles: Mapping[str, bytes] | None = None
) -> str:
    with pytest.raises(JwtSvidError) as info:
        validate_jwt_svid(tok, audience, jwt_bundles or bundles(), now=NOW)
    for secret in (tok, tok.rsplit(".", 1)[-1]):  # messages never echo a token
        assert len(secret) < 16 or secret not in info.value.message
    return info.value.message


@pytest.mark.parametrize(
    "alg", ["ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
)
def test_tokens_of_every_spire_algorithm_validate(alg: str) -> None:
    valid = validate_jwt_svid(token(alg), "orders", bundles(alg), now=NOW)
    assert valid.spiffe_id == WEB
    assert valid.claims["aud"] == ["orders"]
    assert valid.claims["exp"] == NOW + 300


def test_dev_agent_tokens_validate_with_its_jwks() -> None:
    ca = CertificateAuthority("example.org")
    signed = ca.sign_jwt(WEB, ["orders", "billing"], 300)
    valid = validate_jwt_svid(signed.token, "billing", {"example.org": ca.jwks()}, now=time.time())
    assert valid.spiffe_id == WEB
    assert valid.claims["exp"] == signed.expires_at


def test_audience_must_be_in_the_token() -> None:
    assert "audience" in refused(token(), audience="inventory")
    assert validate_jwt_svid(token(aud="orders"), "orders", bundles(), now=NOW).spiffe_id == WEB
    assert "audience" in refused(token(aud="billing"))
    assert "aud claim" in refused(token(aud=None))
    assert refused(token(), audience="") == "audience must be specified"


def test_expiry_and_not_before_are_enforced() -> None:
    assert refused(token(exp=NOW)) == "token has expired"
    assert refused(token(exp=NOW - 1)) == "token has expired"
    assert refused(token(exp=None)) == "token missing exp claim"
    assert refused(token(nbf=NOW + 10)) == "token is not valid yet"
    assert validate_jwt_svid(token(nbf=NOW), "orders", bundles(), now=NOW).spiffe_id == WEB


def test_the_key_is_found_by_kid_in_the_subjects_trust_domain() -> None:
    assert "not found" in refused(token(kid="other"))
    partner = token(sub="spiffe://partner.org/web")
    assert refused(partner) == "no keys found for trust domain 'partner.org'"
    both = {**bundles(), "partner.org": jwks(("k1", signing_key("ES256")))}
    assert validate_jwt_svid(partner, "orders", both, now=NOW).spiffe_id == (
        "spiffe://partner.org/web"
    )
    # A key with the right kid but another secret: the signature does not verify.
    impostor = ec.generate_private_key(ec.SECP256R1())
    assert refused(token(key=impostor)) == "token signature is invalid"


def test_algorithm_and_key_must_agree() -> None:
    rsa_key_bundle = {"example.org": jwks(("k1", signing_key("RS256")))}
    assert "cannot verify ES256" in refused(token("ES256"), jwt_bundles=rsa_key_bundle)
    assert "cannot verify RS256" in refused(token("RS256"))
    p384 = {"example.org": jwks(("k1", signing_key("ES384")))}
    assert "cannot verify ES256" in refused(token("ES256"), jwt_bundles=p384)


def test_unsigned_and_symmetric_tokens_are_refused() -> None:
    def part(doc: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    unsigned = part({"alg": "none", "kid": "k1"}) + "." + part({"sub": WEB, "aud": "orders"}) + "."
    assert "unsupported token signature algorithm" in refused(unsigned)
    hmac = pyjwt.encode(
        {"sub": WEB, "aud": "orders", "exp": NOW + 9},
        "a shared secret of at least 32 bytes!!",
        algorithm="HS256",
        headers={"kid": "k1"},
    )
    assert "unsupported token signature algorithm" in refused(hmac)


def test_header_and_subject_are_checked() -> None:
    no_kid = pyjwt.encode(
        {"sub": WEB, "aud": "orders", "exp": NOW + 9}, signing_key("ES256"), "ES256"
    )
    assert refused(no_kid) == "token header missing key id"
    assert "subject" in refused(token(sub="https://example.org/web"))
    assert refused(token(sub=None)) == "token has no subject claim"
    odd_typ = pyjwt.encode(
        {"sub": WEB, "aud": "orders", "exp": NOW + 9},
        signing_key("ES256"),
        "ES256",
        headers={"kid": "k1", "typ": "secevent+jwt"},
    )
    assert "typ" in refused(odd_typ)


@pytest.mark.parametrize(
    "malformed",
    ["", "abc", "a.b", "a.b.c.d", "!!.e30.AA", "e30.e30.AA", "W10.e30.AA", "bm90IGpzb24.e30.AA"],
)
def test_malformed_tokens_are_refused(malformed: str) -> None:
    assert refused(malformed).startswith(("the token", "token header missing"))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_change_to_header_or_payload_is_refused(data: st.DataObject) -> None:
    original = token()
    signed_part = original.rindex(".")
    at = data.draw(st.integers(0, signed_part - 1))
    replacement = data.draw(
        st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.").filter(
            lambda c: c != original[at]
        )
    )
    changed = original[:at] + replacement + original[at + 1 :]
    with pytest.raises(JwtSvidError):
        validate_jwt_svid(changed, "orders", bundles(), now=NOW)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_is_refused_with_a_message(text: str) -> None:
    with pytest.raises(JwtSvidError) as info:
        validate_jwt_svid(text, "orders", bundles(), now=NOW)
    assert info.value.message
