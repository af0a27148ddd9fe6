"""Envoy's Secret Discovery Service (SDS v3) for a volume's identity, the pure core.

:mod:`.resources` answers a ``DiscoveryRequest`` from an :class:`SdsSnapshot` as the SPIRE
agent does (names, validation-context form, encodings, errors); :mod:`.stream` keeps one
StreamSecrets stream's versions, nonces, node and parked requests. Neither does I/O: the gRPC
handler feeds them requests and snapshots and sends what they return.
"""

from .resources import (
    DISABLE_SPIFFE_KEY,
    SECRET_TYPE_URL,
    SPIFFE_VALIDATOR_NAME,
    SPIFFE_VALIDATOR_TYPE_URL,
    SdsError,
    SdsSettings,
    SdsSnapshot,
    build_response,
    fetch_response,
    snapshot_of,
    uses_spiffe_validator,
)
from .stream import (
    DELTA_SECRETS_MESSAGE,
    NONCE_WINDOW,
    RequestKind,
    RequestResult,
    SdsStream,
    random_nonce,
)

__all__ = [
    "DELTA_SECRETS_MESSAGE",
    "DISABLE_SPIFFE_KEY",
    "NONCE_WINDOW",
    "SECRET_TYPE_URL",
    "SPIFFE_VALIDATOR_NAME",
    "SPIFFE_VALIDATOR_TYPE_URL",
    "RequestKind",
    "RequestResult",
    "SdsError",
    "SdsSettings",
    "SdsSnapshot",
    "SdsStream",
    "build_response",
    "fetch_response",
    "random_nonce",
    "snapshot_of",
    "uses_spiffe_validator",
]
