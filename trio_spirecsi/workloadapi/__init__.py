"""A per-pod SPIFFE Workload API socket inside the volume (attribute ``workload-api``).

:func:`serve_volume_socket` runs in a volume's nursery; the pure parts (responses, JWT-SVID
validation) are in :mod:`.responses` and :mod:`.jwt`.
"""

from .jwt import JwtSvidError, ValidJwtSvid, validate_jwt_svid
from .server import (
    SOCKET_MODE_WITH_GROUP,
    SOCKET_MODE_WITHOUT_GROUP,
    AgentView,
    VolumeView,
    WorkloadApi,
    serve_volume_socket,
)

__all__ = [
    "SOCKET_MODE_WITHOUT_GROUP",
    "SOCKET_MODE_WITH_GROUP",
    "AgentView",
    "JwtSvidError",
    "ValidJwtSvid",
    "VolumeView",
    "WorkloadApi",
    "serve_volume_socket",
    "validate_jwt_svid",
]
