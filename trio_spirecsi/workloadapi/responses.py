"""Workload API responses from what the volume and the agent hold: pure functions.

Each builder returns None while something the answer needs has not arrived yet (the
SVID's own trust bundle, a JWT bundle): the caller waits and builds again on the next
change. Bundle maps are keyed the way the Workload API specification says, by the trust
domain's SPIFFE ID (``spiffe://example.org``); federated bundles are limited to the trust
domains the pod's SVIDs federate with.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from .._proto.spiffe.workload import workload_pb2 as wl
from ..spire.responses import X509SVID, X509Update


def trust_domain_id(trust_domain: str) -> str:
    """``example.org`` -> ``spiffe://example.org``."""
    return f"spiffe://{trust_domain}"


def current_svids(update: X509Update, *, now: float) -> tuple[X509SVID, ...]:
    """The SVIDs not yet expired at ``now``, in the agent's order."""
    return tuple(s for s in update.svids if s.expires_at > now)


def _domains(
    svids: Iterable[X509SVID], federates_with: Iterable[str]
) -> tuple[list[str], list[str]]:
    own = list(dict.fromkeys(s.trust_domain for s in svids))
    federated = [td for td in dict.fromkeys(federates_with) if td not in own]
    return own, federated


def x509_svid_response(
    svids: Sequence[X509SVID],
    federates_with: Sequence[str],
    x509_bundles: Mapping[str, Sequence[bytes]],
) -> wl.X509SVIDResponse | None:
    """Every SVID with its key and its own trust domain's bundle, plus the federated bundles.

    SVIDs whose trust bundle has not arrived are left out; None when no SVID is left.
    """
    response = wl.X509SVIDResponse()
    for svid in svids:
        bundle = x509_bundles.get(svid.trust_domain)
        if not bundle:
            continue
        response.svids.append(
            wl.X509SVID(
                spiffe_id=svid.spiffe_id,
                x509_svid=b"".join(svid.cert_chain),
                x509_svid_key=svid.key_pkcs8_der,
                bundle=b"".join(bundle),
                hint=svid.hint,
            )
        )
    if not response.svids:
        return None
    _own, federated = _domains(svids, federates_with)
    for td in federated:
        if x509_bundles.get(td):
            response.federated_bundles[trust_domain_id(td)] = b"".join(x509_bundles[td])
    return response


def x509_bundles_response(
    svids: Sequence[X509SVID],
    federates_with: Sequence[str],
    x509_bundles: Mapping[str, Sequence[bytes]],
) -> wl.X509BundlesResponse | None:
    """The bundles of the SVIDs' own trust domains and of the federated ones the agent has;
    None until every own trust domain's bundle has arrived."""
    own, federated = _domains(svids, federates_with)
    if not own or not all(x509_bundles.get(td) for td in own):
        return None
    response = wl.X509BundlesResponse()
    for td in own + federated:
        if x509_bundles.get(td):
            response.bundles[trust_domain_id(td)] = b"".join(x509_bundles[td])
    return response


def jwt_bundles_for(
    svids: Sequence[X509SVID], federates_with: Sequence[str], jwt_bundles: Mapping[str, bytes]
) -> dict[str, bytes] | None:
    """Trust domain name -> JWKS of the trust domains the pod may verify tokens of (its own
    and the federated ones); None until every own trust domain's JWKS has arrived."""
    own, federated = _domains(svids, federates_with)
    if not own or not all(td in jwt_bundles for td in own):
        return None
    return {td: jwt_bundles[td] for td in own + federated if td in jwt_bundles}


def jwt_bundles_response(bundles: Mapping[str, bytes]) -> wl.JWTBundlesResponse:
    return wl.JWTBundlesResponse(
        bundles={trust_domain_id(td): jwks for td, jwks in bundles.items()}
    )
