"""A node for fast tests: the real registry, volumes, node service, writer, metadata store and
per-pod socket server, with the agent (:class:`~tests.fakes.FakeAgent`) and the mounts
(:class:`~tests.fakes.MemoryMounter`) in memory. No root, no agent process, no CSI wire.

Run it under :func:`fast_clock` (``MockClock(autojump_threshold=0)`` that waits for worker
threads; tests take the ``fast_clock`` fixture): the driver's clock, backoff and publish
timeout, and the dates on every certificate and token, are then virtual, so an hour of SVID
lifetime, a 30 s backoff or a publish timeout cost nothing.

Kubelet calls go through the same handlers the CSI server runs (validation, the error ->
status mapping) and come back as the status the kubelet would get: None for OK, or the
:class:`RpcError`.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio
import trio.testing
from trio.testing import MockClock

from tests.fakes import Clock, FakeAgent, MemoryMounter
from trio_spirecsi._proto.csi.v1 import csi_pb2 as csi
from trio_spirecsi.csi.client import Pod, publish_request, volume_context
from trio_spirecsi.csi.node import NodeService
from trio_spirecsi.csi.status import handler
from trio_spirecsi.errors import leaves
from trio_spirecsi.grpc import Method, RpcError, ServerContext, StatusCode, methods
from trio_spirecsi.metrics import Metrics
from trio_spirecsi.spire.backoff import AGENT_RETRY, BackoffPolicy
from trio_spirecsi.storage.metadata import MetadataStore, folder_name
from trio_spirecsi.volumes.registry import Registry
from trio_spirecsi.workloadapi import serve_volume_socket

logger = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")

EPOCH = 1_800_000_000.0
"""The fake wall clock at virtual time 0 (2027-01-15): ``now() = EPOCH + trio.current_time()``."""
NODE_ID = "node-a"
PUBLISH_TIMEOUT = 10.0
"""The driver's --publish-timeout here (virtual seconds)."""


def _may_chown_anywhere() -> bool:
    """Whether this process may give its files any group (CAP_CHOWN, as root normally)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & 1)
    return False


FS_GROUP = 4321 if _may_chown_anywhere() else os.getegid()
"""A group the driver can give the volume's files: any one with CAP_CHOWN, our own without."""


def fast_clock() -> MockClock:
    """``MockClock(autojump_threshold=0)`` that never jumps while a worker thread runs.

    Trio binds unix sockets (the per-pod socket) in a worker thread. With a plain autojump
    clock the loop is idle while the thread works, so virtual time races ahead by every
    pending timeout (backoffs, publish timeouts) before the bind returns: a millisecond of
    real work would look like minutes to the driver. MockClock cannot be subclassed, so its
    jump is wrapped on the instance.
    """
    clock = MockClock(autojump_threshold=0)
    jump = clock._autojump

    def autojump() -> None:
        if trio.testing.active_thread_count() == 0:
            jump()

    clock._autojump = autojump  # type: ignore[method-assign]
    return clock


def fake_clock(epoch: float = EPOCH) -> Clock:
    """Unix seconds that follow Trio's (mock) clock."""
    return lambda: epoch + trio.current_time()


