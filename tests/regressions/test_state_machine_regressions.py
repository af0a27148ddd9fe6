"""Sequences the state machine (tests/test_state_machine.py) once shrank to a failure.

Each test replays the shrunk sequence as plain calls on :class:`DriverMachine`, checking the
machine's invariants after every step exactly as the hypothesis run does, so a bug that was
fixed stays fixed even if the state machine's strategies change.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.test_state_machine import DriverMachine

pytestmark = pytest.mark.usefixtures("private_mount_ns")

Step = Callable[[DriverMachine], object]


def replay(*steps: Step) -> None:
    """Run ``steps`` on a fresh machine (driver started), settling after each one."""
    state = DriverMachine()
    try:
        state.start()
        state.settled()
        for step in steps:
            step(state)
            state.settled()
    finally:
        state.teardown()


@pytest.mark.parametrize("own_process", [False, True])
def test_failed_resume_leaves_no_task_writing_into_the_set_aside_folder(own_process: bool) -> None:
    """A publish killed after its metadata, before its files: at restart the bind mount of the
    missing data folder fails and the folder is set aside. The volume's task used to be started
    before the mount, kept running, and crashed the whole driver (FileNotFoundError) when its
    first SVID arrived and it tried to write into the folder that had been moved away."""
    replay(
        lambda s: s.stop_driver(restart="stay-down"),
        lambda s: s.interrupted_publish(account="web", namespace="default", stage="metadata"),
        lambda s: s.start_driver(own_process=own_process),
        lambda s: s.rotate(),
    )


@pytest.mark.parametrize("own_process", [False, True])
def test_identical_publish_of_a_resumed_volume_succeeds_while_the_agent_is_down(
    own_process: bool,
) -> None:
    """CSI requires NodePublishVolume to answer OK for a volume already published at that
    target (the kubelet calls it again, e.g. after its own restart). A volume resumed by a
    restarted driver while the agent was down has complete files from before and is mounted,
    but the driver answered UNAVAILABLE ("waiting for the first SVID") until the agent came
    back. It now answers OK when the volume's files are complete on disk."""
    replay(
        lambda s: s.publish_new(
            account="web", attrs="defaults", name="a", namespace="default", odd_id=False
        ),
        lambda s: s.stop_agent(restart="stay-down"),
        lambda s: s.stop_driver(restart="stay-down"),
        lambda s: s.start_driver(own_process=own_process),
        lambda s: s.publish_again(pick=0),
    )


@pytest.mark.parametrize("restart", ["in-process", "own-process"])
def test_a_resumed_volume_whose_entry_was_removed_is_abnormal(restart: str) -> None:
    """Once a resumed volume started with the SVID its files hold, a new driver that heard
    "no entry" from the agent before any SVID called it a plain NO_ENTRY (normal until the
    SVID nears expiry), not the lost entitlement the previous driver had reported. Files that
    hold an SVID now mean the pod had an identity, whichever driver wrote them."""
    replay(
        lambda s: s.publish_new(
            account="db", attrs="defaults", name="a", namespace="shop", odd_id=False
        ),
        lambda s: s.revoke(account="db", namespace="shop"),
        lambda s: s.stop_driver(restart=restart),
    )
