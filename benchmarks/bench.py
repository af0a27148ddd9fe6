"""``just bench``: the driver's design targets, measured (not asserted).

The driver runs as its own process (so its memory and CPU are its own), the dev agent as
another (:mod:`.agent_process`) and a kubelet-like client in this one, state folders on a
private tmpfs as in production.
Beside it runs a minimal driver on grpcio's C-core with threads (:mod:`.ccore_driver`) on the
same agent: sequential publishes alternate between the two (ours, theirs, ours, ...) so that
both see the same machine at the same moment, and the table shows both with their ratio.
Absolute times drift on a shared machine; compare within one run. Prints a table.

    python -m benchmarks.bench [--volumes 1000] [--publishes 500] [--storm-publishes 200]
                               [--storm-every SECONDS]
                               [--profile OUT.prof | --loop-stats OUT.json] [--driver-path DIR]
                               [--agent dev|go]

``--storm-every`` fixes the storm's period (by default 1.5 times the rotation row's time, at
least 0.2 s: a driver that rotates faster meets storms more often); give the same period to
compare two commits' storm rows under the same load.
``--profile`` runs the driver under cProfile during the sequential publishes only (its
latency is then not comparable); read the result with ``python -m pstats OUT.prof``.
``--loop-stats`` times the driver's event loop (scheduler turns, long task steps, garbage
collection pauses) during the sequential publishes and during the rotation storm
(:mod:`.loopstats`), and prints what it saw.
``--driver-path`` runs every process the bench starts (the driver, the C-core driver, the
CLI) on the ``trio_spirecsi`` package found in DIR, e.g. an earlier commit's
(``git archive <commit> trio_spirecsi | tar -x -C DIR``), to compare before and after in
one session with the same agent and client.
``--agent go`` puts a grpc-go stand-in for the SPIRE agent (``benchmarks/goagent``, built by
``scripts/goagent.sh``) in the dev agent's place: the transport of a real agent, each stream
answered by its own goroutine on every core, where the dev agent answers one stream after
another on one event loop.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import platform
import pstats
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from trio_spirecsi.csi.client import CSIClient, Pod, publish_request, volume_context
from trio_spirecsi.grpc import RpcError, open_channel
from trio_spirecsi.metrics import PUBLISH_PHASES

from .workload_api import workload_api_latency

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")
ROTATIONS = "trio_spirecsi_svid_rotations_total"
PHASE_SECONDS = "trio_spirecsi_publish_phase_seconds"
CHECKOUT = Path(__file__).resolve().parent.parent
_SAMPLE = re.compile(r"^([a-z_]+)(?:\{([^}]*)\})? (\S+)$")
_LABEL = re.compile(r'([a-z_]+)="([^"]*)"')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def build_go_agent(who: str) -> Path:
    """The grpc-go agent's binary, built by ``scripts/goagent.sh`` if needed; ``who`` names
    the benchmark in the message if it cannot be built."""
    built = subprocess.run(
        [str(CHECKOUT / "scripts" / "goagent.sh")], stdout=subprocess.PIPE, text=True
    )
    if built.returncode != 0:
        sys.exit(f"{who}: could not build the grpc-go agent (see above)")
    return Path(built.stdout.split()[-1])


def remove_tmpfs(root: Path) -> None:
    """Unmount every mount below ``root`` (the volumes' bind mounts), then the tmpfs at
    ``root`` itself, and remove the folder."""
    with open("/proc/self/mountinfo") as info:
        points = [line.split()[4] for line in info]
    for point in reversed(points):
        if point.startswith(str(root) + "/"):
            subprocess.run(["umount", "--lazy", point], check=False)
    subprocess.run(["umount", "--lazy", str(root)], check=False)
    shutil.rmtree(root, ignore_errors=True)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def p50_p99(seconds: Sequence[float]) -> tuple[float, float]:
    """Median and 99th percentile (nearest rank), in milliseconds."""
    ordered = sorted(seconds)
    rank = max(math.ceil(len(ordered) * 0.99) - 1, 0)
    return statistics.median(ordered) * 1000, ordered[rank] * 1000


def _ms(seconds: Sequence[float]) -> str:
    p50, p99 = p50_p99(seconds)
    return f"{p50:.1f} ms / {p99:.1f} ms"


class AgentProcess:
    """The dev agent in a process of its own (:mod:`.agent_process`), driven over a pipe;
    or, given ``go_agent``, the grpc-go stand-in (``benchmarks/goagent``) on the same pipe.

    A real agent is a process of its own, with cores of its own. In the bench's process, its
    answer to a rotation (a response on each of 1,000 streams) would share the loop, or the
    interpreter lock, with the client that times each publish, for either driver. It runs
    the checkout's dev agent whatever ``--driver-path`` says: both drivers, and every commit
    compared, meet the same agent.
    """

    def __init__(self, svid_ttl: int, go_agent: Path | None = None) -> None:
        self.svid_ttl = svid_ttl
        """The lifetime of the SVIDs it issues (the last one given to a rotation)."""
        self.go_agent = go_agent
        self.name = "dev agent" if go_agent is None else "grpc-go agent"
        self.proc: trio.Process | None = None
        self._buffered = b""
        self._lock = trio.Lock()

    async def start(self, admin_socket: str) -> None:
        argv = [sys.executable, "-m", "benchmarks.agent_process", admin_socket, str(self.svid_ttl)]
        if self.go_agent is not None:
            argv = [str(self.go_agent), admin_socket, str(self.svid_ttl)]
        self.proc = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=CHECKOUT,
            env=dict(os.environ, PYTHONPATH=str(CHECKOUT)),
        )
        with trio.fail_after(60):
            if (line := await self._line()) != "ready":
                raise RuntimeError(f"the {self.name} did not start: {line!r}")

    async def _line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        while b"\n" not in self._buffered:
            chunk = await self.proc.stdout.receive_some()
            if not chunk:
                raise RuntimeError(f"the {self.name} exited; see its error above")
            self._buffered += chunk
        line, self._buffered = self._buffered.split(b"\n", 1)
        return line.decode()

    async def _command(self, *words: str) -> str:
        assert self.proc is not None and self.proc.stdin is not None
        async with self._lock:
            await self.proc.stdin.send_all((" ".join(words) + "\n").encode())
            answer = await self._line()
        if answer.startswith("error"):
            raise RuntimeError(f"{self.name}: {answer}")
        return answer

    async def rotate(self, spiffe_id: str | None = None) -> None:
        """Re-issue every SVID (of ``spiffe_id``); returns once they are issued, before the
        agent's streams send them."""
        await self._command("rotate", *([spiffe_id] if spiffe_id else []))

    async def rotate_gradually(self, ttl: int) -> None:
        """Re-issue every SVID, valid ``ttl`` seconds, and wake their streams a few per turn
        of the agent's loop (:meth:`DevAgent.rotate_gradually`)."""
        self.svid_ttl = ttl
        await self._command("rotate_gradually", str(ttl))

    async def stats(self) -> dict[str, Any]:
        """``answers`` (seconds), ``subscribe_count``, ``open_subscriptions``."""
        found: dict[str, Any] = json.loads(await self._command("stats"))
        return found

    async def until(self, check: Callable[[dict[str, Any]], bool], timeout: float) -> None:
        """Poll :meth:`stats` every 20 ms until ``check`` holds."""
        with trio.fail_after(timeout):
            while not check(await self.stats()):
                await trio.sleep(0.02)

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            await self.proc.stdin.aclose()
        with trio.move_on_after(10):
            await self.proc.wait()
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def wait_accepting(path: Path, timeout: float = 60) -> None:
    """Until a unix socket at ``path`` accepts a connection."""
    with trio.fail_after(timeout):
        while True:
            try:
                stream = await trio.open_unix_socket(str(path))
            except OSError:
                await trio.sleep(0.002)
                continue
            await stream.aclose()
            return


def _cli() -> list[str]:
    """The ``trio-spirecsi`` command as installed (what a probe would run)."""
    script = Path(sys.executable).parent / "trio-spirecsi"
    return [str(script)] if script.exists() else [sys.executable, "-m", "trio_spirecsi.cli"]


async def command_seconds(bench: Bench, argv: list[str], runs: int = 5) -> float:
    """Median wall time of ``argv`` from process start to exit (it must succeed)."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        done = await trio.to_thread.run_sync(
            lambda: subprocess.run(argv, capture_output=True, check=False, **bench.where())
        )
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise RuntimeError(f"{argv} failed: {done.stderr.decode()}")
    return statistics.median(times)


class Bench:
    def __init__(
        self,
        root: Path,
        launcher: tuple[str, Path] | None,
        driver_path: Path | None,
        go_agent: Path | None = None,
    ) -> None:
        self.root = root
        self.admin = root / "admin.sock"
        self.csi = root / "csi.sock"
        self.state = root / "state"
        self.kubelet = root / "kubelet"
        self.kubelet.mkdir()
        self.agent = AgentProcess(svid_ttl=3600, go_agent=go_agent)
        self.proc: subprocess.Popen[bytes] | None = None
        self.ccore: subprocess.Popen[bytes] | None = None
        self.volumes: list[tuple[str, Path]] = []
        self.rows: list[tuple[str, str]] = []
        self.metrics_port = _free_port()
        self.launcher = launcher
        """(module, output file) that runs the driver under a profiler or loop timer."""
        self.driver_path = driver_path

    def where(self, *, benchmarks: bool = False) -> dict[str, Any]:
        """``cwd`` and ``env`` for a process the bench starts (``benchmarks``: it runs a
        module of this folder), so that it imports ``trio_spirecsi`` from --driver-path."""
        if self.driver_path is None:
            return {}
        path = [str(self.driver_path), *([str(CHECKOUT)] if benchmarks else [])]
        return {"cwd": self.root, "env": dict(os.environ, PYTHONPATH=":".join(path))}

    async def scrape(self) -> dict[str, float]:
        """The driver's /metrics: ``name``, or ``name{value}`` with the values of its labels
        in the order of their names (``name{0.01,first_svid}`` for the bucket ``le="0.01"``
        of the phase ``first_svid``) -> value."""
        stream = await trio.open_tcp_stream("127.0.0.1", self.metrics_port)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
            body = b""
            while chunk := await stream.receive_some(65536):
                body += chunk
        samples = {}
        for line in body.decode().splitlines():
            match = _SAMPLE.match(line)
            if match:
                name, labels, value = match.groups()
                if labels is not None:
                    name += "{" + ",".join(v for _, v in sorted(_LABEL.findall(labels))) + "}"
                samples[name] = float(value)
        return samples

    async def counter(self, name: str) -> float:
        """A counter from the driver's /metrics (cheap to poll, unlike reading every file)."""
        return (await self.scrape())[name]

    def driver_argv(self) -> list[str]:
        argv = [sys.executable, "-m", "trio_spirecsi.cli", "serve"]
        if self.launcher is not None:
            argv = [sys.executable, "-m", self.launcher[0], str(self.launcher[1]), "serve"]
        argv += ["--csi-endpoint", f"unix://{self.csi}", "--admin-socket", str(self.admin)]
        argv += ["--node-id", "bench", "--state-dir", str(self.state)]
        argv += ["--kubelet-dir", str(self.kubelet), "--log-level", "warning"]
        argv += ["--metrics-addr", f"127.0.0.1:{self.metrics_port}"]
        if self.jwt_flags:
            # The per-pod JWT rate limit (10/s) would measure the limit, not the latency.
            argv += ["--pod-socket-jwt-per-second", "100000", "--pod-socket-jwt-burst", "100000"]
        return argv

    @functools.cached_property
    def jwt_flags(self) -> bool:
        """Whether the driver has the per-pod JWT rate flags (an earlier commit's may not)."""
        argv = [sys.executable, "-m", "trio_spirecsi.cli", "serve", "--help"]
        shown = subprocess.run(argv, capture_output=True, text=True, check=False, **self.where())
        return "--pod-socket-jwt-per-second" in shown.stdout

    async def start_driver(self) -> float:
        """Start the driver; seconds from process start to its CSI socket accepting."""
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            self.driver_argv(), **self.where(benchmarks=self.launcher is not None)
        )
        await wait_accepting(self.csi)
        return time.perf_counter() - started

    def stop(self, proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait()

    async def start_ccore(self) -> Path:
        sock = self.root / "ccore.sock"
        argv = [sys.executable, "-m", "benchmarks.ccore_driver", "--csi-socket", str(sock)]
        argv += ["--admin-socket", str(self.admin), "--state-dir", str(self.root / "ccore")]
        argv += ["--kubelet-dir", str(self.kubelet), "--node-id", "bench"]
        argv += ["--stats", str(self.root / "ccore-stats.json")]
        self.ccore = subprocess.Popen(argv, **self.where(benchmarks=True))
        await wait_accepting(sock)
        return sock

    def target(self, pod: Pod) -> Path:
        parent = self.kubelet / "pods" / pod.uid / "volumes" / "kubernetes.io~csi" / "spiffe"
        parent.mkdir(parents=True)
        return parent / "mount"

    async def publish(self, client: CSIClient, into: list[tuple[str, Path]] | None = None) -> float:
        into = self.volumes if into is None else into
        pod = Pod(f"web-{uuid.uuid4().hex[:8]}", "bench", str(uuid.uuid4()), "web")
        volume_id = f"csi-{uuid.uuid4().hex}"
        target = self.target(pod)
        request = publish_request(volume_id, str(target), volume_context(pod))
        started = time.perf_counter()
        await client.publish(request)
        elapsed = time.perf_counter() - started
        into.append((volume_id, target))
        return elapsed

    def row(self, name: str, value: str) -> None:
        self.rows.append((name, value))
        print(f"  {name:<60} {value}", flush=True)

    def start_watching(self) -> None:
        """Switch the driver's profiler or loop timer on (see --profile, --loop-stats)."""
        if self.launcher is not None and self.proc is not None:
            self.proc.send_signal(signal.SIGUSR1)

    async def stop_watching(self, what: str) -> None:
        """Switch it off; with --loop-stats, print what the loop did during ``what``."""
        if self.launcher is None or self.proc is None:
            return
        module, out = self.launcher
        if module != "benchmarks.loopstats":
            self.proc.send_signal(signal.SIGUSR2)
            return
        lines = out.read_text().count("\n") if out.exists() else 0
        self.proc.send_signal(signal.SIGUSR2)
        with trio.fail_after(10):
            while not out.exists() or out.read_text().count("\n") == lines:
                await trio.sleep(0.05)
        stats = json.loads(out.read_text().splitlines()[-1])
        gcs = ", ".join(
            f"gen{g} {v['pauses']}x max {v['max_ms']:.1f} ms (total {v['total_ms']:.0f} ms, "
            f"up to {v['max_objects']} objects)"
            for g, v in stats["gc"].items()
        )
        self.row(
            f"  event loop during {what}: turns p50 / p99 / max",
            f"{stats['turn_p50_ms']:.2f} / {stats['turn_p99_ms']:.2f} / "
            f"{stats['turn_max_ms']:.1f} ms ({stats['turns']} turns)",
        )
        longest_ms, longest_task = stats["longest_step"]
        self.row(
            f"  event loop during {what}: longest task step, steps over 2 ms",
            f"{longest_ms:.1f} ms ({longest_task}); {stats['steps_over_2ms']}",
        )
        self.row(f"  event loop during {what}: garbage collection", gcs or "none")


async def startup_rows(bench: Bench) -> None:
    """Driver start-up (empty state folder) and the probes' start-up, each a median."""
    starts = []
    for _ in range(3):
        starts.append(await bench.start_driver())
        bench.stop(bench.proc)
    bench.row(
        "driver start-up: process start to CSI socket accepting (median of 3)",
        f"{statistics.median(starts) * 1000:.0f} ms",
    )


async def probe_rows(bench: Bench) -> None:
    probe = [*_cli(), "csi", "--endpoint", f"unix://{bench.csi}", "probe"]
    health = [*_cli(), "healthcheck", "--url", f"http://127.0.0.1:{bench.metrics_port}/healthz"]
    bench.row(
        "`trio-spirecsi csi probe`: process start to exit (median of 5)",
        f"{await command_seconds(bench, probe) * 1000:.0f} ms",
    )
    bench.row(
        "`trio-spirecsi healthcheck`: process start to exit (median of 5)",
        f"{await command_seconds(bench, health) * 1000:.0f} ms",
    )


async def ccore_stats(bench: Bench) -> dict[str, Any]:
    """What the C-core driver has recorded so far: ``handler_seconds`` of every publish, and
    ``phase_seconds`` by phase (absent from an earlier commit's C-core driver)."""
    assert bench.ccore is not None
    stats = bench.root / "ccore-stats.json"
    stats.unlink(missing_ok=True)
    bench.ccore.send_signal(signal.SIGUSR1)
    with trio.fail_after(10):
        while not stats.exists():
            await trio.sleep(0.01)
    found: dict[str, Any] = json.loads(stats.read_text())
    return found


async def compare_rows(bench: Bench, client: CSIClient, ccore: CSIClient, publishes: int) -> None:
    """Sequential publishes alternating between the driver and the C-core one; then the
    phases of the driver's publishes."""
    theirs: list[tuple[str, Path]] = []
    for _ in range(3):  # warm up both: connections, first calls
        await bench.publish(ccore, theirs)
    before = await bench.scrape()
    answers = len((await bench.agent.stats())["answers"])
    ours_s: list[float] = []
    theirs_s: list[float] = []
    assert bench.proc is not None and bench.ccore is not None
    cpu = cpu_seconds(bench.proc.pid), cpu_seconds(bench.ccore.pid)
    bench.start_watching()
    for _ in range(publishes):
        ours_s.append(await bench.publish(client))
        theirs_s.append(await bench.publish(ccore, theirs))
    await bench.stop_watching("the sequential publishes")
    ours_cpu = (cpu_seconds(bench.proc.pid) - cpu[0]) / publishes * 1000
    theirs_cpu = (cpu_seconds(bench.ccore.pid) - cpu[1]) / publishes * 1000
    after = await bench.scrape()
    agent_s = (await bench.agent.stats())["answers"][answers:]
    theirs_stats = await ccore_stats(bench)
    theirs_handler = statistics.mean(theirs_stats["handler_seconds"][-publishes:]) * 1000
    for volume_id, target in theirs:
        await ccore.unpublish(volume_id, str(target))
    (o50, o99), (t50, t99) = p50_p99(ours_s), p50_p99(theirs_s)
    bench.row(
        f"publish latency, {publishes} sequential (p50 / p99)", f"{o50:.1f} ms / {o99:.1f} ms"
    )
    bench.row(
        f"C-core driver, {publishes} sequential, alternating (p50 / p99)",
        f"{t50:.1f} ms / {t99:.1f} ms",
    )
    bench.row("ratio trio-spirecsi / C-core (p50 / p99)", f"{o50 / t50:.2f} / {o99 / t99:.2f}")
    bench.row(
        "CPU per publish: trio-spirecsi / C-core driver (its own process)",
        f"{ours_cpu:.2f} ms / {theirs_cpu:.2f} ms",
    )

    for phase in PUBLISH_PHASES:
        if f"{PHASE_SECONDS}_sum{{{phase}}}" not in after:
            bench.row(f"  publish phase: {phase} (mean)", "n/a (the driver does not report it)")
            continue
        seconds = mean_ms(before, after, PHASE_SECONDS, phase)
        bench.row(f"  publish phase: {phase} (mean)", f"{seconds:.2f} ms")
    p50, _ = p50_p99(agent_s)
    bench.row(
        f"  of first_svid: the {bench.agent.name}'s own answer (p50, both drivers)", f"{p50:.2f} ms"
    )
    total = mean_ms(before, after, "trio_spirecsi_publish_duration_seconds", "ok")
    bench.row("  driver's handler in all (mean; phases add up to it)", f"{total:.2f} ms")
    client_mean = statistics.mean(ours_s) * 1000
    bench.row(
        "  outside the handler: gRPC both ends, the client (mean)", f"{client_mean - total:.2f} ms"
    )
    theirs_mean = statistics.mean(theirs_s) * 1000
    bench.row(
        "  C-core driver: its handler / outside it (mean)",
        f"{theirs_handler:.2f} ms / {theirs_mean - theirs_handler:.2f} ms",
    )
    phases = theirs_stats.get("phase_seconds", {})
    if phases:
        shown = ", ".join(
            f"{phase} {statistics.mean(seconds[-publishes:]) * 1000:.2f}"
            for phase, seconds in phases.items()
        )
        bench.row("  C-core driver: its handler's phases (mean, ms)", shown)
    if bench.launcher is not None and bench.launcher[0] == "benchmarks.profiled":
        out = bench.launcher[1]
        print(f"\nprofile of the driver during the sequential publishes: {out}")
        pstats.Stats(str(out)).sort_stats("tottime").print_stats(25)


def mean_ms(before: dict[str, float], after: dict[str, float], name: str, label: str) -> float:
    """The mean of a histogram's observations between two scrapes, in milliseconds."""
    count = after[f"{name}_count{{{label}}}"] - before[f"{name}_count{{{label}}}"]
    spent = after[f"{name}_sum{{{label}}}"] - before[f"{name}_sum{{{label}}}"]
    return spent / max(count, 1) * 1000


async def storm_rows(
    bench: Bench, client: CSIClient, ccore: CSIClient, publishes: int, every: float
) -> None:
    """Sequential publishes while the agent rotates every volume of the driver every
    ``every`` seconds, alternating with the C-core driver's publishes (it sees the same
    agent, as busy). The agent wakes the streams a few per turn of its loop, as a real one
    answers them on many cores while it keeps serving; the bench does not scrape the driver
    during the storm (a scrape holds the driver's loop for milliseconds): at the end it
    waits until every rotation has landed."""
    live = len(bench.volumes)
    first_ttl = bench.agent.svid_ttl + 1
    done = 0

    async def storm() -> None:
        nonlocal done
        for ttl in itertools.count(first_ttl):
            # The driver counts a rotation when notAfter changes: a new TTL each time.
            await bench.agent.rotate_gradually(ttl)
            done += 1
            await trio.sleep(every)

    latencies: list[float] = []
    theirs_s: list[float] = []
    theirs: list[tuple[str, Path]] = []
    before = await bench.scrape()
    answers = len((await bench.agent.stats())["answers"])
    if bench.launcher is not None and bench.launcher[0] == "benchmarks.loopstats":
        bench.start_watching()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(storm)
        await trio.sleep(0.05)
        for _ in range(publishes):
            latencies.append(await bench.publish(client))
            theirs_s.append(await bench.publish(ccore, theirs))
        nursery.cancel_scope.cancel()
    if bench.launcher is not None and bench.launcher[0] == "benchmarks.loopstats":
        await bench.stop_watching("the storm")
    wanted = before[ROTATIONS] + done * live
    with trio.move_on_after(60):
        while (after := await bench.scrape())[ROTATIONS] < wanted:
            await trio.sleep(0.1)
    for volume_id, target in theirs:
        await ccore.unpublish(volume_id, str(target))
    landed = int((after[ROTATIONS] - before[ROTATIONS]) / live)
    bench.row(
        f"publish latency while {live} volumes rotate every {every:.1f} s "
        f"({publishes} sequential, p50 / p99)",
        f"{_ms(latencies)} ({done} rotations, {landed} landed)",
    )
    bench.row("  C-core driver meanwhile, alternating (p50 / p99)", _ms(theirs_s))
    reported = [p for p in PUBLISH_PHASES if f"{PHASE_SECONDS}_sum{{{p}}}" in after]
    if reported:
        phases = [f"{p} {mean_ms(before, after, PHASE_SECONDS, p):.1f}" for p in reported]
        bench.row("  its phases (mean, ms)", ", ".join(phases))
        agent_s = (await bench.agent.stats())["answers"][answers:]
        bench.row(
            f"  of first_svid: the {bench.agent.name}'s own answer meanwhile (p50 / p99, both "
            "drivers)",
            _ms(agent_s),
        )
        slow = {p: over(before, after, p, "0.01") for p in reported}
        bench.row(
            f"  its publishes with a phase over 10 ms (of {publishes})",
            ", ".join(f"{p} {n}" for p, n in slow.items() if n) or "none",
        )


def over(before: dict[str, float], after: dict[str, float], phase: str, le: str) -> int:
    """Publishes between two scrapes whose ``phase`` took longer than ``le`` seconds (the
    phase histogram's count minus its bucket)."""
    name = PHASE_SECONDS
    within = after[f"{name}_bucket{{{le},{phase}}}"] - before[f"{name}_bucket{{{le},{phase}}}"]
    count = after[f"{name}_count{{{phase}}}"] - before[f"{name}_count{{{phase}}}"]
    return int(count - within)


async def run(
    volumes: int,
    publishes: int,
    storm: int,
    launcher: tuple[str, Path] | None,
    driver_path: Path | None,
    go_agent: Path | None = None,
    storm_every: float | None = None,
) -> None:
    root = Path(tempfile.mkdtemp(prefix="trio-spirecsi-bench-"))
    # The state dir is on tmpfs in production (/run): measure it there, not on /tmp's disk.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(root)], check=True)
    bench = Bench(root, launcher, driver_path, go_agent)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}"
    )
    try:
        await bench.agent.start(str(bench.admin))
        await startup_rows(bench)
        await bench.start_driver()
        assert bench.proc is not None
        ccore_sock = await bench.start_ccore()
        async with (
            open_channel(str(bench.csi)) as channel,
            open_channel(str(ccore_sock)) as ccore_channel,
        ):
            client = CSIClient(channel)
            ccore = CSIClient(ccore_channel)
            await probe_rows(bench)
            # Warm up (imports, first connection), then measure.
            await bench.publish(client)
            base_rss = rss_bytes(bench.proc.pid)
            await compare_rows(bench, client, ccore, publishes)
            try:
                rows = await workload_api_latency(
                    client,
                    bench.kubelet,
                    rotate=functools.partial(
                        bench.agent.rotate, "spiffe://example.org/ns/bench/sa/socket"
                    ),
                )
            except RpcError as exc:  # an earlier driver: JWT calls limited to 10/s
                rows = [("Workload API and SDS", f"n/a ({exc.code.name}: {exc.message})")]
            for name, value in rows:
                bench.row(f"per-pod socket: {name}", value)

            await bulk_rows(bench, client, volumes)
            live = len(bench.volumes)
            await trio.sleep(1)
            rss = rss_bytes(bench.proc.pid)
            bench.row(
                f"driver RSS per live volume ({live} volumes)",
                f"{(rss - base_rss) / (live - 1) / 1024:.1f} KiB (total {rss >> 20} MiB)",
            )

            # Two windows: if the volumes grew the driver's memory by half, the heap policy
            # runs one full collection at its next freeze (within 10 s), in the first one.
            for window in ("first", "next"):
                cpu0 = cpu_seconds(bench.proc.pid)
                await trio.sleep(10)
                idle = (cpu_seconds(bench.proc.pid) - cpu0) / 10 * 100
                bench.row(
                    f"driver idle CPU with {live} volumes ({window} 10 s)",
                    f"{idle:.2f} % of a core",
                )

            took = await rotation_row(bench)
            # Rotations back to back, each with time to land while publishes run.
            every = storm_every if storm_every is not None else max(1.5 * took, 0.2)
            await storm_rows(bench, client, ccore, storm, every=every)
            bench.stop(bench.ccore)
            await restart_row(bench)
            for volume_id, target_path in bench.volumes:
                await client.unpublish(volume_id, str(target_path))
        bench.stop(bench.proc)
    finally:
        await bench.agent.stop()
        for proc in (bench.proc, bench.ccore):
            if proc and proc.poll() is None:
                proc.kill()
        remove_tmpfs(root)
    print("\n| measure | value |\n|---|---|")
    for name, value in bench.rows:
        print(f"| {name.strip()} | {value} |")


