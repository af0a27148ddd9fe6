"""A node under attack: the real driver process and a dev agent process, observed from outside.

Both run as their own processes (``python -m trio_spirecsi.cli serve`` / ``dev-agent``), so
the driver's memory, descriptors and exit code are its own and the agent keeps issuing
SVIDs whatever the driver does. Everything lives on a tmpfs mounted by :meth:`Node.start`
(the caller must be root in a private mount namespace: the test session is, and ``just
hostile`` runs under ``unshare -m``); :meth:`Node.close` unmounts everything below it.

What a test or the benchmark can observe, and nothing else: is the driver alive (and with
which exit code and last log lines), does CSI Probe answer, do a volume's files rotate after
the agent rotates (SIGUSR1, the dev agent's rotate control), how many descriptors the driver
holds, its RSS and peak RSS.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography import x509

from tests.harness import detach_mounts_under
from trio_spirecsi.csi.client import CSIClient, Pod, publish_request, volume_context
from trio_spirecsi.grpc import open_channel

from .wire import connect_unix

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20
WORKLOAD_API = {"csi.spire.io/workload-api": "true"}


class DriverDied(AssertionError):
    """The driver process is no longer running."""


@dataclass(frozen=True)
class Volume:
    """A published volume as the kubelet knows it."""

    volume_id: str
    target: Path
    pod: Pod

    @property
    def socket(self) -> str:
        """The pod's Workload API socket, reached through its read-only mount."""
        return str(self.target / "agent.sock")


def svid_serial(target: Path, name: str = "svid.pem") -> int:
    """Serial number of the leaf certificate the pod reads at ``target``."""
    return x509.load_pem_x509_certificates((target / name).read_bytes())[0].serial_number


