"""Run ``trio-spirecsi`` while timing its event loop, for ``just bench --loop-stats``.

    python -m benchmarks.loopstats OUT.json serve --csi-endpoint ...

Between SIGUSR1 and SIGUSR2 it records how long each scheduler turn takes (from the end
of one I/O wait to the start of the next: every task that was runnable ran once), how long
each task step takes (by coroutine), and every garbage collection pause; SIGUSR2 appends a
summary to OUT.json (one JSON object per line). A publish waits one turn at each of its
steps, so long turns are what a sequential publish sees as tail latency. The hooks cost a
little on every step: latencies measured this way are not comparable with a plain run.
Benchmark code, never shipped.
"""

from __future__ import annotations

import gc
import json
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import trio

from trio_spirecsi.cli import main

LONG_STEP = 0.002


class LoopStats(trio.abc.Instrument):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.on = False
        self.step_started = time.perf_counter()
        self.reset()

    def reset(self) -> None:
        self.turns: list[float] = []
        self.turn_started: float | None = None
        self.step_seconds: dict[str, float] = {}
        self.long_steps: Counter[str] = Counter()
        self.longest_step = (0.0, "")
        self.gc_pauses: dict[int, list[float]] = {}
        self.gc_started = 0.0
        self.gc_examined: dict[int, list[int]] = {}

    # trio.abc.Instrument

    def after_io_wait(self, timeout: float) -> None:
        self.turn_started = time.perf_counter()

    def before_io_wait(self, timeout: float) -> None:
        if self.on and self.turn_started is not None:
            self.turns.append(time.perf_counter() - self.turn_started)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.step_started = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if not self.on:
            return
        seconds = time.perf_counter() - self.step_started
        code = getattr(task.coro, "cr_code", None)
        name = code.co_qualname if code is not None else task.name
        self.step_seconds[name] = self.step_seconds.get(name, 0.0) + seconds
        if seconds > LONG_STEP:
            self.long_steps[name] += 1
        if seconds > self.longest_step[0]:
            self.longest_step = (seconds, name)

    # gc.callbacks

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            if self.on:
                generation = info["generation"]
                examined = sum(len(gc.get_objects(g)) for g in range(generation + 1))
                self.gc_examined.setdefault(generation, []).append(examined)
            self.gc_started = time.perf_counter()
        elif self.on:
            pause = time.perf_counter() - self.gc_started
            self.gc_pauses.setdefault(info["generation"], []).append(pause)

    # signals

    def start(self, signum: int, frame: FrameType | None) -> None:
        self.reset()
        self.on = True

    def stop(self, signum: int, frame: FrameType | None) -> None:
        self.on = False
        turns = sorted(self.turns) or [0.0]
        summary = {
            "turns": len(self.turns),
            "turn_p50_ms": statistics.median(turns) * 1000,
            "turn_p99_ms": turns[max(int(len(turns) * 0.99) - 1, 0)] * 1000,
            "turn_max_ms": turns[-1] * 1000,
            "longest_step": [self.longest_step[0] * 1000, self.longest_step[1]],
            "steps_over_2ms": dict(self.long_steps.most_common(8)),
            "busiest_tasks_ms": {
                name: seconds * 1000
                for name, seconds in sorted(self.step_seconds.items(), key=lambda i: -i[1])[:8]
            },
            "gc": {
                str(generation): {
                    "pauses": len(p),
                    "max_ms": max(p) * 1000,
                    "total_ms": sum(p) * 1000,
                    "max_objects": max(self.gc_examined.get(generation, [0])),
                }
                for generation, p in sorted(self.gc_pauses.items())
            },
            "tracked_objects": len(gc.get_objects()),
        }
        with self.out.open("a") as fh:
            fh.write(json.dumps(summary) + "\n")


def run(out: str, argv: list[str]) -> int:
    stats = LoopStats(Path(out))
    gc.callbacks.append(stats.on_gc)
    signal.signal(signal.SIGUSR1, stats.start)
    signal.signal(signal.SIGUSR2, stats.stop)
    plain_run = trio.run

    def instrumented(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("instruments", []).append(stats)
        return plain_run(*args, **kwargs)

    trio.run = instrumented  # type: ignore[assignment]  # the CLI's own run, instrumented
    return main(argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2:]))
