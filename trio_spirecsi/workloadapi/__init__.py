"""The per-pod socket inside a volume (attribute ``workload-api``): the SPIFFE Workload API
and Envoy's Secret Discovery Service, for that pod only.

:func:`serve_volume_socket` runs in a volume's nursery; the pure parts are in
:mod:`.responses`, :mod:`.jwt` and :mod:`trio_spirecsi.sds`.
"""

from .jwt import JwtSvidError, ValidJwtSvid, validate_jwt_svid
from .sds import SecretDiscovery
from .server import WorkloadApi
from .socket import SOCKET_MODE_WITH_GROUP, SOCKET_MODE_WITHOUT_GROUP, serve_volume_socket
from .views import AgentView, VolumeView

__all__ = [
    "SOCKET_MODE_WITHOUT_GROUP",
    "SOCKET_MODE_WITH_GROUP",
    "AgentView",
    "JwtSvidError",
    "SecretDiscovery",
    "ValidJwtSvid",
    "VolumeView",
    "WorkloadApi",
    "serve_volume_socket",
    "validate_jwt_svid",
]
