"""Fuzz every target for SECONDS each: ``python fuzz/run_all.py SECONDS`` (``just fuzz``).

Each target runs in its own process (``python -m fuzz.run``) with ``-max_total_time``,
starting from its committed seeds in ``fuzz/corpus/<target>/``; inputs it discovers go to a
scratch folder that is deleted afterwards, so the committed corpus never changes. An input that
breaks a target is kept as ``fuzz/crashes/<target>-crash-<sha1>`` and the run exits 1.
Turning one into a regression test: CONTRIBUTING.md, "A fuzz crash".
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
CRASHES = ROOT / "fuzz" / "crashes"
DICTS = ROOT / "fuzz" / "dicts"
TARGETS = sorted(p.stem for p in (ROOT / "fuzz" / "targets").glob("[!_]*.py"))


def run(target: str, seconds: int, scratch: Path) -> list[Path]:
    """Fuzz ``target``; the crash inputs it left (none when it held)."""
    work = scratch / target
    work.mkdir()
    before = set(CRASHES.glob(f"{target}-*"))
    argv = [
        sys.executable,
        "-m",
        "fuzz.run",
        target,
        str(work),
        str(CORPUS / target),
        f"-max_total_time={seconds}",
        f"-artifact_prefix={CRASHES}/{target}-",
        "-timeout=20",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
    ]
    dictionary = DICTS / f"{target}.dict"
    if dictionary.exists():
        argv.append(f"-dict={dictionary}")
    started = time.monotonic()
    code = subprocess.run(argv, cwd=ROOT, check=False).returncode
    found = sorted(set(CRASHES.glob(f"{target}-*")) - before)
    took = time.monotonic() - started
    verdict = "held" if code == 0 and not found else f"FAILED (exit {code})"
    print(f"== {target}: {verdict} after {took:.0f}s", flush=True)
    if code != 0 and not found:
        found = [Path(f"<{target} exited {code} without a crash input; see its output above>")]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("seconds", type=int, help="how long to fuzz each target")
    parser.add_argument("targets", nargs="*", help=f"some of {', '.join(TARGETS)} (default: all)")
    args = parser.parse_args()
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown targets {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    CRASHES.mkdir(exist_ok=True)
    failures: dict[str, list[Path]] = {}
    with tempfile.TemporaryDirectory(prefix="trio-spirecsi-fuzz-") as scratch:
        for target in args.targets or TARGETS:
            found = run(target, args.seconds, Path(scratch))
            if found:
                failures[target] = found
    if failures:
        print("\nInputs that broke a target (see CONTRIBUTING.md, 'A fuzz crash'):")
        for target, paths in failures.items():
            for path in paths:
                print(f"  {target}: {path}")
        return 1
    print(f"\nall {len(args.targets or TARGETS)} targets held for {args.seconds}s each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
