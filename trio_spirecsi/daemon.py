"""The driver process: one Trio nursery tree.

    daemon (root nursery)
    ├── agent connection: shared bundle streams over one HTTP/2 connection
    ├── volume registry: one cancel-scoped nursery per volume
    ├── CSI gRPC server on the kubelet's unix socket
    └── metrics + health HTTP endpoint (optional)

Cancelling the daemon stops serving and stops every volume's tasks but leaves
mounts and files in place, so pods keep their identities across a restart;
the next daemon resumes every volume from its metadata.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from . import __version__, log
from .config import Settings
from .csi.identity import IdentityService
from .csi.node import NodeService
from .grpc import Server, open_channel
from .httpserver import parse_addr, serve_http
from .metrics import Metrics
from .spire.agent import AgentClient
from .storage.metadata import MetadataStore
from .storage.mount import LinuxMounter, Mounter
from .volumes.registry import Registry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Daemon:
    """Handles to a running daemon's parts, for tests and benchmarks."""

    settings: Settings
    registry: Registry
    agent: AgentClient
    metrics: Metrics
    node: NodeService
    metrics_port: int | None


async def run(
    settings: Settings,
    *,
    mounter: Mounter | None = None,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled. ``task_status.started`` fires once the CSI socket listens."""
    metrics = Metrics()
    store = MetadataStore(settings.state_dir)
    mounter = mounter or LinuxMounter()
    settings.csi_socket.parent.mkdir(parents=True, exist_ok=True)
    async with open_channel(str(settings.admin_socket)) as channel:
        agent = AgentClient(channel, settings.admin_socket, metrics)
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            registry = Registry(
                store=store,
                mounter=mounter,
                agent=agent,
                metrics=metrics,
                node_id=settings.node_id,
                kubelet_dir=settings.kubelet_dir,
                publish_timeout=settings.publish_timeout,
                selinux_context=settings.selinux_context or None,
            )
            await nursery.start(registry.run)
            node = NodeService(
                registry,
                node_id=settings.node_id,
                kubelet_dir=settings.kubelet_dir,
                metrics=metrics,
            )
            server = Server()
            IdentityService(settings.driver_name).register(server)
            node.register(server)
            await nursery.start(server.serve, str(settings.csi_socket))
            metrics_port = None
            if settings.metrics_addr:
                host, port = parse_addr(settings.metrics_addr)

                def ready() -> tuple[bool, str]:
                    if agent.connected.value:
                        return True, "ok"
                    return False, f"agent unreachable: {agent.last_error}"

                metrics_port = await nursery.start(serve_http, host, port, metrics, ready)
            log.event(
                logger,
                logging.INFO,
                "serving",
                version=__version__,
                driver=settings.driver_name,
                node_id=settings.node_id,
                csi_socket=str(settings.csi_socket),
                admin_socket=str(settings.admin_socket),
                volumes=len(registry),
                metrics_port=metrics_port or "",
            )
            task_status.started(Daemon(settings, registry, agent, metrics, node, metrics_port))
