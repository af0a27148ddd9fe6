"""The driver end to end: the real daemon on its real socket, the dev agent on another,
real bind mounts, driven the way the kubelet drives it."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import cast

import pytest
import trio

from tests.faults import full, read_only
from tests.harness import Node, eventually, mount_count, mounts_under, open_node, read_identity
from trio_spirecsi._proto.csi.v1 import csi_pb2 as csi
from trio_spirecsi.csi.client import publish_request, volume_context
from trio_spirecsi.grpc import RpcError, StatusCode, methods
from trio_spirecsi.spire.responses import split_der


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with open_node(tmp_path / "node") as node:
        await node.start_driver()
        yield node


def has_bundle(target: Path, bundle: tuple[bytes, ...]) -> Callable[[], bool]:
    return lambda: read_identity(target).bundle == bundle


def selectors_of(node: Node, pod_uid: str) -> set[tuple[str, str]]:
    for selectors in node.agent.open_svid_subscriptions:
        if ("k8s", f"pod-uid:{pod_uid}") in selectors:
            return set(selectors)
    return set()


async def test_publish_mounts_the_pods_identity_read_only(node: Node) -> None:
    pod = node.pod("web-0", "shop", "web")
    volume_id, target = await node.publish(pod)

    ident = read_identity(target)
    assert ident.spiffe_id == "spiffe://example.org/ns/shop/sa/web"
    assert ident.key_matches
    assert ident.bundle == split_der(node.agent.current_bundle_der)
    assert sorted(p.name for p in target.iterdir() if not p.name.startswith(".")) == [
        "svid.pem",
        "svid_bundle.pem",
        "svid_key.pem",
    ]
    assert stat.S_IMODE((target / "svid_key.pem").stat().st_mode) == 0o600
    with pytest.raises(OSError) as info:
        (target / "svid.pem").write_text("tampered")
    assert info.value.errno == errno.EROFS
    assert selectors_of(node, pod.uid) == {
        ("k8s", "ns:shop"),
        ("k8s", "sa:web"),
        ("k8s", f"pod-uid:{pod.uid}"),
        ("k8s", "pod-name:web-0"),
        ("k8s", "node-name:node-a"),
    }
    assert mount_count(target) == 1
    assert node.volume_folders() == [volume_id]


async def test_rotation_replaces_certificate_and_key_together(node: Node) -> None:
    _, target = await node.publish(node.pod())
    before = read_identity(target)
    node.agent.rotate()
    await eventually(lambda: read_identity(target).serial != before.serial, "a rotated SVID")
    after = read_identity(target)
    assert after.key_matches
    assert after.spiffe_id == before.spiffe_id


async def test_a_publish_does_not_wait_behind_other_volumes_rotating(node: Node) -> None:
    """Writes no publish waits for (a rotation of every volume, here) take turns on one
    lane, so the event loop is never held by all of them at once; a publish writes its
    first files without queueing behind them."""
    assert node.daemon is not None
    published = [await node.publish(node.pod(f"web-{n}")) for n in range(3)]
    serials = {target: read_identity(target).serial for _, target in published}
    lane = node.daemon.registry._rewrites
    # Hold every turn of the lane: every rewrite waits.
    async with contextlib.AsyncExitStack() as turns:
        for _ in range(lane.per_turn):
            await turns.enter_async_context(lane)
        node.agent.rotate()
        _, late = await node.publish(node.pod("late"))
        assert read_identity(late).key_matches
        assert read_identity(late).serial not in serials.values()
        for target, serial in serials.items():
            assert read_identity(target).serial == serial, "rewritten out of turn"
    await eventually(
        lambda: all(read_identity(t).serial != serial for t, serial in serials.items()),
        "the rotation of the other volumes landed",
    )


async def test_trust_bundle_change_rewrites_the_bundle_file(node: Node) -> None:
    _, target = await node.publish(node.pod())
    node.agent.rotate_ca()
    await eventually(
        lambda: read_identity(target).bundle == split_der(node.agent.current_bundle_der),
        "the new CA in the bundle file",
    )
    assert read_identity(target).key_matches


async def test_unpublish_closes_the_agent_stream_and_leaves_nothing(node: Node) -> None:
    pod = node.pod()
    volume_id, target = await node.publish(pod)
    assert selectors_of(node, pod.uid)

    await node.client.unpublish(volume_id, str(target))

    assert not selectors_of(node, pod.uid)
    assert mount_count(target) == 0
    assert not target.exists()
    assert node.volume_folders() == []
    # Idempotent: again, and for a volume the driver never knew.
    await node.client.unpublish(volume_id, str(target))
    await node.client.unpublish("csi-never-published", str(node.target(node.pod())))


async def test_publishing_the_same_request_twice_duplicates_nothing(node: Node) -> None:
    pod = node.pod()
    volume_id, target = await node.publish(pod)
    await node.publish(pod, volume_id=volume_id)
    assert mount_count(target) == 1
    assert (
        len([s for s in node.agent.open_svid_subscriptions if ("k8s", f"pod-uid:{pod.uid}") in s])
        == 1
    )

    with pytest.raises(RpcError) as info:
        await node.publish(pod, volume_id=volume_id, attributes={"csi.spire.io/svid-file": "a.pem"})
    assert info.value.code == StatusCode.ALREADY_EXISTS
    assert volume_id in info.value.message
    assert read_identity(target).key_matches


def _request(node: Node, **changes: object) -> csi.NodePublishVolumeRequest:
    pod = node.pod()
    request = publish_request("csi-bad", str(node.target(pod)), volume_context(pod))
    for name, value in changes.items():
        if name == "context":
            request.volume_context.clear()
            request.volume_context.update(cast(dict[str, str], value))
        elif name == "no_capability":
            request.ClearField("volume_capability")
        elif name == "block":
            request.volume_capability.block.SetInParent()
        else:
            setattr(request, name, value)
    return request


def _pod_context(node: Node) -> dict[str, str]:
    return volume_context(node.pod())


BAD_REQUESTS = {
    "volume_id": lambda n: _request(n, volume_id=""),
    "target_path": lambda n: _request(n, target_path=""),
    "kubelet": lambda n: _request(n, target_path="/tmp/elsewhere/mount"),
    "volume_capability": lambda n: _request(n, no_capability=True),
    "block": lambda n: _request(n, block=True),
    "readonly": lambda n: _request(n, readonly=False),
    "ephemeral": lambda n: _request(
        n, context={**_pod_context(n), "csi.storage.k8s.io/ephemeral": "false"}
    ),
    "pod.uid": lambda n: _request(
        n,
        context={k: v for k, v in _pod_context(n).items() if k != "csi.storage.k8s.io/pod.uid"},
    ),
    "csi.spire.io/svid-flie": lambda n: _request(
        n, context={**_pod_context(n), "csi.spire.io/svid-flie": "x.pem"}
    ),
    "csi.spire.io/svid-file": lambda n: _request(
        n, context={**_pod_context(n), "csi.spire.io/svid-file": "../escape.pem"}
    ),
}


@pytest.mark.parametrize("field", sorted(BAD_REQUESTS))
async def test_bad_publish_is_invalid_argument_naming_the_field(node: Node, field: str) -> None:
    request = BAD_REQUESTS[field](node)
    with pytest.raises(RpcError) as info:
        await node.client.publish(request)
    assert info.value.code == StatusCode.INVALID_ARGUMENT
    assert field in info.value.message
    assert node.volume_folders() == []
    assert node.agent.open_svid_subscriptions == []


async def test_hidden_file_names_are_refused(node: Node) -> None:
    with pytest.raises(RpcError) as info:
        await node.publish(node.pod(), attributes={"csi.spire.io/svid-key-file": ".key"})
    assert info.value.code == StatusCode.INVALID_ARGUMENT
    assert "csi.spire.io/svid-key-file" in info.value.message


async def test_unpublish_requires_volume_id_and_target(node: Node) -> None:
    for request in (
        csi.NodeUnpublishVolumeRequest(target_path=str(node.target(node.pod()))),
        csi.NodeUnpublishVolumeRequest(volume_id="csi-x"),
    ):
        with pytest.raises(RpcError) as info:
            await node.channel.unary(methods.NODE_UNPUBLISH_VOLUME, request)
        assert info.value.code == StatusCode.INVALID_ARGUMENT


async def test_no_matching_entry_times_out_listing_the_selectors(tmp_path: Path) -> None:
    async with open_node(tmp_path / "n") as node:
        await node.start_driver(publish_timeout=1.0)
        pod = node.pod("lonely", "ghost", "nobody")
        node.agent.revoke(node.expected_id(pod))
        with pytest.raises(RpcError) as info:
            await node.publish(pod)
        assert info.value.code == StatusCode.FAILED_PRECONDITION
        message = info.value.message
        assert "no registration entry matched" in message
        for selector in ("k8s:ns:ghost", "k8s:sa:nobody", f"k8s:pod-uid:{pod.uid}"):
            assert selector in message
        assert node.volume_folders() == []
        assert node.agent.open_svid_subscriptions == []
        assert mount_count(node.target(pod)) == 0


async def test_a_target_folder_swapped_for_a_symlink_while_publish_waits_is_refused(
    tmp_path: Path,
) -> None:
    """Publish checks the target, then waits for the pod's first SVID; a folder on the target's
    path replaced by a symlink meanwhile gets no mount, there or anywhere else."""
    async with open_node(tmp_path / "n") as node:
        await node.start_driver()
        pod = node.pod()
        node.agent.revoke(node.expected_id(pod))
        outside = tmp_path / "outside"
        outside.mkdir()
        parent = node.target(pod).parent
        failures: list[RpcError] = []

        async def publish() -> None:
            with pytest.raises(RpcError) as info:
                await node.publish(pod)
            failures.append(info.value)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish)
            await eventually(lambda: bool(selectors_of(node, pod.uid)), "publish is waiting")
            parent.rename(parent.with_name("moved"))
            parent.symlink_to(outside)
            node.agent.restore(node.expected_id(pod))

        (error,) = failures
        assert error.code == StatusCode.INVALID_ARGUMENT
        assert "target_path" in error.message and "is a symlink" in error.message
        assert os.listdir(outside) == [] and mounts_under(outside) == []
        assert mounts_under(node.kubelet_dir) == []
        assert node.volume_folders() == []
        await eventually(lambda: not node.agent.open_svid_subscriptions, "the stream closed")


async def test_unreachable_agent_fails_publish_naming_the_socket(tmp_path: Path) -> None:
    async with open_node(tmp_path / "n") as node:
        await node.stop_agent()
        await node.start_driver(publish_timeout=1.0)
        with pytest.raises(RpcError) as info:
            await node.publish(node.pod())
        assert info.value.code == StatusCode.UNAVAILABLE
        assert str(node.admin_socket) in info.value.message
        assert node.volume_folders() == []
        # Probe stays ready: the livenessprobe must not restart the driver over this.
        assert await node.client.probe()


async def test_agent_refusing_the_driver_says_how_to_fix_it(tmp_path: Path) -> None:
    from trio_spirecsi.devagent.agent import DevAgent

    agent = DevAgent("example.org", authorized_uids={os.getuid() + 4242})
    async with open_node(tmp_path / "n", agent) as node:
        await node.start_driver(publish_timeout=5.0)
        with pytest.raises(RpcError) as info:
            await node.publish(node.pod())
        assert info.value.code == StatusCode.PERMISSION_DENIED
        assert "authorized_delegates" in info.value.message
        assert node.volume_folders() == []


async def test_concurrent_publishes_share_one_agent_connection(node: Node) -> None:
    pods = [node.pod(f"web-{i}") for i in range(20)]
    results: dict[str, Path] = {}

    async def one(pod: object) -> None:
        volume_id, target = await node.publish(pod)  # type: ignore[arg-type]
        results[volume_id] = target

    async with trio.open_nursery() as nursery:
        for pod in pods:
            nursery.start_soon(one, pod)
    assert len(results) == 20
    for target in results.values():
        assert read_identity(target).key_matches
    assert len(node.agent.open_svid_subscriptions) == 20
    assert node.daemon is not None
    assert node.daemon.agent.connections_opened == 1


async def test_agent_restart_with_a_new_ca_refreshes_every_volume(tmp_path: Path) -> None:
    from trio_spirecsi.devagent.agent import DevAgent

    async with open_node(tmp_path / "n") as node:
        await node.start_driver()
        targets = [(await node.publish(node.pod(f"p{i}")))[1] for i in range(3)]
        old_bundle = split_der(node.agent.current_bundle_der)
        await node.stop_agent()
        assert all(read_identity(t).bundle == old_bundle for t in targets)  # files stay

        new = await node.start_agent(DevAgent("example.org"))
        new_bundle = split_der(new.current_bundle_der)
        assert new_bundle != old_bundle
        for target in targets:
            await eventually(has_bundle(target, new_bundle), "the new CA's bundle")
            assert read_identity(target).key_matches
        await eventually(lambda: len(new.open_svid_subscriptions) == 3, "resubscribed streams")


async def test_volume_stats_report_condition(node: Node) -> None:
    pod = node.pod()
    volume_id, target = await node.publish(pod)
    stats = await node.client.stats(volume_id, str(target))
    assert not stats.volume_condition.abnormal
    assert node.expected_id(pod) in stats.volume_condition.message
    assert any(u.used > 0 for u in stats.usage)

    node.agent.revoke(node.expected_id(pod))

    async def abnormal() -> bool:
        return (await node.client.stats(volume_id, str(target))).volume_condition.abnormal

    with trio.fail_after(20):
        while not await abnormal():
            await trio.sleep(0.05)
    assert read_identity(target).key_matches  # the last SVID stays until it expires

    with pytest.raises(RpcError) as info:
        await node.client.stats("csi-unknown", str(target))
    assert info.value.code == StatusCode.NOT_FOUND


async def test_identity_and_node_info(node: Node) -> None:
    import trio_spirecsi

    info = await node.client.plugin_info()
    assert (info.name, info.vendor_version) == ("csi.spire.io", trio_spirecsi.__version__)
    caps = await node.channel.unary(
        methods.GET_PLUGIN_CAPABILITIES, csi.GetPluginCapabilitiesRequest()
    )
    assert not any(c.service.type == c.service.CONTROLLER_SERVICE for c in caps.capabilities)
    node_caps = await node.channel.unary(
        methods.NODE_GET_CAPABILITIES, csi.NodeGetCapabilitiesRequest()
    )
    rpc = csi.NodeServiceCapability.RPC
    assert {c.rpc.type for c in node_caps.capabilities} == {
        rpc.VOLUME_MOUNT_GROUP,
        rpc.GET_VOLUME_STATS,
        rpc.VOLUME_CONDITION,
    }
    assert (await node.client.node_info()).node_id == "node-a"
    with pytest.raises(RpcError) as err:
        await node.channel.unary(methods.NODE_STAGE_VOLUME, csi.NodeStageVolumeRequest())
    assert err.value.code == StatusCode.UNIMPLEMENTED


async def test_driver_name_flag_is_reported(tmp_path: Path) -> None:
    async with open_node(tmp_path / "n") as node:
        await node.start_driver(driver_name="spire.example.com")
        assert (await node.client.plugin_info()).name == "spire.example.com"


async def test_selinux_context_labels_the_files_pods_read(tmp_path: Path) -> None:
    label = "system_u:object_r:container_file_t:s0"
    async with open_node(tmp_path / "n") as node:
        await node.start_driver(selinux_context=label)
        _, target = await node.publish(node.pod())
        for name in ("svid.pem", "svid_key.pem", "svid_bundle.pem"):
            assert os.getxattr(target / name, "security.selinux") == label.encode()


async def test_a_storage_failure_reaches_the_kubelet_as_internal_with_its_reason(
    node: Node, tmp_path: Path
) -> None:
    """Something else holds the volume's data mounted: unpublish must not delete files a
    mount still shows, and says why instead of UNKNOWN; the retry works once it is gone."""
    volume_id, target = await node.publish(node.pod())
    (name,) = node.volume_folders()
    folder = node.state_dir / name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(["mount", "--bind", str(folder / "data"), str(elsewhere)], check=True)
    try:
        with pytest.raises(RpcError) as info:
            await node.client.unpublish(volume_id, str(target))
        assert info.value.code == StatusCode.INTERNAL
        assert str(elsewhere) in info.value.message
        # All or nothing: the pod still has its files, the agent stream is still open.
        assert mount_count(target) == 1 and read_identity(target).key_matches
        assert len(node.agent.open_svid_subscriptions) == 1
        daemon = node.daemon
        assert daemon is not None
        errors = daemon.metrics.errors_total.labels(kind="storage_failed")._value.get()
        assert errors == 1
    finally:
        subprocess.run(["umount", str(elsewhere)], check=True)
    await node.client.unpublish(volume_id, str(target))
    assert node.volume_folders() == []
    assert mount_count(target) == 0


async def test_a_target_whose_parent_is_missing_is_invalid_argument_not_internal(
    node: Node,
) -> None:
    pod = node.pod()
    target = node.kubelet_dir / "pods" / pod.uid / "volumes" / "kubernetes.io~csi" / "x" / "mount"
    context = volume_context(pod, {})
    with pytest.raises(RpcError) as info:
        await node.client.publish(publish_request("csi-orphan", str(target), context))
    assert info.value.code == StatusCode.INVALID_ARGUMENT
    assert info.value.message.startswith("target_path: ")
    assert "does not exist" in info.value.message
    assert node.volume_folders() == []
    # The subscription leaves before the target is walked (the agent answers meanwhile); the
    # refusal cancels it, and the agent learns so from the stream's reset a moment later.
    await eventually(
        lambda: node.agent.open_svid_subscriptions == [], "the refused publish's stream closed"
    )


@pytest.fixture
async def small_disk_node(tmp_path: Path) -> AsyncIterator[Node]:
    """A node whose state dir is its own 4 MiB tmpfs (unmounted with the node)."""
    async with open_node(tmp_path / "node") as node:
        node.state_dir.mkdir()
        mount = ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(node.state_dir)]
        subprocess.run(mount, check=True)
        await node.start_driver()
        yield node


async def assert_refused_and_gone(
    node: Node, pod_name: str, kept: tuple[str, Path], reason: str
) -> tuple[str, Path, csi.NodePublishVolumeRequest]:
    """A first publish fails INTERNAL naming ``reason``, and nothing of it is left: no
    folder, no target, no mount, no agent subscription; the kept volume keeps its files."""
    pod = node.pod(pod_name)
    target = node.target(pod)
    request = publish_request("csi-new", str(target), volume_context(pod, {}))
    before = read_identity(kept[1])
    with pytest.raises(RpcError) as info:
        await node.client.publish(request)
    assert info.value.code == StatusCode.INTERNAL
    assert reason in info.value.message
    assert str(node.state_dir) in info.value.message  # which file or folder
    assert node.volume_folders() == [kept[0]]
    assert not target.exists()
    assert mounts_under(node.kubelet_dir) == [kept[1]]
    await eventually(
        lambda: (
            [selectors_of(node, pod.uid)] == [set()]
            and len(node.agent.open_svid_subscriptions) == 1
        ),
        "the failed publish's stream closed, the kept volume's open",
    )
    after = read_identity(kept[1])
    assert (after.serial, after.key_matches) == (before.serial, True)
    return "csi-new", target, request


async def test_a_first_publish_on_a_full_state_disk_fails_clearly_then_succeeds_on_retry(
    small_disk_node: Node,
) -> None:
    node = small_disk_node
    kept = await node.publish(node.pod("kept-0"))
    with full(node.state_dir):
        volume_id, target, request = await assert_refused_and_gone(
            node, "new-0", kept, "No space left on device"
        )
    await node.client.publish(request)  # the kubelet's retry, once there is room
    assert read_identity(target).key_matches
    assert node.volume_folders() == sorted([kept[0], volume_id])


async def test_a_first_publish_on_a_read_only_state_dir_fails_clearly_while_others_rotate(
    node: Node,
) -> None:
    """Only the state dir itself is read-only (the kept volume's folder, a mount of its own,
    stays writable): the new volume cannot be created, the kept one rotates meanwhile."""
    kept = await node.publish(node.pod("kept-0"))
    kept_dir = node.state_dir / kept[0]
    subprocess.run(["mount", "--bind", str(kept_dir), str(kept_dir)], check=True)
    with read_only(node.state_dir):
        volume_id, target, request = await assert_refused_and_gone(
            node, "new-0", kept, "Read-only file system"
        )
        serial = read_identity(kept[1]).serial
        node.agent.rotate()
        await eventually(lambda: read_identity(kept[1]).serial != serial, "the kept one rotated")
        assert read_identity(kept[1]).key_matches
    await node.client.publish(request)
    assert read_identity(target).key_matches
    assert node.volume_folders() == sorted([kept[0], volume_id])


async def test_malformed_agent_data_keeps_the_files_and_refuses_new_publishes(
    tmp_path: Path,
) -> None:
    async with open_node(tmp_path / "n") as node:
        daemon = await node.start_driver(publish_timeout=2.0)
        pod = node.pod("web-0")
        volume_id, target = await node.publish(pod)
        before = read_identity(target)
        node.agent.garble(before.spiffe_id)
        node.agent.rotate(before.spiffe_id)
        await eventually(
            lambda: daemon.metrics.errors_total.labels(kind="agent_bad_data")._value.get() >= 1,
            "the garbled SVID counted as bad agent data",
        )
        assert read_identity(target) == before  # the last good files stay
        volume = daemon.registry.get(volume_id)
        assert volume is not None
        problem = volume.state.value.problem
        assert problem is not None and "cannot use" in problem.message

        with pytest.raises(RpcError) as info:
            await node.publish(node.pod("web-1"))
        assert info.value.code == StatusCode.FAILED_PRECONDITION
        assert "no usable SVID" in info.value.message
        assert "private key" in info.value.message

        node.agent.ungarble(before.spiffe_id)
        await eventually(lambda: read_identity(target).serial != before.serial, "recovered")
        assert read_identity(target).key_matches
        assert volume.state.value.problem is None
