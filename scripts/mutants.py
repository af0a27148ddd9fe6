"""Deliberately broken copies of the driver, and the fast test that must catch each one.

Each mutant is a small textual patch (a known bug, or one that once slipped through). For
every mutant this script copies the tree to a temporary folder (the working tree is never
touched), applies the patch there, runs the fast test that should catch it with a timeout,
and prints a table: mutant -> caught by -> outcome -> seconds. First it runs every listed
test on an unpatched copy: a test that fails without a mutant proves nothing.

    python scripts/mutants.py               # every mutant against its targeted test
    python scripts/mutants.py --machine     # ... and against the fast state machine too
    python scripts/mutants.py --only backoff-zero --only backoff-uncapped

Exit status 1 if a mutant survives (or no longer applies: update its patch here).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST = "tests/test_registry_fast.py"
MACHINE = "tests/test_state_machine_fast.py"
COPY_IGNORE = shutil.ignore_patterns(
    ".venv", ".git", ".hypothesis", "__pycache__", "*.pyc", ".mypy_cache", ".ruff_cache"
)


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    path: str
    edits: tuple[tuple[str, str], ...]
    """(old, new) replacements; each ``old`` must occur exactly once in ``path``."""
    test: str
    """The fast test (pytest node id) that catches it."""
    beyond_machine: str = ""
    """Why the fast state machine cannot catch it, if it cannot (``--machine`` skips it)."""


def _fast(name: str) -> str:
    return f"{FAST}::{name}"


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "backoff-zero",
        "backoff that returns 0 (a hot loop while the agent is down)",
        "trio_spirecsi/spire/backoff.py",
        (("return ceiling * (0.5 + self._rng.random() / 2)", "return 0.0"),),
        _fast("test_an_unreachable_agent_is_retried_with_backoff_not_in_a_loop"),
    ),
    Mutant(
        "backoff-uncapped",
        "backoff without its cap",
        "trio_spirecsi/spire/backoff.py",
        (
            (
                "ceiling = min(self.maximum, self.initial * float(2 ** min(self._attempts, 32)))",
                "ceiling = self.initial * float(2 ** min(self._attempts, 32))",
            ),
        ),
        _fast("test_a_volume_failing_alone_retries_within_the_backoff_cap_after_a_long_time"),
    ),
    Mutant(
        "socket-by-account",
        "the per-pod socket looks its state up by namespace/service account, not by volume",
        "trio_spirecsi/workloadapi/socket.py",
        (
            (
                "    WorkloadApi(volume, agent, jwt_limit).register(server)\n"
                "    SecretDiscovery(volume, agent, metrics).register(server)",
                "    pod = plan.spec.pod\n"
                "    volume = _BY_ACCOUNT.setdefault("
                "(pod.namespace, pod.service_account), volume)\n"
                "    WorkloadApi(volume, agent, jwt_limit).register(server)\n"
                "    SecretDiscovery(volume, agent, metrics).register(server)",
            ),
            (
                "\nasync def serve_volume_socket(",
                "\n_BY_ACCOUNT = {}\n\n\nasync def serve_volume_socket(",
            ),
        ),
        _fast("test_each_pods_socket_serves_its_own_identity_when_pods_share_a_service_account"),
    ),
    Mutant(
        "condition-no-expiry",
        "VOLUME_CONDITION never reports an expired SVID",
        "trio_spirecsi/volumes/volume.py",
        (("        if now >= written.expires_at:", "        if False:"),),
        _fast("test_condition_reports_an_expired_svid"),
    ),
    Mutant(
        "condition-no-renewal",
        "VOLUME_CONDITION never reports an SVID that is not renewed",
        "trio_spirecsi/volumes/volume.py",
        (
            (
                "        if (problem is not None and elapsed > 0.75) or elapsed > 0.9:",
                "        if False:",
            ),
        ),
        _fast("test_condition_reports_an_svid_nobody_renews_while_the_agent_is_down"),
    ),
    Mutant(
        "republish-no-remount",
        "publishing again does not re-mount a target that lost its mount",
        "trio_spirecsi/volumes/registry.py",
        (
            (
                "            if not self._mounter.is_mounted(target, volume.plan.data_dir):",
                "            if False:",
            ),
        ),
        _fast("test_publishing_again_remounts_a_target_that_lost_its_mount"),
    ),
    Mutant(
        "unpublish-other-target",
        "unpublish with another target leaves the published one mounted",
        "trio_spirecsi/volumes/registry.py",
        (("                await self._teardown(volume_id, known.target)\n", ""),),
        _fast("test_unpublish_at_another_target_tears_down_the_published_one"),
    ),
    Mutant(
        "rotations-uncounted",
        "svid_rotations_total is never incremented",
        "trio_spirecsi/volumes/volume.py",
        (("            self._metrics.svid_rotations_total.inc()", "            pass"),),
        _fast("test_a_rotation_reaches_the_files_and_is_counted"),
    ),
    Mutant(
        "same-id-other-target",
        "the same volume ID at another target answers OK",
        "trio_spirecsi/volumes/registry.py",
        (
            (
                "            Path(md.target_path) == self.target_path\n            and ",
                "            ",
            ),
        ),
        _fast("test_publishing_the_same_volume_id_at_another_target_is_already_exists"),
    ),
    Mutant(
        "unpublish-stream-open",
        "unpublish leaves the volume's agent stream open",
        "trio_spirecsi/volumes/registry.py",
        (("            await entry.volume.stop()\n", ""),),
        _fast("test_unpublish_closes_the_agent_stream_and_leaves_nothing"),
    ),
    Mutant(
        "in-place-writes",
        "the writer rewrites the current generation in place",
        "trio_spirecsi/storage/writer.py",
        (
            (
                '    folder = tempfile.mkdtemp(prefix=f"..{stamp}.", dir=data_dir)',
                "    current = _current(data_dir)\n"
                "    folder = os.path.join(data_dir, current) if current else "
                'tempfile.mkdtemp(prefix=f"..{stamp}.", dir=data_dir)',
            ),
            (
                "_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL |",
                "_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC |",
            ),
        ),
        _fast("test_a_rotation_never_changes_files_a_reader_already_opened"),
    ),
    Mutant(
        "key-mode-0644",
        "the private key is written 0644",
        "trio_spirecsi/attributes.py",
        (
            (
                "        default_key_mode = 0o600 if gid is None else 0o640",
                "        default_key_mode = 0o644",
            ),
        ),
        _fast("test_private_key_is_readable_by_the_owner_only"),
    ),
    Mutant(
        "dropped-selector",
        "the pod-uid selector is not sent to the agent",
        "trio_spirecsi/spire/selectors.py",
        (('        Selector("k8s", f"pod-uid:{pod.uid}"),\n', ""),),
        _fast("test_the_agent_is_asked_with_every_selector_of_the_pod"),
    ),
    Mutant(
        "resume-keeps-orphans",
        "resume skips the cleanup of folders without metadata",
        "trio_spirecsi/volumes/registry.py",
        (("        for path in result.orphans:", "        for path in []:"),),
        _fast("test_a_restart_resumes_volumes_and_removes_folders_without_metadata"),
    ),
    Mutant(
        "ignored-rotation",
        "a volume keeps its first SVID set and ignores rotations",
        "trio_spirecsi/volumes/volume.py",
        (
            (
                "        self.x509.value = update\n",
                "        self.x509.value = self.x509.value or update\n",
            ),
        ),
        _fast("test_a_rotation_reaches_the_files_and_is_counted"),
    ),
    Mutant(
        "jwt-never-refreshed",
        "a JWT-SVID is fetched once and never refreshed",
        "trio_spirecsi/volumes/volume.py",
        (
            (
                "            await self._until_identity_moves(delay, svid.spiffe_id)",
                "            await trio.sleep_forever()",
            ),
        ),
        _fast("test_jwt_svid_is_refreshed_before_it_expires"),
    ),
    Mutant(
        "non-federated-bundles",
        "bundles of trust domains the entry does not federate with are written",
        "trio_spirecsi/render.py",
        (
            (
                "tuple(td for td in update.federates_with if td != primary.trust_domain)",
                "tuple(td for td in x509_bundles if td != primary.trust_domain)",
            ),
        ),
        _fast("test_only_federated_trust_domains_get_bundle_files"),
    ),
    Mutant(
        "fs-group-ignored",
        "the kubelet's fsGroup (volume_mount_group) is ignored",
        "trio_spirecsi/attributes.py",
        (("        gid = self._gid(volume_mount_group)", '        gid = self._gid("")'),),
        _fast("test_fs_group_owns_the_files_and_opens_the_key_to_the_group"),
    ),
    Mutant(
        "cancelled-publish-kept",
        "a publish the kubelet cancels keeps what it created",
        "trio_spirecsi/volumes/registry.py",
        (
            (
                '            trace.mark("mount")\n        except BaseException:',
                '            trace.mark("mount")\n        except Exception:',
            ),
        ),
        _fast("test_a_cancelled_publish_leaves_nothing_behind"),
    ),
    Mutant(
        "refused-publish-keeps-stream",
        "a publish refused after its subscription left keeps the agent stream open",
        "trio_spirecsi/volumes/registry.py",
        (
            (
                "                await first.aclose()  # unless a volume took it",
                "                pass  # unless a volume took it",
            ),
        ),
        _fast("test_a_publish_to_a_refused_target_leaves_no_agent_stream"),
        "the stream's generator is finalized once the failed publish lets go of it, so the "
        "machine's settled state shows no extra stream; only the moment after the answer does",
    ),
    Mutant(
        "stopped-volume-keeps-publish-stream",
        "a volume stopped while its publish waits for the first SVID leaves that stream open",
        "trio_spirecsi/volumes/volume.py",
        (("        handover.scope.cancel()\n", "        pass\n"),),
        _fast("test_a_driver_stopping_while_a_publish_waits_for_the_agent_closes_its_stream"),
        "the machine restarts the driver between steps, never while a publish waits",
    ),
    Mutant(
        "no-per-volume-lock",
        "calls for one volume ID are not serialised",
        "trio_spirecsi/volumes/registry.py",
        (
            (
                "            try:\n                lock.acquire_nowait()",
                "            yield\n            return\n"
                "            try:\n                lock.acquire_nowait()",
            ),
        ),
        _fast("test_concurrent_publishes_of_one_volume_id_publish_it_once"),
    ),
)


_REASON = re.compile(r"^[\s|]*((?:E\s+)?\w*(?:Error|Exception|Failure)\b.*)")


@dataclass(frozen=True)
class Outcome:
    caught: bool
    detail: str
    seconds: float


def copy_tree(dest: Path) -> Path:
    tree = dest / "tree"
    shutil.copytree(ROOT, tree, ignore=COPY_IGNORE, symlinks=True)
    return tree


def apply(mutant: Mutant, tree: Path) -> None:
    path = tree / mutant.path
    text = path.read_text()
    for old, new in mutant.edits:
        found = text.count(old)
        if found != 1:
            raise SystemExit(
                f"mutant {mutant.name} no longer applies: {old!r} occurs {found} times in "
                f"{mutant.path}; update its patch in scripts/mutants.py"
            )
        text = text.replace(old, new)
    path.write_text(text)


def run_tests(tree: Path, tests: Sequence[str], timeout: float) -> Outcome:
    """Run ``tests`` in ``tree`` (its code first on the path); caught = they failed."""
    env = dict(
        os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1", HYPOTHESIS_PROFILE="mutants"
    )
    argv = [sys.executable, "-m", "pytest", "-q", "-x", "--tb=short", "-p", "no:cacheprovider"]
    argv += tests
    started = time.monotonic()
    try:
        done = subprocess.run(
            argv, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return Outcome(True, f"timeout after {timeout:g}s", time.monotonic() - started)
    seconds = time.monotonic() - started
    lines = done.stdout.strip().splitlines() or ["(no output)"]
    if done.returncode == 0:
        return Outcome(False, lines[-1], seconds)
    if done.returncode != 1:
        return Outcome(True, f"error (pytest exit {done.returncode}): {lines[-1]}", seconds)
    reasons = [m.group(1) for m in map(_REASON.search, lines) if m]
    return Outcome(True, reasons[0] if reasons else lines[-1], seconds)


def check_imports_copy(tree: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree))
    code = "import trio_spirecsi; print(trio_spirecsi.__file__)"
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    if not Path(found).is_relative_to(tree):
        raise SystemExit(f"the copy's tests would import {found}, not the copy: cannot mutate")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], help="run only this mutant")
    parser.add_argument("--machine", action="store_true", help="also run the fast machine")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per test run")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--why", action="store_true", help="print why each test failed")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutant(s) {', '.join(sorted(unknown))}")
    if args.list:
        for mutant in chosen:
            print(f"{mutant.name:24} {mutant.what}")
        return 0

    with tempfile.TemporaryDirectory(prefix="spirecsi-mutants-") as scratch:
        clean = copy_tree(Path(scratch) / "clean")
        check_imports_copy(clean)
        tests = sorted({m.test for m in chosen} | ({MACHINE} if args.machine else set()))
        baseline = run_tests(clean, tests, args.timeout * len(tests))
        if baseline.caught:
            print(f"the tests fail without any mutant: {baseline.detail}", file=sys.stderr)
            return 1
        print(f"baseline: {len(tests)} test(s) pass unmutated ({baseline.seconds:.1f}s)\n")
        header = "| mutant | caught by | outcome | seconds |"
        if args.machine:
            header += " fast state machine | seconds |"
        print(header)
        print("|" + "---|" * (header.count(" | ") + 1))
        survivors = []
        for n, mutant in enumerate(chosen):
            tree = copy_tree(Path(scratch) / f"m{n}")
            apply(mutant, tree)
            outcome = run_tests(tree, [mutant.test], args.timeout)
            row = (
                f"| {mutant.name}: {mutant.what} | `{mutant.test.split('::')[-1]}` | "
                f"{'caught' if outcome.caught else 'SURVIVED'} | {outcome.seconds:.1f} |"
            )
            survived = not outcome.caught
            machine = None
            if args.machine and mutant.beyond_machine:
                row += " n/a | - |"
            elif args.machine:
                machine = run_tests(tree, [MACHINE], args.timeout)
                row += f" {'caught' if machine.caught else 'SURVIVED'} | {machine.seconds:.1f} |"
                survived = survived or not machine.caught
            print(row, flush=True)
            if args.why:
                print(f"    {outcome.detail[:300]}", flush=True)
                if machine is not None:
                    print(f"    machine: {machine.detail[:300]}", flush=True)
            if survived:
                survivors.append(mutant.name)
            shutil.rmtree(tree)
    if survivors:
        print(f"\nsurvived: {', '.join(survivors)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
