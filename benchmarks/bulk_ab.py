"""``just bench-bulk``: bulk publishing of two drivers side by side, for before and after.

    python -m benchmarks.bulk_ab BEFORE_DIR AFTER_DIR [--rounds 120] [--restart-every 4]

The bench's bulk row publishes 499 volumes once, in under a second of a CPU-bound driver: on
a shared machine whose speed changes from one minute to the next, two runs of it cannot tell
a few per cent apart. Here both drivers (each DIR holds a ``trio_spirecsi`` package, e.g.
``git archive <commit> trio_spirecsi | tar -x -C DIR``) run at once on one agent, and rounds
alternate between them (before, after, after, before, ...): each round publishes
``--volumes`` volumes 50 at a time through one driver, then unpublishes them (untimed), and
both drivers are started anew every ``--restart-every`` rounds (one process of a commit can be
several per cent faster or slower than another of the same commit for its whole life). A
round's driver CPU is read from ``/proc/PID/task/*/schedstat`` (nanoseconds, every thread),
not from the 10 ms ticks of ``/proc/PID/stat``. Both drivers run on one core, this process
and the agent on another (with two cores or more), so that neither driver shares a core with
the client by chance. Prints the totals over every round and the
quartiles of the round-by-round ratio (after / before). Benchmark code, never shipped.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from trio_spirecsi.csi.client import CSIClient
from trio_spirecsi.grpc import open_channel

from .bench import Bench, build_go_agent, remove_tmpfs


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in nanoseconds."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


async def one_round(bench: Bench, client: CSIClient, volumes: int) -> tuple[float, float]:
    """Publish ``volumes`` volumes 50 at a time, then unpublish them; (seconds, CPU seconds)
    of the publishes."""
    assert bench.proc is not None
    made: list[tuple[str, Path]] = []

    async def one() -> None:
        await bench.publish(client, made)

    cpu0 = cpu_ns(bench.proc.pid)
    started = time.perf_counter()
    while len(made) < volumes:
        async with trio.open_nursery() as batch:
            for _ in range(min(50, volumes - len(made))):
                batch.start_soon(one)
    took = time.perf_counter() - started
    cpu = (cpu_ns(bench.proc.pid) - cpu0) / 1e9
    for volume_id, target in made:
        await client.unpublish(volume_id, str(target))
    return took, cpu


async def run(
    dirs: Sequence[Path], rounds: int, volumes: int, restart_every: int, go_agent: Path | None
) -> None:
    root = Path(tempfile.mkdtemp(prefix="trio-spirecsi-bulk-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(root)], check=True)
    benches = []
    for i, path in enumerate(dirs):
        (root / str(i)).mkdir()
        benches.append(Bench(root / str(i), None, path, go_agent))
    agent = benches[0].agent
    for bench in benches[1:]:
        bench.admin = benches[0].admin
    took: list[list[float]] = [[] for _ in dirs]
    cpu: list[list[float]] = [[] for _ in dirs]
    # Both drivers on one core, this process and the agent on another: otherwise whichever
    # driver the kernel happens to place beside the busy client runs slower, by as much as
    # the difference measured (without this, one
    # commit against itself differed by 4-8 %).
    pinned = len(os.sched_getaffinity(0)) >= 2
    cores = sorted(os.sched_getaffinity(0))
    if pinned:
        os.sched_setaffinity(0, {cores[0]})
    try:
        await agent.start(str(benches[0].admin))
        for session in range(math.ceil(rounds / restart_every)):
            # Fresh processes every few rounds: one process of a commit can run several per
            # cent faster or slower than another of the same commit for its whole life (hash
            # seeds, address layout), so each commit's figure is averaged over many.
            order = (0, 1) if session % 2 == 0 else (1, 0)
            for i in order:
                await benches[i].start_driver()
                proc = benches[i].proc
                assert proc is not None
                if pinned:
                    os.sched_setaffinity(proc.pid, {cores[1]})
            async with AsyncExitStack() as stack:
                clients = [
                    CSIClient(await stack.enter_async_context(open_channel(str(b.csi))))
                    for b in benches
                ]
                for bench, client in zip(benches, clients, strict=True):
                    # Warm up (imports, the agent connection); not counted.
                    await one_round(bench, client, 1)
                for r in range(session * restart_every, min(rounds, (session + 1) * restart_every)):
                    for i in order if r % 2 == 0 else order[::-1]:
                        seconds, cpu_seconds = await one_round(benches[i], clients[i], volumes)
                        took[i].append(seconds)
                        cpu[i].append(cpu_seconds)
                        await trio.sleep(0.2)  # the unpublishes' cleanup settles
            for bench in benches:
                bench.stop(bench.proc)
    finally:
        await agent.stop()
        for bench in benches:
            if bench.proc is not None and bench.proc.poll() is None:
                bench.proc.kill()
        remove_tmpfs(root)
    n = rounds * volumes
    print(f"{rounds} rounds of {volumes} volumes each, 50 at a time, alternating")
    print("| driver | volumes/s (all rounds) | driver CPU per publish |\n|---|---|---|")
    for path, t, c in zip(dirs, took, cpu, strict=True):
        print(f"| {path} | {n / sum(t):.0f} | {sum(c) / n * 1e6:.0f} us |")
    speed = [b / a for a, b in zip(took[1], took[0], strict=True)]
    work = [a / b for a, b in zip(cpu[1], cpu[0], strict=True)]
    for name, ratios in (("volumes/s", speed), ("driver CPU", work)):
        q1, q2, q3 = statistics.quantiles(ratios)
        print(f"after / before, {name} per round: median {q2:.3f} (quartiles {q1:.3f}, {q3:.3f})")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="folder holding the first trio_spirecsi")
    parser.add_argument("after", type=Path, help="folder holding the second trio_spirecsi")
    parser.add_argument("--rounds", type=int, default=120, help="rounds per driver")
    parser.add_argument("--volumes", type=int, default=100, help="volumes per round")
    parser.add_argument(
        "--restart-every", type=int, default=4, help="new driver processes after this many rounds"
    )
    parser.add_argument("--agent", choices=("dev", "go"), default="go", help="the agent")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bulk_ab: the drivers bind-mount volumes; run as root (just bench-bulk)")
    if args.rounds < 2 or args.volumes < 1 or args.restart_every < 1:
        sys.exit("bulk_ab: --rounds must be at least 2, --volumes and --restart-every 1 or more")
    for path in (args.before, args.after):
        if not (path / "trio_spirecsi" / "__init__.py").is_file():
            sys.exit(f"bulk_ab: {path} holds no trio_spirecsi package (see --help)")
    go_agent = build_go_agent("bulk_ab") if args.agent == "go" else None
    dirs = [args.before.resolve(), args.after.resolve()]
    trio.run(run, dirs, args.rounds, args.volumes, args.restart_every, go_agent)


if __name__ == "__main__":
    main()
