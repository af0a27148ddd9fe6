"""The driver as a state machine, fast: thousands of steps in seconds, in virtual time.

The real registry, volumes, node service, writer, metadata store and per-pod socket server run
against the in-memory agent and mounter of :mod:`tests.fast_node`, in virtual time
(:func:`~tests.fast_node.fast_clock`: ``MockClock(autojump_threshold=0)``). Hypothesis draws
a program of operations, one at a time, and each runs and is checked before the next is
drawn. Each program publishes only a few attribute families (swarm testing), so that the
interactions within one family are likely:

- the kubelet: publish a new volume with any attribute family (renamed files, fsGroup, JWT
  audiences with a JWT bundle and federated bundle files, the Workload API socket with and
  without an ``svid-hint``, layout ``spiffe-fs``, ``spiffe-id``, ``all-svids``), attributes
  that must be refused, the same publish again, a conflicting one (other attributes, other
  target), a retry of a failed one, unpublish at the published target or another one,
  unpublish again, several calls on ONE volume ID at once (publish, publish elsewhere,
  unpublish, in one order or another), a publish the kubelet gives up on after some
  scheduling points;
- the world: a target that loses its mount behind the driver's back (and the kubelet that
  notices and publishes again);
- the agent: rotation, a new CA (with or without the old root), an extra root, an identity
  revoked and restored, the agent down and up again (or down for a while: an outage),
  refusing and accepting the driver, no longer renewing (cut off from its server) and
  renewing again, away while the oldest SVID ages past 75% or 90% of its life;
- time: from half a second to more than an SVID's lifetime (SVIDs live 600 s, JWT-SVIDs
  120 s), or until the oldest SVID is at 80%, 95% or 105% of its life, so SVIDs near expiry,
  expired SVIDs and JWT half-lives all happen;
- the driver: a restart (a new registry on the same state folder, which resumes), with a
  folder without metadata or a publish interrupted after its metadata left behind.

After every step the model (what the kubelet and the agent know) and the node must agree,
first at once (safety), then within a bounded wait of virtual time (:data:`SETTLE`: the
longest backoff plus a margin):

- safety: no private key or token readable by others anywhere in the state folder; an
  unpublished volume's folder, target and mount never come back; no target is mounted twice,
  and every mount shows the data folder of the volume published there;
- a folder in the state folder for exactly the volumes the driver holds (a restart removes
  folders without metadata and sets aside what it cannot resume); a mount at exactly their
  targets (except one that lost its mount and was not published again);
- one open SVID stream per held volume while the agent serves the driver, none otherwise,
  and never a retry loop without backoff (the fake agent counts calls);
- a published volume's files parse, the key matches the certificate, modes and group are
  the family's, and a generation of files a reader may hold open never changes; while the
  agent serves the pod, the SVID is the one the agent holds for the
  identity the volume chose, the bundle is the agent's current one, federated bundle files
  are those of the trust domains the pod's entries federate with and no other, the JWT-SVIDs
  name the pod and the audiences and have not expired, the per-pod socket serves the SVID
  the files hold;
- NodeGetVolumeStats' condition is abnormal exactly when expected: the SVID expired, the
  pod lost its entitlement or its chosen identity, or the SVID is past 75% of its life while
  the agent does not serve the pod, or past 90% at all; otherwise normal, naming the SVID;
- ``svid_rotations_total`` counts at least the rotations seen in the files.

Why a drawn program in one ``trio.run`` and not hypothesis' ``RuleBasedStateMachine``: rules
are synchronous, so the node would run in a Trio thread while hypothesis thinks in another,
and a mock clock that jumps whenever Trio is idle would jump at random while hypothesis
generates the next step. Here the draws happen inside the Trio task, so the loop is never
idle while hypothesis thinks: virtual time passes only when the program makes it pass, every
example is deterministic, and there is no thread hop per step.

Profiles: ``ci`` (default) runs 50 programs of up to 100 steps, about 2,500 steps in some
seconds; ``HYPOTHESIS_PROFILE=long`` (``just soak``) 2,000 programs of up to 300 steps. A
failure prints the program as a Python list; paste it into ``replay([...])`` in
``tests/regressions/test_fast_state_machine_regressions.py`` to keep it (see CONTRIBUTING.md).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import itertools
import json
import os
import stat
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, NoReturn, cast, get_args

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from prometheus_client import Counter as Counter_
from trio.testing import wait_all_tasks_blocked

from tests.fakes import FakeAgent
from tests.fast_node import (
    EPOCH,
    FS_GROUP,
    NODE_ID,
    FastNode,
    fake_clock,
    fast_clock,
    fast_folder,
    open_fast_node,
)
from trio_spirecsi._proto.csi.v1 import csi_pb2 as csi
from trio_spirecsi._proto.spiffe.workload import workload_pb2 as wl
from trio_spirecsi.csi.client import Pod
from trio_spirecsi.devagent.entries import Entry
from trio_spirecsi.grpc import RpcError, StatusCode, methods, open_channel
from trio_spirecsi.spiffe import Preference
from trio_spirecsi.spire.backoff import AGENT_RETRY
from trio_spirecsi.spire.responses import split_der
from trio_spirecsi.storage.metadata import MetadataStore, VolumeMetadata, folder_name

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
pytestmark = pytest.mark.timeout(0 if LONG else 300)

TRUST_DOMAIN = "example.org"
PARTNER = "partner.example"
OTHER = "other.example"
"""A trust domain the agent knows but no entry federates with: its bundle is never written."""
NAMESPACES = ("default", "shop")
ACCOUNTS = ("web", "db")
POD_NAMES = ("a", "b")
SVID_TTL = 600
JWT_TTL = 120
ADVANCES = (0.5, 5.0, 30.0, 100.0, 250.0, 500.0, 560.0, 700.0)
"""How long time passes in one step: from fresh, 500 s is past 75% of an SVID's life, 560 s
past 90%, 700 s past its expiry."""
MAX_VOLUMES = 12
"""Volumes (published, failed or uncertain) the kubelet keeps at most: a node's worth."""
SETTLE = AGENT_RETRY.maximum + 5.0
"""Virtual seconds a step may take to settle: the longest backoff, and a margin."""
STEP_LIMIT = 3600.0
"""Virtual seconds one step may take at most (a step that hangs fails here)."""
PRIVATE_KEY = b"PRIVATE KEY-----"
PREFIX = "csi.spire.io/"


