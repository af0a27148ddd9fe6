"""Envoy's Secret Discovery Service (SDS v3) for a volume's identity, the pure core.

:mod:`.resources` answers a ``DiscoveryRequest`` from an :class:`SdsSnapshot` as the SPIRE
agent does (names, validation-context form, encodings, errors). It does no I/O: the gRPC
handler feeds it requests and snapshots and sends what it returns.
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

__all__ = [
    "DISABLE_SPIFFE_KEY",
    "SECRET_TYPE_URL",
    "SPIFFE_VALIDATOR_NAME",
    "SPIFFE_VALIDATOR_TYPE_URL",
    "SdsError",
    "SdsSettings",
    "SdsSnapshot",
    "build_response",
    "fetch_response",
    "snapshot_of",
    "uses_spiffe_validator",
]
