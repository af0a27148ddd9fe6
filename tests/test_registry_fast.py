"""The registry and its volumes in virtual time: what the kubelet, the pod and the operator
observe, each test named by the behaviour it pins.

Everything real but the agent and the mounts (see :mod:`tests.fast_node`): no root, and
backoff, publish timeouts, SVID lifetimes and JWT half-lives pass in virtual time
(:func:`~tests.fast_node.fast_clock`). Each test takes well under a second, so a broken copy of the
code fails here in seconds (``just mutants`` runs them against deliberately broken copies,
see CONTRIBUTING.md). What only real mounts, real processes and the real wire can show
stays in the root suite (test_driver.py, test_restart.py, test_state_machine.py).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import gc
import json
import logging
import os
import stat
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from trio.testing import MockClock

from tests.fakes import FakeAgent
from tests.fast_node import (
    FS_GROUP,
    PUBLISH_TIMEOUT,
    FastNode,
    fake_clock,
    fast_clock,
    fast_folder,
    open_fast_node,
)
from tests.harness import Identity, eventually, read_identity
from trio_spirecsi._proto.csi.v1 import csi_pb2 as csi
from trio_spirecsi._proto.spiffe.workload import workload_pb2 as wl
from trio_spirecsi.csi.client import Pod
from trio_spirecsi.devagent.entries import Entry
from trio_spirecsi.grpc import RpcError, StatusCode, methods, open_channel
from trio_spirecsi.metrics import Metrics
from trio_spirecsi.render import select_svids
from trio_spirecsi.spire.agent import AgentClient
from trio_spirecsi.spire.backoff import AGENT_RETRY, Backoff
from trio_spirecsi.storage.paths import TargetDir
from trio_spirecsi.volumes import volume as volume_module
from trio_spirecsi.volumes.trace import PublishTrace

PRIVATE_KEY = b"PRIVATE KEY-----"
WEB_ID = "spiffe://example.org/ns/default/sa/web"


@pytest.fixture(name="fast_clock")
def fast_clock_fixture() -> MockClock:
    """Virtual time for the test (pytest-trio runs a test under a Clock it asks for)."""
    return fast_clock()


@asynccontextmanager
async def fast_node(agent: FakeAgent | None = None) -> AsyncIterator[FastNode]:
    with fast_folder() as root:
        async with open_fast_node(root, agent) as node:
            yield node


async def published(
    node: FastNode,
    pod: Pod | None = None,
    attributes: Mapping[str, str] | None = None,
    *,
    volume_id: str = "csi-1",
    fs_group: str = "",
) -> tuple[Pod, Path]:
    """Publish a volume that must succeed; its pod and target."""
    pod = pod or node.pod()
    target = node.target(pod)
    error = await node.publish(node.request(volume_id, pod, attributes, fs_group=fs_group))
    assert error is None, f"publish failed: {error!r}"
    return pod, target


def seen_identity(node: FastNode, target: Path, *names: str) -> Identity:
    """The identity a pod reads at ``target``."""
    folder = node.seen(target)
    assert folder is not None, f"nothing is mounted at {target}"
    return read_identity(folder, *names)


def condition(stats: csi.NodeGetVolumeStatsResponse | RpcError) -> tuple[bool, str]:
    """VOLUME_CONDITION from a NodeGetVolumeStats answer: (abnormal, message)."""
    assert not isinstance(stats, RpcError), f"NodeGetVolumeStats failed: {stats!r}"
    return stats.volume_condition.abnormal, stats.volume_condition.message


def rotations(node: FastNode) -> float | None:
    return node.metrics.registry.get_sample_value("trio_spirecsi_svid_rotations_total")


# The agent is gone: backoff ------------------------------------------------------------


def test_backoff_grows_to_its_cap_and_never_beyond() -> None:
    backoff = Backoff(0.5, 30.0)
    delays = [backoff.next() for _ in range(40)]
    assert all(0.25 <= d <= 30.0 for d in delays), delays
    assert delays[0] < 0.5 and delays[-1] >= 15.0, delays
    backoff.reset()
    assert backoff.next() < 0.5


async def test_an_unreachable_agent_is_retried_with_backoff_not_in_a_loop(
    fast_clock: MockClock,
) -> None:
    """An agent outage costs a few calls per volume per minute, never a hot loop."""
    async with fast_node() as node:
        await published(node)
        node.agent.go_down()
        before = node.agent.calls.value
        with trio.move_on_after(120):
            await node.agent.calls.wait_value(lambda n: n > before + 40)
        calls = node.agent.calls.value - before
        assert calls <= 40, f"{calls} agent calls in {trio.current_time():.3f} virtual seconds"
        assert calls >= 5, f"only {calls} retries in two minutes"


async def test_the_agent_client_retries_an_unreachable_socket_with_backoff(
    fast_clock: MockClock, tmp_path: Path
) -> None:
    """The shared bundle stream to a missing admin socket: a warning per retry, a few per
    minute, not thousands per second."""
    failures = trio.Event()
    count = [0]

    class Counter(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "agent_stream_failed":
                count[0] += 1
                if count[0] > 40:
                    failures.set()

    logger = logging.getLogger("trio_spirecsi.spire.agent")
    handler = Counter(logging.WARNING)
    logger.addHandler(handler)
    try:
        socket = tmp_path / "missing.sock"
        async with open_channel(str(socket)) as channel, trio.open_nursery() as nursery:
            client = AgentClient(channel, socket, Metrics())
            await nursery.start(client.run)
            with trio.move_on_after(120):
                await failures.wait()
            nursery.cancel_scope.cancel()
    finally:
        logger.removeHandler(handler)
    assert 5 <= count[0] <= 40, f"{count[0]} retries in {trio.current_time():.3f} virtual s"


async def test_volumes_come_back_with_the_agent_not_one_backoff_later(
    fast_clock: MockClock,
) -> None:
    async with fast_node() as node:
        await published(node)
        node.agent.go_down()
        await trio.sleep(900)
        assert node.agent.open_svid_streams == []
        node.agent.come_up()
        await eventually(
            lambda: len(node.agent.open_svid_streams) == 1,
            "the volume's SVID stream is open again as soon as the agent serves the driver",
            timeout=0.1,
        )


async def test_a_volume_failing_alone_retries_within_the_backoff_cap_after_a_long_time(
    fast_clock: MockClock,
) -> None:
    """The agent serves the driver all along; only the volume's own stream keeps failing."""
    async with fast_node() as node:
        await published(node)
        node.agent.break_streams()
        await trio.sleep(900)
        assert node.agent.open_svid_streams == []
        node.agent.mend_streams()
        await eventually(
            lambda: len(node.agent.open_svid_streams) == 1,
            "the volume's SVID stream is open again",
            timeout=AGENT_RETRY.maximum + 0.5,
        )


