"""The driver process: one Trio nursery tree.

    daemon (root nursery)
    ├── agent connection: shared bundle streams over one HTTP/2 connection
    ├── volume registry: one cancel-scoped nursery per volume
    ├── CSI gRPC server on the kubelet's unix socket
    ├── metrics + health HTTP endpoint (optional)
    └── heap policy: one timer that freezes the heap (see :mod:`trio_spirecsi.heap`)

Cancelling the daemon stops serving and stops every volume's tasks but leaves
mounts and files in place, so pods keep their identities across a restart;
the next daemon resumes every volume from its metadata.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from . import __version__, log
from .config import Settings
from .csi.identity import IdentityService
from .csi.node import NodeService
from .grpc import ClientLimits, Server, ServerLimits, open_channel
from .heap import HeapKeeper
from .httpserver import open_listeners, parse_addr, serve_http
from .metrics import Metrics
from .spire.agent import AgentClient
from .storage.metadata import MetadataStore
from .storage.mount import LinuxMounter, Mounter
from .volumes.registry import Registry
from .workloadapi import serve_volume_socket

logger = logging.getLogger(__name__)


class StartupError(Exception):
    """The driver cannot start with these settings (a port in use, a folder it cannot
    create...). The message is one line naming the flag and its value and saying what to
    do; it is raised before the driver contacts the agent or touches any volume."""


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
    """Serve until cancelled. ``task_status.started`` fires once the CSI socket listens.

    Binds the metrics address first, then checks the state folder and the CSI socket's
    folder: when one of them cannot be used it raises StartupError before creating anything
    else, contacting the agent or touching any volume.
    """
    metrics = Metrics()
    listeners = await _bind_metrics(settings.metrics_addr)
    try:
        store = _open_store(settings)
        await _check_csi_socket(settings.csi_socket)
        await _serve(settings, metrics, store, mounter or LinuxMounter(), listeners, task_status)
    finally:
        for listener in listeners or ():
            await trio.aclose_forcefully(listener)


async def _serve(
    settings: Settings,
    metrics: Metrics,
    store: MetadataStore,
    mounter: Mounter,
    listeners: list[trio.SocketListener] | None,
    task_status: trio.TaskStatus[Daemon],
) -> None:
    def count_error(kind: str) -> None:
        metrics.errors_total.labels(kind=kind).inc()

    heap = HeapKeeper(settings.heap)
    server = Server(ServerLimits.trusted(), on_error=count_error)
    # While the kubelet waits for a call (a publish above all), the agent connection hands
    # its updates (a rotation) over a few at a time: the call's steps wait less.
    async with open_channel(
        str(settings.admin_socket),
        limits=ClientLimits.trusted(),
        on_error=count_error,
        busy=lambda: server.active_streams > 0,
    ) as channel:
        agent = AgentClient(channel, settings.admin_socket, metrics)
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            nursery.start_soon(heap.run)
            registry = Registry(
                store=store,
                mounter=mounter,
                agent=agent,
                metrics=metrics,
                node_id=settings.node_id,
                kubelet_dir=settings.kubelet_dir,
                publish_timeout=settings.publish_timeout,
                selinux_context=settings.selinux_context or None,
                socket_server=functools.partial(
                    serve_volume_socket,
                    agent=agent,
                    limits=settings.pod_socket,
                    jwt_limit=settings.pod_socket_jwt,
                    on_error=count_error,
                    metrics=metrics,
                ),
                after_rewrite=heap.rewritten,
            )
            await nursery.start(registry.run)
            node = NodeService(
                registry,
                node_id=settings.node_id,
                kubelet_dir=settings.kubelet_dir,
                metrics=metrics,
            )
            IdentityService(settings.driver_name).register(server)
            node.register(server)
            await nursery.start(server.serve, str(settings.csi_socket))
            metrics_port = None
            if listeners is not None:
                host, port = parse_addr(settings.metrics_addr)

                def ready() -> tuple[bool, str]:
                    status = agent.status.value
                    if status.ready:
                        return True, "ok"
                    return False, f"agent {status.access.value}: {status.message}"

                metrics_port = await nursery.start(
                    _serve_http, host, port, metrics, ready, listeners
                )
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


async def _serve_http(
    host: str,
    port: int,
    metrics: Metrics,
    ready: Callable[[], tuple[bool, str]],
    listeners: list[trio.SocketListener],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve_http(host, port, metrics, ready, listeners=listeners, task_status=task_status)


def _reason(exc: OSError) -> str:
    """``/path: permission denied``: what failed, where."""
    if isinstance(exc.__cause__, OSError):  # a StorageError wrapping the system's error
        exc = exc.__cause__
    reason = (exc.strerror or str(exc)).lower()
    return f"{exc.filename}: {reason}" if exc.filename else reason


def _open_store(settings: Settings) -> MetadataStore:
    try:
        return MetadataStore(settings.state_dir, keep_corrupt=settings.keep_set_aside)
    except OSError as exc:
        raise StartupError(
            f"--state-dir {str(settings.state_dir)!r}: cannot create or use it "
            f"({_reason(exc)}); give a writable folder on tmpfs, e.g. /run/trio-spirecsi"
        ) from None


async def _check_csi_socket(path: Path) -> None:
    """The socket's folder exists (created if missing) and no other server listens there."""
    flag = f"--csi-endpoint {'unix://' + str(path)!r}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StartupError(
            f"{flag}: cannot create its folder ({_reason(exc)}); mount a writable folder there"
        ) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(
            f"{flag}: {path} exists and is not a socket; remove it or choose another path"
        )
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with probe:
        try:
            with trio.fail_after(2):
                await probe.connect(str(path))
        except (OSError, trio.TooSlowError) as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return  # a socket left behind by a crash: the server replaces it
    raise StartupError(
        f"{flag}: another process already listens on {path}; stop it (is another driver "
        "running on this node?) or choose another path"
    )


async def _bind_metrics(addr: str) -> list[trio.SocketListener] | None:
    if not addr:
        return None
    host, port = parse_addr(addr)
    try:
        return await open_listeners(host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            fix = "stop the other process or choose another port"
        elif exc.errno == errno.EADDRNOTAVAIL:
            fix = "this machine has no such address; use 0.0.0.0 or one of its own"
        else:
            fix = "use host:port with an address of this machine, e.g. 0.0.0.0:9809"
        raise StartupError(
            f"--metrics-addr {addr!r}: cannot listen ({_reason(exc)}); {fix}"
        ) from None