@contextmanager
def fast_folder() -> Iterator[Path]:
    """A fresh folder on tmpfs when there is one (/dev/shm: the writer's fsyncs cost
    nothing there, as on the production state directory), else in the temp folder."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    folder = Path(tempfile.mkdtemp(prefix="spirecsi-fast-", dir=base))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Driver:
    """One driver "process": its registry, node service and metrics."""

    registry: Registry
    node: NodeService
    metrics: Metrics
    scope: trio.CancelScope
    done: trio.Event


@dataclass
class FastNode:
    root: Path
    nursery: trio.Nursery
    agent: FakeAgent
    now: Clock
    mounter: MemoryMounter = field(default_factory=MemoryMounter)
    seed: int = 0
    driver: Driver | None = None
    restarts: int = 0
    pods: int = 0

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def kubelet_dir(self) -> Path:
        return self.root / "kubelet"

    @property
    def registry(self) -> Registry:
        assert self.driver is not None, "no driver runs"
        return self.driver.registry

    @property
    def metrics(self) -> Metrics:
        assert self.driver is not None, "no driver runs"
        return self.driver.metrics

    # Driver ---------------------------------------------------------------------------

    async def start_driver(self) -> Driver:
        """A new driver over the same state folder, agent and mounts (it resumes what it
        finds there). The backoff is the production one, with a seeded jitter."""
        metrics = Metrics()
        retry = BackoffPolicy(
            AGENT_RETRY.initial, AGENT_RETRY.maximum, random.Random(f"{self.seed}/{self.restarts}")
        )
        registry = Registry(
            store=MetadataStore(self.state_dir),
            mounter=self.mounter,
            agent=self.agent,
            metrics=metrics,
            node_id=NODE_ID,
            kubelet_dir=self.kubelet_dir,
            publish_timeout=PUBLISH_TIMEOUT,
            socket_server=functools.partial(serve_volume_socket, agent=self.agent),
            now=self.now,
            retry=retry,
        )
        scope = trio.CancelScope()
        done = trio.Event()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            try:
                with scope:
                    await registry.run(task_status=task_status)
            finally:
                done.set()

        await self.nursery.start(run)
        node = NodeService(registry, node_id=NODE_ID, kubelet_dir=self.kubelet_dir, metrics=metrics)
        self.driver = Driver(registry, node, metrics, scope, done)
        self.restarts += 1
        return self.driver

    async def stop_driver(self) -> None:
        """Like SIGTERM: every volume's tasks stop; mounts and files stay."""
        driver, self.driver = self.driver, None
        if driver is not None:
            driver.scope.cancel()
            await driver.done.wait()

    # Kubelet ---------------------------------------------------------------------------

    def pod(self, name: str = "web-0", namespace: str = "default", sa: str = "web") -> Pod:
        """A new pod (its own UID)."""
        self.pods += 1
        return Pod(name, namespace, f"00000000-0000-4000-8000-{self.pods:012d}", sa)

    def target(self, pod: Pod, volume: str = "spiffe") -> Path:
        """The kubelet's target path for ``pod``'s volume (its parent exists, as the kubelet
        makes it)."""
        parent = self.kubelet_dir / "pods" / pod.uid / "volumes" / "kubernetes.io~csi" / volume
        parent.mkdir(parents=True, exist_ok=True)
        return parent / "mount"

    def request(
        self,
        volume_id: str,
        pod: Pod,
        attributes: Mapping[str, str] | None = None,
        *,
        target: Path | None = None,
        fs_group: str = "",
    ) -> csi.NodePublishVolumeRequest:
        return publish_request(
            volume_id,
            str(target or self.target(pod)),
            volume_context(pod, attributes),
            fs_group=fs_group,
        )

    async def publish(self, request: csi.NodePublishVolumeRequest) -> RpcError | None:
        return await self._call(methods.NODE_PUBLISH_VOLUME, self._node().publish, request)

    async def unpublish(self, volume_id: str, target: Path | str) -> RpcError | None:
        request = csi.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))
        return await self._call(methods.NODE_UNPUBLISH_VOLUME, self._node().unpublish, request)

    async def stats(
        self, volume_id: str, target: Path | str
    ) -> csi.NodeGetVolumeStatsResponse | RpcError:
        request = csi.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(target))
        try:
            return await _handled(
                methods.NODE_GET_VOLUME_STATS, self._node().get_volume_stats, request
            )
        except RpcError as exc:
            return exc

    def _node(self) -> NodeService:
        assert self.driver is not None, "no driver runs"
        return self.driver.node

    async def _call(
        self,
        method: Method[Any, Any],
        fn: Callable[[Req, ServerContext], Awaitable[Resp]],
        request: Req,
    ) -> RpcError | None:
        try:
            await _handled(method, fn, request)
        except RpcError as exc:
            return exc
        return None

    # What a pod sees ------------------------------------------------------------------

    def seen(self, target: Path) -> Path | None:
        """The folder a pod sees at ``target`` (through the in-memory mount), or None."""
        return self.mounter.source(target)

    def volume_folder(self, volume_id: str) -> Path:
        return self.state_dir / folder_name(volume_id)


async def _handled(
    method: Method[Any, Any], fn: Callable[[Req, ServerContext], Awaitable[Resp]], request: Req
) -> Resp:
    """Call a CSI handler as the gRPC server does: project errors become their status, any
    other exception UNKNOWN (logged with its traceback, as the server logs it)."""
    context = ServerContext(method=method, metadata={}, deadline=None, peer=None)
    try:
        return await handler(fn)(request, context)
    except RpcError:
        raise
    except Exception:
        logger.exception("gRPC handler for %s failed", method.path)
        raise RpcError(StatusCode.UNKNOWN, f"internal error in {method.path}") from None
    finally:
        context.responded()


@asynccontextmanager
async def open_fast_node(
    root: Path,
    agent: FakeAgent | None = None,
    *,
    now: Clock | None = None,
    seed: int = 0,
    start_driver: bool = True,
) -> AsyncIterator[FastNode]:
    """A fast node with its fake agent running (and the driver, unless told otherwise)."""
    now = now or fake_clock()
    (root / "kubelet").mkdir(parents=True, exist_ok=True)
    try:
        async with trio.open_nursery() as nursery:
            agent = agent or FakeAgent(now=now)
            await nursery.start(agent.run)
            node = FastNode(root, nursery, agent, now, seed=seed)
            if start_driver:
                await node.start_driver()
            try:
                yield node
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise only_error(group) from None


def only_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error in a nursery's group (Cancelled aside), so that a failed assertion in a
    test body reads as itself; the group when there are several."""
    errors = [e for e in leaves(group) if not isinstance(e, trio.Cancelled)]
    return errors[0] if len(errors) == 1 else group
