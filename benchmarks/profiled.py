"""Run ``trio-spirecsi`` under cProfile switched on and off by signals, for ``just bench``.

    python -m benchmarks.profiled OUT.prof serve --csi-endpoint ...

SIGUSR1 starts profiling the Trio thread, SIGUSR2 stops it and writes the statistics to
OUT.prof (``python -m pstats OUT.prof``). Start-up and resume stay out of the profile: the
benchmark switches it on around the calls it wants to see. Benchmark code, never shipped.
"""

from __future__ import annotations

import cProfile
import signal
import sys
from types import FrameType

from trio_spirecsi.cli import main


def run(out: str, argv: list[str]) -> int:
    profiler = cProfile.Profile()

    def start(signum: int, frame: FrameType | None) -> None:
        profiler.enable()

    def stop(signum: int, frame: FrameType | None) -> None:
        profiler.disable()
        profiler.dump_stats(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    return main(argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2:]))
