"""The per-pod socket: one unix socket inside a volume, for that pod only.

The socket lives in the volume's ``data/`` folder, next to the files, so it appears in the
pod's read-only bind mount and nowhere else: whoever can reach it is that pod, and it
answers only with that pod's identity. It serves the SPIFFE Workload API (:mod:`.server`)
and Envoy's Secret Discovery Service (:mod:`.sds`) from the volume's own SVID subscription
and the agent's shared bundle streams.

The server runs inside the volume's cancel scope: unpublishing the volume ends every stream
and removes the socket, and a driver restart serves it again when the volume resumes. The
pod is an untrusted client: the server runs with the untrusted ``ServerLimits``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import trio

from ..grpc import Server, ServerLimits
from ..metrics import Metrics
from ..ratelimit import RateLimit
from ..storage.writer import SELINUX_XATTR
from .sds import SecretDiscovery
from .server import JWT_RATE, WorkloadApi
from .views import AgentView, VolumeView

SOCKET_MODE_WITH_GROUP = 0o660
"""root:<fsGroup>, read-write for the pod's group only."""
SOCKET_MODE_WITHOUT_GROUP = 0o666
"""Without an fsGroup the pod's user is unknown; only this pod's mount reaches the socket."""


def socket_mode(gid: int | None) -> int:
    return SOCKET_MODE_WITHOUT_GROUP if gid is None else SOCKET_MODE_WITH_GROUP


async def serve_volume_socket(
    volume: VolumeView,
    serving: Callable[[], None],
    *,
    agent: AgentView,
    jwt_limit: RateLimit = JWT_RATE,
    limits: ServerLimits | None = None,
    on_error: Callable[[str], None] | None = None,
    metrics: Metrics | None = None,
) -> None:
    """Serve the Workload API and SDS at ``data_dir/<workload-api-socket>`` until cancelled.

    The pod is an untrusted peer: the server runs with ``limits`` (default: the untrusted
    ``ServerLimits()``), and ``on_error(kind)`` hears of every connection or stream it ended
    (``grpc_*`` kinds).

    ``serving()`` is called once the socket accepts connections. A stale socket file (left
    by a driver that was killed) is replaced. A failure to create the socket (e.g. another
    file has its name) is raised: the volume's supervisor shows it, retries with backoff, and
    keeps serving the files meanwhile. Once this has exited every stream has ended and the
    socket file is gone.
    """
    plan = volume.plan
    server = Server(limits, on_error=on_error)
    WorkloadApi(volume, agent, jwt_limit).register(server)
    SecretDiscovery(volume, agent, metrics).register(server)
    agent.want_jwt_bundles()
    await _serve(
        server,
        plan.data_dir,
        plan.spec.workload_api_socket,
        plan.spec.gid,
        plan.selinux_context,
        serving,
    )


async def _serve(
    server: Server,
    folder: Path,
    name: str,
    gid: int | None,
    selinux_context: str | None,
    listening: Callable[[], None],
) -> None:
    folder.mkdir(mode=0o700, exist_ok=True)
    # Bound through a descriptor of the folder: a unix socket path is limited to 107 bytes,
    # and <state dir>/<volume id>/data/<name> may be longer.
    fd = os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        bind_path = f"/proc/self/fd/{fd}/{name}"
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(server.serve, bind_path, mode=socket_mode(gid)))
            if gid is not None:
                os.chown(bind_path, -1, gid)
            if selinux_context is not None:  # as the files: containers may connect
                os.setxattr(
                    bind_path, SELINUX_XATTR, selinux_context.encode(), follow_symlinks=False
                )
            listening()
    finally:
        os.close(fd)
