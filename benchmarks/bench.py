"""``just bench``: the driver's design targets, measured (not asserted).

The driver runs as its own process (so its memory and CPU are its own), the
dev agent and a kubelet-like client run in this process. Prints a table.

    python -m benchmarks.bench [--volumes 1000] [--publishes 500]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import trio

from trio_spirecsi.csi.client import CSIClient, Pod, publish_request, volume_context
from trio_spirecsi.devagent.agent import DevAgent
from trio_spirecsi.grpc import open_channel

from .workload_api import workload_api_latency

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class Bench:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.admin = root / "admin.sock"
        self.csi = root / "csi.sock"
        self.state = root / "state"
        self.kubelet = root / "kubelet"
        self.kubelet.mkdir()
        self.agent = DevAgent("example.org", svid_ttl=3600)
        self.proc: subprocess.Popen[bytes] | None = None
        self.volumes: list[tuple[str, Path]] = []
        self.rows: list[tuple[str, str]] = []
        self.metrics_port = _free_port()

    async def counter(self, name: str) -> float:
        """A counter from the driver's /metrics (cheap to poll, unlike reading every file)."""
        stream = await trio.open_tcp_stream("127.0.0.1", self.metrics_port)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
            body = b""
            while chunk := await stream.receive_some(65536):
                body += chunk
        for line in body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise LookupError(name)

    def start_driver(self) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "trio_spirecsi.cli", "serve"]
        argv += ["--csi-endpoint", f"unix://{self.csi}", "--admin-socket", str(self.admin)]
        argv += ["--node-id", "bench", "--state-dir", str(self.state)]
        argv += ["--kubelet-dir", str(self.kubelet), "--log-level", "warning"]
        argv += ["--metrics-addr", f"127.0.0.1:{self.metrics_port}"]
        # The per-pod JWT rate limit (10/s) would measure the limit, not the latency.
        argv += ["--pod-socket-jwt-per-second", "100000", "--pod-socket-jwt-burst", "100000"]
        self.proc = subprocess.Popen(argv)
        return self.proc

    async def wait_socket(self) -> None:
        with trio.fail_after(60):
            while not self.csi.exists():
                await trio.sleep(0.01)

    def target(self, pod: Pod) -> Path:
        parent = self.kubelet / "pods" / pod.uid / "volumes" / "kubernetes.io~csi" / "spiffe"
        parent.mkdir(parents=True)
        return parent / "mount"

    async def publish(self, client: CSIClient) -> float:
        pod = Pod(f"web-{len(self.volumes)}", "bench", str(uuid.uuid4()), "web")
        volume_id = f"csi-{uuid.uuid4().hex}"
        target = self.target(pod)
        request = publish_request(volume_id, str(target), volume_context(pod))
        started = time.perf_counter()
        await client.publish(request)
        elapsed = time.perf_counter() - started
        self.volumes.append((volume_id, target))
        return elapsed

    def row(self, name: str, value: str) -> None:
        self.rows.append((name, value))
        print(f"  {name:<52} {value}", flush=True)


