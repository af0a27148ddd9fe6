"""Session-wide fixtures.

The whole test session runs in a private mount namespace (entered in pytest_configure, while
pytest is still single-threaded, so every later thread and subprocess inherits it): mounts made
by tests are invisible to the machine and disappear with the process, even after a crash.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_spirecsi.storage.mount import mount_table

_CLONE_NEWNS = 0x20000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
# Set to the private namespace once entered, so that pytest processes started inside it (by
# tests, or as workers) know they are already in it.
_PRIVATE_NS_ENV = "TRIO_SPIRECSI_TEST_MOUNT_NS"

# Why mount tests cannot run, or None once the session is in a private namespace.
_namespace_problem: str | None = "pytest_configure did not run"


def _own_namespace() -> str:
    return os.readlink("/proc/self/ns/mnt")


def _pid1_namespace() -> str | None:
    try:
        return os.readlink("/proc/1/ns/mnt")
    except OSError:
        return None


def _enter_private_mount_namespace() -> str | None:
    if os.geteuid() != 0:
        return "mount tests need root (CAP_SYS_ADMIN); run the test suite as root"
    own = _own_namespace()
    # When pid 1 is hidden (some sandboxes), assume we share its namespace.
    if os.environ.get(_PRIVATE_NS_ENV) != own and _pid1_namespace() in (own, None):
        threads = len(os.listdir("/proc/self/task"))
        if threads != 1:
            return f"cannot unshare the mount namespace: {threads} threads already run"
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
        if libc.unshare(_CLONE_NEWNS) != 0:
            return f"unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}"
        if libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
            return f"making / private: {os.strerror(ctypes.get_errno())}"
    os.environ[_PRIVATE_NS_ENV] = _own_namespace()
    return None


def pytest_configure(config: pytest.Config) -> None:
    global _namespace_problem
    _namespace_problem = _enter_private_mount_namespace()


@pytest.fixture
def private_mount_ns() -> None:
    """Fails (never skips) unless mounts made now stay inside this test process."""
    if _namespace_problem is not None:
        pytest.fail(_namespace_problem, pytrace=False)
    own = _own_namespace()
    assert own == os.environ[_PRIVATE_NS_ENV]
    assert own != _pid1_namespace()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        optional = line.split(" - ")[0].split(" ")[6:]
        assert not any(tag.startswith("shared:") for tag in optional), line


@pytest.fixture
def root() -> None:
    """For tests that change file ownership or switch users: fails clearly when not root."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (chown, other users)", pytrace=False)


@pytest.fixture
def tmpfs(private_mount_ns: None, tmp_path: Path) -> Iterator[Path]:
    """A fresh tmpfs (memory-backed, like the production state directory), unmounted after."""
    path = tmp_path / "tmpfs"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A world-traversable folder (tmp_path is not: /tmp/pytest-of-root is 0700), for tests
    that read as another user. Mounts a test left inside are detached before deletion."""
    path = Path(tempfile.mkdtemp(prefix="trio-spirecsi-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        _detach_mounts_under(path)
        shutil.rmtree(path)


def _detach_mounts_under(path: Path) -> None:
    points = [m.mount_point for m in mount_table() if m.mount_point.is_relative_to(path)]
    for point in reversed(points):
        subprocess.run(["umount", "--lazy", str(point)], check=False)


# Hypothesis profiles ---------------------------------------------------------------------
# `ci` (the default) keeps the whole suite within its budget; `long` (HYPOTHESIS_PROFILE=long,
# `just soak`) runs the state machine for much longer. Examples drive real sockets, mounts and
# processes, so they have no deadline and may be slow to generate.
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

settings.register_profile(
    "ci",
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
    max_examples=2000,
)
settings.register_profile(
    "mutants",
    parent=settings.get_profile("ci"),
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    database=None,
)
"""For scripts/mutants.py: a broken copy of the code only has to fail, not shrink."""
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
