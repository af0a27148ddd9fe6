"""The agent's shared bundle streams, and the files rendered with what they sent.

Input: one byte (even: ``SubscribeToX509BundlesResponse``, odd:
``SubscribeToJWTBundlesResponse``), then the serialized message.

Promise: ``bundles_from_response`` / ``jwt_bundles_from_response`` return bundles or raise
:class:`RenderError`. Accepted X.509 bundles rendered with a valid SVID give valid files or a
:class:`RenderError`; accepted JWT bundles are JWKS documents written as sent.
"""

from __future__ import annotations

import json
from functools import cache

from google.protobuf.message import DecodeError

from trio_spirecsi._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as di
from trio_spirecsi._proto.spire.api.types import types_pb2
from trio_spirecsi.devagent.ca import CertificateAuthority
from trio_spirecsi.errors import RenderError
from trio_spirecsi.render import render_files
from trio_spirecsi.spire.responses import (
    X509Update,
    bundles_from_response,
    jwt_bundles_from_response,
    x509_from_response,
)

from ._files import check_files
from .svid_response import SPECS

SPIFFE_ID = "spiffe://example.org/ns/default/sa/web"


@cache
def _update() -> X509Update:
    """A valid SVID of example.org, federating with two other trust domains."""
    svid = CertificateAuthority("example.org").issue_x509_svid(SPIFFE_ID, 3600)
    response = di.SubscribeToX509SVIDsResponse(
        x509_svids=[
            di.X509SVIDWithKey(
                x509_svid=types_pb2.X509SVID(
                    cert_chain=list(svid.cert_chain),
                    id=types_pb2.SPIFFEID(trust_domain="example.org", path="/ns/default/sa/web"),
                    expires_at=svid.expires_at,
                ),
                x509_svid_key=svid.key_pkcs8_der,
            )
        ],
        federates_with=["spiffe://partner.example", "spiffe://other.example"],
    )
    return x509_from_response(response)


def test_one_input(data: bytes) -> str:
    if not data:
        return "undecodable"
    try:
        if data[0] % 2 == 0:
            x509_message = di.SubscribeToX509BundlesResponse.FromString(data[1:])
        else:
            jwt_message = di.SubscribeToJWTBundlesResponse.FromString(data[1:])
    except DecodeError:
        return "undecodable"
    if data[0] % 2 == 1:
        try:
            jwt_bundles = jwt_bundles_from_response(jwt_message)
        except RenderError:
            return "rejected"
        for document in jwt_bundles.values():
            if not isinstance(json.loads(document).get("keys"), list):
                raise AssertionError("accepted a JWT bundle that is not a JWKS document")
        return "accepted"
    try:
        bundles = bundles_from_response(x509_message)
    except RenderError:
        return "rejected"
    outcome = "accepted"
    for spec in SPECS:
        try:
            files = render_files(spec, _update(), bundles)
        except RenderError:
            continue
        check_files(spec, files)
        outcome = "rendered"
    return outcome