# The per-pod socket ---------------------------------------------------------------------


async def fetch_x509_svid(data_dir: Path, socket: str = "agent.sock") -> wl.X509SVIDResponse:
    """The first FetchX509SVID answer on a volume's Workload API socket (through a descriptor
    of its folder: the folder's path may be longer than a socket path can be)."""
    fd = os.open(data_dir, os.O_PATH | os.O_DIRECTORY)
    try:
        async with open_channel(f"/proc/self/fd/{fd}/{socket}") as channel:
            metadata = {"workload.spiffe.io": "true"}
            request = wl.X509SVIDRequest()
            async with channel.stream(
                methods.FETCH_X509_SVID, request, metadata=metadata, timeout=30
            ) as stream:
                async for response in stream:
                    return response
    finally:
        os.close(fd)
    raise AssertionError("the socket sent no SVID")


async def test_each_pods_socket_serves_its_own_identity_when_pods_share_a_service_account(
    fast_clock: MockClock,
) -> None:
    now = fake_clock()
    agent = FakeAgent(now=now, template="spiffe://{td}/ns/{ns}/sa/{sa}/pod/{pod_name}")
    attributes = {"csi.spire.io/workload-api": "true"}
    async with fast_node(agent) as node:
        first, _ = await published(node, node.pod("web-0"), attributes, volume_id="csi-1")
        second, _ = await published(node, node.pod("web-1"), attributes, volume_id="csi-2")
        for volume_id, pod in (("csi-1", first), ("csi-2", second)):
            data = node.volume_folder(volume_id) / "data"
            socket = data / "agent.sock"
            await eventually(socket.exists, "the socket is served")
            response = await fetch_x509_svid(data)
            want = f"spiffe://example.org/ns/default/sa/web/pod/{pod.name}"
            assert [s.spiffe_id for s in response.svids] == [want]
            leaf = x509.load_der_x509_certificate(response.svids[0].x509_svid)
            files = read_identity(data)
            assert leaf.serial_number == files.serial, f"{volume_id}: not the volume's SVID"