async def bulk_rows(bench: Bench, client: CSIClient, volumes: int) -> None:
    """Publishes 50 at a time up to ``volumes``."""
    wanted = volumes - len(bench.volumes)
    if wanted <= 0:
        return
    latencies: list[float] = []

    async def one() -> None:
        latencies.append(await bench.publish(client))

    started = time.perf_counter()
    while len(bench.volumes) < volumes:
        async with trio.open_nursery() as batch:
            for _ in range(min(50, volumes - len(bench.volumes))):
                batch.start_soon(one)
    took = time.perf_counter() - started
    bench.row(
        f"bulk publishing, {wanted} volumes 50 at a time",
        f"{wanted / took:.0f} volumes/s (latency p50 / p99: {_ms(latencies)})",
    )


async def rotation_row(bench: Bench) -> float:
    """The driver counts a rotation once the volume's new files are on disk."""
    assert bench.proc is not None
    live = len(bench.volumes)
    wanted = await bench.counter(ROTATIONS) + live
    started = time.perf_counter()
    assert bench.agent.proc is not None
    agent_pid = bench.agent.proc.pid
    driver_cpu, agent_cpu = cpu_seconds(bench.proc.pid), cpu_seconds(agent_pid)
    await bench.agent.rotate()
    with trio.fail_after(600):
        while await bench.counter(ROTATIONS) < wanted:
            await trio.sleep(0.05)
    took = time.perf_counter() - started
    driver_cpu = cpu_seconds(bench.proc.pid) - driver_cpu
    agent_cpu = cpu_seconds(agent_pid) - agent_cpu
    sample = bench.state / bench.volumes[-1][0] / "data" / "svid.pem"
    assert sample.read_bytes(), "files present after the rotation"
    bench.row(
        f"rotation of all {live} volumes landing on disk",
        f"{took:.2f} s (CPU: driver {driver_cpu:.1f} s, {bench.agent.name} {agent_cpu:.1f} s)",
    )
    return took


