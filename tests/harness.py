"""A node for integration tests: the dev agent, the real daemon and a kubelet-like client.

Everything speaks over real unix sockets; volumes are really bind-mounted (the
test session runs in a private mount namespace, see conftest.py).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trio_spirecsi import daemon
from trio_spirecsi.config import Settings
from trio_spirecsi.csi.client import CSIClient, Pod, publish_request, volume_context
from trio_spirecsi.daemon import Daemon
from trio_spirecsi.devagent.agent import DevAgent
from trio_spirecsi.grpc import Channel, open_channel
from trio_spirecsi.heap import HeapPolicy
from trio_spirecsi.storage.mount import MNT_DETACH


def mounts_under(root: Path) -> list[Path]:
    """Mount points below ``root`` in this mount namespace, deepest first."""
    found = []
    prefix = str(root.resolve())
    with open("/proc/self/mountinfo") as info:
        for line in info:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def detach_mounts_under(root: Path) -> None:
    """Detach every mount at or below ``root``, deepest first, whatever it is: test cleanup
    only (the driver itself never unmounts by path)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    for point in mounts_under(root):
        libc.umount2(os.fsencode(point), MNT_DETACH)


def mount_count(target: Path) -> int:
    return mounts_under(target).count(target.resolve())


async def eventually(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait until ``check()`` holds, polling; fail with ``what`` after ``timeout``."""
    with trio.move_on_after(timeout):
        while not check():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting for: {what}")


@dataclass(frozen=True)
class Identity:
    """What a pod reads from its volume."""

    spiffe_id: str
    serial: int
    key_matches: bool
    bundle: tuple[bytes, ...]


def read_identity(
    folder: Path, svid: str = "svid.pem", key: str = "svid_key.pem", bundle: str = "svid_bundle.pem"
) -> Identity:
    certs = x509.load_pem_x509_certificates((folder / svid).read_bytes())
    private = serialization.load_pem_private_key((folder / key).read_bytes(), None)
    san = certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    roots = x509.load_pem_x509_certificates((folder / bundle).read_bytes())
    return Identity(
        spiffe_id=uris[0],
        serial=certs[0].serial_number,
        key_matches=private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == certs[0]
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        bundle=tuple(c.public_bytes(serialization.Encoding.DER) for c in roots),
    )


@dataclass
class Node:
    root: Path
    nursery: trio.Nursery
    agent: DevAgent
    channel: Channel
    node_id: str = "node-a"
    daemon: Daemon | None = None
    _driver_scope: trio.CancelScope | None = None
    _driver_done: trio.Event | None = None
    _agent_scope: trio.CancelScope | None = None
    _agent_done: trio.Event | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def admin_socket(self) -> Path:
        return self.root / "spire" / "admin.sock"

    @property
    def csi_socket(self) -> Path:
        return self.root / "plugins" / "csi.sock"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def kubelet_dir(self) -> Path:
        return self.root / "kubelet"

    @property
    def client(self) -> CSIClient:
        return CSIClient(self.channel, timeout=60)

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = dict(
            csi_socket=self.csi_socket,
            admin_socket=self.admin_socket,
            node_id=self.node_id,
            state_dir=self.state_dir,
            kubelet_dir=self.kubelet_dir,
            publish_timeout=10.0,
            # A daemon in the test process leaves its collector alone: freezing the heap of
            # pytest and hypothesis would keep their garbage cycles. Drivers started with
            # serve_argv run the real policy (tests/test_heap.py tests it).
            heap=HeapPolicy(freeze_interval=0),
        )
        values.update(overrides)
        return Settings(**values)

    def serve_argv(self, **overrides: str) -> list[str]:
        flags = {
            "csi-endpoint": f"unix://{self.csi_socket}",
            "admin-socket": str(self.admin_socket),
            "node-id": self.node_id,
            "state-dir": str(self.state_dir),
            "kubelet-dir": str(self.kubelet_dir),
            "publish-timeout": "10",
        }
        flags.update(overrides)
        argv = [sys.executable, "-m", "trio_spirecsi.cli", "serve"]
        for name, value in flags.items():
            argv += [f"--{name}", value]
        return argv

    # Driver ----------------------------------------------------------------

    async def start_driver(self, **overrides: Any) -> Daemon:
        scope = trio.CancelScope()
        done = trio.Event()

        async def run(task_status: trio.TaskStatus[Daemon]) -> None:
            try:
                with scope:
                    await daemon.run(self.settings(**overrides), task_status=task_status)
            finally:
                done.set()

        self.daemon = await self.nursery.start(run)
        self._driver_scope, self._driver_done = scope, done
        return self.daemon

    async def stop_driver(self) -> None:
        """Like SIGTERM: stop serving, leave volumes mounted."""
        if self._driver_scope is not None and self._driver_done is not None:
            self._driver_scope.cancel()
            await self._driver_done.wait()
        self.daemon = None
        self._driver_scope = self._driver_done = None

    def spawn_driver(self, **overrides: str) -> subprocess.Popen[bytes]:
        """The daemon as its own process (for kill -9 and SIGTERM tests)."""
        proc = subprocess.Popen(self.serve_argv(**overrides), stderr=subprocess.PIPE)
        self.processes.append(proc)
        return proc

    async def wait_for_socket(self, proc: subprocess.Popen[bytes] | None = None) -> None:
        def up() -> bool:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"driver exited: {proc.stderr.read()!r}")  # type: ignore[union-attr]
            return self.csi_socket.exists()

        await eventually(up, "the driver's CSI socket")

    # Agent -----------------------------------------------------------------

    async def start_agent(self, agent: DevAgent | None = None) -> DevAgent:
        if agent is not None:
            self.agent = agent
        scope = trio.CancelScope()
        done = trio.Event()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            try:
                with scope:
                    await self.agent.serve(str(self.admin_socket), task_status=task_status)
            finally:
                done.set()

        await self.nursery.start(run)
        self._agent_scope, self._agent_done = scope, done
        return self.agent

    async def stop_agent(self) -> None:
        if self._agent_scope is not None and self._agent_done is not None:
            self._agent_scope.cancel()
            await self._agent_done.wait()
        self._agent_scope = self._agent_done = None

    # Kubelet ---------------------------------------------------------------

    def pod(self, name: str = "web-0", namespace: str = "default", sa: str = "web") -> Pod:
        return Pod(name, namespace, str(uuid.uuid4()), sa)

    def target(self, pod: Pod, volume: str = "spiffe") -> Path:
        parent = self.kubelet_dir / "pods" / pod.uid / "volumes" / "kubernetes.io~csi" / volume
        parent.mkdir(parents=True, exist_ok=True)
        return parent / "mount"

    async def publish(
        self,
        pod: Pod,
        *,
        volume_id: str | None = None,
        attributes: Mapping[str, str] | None = None,
        fs_group: str = "",
    ) -> tuple[str, Path]:
        volume_id = volume_id or f"csi-{uuid.uuid4().hex}"
        target = self.target(pod)
        request = publish_request(
            volume_id, str(target), volume_context(pod, attributes), fs_group=fs_group
        )
        await self.client.publish(request)
        return volume_id, target

    def volume_folders(self) -> list[str]:
        if not self.state_dir.exists():
            return []
        return sorted(p.name for p in self.state_dir.iterdir() if not p.name.startswith("."))

    def expected_id(self, pod: Pod) -> str:
        return f"spiffe://example.org/ns/{pod.namespace}/sa/{pod.service_account}"


@asynccontextmanager
async def open_node(root: Path, agent: DevAgent | None = None) -> AsyncIterator[Node]:
    """A node with its dev agent running and a CSI channel; start the driver yourself."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "kubelet").mkdir(exist_ok=True)
    (root / "spire").mkdir(exist_ok=True)
    async with (
        trio.open_nursery() as nursery,
        open_channel(str(root / "plugins" / "csi.sock")) as channel,
    ):
        node = Node(root, nursery, agent or DevAgent("example.org"), channel)
        await node.start_agent()
        try:
            yield node
        finally:
            for proc in node.processes:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            detach_mounts_under(root)
            nursery.cancel_scope.cancel()


def is_private_mount_namespace() -> bool:
    return os.readlink("/proc/self/ns/mnt") != os.readlink("/proc/1/ns/mnt")