# VOLUME_CONDITION -------------------------------------------------------------------------


async def test_condition_stays_normal_while_the_agent_renews(fast_clock: MockClock) -> None:
    async with fast_node() as node:
        _, target = await published(node)
        first = seen_identity(node, target).serial
        await trio.sleep(3 * node.agent.svid_ttl)
        abnormal, message = condition(await node.stats("csi-1", target))
        assert not abnormal, message
        assert "spiffe://example.org/ns/default/sa/web" in message
        assert seen_identity(node, target).serial != first


async def test_condition_reports_an_svid_nobody_renews_while_the_agent_is_down(
    fast_clock: MockClock,
) -> None:
    async with fast_node() as node:
        _, target = await published(node)
        node.agent.go_down()
        await trio.sleep(node.agent.svid_ttl * 0.5)
        abnormal, message = condition(await node.stats("csi-1", target))
        assert not abnormal, f"still valid for half its life: {message}"
        await trio.sleep(node.agent.svid_ttl * 0.3)
        abnormal, message = condition(await node.stats("csi-1", target))
        assert abnormal and "has not been renewed" in message, message
        assert "unreachable" in message, message


async def test_condition_reports_an_svid_the_agent_stopped_renewing(
    fast_clock: MockClock,
) -> None:
    """The agent answers but does not renew (cut off from its server): abnormal past 90%."""
    async with fast_node() as node:
        _, target = await published(node)
        node.agent.set_renewing(False)
        await trio.sleep(node.agent.svid_ttl * 0.85)
        abnormal, message = condition(await node.stats("csi-1", target))
        assert not abnormal, message
        await trio.sleep(node.agent.svid_ttl * 0.1)
        abnormal, message = condition(await node.stats("csi-1", target))
        assert abnormal and "has not been renewed" in message, message


async def test_condition_reports_an_expired_svid(fast_clock: MockClock) -> None:
    async with fast_node() as node:
        _, target = await published(node)
        node.agent.go_down()
        await trio.sleep(node.agent.svid_ttl + 1)
        abnormal, message = condition(await node.stats("csi-1", target))
        assert abnormal and "expired at" in message, message


async def test_a_volume_resumed_while_the_agent_is_down_reports_the_svid_its_files_hold(
    fast_clock: MockClock,
) -> None:
    """After a driver restart the files are still valid: the condition stays normal until
    the SVID nears expiry, as it would have without the restart."""
    async with fast_node() as node:
        _, target = await published(node)
        spiffe_id = seen_identity(node, target).spiffe_id
        await node.stop_driver()
        node.agent.go_down()
        await node.start_driver()
        abnormal, message = condition(await node.stats("csi-1", target))
        assert not abnormal and spiffe_id in message, message
        await trio.sleep(node.agent.svid_ttl * 0.8)
        abnormal, message = condition(await node.stats("csi-1", target))
        assert abnormal and "has not been renewed" in message, message
        await trio.sleep(node.agent.svid_ttl * 0.3)
        abnormal, message = condition(await node.stats("csi-1", target))
        assert abnormal and "expired at" in message, message


