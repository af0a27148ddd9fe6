"""``just hostile``: what each hostile pod costs the driver, measured (never asserted).

The real driver process and a dev agent process on a tmpfs (as ``just bench``), an attacker
pod with the Workload API socket and a victim pod. For each attack (tests/hostile/, at the
sizes of the original findings) a fresh driver is started, then while the attack runs this
process samples the driver's RSS and descriptors, times CSI Probe on a new connection every
100 ms, and has the agent rotate once to time the victim's rotation (agent rotates -> new
files on disk). Once the attacker has left it waits up to 10 s for the descriptors to come
back. Prints one row per attack, then the targets each row missed:

    RSS < 160 MiB, Probe < 1 s, victim rotation < 5 s, descriptors back to baseline

    python -m benchmarks.hostile [--only NAME ...] [--list]

The attacks run in a worker thread of this process: their sends are system calls that
release the GIL, but on a loaded machine the probe and rotation timings include some of
this process's own scheduling.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from tests.hostile import attacks, wire
from tests.hostile.node import MIB, WORKLOAD_API, Node, Volume, wait_for
from trio_spirecsi.grpc import RpcError

TARGET_RSS = 160 * MIB
TARGET_PROBE = 1.0
TARGET_ROTATION = 5.0
PROBE_EVERY = 0.1
PROBE_TIMEOUT = 10.0
ROTATION_TIMEOUT = 30.0
FDS_BACK_WITHIN = 10.0

AttackFactory = Callable[[str], attacks.Attack]

ATTACKS: dict[str, AttackFactory] = {
    "non-utf8-header": lambda p: attacks.NonUtf8Header(p, "value"),
    "deflate-bomb": lambda p: attacks.CompressionBomb(p, "deflate", 400 * MIB),
    "streams": lambda p: attacks.ManyStreams(p, count=65536, max_seconds=30.0),
    "large-requests": lambda p: attacks.LargeRequests(p, connections=4, streams=16),
    "silent-connections": lambda p: attacks.SilentConnections(p, count=2000),
    "connections": lambda p: attacks.ManyConnections(p, count=64),
    "ping-flood": lambda p: attacks.PingFlood(p, max_bytes=1 << 30, max_seconds=20.0),
    "settings-flood": lambda p: attacks.SettingsFlood(p, max_bytes=1 << 30, max_seconds=20.0),
    "unknown-frames": lambda p: attacks.UnknownFrameFlood(p, max_bytes=1 << 30, max_seconds=20.0),
    "huge-frames": lambda p: attacks.HugeUnknownFrames(p, count=20, max_seconds=30.0),
    "continuation": lambda p: attacks.ContinuationFlood(p, max_bytes=1 << 30, max_seconds=30.0),
    "rapid-reset": lambda p: attacks.RapidReset(p, count=100_000, max_seconds=20.0),
    "jwt-flood": lambda p: attacks.JwtFlood(p, calls=2000, concurrency=16, wait=60.0),
}
AUDIENCES = "jwt-audiences"
"""The one row that is not a socket attack: a volume asking for 2,000 JWT audience sets."""


@dataclass
class Row:
    name: str
    saw: str = ""
    driver: str = "running"
    peak_rss: int = 0
    probe_max: float | None = 0.0
    probe_failures: int = 0
    rotation: float | None = None
    fds_before: int = 0
    fds_during: int = 0
    fds_after: int = 0
    cpu: float = 0.0
    elapsed: float = 0.0
    misses: list[str] = field(default_factory=list)

    def judge(self) -> None:
        if self.driver != "running":
            self.misses.append("driver died")
        if self.peak_rss >= TARGET_RSS:
            self.misses.append("RSS")
        if self.probe_max is None or self.probe_max >= TARGET_PROBE or self.probe_failures:
            self.misses.append("Probe")
        if self.rotation is None or self.rotation >= TARGET_ROTATION:
            self.misses.append("rotation")
        if self.fds_after > self.fds_before:
            self.misses.append("fds")

    def cells(self) -> list[str]:
        probe = "failed" if self.probe_max is None else f"{self.probe_max * 1000:.0f} ms"
        if self.probe_failures:
            probe += f" ({self.probe_failures} failed)"
        rotation = "none" if self.rotation is None else f"{self.rotation:.2f} s"
        return [
            self.name,
            self.saw,
            self.driver,
            f"{self.peak_rss / MIB:.0f} MiB",
            probe,
            rotation,
            f"{self.fds_before} / {self.fds_during} / {self.fds_after}",
            f"{self.cpu:.1f} s",
            ", ".join(self.misses) or "all met",
        ]


HEADERS = [
    "attack",
    "attacker saw",
    "driver",
    "peak RSS",
    "max Probe",
    "victim rotation",
    "fds before / during / after",
    "driver CPU",
    "targets missed",
]


class Bench:
    def __init__(self) -> None:
        self.node = Node()
        self.attacker: Volume | None = None
        self.victim: Volume | None = None

    async def setup(self) -> None:
        self.node.start(**{"log-level": "warning"})
        self.attacker = await self.node.publish("attacker", "attacker", WORKLOAD_API)
        self.victim = await self.node.publish("victim", "victim")

    def fresh_driver(self) -> None:
        self.node.restart_driver()
        assert self.attacker is not None
        socket = self.attacker.socket
        if not wait_for(lambda: _accepting(socket), 30):
            raise RuntimeError("the attacker pod's socket did not come back")

    async def measure(self, name: str, run: Callable[[], None], finish: Callable[[], str]) -> Row:
        """Run ``run`` (blocking) in a thread while sampling; ``finish`` ends the attack
        (the attacker leaves) and says what the attacker saw."""
        node = self.node
        assert self.victim is not None
        row = Row(name)
        self.fresh_driver()
        row.fds_before = node.steady_fd_count()
        node.reset_peak_rss()
        cpu = node.cpu_seconds()
        started = time.perf_counter()
        done = trio.Event()
        probes: list[float] = []

        async def attack() -> None:
            try:
                await trio.to_thread.run_sync(run)
            finally:
                done.set()

        async def sample() -> None:
            while not done.is_set():
                row.peak_rss = max(row.peak_rss, node.peak_rss(), node.rss())
                row.fds_during = max(row.fds_during, node.fd_count())
                row.cpu = max(row.cpu, node.cpu_seconds() - cpu)
                await trio.sleep(0.05)

        async def probe() -> None:
            while not done.is_set():
                try:
                    probes.append(await node.probe(timeout=PROBE_TIMEOUT))
                except (RpcError, OSError, trio.TooSlowError, AssertionError):
                    row.probe_failures += 1
                await trio.sleep(PROBE_EVERY)

        async def rotate() -> None:
            assert self.victim is not None
            with trio.move_on_after(1.0):
                await done.wait()
            if node.driver_alive():
                row.rotation = await node.rotation_seconds(self.victim, ROTATION_TIMEOUT)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attack)
            nursery.start_soon(sample)
            nursery.start_soon(probe)
            await rotate()
        row.elapsed = time.perf_counter() - started
        row.peak_rss = max(row.peak_rss, node.peak_rss())
        row.cpu = max(row.cpu, node.cpu_seconds() - cpu)
        row.saw = finish()
        row.probe_max = max(probes) if probes else None
        if node.driver_alive():
            deadline = time.monotonic() + FDS_BACK_WITHIN
            while node.fd_count() > row.fds_before and time.monotonic() < deadline:
                await trio.sleep(0.1)
            row.fds_after = node.fd_count()
        else:
            assert node.driver is not None
            row.driver = f"exited ({node.driver.returncode})"
        row.judge()
        return row

    async def socket_attack(self, name: str, factory: AttackFactory) -> Row:
        assert self.attacker is not None
        attack = factory(self.attacker.socket)

        def finish() -> str:
            outcome = attack.outcome()
            attack.close()
            return _summary(outcome)

        return await self.measure(f"{name}: {attack}", attack.run, finish)

    async def audiences(self) -> Row:
        """Publish a volume with 2,000 audience sets (finding 5); the agent's JWT-SVID
        calls for it are counted from its log."""
        node = self.node
        value = ";".join(f"bench-aud-{i}" for i in range(2000))
        result: list[str] = []
        before = _agent_jwt_calls(node, "bench-aud-")

        def run() -> None:
            volume_id = f"csi-{uuid.uuid4().hex}"
            publish = functools.partial(
                node.publish,
                "audiences",
                "audiences",
                {"csi.spire.io/jwt-audiences": value},
                volume_id=volume_id,
            )
            try:
                volume = trio.from_thread.run(publish)
            except RpcError as exc:
                result.append(f"refused {exc.code.name}")
            else:
                result.append("published")
                trio.from_thread.run(node.unpublish, volume)

        def finish() -> str:
            calls = _agent_jwt_calls(node, "bench-aud-") - before
            return f"{result[0] if result else 'no answer'}; agent signed {calls} JWT-SVIDs"

        return await self.measure(f"{AUDIENCES}: 2000 sets ({len(value)} bytes)", run, finish)


def _accepting(path: str) -> bool:
    try:
        wire.connect_unix(path, timeout=1.0).close()
    except OSError:
        return False
    return True


def _agent_jwt_calls(node: Node, prefix: str) -> int:
    return sum(
        1 for line in node.agent_log_lines() if "jwt_svids_issued" in line and prefix in line
    )


def _summary(outcome: attacks.Outcome) -> str:
    parts = []
    if outcome.goaways:
        parts.append("GOAWAY " + ",".join(sorted({wire.error_name(c) for c in outcome.goaways})))
    if outcome.connections > 1 or outcome.closed:
        parts.append(f"{outcome.closed}/{outcome.connections} closed")
    if outcome.resets:
        parts.append(f"{sum(outcome.resets.values())} RST_STREAM")
    if outcome.statuses:
        parts.append(
            "grpc-status " + ",".join(f"{c}x{n}" for c, n in sorted(outcome.statuses.items()))
        )
    if outcome.served:
        parts.append(f"{outcome.served} served")
    parts.append(f"{outcome.sent / MIB:.1f} MiB sent")
    return "; ".join(parts)


async def main(names: list[str]) -> None:
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}",
        flush=True,
    )
    bench = Bench()
    rows: list[Row] = []
    try:
        await bench.setup()
        for name in names:
            print(f"  {name} ...", end=" ", flush=True)
            if name == AUDIENCES:
                row = await bench.audiences()
            else:
                row = await bench.socket_attack(name, ATTACKS[name])
            rows.append(row)
            print(" | ".join(row.cells()[1:]), flush=True)
    finally:
        bench.node.close()
    print(
        f"\ntargets: peak RSS < {TARGET_RSS // MIB} MiB, Probe < {TARGET_PROBE:g} s, victim "
        f"rotation < {TARGET_ROTATION:g} s, descriptors back to baseline within "
        f"{FDS_BACK_WITHIN:g} s\n"
    )
    print("| " + " | ".join(HEADERS) + " |")
    print("|" + "---|" * len(HEADERS))
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")


def cli() -> None:
    names = [*ATTACKS, AUDIENCES]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", action="append", choices=names, metavar="NAME", help="run only these attacks"
    )
    parser.add_argument("--list", action="store_true", help="list the attacks and exit")
    args = parser.parse_args()
    if args.list:
        print("\n".join(names))
        return
    if os.geteuid() != 0:
        sys.exit("hostile: the driver bind-mounts volumes; run as root (just hostile)")
    trio.run(main, args.only or names)


if __name__ == "__main__":
    cli()
