"""The volume registry: publish, unpublish and resume, and the volumes' nursery.

Each volume runs in its own cancel scope inside the registry's nursery, so a
volume outlives the NodePublishVolume call that created it but never the
registry. Calls for one volume ID are serialised by a per-ID lock; calls for
different volumes run concurrently.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from .. import log
from ..errors import AlreadyExists, InvalidArgument, NotFound, PublishFailed, SpireCSIError
from ..metrics import Metrics
from ..spire.agent import AgentClient
from ..storage.errors import MountError, StorageError
from ..storage.metadata import MetadataError, MetadataStore, VolumeMetadata
from ..storage.mount import Mounter
from ..storage.paths import TargetParentMissing, open_target
from ..storage.writer import DATA_LINK
from .attributes import VolumeSpec, parse_volume_context
from .selectors import selectors_for
from .volume import Volume, VolumePlan

logger = logging.getLogger(__name__)

CLEANUP_TIMEOUT = 30.0


@dataclass(frozen=True)
class PublishRequest:
    """A validated NodePublishVolume request."""

    volume_id: str
    target_path: Path
    volume_context: Mapping[str, str]
    volume_mount_group: str
    spec: VolumeSpec

    def same_as(self, md: VolumeMetadata) -> bool:
        return (
            Path(md.target_path) == self.target_path
            and md.spec.get("volume_context") == dict(self.volume_context)
            and md.volume_mount_group == self.volume_mount_group
        )


@dataclass(frozen=True)
class VolumeStats:
    used_bytes: int
    total_bytes: int
    available_bytes: int
    used_inodes: int
    total_inodes: int
    available_inodes: int
    abnormal: bool
    message: str


class Registry:
    def __init__(
        self,
        *,
        store: MetadataStore,
        mounter: Mounter,
        agent: AgentClient,
        metrics: Metrics,
        node_id: str,
        kubelet_dir: Path,
        publish_timeout: float,
        selinux_context: str | None = None,
    ) -> None:
        self._store = store
        self._mounter = mounter
        self._kubelet_dir = kubelet_dir
        self._agent = agent
        self._metrics = metrics
        self._node_id = node_id
        self._publish_timeout = publish_timeout
        self._selinux_context = selinux_context
        self._volumes: dict[str, tuple[VolumeMetadata, Volume]] = {}
        self._locks: dict[str, tuple[trio.Lock, int]] = {}
        self._nursery: trio.Nursery | None = None
        metrics.set_expiry_source(self._expiries)

    # Running -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Resume every volume found on disk, then hold the volumes until cancelled.

        Cancelling leaves mounts and files in place: pods keep their files
        while the driver restarts.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._fan_out, self._agent.x509_bundles)
            nursery.start_soon(self._fan_out, self._agent.jwt_bundles)
            self._resume_all()
            task_status.started()

    async def _fan_out(self, value: object) -> None:
        """Wake every volume when a shared bundle set changes (one task for all volumes)."""
        from trio_util import AsyncValue

        assert isinstance(value, AsyncValue)
        async for _ in value.eventual_values(lambda v: True):
            for _md, volume in list(self._volumes.values()):
                volume.wake()

    def _resume_all(self) -> None:
        started = time.perf_counter()
        result = self._store.load_all()
        for path in result.corrupt:
            self._metrics.errors_total.labels(kind="corrupt_metadata").inc()
            try:
                aside = self._store.set_aside(path, "metadata.json is corrupt")
                log.event(
                    logger, logging.ERROR, "metadata_corrupt", folder=str(path), moved_to=str(aside)
                )
            except OSError as exc:
                log.event(
                    logger, logging.ERROR, "metadata_corrupt", folder=str(path), error=str(exc)
                )
        for path in result.orphans:
            try:
                self._store.remove_folder(path)
                log.event(logger, logging.WARNING, "orphan_removed", folder=str(path))
            except OSError as exc:
                log.event(logger, logging.ERROR, "orphan_kept", folder=str(path), error=str(exc))
        for md in result.valid:
            try:
                self._resume(md)
            except (SpireCSIError, MetadataError, MountError, StorageError) as exc:
                try:
                    moved = str(
                        self._store.set_aside(self._store.volume_dir(md.volume_id), str(exc))
                    )
                except OSError as aside_exc:
                    moved = f"not set aside: {aside_exc}"
                log.event(
                    logger,
                    logging.ERROR,
                    "resume_failed",
                    volume_id=md.volume_id,
                    error=str(exc),
                    moved_to=moved,
                )
        log.event(
            logger,
            logging.INFO,
            "resumed",
            volumes=len(self._volumes),
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )

    def _resume(self, md: VolumeMetadata) -> None:
        try:
            target = open_target(self._kubelet_dir, md.target_path, field="metadata target_path")
        except TargetParentMissing:
            # The pod's folder is gone: the kubelet tore the pod down while we were away.
            self._store.remove(md.volume_id)
            log.event(logger, logging.INFO, "resume_pod_gone", volume_id=md.volume_id)
            return
        with target:
            context = md.spec.get("volume_context")
            if not isinstance(context, dict):
                raise MetadataError("metadata has no volume_context")
            spec = parse_volume_context(context, volume_mount_group=md.volume_mount_group)
            # Mount before starting the volume: if the mount fails, nothing of it runs that
            # could write into the folder once it is set aside.
            data = self._store.data_dir(md.volume_id)
            if not self._mounter.is_mounted(target, data):
                self._mounter.bind_readonly(data, target)
        volume = self._start(md, spec)
        log.event(
            logger, logging.INFO, "resumed_volume", volume_id=md.volume_id, pod=volume.plan.pod
        )

    def _start(self, md: VolumeMetadata, spec: VolumeSpec) -> Volume:
        assert self._nursery is not None, "Registry.run() is not running"
        plan = VolumePlan(
            volume_id=md.volume_id,
            target_path=Path(md.target_path),
            data_dir=self._store.volume_dir(md.volume_id) / "data",
            spec=spec,
            selectors=tuple((s.type, s.value) for s in selectors_for(spec.pod, self._node_id)),
            selinux_context=self._selinux_context,
        )
        volume = Volume(plan, self._agent, self._metrics)
        self._volumes[md.volume_id] = (md, volume)
        self._metrics.volumes_published.set(len(self._volumes))
        self._nursery.start_soon(volume.run)
        return volume

    # Publish / unpublish --------------------------------------------------

    @asynccontextmanager
    async def _locked(self, volume_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(volume_id, (trio.Lock(), 0))
        self._locks[volume_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[volume_id]
            if users == 1:
                del self._locks[volume_id]
            else:
                self._locks[volume_id] = (lock, users - 1)

    async def publish(self, req: PublishRequest) -> None:
        """Return once the volume's files are complete and mounted at the target.

        On any failure (including cancellation of the call) everything this
        call created is removed again: the agent stream, the files, the mount.
        """
        async with self._locked(req.volume_id):
            known = self._volumes.get(req.volume_id)
            if known is not None:
                self._republish(req, known[0], known[1])
                return
            md = VolumeMetadata(
                volume_id=req.volume_id,
                target_path=str(req.target_path),
                spec={"volume_context": dict(req.volume_context)},
                volume_mount_group=req.volume_mount_group,
                node_id=self._node_id,
                created_at=time.time(),
            )
            # Checked and held from here on: the wait below cannot redirect the mount.
            with open_target(self._kubelet_dir, req.target_path) as target:
                self._store.remove(req.volume_id)
                self._store.write(md)
                volume = self._start(md, req.spec)
                mounted = False
                try:
                    with trio.move_on_after(self._publish_timeout):
                        await volume.settled.wait()
                    if not volume.written.is_set():
                        raise self._publish_failure(volume)
                    self._mounter.bind_readonly(volume.plan.data_dir, target)
                    mounted = True
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await self._teardown(req.volume_id, req.target_path if mounted else None)
                    raise

    def _republish(self, req: PublishRequest, md: VolumeMetadata, volume: Volume) -> None:
        if not req.same_as(md):
            raise AlreadyExists(
                f"volume {req.volume_id} is already published at {md.target_path} with other "
                "parameters; unpublish it first"
            )
        # Resumed files from a previous driver are complete (the writer only ever points
        # ..data at a whole generation): the volume is published, whatever the agent does now.
        resumed = (volume.plan.data_dir / DATA_LINK).is_dir()
        if not volume.written.is_set() and not resumed:
            raise PublishFailed("unavailable", volume.problem or "waiting for the first SVID")
        with open_target(self._kubelet_dir, req.target_path) as target:
            if not self._mounter.is_mounted(target, volume.plan.data_dir):
                self._mounter.bind_readonly(volume.plan.data_dir, target)

    def _publish_failure(self, volume: Volume) -> PublishFailed:
        waited = f"within {self._publish_timeout:g}s"
        if volume.denied:
            return PublishFailed("permission_denied", volume.problem)
        if not self._agent.connected.value and not volume.unmatched:
            return PublishFailed(
                "unavailable", f"no SVID {waited}: {volume.problem or self._agent.last_error}"
            )
        if volume.problem and not volume.unmatched:
            return PublishFailed("timeout", f"no usable SVID {waited}: {volume.problem}")
        return PublishFailed("timeout", f"no SVID {waited}: {volume.no_entry_message()}")

    async def unpublish(self, volume_id: str, target_path: Path) -> None:
        """Idempotent: succeeds for unknown volumes, unmounted targets and missing metadata."""
        async with self._locked(volume_id):
            known = self._volumes.get(volume_id)
            if known is not None and Path(known[0].target_path) != target_path:
                log.event(
                    logger,
                    logging.WARNING,
                    "unpublish_other_target",
                    volume_id=volume_id,
                    published_at=known[0].target_path,
                    requested=str(target_path),
                )
                await self._teardown(volume_id, Path(known[0].target_path))
            await self._teardown(volume_id, target_path)
            self._metrics.unpublish_total.inc()

    async def _teardown(self, volume_id: str, target: Path | None) -> None:
        """Stop the volume's tasks, then unmount, then delete its folder (in that order)."""
        known = self._volumes.pop(volume_id, None)
        self._metrics.volumes_published.set(len(self._volumes))
        if known is not None:
            with trio.move_on_after(CLEANUP_TIMEOUT):
                await known[1].stop()
        if target is not None:
            try:
                held = open_target(self._kubelet_dir, target)
            except TargetParentMissing:
                pass  # the pod's folder is gone: nothing can be mounted there
            else:
                with held:
                    self._mounter.unmount(held, self._store.data_dir(volume_id))
                    held.remove()
        self._store.remove(volume_id)

    # Queries -------------------------------------------------------------

    def get(self, volume_id: str) -> Volume | None:
        known = self._volumes.get(volume_id)
        return known[1] if known else None

    def stats(self, volume_id: str, volume_path: Path) -> VolumeStats:
        known = self._volumes.get(volume_id)
        if known is None:
            raise NotFound(f"volume {volume_id} is not published on this node")
        md, volume = known
        if Path(md.target_path) != volume_path:
            raise NotFound(
                f"volume {volume_id} is published at {md.target_path}, not {volume_path}"
            )
        used = 0
        inodes = 0
        for entry in os.scandir(volume.plan.data_dir):
            inodes += 1
            if entry.is_dir(follow_symlinks=False):
                for inner in os.scandir(entry.path):
                    inodes += 1
                    used += inner.stat(follow_symlinks=False).st_size
        fs = os.statvfs(volume.plan.data_dir)
        abnormal, message = volume.condition(time.time())
        return VolumeStats(
            used_bytes=used,
            total_bytes=fs.f_blocks * fs.f_frsize,
            available_bytes=fs.f_bavail * fs.f_frsize,
            used_inodes=inodes,
            total_inodes=fs.f_files,
            available_inodes=fs.f_favail,
            abnormal=abnormal,
            message=message,
        )

    def __len__(self) -> int:
        return len(self._volumes)

    def _expiries(self) -> list[float]:
        return [v.expires_at for _md, v in self._volumes.values() if v.expires_at]


__all__ = ["InvalidArgument", "PublishRequest", "Registry", "VolumeStats"]