async def test_a_volume_resumed_after_its_entry_was_removed_reports_lost_entitlement(
    fast_clock: MockClock,
) -> None:
    async with fast_node() as node:
        _, target = await published(node)
        node.agent.revoke("spiffe://example.org/ns/default/sa/web")
        await node.stop_driver()
        await node.start_driver()
        await eventually(lambda: node.agent.open_svid_streams != [], "resubscribed")
        abnormal, message = condition(await node.stats("csi-1", target))
        assert abnormal and "no longer issues an SVID" in message, message


async def test_condition_stays_abnormal_when_the_agent_also_refuses_the_driver(
    fast_clock: MockClock,
) -> None:
    """The identity the volume asked for (spiffe-id) is no longer issued: abnormal at once.
    The agent then refusing the driver is more urgent to tell, but must not turn the
    volume normal again."""
    now = fake_clock()
    account = Entry("spiffe://example.org/web", frozenset({("k8s", "sa:web")}))
    own = Entry("spiffe://example.org/web-0", frozenset({("k8s", "pod-name:web-0")}))
    agent = FakeAgent(now=now, entries=[account, own])
    attributes = {"csi.spire.io/spiffe-id": own.spiffe_id}
    async with fast_node(agent) as node:
        _, target = await published(node, node.pod("web-0"), attributes)
        agent.revoke(own.spiffe_id)
        await trio.sleep(1)
        abnormal, message = condition(await node.stats("csi-1", target))
        assert abnormal and own.spiffe_id in message, message
        agent.refuse()
        await trio.sleep(1)
        abnormal, message = condition(await node.stats("csi-1", target))
        assert abnormal and own.spiffe_id in message, message


# Republish and unpublish -------------------------------------------------------------------


async def test_publishing_again_remounts_a_target_that_lost_its_mount(
    fast_clock: MockClock,
) -> None:
    async with fast_node() as node:
        pod, target = await published(node)
        request = node.request("csi-1", pod)
        node.mounter.lose(target)
        assert await node.publish(request) is None
        assert node.seen(target) == node.volume_folder("csi-1") / "data"
        assert seen_identity(node, target).spiffe_id == "spiffe://example.org/ns/default/sa/web"
        assert len(node.mounter.mounts[target]) == 1


async def test_publishing_the_same_volume_id_at_another_target_is_already_exists(
    fast_clock: MockClock,
) -> None:
    async with fast_node() as node:
        pod, target = await published(node)
        other = node.target(pod, "other")
        error = await node.publish(node.request("csi-1", pod, target=other))
        assert error is not None, "publishing csi-1 at a second target answered OK"
        assert error.code == StatusCode.ALREADY_EXISTS, error
        assert str(target) in error.message
        assert node.seen(other) is None
        assert node.seen(target) is not None


async def test_unpublish_at_another_target_tears_down_the_published_one(
    fast_clock: MockClock,
) -> None:
    async with fast_node() as node:
        pod, _ = await published(node)
        assert await node.unpublish("csi-1", node.target(pod, "other")) is None
        assert node.mounter.mounts == {}
        assert not node.volume_folder("csi-1").exists()
        assert node.agent.open_svid_streams == []


async def test_unpublish_closes_the_agent_stream_and_leaves_nothing(
    fast_clock: MockClock,
) -> None:
    async with fast_node() as node:
        _, target = await published(node, attributes={"csi.spire.io/jwt-audiences": "api"})
        assert len(node.agent.open_svid_streams) == 1
        assert await node.unpublish("csi-1", target) is None
        assert node.agent.open_svid_streams == []
        assert node.mounter.mounts == {}
        assert not target.exists()
        assert os.listdir(node.state_dir) == []
        calls = node.agent.calls.value
        await trio.sleep(3 * node.agent.jwt_ttl)
        assert node.agent.calls.value == calls, "the volume still calls the agent"


