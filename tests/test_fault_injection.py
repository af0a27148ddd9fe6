"""Faults under the state dir during a rotation and during resume: one volume's trouble
stays that volume's.

The real driver process (and a dev agent process) on a small tmpfs state dir, with two
volumes. Each test injects one fault the node can really have, while the agent rotates or
while a restarted driver resumes, then clears it:

- **read-only**: the faulty volume's ``data/`` folder bind-remounted read-only (EROFS), as
  a volume whose folder cannot be written. Only that volume is affected: the other one
  keeps rotating meanwhile.
- **full**: the state tmpfs (``size=``) filled by a file, deleted afterwards (ENOSPC). Every
  volume lives on that tmpfs, so every volume is faulty until it is cleared.
- **descriptors**: the driver's RLIMIT_NOFILE lowered (``prlimit``) to the descriptors it
  holds, then restored (EMFILE). Process-wide: every volume is faulty meanwhile, and the
  driver cannot accept a new connection, so the kubelet's calls go over a connection
  opened before the fault.

What must hold: the driver process survives; each faulty volume keeps its last complete
files readable (the same certificate, its matching key) and NodeGetVolumeStats reports it
abnormal (with descriptors exhausted the call itself may fail, but it never reports the
volume healthy); the volumes without the fault rotate; once the fault is cleared every
faulty volume gets new files and is reported normal again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.faults import full, read_only
from tests.harness import read_identity
from tests.hostile.node import Node, Volume, in_private_mount_namespace, svid_serial
from trio_spirecsi.csi.client import CSIClient
from trio_spirecsi.grpc import RpcError, StatusCode

WAIT = 20.0
"""Generous bound for anything the driver must do (noisy shared machines)."""
STATE_SIZE = "8m"


@dataclass(frozen=True)
class Volumes:
    faulty: Volume
    healthy: Volume


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    if not in_private_mount_namespace():
        pytest.fail("fault injection mounts tmpfs and bind mounts: run the tests as root")
    node = Node(state_size=STATE_SIZE)
    try:
        node.start()
        yield node
    finally:
        node.close()


@pytest.fixture(scope="module")
def volumes(node: Node) -> Volumes:
    return Volumes(
        faulty=trio.run(node.publish, "faulty", "faulty"),
        healthy=trio.run(node.publish, "healthy", "healthy"),
    )


@pytest.fixture
def running(node: Node, volumes: Volumes) -> Node:
    """A driver serving both volumes (restarted when an earlier test's fault killed it)."""
    if not node.driver_alive():
        node.restart_driver()
    return node


# Faults -------------------------------------------------------------------------------


def _lowest_free_fd(pid: int) -> int:
    used = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    fd = 0
    while fd in used:
        fd += 1
    return fd


def _nofile(pid: int) -> tuple[str, str]:
    out = subprocess.run(
        ["prlimit", "--pid", str(pid), "--nofile", "--noheadings", "--raw", "-o", "SOFT,HARD"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return out[0], out[1]


@contextlib.contextmanager
def no_descriptors(pid: int) -> Iterator[None]:
    """The process's RLIMIT_NOFILE lowered to its lowest free descriptor (every new one
    fails EMFILE) until exit, then restored."""
    soft, hard = _nofile(pid)
    limit = _lowest_free_fd(pid)
    subprocess.run(["prlimit", "--pid", str(pid), f"--nofile={limit}:{hard}"], check=True)
    try:
        yield
    finally:
        restore = ["prlimit", "--pid", str(pid), f"--nofile={soft}:{hard}"]
        subprocess.run(restore, check=False, capture_output=True)  # fails if it is gone


# Checks -------------------------------------------------------------------------------


def volume_dir(node: Node, volume: Volume) -> Path:
    return node.state_dir / volume.volume_id / "data"


def assert_last_files(volume: Volume, serial: int, fault: str) -> None:
    """The pod still reads the complete set it had before the fault."""
    identity = read_identity(volume.target)
    assert identity.serial == serial, (
        f"{volume.pod.name}'s files changed while '{fault}' held (serial {identity.serial:x}, "
        f"was {serial:x})"
    )
    assert identity.key_matches, f"{volume.pod.name}'s key does not match its certificate"


async def wait_rotated(node: Node, volume: Volume, serial: int, what: str) -> None:
    with trio.move_on_after(WAIT):
        while True:
            with contextlib.suppress(OSError, ValueError):
                if svid_serial(volume.target) != serial:
                    assert read_identity(volume.target).key_matches
                    return
            node.check_alive(what)
            await trio.sleep(0.02)
    node.check_alive(what, grace=5)
    raise AssertionError(f"{volume.pod.name} got no new files within {WAIT:g} s {what}")


async def wait_condition(
    node: Node,
    client: CSIClient,
    volume: Volume,
    abnormal: bool,
    what: str,
    *,
    errors_count_as_abnormal: bool = False,
) -> str:
    """Poll NodeGetVolumeStats until its condition is ``abnormal``; its message."""
    last = "no answer"
    with trio.move_on_after(WAIT):
        while True:
            node.check_alive(what)
            try:
                stats = await client.stats(volume.volume_id, str(volume.target))
            except RpcError as exc:
                # UNAVAILABLE: the connection is gone, most likely with the driver.
                node.check_alive(what, grace=5 if exc.code == StatusCode.UNAVAILABLE else 0)
                if not errors_count_as_abnormal:
                    raise AssertionError(
                        f"NodeGetVolumeStats for {volume.pod.name} failed {what}: {exc}"
                    ) from None
                if abnormal:
                    return f"(call failed: {exc})"
                last = f"call failed: {exc}"
            else:
                condition = stats.volume_condition
                if condition.abnormal == abnormal:
                    return condition.message
                if errors_count_as_abnormal and not condition.abnormal:
                    raise AssertionError(
                        f"{volume.pod.name} reported healthy ({condition.message!r}) {what}"
                    )
                last = f"abnormal={condition.abnormal}: {condition.message}"
            await trio.sleep(0.1)
    node.check_alive(what, grace=5)
    state = "abnormal" if abnormal else "normal"
    raise AssertionError(
        f"{volume.pod.name} was not reported {state} within {WAIT:g} s {what} (last: {last})"
    )


@asynccontextmanager
async def kubelet(node: Node) -> AsyncIterator[CSIClient]:
    async with node.csi(timeout=WAIT) as client:
        yield client


async def check_fault(
    node: Node,
    client: CSIClient,
    volumes: Volumes,
    faulty: Sequence[Volume],
    serials: dict[str, int],
    fault: str,
    *,
    descriptors: bool = False,
) -> None:
    """While the fault holds: alive, Probe, faulty volumes keep their files and are
    reported abnormal, the others rotate."""
    what = f"while '{fault}' holds"
    node.check_alive(what)
    healthy = [v for v in (volumes.faulty, volumes.healthy) if v not in faulty]
    for volume in healthy:
        await wait_rotated(node, volume, serials[volume.volume_id], what)
    for volume in faulty:
        await wait_condition(node, client, volume, True, what, errors_count_as_abnormal=descriptors)
        assert_last_files(volume, serials[volume.volume_id], fault)
    try:
        with trio.fail_after(WAIT):
            assert await client.probe()
    except (RpcError, trio.TooSlowError) as exc:
        node.check_alive(what, grace=5)
        raise AssertionError(f"CSI Probe failed {what}: {exc!r}") from None
    for volume in healthy:  # and they keep rotating
        serial = svid_serial(volume.target)
        node.rotate()
        await wait_rotated(node, volume, serial, what)
    # With descriptors exhausted a failed NodeGetVolumeStats cannot show that the writes were
    # tried: give every volume's write a moment to meet the fault before the last look.
    await trio.sleep(1.0)
    node.check_alive(what)
    for volume in faulty:
        assert_last_files(volume, serials[volume.volume_id], fault)


async def check_recovered(
    node: Node, client: CSIClient, faulty: Sequence[Volume], serials: dict[str, int], fault: str
) -> None:
    what = f"after '{fault}' was cleared"
    for volume in faulty:
        await wait_rotated(node, volume, serials[volume.volume_id], what)
        await wait_condition(node, client, volume, False, what)
    node.check_alive(what)


def current_serials(volumes: Volumes) -> dict[str, int]:
    return {v.volume_id: svid_serial(v.target) for v in (volumes.faulty, volumes.healthy)}


# During a rotation ----------------------------------------------------------------------


async def test_read_only_volume_during_rotation(running: Node, volumes: Volumes) -> None:
    node = running
    fault = "faulty volume folder read-only, agent rotated"
    async with kubelet(node) as client:
        serials = current_serials(volumes)
        with read_only(volume_dir(node, volumes.faulty)):
            node.rotate()
            await check_fault(node, client, volumes, [volumes.faulty], serials, fault)
        await check_recovered(node, client, [volumes.faulty], serials, fault)


async def test_full_state_tmpfs_during_rotation(running: Node, volumes: Volumes) -> None:
    node = running
    fault = "state tmpfs full, agent rotated"
    every = [volumes.faulty, volumes.healthy]
    async with kubelet(node) as client:
        serials = current_serials(volumes)
        with full(node.state_dir):
            node.rotate()
            await check_fault(node, client, volumes, every, serials, fault)
        await check_recovered(node, client, every, serials, fault)


async def test_descriptors_exhausted_during_rotation(running: Node, volumes: Volumes) -> None:
    node = running
    fault = "driver out of descriptors, agent rotated"
    every = [volumes.faulty, volumes.healthy]
    async with kubelet(node) as client:
        serials = current_serials(volumes)
        with no_descriptors(node.pid):
            node.rotate()
            await check_fault(node, client, volumes, every, serials, fault, descriptors=True)
        await check_recovered(node, client, every, serials, fault)


# During resume -------------------------------------------------------------------------
# The driver is stopped, the agent rotates, the fault is set, and a new driver resumes the
# volumes: its first write of each volume meets the fault.


async def test_read_only_volume_during_resume(running: Node, volumes: Volumes) -> None:
    node = running
    fault = "faulty volume folder read-only, driver resumed"
    serials = current_serials(volumes)
    node.stop_driver()
    node.rotate()
    with read_only(volume_dir(node, volumes.faulty)):
        node.start_driver(when=f"while resuming with '{fault}'")
        async with kubelet(node) as client:
            await check_fault(node, client, volumes, [volumes.faulty], serials, fault)
    async with kubelet(node) as client:
        await check_recovered(node, client, [volumes.faulty], serials, fault)


async def test_full_state_tmpfs_during_resume(running: Node, volumes: Volumes) -> None:
    node = running
    fault = "state tmpfs full, driver resumed"
    every = [volumes.faulty, volumes.healthy]
    serials = current_serials(volumes)
    node.stop_driver()
    node.rotate()
    with full(node.state_dir):
        node.start_driver(when=f"while resuming with '{fault}'")
        async with kubelet(node) as client:
            await check_fault(node, client, volumes, every, serials, fault)
    async with kubelet(node) as client:
        await check_recovered(node, client, every, serials, fault)


async def test_descriptors_exhausted_during_resume(running: Node, volumes: Volumes) -> None:
    """The agent is paused (SIGSTOP) while the new driver starts, so that the driver is
    connected but has no SVID yet when its descriptors run out; the agent then answers."""
    node = running
    fault = "driver out of descriptors, driver resumed"
    every = [volumes.faulty, volumes.healthy]
    serials = current_serials(volumes)
    node.stop_driver()
    node.rotate()
    assert node.agent is not None
    node.agent.send_signal(signal.SIGSTOP)
    try:
        node.start_driver(when=f"while resuming with '{fault}'")
        node.steady_fd_count()
        async with kubelet(node) as client:
            with no_descriptors(node.pid):
                node.agent.send_signal(signal.SIGCONT)
                await check_fault(node, client, volumes, every, serials, fault, descriptors=True)
            await check_recovered(node, client, every, serials, fault)
    finally:
        node.agent.send_signal(signal.SIGCONT)
