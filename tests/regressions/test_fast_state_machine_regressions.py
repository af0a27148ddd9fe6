"""Programs the fast state machine (tests/test_state_machine_fast.py) once failed on.

Each test replays a program with :func:`~tests.test_state_machine_fast.replay`, which checks
every invariant after each step exactly as the hypothesis run does, so a bug that was fixed
stays fixed even if the machine's strategies change.
"""

from __future__ import annotations

from tests.test_state_machine_fast import AgentOp, Publish, Restart, Revoke, replay


def test_jwt_svid_follows_the_x509_identity_when_the_first_entry_is_removed() -> None:
    """Pod ``b`` matches two entries; the first (its service account's) is revoked. The
    X.509 files switched to the second identity at once, but the JWT-SVID kept the revoked
    one until its half-life refresh. The JWT refresher now wakes when the X.509 identity the
    volume chooses changes."""
    replay(
        [
            Publish(namespace="default", account="web", name="b", family="jwt"),
            Revoke(identity=0),
        ]
    )


def test_a_volume_resumed_while_the_agent_is_down_stays_normal() -> None:
    """After a restart with the agent down, a resumed volume reported an abnormal condition
    ("waiting for the first SVID", then the agent's problem) although its files held a valid
    SVID. It now starts with the SVID its files hold."""
    replay(
        [
            Publish(namespace="default", account="web", name="a", family="defaults"),
            AgentOp(action="down"),
            Restart(),
        ]
    )


def test_a_resumed_volume_whose_entry_was_removed_stays_abnormal() -> None:
    """The pod's only entry is removed, then the driver restarts: the resumed volume's files
    still hold the SVID, so its condition must stay abnormal (lost entitlement), as before
    the restart, not turn normal because the new driver never had an SVID for it."""
    replay(
        [
            Publish(namespace="default", account="web", name="a", family="defaults"),
            Revoke(identity=0),
            Restart(),
        ]
    )


def test_a_volume_without_its_chosen_identity_stays_abnormal_when_the_agent_refuses() -> None:
    """The identity a volume asked for (spiffe-id) stops being issued: abnormal. The agent
    then refuses the driver, a more important problem that is not the node's: the condition
    turned normal, as it only looked at the most important problem. It now looks at the
    most important local one too."""
    replay(
        [
            Publish(namespace="default", account="db", name="b", family="spiffe-id"),
            Revoke(identity=4),
            AgentOp(action="refuse"),
        ]
    )
