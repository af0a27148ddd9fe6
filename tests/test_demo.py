"""The README's first command: `scripts/bootstrap.sh demo && .venv/bin/just demo` installs only
what the demo needs, says each step once, and the demo ends by pointing to the next step."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_runs_end_to_end_and_points_to_the_next_step() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trio_spirecsi.cli", "demo", "--svid-ttl", "4"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    steps = re.findall(r"^== (.*)$", result.stdout, re.MULTILINE)
    assert len(steps) == len(set(steps)), steps
    assert steps[-2].startswith("done: ")
    assert steps[-1].startswith("next: ")
    tail = result.stdout[result.stdout.index("== next: ") :]
    for path in ("docs/operations.md", "k8s/", "charts/trio-spirecsi"):
        assert path in tail
        assert (ROOT / path).exists(), path
    assert "kubectl apply -k k8s/" in tail


def test_the_demo_extra_is_only_just() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert [re.split(r"[<>=;]", d)[0] for d in extras["demo"]] == ["rust-just"]
    assert "trio-spirecsi[test,demo]" in extras["dev"]
    runtime = {re.split(r"[<>=;\[]", d)[0] for d in project["dependencies"]}
    assert not runtime & {"pytest", "mypy", "ruff", "grpcio-tools", "atheris", "helm-python-sdk"}
    justfile = (ROOT / "justfile").read_text()
    assert re.search(r"^demo: setup-demo$", justfile, re.MULTILINE)
    assert re.search(r"^setup-demo:\n    @scripts/bootstrap.sh demo$", justfile, re.MULTILINE)


def _fake_checkout(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of bootstrap.sh and pyproject.toml with a .venv whose python records the pip
    calls it gets (no network), and the log of those calls."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "bootstrap.sh", tmp_path / "scripts" / "bootstrap.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "pip.log"
    fakes = {
        "python": f'#!/bin/sh\n[ "$1" = --version ] && {{ echo "Python 3.11.0"; exit 0; }}\n'
        f'echo "$*" >> {log}\n',
        "just": '#!/bin/sh\necho "just 1.59.0"\n',
    }
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return tmp_path, log


def _bootstrap(checkout: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["sh", str(checkout / "scripts" / "bootstrap.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_bootstrap_demo_installs_the_demo_extra_once_and_says_so_once(tmp_path: Path) -> None:
    checkout, log = _fake_checkout(tmp_path)
    first = _bootstrap(checkout, "demo")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        "bootstrap: installing the project with [demo] into .venv (a minute or two)",
        "bootstrap: .venv ready (Python 3.11.0, just 1.59.0)",
    ]
    assert (
        log.read_text()
        .splitlines()[-1]
        .endswith("pip install -q --disable-pip-version-check -e .[demo]")
    )

    again = _bootstrap(checkout, "demo")
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")

    everything = _bootstrap(checkout)
    assert everything.returncode == 0
    assert "with [dev]" in everything.stdout
    assert log.read_text().splitlines()[-1].endswith("-e .[dev]")
    assert _bootstrap(checkout, "demo").stdout == "", "dev includes demo"

    wrong = _bootstrap(checkout, "demos")
    assert wrong.returncode == 2
    assert wrong.stderr == "bootstrap: unknown mode 'demos'; use 'demo' or nothing (everything)\n"
