"""Driver restarts: SIGTERM and kill -9 leave pods their files; the next driver resumes."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from tests.harness import (
    detach_mounts_under,
    eventually,
    mount_count,
    mounts_under,
    open_node,
    read_identity,
)


def rotated(target: Path, serial: int) -> Callable[[], bool]:
    return lambda: read_identity(target).serial != serial


async def test_kill_9_then_resume_every_volume_from_metadata(tmp_path: Path) -> None:
    async with open_node(tmp_path / "n") as node:
        proc = node.spawn_driver()
        await node.wait_for_socket(proc)
        published = [await node.publish(node.pod(f"web-{i}")) for i in range(3)]
        serials = {vid: read_identity(t).serial for vid, t in published}

        proc.kill()
        proc.wait()
        await eventually(lambda: not node.agent.open_svid_subscriptions, "streams dropped")
        for _, target in published:  # pods keep their files while no driver runs
            assert mount_count(target) == 1
            assert read_identity(target).key_matches

        await node.start_driver()
        await eventually(lambda: len(node.agent.open_svid_subscriptions) == 3, "resubscribed")
        node.agent.rotate()
        for vid, target in published:
            await eventually(rotated(target, serials[vid]), "rotated files")
            assert read_identity(target).key_matches
            assert mount_count(target) == 1

        for vid, target in published:
            await node.client.unpublish(vid, str(target))
            assert mount_count(target) == 0
        assert node.volume_folders() == []
        assert node.agent.open_svid_subscriptions == []


async def test_sigterm_exits_zero_and_leaves_volumes_mounted(tmp_path: Path) -> None:
    async with open_node(tmp_path / "n") as node:
        proc = node.spawn_driver()
        await node.wait_for_socket(proc)
        volume_id, target = await node.publish(node.pod())
        proc.send_signal(signal.SIGTERM)
        code = await trio.to_thread.run_sync(proc.wait, 30)
        assert code == 0
        assert mount_count(target) == 1
        assert read_identity(target).key_matches
        assert node.volume_folders() == [volume_id]
        assert not node.csi_socket.exists()

        await node.start_driver()
        await node.client.unpublish(volume_id, str(target))
        assert mount_count(target) == 0
        assert node.volume_folders() == []


async def test_start_removes_orphans_and_sets_corrupt_metadata_aside(tmp_path: Path) -> None:
    async with open_node(tmp_path / "n") as node:
        await node.start_driver()
        good, good_target = await node.publish(node.pod("good"))
        bad, bad_target = await node.publish(node.pod("bad"))
        await node.stop_driver()

        (node.state_dir / bad / "metadata.json").write_text("{not json")
        orphan = node.state_dir / "csi-orphan"
        (orphan / "data").mkdir(parents=True)  # a crash mid-publish, before the metadata

        await node.start_driver()
        assert node.volume_folders() == [good]
        aside = list((node.state_dir / ".corrupt").iterdir())
        assert len(aside) == 1 and aside[0].name.startswith(bad)
        assert mount_count(good_target) == 1

        # The kubelet can still unpublish the volume whose metadata was lost.
        await node.client.unpublish(bad, str(bad_target))
        assert mount_count(bad_target) == 0
        await node.client.unpublish(good, str(good_target))
        assert node.volume_folders() == []


async def test_resume_drops_volumes_whose_pod_is_gone(tmp_path: Path) -> None:
    async with open_node(tmp_path / "n") as node:
        await node.start_driver()
        _volume_id, target = await node.publish(node.pod())
        await node.stop_driver()
        detach_mounts_under(target)
        pod_dir = target.parents[3]
        for path in sorted(pod_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            path.rmdir()
        pod_dir.rmdir()

        await node.start_driver()
        assert node.volume_folders() == []
        assert node.agent.open_svid_subscriptions == []
        metadata = list(node.state_dir.rglob("metadata.json"))
        assert metadata == [], json.dumps([str(m) for m in metadata])


@pytest.mark.parametrize(
    ("how", "complaint"), [("outside", "is outside the kubelet folder"), ("symlink", "symlink")]
)
async def test_resume_checks_a_recorded_target_as_publish_does(
    tmp_path: Path, how: str, complaint: str
) -> None:
    """A target in metadata.json gets the checks a kubelet request gets: one outside
    --kubelet-dir, or reached through a symlink, is never mounted; the volume is set aside
    without its keys, and the kubelet's unpublish still takes the old mount off."""
    async with open_node(tmp_path / "n") as node:
        await node.start_driver()
        volume_id, target = await node.publish(node.pod())
        await node.stop_driver()
        outside = tmp_path / "outside"
        outside.mkdir()
        if how == "outside":
            forged = outside / "mount"
        else:
            (node.kubelet_dir / "pods" / "link").symlink_to(outside)
            forged = node.kubelet_dir / "pods" / "link" / "mount"
        record = node.state_dir / volume_id / "metadata.json"
        doc = json.loads(record.read_bytes())
        record.write_text(json.dumps({**doc, "target_path": str(forged)}))

        await node.start_driver()

        assert os.listdir(outside) == [] and mounts_under(outside) == []
        assert node.volume_folders() == []
        (aside,) = (node.state_dir / ".corrupt").iterdir()
        note = json.loads((aside / "set-aside.json").read_bytes())
        assert complaint in note["reason"] and str(forged) in note["reason"]
        keys = [
            p for p in node.state_dir.rglob("*") if p.is_file() and b"PRIVATE" in p.read_bytes()
        ]
        assert keys == []
        assert mount_count(target) == 1
        await node.client.unpublish(volume_id, str(target))
        assert mount_count(target) == 0
        assert node.agent.open_svid_subscriptions == []