async def restart_row(bench: Bench) -> None:
    assert bench.proc is not None
    live = len(bench.volumes)
    bench.proc.kill()
    bench.proc.wait()
    await bench.agent.until(lambda stats: not stats["open_subscriptions"], 60)
    bench.csi.unlink(missing_ok=True)
    opened = (await bench.agent.stats())["subscribe_count"] + live
    restarted = time.perf_counter()
    serving = await bench.start_driver()
    await bench.agent.until(lambda stats: stats["subscribe_count"] >= opened, 300)
    took = time.perf_counter() - restarted
    bench.row(
        f"restart (kill -9) with {live} volumes: CSI socket accepting / all resubscribed",
        f"{serving:.2f} s / {took:.2f} s",
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--volumes", type=int, default=1000)
    parser.add_argument("--publishes", type=int, default=500)
    parser.add_argument("--storm-publishes", type=int, default=200)
    parser.add_argument(
        "--storm-every",
        type=float,
        help="seconds between the storm's rotations (default: 1.5 times the rotation row's)",
    )
    watch = parser.add_mutually_exclusive_group()
    watch.add_argument("--profile", type=Path, help="profile the driver into this file")
    watch.add_argument(
        "--loop-stats", type=Path, help="time the driver's event loop, summaries to this file"
    )
    parser.add_argument(
        "--driver-path", type=Path, help="run the driver from the trio_spirecsi package in DIR"
    )
    parser.add_argument(
        "--agent",
        choices=("dev", "go"),
        default="dev",
        help="the agent both drivers use: the dev agent (Python) or a grpc-go stand-in "
        "(built by scripts/goagent.sh, Debian packages installed as needed)",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench: the driver bind-mounts volumes; run as root (just bench)")
    volumes = max(args.volumes, args.publishes + 2)
    launcher = None
    if args.profile:
        launcher = ("benchmarks.profiled", args.profile.resolve())
    elif args.loop_stats:
        launcher = ("benchmarks.loopstats", args.loop_stats.resolve())
        launcher[1].unlink(missing_ok=True)
    driver_path = args.driver_path.resolve() if args.driver_path else None
    go_agent = build_go_agent("bench") if args.agent == "go" else None
    if args.storm_every is not None and not args.storm_every > 0:
        sys.exit("bench: --storm-every must be a positive number of seconds")
    trio.run(
        run,
        volumes,
        args.publishes,
        args.storm_publishes,
        launcher,
        driver_path,
        go_agent,
        args.storm_every,
    )


if __name__ == "__main__":
    main()