async def test_a_publish_whose_mount_fails_leaves_nothing_and_can_be_retried(
    fast_clock: MockClock,
) -> None:
    async with fast_node() as node:
        pod = node.pod()
        node.mounter.fail["bind_readonly"] = errno.EPERM
        error = await node.publish(node.request("csi-1", pod))
        assert error is not None and error.code == StatusCode.INTERNAL, error
        assert "Operation not permitted" in error.message, error.message
        assert os.listdir(node.state_dir) == []
        assert node.mounter.mounts == {}
        assert node.agent.open_svid_streams == []
        _, target = await published(node, pod)
        assert seen_identity(node, target).spiffe_id == "spiffe://example.org/ns/default/sa/web"


async def test_a_published_volume_keeps_nothing_of_its_publish(fast_clock: MockClock) -> None:
    """A live volume holds no memory for the publish that started it (its held target
    folder or trace): thousands of volumes live on one node."""
    async with fast_node() as node:
        for n in range(3):
            pod = node.pod()
            assert await node.publish(node.request(f"csi-{n}", pod)) is None
        gc.collect()
        kept = [o for o in gc.get_objects() if isinstance(o, (TargetDir, PublishTrace))]
        assert kept == [], f"{len(kept)} publish objects still referenced by live volumes"


async def test_an_unpublish_whose_unmount_fails_can_be_retried(fast_clock: MockClock) -> None:
    """The kubelet retries a failed unpublish; the retry removes what is left."""
    async with fast_node() as node:
        _, target = await published(node)
        node.mounter.fail["unmount"] = errno.EBUSY
        error = await node.unpublish("csi-1", target)
        assert error is not None, "an unpublish whose unmount failed answered OK"
        assert node.agent.open_svid_streams == [], "the volume's stream outlived the unpublish"
        assert await node.unpublish("csi-1", target) is None
        assert node.mounter.mounts == {}
        assert os.listdir(node.state_dir) == []
        assert not target.exists()


async def test_a_cancelled_publish_leaves_nothing_behind(fast_clock: MockClock) -> None:
    """The kubelet gives up on a publish (its deadline): stream, files and mount go."""
    async with fast_node() as node:
        node.agent.go_down()
        pod = node.pod()
        with trio.move_on_after(PUBLISH_TIMEOUT / 2):
            await node.publish(node.request("csi-1", pod))
            raise AssertionError("the publish answered before the kubelet gave up")
        assert os.listdir(node.state_dir) == []
        assert node.mounter.mounts == {}
        node.agent.come_up()
        await trio.sleep(AGENT_RETRY.maximum + 1)
        assert node.agent.open_svid_streams == []


async def test_a_publish_given_up_before_the_first_svid_closes_its_agent_stream(
    fast_clock: MockClock,
) -> None:
    """The publish opens the pod's SVID stream in its own task; the kubelet giving up while
    the agent has sent nothing but "no entry" closes that stream with the publish."""
    async with fast_node() as node:
        node.agent.revoke(WEB_ID)
        pod = node.pod()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.publish, node.request("csi-1", pod))
            await eventually(lambda: len(node.agent.open_svid_streams) == 1, "the stream opens")
            nursery.cancel_scope.cancel()
        assert node.agent.open_svid_streams == [], "the publish's stream outlived it"
        assert os.listdir(node.state_dir) == []
        assert node.mounter.mounts == {}


async def test_a_publish_to_a_refused_target_leaves_no_agent_stream(
    fast_clock: MockClock,
) -> None:
    """The subscription leaves before the target is walked (the agent answers meanwhile): a
    target the driver refuses (a symlink on the way, its pod folder gone) closes it again."""
    async with fast_node() as node:
        pod = node.pod()
        target = node.target(pod)
        outside = node.kubelet_dir.parent / "elsewhere"
        outside.mkdir()
        target.parent.rmdir()
        target.parent.symlink_to(outside)
        error = await node.publish(node.request("csi-1", pod, target=target))
        assert error is not None and error.code == StatusCode.INVALID_ARGUMENT, error
        assert "is a symlink" in error.message, error.message
        other = node.pod("web-1")
        gone = node.target(other)
        gone.parent.rmdir()
        error = await node.publish(node.request("csi-2", other, target=gone))
        assert error is not None, "a publish whose pod folder is gone answered OK"
        assert node.agent.open_svid_streams == [], "a refused publish left its agent stream"
        assert node.agent.calls.value >= 2, "the subscriptions did not leave before the walk"
        assert os.listdir(node.state_dir) == []
        assert node.mounter.mounts == {}
        assert list(outside.iterdir()) == []