def account_id(namespace: str, account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{account}"


POD_B = f"spiffe://{TRUST_DOMAIN}/pod/b"
ENTRIES = (
    *(
        Entry(
            account_id(ns, sa),
            frozenset({("k8s", f"ns:{ns}"), ("k8s", f"sa:{sa}")}),
            federates_with=(PARTNER,) if sa == "web" else (),
        )
        for ns in NAMESPACES
        for sa in ACCOUNTS
    ),
    Entry(POD_B, frozenset({("k8s", "pod-name:b")}), hint="pod"),
)
"""One entry per namespace and service account (``web`` federates with the partner), and a
second identity, with hint ``pod``, for every pod named ``b``."""
IDENTITIES = tuple(e.spiffe_id for e in ENTRIES)


# Attribute families -----------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """What a pod asks for, and what its volume must then look like."""

    attributes: Mapping[str, str] = field(default_factory=dict)
    fs_group: str = ""
    refused: str | None = None
    """The field INVALID_ARGUMENT must name, for attributes the driver refuses."""
    svid_file: str = "svid.pem"
    key_file: str = "svid_key.pem"
    bundle_file: str = "svid_bundle.pem"
    spiffe_fs: bool = False
    federated_files: bool = False
    jwt: Mapping[tuple[str, ...], str] = field(default_factory=dict)
    """Audience set -> token file."""
    jwt_bundle_file: str | None = None
    socket: bool = False
    gid: int | None = None
    preference: Preference = field(default_factory=Preference)

    @property
    def key_mode(self) -> int:
        return 0o600 if self.gid is None else 0o640

    @property
    def key_path(self) -> str:
        return "credential-bundle.pem" if self.spiffe_fs else self.key_file

    def federated_name(self, trust_domain: str) -> str:
        suffix = ".spiffe-trust-bundle.pem" if self.spiffe_fs else ".pem"
        return trust_domain + suffix


def _attrs(**values: str) -> dict[str, str]:
    return {PREFIX + name.replace("_", "-"): value for name, value in values.items()}


FAMILIES: dict[str, Family] = {
    "defaults": Family(),
    "renamed": Family(
        _attrs(svid_file="tls.crt", svid_key_file="tls.key", bundle_file="ca.crt"),
        svid_file="tls.crt",
        key_file="tls.key",
        bundle_file="ca.crt",
    ),
    "fs-group": Family(fs_group=str(FS_GROUP), gid=FS_GROUP),
    "jwt": Family(
        _attrs(
            jwt_audiences="api, db;billing",
            jwt_bundle_file="jwt_bundle.json",
            federated_bundles="files",
        ),
        federated_files=True,
        jwt={("api", "db"): "jwt_svid-0.token", ("billing",): "jwt_svid-1.token"},
        jwt_bundle_file="jwt_bundle.json",
    ),
    "socket": Family(_attrs(workload_api="true"), socket=True),
    "hint-socket": Family(
        _attrs(svid_hint="pod", workload_api="true", fs_group=str(FS_GROUP)),
        socket=True,
        gid=FS_GROUP,
        preference=Preference(hint="pod"),
    ),
    "spiffe-fs": Family(
        _attrs(layout="spiffe-fs", federated_bundles="files"), spiffe_fs=True, federated_files=True
    ),
    "spiffe-id": Family(_attrs(spiffe_id=POD_B), preference=Preference(spiffe_id=POD_B)),
    "all-svids": Family(_attrs(all_svids="true")),
}
REFUSED: dict[str, Family] = {
    "misspelt": Family({"csi.spire.io/svid-flie": "x.pem"}, refused="csi.spire.io/svid-flie"),
    "world-readable-key": Family(_attrs(key_file_mode="0644"), refused=PREFIX + "key-file-mode"),
    "spiffe-fs-renamed": Family(
        _attrs(layout="spiffe-fs", svid_file="x.pem"), refused=PREFIX + "svid-file"
    ),
    "named-group": Family(fs_group="staff", refused="volume_mount_group"),
}


# Operations ------------------------------------------------------------------------------


class Op:
    """One step of a program; ``apply`` does it and checks the answers the kubelet gets."""

    async def apply(self, m: Machine) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Publish(Op):
    namespace: str
    account: str
    name: str
    family: str
    odd_id: bool = False

    async def apply(self, m: Machine) -> None:
        if m.full:
            return
        vol = m.new_volume(self.namespace, self.account, self.name, self.family, self.odd_id)
        error = await m.node.publish(m.request(vol))
        m.expect_publish(vol, error, m.expected_publish(vol))
        vol.status = "published" if error is None else "failed"
        m.volumes[vol.volume_id] = vol


@dataclass(frozen=True)
class PublishRefused(Op):
    namespace: str
    account: str
    family: str

    async def apply(self, m: Machine) -> None:
        family = REFUSED[self.family]
        vol = m.new_volume(self.namespace, self.account, "a", "defaults", False)
        error = await m.node.publish(
            m.node.request(
                vol.volume_id,
                vol.pod,
                family.attributes,
                target=vol.target,
                fs_group=family.fs_group,
            )
        )
        if error is None or error.code != StatusCode.INVALID_ARGUMENT:
            m.fail(f"attributes {self.family!r} were not refused: {error!r}")
        if family.refused is None or family.refused not in error.message:
            m.fail(f"the refusal does not name {family.refused}: {error.message}")
        m.gone[vol.volume_id] = vol


@dataclass(frozen=True)
class PublishRefusedTarget(Op):
    """A target the driver refuses after the volume's subscription has left (the agent
    answers while the target is walked): a symlink on the way, or its pod folder gone.
    Nothing of it may stay: no folder, no mount, no stream (check_structure counts them)."""

    namespace: str
    account: str
    how: Literal["symlink", "pod-gone"]

    async def apply(self, m: Machine) -> None:
        vol = m.new_volume(self.namespace, self.account, "a", "defaults", False)
        parent = vol.target.parent
        parent.rmdir()
        if self.how == "symlink":
            outside = m.node.kubelet_dir.parent / f"outside-{m.next()}"
            outside.mkdir()
            parent.symlink_to(outside)
        error = await m.node.publish(m.request(vol))
        if error is None or error.code != StatusCode.INVALID_ARGUMENT:
            m.fail(f"a publish to a target with {self.how} was not refused: {error!r}")
        m.gone[vol.volume_id] = vol


@dataclass(frozen=True)
class PublishAgain(Op):
    """The same request again (the kubelet does): OK, nothing duplicated, mounted again."""

    pick: int

    async def apply(self, m: Machine) -> None:
        vol = m.pick(self.pick, "published")
        if vol is None:
            return
        error = await m.node.publish(m.request(vol))
        if error is not None:
            m.fail(f"identical publish of {vol.volume_id} answered {error!r}")
        vol.mount_lost = False


@dataclass(frozen=True)
class PublishConflicting(Op):
    pick: int
    change: Literal["attributes", "target"]

    async def apply(self, m: Machine) -> None:
        vol = m.pick(self.pick, "published")
        if vol is None:
            return
        if self.change == "target":
            request = m.request(vol, target=vol.other_target)
        else:
            request = m.request(
                replace(vol, family="renamed" if vol.family != "renamed" else "defaults")
            )
        error = await m.node.publish(request)
        if error is None or error.code != StatusCode.ALREADY_EXISTS:
            m.fail(f"publish of {vol.volume_id} with another {self.change} answered {error!r}")


@dataclass(frozen=True)
class RetryPublish(Op):
    """The kubelet retries a publish that failed (or that a restart left uncertain)."""

    pick: int

    async def apply(self, m: Machine) -> None:
        vol = m.pick(self.pick, "failed", "uncertain")
        if vol is None:
            return
        expected = m.expected_publish(vol)
        error = await m.node.publish(m.request(vol))
        if vol.status == "uncertain" and vol.seen is not None:
            # A resumed volume whose files were once complete is published, whatever the
            # agent does now.
            expected = None
        elif vol.status == "uncertain" and expected is not None and error is not None:
            # A resumed volume without files answers with the last problem it saw; the
            # agent may have changed since (it retries with backoff).
            expected = error.code if error.code in _NOT_SERVED else expected
        m.expect_publish(vol, error, expected)
        if error is None:
            vol.status = "published"
            vol.mount_lost = False


@dataclass(frozen=True)
class Unpublish(Op):
    pick: int
    at: Literal["target", "other"] = "target"

    async def apply(self, m: Machine) -> None:
        vol = m.pick(self.pick, "published", "failed", "uncertain")
        if vol is None:
            return
        target = vol.target if self.at == "target" else vol.other_target
        # A target the driver made for a volume it no longer knows (a resume that failed) is
        # removed only when the kubelet names it.
        vol.target_kept = self.at == "other" and not m.held(vol)
        error = await m.node.unpublish(vol.volume_id, target)
        if error is not None:
            m.fail(f"unpublish of {vol.volume_id} at the {self.at} answered {error!r}")
        del m.volumes[vol.volume_id]
        m.gone[vol.volume_id] = vol


@dataclass(frozen=True)
class UnpublishAgain(Op):
    pick: int

    async def apply(self, m: Machine) -> None:
        if not m.gone:
            return
        vol = sorted(m.gone.values(), key=lambda v: v.volume_id)[self.pick % len(m.gone)]
        error = await m.node.unpublish(vol.volume_id, vol.target)
        if error is not None:
            m.fail(f"unpublish of {vol.volume_id}, already gone, answered {error!r}")
        vol.target_kept = False


Call = tuple[Literal["publish", "unpublish"], Literal["target", "other"]]


@dataclass(frozen=True)
class Concurrent(Op):
    """Several kubelet calls on ONE volume ID at once. The driver serialises them per ID:
    the answers must be those of some order of the calls, and the node must end as that
    order leaves it."""

    fresh: bool
    pick: int
    family: str
    calls: tuple[Call, ...]

    async def apply(self, m: Machine) -> None:
        vol = None if self.fresh else m.pick(self.pick, "published")
        if vol is None and m.full:
            return
        if vol is None:
            vol = m.new_volume(
                NAMESPACES[self.pick % 2], ACCOUNTS[self.pick // 2 % 2], "a", self.family, False
            )
            start: _Where = (None, False)
        else:
            start = ("target", vol.mount_lost)
        answers: dict[int, RpcError | None] = {}

        async def call(index: int, kind: str, at: str) -> None:
            target = vol.target if at == "target" else vol.other_target
            if kind == "publish":
                answers[index] = await m.node.publish(m.request(vol, target=target))
            else:
                answers[index] = await m.node.unpublish(vol.volume_id, target)

        async with trio.open_nursery() as nursery:
            for index, (kind, at) in enumerate(self.calls):
                nursery.start_soon(call, index, kind, at)
        codes = [_code(answers[i]) for i in range(len(self.calls))]
        new = m.expected_publish(vol)
        finals = set()
        for order in itertools.permutations(range(len(self.calls))):
            where: _Where = start
            expected: dict[int, StatusCode | None] = {}
            for index in order:
                expected[index], where = _simulate(self.calls[index], where, new)
            if all(expected[i] == codes[i] for i in range(len(codes))):
                finals.add(where)
        if not finals:
            m.fail(f"answers {codes} to {list(self.calls)} on {vol.volume_id} fit no order")
        md = MetadataStore(m.node.state_dir).read(vol.volume_id)
        ended = None if md is None else "target" if Path(md.target_path) == vol.target else "other"
        matching = {lost for where, lost in finals if where == ended}
        if not matching:
            m.fail(f"{vol.volume_id} ended at {ended}, not where an order leaves it: {finals}")
        lost = matching.pop() if len(matching) == 1 else m.node.seen(vol.target) is None
        m.volumes.pop(vol.volume_id, None)
        if ended is None:
            m.gone[vol.volume_id] = vol
            return
        if ended == "other":
            vol.target, vol.other_target = vol.other_target, vol.target
        vol.status = "published"
        vol.mount_lost = lost
        vol.not_after = None
        m.volumes[vol.volume_id] = vol


_Where = tuple[Literal["target", "other"] | None, bool]
"""Where a volume is published (None: nowhere) and whether that target lost its mount."""


def _simulate(
    call: Call, where: _Where, new: StatusCode | None
) -> tuple[StatusCode | None, _Where]:
    kind, at = call
    published_at, _ = where
    if kind == "unpublish":
        return None, (None, False)
    if published_at is None:
        return new, ((at, False) if new is None else (None, False))
    if published_at == at:
        return None, (at, False)
    return StatusCode.ALREADY_EXISTS, where


_NOT_SERVED = (
    StatusCode.UNAVAILABLE,
    StatusCode.PERMISSION_DENIED,
    StatusCode.FAILED_PRECONDITION,
)


def _code(error: RpcError | None) -> StatusCode | None:
    return None if error is None else error.code


@dataclass(frozen=True)
class CancelledPublish(Op):
    """The kubelet gives up on a publish (its deadline) after some scheduling points."""

    namespace: str
    account: str
    family: str
    checkpoints: int

    async def apply(self, m: Machine) -> None:
        if m.full:
            return
        vol = m.new_volume(self.namespace, self.account, "a", self.family, False)
        answered: list[RpcError | None] = []
        scope = trio.CancelScope()

        async def kubelet() -> None:
            with scope:
                answered.append(await m.node.publish(m.request(vol)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kubelet)
            for _ in range(self.checkpoints):
                await trio.lowlevel.checkpoint()
            scope.cancel()
        if answered:
            m.expect_publish(vol, answered[0], m.expected_publish(vol))
        vol.status = "published" if answered == [None] else "failed"
        m.volumes[vol.volume_id] = vol


@dataclass(frozen=True)
class LoseMount(Op):
    """Something unmounts a target behind the driver's back; maybe the kubelet notices and
    publishes again at once (its reconciler does), which must mount it again."""

    pick: int
    kubelet_notices: bool = False

    async def apply(self, m: Machine) -> None:
        vol = m.pick(self.pick, "published")
        if vol is None:
            return
        m.node.mounter.lose(vol.target)
        vol.mount_lost = True
        if self.kubelet_notices:
            await PublishAgain(self.pick).apply(m)


AgentAction = Literal[
    "down",
    "up",
    "refuse",
    "accept",
    "stall",
    "renew",
    "rotate",
    "rotate-ca",
    "rotate-ca-keep-old",
    "extra-root",
]


@dataclass(frozen=True)
class AgentOp(Op):
    action: AgentAction

    async def apply(self, m: Machine) -> None:
        agent = m.node.agent
        if self.action == "down" and agent.up:
            agent.go_down()
        elif self.action == "up" and not agent.up:
            agent.come_up()
        elif self.action == "refuse" and not agent.refusing:
            agent.refuse()
        elif self.action == "accept" and agent.refusing:
            agent.accept()
        elif self.action in ("stall", "renew"):
            agent.set_renewing(self.action == "renew")
        elif self.action == "rotate":
            agent.rotate()
        elif self.action.startswith("rotate-ca"):
            agent.rotate_ca(keep_old=self.action == "rotate-ca-keep-old")
        elif self.action == "extra-root":
            agent.set_bundle_extra_root()


@dataclass(frozen=True)
class Revoke(Op):
    identity: int

    async def apply(self, m: Machine) -> None:
        m.node.agent.revoke(IDENTITIES[self.identity % len(IDENTITIES)])


@dataclass(frozen=True)
class Restore(Op):
    identity: int

    async def apply(self, m: Machine) -> None:
        m.node.agent.restore(IDENTITIES[self.identity % len(IDENTITIES)])


@dataclass(frozen=True)
class Advance(Op):
    seconds: float

    async def apply(self, m: Machine) -> None:
        await trio.sleep(self.seconds)


@dataclass(frozen=True)
class Age(Op):
    """Time passes until the oldest SVID a published volume holds is at ``fraction`` of its
    life: just past 75% (no longer renewed, if the agent is away), past 90%, or expired."""

    fraction: float

    async def apply(self, m: Machine) -> None:
        seen = [v.seen for v in m.volumes.values() if v.status == "published" and v.seen]
        if not seen:
            await trio.sleep(1)
            return
        oldest = min(seen, key=lambda s: s.not_before)
        at = oldest.not_before + self.fraction * (oldest.not_after - oldest.not_before)
        await trio.sleep(max(at - m.node.now(), 0.5))


@dataclass(frozen=True)
class Neglect(Op):
    """The agent goes away (down, or up but no longer renewing) and stays away while the
    oldest SVID ages to ``fraction`` of its life (past 75%: no longer renewed; past 90%)."""

    how: Literal["down", "stall"]
    fraction: float

    async def apply(self, m: Machine) -> None:
        agent = m.node.agent
        if self.how == "down" and agent.up:
            agent.go_down()
        elif self.how == "stall":
            agent.set_renewing(False)
        await Age(self.fraction).apply(m)


@dataclass(frozen=True)
class Outage(Op):
    """The agent is down for a while (a restart, a crash loop), then serves again."""

    seconds: float

    async def apply(self, m: Machine) -> None:
        agent = m.node.agent
        if agent.up:
            agent.go_down()
        await trio.sleep(self.seconds)
        agent.come_up()


@dataclass(frozen=True)
class BrokenStreams(Op):
    """The agent serves the driver (its bundle stream stays up) but every SVID stream fails
    for a while: the volumes retry on their own backoff, which must stay capped."""

    seconds: float

    async def apply(self, m: Machine) -> None:
        agent = m.node.agent
        agent.break_streams()
        await trio.sleep(self.seconds)
        agent.mend_streams()


@dataclass(frozen=True)
class Restart(Op):
    """A new driver on the same state folder; meanwhile, maybe, leftovers of a crash."""

    damage: Literal["none", "orphan", "metadata-only", "partial-data"] = "none"
    namespace: str = "default"
    account: str = "web"

    async def apply(self, m: Machine) -> None:
        node = m.node
        await node.stop_driver()
        if self.damage == "orphan":
            (node.state_dir / f"csi-orphan-{m.next()}" / "data").mkdir(parents=True)
        elif self.damage in ("metadata-only", "partial-data") and not m.full:
            vol = m.new_volume(self.namespace, self.account, "a", "defaults", False)
            store = MetadataStore(node.state_dir)
            store.write(
                VolumeMetadata(
                    volume_id=vol.volume_id,
                    target_path=str(vol.target),
                    spec={"volume_context": dict(m.request(vol).volume_context)},
                    volume_mount_group="",
                    node_id=NODE_ID,
                    created_at=EPOCH,
                )
            )
            if self.damage == "partial-data":
                generation = store.data_dir(vol.volume_id) / "..2000_01_01_00_00_00.2"
                generation.mkdir(parents=True)
                (generation / "svid.pem").write_bytes(b"")
            vol.status = "uncertain"
            m.volumes[vol.volume_id] = vol
        await node.start_driver()
        m.rotations_seen = 0
        for vol in m.volumes.values():
            vol.lost = vol.layout = vol.mount_lost = False
            vol.not_after = None


KINDS = (
    "publish",
    "publish-refused",
    "publish-again",
    "publish-conflicting",
    "retry-publish",
    "unpublish",
    "unpublish-again",
    "concurrent",
    "cancelled-publish",
    "agent",
    "revoke",
    "restore",
    "advance",
    "outage",
    "restart",
)
"""Kinds of operation; a program uses some of them (swarm testing, see :class:`Draw`)."""
ALWAYS = ("publish", "agent", "advance", "restart")
"""Kinds every program uses: volumes, an agent that changes, time passing, driver restarts."""


@functools.lru_cache
def operations(
    families: tuple[str, ...] = tuple(sorted(FAMILIES)), kinds: tuple[str, ...] = KINDS
) -> st.SearchStrategy[Op]:
    """Operations of ``kinds`` (publish, unpublish and time weighted up) that publish
    ``families``."""
    ns, sa, name = (
        st.sampled_from(NAMESPACES),
        st.sampled_from(ACCOUNTS),
        st.sampled_from(POD_NAMES),
    )
    family = st.sampled_from(families)
    pick = st.integers(0, 15)
    call = cast(
        st.SearchStrategy[Call],
        st.tuples(
            st.sampled_from(["publish", "publish", "unpublish"]),
            st.sampled_from(["target", "other"]),
        ),
    )
    by_kind: dict[str, list[st.SearchStrategy[Op]]] = {
        "publish": [
            *(st.builds(Publish, ns, sa, name, family, st.booleans()) for _ in range(3)),
            st.builds(LoseMount, pick, st.just(True)),
        ],
        "publish-refused": [
            st.builds(PublishRefused, ns, sa, st.sampled_from(sorted(REFUSED))),
            st.builds(PublishRefusedTarget, ns, sa, st.sampled_from(["symlink", "pod-gone"])),
        ],
        "publish-again": [
            st.builds(PublishAgain, pick),
            st.builds(LoseMount, pick, st.booleans()),
        ],
        "publish-conflicting": [
            st.builds(PublishConflicting, pick, st.sampled_from(["attributes", "target"]))
        ],
        "retry-publish": [st.builds(RetryPublish, pick)],
        "unpublish": [
            st.builds(Unpublish, pick, st.sampled_from(["target", "target", "other"]))
            for _ in range(2)
        ],
        "unpublish-again": [st.builds(UnpublishAgain, pick)],
        "concurrent": [
            st.builds(
                Concurrent,
                st.booleans(),
                pick,
                family,
                st.lists(call, min_size=2, max_size=4).map(tuple),
            )
        ],
        "cancelled-publish": [st.builds(CancelledPublish, ns, sa, family, st.integers(0, 40))],
        "agent": [
            st.builds(AgentOp, st.sampled_from(get_args(AgentAction))),
            st.builds(AgentOp, st.sampled_from(["up", "accept", "renew", "rotate"])),
            st.builds(Neglect, st.sampled_from(["down", "stall"]), st.sampled_from([0.8, 0.95])),
        ],
        "revoke": [st.builds(Revoke, st.integers(0, len(IDENTITIES) - 1))],
        "restore": [st.builds(Restore, st.integers(0, len(IDENTITIES) - 1))],
        "advance": [
            st.builds(Advance, st.sampled_from(ADVANCES)),
            st.builds(Advance, st.sampled_from(ADVANCES)),
            st.builds(Age, st.sampled_from([0.8, 0.95, 1.05])),
        ],
        "outage": [
            st.builds(Outage, st.sampled_from([1.0, 20.0, 120.0, 300.0, 500.0])),
            st.builds(BrokenStreams, st.sampled_from([1.0, 120.0, 900.0])),
        ],
        "restart": [
            st.builds(
                Restart,
                st.sampled_from(["none", "orphan", "metadata-only", "partial-data"]),
                ns,
                sa,
            )
        ],
    }
    return st.one_of([strategy for kind in kinds for strategy in by_kind[kind]])


# The model ---------------------------------------------------------------------------------

Status = Literal["published", "failed", "uncertain"]
"""``published``: the kubelet got OK. ``failed``: it knows the publish failed (or gave up on
it); nothing of it may exist until it retries. ``uncertain``: a crash left its metadata
behind; after the restart the driver holds it or has set it aside."""


@dataclass
class Vol:
    volume_id: str
    pod: Pod
    target: Path
    other_target: Path
    family: str
    status: Status = "published"
    mount_lost: bool = False
    lost: bool = False
    """Its pod lost every registration entry while its files hold an SVID."""
    layout: bool = False
    """The agent's SVIDs for its pod no longer include the identity it chose."""
    not_after: float | None = None
    """Expiry of the SVID its files held when last checked (to count rotations)."""
    folder: Path = Path()
    """Its folder in the state folder (``data/`` inside is what the pod sees)."""
    seen: Seen | None = None
    """What its files held at the last check."""
    generation: tuple[str, bytes] | None = None
    """The generation ``..data`` pointed at, and a digest of its files, at the last check: a
    reader that opened it must never see it change."""
    target_kept: bool = False
    """Unpublished at another target while the driver did not hold it: its own target
    folder, if a failed resume made one, may stay (never mounted)."""

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]

    def selectors(self) -> frozenset[tuple[str, str]]:
        pod = self.pod
        return frozenset(
            {
                ("k8s", f"ns:{pod.namespace}"),
                ("k8s", f"sa:{pod.service_account}"),
                ("k8s", f"pod-uid:{pod.uid}"),
                ("k8s", f"pod-name:{pod.name}"),
                ("k8s", f"node-name:{NODE_ID}"),
            }
        )


@dataclass(frozen=True)
class Seen:
    """What a pod reads from its volume."""

    spiffe_id: str
    serial: int
    not_before: float
    not_after: float
    bundle: tuple[bytes, ...]
    federated: frozenset[str]


class Failure(AssertionError):
    pass


class Machine:
    def __init__(self, node: FastNode) -> None:
        self.node = node
        self.volumes: dict[str, Vol] = {}
        self.gone: dict[str, Vol] = {}
        self.serial = 0
        self.rotations_seen = 0
        self.step = "start"

    def fail(self, message: str) -> NoReturn:
        raise Failure(f"{self.step}: {message}")

    def next(self) -> int:
        self.serial += 1
        return self.serial

    @property
    def full(self) -> bool:
        """The node has :data:`MAX_VOLUMES` volumes: new ones wait (keeps each step cheap)."""
        return len(self.volumes) >= MAX_VOLUMES

    def new_volume(self, namespace: str, account: str, name: str, family: str, odd: bool) -> Vol:
        n = self.next()
        pod = Pod(name, namespace, f"00000000-0000-4000-8000-{n:012d}", account)
        volume_id = f"volume {n}/odd" if odd else f"csi-{n:064x}"
        node = self.node
        vol = Vol(volume_id, pod, node.target(pod), node.target(pod, "other"), family)
        vol.folder = node.volume_folder(volume_id)
        return vol

    def request(self, vol: Vol, *, target: Path | None = None) -> csi.NodePublishVolumeRequest:
        family = vol.spec
        return self.node.request(
            vol.volume_id,
            vol.pod,
            family.attributes,
            target=target or vol.target,
            fs_group=family.fs_group,
        )

    def pick(self, pick: int, *statuses: Status) -> Vol | None:
        chosen = sorted(
            (v for v in self.volumes.values() if v.status in statuses), key=lambda v: v.volume_id
        )
        return chosen[pick % len(chosen)] if chosen else None

    # What the agent does for a volume ----------------------------------------------------

    def entries(self, vol: Vol) -> list[Entry]:
        return self.node.agent.entries_for(vol.selectors())

    def chosen(self, vol: Vol) -> Entry | None:
        return vol.spec.preference.first(self.entries(vol), lambda e: (e.hint, e.spiffe_id))

    def served(self, vol: Vol) -> bool:
        """The agent serves the driver and issues the identity this volume chose."""
        return self.node.agent.serving and self.chosen(vol) is not None

    def expected_publish(self, vol: Vol) -> StatusCode | None:
        agent = self.node.agent
        if not agent.up:
            return StatusCode.UNAVAILABLE
        if agent.refusing:
            return StatusCode.PERMISSION_DENIED
        if self.chosen(vol) is None or agent.streams_broken:
            return StatusCode.FAILED_PRECONDITION
        return None

    def expect_publish(self, vol: Vol, error: RpcError | None, expected: StatusCode | None) -> None:
        if _code(error) != expected:
            self.fail(
                f"publish of {vol.volume_id} ({vol.family}) answered {error!r}, not {expected}"
            )
        if error is None:
            return
        message = error.message
        if expected == StatusCode.UNAVAILABLE and "admin socket" not in message:
            self.fail(f"agent-down message does not name the socket: {message}")
        if expected == StatusCode.PERMISSION_DENIED and "authorized_delegates" not in message:
            self.fail(f"refusal message does not say what to fix: {message}")
        no_entry = expected == StatusCode.FAILED_PRECONDITION and not self.entries(vol)
        if no_entry and "no registration entry" not in message:
            self.fail(f"no-entry message does not say so: {message}")

    def held(self, vol: Vol) -> bool:
        """Whether the driver holds the volume (its folder, mount and stream)."""
        if vol.status == "published":
            return True
        if vol.status == "failed":
            return False
        return vol.folder.exists()

    # Checks ------------------------------------------------------------------------------

    async def settle(self) -> None:
        """Safety now (right after the step, before the node reacts); then the rest within
        :data:`SETTLE` virtual seconds (the next step's safety check sees how it settled)."""
        self.check_safety()
        await self._eventually(self.check_settled)
        for vol in self.volumes.values():
            if vol.status == "uncertain" and not self.held(vol):
                vol.status = "failed"

    async def _eventually(self, check: Callable[[], Awaitable[None]]) -> None:
        deadline = trio.current_time() + SETTLE
        delay = 0.001
        while True:
            await wait_all_tasks_blocked()
            try:
                await check()
                return
            except Failure:
                raise
            except AssertionError as exc:
                if trio.current_time() >= deadline:
                    raise Failure(f"{self.step}: not settled within {SETTLE:g}s: {exc}") from exc
            await trio.sleep(delay)
            delay = min(delay * 2, 1.0)

    def check_safety(self) -> None:
        node = self.node
        mounted = set(node.mounter.mounts)
        for vol in self.gone.values():
            if vol.folder.exists():
                self.fail(f"unpublished volume {vol.volume_id} is back")
            for target in (vol.target, vol.other_target):
                kept = vol.target_kept and target == vol.target and target.is_dir()
                if target in mounted or (os.path.lexists(target) and not kept):
                    self.fail(f"unpublished volume {vol.volume_id}'s target {target} is back")
        by_target = {v.target: v for v in self.volumes.values()}
        for target, layers in node.mounter.mounts.items():
            if len(layers) != 1:
                self.fail(f"{target} is mounted {len(layers)} times")
            owner = by_target.get(target)
            if owner is None or layers[0] != owner.folder / "data":
                self.fail(f"{target} shows {layers[0]}, not a volume published there")
        for path in _readable_by_others(str(node.state_dir)):
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as file:
                if PRIVATE_KEY in file.read() or path.endswith(".token"):
                    self.fail(f"a private key or token is readable by others: {path}")

    async def check_settled(self) -> None:
        """Everything that must hold once the node has reacted to the last step."""
        self.check_structure()
        self.update_flags()
        await self.check_conditions()
        await self.check_sockets()

    def check_structure(self) -> None:
        node, agent = self.node, self.node.agent
        held = [v for v in self.volumes.values() if self.held(v)]
        folders = {p.name for p in node.state_dir.iterdir()} - {".corrupt"}
        expected = {folder_name(v.volume_id) for v in held}
        assert folders == expected, f"state folders {sorted(folders)} != held {sorted(expected)}"
        mounted = set(node.mounter.mounts)
        want = {v.target for v in held if not v.mount_lost}
        assert mounted == want, f"mounted {sorted(map(str, mounted))} != {sorted(map(str, want))}"
        streams = Counter(agent.open_svid_streams)
        want_streams = Counter(v.selectors() for v in held) if agent.serving else Counter()
        assert streams == want_streams, (
            f"{sum(streams.values())} open SVID streams for {sum(want_streams.values())} "
            f"volumes: extra {streams - want_streams}, missing {want_streams - streams}"
        )
        for vol in held:
            if vol.status == "uncertain" and not self.served(vol):
                continue
            seen = self.check_files(vol)
            if vol.not_after is not None and seen.not_after != vol.not_after:
                self.rotations_seen += 1
            vol.not_after = seen.not_after
        counted = _total(node.metrics.svid_rotations_total)
        assert counted >= self.rotations_seen, (
            f"svid_rotations_total is {counted}; {self.rotations_seen} rotations reached files"
        )

    def check_files(self, vol: Vol) -> Seen:
        folder = vol.folder / "data"
        family = vol.spec
        try:
            seen = vol.seen = _read(folder, family)
            generation = _generation(folder)
        except (OSError, ValueError) as exc:
            raise AssertionError(
                f"{vol.volume_id} ({vol.family}): files do not parse: {exc!r}"
            ) from exc
        if vol.generation is not None and vol.generation[0] == generation[0]:
            assert vol.generation == generation, (
                f"{vol.volume_id}: generation {generation[0]} was rewritten in place"
            )
        vol.generation = generation
        assert seen.spiffe_id in (account_id(vol.pod.namespace, vol.pod.service_account), POD_B)
        key = os.stat(folder / family.key_path)
        assert stat.S_IMODE(key.st_mode) == family.key_mode, f"key mode {key.st_mode:o}"
        if family.gid is not None:
            assert key.st_gid == family.gid, f"{vol.volume_id}: key group {key.st_gid}"
        entry = self.chosen(vol)
        if entry is None or not self.node.agent.serving:
            return seen
        agent = self.node.agent
        current = agent.current(entry)
        assert seen.spiffe_id == entry.spiffe_id, f"{vol.volume_id}: {seen.spiffe_id}"
        assert current is not None
        serial = x509.load_der_x509_certificate(current.cert_chain[0]).serial_number
        assert seen.serial == serial, f"{vol.volume_id} ({vol.family}): not the agent's SVID"
        assert seen.bundle == agent.bundle_der(), f"{vol.volume_id}: not the agent's bundle"
        federated = {
            td for e in self.entries(vol) for td in e.federates_with if td in (PARTNER, OTHER)
        }
        want = {family.federated_name(td) for td in federated} if family.federated_files else set()
        assert seen.federated == want, f"{vol.volume_id}: federated files {sorted(seen.federated)}"
        now = self.node.now()
        for audiences, name in family.jwt.items():
            claims = _jwt_claims((folder / name).read_text())
            assert claims["sub"] == entry.spiffe_id and claims["aud"] == list(audiences), claims
            issued, expires = claims["iat"], claims["exp"]
            assert isinstance(issued, int) and isinstance(expires, int), claims
            assert expires > now, f"{vol.volume_id}: {name} expired"
            # Refreshed at half-life (a second of slack for whole-second claims).
            age = now - issued
            assert age <= (expires - issued) / 2 + 1, f"{vol.volume_id}: {name} is {age:.0f}s old"
            mode = stat.S_IMODE(os.stat(folder / name).st_mode)
            assert mode == family.key_mode, f"{name} mode {mode:o}"
        if family.jwt_bundle_file is not None:
            document = json.loads((folder / family.jwt_bundle_file).read_bytes())
            assert set(document) == {TRUST_DOMAIN} | federated, f"JWT bundles {sorted(document)}"
        return seen

    def update_flags(self) -> None:
        """What the driver now knows about each volume's entitlement (see :class:`Vol`)."""
        if not self.node.agent.serving:
            return
        for vol in self.volumes.values():
            if not self.held(vol):
                continue
            entries = self.entries(vol)
            if self.chosen(vol) is not None:
                vol.lost, vol.layout = False, False
            elif entries:
                vol.lost, vol.layout = False, True
            else:
                vol.lost = vol.seen is not None

    async def check_conditions(self) -> None:
        """VOLUME_CONDITION of every published volume, as the model expects it now.

        Normal where abnormal is expected fails at once: waiting would only let time pass
        until some other rule makes it abnormal. Abnormal where normal is expected may still
        settle: a task that failed while the agent was away retries within its backoff.
        """
        for vol in self.volumes.values():
            if vol.status != "published":
                continue
            seen = vol.seen
            assert seen is not None, f"{vol.volume_id}: files not checked"
            now = self.node.now()
            stats = await self.node.stats(vol.volume_id, vol.target)
            if isinstance(stats, RpcError):
                raise AssertionError(f"stats of {vol.volume_id}: {stats!r}")
            abnormal, message = stats.volume_condition.abnormal, stats.volume_condition.message
            elapsed = (now - seen.not_before) / (seen.not_after - seen.not_before)
            served = self.served(vol)
            if now >= seen.not_after:
                if not abnormal or "expired" not in message:
                    self.fail(f"{vol.volume_id}'s SVID expired, the condition says: {message}")
            elif vol.lost or vol.layout or elapsed > 0.9 or (not served and elapsed > 0.75):
                if not abnormal:
                    why = "lost" if vol.lost else "layout" if vol.layout else f"{elapsed:.0%}"
                    self.fail(f"{vol.volume_id} ({why}) condition is normal: {message}")
            else:
                assert not abnormal, f"{vol.volume_id} at {elapsed:.0%}: {message}"
                assert seen.spiffe_id in message, message

    async def check_sockets(self) -> None:
        for vol in self.volumes.values():
            if not vol.spec.socket or not self.held(vol) or not self.served(vol):
                continue
            files = vol.seen
            assert files is not None, f"{vol.volume_id}: files not checked"
            now = self.node.now()
            if now >= files.not_after:
                # An expired SVID is never served (the stream waits for a valid one).
                late = await _fetch_x509_svid(vol.folder / "data", timeout=1.0)
                expired = [
                    svid.spiffe_id
                    for svid in (late.svids if late is not None else ())
                    if _not_after(svid.x509_svid) <= self.node.now()
                ]
                assert not expired, f"{vol.volume_id}: the socket serves expired {expired}"
                continue
            response = await _fetch_x509_svid(vol.folder / "data", timeout=SETTLE)
            assert response is not None, f"{vol.volume_id}: the socket sent no SVID"
            first = response.svids[0]
            serial = x509.load_der_x509_certificate(first.x509_svid).serial_number
            assert (first.spiffe_id, serial) == (files.spiffe_id, files.serial), (
                f"{vol.volume_id}: the socket serves {first.spiffe_id}, not the SVID of its files"
            )


def _read(folder: Path, family: Family) -> Seen:
    if family.spiffe_fs:
        credential = (folder / "credential-bundle.pem").read_bytes()
        certs = x509.load_pem_x509_certificates(credential)
        key = serialization.load_pem_private_key(credential, None)
        bundle_file = folder / f"{TRUST_DOMAIN}.spiffe-trust-bundle.pem"
    else:
        certs = x509.load_pem_x509_certificates((folder / family.svid_file).read_bytes())
        key = serialization.load_pem_private_key((folder / family.key_file).read_bytes(), None)
        bundle_file = folder / family.bundle_file
    leaf = certs[0]
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise ValueError("the key does not belong to the certificate")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    bundle = x509.load_pem_x509_certificates(bundle_file.read_bytes())
    names = {family.federated_name(td) for td in (PARTNER, OTHER)}
    return Seen(
        spiffe_id=san.get_values_for_type(x509.UniformResourceIdentifier)[0],
        serial=leaf.serial_number,
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        bundle=tuple(c.public_bytes(serialization.Encoding.DER) for c in bundle),
        federated=frozenset(n for n in os.listdir(folder) if n in names),
    )


def _generation(folder: Path) -> tuple[str, bytes]:
    """The generation ``..data`` points at and a digest of its files."""
    name = os.readlink(folder / "..data")
    digest = hashlib.blake2b(digest_size=16)
    for file in sorted(os.listdir(folder / name)):
        digest.update(file.encode() + b"\0" + (folder / name / file).read_bytes())
    return name, digest.digest()


def _not_after(chain: bytes) -> float:
    """The leaf's expiry in a Workload API SVID (DER certificates, leaf first)."""
    leaf = x509.load_der_x509_certificate(split_der(chain)[0])
    return leaf.not_valid_after_utc.timestamp()


def _jwt_claims(token: str) -> dict[str, object]:
    part = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    assert isinstance(claims, dict)
    return claims


async def _fetch_x509_svid(folder: Path, *, timeout: float) -> wl.X509SVIDResponse | None:
    """The first FetchX509SVID answer on the volume's socket; None if none in ``timeout``."""
    fd = os.open(folder, os.O_PATH | os.O_DIRECTORY)
    try:
        async with (
            open_channel(f"/proc/self/fd/{fd}/agent.sock") as channel,
            channel.stream(
                methods.FETCH_X509_SVID,
                wl.X509SVIDRequest(),
                metadata={"workload.spiffe.io": "true"},
                timeout=timeout,
            ) as stream,
        ):
            async for response in stream:
                return response
    except RpcError as exc:
        if exc.code == StatusCode.DEADLINE_EXCEEDED:
            return None
        raise AssertionError(f"the socket in {folder} failed: {exc!r}") from exc
    finally:
        os.close(fd)
    raise AssertionError(f"the socket in {folder} ended its stream")


def _readable_by_others(folder: str) -> Iterator[str]:
    """Every regular file below ``folder`` that other users may read (symlinks not followed)."""
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    yield from _readable_by_others(entry.path)
                elif stat.S_ISREG(mode) and mode & 0o007:
                    yield entry.path


def _total(counter: Counter_) -> float:
    """A counter's value, without collecting the whole registry."""
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                return float(sample.value)
    raise AssertionError(f"{counter} has no total")


# Running programs ----------------------------------------------------------------------------


class Draw:
    """Where the next operation comes from: hypothesis, or a program to replay."""

    def __init__(self, data: st.DataObject | None = None, program: Sequence[Op] = ()) -> None:
        self._data = data
        self._program = list(program)
        self.done: list[Op] = []
        self._operations = operations()
        if data is not None:
            # Swarm testing: each program publishes some families only and leaves some kinds
            # of operation out (each in or out at even odds), so that the interactions within
            # one family (two sockets of one service account, a JWT and a long wait) and long
            # runs of a few kinds (an agent down while time passes) are likely.
            families = _some(data, sorted(FAMILIES), "families") or ["defaults"]
            kinds = set(_some(data, [k for k in KINDS if k not in ALWAYS], "kinds")) | set(ALWAYS)
            self._operations = operations(tuple(families), tuple(k for k in KINDS if k in kinds))

    def next(self, index: int, max_steps: int) -> Op | None:
        if self._data is None:
            op = self._program[index] if index < len(self._program) else None
        elif index >= max_steps or self._data.draw(st.integers(0, 63), label="more") == 0:
            op = None
        else:
            op = self._data.draw(self._operations, label=f"step {index}")
        if op is not None:
            self.done.append(op)
        return op


def _some(data: st.DataObject, items: Sequence[str], label: str) -> list[str]:
    """Each of ``items`` or not, at even odds (shrinking towards none)."""
    used = data.draw(st.lists(st.booleans(), min_size=len(items), max_size=len(items)), label)
    return [item for item, chosen in zip(items, used, strict=True) if chosen]


async def run(draw: Draw, max_steps: int = 0) -> None:
    now = fake_clock()
    agent = FakeAgent(
        TRUST_DOMAIN,
        now=now,
        svid_ttl=SVID_TTL,
        jwt_ttl=JWT_TTL,
        entries=ENTRIES,
        federated=(PARTNER, OTHER),
    )
    with fast_folder() as root:
        async with open_fast_node(root, agent, now=now) as node, trio.open_nursery() as watch:
            machine = Machine(node)

            async def watchdog() -> None:
                await agent.hot_loop.wait()
                raise Failure(f"{machine.step}: {agent.hot_loop_detail}")

            watch.start_soon(watchdog)
            await machine.settle()
            for index in itertools.count():
                op = draw.next(index, max_steps)
                if op is None:
                    machine.check_safety()
                    break
                machine.step = f"step {index} {op!r}"
                with trio.fail_after(STEP_LIMIT):
                    await op.apply(machine)
                    await machine.settle()
            watch.cancel_scope.cancel()


def replay(program: Sequence[Op]) -> None:
    """Run ``program`` checking every invariant after each step, as the hypothesis run does."""
    trio.run(run, Draw(program=program), clock=fast_clock())


MAX_STEPS = 300 if LONG else 100


@settings(
    max_examples=2000 if LONG else 50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_fast_state_machine(data: st.DataObject) -> None:
    draw = Draw(data)
    try:
        trio.run(run, draw, MAX_STEPS, clock=fast_clock())
    except BaseException:
        note("replay([\n" + "".join(f"    {op!r},\n" for op in draw.done) + "])")
        raise