def wait_for(check: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    """Poll ``check`` until it holds or ``timeout`` passes (blocking); its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


class Node:
    """The dev agent and the driver as processes, on a tmpfs, with volumes published."""

    def __init__(self, root: Path | None = None, *, state_size: str = "") -> None:
        # Short: <root>/state/<volume id>/data/agent.sock must fit a unix socket address.
        self.root = root or Path(tempfile.mkdtemp(prefix="hostile-", dir="/tmp"))
        self.state_size = state_size
        self.agent: subprocess.Popen[bytes] | None = None
        self.driver: subprocess.Popen[bytes] | None = None
        self.driver_flags: dict[str, str] = {}
        self.volumes: list[Volume] = []
        self._mounted = False
        self._driver_logs = 0

    # Paths -----------------------------------------------------------------

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
    def agent_log(self) -> Path:
        return self.root / "agent.log"

    @property
    def driver_log(self) -> Path:
        return self.root / f"driver-{self._driver_logs}.log"

    # Processes -------------------------------------------------------------

    def start(self, **driver_flags: str) -> None:
        """Mount the tmpfs (and a ``size=``-limited state tmpfs when asked), start the
        agent, then the driver; return once both serve."""
        self.root.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(self.root)], check=True
        )
        self._mounted = True
        for folder in (self.kubelet_dir, self.state_dir, self.root / "spire"):
            folder.mkdir()
        if self.state_size:
            options = f"mode=0755,size={self.state_size}"
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(self.state_dir)], check=True
            )
        self.start_agent()
        self.start_driver(**driver_flags)

    def start_agent(self) -> None:
        argv = [sys.executable, "-m", "trio_spirecsi.cli", "dev-agent"]
        argv += ["--socket", str(self.admin_socket), "--svid-ttl", "3600"]
        argv += ["--log-format", "json"]
        with open(self.agent_log, "ab") as log:
            self.agent = subprocess.Popen(argv, stdout=log, stderr=log)
        if not wait_for(lambda: _accepting(self.admin_socket) or self.agent_exited(), 30):
            raise AssertionError("the dev agent did not listen within 30 s")
        if self.agent_exited():
            raise AssertionError(f"the dev agent exited: {self._tail(self.agent_log)}")

    def start_driver(self, when: str = "while starting", **flags: str) -> None:
        """Start the driver (its volumes resume) and wait until its CSI socket accepts;
        :class:`DriverDied` (with ``when`` in its message) if it exits instead."""
        self.driver_flags = dict(flags) or self.driver_flags
        self._driver_logs += 1
        argv = [sys.executable, "-m", "trio_spirecsi.cli", "serve"]
        values = {
            "csi-endpoint": f"unix://{self.csi_socket}",
            "admin-socket": str(self.admin_socket),
            "node-id": "node-hostile",
            "state-dir": str(self.state_dir),
            "kubelet-dir": str(self.kubelet_dir),
            "publish-timeout": "15",
            **self.driver_flags,
        }
        for name, value in values.items():
            argv += [f"--{name}", value]
        with open(self.driver_log, "ab") as log:
            self.driver = subprocess.Popen(argv, stdout=log, stderr=log)
        if not wait_for(lambda: _accepting(self.csi_socket) or not self.driver_alive(), 60):
            self.check_alive(when)
            raise AssertionError(f"the driver's CSI socket did not accept within 60 s {when}")
        self.check_alive(when, grace=0.3)

    def stop_driver(self) -> int | None:
        """SIGTERM (volumes stay mounted); the exit code, None if it had to be killed."""
        if self.driver is None:
            return None
        if self.driver.poll() is None:
            self.driver.send_signal(signal.SIGTERM)
            try:
                self.driver.wait(30)
            except subprocess.TimeoutExpired:
                self.driver.kill()
                self.driver.wait()
                return None
        return self.driver.returncode

    def restart_driver(self) -> None:
        self.stop_driver()
        with contextlib.suppress(FileNotFoundError):
            self.csi_socket.unlink()
        self.start_driver()

    def driver_alive(self) -> bool:
        return self.driver is not None and self.driver.poll() is None

    def agent_exited(self) -> bool:
        return self.agent is None or self.agent.poll() is not None

    @property
    def pid(self) -> int:
        assert self.driver is not None
        return self.driver.pid

    def check_alive(self, when: str, grace: float = 0.0) -> None:
        """Raise :class:`DriverDied` unless the driver still runs: "driver exited with code
        1 <when>" and its last log lines. With ``grace``, wait that long for a driver that
        is going down (when something already failed, to report the cause, not a symptom)."""
        if self.driver is None:
            raise DriverDied(f"no driver was started {when}")
        if grace:
            wait_for(lambda: not self.driver_alive(), grace)
        code = self.driver.poll()
        if code is not None:
            raise DriverDied(
                f"driver exited with code {code} {when}; its last log lines:\n"
                + self._tail(self.driver_log)
            )

    def driver_log_text(self) -> str:
        try:
            return self.driver_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def agent_log_lines(self) -> list[str]:
        try:
            return self.agent_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    @staticmethod
    def _tail(path: Path, lines: int = 15, width: int = 400) -> str:
        try:
            text = path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(line[:width] for line in text[-lines:]) or "(empty log)"

    def rotate(self) -> None:
        """The dev agent re-issues every SVID now (its SIGUSR1 control)."""
        assert self.agent is not None and self.agent.poll() is None, "the dev agent is not running"
        self.agent.send_signal(signal.SIGUSR1)

    def close(self) -> None:
        """Kill both processes, unmount everything below the root, remove it."""
        for proc in (self.driver, self.agent):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        detach_mounts_under(self.root)
        self._mounted = False
        with contextlib.suppress(OSError):
            self.root.rmdir()

    # Observations ----------------------------------------------------------

    def fd_count(self) -> int:
        """Descriptors the driver holds now."""
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except FileNotFoundError:
            return 0

    def rss(self) -> int:
        """The driver's resident memory now, bytes (0 once it is gone)."""
        try:
            with open(f"/proc/{self.pid}/statm") as f:
                return int(f.read().split()[1]) * PAGE
        except (FileNotFoundError, ProcessLookupError):
            return 0

    def peak_rss(self) -> int:
        """The driver's peak resident memory since it started or :meth:`reset_peak_rss`."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError):
            pass
        return 0

    def reset_peak_rss(self) -> None:
        """Start measuring the peak afresh (``5`` to /proc/<pid>/clear_refs)."""
        with contextlib.suppress(OSError), open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")

    def cpu_seconds(self) -> float:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def steady_fd_count(self, timeout: float = 10.0) -> int:
        """The driver's descriptor count once it stops changing (0.3 s apart)."""
        last = self.fd_count()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = self.fd_count()
            if now == last:
                return now
            last = now
        return last

    # Kubelet ---------------------------------------------------------------

    def target(self, pod: Pod) -> Path:
        parent = self.kubelet_dir / "pods" / pod.uid / "volumes" / "kubernetes.io~csi" / "spiffe"
        parent.mkdir(parents=True, exist_ok=True)
        return parent / "mount"

    async def publish(
        self,
        name: str,
        service_account: str,
        attributes: Mapping[str, str] | None = None,
        *,
        volume_id: str = "",
    ) -> Volume:
        pod = Pod(name, "hostile", str(uuid.uuid4()), service_account)
        volume = Volume(volume_id or f"csi-{uuid.uuid4().hex}", self.target(pod), pod)
        request = publish_request(
            volume.volume_id, str(volume.target), volume_context(pod, attributes)
        )
        async with open_channel(str(self.csi_socket)) as channel:
            await CSIClient(channel, timeout=60).publish(request)
        self.volumes.append(volume)
        return volume

    async def unpublish(self, volume: Volume) -> None:
        async with open_channel(str(self.csi_socket)) as channel:
            await CSIClient(channel, timeout=60).unpublish(volume.volume_id, str(volume.target))
        if volume in self.volumes:
            self.volumes.remove(volume)

    @asynccontextmanager
    async def csi(self, timeout: float = 10.0) -> AsyncIterator[CSIClient]:
        """A CSI client on one connection, opened now: it keeps working when the driver can
        no longer accept new connections (out of descriptors)."""
        async with open_channel(str(self.csi_socket)) as channel:
            client = CSIClient(channel, timeout=timeout)
            await client.probe()
            yield client

    async def probe(self, timeout: float = 10.0) -> float:
        """Seconds a CSI Probe on a new connection takes; raises if it fails or times out."""
        started = time.perf_counter()
        with trio.fail_after(timeout):
            async with open_channel(str(self.csi_socket)) as channel:
                ready = await CSIClient(channel, timeout=timeout).probe()
        if not ready:
            raise AssertionError("CSI Probe answered not ready")
        return time.perf_counter() - started

    async def volume_condition(self, volume: Volume, timeout: float = 10.0) -> tuple[bool, str]:
        """NodeGetVolumeStats' VOLUME_CONDITION: (abnormal, message)."""
        with trio.fail_after(timeout):
            async with open_channel(str(self.csi_socket)) as channel:
                stats = await CSIClient(channel, timeout=timeout).stats(
                    volume.volume_id, str(volume.target)
                )
        return stats.volume_condition.abnormal, stats.volume_condition.message

    async def rotation_seconds(self, volume: Volume, timeout: float = 20.0) -> float | None:
        """Rotate at the agent; seconds until ``volume``'s pod reads a new SVID, or None if
        it did not within ``timeout``."""
        before = svid_serial(volume.target)
        started = time.perf_counter()
        self.rotate()
        with trio.move_on_after(timeout):
            while True:
                with contextlib.suppress(OSError, ValueError):
                    if svid_serial(volume.target) != before:
                        return time.perf_counter() - started
                await trio.sleep(0.01)
        return None


def in_private_mount_namespace() -> bool:
    """Root, in the private mount namespace tests/conftest.py entered (or ``unshare -m``
    made): mounts made here stay here."""
    if os.geteuid() != 0:
        return False
    own = os.readlink("/proc/self/ns/mnt")
    if os.environ.get("TRIO_SPIRECSI_TEST_MOUNT_NS") == own:
        return True
    try:
        return own != os.readlink("/proc/1/ns/mnt")
    except OSError:
        return False


def _accepting(path: Path) -> bool:
    try:
        connect_unix(path, timeout=1.0).close()
    except OSError:
        return False
    return True