async def wait_until(check: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``check()`` holds (checked every 20 ms, so resolution is 20 ms)."""
    started = time.perf_counter()
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.02)
    return time.perf_counter() - started


async def run(volumes: int, publishes: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="trio-spirecsi-bench-"))
    # The state dir is on tmpfs in production (/run): measure it there, not on /tmp's disk.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(root)], check=True)
    bench = Bench(root)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}"
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(bench.agent.serve, str(bench.admin))
            proc = bench.start_driver()
            await bench.wait_socket()
            async with open_channel(str(bench.csi)) as channel:
                client = CSIClient(channel)
                # Warm up (imports, first connection), then measure.
                await bench.publish(client)
                base_rss = rss_bytes(proc.pid)

                latencies = sorted([await bench.publish(client) for _ in range(publishes)])
                p50 = statistics.median(latencies) * 1000
                p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
                bench.row(
                    f"publish latency, {publishes} sequential (p50 / p99)",
                    f"{p50:.1f} ms / {p99:.1f} ms",
                )
                rows = await workload_api_latency(
                    client,
                    bench.kubelet,
                    rotate=lambda: bench.agent.rotate("spiffe://example.org/ns/bench/sa/socket"),
                )
                for name, value in rows:
                    bench.row(f"per-pod socket: {name}", value)

                while len(bench.volumes) < volumes:
                    async with trio.open_nursery() as batch:
                        for _ in range(min(50, volumes - len(bench.volumes))):
                            batch.start_soon(bench.publish, client)
                live = len(bench.volumes)
                await trio.sleep(1)
                per_volume = (rss_bytes(proc.pid) - base_rss) / (live - 1)
                bench.row(
                    f"driver RSS per live volume ({live} volumes)",
                    f"{per_volume / 1024:.1f} KiB (total {rss_bytes(proc.pid) >> 20} MiB)",
                )

                cpu0 = cpu_seconds(proc.pid)
                await trio.sleep(10)
                idle = (cpu_seconds(proc.pid) - cpu0) / 10 * 100
                bench.row(f"driver idle CPU with {live} volumes (10 s)", f"{idle:.2f} % of a core")

                # The driver counts a rotation once the volume's new files are on disk.
                rotations = "trio_spirecsi_svid_rotations_total"
                wanted = await bench.counter(rotations) + live
                started = time.perf_counter()
                driver_cpu, agent_cpu = cpu_seconds(proc.pid), time.process_time()
                bench.agent.rotate()
                with trio.fail_after(600):
                    while await bench.counter(rotations) < wanted:
                        await trio.sleep(0.05)
                took = time.perf_counter() - started
                driver_cpu = cpu_seconds(proc.pid) - driver_cpu
                agent_cpu = time.process_time() - agent_cpu
                sample = bench.state / bench.volumes[-1][0] / "data" / "svid.pem"
                assert sample.read_bytes(), "files present after the rotation"
                bench.row(
                    f"rotation of all {live} volumes landing on disk",
                    f"{took:.2f} s (CPU: driver {driver_cpu:.1f} s, dev agent {agent_cpu:.1f} s)",
                )

                proc.kill()
                proc.wait()
                await wait_until(lambda: not bench.agent.open_svid_subscriptions, 60)
                bench.csi.unlink(missing_ok=True)
                # subscribe_count is a plain counter: cheap to poll, unlike listing the streams.
                opened = bench.agent.subscribe_count + live
                restarted = time.perf_counter()
                proc = bench.start_driver()
                await wait_until(lambda: bench.agent.subscribe_count >= opened, 300)
                took = time.perf_counter() - restarted
                bench.row(f"restart (kill -9) to {live} volumes resubscribed", f"{took:.2f} s")
                await bench.wait_socket()

                for volume_id, target_path in bench.volumes:
                    await client.unpublish(volume_id, str(target_path))
            proc.terminate()
            proc.wait()
            nursery.cancel_scope.cancel()
    finally:
        if bench.proc and bench.proc.poll() is None:
            bench.proc.kill()
        with open("/proc/self/mountinfo") as info:
            points = [line.split()[4] for line in info]
        for point in reversed(points):
            if point.startswith(str(bench.kubelet) + "/"):
                subprocess.run(["umount", "--lazy", point], check=False)
        subprocess.run(["umount", "--lazy", str(root)], check=False)
        shutil.rmtree(root, ignore_errors=True)
    print("\n| measure | value |\n|---|---|")
    for name, value in bench.rows:
        print(f"| {name} | {value} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--volumes", type=int, default=1000)
    parser.add_argument("--publishes", type=int, default=500)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: the driver bind-mounts volumes; run as root (just bench)")
    trio.run(run, max(args.volumes, args.publishes + 1), args.publishes)


if __name__ == "__main__":
    main()