async def test_a_driver_stopping_while_a_publish_waits_for_the_agent_closes_its_stream(
    fast_clock: MockClock,
) -> None:
    """SIGTERM stops every volume; a publish still waiting for its first SVID loses its
    agent stream with its volume, not at its own timeout."""
    async with fast_node() as node:
        node.agent.revoke(WEB_ID)
        pod = node.pod()
        errors: list[RpcError | None] = []

        async def publish() -> None:
            errors.append(await node.publish(node.request("csi-1", pod)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish)
            await eventually(lambda: len(node.agent.open_svid_streams) == 1, "the stream opens")
            await node.stop_driver()
            await eventually(
                lambda: node.agent.open_svid_streams == [],
                "the stream closes with the stopped volume",
                timeout=PUBLISH_TIMEOUT / 10,
            )
        [error] = errors
        assert error is not None, "a publish whose volume stopped answered OK"


async def test_a_publish_the_agent_first_refuses_succeeds_once_it_serves(
    fast_clock: MockClock,
) -> None:
    """The agent down at the publish's own attempt: the volume retries as soon as the agent
    serves again, and the publish succeeds within its timeout, on one stream."""
    async with fast_node() as node:
        node.agent.go_down()
        pod = node.pod()
        errors: list[RpcError | None] = []

        async def publish() -> None:
            errors.append(await node.publish(node.request("csi-1", pod)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish)
            await trio.sleep(PUBLISH_TIMEOUT / 2)
            assert errors == [], "the publish answered while the agent was down"
            node.agent.come_up()
            came_up = trio.current_time()
        assert errors == [None]
        assert trio.current_time() - came_up < 0.1, "the volume waited a backoff"
        assert len(node.agent.open_svid_streams) == 1
        assert seen_identity(node, node.target(pod)).spiffe_id == WEB_ID


async def test_a_bug_in_a_publishs_first_svid_is_contained_and_retried(
    fast_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error while the publish takes the first SVID is logged and counted as
    a bug of the volume's SVID task, which starts over: the publish still succeeds."""
    calls = [0]

    def buggy_once(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise ZeroDivisionError("injected")
        return select_svids(*args, **kwargs)

    monkeypatch.setattr(volume_module, "select_svids", buggy_once)
    async with fast_node() as node:
        _, target = await published(node)
        failed = node.metrics.registry.get_sample_value(
            "trio_spirecsi_errors_total", {"kind": "volume_task_failed"}
        )
        assert failed == 1
        assert calls[0] >= 2
        assert seen_identity(node, target).spiffe_id == WEB_ID
        assert len(node.agent.open_svid_streams) == 1


async def test_a_publish_reaching_a_stopped_driver_is_unavailable_and_leaves_nothing(
    fast_clock: MockClock,
) -> None:
    """On SIGTERM the CSI server and the volumes stop in one cancellation; a publish handler
    that still takes a step after the volumes' nursery closed is refused at once (it used to
    register a volume that could never run, and its teardown waited for it for ever)."""
    async with fast_node() as node:
        stopped = node.driver
        await node.stop_driver()
        node.driver = stopped  # the stopped driver's NodeService still gets the call
        pod = node.pod()
        with trio.fail_after(PUBLISH_TIMEOUT):
            error = await node.publish(node.request("csi-late", pod))
        node.driver = None
        assert error is not None and error.code == StatusCode.UNAVAILABLE, error
        assert "shutting down" in error.message
        assert os.listdir(node.state_dir) == []
        assert node.mounter.mounts == {}
        assert node.agent.open_svid_streams == []


async def test_concurrent_publishes_of_one_volume_id_publish_it_once(
    fast_clock: MockClock,
) -> None:
    async with fast_node() as node:
        pod = node.pod()
        request = node.request("csi-1", pod)
        errors: list[RpcError | None] = []

        async def publish() -> None:
            errors.append(await node.publish(request))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(publish)
        assert errors == [None] * 4
        assert len(node.agent.open_svid_streams) == 1
        assert node.mounter.mounts == {node.target(pod): [node.volume_folder("csi-1") / "data"]}


# What the files hold ---------------------------------------------------------------------


async def test_a_rotation_reaches_the_files_and_is_counted(fast_clock: MockClock) -> None:
    async with fast_node() as node:
        _, target = await published(node)
        before = seen_identity(node, target).serial
        assert rotations(node) == 0
        await trio.sleep(10)
        node.agent.rotate()
        await eventually(lambda: seen_identity(node, target).serial != before, "new SVID")
        assert rotations(node) == 1
        node.agent.set_bundle_extra_root()
        await eventually(
            lambda: seen_identity(node, target).bundle == node.agent.bundle_der(), "new bundle"
        )
        assert rotations(node) == 1, "a bundle change is not a rotation"


async def test_a_rotation_never_changes_files_a_reader_already_opened(
    fast_clock: MockClock,
) -> None:
    """Readers that opened the folder before a rotation keep reading one complete
    generation: the writer never rewrites files in place."""
    async with fast_node() as node:
        _, target = await published(node)
        folder = node.seen(target)
        assert folder is not None
        generation = os.open(folder / "..data", os.O_RDONLY | os.O_DIRECTORY)
        try:
            before = {name: _read_at(generation, name) for name in os.listdir(generation)}
            serial = seen_identity(node, target).serial
            await trio.sleep(10)
            node.agent.rotate()
            await eventually(lambda: seen_identity(node, target).serial != serial, "rotated")
            for name, data in before.items():
                # Gone is fine: a reader reopens the visible names and finds the new set.
                with contextlib.suppress(FileNotFoundError):
                    assert _read_at(generation, name) == data, f"{name} changed under a reader"
        finally:
            os.close(generation)


def _read_at(folder: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=folder)
    with os.fdopen(fd, "rb") as f:
        return f.read()


async def test_private_key_is_readable_by_the_owner_only(fast_clock: MockClock) -> None:
    async with fast_node() as node:
        _, target = await published(node, attributes={"csi.spire.io/jwt-audiences": "api"})
        folder = node.seen(target)
        assert folder is not None
        for name in ("svid_key.pem", "jwt_svid.token"):
            assert stat.S_IMODE(os.stat(folder / name).st_mode) == 0o600, name
        for top, _, names in os.walk(node.state_dir):
            for name in names:
                path = Path(top) / name
                mode = os.lstat(path).st_mode
                if stat.S_ISREG(mode) and mode & 0o007:
                    assert PRIVATE_KEY not in path.read_bytes(), f"{path} is readable by others"


async def test_fs_group_owns_the_files_and_opens_the_key_to_the_group(
    fast_clock: MockClock,
) -> None:
    async with fast_node() as node:
        _, target = await published(node, fs_group=str(FS_GROUP))
        folder = node.seen(target)
        assert folder is not None
        key = os.stat(folder / "svid_key.pem")
        assert (stat.S_IMODE(key.st_mode), key.st_gid) == (0o640, FS_GROUP)
        assert os.stat(folder / "svid.pem").st_gid == FS_GROUP


async def test_the_agent_is_asked_with_every_selector_of_the_pod(
    fast_clock: MockClock,
) -> None:
    async with fast_node() as node:
        pod, _ = await published(node, attributes={"csi.spire.io/jwt-audiences": "api"})
        want = frozenset(
            {
                ("k8s", f"ns:{pod.namespace}"),
                ("k8s", f"sa:{pod.service_account}"),
                ("k8s", f"pod-uid:{pod.uid}"),
                ("k8s", f"pod-name:{pod.name}"),
                ("k8s", "node-name:node-a"),
            }
        )
        assert node.agent.open_svid_streams == [want]


async def test_an_entry_on_the_pod_uid_alone_gives_the_pod_its_identity(
    fast_clock: MockClock,
) -> None:
    now = fake_clock()
    pod = Pod("web-0", "default", "00000000-0000-4000-8000-00000000abcd", "web")
    entry = Entry("spiffe://example.org/this-pod", frozenset({("k8s", f"pod-uid:{pod.uid}")}))
    async with fast_node(FakeAgent(now=now, entries=[entry])) as node:
        _, target = await published(node, pod)
        assert seen_identity(node, target).spiffe_id == entry.spiffe_id


async def test_jwt_svid_is_refreshed_before_it_expires(fast_clock: MockClock) -> None:
    async with fast_node() as node:
        _, target = await published(node, attributes={"csi.spire.io/jwt-audiences": "api"})
        for _ in range(6):
            await trio.sleep(node.agent.jwt_ttl * 0.6)
            folder = node.seen(target)
            assert folder is not None
            claims = _jwt_claims((folder / "jwt_svid.token").read_text())
            assert claims["aud"] == ["api"]
            assert claims["sub"] == "spiffe://example.org/ns/default/sa/web"
            expires = claims["exp"]
            assert isinstance(expires, int) and expires > node.now(), "the token has expired"


async def test_jwt_svid_follows_the_identity_the_x509_files_switch_to(
    fast_clock: MockClock,
) -> None:
    """Two entries match the pod; the first is removed: the X.509 files switch to the second
    identity at once, and so does the JWT-SVID, long before its half-life."""
    now = fake_clock()
    first = Entry("spiffe://example.org/web", frozenset({("k8s", "sa:web")}))
    second = Entry("spiffe://example.org/web-0", frozenset({("k8s", "pod-name:web-0")}))
    agent = FakeAgent(now=now, entries=[first, second], jwt_ttl=300)
    async with fast_node(agent) as node:
        _, target = await published(node, attributes={"csi.spire.io/jwt-audiences": "api"})
        folder = node.seen(target)
        assert folder is not None

        def token_subject() -> object:
            return _jwt_claims((folder / "jwt_svid.token").read_text())["sub"]

        assert seen_identity(node, target).spiffe_id == token_subject() == first.spiffe_id
        agent.revoke(first.spiffe_id)
        await eventually(
            lambda: seen_identity(node, target).spiffe_id == second.spiffe_id, "X.509 switched"
        )
        await eventually(lambda: token_subject() == second.spiffe_id, "JWT switched", timeout=5)


def _jwt_claims(token: str) -> dict[str, object]:
    part = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    assert isinstance(claims, dict)
    return claims


async def test_only_federated_trust_domains_get_bundle_files(fast_clock: MockClock) -> None:
    now = fake_clock()
    web = Entry(
        "spiffe://example.org/web",
        frozenset({("k8s", "sa:web")}),
        federates_with=("partner.example",),
    )
    agent = FakeAgent(now=now, entries=[web], federated=["partner.example", "other.example"])
    async with fast_node(agent) as node:
        _, target = await published(node, attributes={"csi.spire.io/federated-bundles": "files"})
        folder = node.seen(target)
        assert folder is not None
        pems = sorted(p for p in os.listdir(folder) if p.endswith(".pem"))
        assert pems == ["partner.example.pem", "svid.pem", "svid_bundle.pem", "svid_key.pem"]
        partner = x509.load_pem_x509_certificates((folder / "partner.example.pem").read_bytes())
        assert partner == [agent.federated_ca("partner.example").root_certificate]


# Restart ---------------------------------------------------------------------------------


async def test_a_restart_resumes_volumes_and_removes_folders_without_metadata(
    fast_clock: MockClock,
) -> None:
    async with fast_node() as node:
        _, target = await published(node)
        before = seen_identity(node, target)
        await node.stop_driver()
        orphan = node.state_dir / "csi-orphan"
        (orphan / "data").mkdir(parents=True)
        await node.start_driver()
        assert not orphan.exists()
        assert sorted(os.listdir(node.state_dir)) == ["csi-1"]
        await eventually(lambda: len(node.agent.open_svid_streams) == 1, "resubscribed")
        assert seen_identity(node, target).serial == before.serial
